"""Figures and the report, in one place: the plotly figures of the studies, how they are saved,
and the one-page report.

- ``save``: ``save_figure`` (HTML, plus a PNG where kaleido finds Chrome; the HTML files of a
  folder share one ``plotly.min.js``).
- ``compression``: the report's Figures 1-3 (layer removal, weight pruning, head importance,
  router training, routed vs removed heads).
- ``head_view``: every head's attention pattern on one prompt, through ``HookBridge``.
- ``report``: ``write_report``, one self-contained ``report.html`` (plotly.js inlined once).

Names are imported on first use (a module ``__getattr__``), so that ``save_figure`` loads
plotly only, not torch.
"""

from ..common.lazy import lazy_exports

_EXPORTS = {
    "save": ("PngSkippedWarning", "post_script", "save_figure", "write_plotly_js"),
    "compression": ("head_importance_figure", "head_pruning_figure", "layer_removal_figure",
                    "router_loss_figure", "weight_pruning_figure"),
    "head_view": ("attention_figure", "attention_patterns", "head_summary",
                  "head_summary_figure"),
    "report": ("Section", "format_duration", "package_versions", "table_html", "write_report"),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
