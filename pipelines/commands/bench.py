"""``vendor-audit bench``, ``bench-checks``, ``bench-incremental``, ``bench-drift``, ``bench-scale`` and
``bench-engines``: the benchmarks, each writing its section of BENCHMARKS.md."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipelines.audit_run import run_audit
from pipelines.console import console_logging

log = logging.getLogger("vendor_audit")


def register(add) -> None:
    p = add("bench", "benchmark the estimates against the truth and cleanlab; writes BENCHMARKS.md")
    p.add_argument("--scenarios", default="A,B,C,D,E,W,N,S500,S100,L",
                   help="comma-separated scenario keys (see BENCHMARKS.md)")
    p.add_argument("--seeds", type=int, default=10, help="seeds per scenario")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds of each training")
    p.add_argument("--epochs", type=int, default=8, help="training epochs per fold (20 on digits)")
    p.add_argument("--head", choices=["softmax", "l2softmax"], default="l2softmax", help="classifier head")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="of the training steps, as the setting")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap refits behind each interval")
    p.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"),
                   help="Markdown file whose bench section is replaced (created if missing)")
    p.set_defaults(handler=bench, needs_home=False)
    p = add("bench-checks", "benchmark hand checks: the combined estimate per budget against uniform checks alone")
    p.add_argument("--scenarios", default="A,B,C,D,W", help="comma-separated scenario keys of vendor-audit bench")
    p.add_argument("--budgets", default="25,50,100,200", help="checks per vendor, comma-separated")
    p.add_argument("--seeds", type=int, default=10, help="seeds per scenario")
    p.add_argument("--draws", type=int, default=20, help="check plans drawn per seed and budget")
    p.add_argument("--uniform-share", type=float, default=None, metavar="S",
                   help="share of each plan spread evenly (default: the product's); another value measures the design")
    p.add_argument("--folds", type=int, default=3, help="as in vendor-audit bench")
    p.add_argument("--epochs", type=int, default=8, help="as in vendor-audit bench")
    p.add_argument("--head", choices=["softmax", "l2softmax"], default="l2softmax", help="as in vendor-audit bench")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="as in vendor-audit bench")
    p.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"),
                   help="Markdown file whose bench-checks section is replaced (created if missing)")
    p.set_defaults(handler=bench_checks, needs_home=False)
    p = add("bench-incremental", "time new-batch scoring against full re-runs as batches accumulate")
    p.add_argument("--checkpoints", default="1,5,20",
                   help="numbers of deliveries already in when a new one is timed, comma-separated")
    p.add_argument("--per-batch", type=int, default=2000, metavar="N", help="images in each simulated delivery")
    p.add_argument("--full-up-to", type=int, default=20, metavar="N",
                   help="largest checkpoint that also times a full re-run")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of each training")
    p.add_argument("--epochs", type=int, default=8, help="training epochs per fold")
    p.add_argument("--heads", default="auto",
                   help="classifier heads trained, comma-separated, or auto (the settings' rule)")
    p.add_argument("--dataset", choices=["fashion-mnist", "cifar10"], default="fashion-mnist",
                   help="images of the deliveries: Fashion-MNIST (vendors a, b, c) or CIFAR-10 photos (a, b, c, d)")
    p.add_argument("--source", type=Path, default=None, metavar="PATH",
                   help="cifar10 only: an .npz of photos, as for simulate (default: $CIFAR10_NPZ)")
    p.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"),
                   help="Markdown file whose bench-incremental section is replaced (created if missing)")
    p.set_defaults(handler=bench_incremental, needs_home=False)
    p = add("bench-drift", "benchmark the worsening test and the contract verdicts over deliveries")
    p.add_argument("--seeds", type=int, default=20, help="seeds (nightly audits) per data set")
    p.add_argument("--data", default="simulated,photos",
                   help="simulated (Fashion-MNIST), photos (the CIFAR-10 photos of $CIFAR10_NPZ with their "
                        "CIFAR-10N worker labels), comma-separated")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits behind each interval and test "
                                                              "(the product's default)")
    p.add_argument("--processes", type=int, default=1, help="audits run at once, one process each")
    p.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"),
                   help="Markdown file whose bench-drift section is replaced (created if missing)")
    p.set_defaults(handler=bench_drift, needs_home=False)
    p = add("bench-scale", "time the estimation stages (label issues and rates, scorecard, check plan, report) "
                           "as the collection grows, with peak memory")
    p.add_argument("--sizes", default="10000,100000,1000000", help="image counts, comma-separated")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits (the product's default)")
    p.add_argument("--plot", type=Path, default=Path("docs/img/scale.png"),
                   help="PNG of seconds against images per stage, log-log")
    p.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"),
                   help="Markdown file whose bench-scale section is replaced (created if missing)")
    p.set_defaults(handler=bench_scale, needs_home=False)
    p = add("bench-engines", "time backbone features, and ingestion from PNG files, of the same photos by engine "
                             "local and engine ray (a local Ray cluster), in one run, and compare the results")
    p.add_argument("--sizes", default="10000", help="photo counts, comma-separated")
    p.add_argument("--source", type=Path, default=None, metavar="PATH",
                   help="CIFAR-10 photos (.npz with images uint8 (N, 32, 32, 3)); default $CIFAR10_NPZ")
    p.add_argument("--backbone", default="efficientnet_lite0", help="the backbone whose features are computed")
    p.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"),
                   help="Markdown file whose bench-engines section is replaced (created if missing)")
    p.set_defaults(handler=bench_engines, needs_home=False)


def bench(args) -> None:
    import time

    from bench.accuracy import BenchConfig, format_late_table, format_tables, run_benchmark
    from ml.train import pick_device, resolve_precision

    console_logging("ml")
    config = BenchConfig(seeds=args.seeds, folds=args.folds, epochs=args.epochs, head=args.head,
                         precision=args.precision, bootstrap=args.bootstrap, cache=args.home / "bench-cache")
    started = time.perf_counter()
    summaries, late = run_benchmark([k.strip() for k in args.scenarios.split(",")], config)
    tables = (format_tables(summaries) if summaries else "") + "\n".join(format_late_table(s) for s in late)
    print(tables)
    text = (f"## `{_bench_command('bench')}`\n\n"
            f"Model: K={args.folds}-fold {args.head} CNN, {args.epochs} epochs on Fashion-MNIST (20 on digits), CPU, "
            f"{resolve_precision(args.precision, pick_device())[0]} training steps; "
            f"{(time.perf_counter() - started) / 60:.0f} min for this run. Each cell: ours \\| cleanlab's defaults "
            f"on the same out-of-fold probabilities.\n\n" + tables)
    _write_bench_section(args.output, "bench", text)


def bench_checks(args) -> None:
    import time

    from bench.accuracy import BenchConfig
    from bench.checks import format_checks_table, run_checks_benchmark
    from ml.check_sampling import UNIFORM_SHARE

    console_logging("ml")
    config = BenchConfig(seeds=args.seeds, folds=args.folds, epochs=args.epochs, head=args.head,
                         precision=args.precision, cache=args.home / "bench-cache")
    started = time.perf_counter()
    budgets = tuple(int(b) for b in args.budgets.split(","))
    share = UNIFORM_SHARE if args.uniform_share is None else args.uniform_share
    if not 0 <= share <= 1:
        raise SystemExit(f"--uniform-share {share}: a share, between 0 and 1")
    summaries = run_checks_benchmark([k.strip() for k in args.scenarios.split(",")], config, budgets, args.draws,
                                     share)
    table = format_checks_table(summaries)
    print(table)
    text = (f"## `{_bench_command('bench-checks')}`\n\n"
            f"Model outputs as in `vendor-audit bench` (K={args.folds}-fold {args.head} CNN, {args.epochs} epochs, "
            f"cached); per seed, {args.draws} independent check plans per budget ({100 * share:.0f}% of each spread "
            f"evenly), answered from the truth. "
            f"{(time.perf_counter() - started) / 60:.0f} min for this run.\n\n" + table)
    _write_bench_section(args.output, "bench-checks", text)


def bench_incremental(args) -> None:
    from bench.incremental import format_incremental, run_incremental_benchmark

    heads = args.heads if args.heads == "auto" else tuple(args.heads.split(","))
    overrides = {"folds": args.folds, "epochs": args.epochs, "heads": heads}
    rows = run_incremental_benchmark(args.home, [int(c) for c in args.checkpoints.split(",")], args.per_batch,
                                     args.full_up_to, overrides, run_audit, args.dataset, args.source)
    text = format_incremental(rows, _bench_command("bench-incremental"), f"{args.dataset}, {args.per_batch} images "
                              f"a batch, {args.folds}-fold training, heads {args.heads}, {args.epochs} epochs, CPU")
    print(text)
    _write_bench_section(args.output, "bench-incremental", text)


def bench_drift(args) -> None:
    import time

    from bench.accuracy import BenchConfig
    from bench.drift import format_drift, run_photos, run_simulated, summarize

    console_logging("ml", "bench")
    data = {d.strip() for d in args.data.split(",")}
    unknown = data - {"simulated", "photos"}
    if unknown:
        raise SystemExit(f"--data: unknown {sorted(unknown)}; choose simulated, photos")
    cache = args.home / "bench-cache"
    started = time.perf_counter()
    # as vendor-audit bench trains: 3-fold l2softmax CNN on Fashion-MNIST, the photos' 5-fold softmax probe
    simulated = run_simulated(args.seeds, BenchConfig(folds=3, head="l2softmax", bootstrap=args.bootstrap,
                                                      cache=cache), args.processes) if "simulated" in data else []
    photos = run_photos(args.seeds, BenchConfig(folds=5, head="softmax", bootstrap=args.bootstrap,
                                                cache=cache), args.processes) if "photos" in data else []
    text = format_drift(summarize(simulated, photos))
    print(text)
    text = (f"## `{_bench_command('bench-drift')}`\n\n"
            f"Each seed: one audit of a home where every vendor made 5 deliveries of 1,000 images (bench/drift.py "
            f"says how they are drawn); the classifier trained once per data set (Fashion-MNIST: 3-fold l2softmax "
            f"CNN, 8 epochs; photos: 5-fold softmax probe on efficientnet_lite0), {args.bootstrap} bootstrap refits. "
            f"{(time.perf_counter() - started) / 60:.0f} min for this run, CPU.\n\n" + text)
    _write_bench_section(args.output, "bench-drift", text)


def bench_scale(args) -> None:
    from bench.scale import format_scale, run_scale_benchmark, scale_plot
    from ml.files import atomic_write_bytes

    console_logging("ml", "bench")
    sizes = [int(n) for n in args.sizes.split(",")]
    if sorted(sizes) != sizes or sizes[0] < 1000:
        raise SystemExit(f"--sizes: increasing image counts of at least 1000 (got {args.sizes})")
    results = run_scale_benchmark(sizes, args.bootstrap)
    text = format_scale(results, _bench_command("bench-scale"))
    print(text)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.plot, scale_plot(results))
    _write_bench_section(args.output, "bench-scale", text + f"\n![time against images]({args.plot.as_posix()})\n")


def bench_engines(args) -> None:
    from bench.engines import format_engines, measure_engines
    from ml.datasets import load_cifar10

    console_logging("ml", "bench")
    photos = load_cifar10(args.source).images
    sizes = [int(n) for n in args.sizes.split(",")]
    if max(sizes) > len(photos):
        raise SystemExit(f"--sizes: at most {len(photos):,} photos are in {args.source or '$CIFAR10_NPZ'}")
    results = [measure_engines(photos[:n], args.backbone) for n in sizes]
    text = format_engines(results, _bench_command("bench-engines"))
    print(text)
    _write_bench_section(args.output, "bench-engines", text)


PATH_OPTIONS = ("--home", "--output", "--plot", "--source")


def _without_paths(argv: list[str]) -> list[str]:
    """Command-line words without ``--home DIR``, ``--output FILE``, ``--plot FILE`` and ``--source PATH``
    (machine-specific paths), for reproduce lines."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in PATH_OPTIONS:
            skip = True
        elif not word.startswith(tuple(f"{option}=" for option in PATH_OPTIONS)):
            kept.append(word)
    return kept


def _bench_command(name: str) -> str:
    """The benchmark command as run, without machine-specific paths, for the heading of its section."""
    import shlex

    return (f"vendor-audit {name} " + " ".join(shlex.quote(a) for a in _without_paths(sys.argv[2:]))).strip()


def _write_bench_section(output: Path, name: str, text: str) -> None:
    from ml.report import write_section

    write_section(output, name, text)
    log.info("wrote %s", output)
