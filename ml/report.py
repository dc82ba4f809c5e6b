"""The human-readable audit report: Markdown with per-vendor confusion plots."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from ml.files import atomic_write_text


def confusion_plot(confusion: np.ndarray, classes: tuple[str, ...], title: str) -> bytes:
    """PNG bytes of a vendor's estimated confusion ``C[true, given]`` (K, K), diagonal in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    fig, ax = plt.subplots(figsize=(0.55 * k + 2.5, 0.5 * k + 2))
    shown = np.log10(np.clip(confusion, 1e-4, 1))
    ax.imshow(shown, cmap="magma_r", vmin=-4, vmax=0)
    ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("label given by the vendor")
    ax.set_ylabel("estimated true class")
    ax.set_title(title, fontsize=10)
    for i in range(k):
        for j in range(k):
            if confusion[i, j] >= 0.01:
                ax.text(j, i, f"{100 * confusion[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if confusion[i, j] > 0.3 else "black")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def render_report(scorecard: pd.DataFrame, comparisons: pd.DataFrame, provenance: dict,
                  plots: dict[str, str], top_issues: pd.DataFrame) -> str:
    """The report as Markdown; ``plots`` maps vendor to a PNG path relative to the report."""
    shown = scorecard.drop(columns=["dataset_version", "model_version"], errors="ignore")  # in the header line
    for column in ("error_rate", "error_rate_low", "error_rate_high", "ambiguous_rate", "cleanlab_error_rate"):
        if column in shown:
            shown[column] = (100 * shown[column]).map(lambda v: f"{v:.1f}%")
    lines = [
        "# Vendor audit",
        "",
        " ".join(f"**{k}**: `{v}`" for k, v in provenance.items()),
        "",
        "## Scorecard",
        "Error rate: estimated share of each vendor's images whose label is wrong, with a 95% interval. "
        "Ambiguous images (the evidence supports the given class and another) are counted apart and not billed.",
        "",
        markdown_table(shown),
        "",
        "## Pairwise comparison",
        "Difference in error rate (a - b) with a 95% bootstrap interval; a vendor is called better only where the "
        "difference is significant at the 5% level.",
        "",
        markdown_table(comparisons) if len(comparisons) else "(one vendor only)",
        "",
        "## Estimated confusion per vendor",
    ]
    for vendor, path in plots.items():
        lines += ["", f"### {vendor}", f"![{vendor} confusion]({path})"]
    lines += ["", "## Most likely label errors", "", markdown_table(top_issues), ""]
    return "\n".join(lines)


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
