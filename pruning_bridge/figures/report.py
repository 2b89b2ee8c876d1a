"""One self-contained HTML report: sections of text, interactive figures and tables.

The file opens with no network and travels alone: plotly.js is inlined once and every figure is
a ``<div>`` that uses it; the CSS is inline too. (Figures saved one by one, ``save_figure``,
share a ``plotly.min.js`` in their folder instead.) Settings and provenance close the report, so a result can be
traced back to the model, data and package versions that produced it.
"""

from __future__ import annotations

import html
import json
import math
import platform
import re
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
import plotly.offline

from ..common.atomic import write_text_atomic
from .save import post_script

Rows = Sequence[Mapping[str, Any]] | pd.DataFrame

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; line-height: 1.5;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
.meta { color: #666; } nav ol { padding-left: 1.4em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 0.3em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } tbody tr:nth-child(even) { background: #fafafa; }
td.num { text-align: right; font-family: ui-monospace, Menlo, Consolas, monospace;
         font-variant-numeric: tabular-nums; }
td code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.95em; }
.figure { margin: 1em 0; }
"""


@dataclass
class Section:
    """A titled part of the report: a short plain-text explanation, then figures, then tables.

    ``tables`` holds ``(caption, rows)`` pairs; rows are dicts (one per row) or a DataFrame.
    """

    title: str
    text: str = ""
    figures: list[go.Figure] = field(default_factory=list)
    tables: list[tuple[str, Rows]] = field(default_factory=list)


def package_versions(names: Sequence[str] = ("torch", "transformers", "nnsight",
                                             "transformer_lens", "plotly")) -> dict[str, str]:
    """The installed version of each package ("not installed" if absent), and Python's."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def format_duration(seconds: float) -> str:
    """``872`` -> ``"14 min 32 s"``; under a minute keeps one decimal (``"4.2 s"``)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs} s"


def _cell(value: Any) -> tuple[str, bool]:
    """A table cell's escaped HTML and whether it is a number (right-aligned, monospace)."""
    if value is None:
        return "", False
    if isinstance(value, bool) or not isinstance(value, Real):
        if isinstance(value, (Mapping, list, tuple)):
            return f"<code>{html.escape(_json(value))}</code>", False
        return html.escape(str(value)), False
    if isinstance(value, Integral):
        return str(int(value)), True
    value = float(value)
    return (f"{value:.4g}" if math.isfinite(value) else str(value)), True


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def table_html(rows: Rows, caption: str = "") -> str:
    """An HTML table of ``rows``; columns in order of first appearance, "(no rows)" if empty."""
    if isinstance(rows, pd.DataFrame):
        frame = rows if isinstance(rows.index, pd.RangeIndex) else rows.reset_index()
        columns = [str(c) for c in frame.columns]
        rows = [dict(zip(columns, r)) for r in frame.itertuples(index=False, name=None)]
    else:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    head = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    if not rows:
        return f"<table>{head}<tbody><tr><td>(no rows)</td></tr></tbody></table>"
    header = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for row in rows:
        cells = [_cell(row.get(c)) for c in columns]
        body.append("<tr>" + "".join(f'<td class="num">{text}</td>' if num else f"<td>{text}</td>"
                                     for text, num in cells) + "</tr>")
    return (f"<table>{head}<thead><tr>{header}</tr></thead><tbody>\n" + "\n".join(body)
            + "\n</tbody></table>")


def _paragraphs(text: str) -> str:
    """Plain text as escaped ``<p>`` blocks, one per blank-line-separated paragraph."""
    blocks = [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]
    return "\n".join(f"<p>{html.escape(b)}</p>" for b in blocks)


def _slug(title: str, taken: set[str]) -> str:
    """A unique HTML id from ``title`` (``"Figure 1: layers"`` -> ``"figure-1-layers"``)."""
    base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
    slug, k = base, 2
    while slug in taken:
        slug, k = f"{base}-{k}", k + 1
    taken.add(slug)
    return slug


def _section_html(section: Section, anchor: str) -> str:
    parts = [f'<section id="{anchor}">', f"<h2>{html.escape(section.title)}</h2>",
             _paragraphs(section.text)]
    for k, fig in enumerate(section.figures, start=1):
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"{anchor}-fig{k}",
                          default_height="480px", config={"displaylogo": False},
                          post_script=post_script(fig))
        parts.append(f'<div class="figure">{div}</div>')
    parts += [table_html(rows, caption) for caption, rows in section.tables]
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _key_value_rows(values: Mapping[str, Any]) -> list[dict[str, str]]:
    """Rows of ``key``/``value``; values exact (strings as-is, the rest as compact JSON)."""
    return [{"key": key, "value": v if isinstance(v, str) else _json(v)}
            for key, v in values.items()]


def write_report(path: str | Path, sections: Sequence[Section], *, title: str,
                 settings: Mapping[str, Any], provenance: Mapping[str, Any],
                 run_time_s: float | None = None, runs: int = 1, notes: str = "") -> Path:
    """Write the report to ``path`` (atomically, creating folders) and return the path.

    ``settings`` are the run's parameters, ``provenance`` the model, data files and package
    versions (see ``package_versions``); both become key/value tables at the end. ``run_time_s``
    is shown in the header, with "over N runs (resumed)" when ``runs`` is more than one.
    """
    taken = {"settings", "provenance"}
    anchors = [_slug(s.title, taken) for s in sections]
    toc = [(a, s.title) for a, s in zip(anchors, sections)]
    toc += [("settings", "Settings"), ("provenance", "Provenance")]
    meta = f"Generated {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    if run_time_s is not None:
        meta += f" · total run time {format_duration(run_time_s)}"
        if runs > 1:
            meta += f" over {runs} runs (resumed)"
    page = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head>\n<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style>",
        f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>',
        "</head>\n<body>",
        f"<header>\n<h1>{html.escape(title)}</h1>\n<p class=\"meta\">{html.escape(meta)}</p>",
        _paragraphs(notes),
        "<nav><h2>Contents</h2><ol>"
        + "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in toc)
        + "</ol></nav>\n</header>",
        *(_section_html(s, a) for s, a in zip(sections, anchors)),
        '<section id="settings">\n<h2>Settings</h2>',
        table_html(_key_value_rows(settings)),
        '</section>\n<section id="provenance">\n<h2>Provenance</h2>',
        table_html(_key_value_rows(provenance)),
        "</section>\n</body>\n</html>\n",
    ])
    return write_text_atomic(path, page)
