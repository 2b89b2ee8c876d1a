"""Saving plotly figures: interactive HTML always, a static PNG when kaleido can render one.

The HTML files of one folder share one copy of plotly.js, ``plotly.min.js`` beside them (what
plotly's ``include_plotlyjs="directory"`` does), so a run's dozen figures cost one 4.8 MB
bundle, not one each, and still open without a network. The bundle is written here rather than
by plotly, atomically and replaced when it is not this plotly's own (plotly writes it in place
and never refreshes a stale one). ``report.html`` (``figures.report``) is the one page that
inlines plotly.js, so that it can travel alone.

PNGs need kaleido and a Chrome/Chromium; where one is missing, each reason PNGs are skipped is
said once per process (one line), not once per figure.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline

from ..common.atomic import atomic_path, write_text_atomic

PLOTLY_JS = "plotly.min.js"  # the name plotly's include_plotlyjs="directory" refers to
NO_CHROME = ("kaleido needs Google Chrome or Chromium, and neither is installed here; the HTML "
             "figures are written; for PNGs too run `plotly_get_chrome` or install Chromium "
             "(e.g. apt-get install chromium)")

_said: set[str] = set()  # the reasons PNGs were skipped that this process has said already


class PngSkippedWarning(UserWarning):
    """A figure's PNG could not be written (its HTML was)."""


def post_script(fig: go.Figure) -> str | None:
    """JavaScript a figure asks to run after it is drawn (``fig.layout.meta["post_script"]``,
    with ``{plot_id}`` for its div), e.g. a click handler; None if it has none."""
    meta = fig.layout.meta
    return meta.get("post_script") if isinstance(meta, dict) else None


def write_plotly_js(folder: str | Path) -> Path:
    """``folder/plotly.min.js``: this plotly's bundle, written (atomically) unless it is there."""
    bundle, js = Path(folder) / PLOTLY_JS, plotly.offline.get_plotlyjs()
    if not (bundle.is_file() and bundle.stat().st_size == len(js.encode("utf-8"))
            and bundle.read_text(encoding="utf-8") == js):
        write_text_atomic(bundle, js)
    return bundle


def _png_skipped(error: Exception) -> str:
    """Why a PNG could not be written, in one line."""
    text = " ".join(str(error).split())
    if "chrome" in text.lower() or "chromium" in text.lower():
        return NO_CHROME
    return f"{type(error).__name__}: {text[:200]}"


def save_figure(fig: go.Figure, path: str | Path, png: bool = True) -> list[Path]:
    """Write ``path.html`` (plotly.js from ``plotly.min.js`` in its folder) and, if possible,
    ``path.png``; return the paths written (the shared ``plotly.min.js`` is not listed).

    Each file is written atomically: a crash leaves the previous figure, never half of one.
    """
    path = Path(path).with_suffix("")
    html = path.with_suffix(".html")
    write_plotly_js(html.parent)  # first: an HTML file is never there without its bundle
    with atomic_path(html) as tmp:  # a script tag for the bundle (plotly copies nothing then)
        fig.write_html(tmp, include_plotlyjs=PLOTLY_JS, full_html=True,
                       post_script=post_script(fig))
    written = [html]
    if png:
        try:
            with atomic_path(path.with_suffix(".png")) as tmp:  # keeps .png: kaleido's format
                fig.write_image(tmp, width=1200, height=fig.layout.height or 450)
            written.append(path.with_suffix(".png"))
        except Exception as error:  # kaleido needs Chrome/Chromium; HTML is always written
            reason = _png_skipped(error)
            if reason not in _said:
                _said.add(reason)
                warnings.warn(f"PNG export skipped ({reason}).", PngSkippedWarning, stacklevel=2)
    return written
