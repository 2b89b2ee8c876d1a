"""The HTML report, checked by parsing it back with Python's html.parser (no models needed)."""

import re
from html.parser import HTMLParser

import pandas as pd
import plotly.graph_objects as go
import plotly.offline
import pytest

from pruning_bridge.common import atomic
from pruning_bridge.figures.report import Section, format_duration, package_versions, write_report

EVIL = "<script>alert(1)</script>"
VOID = {"meta", "link", "br", "hr", "img", "input", "col", "wbr", "area", "base", "source"}


class Parsed(HTMLParser):
    """Collects ids, links, scripts, plotly divs and table cells; checks every tag is closed."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.ids, self.hrefs = [], [], [], []
        self.scripts, self.script_srcs, self.plot_divs, self.tables = [], [], [], []
        self._cell = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in VOID:
            self.stack.append(tag)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "a":
            self.hrefs.append(attrs.get("href"))
        if tag in ("script", "link") and (attrs.get("src") or attrs.get("href")):
            self.script_srcs.append(attrs.get("src") or attrs.get("href"))
        if tag == "script":
            self.scripts.append("")
        if tag == "div" and "plotly-graph-div" in (attrs.get("class") or "").split():
            self.plot_divs.append(attrs["id"])
        if tag == "table":
            self.tables.append([])
        if tag == "tr":
            self.tables[-1].append([])
        if tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "script":
            self.scripts[-1] += data
        if self._cell is not None:
            self._cell += data


def small_figure(k: int, title: str = "") -> go.Figure:
    return go.Figure(go.Scatter(x=[0, 1, 2], y=[k, k + 1, k * 2]), layout_title=title or f"f{k}")


SETTINGS = {"model": "smollm2-135m", "mmlu": 451, "lr": 1.23456789e-5,
            "sparsities": [0.1, 0.5], "nested": {"a": {"b": 1}}, "evil": EVIL}
PROVENANCE = {"model_path": "/models/smol", "dataset": ["mmlu.parquet", "gsm8k.jsonl"],
              **package_versions()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A report with 3 figures over 3 sections (two with the same title), tables and evil text."""
    out = tmp_path_factory.mktemp("report") / "sub" / "dir" / "report.html"
    rows = [{"task": "mmlu", "value": 0.123456789, "n": 451, "config": {"removed": [3]}},
            {"task": EVIL, "value": 12345.678, "n": 7, "extra": None},
            {"task": "ppl", "value": float("nan"), "n": 0, "flag": True}]
    frame = pd.DataFrame({"method": ["magnitude", "wanda"], "acc": [0.25, 2 / 3], "n": [1, 2]},
                         index=pd.Index(["m", "w"], name="id"))
    sections = [
        Section("Figure 1: layers", text=f"Removing layers.\n\nSecond {EVIL} paragraph.",
                figures=[small_figure(1), small_figure(2, title=EVIL)],
                tables=[(f"Rows {EVIL}", rows), ("Empty", [])]),
        Section("Figure 1: layers", figures=[small_figure(3)], tables=[("Frame", frame)]),
        Section(EVIL, text="no figures here", tables=[("Empty frame", pd.DataFrame())]),
    ]
    path = write_report(out, sections, title=f"Report {EVIL}", settings=SETTINGS,
                        provenance=PROVENANCE, run_time_s=872.4, notes=f"Note {EVIL}")
    return path, path.read_text(encoding="utf-8")


def test_written_and_well_formed(written):
    path, text = written
    assert path.exists() and path.name == "report.html"
    parsed = Parsed(text)
    assert parsed.errors == [] and parsed.stack == []
    assert len(parsed.ids) == len(set(parsed.ids))


def test_plotly_js_inlined_once_and_nothing_external(written):
    _, text = written
    bundle = plotly.offline.get_plotlyjs()
    assert text.count(bundle[:500]) == 1 and text.count(bundle[-500:]) == 1
    parsed = Parsed(text)
    assert sum(bundle in s for s in parsed.scripts) == 1
    assert parsed.script_srcs == []
    assert not re.search(r"<(script|link)\b[^>]*\b(src|href)\s*=\s*[\"']?(https?:)?//", text,
                         re.I)
    assert "cdn." not in text.replace(bundle, "").lower()


def test_every_figure_embedded(written):
    _, text = written
    parsed = Parsed(text)
    assert len(parsed.plot_divs) == 3
    assert parsed.plot_divs == ["figure-1-layers-fig1", "figure-1-layers-fig2",
                                "figure-1-layers-2-fig1"]
    for div in parsed.plot_divs:  # each div is drawn by its own script
        assert sum(bool(re.search(rf'Plotly\.newPlot\(\s*"{div}"', s))
                   for s in parsed.scripts) == 1


def test_tables_formatted(written):
    _, text = written
    tables = Parsed(text).tables
    rows_table = next(t for t in tables if t[0] == ["task", "value", "n", "config", "extra",
                                                     "flag"])
    assert rows_table[1] == ["mmlu", "0.1235", "451", '{"removed":[3]}', "", ""]
    assert rows_table[2] == [EVIL, "1.235e+04", "7", "", "", ""]
    assert rows_table[3] == ["ppl", "nan", "0", "", "", "True"]
    assert [["id", "method", "acc", "n"], ["m", "magnitude", "0.25", "1"],
            ["w", "wanda", "0.6667", "2"]] in tables  # a named index becomes a column
    assert sum(t == [["(no rows)"]] for t in tables) == 2
    assert '<td class="num">0.1235</td>' in text and '<td class="num">2</td>' in text


def test_html_escaped(written):
    _, text = written
    assert EVIL not in text
    # <title>, <h1>, notes, TOC, <h2>, section text, caption, table cell, settings value
    assert text.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 9
    parsed = Parsed(text)
    assert not any("alert(1)" in s and "PLOTLYENV" not in s for s in parsed.scripts)
    assert sum("alert(1)" in s for s in parsed.scripts) == 1  # the figure title, as JSON data


def test_settings_and_provenance(written):
    _, text = written
    tables = Parsed(text).tables
    settings, provenance = tables[-2], tables[-1]
    assert settings[0] == ["key", "value"]
    assert dict(map(tuple, settings[1:])) == {
        "model": "smollm2-135m", "mmlu": "451", "lr": "1.23456789e-05",
        "sparsities": "[0.1,0.5]", "nested": '{"a":{"b":1}}', "evil": EVIL}
    shown = dict(map(tuple, provenance[1:]))
    assert shown["model_path"] == "/models/smol"
    assert shown["dataset"] == '["mmlu.parquet","gsm8k.jsonl"]'
    assert shown["plotly"] == plotly.__version__ and "python" in shown


def test_header_and_toc(written):
    _, text = written
    parsed = Parsed(text)
    assert "total run time 14 min 32 s" in text
    assert re.search(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d", text)
    anchors = [h[1:] for h in parsed.hrefs if h and h.startswith("#")]
    sections = re.findall(r'<section id="([^"]+)"', text)
    assert anchors == sections == ["figure-1-layers", "figure-1-layers-2", "script-alert-1-script",
                                   "settings", "provenance"]


def test_header_says_a_resumed_run_was_resumed(tmp_path):
    def header(**kw):
        text = write_report(tmp_path / "r.html", [], title="t", settings={}, provenance={},
                            **kw).read_text()
        return re.search(r'<p class="meta">(.*?)</p>', text).group(1)

    assert header(run_time_s=79.4, runs=2).endswith("total run time 1 min 19 s over 2 runs "
                                                     "(resumed)")
    assert header(run_time_s=79.4).endswith("total run time 1 min 19 s")
    assert "run time" not in header(runs=2)


def test_atomic_write(tmp_path, monkeypatch):
    path = tmp_path / "r.html"
    path.write_text("old")
    write_report(path, [Section("A", figures=[small_figure(1)])], title="t", settings={},
                 provenance={})
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
    assert "plotly-graph-div" in path.read_text()

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError):
        write_report(path, [], title="t", settings={}, provenance={})
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no tmp, old report intact
    assert "plotly-graph-div" in path.read_text()


def test_package_versions():
    versions = package_versions(("plotly", "surely-not-a-package-xyz"))
    assert all(isinstance(v, str) for v in versions.values())
    assert versions["plotly"] == plotly.__version__
    assert versions["surely-not-a-package-xyz"] == "not installed"
    assert set(package_versions()) >= {"torch", "transformers", "nnsight", "transformer_lens",
                                       "plotly", "python"}


@pytest.mark.parametrize("seconds, text", [(4.21, "4.2 s"), (60, "1 min 0 s"),
                                           (872.4, "14 min 32 s"), (3 * 3600 + 185, "3 h 03 min")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
