"""What a run leaves on disk: figure HTMLs that share one plotly.js, a report page that carries
its own, and one line (not one per figure) when PNGs cannot be made."""

import re
import warnings

import plotly.graph_objects as go
import plotly.offline
import pytest

from pruning_bridge.figures import Section, save_figure, write_report
from pruning_bridge.figures import save as save_module

PLOTLY_JS = plotly.offline.get_plotlyjs()  # plotly's own bundle: the reference
SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc=\"([^\"]+)\"", re.I)


def _figure(k: int) -> go.Figure:
    return go.Figure(go.Scatter(y=[1, k, 2]), layout={"title": f"figure {k}"})


def test_figures_of_a_folder_share_one_plotly_js(tmp_path):
    for k in (1, 2):
        assert save_figure(_figure(k), tmp_path / f"fig{k}", png=False) == [
            tmp_path / f"fig{k}.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig1.html", "fig2.html",
                                                          "plotly.min.js"]
    assert (tmp_path / "plotly.min.js").read_text(encoding="utf-8") == PLOTLY_JS
    for k in (1, 2):
        html = (tmp_path / f"fig{k}.html").read_text(encoding="utf-8")
        assert SCRIPT_SRC.findall(html) == ["plotly.min.js"]  # relative: opens offline
        assert len(html) < 50_000 < len(PLOTLY_JS)  # the bundle is not inlined
        assert PLOTLY_JS[:2000] not in html and f"figure {k}" in html


def test_a_stale_or_broken_bundle_is_replaced(tmp_path):
    (tmp_path / "plotly.min.js").write_text("/* plotly.js 1.0 */", encoding="utf-8")
    save_figure(_figure(1), tmp_path / "fig", png=False)
    assert (tmp_path / "plotly.min.js").read_text(encoding="utf-8") == PLOTLY_JS
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_the_report_page_is_self_contained(tmp_path):
    sections = [Section("One", "text", figures=[_figure(1), _figure(2)]),
                Section("Two", figures=[_figure(3)])]
    page = write_report(tmp_path / "report.html", sections, title="t", settings={},
                        provenance={}).read_text(encoding="utf-8")
    assert page.count(PLOTLY_JS) == 1  # inlined once for its three figures
    assert SCRIPT_SRC.findall(page) == []  # no external script, no CDN
    assert "cdn.plot.ly" not in page.replace(PLOTLY_JS, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_missing_chrome_is_said_once_for_several_figures(tmp_path, monkeypatch):
    """kaleido without Chrome raises a RuntimeError per figure; the run says so once."""
    def no_chrome(self, *args, **kwargs):
        raise RuntimeError("\n\nKaleido requires Google Chrome to be installed.\n\nEither "
                           "download and install Chrome yourself ...\n\n    $ plotly_get_chrome\n")

    monkeypatch.setattr(go.Figure, "write_image", no_chrome)
    monkeypatch.setattr(save_module, "_said", set())  # a fresh process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Python's own once-per-location filter off
        written = [save_figure(_figure(k), tmp_path / f"fig{k}") for k in range(4)]
    assert written == [[tmp_path / f"fig{k}.html"] for k in range(4)]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "\n" not in messages[0] and len(messages[0]) < 300
    assert "PNG export skipped" in messages[0] and "plotly_get_chrome" in messages[0]
    assert issubclass(caught[0].category, UserWarning)
    assert not list(tmp_path.glob("*.png"))


def test_another_png_failure_is_said_too(tmp_path, monkeypatch):
    """A different reason (a full disk, say) is not hidden behind the first one."""
    monkeypatch.setattr(save_module, "_said", {save_module.NO_CHROME})

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(go.Figure, "write_image", full_disk)
    with pytest.warns(UserWarning, match="PNG export skipped.*No space left"):
        save_figure(_figure(1), tmp_path / "fig")


def test_real_kaleido_writes_a_png_or_says_why_once(tmp_path, monkeypatch):
    """With the real kaleido: a PNG where Chrome is installed, else one warning for two."""
    monkeypatch.setattr(save_module, "_said", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = [save_figure(_figure(k), tmp_path / f"fig{k}") for k in (1, 2)]
    if all(len(w) == 2 for w in written):
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for w in written for p in w[1:])
        assert caught == []
    else:
        assert written == [[tmp_path / "fig1.html"], [tmp_path / "fig2.html"]]
        assert len(caught) == 1 and "PNG export skipped" in str(caught[0].message)
