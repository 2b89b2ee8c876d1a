"""Saving plotly figures: interactive HTML always, a static PNG when kaleido can render one."""

from __future__ import annotations

import warnings
from pathlib import Path

import plotly.graph_objects as go


def save_figure(fig: go.Figure, path: str | Path, png: bool = True) -> list[Path]:
    """Write ``path.html`` (self-contained) and, if possible, ``path.png``; return the paths."""
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    html = path.with_suffix(".html")
    fig.write_html(html, include_plotlyjs=True, full_html=True)
    written = [html]
    if png:
        try:
            fig.write_image(path.with_suffix(".png"), width=1200, height=fig.layout.height or 450)
            written.append(path.with_suffix(".png"))
        except Exception as error:  # kaleido needs Chrome/Chromium; HTML is always written
            warnings.warn(f"PNG export skipped ({type(error).__name__}: {error}). Install "
                          f"Chromium (e.g. apt-get install chromium) for static images.")
    return written
