"""Plotting: the only package that makes figures. Every function returns a plotly ``go.Figure``.

Figures present numbers computed elsewhere (:mod:`attndrift.analysis`, :mod:`attndrift.capture`,
:mod:`attndrift.experiments.summary`); nothing here runs a model or calls ``.show()``. One
module per family of figures, every public name re-exported here:

* :mod:`~attndrift.plotting.answers`: :func:`headline`: P(o_true) and P(o_new) per model: each
  prompt a dot, the mean a labelled dash;
* :mod:`~attndrift.plotting.drift`: :func:`drift_heatmap`: layer x head, on the metric's natural
  range by default (attention and its change: [0, 1] and [-1, 1]), so that separate figures
  share one scale; a zoom (``zmax``) for figures that are compared (:func:`common_zmax`);
  :func:`drift_heatmaps`: several drifts side by side on one shared colour scale;
  :func:`drift_scatter`: drift factor vs P(o_new) with a least-squares line, Pearson's r and
  Spearman's ρ in the title;
* :mod:`~attndrift.plotting.patching`: :func:`patching_heatmap`: layer x token for each
  direction (rows) and component (columns);
* :mod:`~attndrift.plotting.attention`: :func:`attention_viewer`: vanilla vs edited attention
  over a prompt's tokens, the layer on a slider and the head in a dropdown (circuitsvis'
  habit), the subject shaded; works offline; :func:`attention_rows`: the same for a few chosen
  (layer, head)s, one panel each;
* :mod:`~attndrift.plotting.tradeoffs`: :func:`tradeoff`: ES/PS vs NS/RS/DNS across SADR's γ,
  with and without head selection, one curve per variant; :func:`tradeoff_map`: PS against the
  harmonic mean of RS and DNS, one point per setting; :func:`strength`: specificity against
  edit strength;
* :mod:`~attndrift.plotting.localisation`: :func:`tracing_heatmap`: causal tracing, token x
  layer per component (ROME's Fig. 1); :func:`knockout_figure`: ΔP(o_new), ΔP(o_true) per
  blocked window, vanilla vs edited;
* :mod:`~attndrift.plotting.export`: :func:`save_html` (standalone, plotly.js embedded) and
  :func:`save_png` (a static PNG without the modebar, through headless Chromium or kaleido; a
  clear RuntimeError when neither is there). :func:`layout_problems` lists what a browser
  draws outside a figure or on top of another label.

:mod:`~attndrift.plotting.common` holds what they share: one colour meaning in every figure
(blue o_true, red o_new, grey the unedited model, orange then teal the edited ones), the
diverging scales that keep it, titles, colour-bar labels, unique token labels and the look
(:func:`style`).
"""

from attndrift.plotting.answers import P_FLOOR, headline
from attndrift.plotting.attention import attention_rows, attention_viewer
from attndrift.plotting.common import (
    COMPONENT_NAMES,
    DASHES,
    DIVERGING_ANSWER,
    DIVERGING_ATTENTION,
    EDITED,
    METRIC_COLOURS,
    O_NEW,
    O_TRUE,
    SEQUENTIAL,
    TEMPLATE,
    VANILLA,
    style,
    unique_labels,
)
from attndrift.plotting.drift import common_zmax, drift_heatmap, drift_heatmaps, drift_scatter
from attndrift.plotting.export import (
    CHROMIUM_NAMES,
    STATIC_HEIGHT,
    STATIC_WIDTH,
    chromium,
    layout_problems,
    save_html,
    save_png,
)
from attndrift.plotting.localisation import knockout_figure, tracing_heatmap
from attndrift.plotting.patching import patching_heatmap
from attndrift.plotting.tradeoffs import strength, tradeoff, tradeoff_map

__all__ = [
    "CHROMIUM_NAMES",
    "COMPONENT_NAMES",
    "DASHES",
    "DIVERGING_ANSWER",
    "DIVERGING_ATTENTION",
    "EDITED",
    "METRIC_COLOURS",
    "O_NEW",
    "O_TRUE",
    "P_FLOOR",
    "SEQUENTIAL",
    "STATIC_HEIGHT",
    "STATIC_WIDTH",
    "TEMPLATE",
    "VANILLA",
    "attention_rows",
    "attention_viewer",
    "chromium",
    "common_zmax",
    "drift_heatmap",
    "drift_heatmaps",
    "drift_scatter",
    "headline",
    "knockout_figure",
    "layout_problems",
    "patching_heatmap",
    "save_html",
    "save_png",
    "strength",
    "style",
    "tracing_heatmap",
    "tradeoff",
    "tradeoff_map",
    "unique_labels",
]
