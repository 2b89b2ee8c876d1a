"""Saving plotly figures: interactive HTML always, a static PNG when kaleido can render one."""

from __future__ import annotations

import warnings
from pathlib import Path

import plotly.graph_objects as go

from .atomic import atomic_path


def post_script(fig: go.Figure) -> str | None:
    """JavaScript a figure asks to run after it is drawn (``fig.layout.meta["post_script"]``,
    with ``{plot_id}`` for its div), e.g. a click handler; None if it has none."""
    meta = fig.layout.meta
    return meta.get("post_script") if isinstance(meta, dict) else None


def save_figure(fig: go.Figure, path: str | Path, png: bool = True) -> list[Path]:
    """Write ``path.html`` (self-contained) and, if possible, ``path.png``; return the paths.
    Each file is written atomically (a crash leaves the previous figure, never half of one)."""
    path = Path(path).with_suffix("")
    html = path.with_suffix(".html")
    with atomic_path(html) as tmp:
        fig.write_html(tmp, include_plotlyjs=True, full_html=True, post_script=post_script(fig))
    written = [html]
    if png:
        try:
            with atomic_path(path.with_suffix(".png")) as tmp:  # keeps .png: kaleido's format
                fig.write_image(tmp, width=1200, height=fig.layout.height or 450)
            written.append(path.with_suffix(".png"))
        except Exception as error:  # kaleido needs Chrome/Chromium; HTML is always written
            warnings.warn(f"PNG export skipped ({type(error).__name__}: {error}). Install "
                          f"Chromium (e.g. apt-get install chromium) for static images.")
    return written
