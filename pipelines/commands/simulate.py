"""``vendor-audit simulate``: write simulated vendor deliveries with known wrong labels."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ml.wording import count

DEFAULT_VENDORS = "a=0.0,b=0.05,c=0.2"

log = logging.getLogger("vendor_audit")


def add_simulation_options(p: argparse.ArgumentParser) -> None:
    """The options of a simulation, which ``demo`` takes too."""
    p.add_argument("--dataset", choices=["fashion-mnist", "digits", "cifar10"], default="fashion-mnist",
                   help="source of the images and their true labels (cifar10: photos)")
    p.add_argument("--source", type=Path, default=None, metavar="PATH",
                   help="cifar10 only: an .npz with images uint8 (N, 32, 32, 3) and labels (default: $CIFAR10_NPZ, "
                        "else torchvision's downloader where there is internet)")
    p.add_argument("--vendors", default=DEFAULT_VENDORS,
                   help="vendors and the share of their labels made wrong: name=error_rate,...")
    p.add_argument("--per-vendor", type=int, default=2000, metavar="N", help="images delivered by each vendor")
    p.add_argument("--seed", type=int, default=0, help="random seed of the draw of images and wrong labels")
    p.add_argument("--batch", default="batch-001", help="batch name of the deliveries (landing/<vendor>/<batch>)")
    p.add_argument("--noise", choices=["uniform", "pairs"], default="uniform",
                   help="wrong labels: any other class, or swaps of confusable class pairs")
    p.add_argument("--ambiguous", type=float, default=0.0,
                   help="share of images composed of two classes (their truth is both)")


def register(add) -> None:
    p = add("simulate", "write simulated vendor deliveries with known wrong labels")
    add_simulation_options(p)
    p.set_defaults(handler=simulate, needs_home=False)


def simulate(args) -> None:
    from ml.datasets import load_dataset
    from ml.simulate import parse_vendor_rates, simulate_deliveries

    data = load_dataset(args.dataset, args.source)
    truth = simulate_deliveries(data, parse_vendor_rates(args.vendors), args.per_vendor, args.home,
                                seed=args.seed, batch=args.batch, noise=args.noise, ambiguous=args.ambiguous)
    log.info("wrote %s for %s under %s", count(len(truth), "image"), count(truth["vendor"].nunique(), "vendor"),
             args.home / "landing")
