"""The audit report for a vendor manager: one content model rendered as Markdown and as a
self-contained HTML page (images inline), with per-vendor confusion plots and thumbnails."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ml.checks import QUARANTINE_KINDS
from ml.contract import MODEL_ONLY_CAVEAT, basis_lines, got_worse, verdict_lines
from ml.delivery import QUARANTINE_COLUMNS, DeliveryError, load_curated_delivery
from ml.files import atomic_write_bytes, atomic_write_text
from ml.history import audit_trend_plot, delivery_trend_plot
from ml.plots import figure_png, pyplot
from ml.reliability import Reliability, reliability_lines
from ml.scorecard import MODEL_ONLY, RATED, UPPER_ONLY_NOTE, disagreements, format_p_value, rate_basis
from ml.thumbnails import thumbnail_png
from ml.wording import count, is_finite_number as _finite, percent, percent_interval


BLANK_BELOW = 0.005  # confusion cells under 0.5% are left blank: noise of the estimate, not a pattern
DIAGONAL_GREY = "#d9d9d9"


def _percent_label(value: float) -> str:
    return f"{100 * value:.1f}%" if value < 0.095 else f"{100 * value:.0f}%"


def confusion_colours(confusion: np.ndarray):
    """The cell colours of a confusion plot: RGBA (K, K, 4) for ``confusion`` (K, K), with the
    off-diagonal colour map and norm (for the colour bar).

    Cells under BLANK_BELOW are white, the diagonal is neutral grey, and the off-diagonal follows a
    power (0.6) scale from 0 to at least 10%, starting above the map's near-white end, so that 1-5%
    confusions show beside a 90% diagonal and are never mistaken for blank cells.
    """
    from matplotlib import colormaps, colors

    confusion = np.asarray(confusion, dtype=np.float64)
    k = confusion.shape[0]
    diagonal = np.eye(k, dtype=bool)
    off = np.where(diagonal, 0.0, confusion)
    norm = colors.PowerNorm(gamma=0.6, vmin=0.0, vmax=max(0.1, float(off.max())))
    cmap = colors.ListedColormap(colormaps["OrRd"](np.linspace(0.18, 1.0, 256)))
    rgba = np.ones((k, k, 4))
    shown = confusion >= BLANK_BELOW
    rgba[shown & ~diagonal] = cmap(norm(off[shown & ~diagonal]))
    rgba[shown & diagonal] = colors.to_rgba(DIAGONAL_GREY)
    return rgba, cmap, norm


def confusion_plot(confusion: np.ndarray, classes: tuple[str, ...], title: str) -> bytes:
    """PNG bytes of a vendor's estimated confusion ``C[true, given]`` (K, K), rows summing to 1.

    Cells show percentages of the true class; cells under 0.5% are blank. The diagonal (labelled
    correctly) is neutral grey; the off-diagonal (mistakes) has its own colour scale with a colour
    bar (``confusion_colours``).
    """
    from matplotlib import cm
    from matplotlib.patches import Patch

    confusion = np.asarray(confusion, dtype=np.float64)
    k = len(classes)
    if confusion.shape != (k, k):
        raise ValueError(f"confusion plot {title!r}: expected a ({k}, {k}) matrix, got {confusion.shape}")
    rgba, cmap, norm = confusion_colours(confusion)
    diagonal = np.eye(k, dtype=bool)
    shown = confusion >= BLANK_BELOW

    fig, ax = pyplot().subplots(figsize=(0.46 * k + 3.2, 0.42 * k + 2.2))
    ax.imshow(rgba, interpolation="nearest")
    ax.set_xticks(np.arange(k), classes, rotation=45 if max(map(len, classes)) > 2 else 0,
                  ha="right" if max(map(len, classes)) > 2 else "center", fontsize=9)
    ax.set_yticks(np.arange(k), classes, fontsize=9)
    ax.set_xticks(np.arange(k + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(k + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="#bbbbbb", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("Label given by the vendor", fontsize=10)
    ax.set_ylabel("True class (estimated)", fontsize=10)
    fontsize = 8 if k <= 10 else max(4.5, 8 - 0.3 * (k - 10))
    for i, j in zip(*np.nonzero(shown)):
        value = confusion[i, j]
        dark = not diagonal[i, j] and norm(value) > 0.6
        ax.text(j, i, _percent_label(value), ha="center", va="center", fontsize=fontsize,
                color="white" if dark else "#222222")
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.046, pad=0.03)
    ticks = [t for t in (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0) if t <= norm.vmax]
    bar.set_ticks(ticks, labels=[f"{100 * t:.0f}%" for t in ticks])
    bar.set_label("Wrong label: share of the true class", fontsize=9)
    ax.legend(handles=[Patch(facecolor=DIAGONAL_GREY, edgecolor="#999999", label="correct label (diagonal)"),
                       Patch(facecolor="white", edgecolor="#999999", label="blank: under 0.5%")],
              loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=2, frameon=False, fontsize=8)
    return figure_png(fig, title)


def markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


# ---- the content model: what the report says, rendered to Markdown and to HTML ----------------------


@dataclass(frozen=True)
class Strong:
    """Emphasised words inside a paragraph or a list item."""

    text: str


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    parts: tuple  # of str and Strong


@dataclass(frozen=True)
class Bullets:
    items: tuple  # of tuples of str and Strong


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Picture:
    """A PNG shown in the report: the Markdown links ``path`` (relative to the report), the HTML inlines ``png``."""

    path: str
    png: bytes
    alt: str
    caption: tuple[str, ...] = ()


@dataclass(frozen=True)
class Gallery:
    pictures: tuple[Picture, ...]


Block = Heading | Paragraph | Bullets | Table | Picture | Gallery


@dataclass
class Report:
    """The rendered report: ``markdown`` and self-contained ``html`` from the same ``blocks``; ``files``
    maps paths relative to the reports folder to the PNG bytes the Markdown links to."""

    blocks: list
    markdown: str
    html: str
    files: dict[str, bytes]


def _para(*parts) -> Paragraph:
    return Paragraph(tuple(parts))


# escaped only where Markdown would read them as markup: intra-word underscores ("label_issues.csv")
# and a "<" before a space ("p < 0.001") stay as they are, so the raw file reads well too
_MD_SPECIAL = re.compile(r"([\\`*\[\]|]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|<(?=[A-Za-z/!?]))")
_NUMERIC_CELL = re.compile(r"^[-+<>]?\s?\d")


def _md_escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


def _md_inline(parts) -> str:
    return "".join(f"**{_md_escape(p.text)}**" if isinstance(p, Strong) else _md_escape(p) for p in parts)


def _numeric_columns(table: Table) -> list[bool]:
    return [bool(table.rows) and all(_NUMERIC_CELL.match(row[c]) or row[c] in ("", "-") for row in table.rows)
            for c in range(len(table.columns))]


def to_markdown(blocks: list) -> str:
    """Markdown text of ``blocks``; pictures link their ``path``."""
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append("#" * block.level + " " + _md_escape(block.text))
        elif isinstance(block, Paragraph):
            out.append(_md_inline(block.parts))
        elif isinstance(block, Bullets):
            out.append("\n".join("- " + _md_inline(item) for item in block.items))
        elif isinstance(block, Table):
            numeric = _numeric_columns(block)
            lines = ["| " + " | ".join(_md_escape(c) for c in block.columns) + " |",
                     "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
            lines += ["| " + " | ".join(_md_escape(cell) for cell in row) + " |" for row in block.rows]
            out.append("\n".join(lines))
        elif isinstance(block, Picture):
            text = f"![{_md_escape(block.alt)}]({block.path})"
            out.append(text + (f"\n\n*{_md_escape('; '.join(block.caption))}*" if block.caption else ""))
        elif isinstance(block, Gallery):
            lines = ["| Image | What to check |", "|---|---|"]
            lines += [f"| ![{_md_escape(p.alt)}]({p.path}) | {_md_escape('; '.join(p.caption))} |"
                      for p in block.pictures]
            out.append("\n".join(lines))
        else:
            raise TypeError(f"report: unknown block {type(block).__name__}")
    return "\n\n".join(out) + "\n"


def _html_inline(parts) -> str:
    return "".join(f"<strong>{html.escape(p.text)}</strong>" if isinstance(p, Strong) else html.escape(p)
                   for p in parts)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_figure(picture: Picture, css_class: str) -> str:
    caption = "<br>".join(html.escape(line) for line in picture.caption)
    return (f'<figure class="{css_class}"><img src="{_data_uri(picture.png)}" alt="{html.escape(picture.alt)}">'
            + (f"<figcaption>{caption}</figcaption>" if caption else "") + "</figure>")


_HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1f2328; margin: 0; background: #ffffff; line-height: 1.45; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 1.8em; margin-bottom: 0.2em; }
h2 { font-size: 1.35em; margin-top: 1.8em; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; }
h3 { font-size: 1.1em; margin-top: 1.3em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.95em; }
th, td { border: 1px solid #d0d7de; padding: 5px 10px; vertical-align: top; }
th { background: #f3f4f6; text-align: left; }
td.num { text-align: right; white-space: nowrap; }
ul { padding-left: 1.4em; }
li { margin: 0.25em 0; }
figure { margin: 0.8em 0; }
figure.plot img { max-width: 100%; height: auto; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
figure.thumb { margin: 0; width: 150px; font-size: 0.8em; }
figure.thumb img { image-rendering: pixelated; border: 1px solid #d0d7de; max-width: 150px; }
figcaption { color: #424a53; word-break: break-all; }
figcaption strong { word-break: normal; }
"""


def to_html(blocks: list, title: str = "Vendor audit") -> str:
    """A self-contained HTML page of ``blocks``: inline CSS, pictures as base64 data URIs, no scripts."""
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_html_inline(block.parts)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{_html_inline(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            numeric = _numeric_columns(block)
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.columns)
            rows = "".join("<tr>" + "".join(f'<td{" class=num" if n else ""}>{html.escape(cell)}</td>'
                                            for cell, n in zip(row, numeric)) + "</tr>" for row in block.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(block, Picture):
            body.append(_html_figure(block, "plot"))
        elif isinstance(block, Gallery):
            body.append('<div class="gallery">' + "".join(_html_figure(p, "thumb") for p in block.pictures)
                        + "</div>")
        else:
            raise TypeError(f"report: unknown block {type(block).__name__}")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_HTML_STYLE}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


# ---- formatting ---------------------------------------------------------------------------------------


def points(value) -> str:
    """A difference of fractions in percentage points, one decimal."""
    return f"{100 * float(value):.1f}"


def p_value_text(p) -> str:
    """The p-value as text at the method's resolution (:func:`ml.scorecard.format_p_value`: "< 0.001",
    "0.034"); "not tested" when missing."""
    return format_p_value(float(p)) if _finite(p) else "not tested"


def _p_phrase(text: str) -> str:
    return f"p {text}" if text[:1] in "<>≤≥" else f"p = {text}"


def _and(names: list[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ---- what the report is built from --------------------------------------------------------------------


_FEWER = re.compile(r"^\s*(?P<better>[A-Za-z0-9_-]+) has fewer errors than (?P<worse>[A-Za-z0-9_-]+)\s*$")


def _scorecard_frame(scorecard: pd.DataFrame) -> pd.DataFrame:
    card = scorecard.copy()
    card["note"] = card["note"].fillna("").astype(str)
    for column in ("n_images", "n_flagged", "n_ambiguous"):
        card[column] = pd.to_numeric(card[column]).astype(int)
    for column in ("error_rate", "error_rate_low", "error_rate_high", "rank", "cleanlab_error_rate"):
        if column in card:
            card[column] = pd.to_numeric(card[column], errors="coerce")
    return card.reset_index(drop=True)


def _comparisons_frame(comparisons: pd.DataFrame) -> pd.DataFrame:
    comps = comparisons.copy()
    for column in ("difference", "difference_low", "difference_high", "p_value", "p_holm"):
        if column in comps:
            comps[column] = pd.to_numeric(comps[column], errors="coerce")
    comps["conclusion"] = comps["conclusion"].fillna("").astype(str)
    comps["p_shown"] = comps["p_holm"].map(p_value_text)  # the Holm-adjusted p-value the conclusion rests on
    return comps.reset_index(drop=True)


def _fewer_pairs(comps: pd.DataFrame) -> set[tuple[str, str]]:
    """(better, worse) for every comparison whose conclusion says one vendor has fewer errors."""
    found = set()
    for conclusion in comps["conclusion"]:
        match = _FEWER.match(conclusion)
        if match:
            found.add((match["better"], match["worse"]))
    return found


def _difference_of(comps: pd.DataFrame, first: str, second: str) -> tuple[float, float, float, str] | None:
    """rate(first) - rate(second), its interval and the p-value shown, whichever way round the pair is stored."""
    for row in comps.itertuples(index=False):
        if (row.vendor_a, row.vendor_b) == (first, second):
            return row.difference, row.difference_low, row.difference_high, row.p_shown
        if (row.vendor_a, row.vendor_b) == (second, first):
            return -row.difference, -row.difference_high, -row.difference_low, row.p_shown
    return None


def likely_errors(issues: pd.DataFrame, per_vendor: int = 6) -> pd.DataFrame:
    """The ``per_vendor`` images of each vendor with verdict ``error`` and the highest ``p_error``
    (label_issues rows, ties by image_id), vendor by vendor."""
    flagged = issues[issues["verdict"] == "error"].assign(p_error=lambda f: pd.to_numeric(f["p_error"]))
    flagged = flagged.sort_values(["vendor", "p_error", "image_id"], ascending=[True, False, True])
    return flagged.groupby("vendor", sort=True).head(per_vendor).reset_index(drop=True)


def confused_classes(issues: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """Per vendor, the ``top`` (true, given) pairs among its ``error`` rows: ``suggested_label`` is the
    likely true class, ``given_label`` what the vendor wrote. Columns vendor, true_class, given, n_images."""
    flagged = issues[issues["verdict"] == "error"]
    counts = (flagged.groupby(["vendor", "suggested_label", "given_label"]).size().rename("n_images").reset_index()
              .rename(columns={"suggested_label": "true_class", "given_label": "given"}))
    counts = counts.sort_values(["vendor", "n_images", "true_class", "given"], ascending=[True, False, True, True])
    return counts.groupby("vendor").head(top).reset_index(drop=True)


def duplicate_pairs(issues: pd.DataFrame, examples: int = 3) -> pd.DataFrame:
    """Images delivered again: per (vendor, first_vendor) pair, the count and a few
    ``(image_id, duplicate_of)`` examples. ``duplicate_of`` names the copy with the same content that
    arrived first (:func:`ml.delivery.duplicate_of`)."""
    columns = ["vendor", "first_vendor", "n_images", "examples"]
    if "duplicate_of" not in issues:
        return pd.DataFrame(columns=columns)
    repeats = issues[issues["duplicate_of"].fillna("").astype(str) != ""]
    owner = dict(zip(issues["image_id"], issues["vendor"]))
    rows = []
    for (vendor, first_vendor), group in repeats.groupby(
            [repeats["vendor"], repeats["duplicate_of"].map(lambda i: owner.get(i, i.split("/")[0]))]):
        group = group.sort_values("image_id")
        rows.append({"vendor": vendor, "first_vendor": first_vendor, "n_images": len(group),
                     "examples": list(zip(group["image_id"], group["duplicate_of"]))[:examples]})
    return pd.DataFrame(rows, columns=columns).sort_values("n_images", ascending=False, kind="stable")


def delivery_intake(issues: pd.DataFrame, quarantined: pd.DataFrame) -> pd.DataFrame:
    """Per delivery: rows curated (from ``issues``) and quarantined, the quarantined share, the reasons
    by frequency, and whether the whole delivery was rejected (its one quarantine row has ``row`` 0).
    Columns vendor, batch, n_curated, n_quarantined, n_delivered, share, reasons (list of
    (reason, count)), whole."""
    keys = ["vendor", "batch"]
    curated = issues.groupby(keys).size().rename("n_curated")
    if len(quarantined):
        whole_rows = pd.to_numeric(quarantined["row"], errors="coerce").eq(0) if "row" in quarantined else False
        whole = quarantined.assign(whole=whole_rows).groupby(keys)["whole"].any()
        rejected = quarantined.groupby(keys).size().rename("n_quarantined")
        reasons = quarantined.groupby(keys)["reason"].agg(
            lambda r: list(r.value_counts().sort_index().sort_values(ascending=False, kind="stable").items()))
    else:
        whole = pd.Series(dtype=bool, name="whole")
        rejected = pd.Series(dtype=int, name="n_quarantined")
        reasons = pd.Series(dtype=object, name="reasons")
    intake = pd.concat([curated, rejected], axis=1).fillna(0).astype(int)
    intake["whole"] = [bool(whole.get(key, False)) for key in intake.index]
    intake["n_delivered"] = intake["n_curated"] + intake["n_quarantined"]
    intake["share"] = (intake["n_quarantined"] / intake["n_delivered"].clip(lower=1)).where(~intake["whole"], 1.0)
    intake["reasons"] = [reasons.get(key, []) for key in intake.index]
    return intake.rename_axis(keys).reset_index().sort_values(keys).reset_index(drop=True)


# ---- sections ----------------------------------------------------------------------------------------


def _rate_text(row, basis: str = "") -> str:
    return percent_interval(row.error_rate, row.error_rate_low, row.error_rate_high, basis)


def _without(note: str, warning: str) -> str:
    """``note`` less ``warning`` (one of the parts joined by ``"; "``)."""
    return "; ".join(part.strip("; ") for part in note.split(warning) if part.strip("; ")) if warning else note


UNPLANNED_ADVICE = ("Those answers set the images' verdicts but do not change the rate: images picked because "
                    "they look wrong are not a random sample.")


def _plan_advice(names: list[str], checks: pd.DataFrame | None) -> tuple:
    """The way to measure the rates by hand: a check plan, with the checks expected to halve each rated
    vendor's interval where the planner has computed them."""
    text = ("To measure the rates by hand, whatever the model's quality, draw a check plan: vendor-audit plan "
            "--budget N picks N images per vendor at random (more where the model is unsure); once answered in "
            "checks/, each rate combines the checks with the model.")
    if checks is not None and "checks_to_halve" in checks.columns:
        halve = checks.set_index("vendor")["checks_to_halve"]
        known = [f"{v} {int(halve[v]):,}" for v in names if v in halve.index and _finite(halve[v])]
        if known:
            text += f" Checks expected to halve each interval: {', '.join(known)}."
    return (text,)


def _summary(card, comps, intake_warned, duplicates, n_boot: int, checks: pd.DataFrame | None = None) -> list:
    """The summary: findings (each rated vendor's figure with what it rests on, hand checks that
    disagree with the model), how sure, and what to do next (with the checks that would make model-only
    verdicts check-based)."""
    rated = card[card["status"] == RATED].sort_values(["error_rate", "vendor"])
    unrated = card[card["status"] != RATED]
    by_vendor = {row.vendor: row for row in card.itertuples(index=False)}
    basis = dict(zip(card["vendor"], rate_basis(card)))

    def figure(row) -> str:
        return _rate_text(row, basis[row.vendor])

    disagree = dict(zip(card["vendor"], disagreements(card)))
    names = list(rated["vendor"])
    fewer = _fewer_pairs(comps)
    findings, actions = [], []

    if not names:
        findings.append(("No vendor has enough images to be rated yet.",))
    elif len(names) == 1:
        only = by_vendor[names[0]]
        estimate = (f"at most {100 * only.error_rate_high:.1f}% of its labels are wrong (an upper estimate, "
                    f"{figure(only)})" if UPPER_ONLY_NOTE in str(only.note)
                    else f"an estimated {figure(only)} of its labels are wrong")
        findings.append((Strong(only.vendor), f" is the only vendor with enough images to rate: {estimate}. "
                         "There is no other vendor to compare it with."))
    else:
        best = [v for v in names if all((v, w) in fewer for w in names if w != v)]
        if best:
            b = by_vendor[best[0]]
            others = [w for w in names if w != b.vendor]
            findings.append((Strong(f"{b.vendor} is the best vendor"), f": an estimated {figure(b)} of its "
                             f"labels are wrong, significantly fewer errors than {_and(others)}."))
        else:
            lowest = by_vendor[names[0]]
            ties = [w for w in names[1:] if (lowest.vendor, w) not in fewer]
            findings.append(("No vendor is clearly best. ", Strong(lowest.vendor), f" has the lowest estimate "
                             f"({figure(lowest)}), but it is not distinguishable from {_and(ties)} with this "
                             "data."))
        for worse in reversed(names):
            better = [v for v in names if (v, worse) in fewer]
            if not better:
                continue
            gaps = []
            for v in better:
                diff, low, high, p_text = _difference_of(comps, worse, v)
                gaps.append(f"{points(diff)} percentage points more than {v} (95% interval {points(low)} to "
                            f"{points(high)}, {_p_phrase(p_text)})")
            row = by_vendor[worse]
            findings.append((Strong(f"{worse} has more errors"), f": an estimated {figure(row)}, "
                             + "; ".join(gaps) + "."))
            if row.n_flagged:
                actions.append((f"To confirm errors to take up with {worse}, check its "
                                f"{count(row.n_flagged, 'flagged image')}, most likely first. {UNPLANNED_ADVICE}",))
        for row in comps.itertuples(index=False):
            if row.vendor_a in names and row.vendor_b in names and not _FEWER.match(row.conclusion):
                pair = sorted([row.vendor_a, row.vendor_b], key=names.index)
                diff, low, high, _ = _difference_of(comps, pair[1], pair[0])
                findings.append((Strong(f"{pair[1]} and {pair[0]} are not distinguishable with this data"),
                                 f": {pair[1]}'s estimate is {points(diff)} points higher, but the 95% interval of "
                                 f"the difference ({points(low)} to {points(high)} points) includes no difference."))
                actions.append((f"Do not rank {pair[1]} and {pair[0]} against each other on this audit; more "
                                f"images from both would narrow the intervals.",))
        if not fewer:
            top = rated.sort_values("n_flagged", ascending=False).iloc[0]
            if top.n_flagged:
                actions.append((f"To confirm errors to take up with {top.vendor}, spot-check its "
                                f"{count(top.n_flagged, 'flagged image')}, highest probability of error first. "
                                f"{UNPLANNED_ADVICE}",))
    for vendor in names:
        if disagree[vendor]:
            findings.append((Strong(vendor), f": {disagree[vendor]}."))
    worse = dict(zip(card["vendor"], got_worse(card)))
    for vendor in names:
        if worse[vendor]:
            findings.append((Strong(f"{vendor} got worse"), f": {worse[vendor].removeprefix('got worse: ')}. "
                             "The section Over time plots each delivery."))
    for row in unrated.itertuples(index=False):
        findings.append((Strong(row.vendor), f" delivered {count(row.n_images, 'image')}: {row.status}. Its "
                         f"figures are shown but it is not ranked or compared."))
        actions.append((f"Collect more images from {row.vendor} before judging it.",))
    for row in intake_warned.itertuples(index=False):
        reason = row.reasons[0][0] if row.reasons else "see the quarantine file"
        if row.whole:
            findings.append((Strong(f"{row.vendor}/{row.batch}"), f": the whole delivery was rejected ({reason})."))
            actions.append((f"Ask {row.vendor} to fix and redeliver {row.batch} under a new batch name.",))
            continue
        findings.append((Strong(f"{row.vendor}/{row.batch}"), f": {count(row.n_quarantined, 'row')} of "
                         f"{row.n_delivered:,} ({percent(row.share)}) could not be used (mostly: {reason})."))
        actions.append((f"Ask {row.vendor} to fix and redeliver the rejected rows of {row.batch} "
                        f"(quarantine/{row.vendor}/{row.batch}.csv lists each with its reason).",))
    for row in duplicates.itertuples(index=False):
        same = row.vendor == row.first_vendor
        findings.append((Strong(row.vendor), f" delivered {count(row.n_images, 'image')} that "
                         + ("it had already delivered in another batch." if same
                            else f"{row.first_vendor} had already delivered.")))
        actions.append((f"Ask {row.vendor} about the {count(row.n_images, 'repeated image')} and make sure "
                        f"they are not paid for twice.",))
    for row in card[card["status"] == RATED].itertuples(index=False):
        note = _without(_without(row.note.strip(), disagree[row.vendor]), worse[row.vendor])  # said above
        if note:
            actions.append((f"Read the warning about {row.vendor} under Input problems: {note}.",))

    actions += [(line,) for line in basis_lines(card)]
    if names:
        actions.append(_plan_advice(names, checks))
    if any("flagged image" in a[0] and a[0].startswith("To confirm errors") for a in actions):
        actions.append(("The flagged images are the rows of label_issues.csv with verdict \"error\"; the most "
                        "likely of each vendor are shown below.",))
    sureness = (f"How sure: each rate is an estimate with a 95% interval from {n_boot:,} bootstrap refits"
                + ("; where hand checks exist, from the checks combined with the model" if _any_combined(card) else "")
                + ".")
    if len(comps):
        sureness += (f" A vendor is called better than another only where the pairwise test finds the difference "
                     f"significant at the 5% level after the Holm correction for making "
                     f"{count(len(comps), 'comparison')} at once.")
    blocks = [Heading(2, "Summary"), Bullets(tuple(findings))]
    if (rated["vendor"].map(basis) == MODEL_ONLY).any():  # the figures above must not read as certain
        blocks.append(_para(MODEL_ONLY_CAVEAT))
    blocks.append(_para(sureness))
    if actions:
        blocks += [Heading(3, "What to do next"), Bullets(tuple(actions))]
    return blocks


def _rank_text(rank) -> str:
    return str(int(rank)) if _finite(rank) else "-"


def _hand_checks(card, checks: pd.DataFrame | None) -> list:
    """Per vendor: the design checks, errors found, the checks-only and combined rates, and the further
    checks expected to halve the interval; then unplanned checks, answers awaited and gold images."""
    if checks is None:
        return []
    frame = checks.set_index("vendor")
    blocks = [Heading(2, "Hand checks")]
    anything = int(frame[["n_checked", "unplanned_checks", "awaiting_answers", "gold_images"]].to_numpy().sum())
    if not anything:
        rows = tuple((v, f"{int(frame.at[v, 'checks_to_halve']):,}") for v in card["vendor"] if v in frame.index)
        return blocks + [
            _para("No image has been checked by hand yet. vendor-audit plan --budget N draws N images per vendor "
                  "to check, more where the model is unsure; once answered (checks/*.csv), each rate combines the "
                  "checks with the model and its interval holds whatever the model's quality."),
            Table(("Vendor", "Checks expected to halve the interval"), rows)]
    rows = []
    for vendor in card["vendor"]:
        if vendor not in frame.index:
            continue
        r = frame.loc[vendor]
        combined = bool(r["combined"])
        rows.append((vendor, f"{int(r['n_checked']):,}", f"{int(r['checked_errors']):,}",
                     percent_interval(r["checks_error_rate"], r["checks_error_rate_low"], r["checks_error_rate_high"])
                     if combined else "-",
                     percent_interval(r["combined_rate"], r["combined_low"], r["combined_high"]) if combined else "-",
                     f"{int(r['checks_to_halve']):,}"))
    blocks += [
        _para("Images checked by hand as part of a check plan (drawn at random with known probabilities, more where "
              "the model is unsure) or as gold images. Each checked image's verdict follows the check. Where a "
              "vendor has such checks, its rate combines them with the model (a prediction-powered estimate): the "
              "checks correct the model's bias, so the rate stays unbiased and its interval valid whatever the "
              "model's quality. The checks-only rate weights each check by its probability of being drawn."),
        Table(("Vendor", "Checks", "Errors found", "Checks only (95% interval)", "Combined with the model (95% interval)",
               "More checks to halve the interval"), tuple(rows)),
    ]
    notes = []
    for vendor in card["vendor"]:
        if vendor not in frame.index:
            continue
        r = frame.loc[vendor]
        if int(r["unplanned_checks"]):
            notes.append((Strong(vendor), f": {count(int(r['unplanned_checks']), 'answer')} for images no plan "
                          "drew: their verdicts follow the answers, but they are left out of the rate, since nobody "
                          "knows how likely they were to be chosen (picked because they looked wrong, they would "
                          "bias it)."))
        if int(r["awaiting_answers"]):
            notes.append((Strong(vendor), f": {count(int(r['awaiting_answers']), 'planned image')} not answered "
                          "yet (reports/check_plan.csv)."))
        if int(r["n_checked"]) and int(r["outside_plans"]):
            notes.append((Strong(vendor), f": {count(int(r['outside_plans']), 'image')} in no check plan "
                          "(delivered after the last one, or none drawn yet), so the rate shown is the model's until "
                          "vendor-audit plan covers them."))
        if int(r["gold_images"]):
            notes.append((Strong(vendor), f": {count(int(r['gold_images']), 'gold image')}, "
                          f"{percent(r['gold_accuracy'])} labelled correctly."))
    if notes:
        blocks.append(Bullets(tuple(notes)))
    blocks.append(_para("More checks to halve the interval: the checks one more plan would need, expected from the "
                        "model's probabilities of error; while fewer than five errors are found the interval is the "
                        "checks-only one, and at least as many checks again are counted."))
    return blocks


def _vendor_table(card) -> list:
    rows = tuple((row.vendor, f"{row.n_images:,}", f"{row.n_flagged:,}", f"{row.n_ambiguous:,}", _rate_text(row),
                  _rank_text(row.rank), row.status + (" (see warnings)" if row.note.strip() else ""))
                 for row in card.itertuples(index=False))
    return [
        Heading(2, "Vendors"),
        Table(("Vendor", "Images", "Likely errors", "Ambiguous (not billed)", "Estimated error rate (95% interval)",
               "Rank", "Status"), rows),
        _para("Estimated error rate: the share of a vendor's images whose label is wrong, estimated from all its "
              "images and corrected for what the detector misses, with a 95% interval. Likely errors: images "
              "individually flagged as probably mislabeled. Ambiguous: images that genuinely show two classes; "
              "they are not counted as errors. Rank 1 has the fewest errors; a rank alone does not mean a "
              "difference is real (see the pairwise comparisons). The intervals also allow for what the data cannot "
              "tell: at the low end, that some of what is counted is the model's own confident mistakes, which "
              "fall on every vendor alike (so the vendor with the fewest errors may have none); at the high end, "
              "that a vendor's errors are of the kind the model itself finds plausible, and so partly missed."
              + (" Where a vendor's images were checked by hand, its rate combines the checks with the model "
                 "(see Hand checks)." if _any_combined(card) else "")),
    ]


def _any_combined(card) -> bool:
    return "n_checked" in card and bool((pd.to_numeric(card["checks_error_rate"], errors="coerce").notna()).any())


def _pairwise(comps) -> list:
    blocks = [Heading(2, "Pairwise comparisons")]
    if not len(comps):
        return blocks + [_para("Only one vendor: nothing to compare.")]
    rows = []
    for row in comps.itertuples(index=False):
        if _finite(row.difference):
            higher, lower = (row.vendor_a, row.vendor_b) if row.difference >= 0 else (row.vendor_b, row.vendor_a)
            diff, low, high, _ = _difference_of(comps, higher, lower)
            difference = (f"{higher} {points(diff)} points higher" if points(diff) != "0.0" else "no difference") \
                + f" (95% interval {points(low)} to {points(high)})"
        else:
            difference = "n/a"
        rows.append((f"{row.vendor_a} vs {row.vendor_b}", row.conclusion, difference, row.p_shown))
    return blocks + [
        _para("Each line compares two vendors' estimated error rates. Points are percentage points: 5.0% against "
              "2.0% is 3.0 points. A vendor is called better only where the difference is significant at the 5% "
              "level, after the Holm correction for making several comparisons at once; otherwise the pair is "
              "not distinguishable with this data."),
        Table(("Vendors", "Conclusion", "Difference in error rate", "p-value (Holm-adjusted)"), tuple(rows)),
    ]


def _over_time(deliveries: pd.DataFrame | None, history: pd.DataFrame | None, files: dict[str, bytes]) -> list:
    """Each vendor's rate per delivery and across audits: shown once some vendor has two deliveries or
    the home two audits."""
    audits = history["audited_at"].nunique() if history is not None else 0
    several = deliveries is not None and bool((deliveries.groupby("vendor").size() > 1).any())
    if not several and audits < 2:
        return []
    blocks = [Heading(2, "Over time")]
    if deliveries is not None and len(deliveries):
        path = "plots/trend-deliveries.png"
        files[path] = delivery_trend_plot(deliveries)
        blocks += [_para("Each delivery's own error rate with its 95% interval, by the same estimator as the "
                         "vendors' (reports/deliveries.csv), oldest delivery first; the dashed line is the "
                         "contract's limit where one is set. A vendor's newest delivery is tested against its "
                         "earlier ones: the summary names a vendor that got worse."),
                   Picture(path, files[path], "error rate per delivery")]
    if audits >= 2:
        path = "plots/trend-audits.png"
        files[path] = audit_trend_plot(history)
        blocks += [_para(f"Each vendor's pooled error rate in each of the {count(audits, 'audit')} kept in "
                         "history/scorecards.parquet (a night that changed the data, the model or the hand checks "
                         "adds one point). Rates of different audits rest on different data: a vendor's newer "
                         "deliveries move its pooled rate."),
                   Picture(path, files[path], "error rate per audit")]
    else:
        blocks.append(_para("The rates across audits are plotted from the second audit on "
                            "(history/scorecards.parquet)."))
    return blocks


def _annotators(annotators: pd.DataFrame | None) -> list:
    if annotators is None or not len(annotators):
        return []
    counts = annotators.groupby("vendor")["annotator"].nunique()
    several = counts[counts > 1].index
    if not len(several):
        return []
    shown = annotators[annotators["vendor"].isin(several)].sort_values(["vendor", "annotator"])
    rows = tuple((str(r.vendor), str(r.annotator), f"{int(r.n_images):,}", f"{int(r.n_flagged):,}",
                  percent_interval(r.error_rate, r.error_rate_low, r.error_rate_high),
                  str(r.status)) for r in shown.itertuples(index=False))
    return [Heading(2, "Annotators within each vendor"),
            _para("Vendors whose deliveries name more than one annotator, annotator by annotator, estimated the "
                  "same way as the vendors."),
            Table(("Vendor", "Annotator", "Images", "Likely errors", "Estimated error rate (95% interval)", "Status"),
                  rows)]


def _confusions(card, issues) -> list:
    top = confused_classes(issues)
    rows = []
    for vendor in card["vendor"]:
        mine = top[top["vendor"] == vendor]
        cells = [f"labels {r.true_class} as {r.given}: {count(int(r.n_images), 'image')}"
                 for r in mine.itertuples(index=False)]
        cells = cells or ["no likely errors"]
        rows.append((vendor, *cells, *["-"] * (3 - len(cells))))
    # the explanation's example is this audit's own most frequent confusion, in its own class names
    example = ""
    if len(top):
        first = top.sort_values("n_images", ascending=False, kind="stable").iloc[0]
        example = (f"\"labels {first.true_class} as {first.given}\" means images that are probably {first.true_class} "
                   f"were labelled {first.given}.")
    return [Heading(2, "Classes each vendor confuses most"),
            _para(f"From the likely errors. {example}".strip()),
            Table(("Vendor", "Most often", "Second", "Third"), tuple(rows))]


def _gallery(card, issues, images: dict[str, np.ndarray], files: dict[str, bytes]) -> list:
    blocks = [Heading(2, "Most likely errors, to check by hand"),
              _para("Each vendor's flagged images with the highest probability that the given label is wrong "
                    "(p_error), captioned with the label given and the likely true class.")]
    chosen = likely_errors(issues)
    for row in card.itertuples(index=False):
        mine = chosen[chosen["vendor"] == row.vendor]
        if not len(mine):
            blocks += [Heading(3, f"{row.vendor}: none flagged"),
                       _para(f"No image of {row.vendor} is flagged as a likely error.")]
            continue
        shown = (count(len(mine), "flagged image") if len(mine) == row.n_flagged
                 else f"the {len(mine)} most likely of {count(row.n_flagged, 'flagged image')}")
        blocks.append(Heading(3, f"{row.vendor}: {shown}"))
        pictures = []
        for i, r in enumerate(mine.itertuples(index=False), start=1):
            if r.image_id not in images:
                raise ValueError(f"report: no image given for {r.image_id} (a likely error of {row.vendor})")
            path = f"thumbs/{row.vendor}-{i}.png"
            files[path] = thumbnail_png(images[r.image_id])
            alt = f"{r.image_id}: given {r.given_label}, likely {r.suggested_label}"
            pictures.append(Picture(path, files[path], alt,
                                    (f"given {r.given_label} → likely {r.suggested_label}",
                                     f"p_error {float(r.p_error):.2f}", r.image_id)))
        blocks.append(Gallery(tuple(pictures)))
    return blocks


def _duplicates(duplicates: pd.DataFrame) -> list:
    blocks = [Heading(2, "Images delivered more than once")]
    if not len(duplicates):
        return blocks + [_para("No image was delivered twice (same file content).")]
    rows = tuple((r.vendor, r.first_vendor, f"{r.n_images:,}",
                  "; ".join(f"{image} (first: {first})" for image, first in r.examples))
                 for r in duplicates.itertuples(index=False))
    return blocks + [_para("Images with exactly the same content as an image delivered earlier. They are kept and "
                           "scored, but they may have been paid for twice. The first copy is the one in the "
                           "delivery ingested first (then the earliest labeled_at; vendor and batch names only "
                           "break exact ties)."),
                     Table(("Delivered by", "Already delivered by", "Images", "Examples"), rows)]


def _input_problems(card, intake: pd.DataFrame, warn_share: float) -> list:
    warned = intake[intake["share"] > warn_share]
    blocks = [Heading(2, "Input problems")]
    if len(warned):
        blocks += [_para(f"Deliveries with more than {percent(warn_share)} of their rows rejected. Rejected rows are "
                         "not scored; quarantine/<vendor>/<batch>.csv lists each with its reason."),
                   Table(("Delivery", "Rows delivered", "Rejected", "Share rejected", "Top reasons"),
                         tuple((f"{r.vendor}/{r.batch}", "-" if r.whole else f"{r.n_delivered:,}",
                                "whole delivery" if r.whole else f"{r.n_quarantined:,}", percent(r.share),
                                "; ".join(f"{reason}: {n}" for reason, n in r.reasons[:3]))
                               for r in warned.itertuples(index=False)))]
    else:
        blocks.append(_para(f"No delivery had more than {percent(warn_share)} of its rows rejected."))
    below = intake[(intake["n_quarantined"] > 0) & (intake["share"] <= warn_share)]
    if len(below):
        blocks.append(_para(f"{count(len(below), 'other delivery')} had a few rows rejected, below that share: "
                            + ", ".join(f"{r.vendor}/{r.batch} ({r.n_quarantined})"
                                        for r in below.itertuples(index=False)) + "."))
    notes = card[card["note"].str.strip() != ""]
    if len(notes):
        blocks += [Heading(3, "Warnings"),
                   Bullets(tuple((Strong(r.vendor), f": {r.note.strip()}") for r in notes.itertuples(index=False)))]
    return blocks


def _confusion_plots(card, confusion: np.ndarray, vendors: list[str], classes: tuple[str, ...],
                     files: dict[str, bytes]) -> list:
    blocks = [Heading(2, "Estimated confusion per vendor"),
              _para("Rows are the true class (as estimated), columns the label the vendor gave; each cell is the "
                    "share of that true class's images given that label. Grey diagonal: labelled correctly. "
                    "Coloured cells: mistakes, on their own colour scale so that 1-5% confusions stand out. "
                    "Blank: under 0.5%.")]
    index = {v: i for i, v in enumerate(vendors)}
    for vendor in card["vendor"]:
        if vendor not in index:
            raise ValueError(f"report: no confusion matrix for vendor {vendor!r} (matrices for {vendors})")
        path = f"plots/confusion-{vendor}.png"
        files[path] = confusion_plot(confusion[index[vendor]], classes, f"{vendor}: labels given against true class")
        blocks.append(Picture(path, files[path], f"{vendor} confusion"))
    return blocks


def _baseline(card) -> list:
    if "cleanlab_error_rate" not in card:
        return []
    higher = int((card["cleanlab_error_rate"] > card["error_rate"] + 0.0005).sum())
    lower = int((card["cleanlab_error_rate"] < card["error_rate"] - 0.0005).sum())
    rows = tuple((r.vendor, _rate_text(r), percent(r.cleanlab_error_rate)) for r in card.itertuples(index=False))
    return [Heading(2, "Baseline: cleanlab"),
            _para("For reference, cleanlab's num_label_issues share on the same classifier outputs: the share of a "
                  "vendor's images whose given label has low self-confidence under the classifier. It counts the "
                  "classifier's own mistakes as label errors too, so it tends to read higher than the true error "
                  "rate, most of all for good vendors and when the classifier is weak; it also misses the errors "
                  "the classifier has learned to repeat, and it comes with no interval. "
                  f"Here it is higher than our estimate for {higher} of {count(len(card), 'vendor')} and lower "
                  f"for {lower}."),
            Table(("Vendor", "Our estimate (95% interval)", "cleanlab's share"), rows),
            _para(Strong("Use our estimate for decisions"), ": it is corrected for the classifier's mistakes and "
                  "what the detector misses, and its interval says how sure it is.")]


_PROVENANCE_NAMES = {"dataset_version": "Dataset version (DVC)", "model": "Model", "model_version": "Model version",
                     "model_trained_on": "Model trained on dataset", "head": "Model head",
                     "mlflow_run": "MLflow run", "generated_at": "Report generated",
                     "worsening_window_days": "Worsening test: recent deliveries within (days)"}


def _provenance(provenance: dict) -> list:
    rows = tuple((_PROVENANCE_NAMES.get(k, k), str(v)) for k, v in provenance.items())
    return [Heading(2, "Provenance"), _para("Where these figures come from, to reproduce or trace them."),
            Table(("Item", "Value"), rows)]


def build_report(scorecard: pd.DataFrame, comparisons: pd.DataFrame, issues: pd.DataFrame, confusion: np.ndarray,
                 vendors: list[str], classes: tuple[str, ...], provenance: dict, images: dict[str, np.ndarray],
                 quarantined: pd.DataFrame, quarantine_warn_share: float, n_boot: int,
                 annotators: pd.DataFrame | None = None, hand_checks: pd.DataFrame | None = None,
                 reliability: Reliability | None = None, remedies: list[str] = (),
                 deliveries: pd.DataFrame | None = None, history: pd.DataFrame | None = None) -> Report:
    """The audit report for a vendor manager, as Markdown and as one self-contained HTML page.

    Parameters
    ----------
    scorecard : one row per vendor (reports/scorecard.csv's columns; ``status`` and ``note`` optional).
    comparisons : one row per vendor pair (reports/comparisons.csv's columns; ``p_holm`` optional).
    issues : one row per image (reports/label_issues.csv's columns).
    confusion : (V, K, K) estimated ``C[true, given]`` per vendor, in the order of ``vendors``.
    vendors : the V vendor names of ``confusion``.
    classes : the K class names.
    provenance : item -> value, shown last in this order.
    images : image_id -> uint8 image (S, S, C), at least for ``likely_errors(issues)``.
    quarantined : every quarantined row (columns vendor, batch, reason, ...); may be empty.
    quarantine_warn_share : deliveries above this rejected share are reported.
    n_boot : bootstrap replicates behind the intervals and p-values.
    annotators : optional per-annotator rates (vendor, annotator, n_images, n_flagged, error_rate,
        error_rate_low, error_rate_high, status).
    hand_checks : optional per-vendor hand checks (:data:`ml.check_plan.VENDOR_CHECK_COLUMNS`): a "Hand
        checks" section after the pairwise comparisons.
    reliability : optional verdict on the rates, per vendor of ``vendors``; where some rate is
        unreliable, the report's first lines say so, why, and what would help (``remedies``,
        :func:`ml.reliability.what_would_help`).
    deliveries : optional per-delivery rates (reports/deliveries.csv) and ``history``, every audit's
        scorecard (:data:`ml.history.HISTORY_COLUMNS`): an "Over time" section plots each vendor's rate
        per delivery, and per audit once there are two.

    Where the scorecard has the contract's columns (:func:`ml.contract.with_contract`) and some vendor
    a limit, the report's first lines give each such vendor's action (pay, warn, drop) and why.

    Returns
    -------
    Report: the Markdown, the HTML, and the PNG files (plots/, thumbs/) the Markdown links to.
    """
    card = _scorecard_frame(scorecard)
    comps = _comparisons_frame(comparisons)
    intake = delivery_intake(issues, quarantined)
    duplicates = duplicate_pairs(issues)
    files: dict[str, bytes] = {}
    n_images = int(card["n_images"].sum())
    blocks = [Heading(1, "Vendor audit"),
              _para(f"{count(n_images, 'image')} from {count(len(card), 'vendor')}"
                    + (f", report of {provenance['generated_at']}" if provenance.get("generated_at") else "") + ".")]
    # what the buyer acts on first: pay, warn or drop per vendor, where a contract is set
    contract = verdict_lines(scorecard)
    if contract:
        blocks.append(Bullets(tuple((Strong(head), f" — {text}") for head, text in contract)))
    warning = reliability_lines(reliability, vendors, list(remedies)) if reliability is not None else []
    if warning:  # before any figure: the reader must not take an unreliable rate at face value
        blocks.append(_para(Strong(warning[0]), " " + " ".join(warning[1:])))
    blocks += _summary(card, comps, intake[intake["share"] > quarantine_warn_share], duplicates, n_boot, hand_checks)
    blocks += _vendor_table(card)
    blocks += _pairwise(comps)
    blocks += _hand_checks(card, hand_checks)
    blocks += _over_time(deliveries, history, files)
    blocks += _annotators(annotators)
    blocks += _confusions(card, issues)
    blocks += _gallery(card, issues, images, files)
    blocks += _duplicates(duplicates)
    blocks += _input_problems(card, intake, quarantine_warn_share)
    blocks += _confusion_plots(card, confusion, vendors, classes, files)
    blocks += _baseline(card)
    blocks += _provenance(provenance)
    return Report(blocks, to_markdown(blocks), to_html(blocks), files)


# ---- reading the inputs and writing the report -------------------------------------------------------


def load_issue_images(curated: Path, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """image_id -> uint8 image (S, S, C) for ``rows`` (columns image_id, vendor, batch), read from the
    curated deliveries."""
    found: dict[str, np.ndarray] = {}
    for (vendor, batch), wanted in rows.groupby(["vendor", "batch"]):
        delivered, images = load_curated_delivery(curated, vendor, batch)
        position = dict(zip(delivered["image_id"], range(len(delivered))))
        for image_id in wanted["image_id"]:
            if image_id not in position:
                raise DeliveryError(f"{curated / vendor / batch / 'rows.csv'}: no row for image {image_id} "
                                    f"(label_issues.csv and the curated data disagree: re-run the audit)")
            found[image_id] = images[position[image_id]]
    return found


def read_quarantine(quarantine: Path) -> pd.DataFrame:
    """Every quarantined delivery row under ``quarantine/<vendor>/<batch>.csv`` (QUARANTINE_COLUMNS);
    the hand-check answers' quarantine (``quarantine/checks/``, ``quarantine/gold/``) is not a delivery's."""
    frames = []
    for path in sorted(quarantine.glob("*/*.csv")):
        if path.parent.name in QUARANTINE_KINDS:
            continue
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = [c for c in ("vendor", "batch", "reason") if c not in frame]
        if missing:
            raise ValueError(f"{path}: quarantine file lacks column(s) {', '.join(missing)}")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=QUARANTINE_COLUMNS)


def write_report(reports: Path, report: Report) -> None:
    """Write report.md, report.html and the PNG files under ``reports``, each atomically; PNGs left in
    plots/ or thumbs/ by an earlier report that this one does not use are removed."""
    for relative, data in report.files.items():
        atomic_write_bytes(reports / relative, data)
    for folder in ("plots", "thumbs"):
        for stale in (reports / folder).glob("*.png"):
            if f"{folder}/{stale.name}" not in report.files:
                stale.unlink()
    atomic_write_text(reports / "report.html", report.html)
    atomic_write_text(reports / "report.md", report.markdown)


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` between the ``<!-- name:start -->`` and ``<!-- name:end -->`` markers of the Markdown
    file at ``path``, keeping everything else; append the marked section when the file has none."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}\n"
    current = path.read_text(encoding="utf-8") if path.is_file() else ""
    if start in current and end in current:
        before, rest = current.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        updated = before + block + ("\n" + after if after else "")
    else:
        updated = current + ("\n" if current and not current.endswith("\n") else "") + block
    atomic_write_text(path, updated)
