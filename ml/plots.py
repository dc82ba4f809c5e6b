"""Matplotlib figures drawn off-screen (Agg) and saved as PNG bytes: the report's plots."""

from __future__ import annotations

import io


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, title: str) -> bytes:
    """``fig`` titled, laid out and saved as PNG (100 dpi), then closed."""
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return buffer.getvalue()
