"""Plotting: the only module that makes figures. Every function returns a plotly ``go.Figure``.

Figures present numbers computed elsewhere (:mod:`attndrift.analysis.drift`,
:mod:`attndrift.analysis.patching`, :mod:`attndrift.capture`); nothing here runs a model or
calls ``.show()``.

* :func:`headline`: P(o_true) and P(o_new) per model: each prompt a dot, the mean a labelled dash;
* :func:`drift_heatmap`: layer x head, on the metric's natural range by default (attention and
  its change: [0, 1] and [-1, 1]), so that separate figures share one scale; a zoom
  (``zmax``) for figures that are compared (:func:`common_zmax`);
* :func:`drift_heatmaps`: several drifts side by side on one shared colour scale;
* :func:`patching_heatmap`: layer x token for each direction (rows) and component (columns);
* :func:`attention_viewer`: vanilla vs edited attention over a prompt's tokens, the layer on a
  slider and the head in a dropdown (circuitsvis' habit), the subject shaded; works offline;
* :func:`attention_rows`: the same for a few chosen (layer, head)s, one panel each;
* :func:`drift_scatter`: drift factor vs P(o_new) with a least-squares line, Pearson's r and
  Spearman's ρ in the title;
* :func:`tradeoff`: ES/PS vs NS/RS/DNS across SADR's γ, with and without head selection, one
  curve per variant; :func:`tradeoff_map`: PS against the harmonic mean of RS and DNS, one
  point per setting;
* :func:`tracing_heatmap`: causal tracing, token x layer per component (ROME's Fig. 1);
* :func:`knockout_figure`: ΔP(o_new), ΔP(o_true) per blocked window, vanilla vs edited;
* :func:`save_html` (standalone, plotly.js embedded) and :func:`save_png` (a static PNG
  without the modebar, through headless Chromium or kaleido; a clear RuntimeError when neither
  is there). :func:`layout_problems` lists what a browser draws outside a figure or on top of
  another label.

One colour meaning in every figure: blue is the true object o_true and red the new object
o_new (:data:`O_TRUE`, :data:`O_NEW`); grey is the unedited model and orange, then teal, the
edited ones (:data:`VANILLA`, :data:`EDITED`). Signed quantities sit on diverging scales centred
at 0 that keep this meaning: a change of attention is orange where the edit attends more
(:data:`DIVERGING_ATTENTION`), a recovery blue where the true answer comes back
(:data:`DIVERGING_ANSWER`). Colour bars name the quantity and its unit.

Token labels are made unique (``"Paris·3"`` = the token at position 3) because plotly merges
equal categories on an axis.
"""

import html
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from attndrift.analysis.drift import METRICS as DRIFT_METRICS
from attndrift.analysis.drift import Drift, FailureAnalysis
from attndrift.analysis.knockout import Knockout
from attndrift.analysis.patching import CELL_METRICS, Patching
from attndrift.analysis.tracing import Tracing
from attndrift.capture import Capture, Pair

#: colours of the true and the new object in every figure
O_TRUE, O_NEW = "#2166ac", "#b2182b"
#: colours of the unedited model and of the edited ones (in order) where models are compared
VANILLA = "#737373"
EDITED = ("#e66101", "#1b9e77", "#7570b3", "#a6761d")
#: a change of attention (edited − vanilla): purple where the edit attends less, orange more
DIVERGING_ATTENTION = "PuOr_r"
#: a change towards an answer: red towards o_new, blue towards o_true (e.g. a recovery)
DIVERGING_ANSWER = "RdBu"
SEQUENTIAL = "Viridis"
#: the report's look: white background, readable font
TEMPLATE = "plotly_white"
#: metrics that are differences (diverging colour scale centred on 0), with their scale
_DIFFERENCES = {
    "delta": DIVERGING_ATTENTION,
    "mass_delta": DIVERGING_ATTENTION,
    "logit_diff": DIVERGING_ANSWER + "_r",  # o_new − o_true: red where o_new gains
    "recovery": DIVERGING_ANSWER,
    "gain_pct": DIVERGING_ANSWER,
}
#: sequential scales: the answers' own colours for their probabilities
_SEQUENTIAL = {"p_true": "Blues", "p_new": "Reds", "p_true_full": "Blues", "p_new_full": "Reds"}
#: natural colour ranges (``None``: from the data): figures drawn apart share these
_NATURAL = {
    "a_vanilla": (0.0, 1.0),
    "a_edited": (0.0, 1.0),
    "delta": (-1.0, 1.0),
    "mass_vanilla": (0.0, 1.0),
    "mass_edited": (0.0, 1.0),
    "mass_delta": (-1.0, 1.0),
    "p_true": (0.0, 1.0),
    "p_new": (0.0, 1.0),
    "p_true_full": (0.0, 1.0),
    "p_new_full": (0.0, 1.0),
    "recovery": (-1.0, 1.0),  # at least: 1 = the source's value, 0 = unpatched
}
_TITLES = {
    "kl": "KL(vanilla ‖ edited) of the last token's attention",
    "a_vanilla": "vanilla attention last → s_last",
    "a_edited": "edited attention last → s_last",
    "delta": "Δ attention last → s_last (edited − vanilla)",
    "mass_vanilla": "vanilla attention mass on the subject",
    "mass_edited": "edited attention mass on the subject",
    "mass_delta": "Δ attention mass on the subject",
    "p_true": "P(o_true)",
    "p_new": "P(o_new)",
    "logit_diff": "logit(o_new) − logit(o_true)",
    "recovery": "recovery of P(o_true)",
    "gain_pct": "relative change of P(o_true) (%)",
    "p_true_full": "P(o_true), full answer",
    "p_new_full": "P(o_new), full answer",
    "custom": "custom metric",
}
#: colour bar titles: the quantity in words, with its unit
_COLORBARS = {
    "kl": "KL<br>(nats)",
    "a_vanilla": "attention<br>(probability)",
    "a_edited": "attention<br>(probability)",
    "delta": "Δ attention<br>(edited −<br>vanilla)",
    "mass_vanilla": "attention<br>mass",
    "mass_edited": "attention<br>mass",
    "mass_delta": "Δ attention<br>mass (edited<br>− vanilla)",
    "p_true": "P(o_true)",
    "p_new": "P(o_new)",
    "logit_diff": "logit o_new<br>− o_true",
    "recovery": "recovery<br>(1 = vanilla,<br>0 = edited)",
    "gain_pct": "change of<br>P(o_true) (%)",
    "p_true_full": "P(o_true),<br>full answer",
    "p_new_full": "P(o_new),<br>full answer",
    "custom": "custom<br>metric",
}
#: the patched components in words
COMPONENT_NAMES = {
    "attn": "attention pattern rows (all heads)",
    "mlp": "MLP output",
    "attn_out": "attention output",
    "resid": "residual stream",
}


def unique_labels(tokens: Sequence[str]) -> list[str]:
    """Token strings as axis labels: newlines shown as ↵, repeated tokens as ``"tok·pos"``."""
    shown = [t.replace("\n", "↵") for t in tokens]
    shown = [t if t.strip() else repr(t) for t in shown]
    counts = Counter(shown)
    return [f"{t}·{i}" if counts[t] > 1 else t for i, t in enumerate(shown)]


def style(fig: go.Figure) -> go.Figure:
    """The look every figure shares: white background, readable font, labels kept inside."""
    fig.update_layout(template=TEMPLATE, font={"size": 13})
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


def _of(edit: str, model: str) -> str:
    """``" · ROME on SmolLM2-135M"``: what a title says the figure is of ("" when unknown)."""
    text = " on ".join(x for x in (edit, model) if x)
    return f" · {html.escape(text)}" if text else ""


def _colorbar(metric: str) -> dict:
    """A colour bar titled with the quantity in words and its unit (beside the bar)."""
    return {"title": {"text": _COLORBARS[metric], "side": "right"}}


def _colours(metric: str) -> dict:
    if metric in _DIFFERENCES:
        return {"colorscale": _DIFFERENCES[metric], "zmid": 0.0}
    return {"colorscale": _SEQUENTIAL.get(metric, SEQUENTIAL)}


def _drift_values(
    d: Drift, metric: str, prompt: int | None
) -> tuple[Float[Tensor, "layer head_index"], str]:
    """The layer x head values a drift heatmap shows, and which prompts they cover."""
    if metric not in DRIFT_METRICS:
        raise ValueError(f"unknown drift metric {metric!r}: expected one of {DRIFT_METRICS}")
    values = getattr(d, metric).detach().float().cpu()
    if prompt is None:
        return values.mean(0), f"mean over {values.shape[0]} prompts"
    if not 0 <= prompt < values.shape[0]:
        raise ValueError(f"prompt {prompt} out of range: {values.shape[0]} prompts")
    return values[prompt], f"prompt {prompt}: {d.prompts[prompt]!r}"


def common_zmax(drifts: Sequence[Drift], metric: str = "delta", prompt: int | None = None) -> float:
    """One colour range for several drift heatmaps: the largest ``|value|`` any of them shows.

    Pass it as ``zmax`` to :func:`drift_heatmap` so that heatmaps that are compared share one
    zoomed scale (an edit that drifts less then looks paler, not equally drifted).

    Args:
        drifts: the drifts to be compared.
        metric: the metric shown (see :func:`drift_heatmap`).
        prompt: index of the prompt (default: mean over prompts).

    Returns:
        The largest absolute value shown (a tiny positive number if every value is 0).
    """
    if not drifts:
        raise ValueError("no drifts to compare")
    largest = max(float(_drift_values(d, metric, prompt)[0].abs().max()) for d in drifts)
    return max(largest, 1e-12)


def _range(metric: str, zmax: int | float | None) -> tuple[float, float] | None:
    """``(zmin, zmax)`` of a fixed colour range: symmetric for differences, from 0 otherwise."""
    if zmax is None:
        return None
    if not zmax > 0:
        raise ValueError(f"zmax must be positive, got {zmax}")
    return (-float(zmax) if metric in _DIFFERENCES else 0.0), float(zmax)


def _colour_range(metric: str, zmax: int | float | None) -> dict:
    """The colour scale of a metric: ``zmax`` if given, else its natural range, else from 0
    (non-negative metrics) or centred on 0 (differences) with the top from the data."""
    fixed = _range(metric, zmax) or _NATURAL.get(metric)
    colours = _colours(metric)
    if fixed is not None:
        return {"colorscale": colours["colorscale"], "zmin": fixed[0], "zmax": fixed[1]}
    if metric not in _DIFFERENCES:
        colours["zmin"] = 0.0
    return colours


def drift_heatmap(
    d: Drift, metric: str = "delta", prompt: int | None = None, zmax: int | float | None = None
) -> go.Figure:
    """Layer x head heatmap of a drift metric, for one prompt or averaged over prompts.

    The title names the edit and the model (:attr:`Drift.edit`, :attr:`Drift.model`).

    Args:
        d: the drift.
        metric: ``kl``, ``a_vanilla``, ``a_edited``, ``delta``, ``mass_vanilla``,
            ``mass_edited`` or ``mass_delta``.
        prompt: index of the prompt (default: mean over prompts).
        zmax: zoom to ``[-zmax, zmax]`` for differences (``delta``, ``mass_delta``),
            ``[0, zmax]`` otherwise. Default: the metric's natural range (attention ``[0,
            1]``, its change ``[-1, 1]``; KL from 0 to its largest value), so that heatmaps
            drawn apart share one scale. Zoom compared heatmaps together with
            :func:`common_zmax` (or draw them in one :func:`drift_heatmaps`).
    """
    z, which = _drift_values(d, metric, prompt)
    fig = go.Figure(
        go.Heatmap(
            z=z.numpy(),
            x=list(range(z.shape[1])),
            y=list(d.layers),
            colorbar=_colorbar(metric),
            hovertemplate="layer %{y}, head %{x}: %{z:.4f}<extra></extra>",
            **_colour_range(metric, zmax),
        )
    )
    fig.update_layout(
        title=f"{_TITLES[metric]}{_of(d.edit, d.model)}<br><sub>{html.escape(which)}</sub>",
        margin={"t": 90},
    )
    fig.update_xaxes(title_text="head", dtick=1)
    fig.update_yaxes(title_text="layer")
    return style(fig)


def drift_heatmaps(
    drifts: Mapping[str, Drift],
    metric: str = "delta",
    prompt: int | None = None,
    zmax: int | float | None = None,
) -> go.Figure:
    """Layer x head heatmaps of several drifts side by side, on one shared colour scale.

    Args:
        drifts: the drifts by name (panel titles, in this order).
        metric: the metric shown (see :func:`drift_heatmap`).
        prompt: index of the prompt (default: mean over prompts).
        zmax: the shared range (default: :func:`common_zmax` of these drifts: zoomed to the
            largest value any panel shows).
    """
    if not drifts:
        raise ValueError("no drifts to plot")
    names = list(drifts)
    if zmax is None:
        zmax = common_zmax(list(drifts.values()), metric, prompt)
    low, high = _range(metric, zmax)
    fig = make_subplots(
        rows=1,
        cols=len(names),
        subplot_titles=[html.escape(n) for n in names],
        shared_yaxes=True,
        horizontal_spacing=0.06,
    )
    whiches = []
    for j, name in enumerate(names):
        d = drifts[name]
        z, which = _drift_values(d, metric, prompt)
        whiches.append(which)
        fig.add_trace(
            go.Heatmap(
                z=z.numpy(),
                x=list(range(z.shape[1])),
                y=list(d.layers),
                coloraxis="coloraxis",
                name=name,
                hovertemplate=f"{html.escape(name)}: layer %{{y}}, head %{{x}}: "
                "%{z:.4f}<extra></extra>",
            ),
            row=1,
            col=j + 1,
        )
        fig.update_xaxes(title_text="head", dtick=1, row=1, col=j + 1)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    which = whiches[0] if len(set(whiches)) == 1 else "; ".join(whiches)
    models = sorted({d.model for d in drifts.values() if d.model})
    on = f" · {html.escape(', '.join(models))}" if models else ""
    fig.update_layout(
        coloraxis={
            "colorscale": _colours(metric)["colorscale"],
            "cmin": low,
            "cmax": high,
            "colorbar": _colorbar(metric) | {"thickness": 14},
        },
        title=f"{_TITLES[metric]}{on}<br><sub>{html.escape(which)}; one colour scale for all "
        "panels</sub>",
        height=460,
        margin={"t": 110},
    )
    return style(fig)


#: the smallest probability :func:`headline` shows on its log axis
P_FLOOR = 1e-6


def headline(
    p_true: Mapping[str, Sequence[float] | np.ndarray],
    p_new: Mapping[str, Sequence[float] | np.ndarray],
    prompts: Sequence[str] | None = None,
    title: str = "",
    log: bool = True,
) -> go.Figure:
    """P(o_true) and P(o_new) per model: each prompt as a dot, the mean as a labelled dash.

    One group per model (in the order of ``p_true``), P(o_true) on the left, P(o_new) on the
    right of each group.

    Args:
        p_true: per model, P(o_true) of each prompt.
        p_new: per model, P(o_new) of the same prompts (same keys, same lengths).
        prompts: the prompts' texts (hover labels).
        title: the figure title (default: none; a report caption says what it shows).
        log: a log probability axis (default), on which small probabilities such as an
            unedited model's P(o_new) stay visible; probabilities below :data:`P_FLOOR` are
            shown at it.
    """
    names = list(p_true)
    if not names:
        raise ValueError("no models to plot")
    if list(p_new) != names:
        raise ValueError(f"p_true and p_new need the same models: {names} vs {list(p_new)}")
    n = len(p_true[names[0]])
    for name in names:
        if not len(p_true[name]) == len(p_new[name]) == n:
            raise ValueError(f"{name}: every model needs P(o_true) and P(o_new) of {n} prompts")
    if n == 0:
        raise ValueError("no prompts to plot")
    hover = [html.escape(p) for p in prompts] if prompts is not None else [""] * n
    if len(hover) != n:
        raise ValueError(f"{len(hover)} prompts for {n} values")
    # a deterministic spread of the dots around their group's position
    spread = np.linspace(-0.07, 0.07, n) if n > 1 else np.zeros(1)
    fig = go.Figure()
    lowest = 1.0
    for offset, label, values, colour in (
        (-0.18, "P(o_true)", p_true, O_TRUE),
        (0.18, "P(o_new)", p_new, O_NEW),
    ):
        arrays = [np.asarray(values[m], dtype=float) for m in names]
        means = [float(a.mean()) for a in arrays]
        shown = np.clip(np.concatenate(arrays), P_FLOOR, 1.0) if log else np.concatenate(arrays)
        lowest = min(lowest, float(shown.min()), max(min(means), P_FLOOR))
        x = np.arange(len(names)) + offset
        fig.add_trace(
            go.Scatter(
                x=np.concatenate([i + offset + spread for i in range(len(names))]),
                y=shown,
                mode="markers",
                name=f"{label}, each prompt",
                marker={"color": colour, "size": 8, "opacity": 0.6},
                text=hover * len(names),
                hovertemplate=f"%{{text}}<br>{label} = %{{y:.4f}}<extra></extra>",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[max(m, P_FLOOR) for m in means] if log else means,
                mode="markers+text",
                name=f"{label}, mean",
                marker={"symbol": "line-ew", "size": 34, "line": {"color": colour, "width": 4}},
                text=[f"{m:.3f}" for m in means],
                textposition="middle right",
                textfont={"color": colour, "size": 14},
                hovertemplate=f"{label}: mean %{{y:.4f}}<extra></extra>",
            )
        )
    fig.update_xaxes(
        tickvals=list(range(len(names))),
        ticktext=[f"<b>{html.escape(m)}</b>" for m in names],
        range=[-0.6, len(names) - 0.25],
        showgrid=False,
        zeroline=False,
    )
    if log:
        low = int(np.floor(np.log10(lowest)))
        ticks = [10.0**k for k in range(low, 1)]
        fig.update_yaxes(
            type="log",
            range=[low, 0.08],
            title_text="probability of the answer (log scale)",
            tickvals=ticks,
            ticktext=[f"{t:g}" for t in ticks],
        )
    else:
        fig.update_yaxes(title_text="probability of the answer", range=[0, 1.05])
    if title:
        fig.update_layout(title=title)
    fig.update_layout(
        height=440,
        margin={"t": 50 if not title else 90},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
    )
    return style(fig)


def patching_heatmap(
    results: Patching | Sequence[Patching], metric: str = "p_true", zmax: float | None = None
) -> go.Figure:
    """Layer x token heatmaps: one row per direction, one column per component.

    The title names the prompt, the answers, the edit and the model, and states the baselines:
    the metric's value in the unpatched runs of the edited and the vanilla model (for
    ``recovery``: ``(P − P_edited) / (P_vanilla − P_edited)`` of P(o_true), 0 = the edited
    run, 1 = the vanilla run, on a diverging scale centred at 0).

    Args:
        results: one or several sweeps (e.g. restore and contaminate) of one prompt.
        metric: one of :data:`attndrift.analysis.patching.CELL_METRICS`.
        zmax: the colour range, ``[-zmax, zmax]`` for differences (default: the metric's
            natural range, widened to the data; differences without one: symmetric about 0).
    """
    results = [results] if isinstance(results, Patching) else list(results)
    if not results:
        raise ValueError("no patching results to plot")
    if metric not in CELL_METRICS:
        raise ValueError(f"unknown metric {metric!r}: expected one of {CELL_METRICS}")
    components = results[0].components
    titles = [f"{r.direction}: {COMPONENT_NAMES.get(c, c)}" for r in results for c in components]
    fig = make_subplots(
        rows=len(results),
        cols=len(components),
        subplot_titles=titles,
        shared_yaxes=True,
        shared_xaxes=True,
        vertical_spacing=0.1 if len(results) > 1 else 0.0,
        horizontal_spacing=0.05,
    )
    largest = 0.0
    for i, r in enumerate(results):
        if r.components != components:
            raise ValueError("every sweep must cover the same components")
        labels = unique_labels(r.tokens)
        x = [labels[p] for p in r.positions]
        values = r.metric(metric).float()
        finite = values[values.isfinite()]
        largest = max(largest, float(finite.abs().max()) if len(finite) else 0.0)
        for j in range(len(components)):
            fig.add_trace(
                go.Heatmap(
                    z=values[j].numpy(),
                    x=x,
                    y=list(range(values.shape[1])),
                    coloraxis="coloraxis",
                    hovertemplate="layer %{y}, token %{x}: %{z:.4g}<extra></extra>",
                ),
                row=i + 1,
                col=j + 1,
            )
        n_layers = values.shape[1]
        dtick = 1 if n_layers <= 16 else 2 if n_layers <= 32 else 5
        fig.update_yaxes(dtick=dtick, row=i + 1)
        fig.update_yaxes(title_text="layer (window start)", row=i + 1, col=1)
    for j in range(len(components)):  # one x title, under the bottom row
        fig.update_xaxes(title_text="token", tickangle=-45, row=len(results), col=j + 1)
    fig.update_layout(
        coloraxis=_coloraxis(metric, zmax, largest),
        title=_patching_title(results, metric),
        height=300 * len(results) + 200,
        margin={"t": 120},
    )
    return style(fig)


def _coloraxis(metric: str, zmax: float | None, largest: float) -> dict:
    """A patching figure's colour axis: ``zmax``, or the natural range widened to the data."""
    colours = _colours(metric)
    axis: dict = {"colorscale": colours["colorscale"]}
    axis["colorbar"] = _colorbar(metric)
    if zmax is not None:
        low, high = _range(metric, zmax)
    elif metric in _NATURAL:
        low, high = _NATURAL[metric]
        if metric in _DIFFERENCES:
            high = max(high, largest)
            low = -high
    elif metric in _DIFFERENCES:
        high = max(largest, 1e-12)
        low = -high
    else:
        return axis
    return axis | {"cmin": low, "cmax": high}


def _patching_title(results: Sequence[Patching], metric: str) -> str:
    r0 = results[0]
    edited = next((r.target if r.direction == "restore" else r.source for r in results), None)
    vanilla = r0.source if r0.direction == "restore" else r0.target
    base = metric if metric in ("p_true", "p_new", "logit_diff") else "p_true"
    name = {"p_true": "P(o_true)", "p_new": "P(o_new)", "logit_diff": "logit diff"}[base]
    baselines = (
        f"unpatched {name}: vanilla {getattr(vanilla, base):.4f}, edited "
        f"{getattr(edited, base):.4f}"
    )
    what = _TITLES[metric] if metric != "recovery" else (
        "recovery of P(o_true): (P − P_edited) / (P_vanilla − P_edited)"
    )  # fmt: skip
    windows = sorted({r.window for r in results})
    window = f"windows of {'/'.join(map(str, windows))} layer{'s' if windows != [1] else ''}"
    return (
        f"{what} after patching{_of(r0.edit, r0.model)}<br><sub>{html.escape(r0.prompt)} → "
        f"o_true {html.escape(r0.target_true)}, o_new {html.escape(r0.target_new)}; "
        f"{baselines}; {window}</sub>"
    )


def _model_colours(names: Sequence[str]) -> list[str]:
    """The first model is the unedited one (grey), then :data:`EDITED` in order."""
    return [VANILLA, *(EDITED[i % len(EDITED)] for i in range(len(names) - 1))]


def attention_rows(
    pair: Pair,
    tokens: Sequence[str],
    heads: Sequence[tuple[int, int]],
    prompt: int = 0,
    query: int = 0,
) -> go.Figure:
    """Vanilla vs edited attention over the prompt's tokens, one panel per (layer, head).

    Args:
        pair: captured attention rows of both runs.
        tokens: token strings of the prompt (its keys, in order).
        heads: ``(layer, head)`` pairs to show (layers must be captured).
        prompt: which prompt of the batch.
        query: which captured query row (default: the first, e.g. the last prompt token).
    """
    if pair.vanilla.pattern is None or pair.edited.pattern is None:
        raise ValueError("the capture has no attention patterns")
    if not heads:
        raise ValueError("no heads to plot")
    labels = unique_labels(tokens)
    n = len(tokens)
    fig = make_subplots(
        rows=len(heads),
        cols=1,
        subplot_titles=[f"layer {layer}, head {head}" for layer, head in heads],
        shared_xaxes=True,
        vertical_spacing=min(0.4 / len(heads), 0.12),
    )
    colours = _model_colours(["vanilla", "edited"])
    for i, (layer, head) in enumerate(heads):
        if layer not in pair.vanilla.layers:
            raise ValueError(f"layer {layer} was not captured (captured: {pair.vanilla.layers})")
        li = pair.vanilla.layers.index(layer)
        for name, cap, colour in (
            ("vanilla", pair.vanilla, colours[0]),
            ("edited", pair.edited, colours[1]),
        ):
            row = cap.pattern[prompt, li, head, query, :n].detach().float().cpu().numpy()
            fig.add_trace(
                go.Bar(
                    x=labels,
                    y=row,
                    name=name,
                    marker_color=colour,
                    showlegend=i == 0,
                    legendgroup=name,
                ),
                row=i + 1,
                col=1,
            )
        fig.update_yaxes(title_text="attention", range=[0, 1.02], row=i + 1, col=1)
    _mark_subject(fig, pair.vanilla, prompt, rows=len(heads))
    fig.update_xaxes(title_text="key token", row=len(heads), col=1, tickangle=-45)
    fig.update_layout(
        barmode="group",
        title="attention of the query row: vanilla vs edited (subject shaded)",
        height=200 * len(heads) + 200,
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 1, "xanchor": "right"},
    )
    return style(fig)


def _mark_subject(fig: go.Figure, cap: Capture, prompt: int, rows: int = 1) -> None:
    """Shade the subject's tokens (the key positions of the batch's subject span)."""
    first, last = int(cap.batch.subject_first[prompt]), int(cap.batch.subject_last[prompt])
    if first < 0:
        return
    for i in range(rows):
        axis = "x" if i == 0 else f"x{i + 1}"
        fig.add_shape(
            type="rect",
            xref=axis,
            yref=f"{'y' if i == 0 else f'y{i + 1}'} domain",
            x0=first - 0.5,
            x1=last + 0.5,
            y0=0,
            y1=1,
            fillcolor="rgba(0, 0, 0, 0.07)",
            line={"width": 0},
            layer="below",
        )


def attention_viewer(
    captures: Pair | Mapping[str, Capture],
    tokens: Sequence[str],
    *,
    prompt: int = 0,
    query: int = 0,
    start: tuple[int, int] | None = None,
    title: str = "",
) -> go.Figure:
    """Attention of one query row over a prompt's tokens under several models, with the layer
    chosen on a slider and the head in a dropdown (as circuitsvis' attention views).

    The first model is the reference (vanilla, grey); the others are drawn beside it in the
    edited colours. The subject's tokens are shaded and set in bold. The y axis keeps one
    range for every layer and head, so that moving the slider compares like with like. The
    figure is plain plotly: it works offline, in a notebook and in a saved report.

    Args:
        captures: a :class:`~attndrift.capture.Pair` (vanilla, edited) or captures by model
            name (the first the reference), of the same batch and layers, with attention rows.
        tokens: token strings of the prompt (its keys, in order).
        prompt: which prompt of the batch.
        query: which captured query row (default: the first, e.g. the last prompt token).
        start: the (layer, head) shown first (default: where the second model's attention to
            the subject's last token grows most over the reference's).
        title: the figure title (default: the query token; name the edit and the model).
    """
    caps = {"vanilla": captures.vanilla, "edited": captures.edited} if isinstance(
        captures, Pair
    ) else dict(captures)  # fmt: skip
    if len(caps) < 2:
        raise ValueError("attention_viewer compares at least two models")
    first = next(iter(caps.values()))
    for name, cap in caps.items():
        if cap.pattern is None:
            raise ValueError(f"{name}: the capture has no attention patterns")
        if cap.layers != first.layers or cap.pattern.shape != first.pattern.shape:
            raise ValueError(f"{name}: the captures differ in layers or rows")
    n = len(tokens)
    if not 0 <= prompt < first.pattern.shape[0] or n > first.pattern.shape[-1]:
        raise ValueError(f"prompt {prompt} or its {n} tokens do not fit the capture")
    # [model, layer, head, key]: the rows shown, rounded for a compact page
    rows = np.stack(
        [c.pattern[prompt, :, :, query, :n].detach().float().cpu().numpy() for c in caps.values()]
    ).round(4)
    layers, n_heads = first.layers, rows.shape[2]
    if start is None:
        s_last = int(first.batch.subject_last[prompt])
        growth = rows[1, :, :, s_last] - rows[0, :, :, s_last] if s_last >= 0 else rows[1, :, :, 0]
        li, head = np.unravel_index(int(growth.argmax()), growth.shape)
    else:
        if start[0] not in layers or not 0 <= start[1] < n_heads:
            raise ValueError(f"start {start} is not a captured (layer, head)")
        li, head = layers.index(start[0]), start[1]
    labels = unique_labels(tokens)
    s0, s1 = int(first.batch.subject_first[prompt]), int(first.batch.subject_last[prompt])
    ticks = [f"<b>{html.escape(t)}</b>" if s0 <= k <= s1 else html.escape(t)
             for k, t in enumerate(labels)]  # fmt: skip
    names, colours = list(caps), _model_colours(list(caps))
    fig = go.Figure()
    for i in range(len(layers)):
        for m, (name, colour) in enumerate(zip(names, colours, strict=True)):
            fig.add_trace(
                go.Bar(
                    x=list(range(n)),
                    y=rows[m, i, head],
                    name=name,
                    marker_color=colour,
                    visible=i == li,
                    customdata=labels,
                    hovertemplate=f"{html.escape(name)}: %{{customdata}} %{{y:.4f}}<extra></extra>",
                )
            )
    order = [(i, m) for i in range(len(layers)) for m in range(len(names))]
    heads = [
        {
            "label": f"head {h}",
            "method": "restyle",
            "args": [{"y": [rows[m, i, h] for i, m in order]}],
        }
        for h in range(n_heads)
    ]
    steps = [
        {
            "label": str(layer),
            "method": "restyle",
            "args": [{"visible": [i == k for i, _ in order]}],
        }
        for k, layer in enumerate(layers)
    ]
    _mark_subject(fig, first, prompt)
    q = int(first.queries[prompt, query]) if first.queries is not None else n - 1
    fig.update_layout(
        barmode="group",
        title=title or f"attention from {html.escape(labels[q])!r} over the prompt's tokens "
        "(subject shaded)",
        updatemenus=[{"buttons": heads, "active": int(head), "x": 0, "xanchor": "left", "y": 1.0,
                      "yanchor": "bottom", "direction": "down", "showactive": True}],
        sliders=[{"steps": steps, "active": int(li), "currentvalue": {"prefix": "layer "},
                  "pad": {"t": 90}, "len": 1.0}],
        height=520,
        margin={"t": 110},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 1, "xanchor": "right"},
    )  # fmt: skip
    top = float(min(1.0, rows.max() * 1.05)) if rows.size else 1.0
    fig.update_yaxes(title_text="attention (probability)", range=[0, max(top, 0.05)])
    fig.update_xaxes(title_text="key token", tickvals=list(range(n)), ticktext=ticks, tickangle=-45)
    return style(fig)


def drift_scatter(analysis: FailureAnalysis) -> go.Figure:
    """Drift factor (x) vs the edited model's P(o_new) (y), with a least-squares line."""
    table = analysis.probes
    x, y = table["factor"].to_numpy(float), table["p_new"].to_numpy(float)
    fig = go.Figure()
    for kind, part in table.groupby("kind", sort=True):
        fig.add_trace(
            go.Scatter(
                x=part["factor"],
                y=part["p_new"],
                mode="markers",
                name=str(kind),
                marker={"color": METRIC_COLOURS.get(str(kind), VANILLA), "opacity": 0.75},
                text=part["prompt"],
                hovertemplate="%{text}<br>drift %{x:.3f}, P(o_new) %{y:.3f}<extra></extra>",
            )
        )
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        xs = np.array([x.min(), x.max()])
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=slope * xs + intercept,
                mode="lines",
                name="least squares",
                line={"color": "black", "dash": "dash", "width": 1.5},
            )
        )
    c = analysis.overall
    fig.update_layout(
        title=f"drift factor vs P(o_new): Pearson r = {c.pearson:.2f} (p = {c.pearson_p:.1e}), "
        f"Spearman ρ = {c.spearman:.2f} (p = {c.spearman_p:.1e}), n = {c.n}",
        margin={"t": 80},
    )
    fig.update_xaxes(title_text="drift factor (max over layers and heads of Δ attention to s_last)")
    fig.update_yaxes(title_text="P(o_new) under the edited model", range=[-0.02, 1.02])
    return style(fig)


#: one colour per probe kind (metric) in the trade-off and scatter figures, one line style per
#: curve; none of them is an answer's or a model's colour
METRIC_COLOURS = {"ES": "#009e73", "PS": "#66a61e", "NS": "#7570b3", "RS": "#e7298a",
                  "DNS": "#a6761d", "RS_D": "#4d4d4d"}  # fmt: skip
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def _percent_range(
    values: Sequence[float] | np.ndarray, pad: float = 4.0, span: float = 10.0
) -> list[float]:
    """A y range in % fitted to the values (intervals included), inside [0, 100] plus room for
    the markers at the ends, at least ``span`` points wide."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return [0.0, 100.0]
    low, high = max(0.0, float(v.min()) - pad), min(100.0, float(v.max()) + pad)
    if high - low < span:
        middle = (high + low) / 2
        low, high = max(0.0, middle - span / 2), min(100.0, middle + span / 2)
        low, high = (100.0 - span, 100.0) if high >= 100 else (low, max(high, low + span))
    return [low - 1.5, high + 1.5]


def tradeoff(frame, editor: str | None = None, title: str = "") -> go.Figure:
    """The γ trade-off: edit success (ES, PS) and specificity (NS, RS, DNS) against γ.

    One curve per editor, head selection and variant (a colour per metric, a line style per
    curve); an editor's γ = 0 row (its baseline) starts every curve of that editor. Values and
    intervals are in %, the intervals clipped to [0, 100] and the axis fitted to them. The
    legend lists the metrics' colours and the curves' line styles once each.

    Args:
        frame: :func:`attndrift.experiments.summary.tradeoff` — one row per setting with ``editor``,
            ``gamma``, ``selection`` (``variant``: optional) and each metric with
            ``_low``/``_high`` interval bounds.
        editor: plot one editor's rows only (default: all).
        title: the figure title (default: what is plotted; name the model and the records).
    """
    if editor is not None:
        frame = frame[frame["editor"] == editor]
    if frame.empty:
        raise ValueError("no settings to plot")
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("edit success", "specificity"), shared_yaxes=True
    )
    if "variant" not in frame:
        frame = frame.assign(variant="")
    gammas = sorted(frame["gamma"].unique())
    labels = [f"{g:g}" for g in gammas]
    sadr_rows = frame[frame["gamma"] > 0]
    curves = list(sadr_rows.groupby(["editor", "selection", "variant"], sort=True)) or [
        ((ed, True, ""), sadr_rows)
        for ed in sorted(set(frame["editor"]))  # baselines only
    ]
    shown, kinds_drawn = [], []
    for i, ((ed, selection, variant), part) in enumerate(curves):
        base = frame[(frame["editor"] == ed) & (frame["gamma"] == 0)]
        part = pd.concat([base, part])
        if part["gamma"].duplicated().any():
            raise ValueError(
                f"two settings of {ed} (variant {variant or 'none'}) at one γ: choose the "
                "settings to plot (summarize --settings)"
            )
        part = part.set_index("gamma").reindex(gammas)
        suffix = f"{ed}, {'selected heads' if selection else 'all heads'}"
        suffix += f", {variant}" if variant else ""
        dash = DASHES[i % len(DASHES)]
        for col, kinds in ((1, ("ES", "PS")), (2, ("NS", "RS", "DNS"))):
            for kind in kinds:
                y = 100 * part[kind].to_numpy(float)
                if np.isnan(y).all():
                    continue
                low = np.clip(100 * part[f"{kind}_low"].to_numpy(float), 0, 100)
                high = np.clip(100 * part[f"{kind}_high"].to_numpy(float), 0, 100)
                shown += [*y, *low, *high]
                kinds_drawn.append(kind)
                fig.add_trace(
                    go.Scatter(
                        x=labels,
                        y=y,
                        error_y={
                            "type": "data",
                            "symmetric": False,
                            "array": np.maximum(high - y, 0),
                            "arrayminus": np.maximum(y - low, 0),
                        },
                        mode="lines+markers",
                        connectgaps=True,
                        cliponaxis=False,
                        line={"dash": dash, "color": METRIC_COLOURS[kind]},
                        name=f"{kind} ({suffix})",
                        legendgroup=kind,
                        showlegend=False,
                    ),
                    row=1,
                    col=col,
                )
        fig.add_trace(  # the curve's line style, once in the legend
            go.Scatter(
                x=[None], y=[None], mode="lines", name=suffix, legendgroup=suffix,
                line={"dash": dash, "color": "#444"},
            )
        )  # fmt: skip
    for kind in dict.fromkeys(kinds_drawn):  # each metric's colour, once in the legend
        fig.add_trace(
            go.Scatter(
                x=[None], y=[None], mode="markers", name=kind, legendgroup=kind,
                marker={"color": METRIC_COLOURS[kind], "size": 10, "symbol": "square"},
            )
        )  # fmt: skip
    fig.update_xaxes(title_text="SADR γ", type="category")
    fig.update_yaxes(title_text="% of probes right (95 % interval)", row=1, col=1)
    fig.update_yaxes(range=_percent_range(shown))
    entries = len(curves) + len(set(kinds_drawn))
    fig.update_layout(
        title=title or "SADR trade-off: edit success vs specificity across γ",
        height=max(460, 22 * entries + 200),
        legend={"tracegroupgap": 4, "title": {"text": "colour: metric · line: curve"}},
    )
    return style(fig)


#: where a point's label may go, tried in order: plotly's position, and which way its centre
#: lies from the point (x, y: -1, 0, 1)
_LABEL_SPOTS = (("top center", (0, 1)), ("bottom center", (0, -1)), ("middle right", (1, 0)),
                ("middle left", (-1, 0)), ("top right", (1, 1)), ("bottom left", (-1, -1)),
                ("top left", (-1, 1)), ("bottom right", (1, -1)))  # fmt: skip


def _label_positions(
    x: np.ndarray, y: np.ndarray, labels: Sequence[str], x_range: list, y_range: list
) -> list[str]:
    """A text position per point whose label covers no marker and no label placed before it
    (points taken left to right; label boxes estimated at 7 px a character in a 1000 x 450 px
    figure)."""
    sx = 0.76 * STATIC_WIDTH / (x_range[1] - x_range[0])
    sy = 0.6 * STATIC_HEIGHT / (y_range[1] - y_range[0])
    points = [(float(a) * sx, float(b) * sy) for a, b in zip(x, y, strict=True)]
    placed = [(px - 5, px + 5, py - 5, py + 5) for px, py in points]  # the markers
    out = ["top center"] * len(labels)
    for i in sorted(range(len(labels)), key=lambda k: points[k]):
        if not labels[i]:
            continue
        w, h = 7.0 * len(labels[i]) + 4, 16.0
        px, py = points[i]
        box = placed[i]
        for spot, (dx, dy) in _LABEL_SPOTS:
            cx = px + dx * (w / 2 + (8 if not dy else 0))
            cy = py + dy * (h / 2 + 7)
            box = (cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2)
            out[i] = spot
            if not any(box[0] < b[1] and b[0] < box[1] and box[2] < b[3] and b[2] < box[3]
                       for b in placed):  # fmt: skip
                break
        placed.append(box)
    return out


def _short_keys(keys: list[str]) -> list[str]:
    """Setting keys without the ``|``-parts they all share (``rome``, ``steps=80``, …)."""
    parts = [k.split("|") for k in keys]
    shared = set.intersection(*map(set, parts)) if len(keys) > 1 else set()
    return ["|".join(p for p in ps if p not in shared) or "|".join(ps) for ps in parts]


def tradeoff_map(frame, title: str = "") -> go.Figure:
    """Every setting as one point: paraphrase success (PS) against the harmonic mean of RS and
    DNS (``RS_DNS``, what the SADR rule maximises), with ES in the hover text; up and right is
    better. Both axes in %, fitted to the points inside [0, 100].

    Args:
        frame: :func:`attndrift.experiments.summary.tradeoff`.
        title: the figure title (default: what is plotted).
    """
    if frame.empty:
        raise ValueError("no settings to plot")
    x = 100 * frame["RS_DNS"].to_numpy(float)
    y = 100 * frame["PS"].to_numpy(float)
    labels = _short_keys(list(frame["setting"]))
    x_range, y_range = _percent_range(x, 8.0), _percent_range(y, 8.0)
    # points that (nearly) coincide share one label: "a · b" on the first, none on the others
    near = 0.01 * (x_range[1] - x_range[0]), 0.01 * (y_range[1] - y_range[0])
    for i in range(len(labels)):
        for j in range(i):
            if labels[j] and abs(x[i] - x[j]) < near[0] and abs(y[i] - y[j]) < near[1]:
                labels[j], labels[i] = f"{labels[j]} · {labels[i]}", ""
                break
    fig = go.Figure(
        go.Scatter(
            x=x,
            y=y,
            mode="markers+text",
            text=labels,
            textposition=_label_positions(x, y, labels, x_range, y_range),
            customdata=list(frame["setting"]),
            hovertext=[f"ES {100 * e:.1f}" for e in frame["ES"].to_numpy(float)],
            name="settings",
            cliponaxis=False,
            marker={"color": "#444", "size": 9},
        )
    )
    fig.update_xaxes(title_text="harmonic mean of RS and DNS (%)", range=x_range)
    fig.update_yaxes(title_text="PS (%)", range=y_range)
    fig.update_layout(
        title=title or "Specificity against generalisation, one point per setting",
        margin={"l": 80, "r": 80},
    )
    return style(fig)


def strength(frame, title: str = "", metrics: Sequence[str] = ("PS", "RS", "DNS")) -> go.Figure:
    """Specificity against edit strength: one panel per metric (in %, with intervals), the x
    axis the median log-odds margin of the edited model on the edit prompts (ES margin).

    The plain margin stops and their same-budget baseline are joined by a line: the curve a
    weaker plain edit traces. Every other row (a variant) is a labelled point; a variant above
    the curve at its own ES margin does more than edit less.

    Args:
        frame: :func:`attndrift.experiments.summary.strength`.
        title: the figure title (default: what is plotted).
        metrics: the panels, in order.
    """
    if frame.empty:
        raise ValueError("no settings to plot")
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=list(metrics), shared_xaxes=True)
    curve = frame[frame["family"].isin(["margin stop", "baseline"])].sort_values("ES_margin")
    points = frame[~frame["family"].isin(["margin stop", "baseline"])]
    markers = ("diamond", "square", "triangle-up", "star", "cross", "x")
    for col, metric in enumerate(metrics, start=1):
        colour = METRIC_COLOURS.get(metric, VANILLA)

        def trace(part, name, mode, marker, show, colour=colour, metric=metric):
            y = 100 * part[metric].to_numpy(float)
            low = np.clip(100 * part[f"{metric}_low"].to_numpy(float), 0, 100)
            high = np.clip(100 * part[f"{metric}_high"].to_numpy(float), 0, 100)
            return go.Scatter(
                x=part["ES_margin"],
                y=y,
                mode=mode,
                name=name,
                legendgroup=name,
                showlegend=show,
                # the plain curve in the metric's colour, the variants' points in grey
                marker={
                    "color": colour if mode != "markers" else "#444",
                    "symbol": marker,
                    "size": 10,
                },
                line={"color": colour},
                error_y={
                    "type": "data",
                    "array": high - y,
                    "arrayminus": y - low,
                    "color": colour,
                    "thickness": 1,
                },
                customdata=list(part["setting"]),
                hovertemplate="%{customdata}<br>ES margin %{x:.2f}: %{y:.1f} %<extra></extra>",
            )

        if not curve.empty:
            fig.add_trace(
                trace(curve, "plain ROME: margin stops and 80 steps", "lines+markers", "circle",
                      col == 1),
                row=1, col=col,
            )  # fmt: skip
        for i, (family, part) in enumerate(points.groupby("family", sort=True)):
            fig.add_trace(
                trace(part, str(family), "markers", markers[i % len(markers)], col == 1),
                row=1,
                col=col,
            )
        fig.update_yaxes(title_text="% of probes right" if col == 1 else None, row=1, col=col)
        fig.update_xaxes(title_text="median ES margin (log-odds)", row=1, col=col)
    fig.update_yaxes(range=[-3, 103])
    fig.update_layout(
        title=title or "Specificity against edit strength",
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 90, "b": 120},
        width=1100,
        height=460,
    )
    return style(fig)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_html(figures: go.Figure | Sequence[go.Figure], path: str | Path) -> Path:
    """Write one or several figures to one standalone HTML file (plotly.js embedded, offline)."""
    figures = [figures] if isinstance(figures, go.Figure) else list(figures)
    if not figures:
        raise ValueError("no figures to save")
    parts = [
        fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)
    ]
    page = (
        '<!DOCTYPE html>\n<html>\n<head><meta charset="utf-8"><title>attndrift</title></head>\n'
        "<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


#: the size of a static figure whose layout sets none (px)
STATIC_WIDTH, STATIC_HEIGHT = 1000, 450
#: browsers :func:`save_png` and :func:`layout_problems` look for on the PATH, in order
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

#: run in the page once every figure is drawn: what lies outside its figure, what covers a
#: title, a title on a plot area, and legends that scroll; written into the page as JSON
_CHECK = r"""
function attndriftCheck() {
  var problems = [];
  var title = function (t) {
    var c = t.getAttribute('class') || '';
    return /title$/.test(c) || c === 'annotation-text';
  };
  var name = function (t) { return JSON.stringify(t.textContent.trim().slice(0, 50)); };
  document.querySelectorAll('.js-plotly-plot').forEach(function (gd, k) {
    var box = gd.getBoundingClientRect();
    var texts = Array.from(gd.querySelectorAll('svg text')).filter(function (t) {
      var r = t.getBoundingClientRect();
      return t.textContent.trim() && r.width > 0 && r.height > 0;
    });
    texts.forEach(function (t) {
      var r = t.getBoundingClientRect();
      if (r.left < box.left - 2 || r.right > box.right + 2 || r.top < box.top - 2 ||
          r.bottom > box.bottom + 2) {
        problems.push('figure ' + (k + 1) + ': ' + name(t) + ' lies outside the figure');
      }
    });
    var labels = texts.filter(function (t) {
      return (t.parentNode.getAttribute('class') || '').indexOf('textpoint') >= 0;
    });
    labels.forEach(function (a, i) {
      labels.slice(i + 1).forEach(function (b) {
        var ra = a.getBoundingClientRect(), rb = b.getBoundingClientRect();
        var w = Math.min(ra.right, rb.right) - Math.max(ra.left, rb.left);
        var h = Math.min(ra.bottom, rb.bottom) - Math.max(ra.top, rb.top);
        if (w > 2 && h > 2) {
          problems.push('figure ' + (k + 1) + ': ' + name(a) + ' overlaps ' + name(b));
        }
      });
    });
    texts.filter(title).forEach(function (a) {
      var ra = a.getBoundingClientRect();
      texts.forEach(function (b) {
        if (a === b || (title(b) && a.compareDocumentPosition(b) & 2)) return;
        var rb = b.getBoundingClientRect();
        var w = Math.min(ra.right, rb.right) - Math.max(ra.left, rb.left);
        var h = Math.min(ra.bottom, rb.bottom) - Math.max(ra.top, rb.top);
        if (w > 2 && h > 2) {
          problems.push('figure ' + (k + 1) + ': ' + name(a) + ' overlaps ' + name(b));
        }
      });
    });
    var plots = (gd._fullLayout && gd._fullLayout._plots) || {};
    Object.keys(plots).forEach(function (id) {
      var xa = plots[id].xaxis, ya = plots[id].yaxis;
      var area = {left: box.left + xa._offset, right: box.left + xa._offset + xa._length,
                  top: box.top + ya._offset, bottom: box.top + ya._offset + ya._length};
      texts.filter(title).forEach(function (t) {
        var r = t.getBoundingClientRect();
        var w = Math.min(r.right, area.right) - Math.max(r.left, area.left);
        var h = Math.min(r.bottom, area.bottom) - Math.max(r.top, area.top);
        if (w > 2 && h > 2) {
          problems.push('figure ' + (k + 1) + ': ' + name(t) + ' lies on the plot of ' + id);
        }
      });
    });
    gd.querySelectorAll('.legend .scrollbar').forEach(function (bar) {
      var r = bar.getBoundingClientRect();
      if (r.height > 0 && r.width > 0) {
        problems.push('figure ' + (k + 1) + ': the legend scrolls (part of it is hidden)');
      }
    });
    if (gd.querySelector('.modebar-container .modebar-btn')) {
      problems.push('figure ' + (k + 1) + ': the modebar is shown');
    }
  });
  var out = document.createElement('pre');
  out.id = 'attndrift-problems';
  out.textContent = JSON.stringify(problems);
  document.body.appendChild(out);
}
window.addEventListener('load', function () { setTimeout(attndriftCheck, 200); });
"""


def _static(fig: go.Figure) -> go.Figure:
    """A copy with an explicit size (what a static export draws)."""
    out = go.Figure(fig)
    out.update_layout(
        width=fig.layout.width or STATIC_WIDTH, height=fig.layout.height or STATIC_HEIGHT
    )
    return out


def _static_page(figures: Sequence[go.Figure], check: bool) -> str:
    """The figures stacked on one page at their sizes, without modebars (and the check)."""
    from plotly.offline import get_plotlyjs

    config = {"displayModeBar": False, "responsive": False}
    divs = [f.to_html(full_html=False, include_plotlyjs=False, config=config) for f in figures]
    script = f"<script>{_CHECK}</script>" if check else ""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<style>body{margin:0;background:white} div{margin:0}</style>"
        f"<script>{get_plotlyjs()}</script>{script}</head><body>" + "".join(divs) + "</body></html>"
    )


def chromium() -> str | None:
    """The headless browser :func:`save_png` uses (None when none is installed)."""
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def _browse(page: str, *args: str) -> subprocess.CompletedProcess:
    """Open ``page`` in headless Chromium with ``args`` (a throwaway profile; nothing else on
    disk changes)."""
    browser = chromium()
    if browser is None:
        raise RuntimeError(
            "no Chrome/Chromium browser on the PATH (Debian/Ubuntu: apt-get install chromium)"
        )
    with tempfile.TemporaryDirectory(prefix="attndrift-png-") as tmp:
        html_path = Path(tmp) / "figure.html"
        html_path.write_text(page, encoding="utf-8")
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={Path(tmp) / 'profile'}",
            "--virtual-time-budget=10000", *args, html_path.as_uri(),
        ]  # fmt: skip
        return subprocess.run(
            command, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": tmp}
        )


def layout_problems(figures: go.Figure | Sequence[go.Figure]) -> list[str]:
    """What a browser draws badly when the figures are exported at their sizes: labels outside
    the figure (cut off), a label over a title, a title on a plot area (e.g. an axis title on
    the panel below), a legend that scrolls, a modebar. Needs Chromium (:func:`chromium`).

    Returns:
        One sentence per problem (empty: the figures draw cleanly).
    """
    figures = [figures] if isinstance(figures, go.Figure) else list(figures)
    if not figures:
        raise ValueError("no figures to check")
    shown = [_static(f) for f in figures]
    width = max(int(f.layout.width) for f in shown)
    height = sum(int(f.layout.height) for f in shown)
    done = _browse(
        _static_page(shown, check=True), f"--window-size={width},{height + 200}", "--dump-dom"
    )
    found = done.stdout.split('<pre id="attndrift-problems">', 1)
    if done.returncode != 0 or len(found) != 2:
        raise RuntimeError(f"Chromium could not draw the figures: {done.stderr[-500:]}")
    return json.loads(html.unescape(found[1].split("</pre>", 1)[0]))


def _kaleido_available() -> bool:
    return importlib.util.find_spec("kaleido") is not None


def save_png(
    figures: go.Figure | Sequence[go.Figure], path: str | Path, *, check: bool = True
) -> Path:
    """Write a static PNG of one figure, or of several stacked, at their layout sizes (width
    :data:`STATIC_WIDTH`, height :data:`STATIC_HEIGHT` where unset), without the modebar.

    Renders with headless Chromium where one is installed (:func:`chromium`), else with the
    optional package kaleido (one figure). With ``check`` (Chromium only), a figure that draws
    badly (:func:`layout_problems`: a label cut off or over a title, a scrolling legend) is
    refused with a ValueError that lists the problems, and no file is written.

    Raises:
        RuntimeError: neither Chromium nor kaleido can render.
        ValueError: ``check`` found problems.
    """
    figures = [figures] if isinstance(figures, go.Figure) else list(figures)
    if not figures:
        raise ValueError("no figures to save")
    path = Path(path)
    shown = [_static(f) for f in figures]
    if chromium() is not None:
        if check:
            problems = layout_problems(shown)
            if problems:
                raise ValueError("the figure draws badly: " + "; ".join(problems))
        width = max(int(f.layout.width) for f in shown)
        height = sum(int(f.layout.height) for f in shown)
        path.parent.mkdir(parents=True, exist_ok=True)
        done = _browse(
            _static_page(shown, check=False),
            f"--window-size={width},{height}",
            f"--screenshot={path.resolve()}",
        )
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"Chromium could not render the PNG: {done.stderr[-500:]}")
        return path
    if not _kaleido_available():
        raise RuntimeError(
            "save_png needs a Chrome/Chromium browser (Debian/Ubuntu: apt-get install "
            "chromium) or the optional package kaleido (pip install kaleido); use save_html "
            "for a standalone file instead"
        )
    if len(shown) != 1:
        raise RuntimeError("kaleido writes one figure per PNG: install Chromium to stack them")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        shown[0].write_image(path, format="png")
    except Exception as err:
        raise RuntimeError(
            f"kaleido could not render the PNG ({type(err).__name__}: {err}); it needs a "
            "Chrome/Chromium browser. Use save_html for a standalone file instead"
        ) from err
    return path


# --------------------------------------------------------------------------------------------
# Localisation: causal tracing and attention knockout
# --------------------------------------------------------------------------------------------

#: colour scale of each traced component (ROME's Fig. 1: hidden purple, MLP green, attn red)
_TRACE_COLOURS = {"hidden": "Purples", "mlp": "Greens", "attn_out": "Reds"}


def tracing_heatmap(result: Tracing) -> go.Figure:
    """Causal tracing as in ROME's Fig. 1: the indirect effect of restoring each cell.

    One panel per component: tokens top to bottom (subject tokens marked ``*``), the layer at
    the centre of the restored window left to right, the colour the indirect effect
    P(restored) − P(corrupted), on each panel's own scale (the components differ in size).
    """
    labels = unique_labels(result.tokens)
    labels = [f"{t}*" if i in result.subject_positions else t for i, t in enumerate(labels)]
    y = [labels[p] for p in result.positions]
    names = result.components
    titles = [f"{c} (window {w})" for c, w in zip(names, result.windows, strict=True)]
    fig = make_subplots(
        rows=1, cols=len(names), subplot_titles=titles, shared_yaxes=True, horizontal_spacing=0.1
    )
    n_layers = result.indirect.shape[1]
    for j, name in enumerate(names):
        right = fig.get_subplot(1, j + 1).xaxis.domain[1]
        fig.add_trace(
            go.Heatmap(
                z=result.indirect[j].T.float().numpy(),
                x=list(range(n_layers)),
                y=y,
                colorscale=_TRACE_COLOURS.get(name, SEQUENTIAL),
                colorbar={
                    "x": right + 0.005,
                    "thickness": 10,
                    "len": 0.8,
                    "title": {"text": "indirect effect (ΔP)" if j == 0 else "", "side": "right"},
                },
                name=name,
                hovertemplate=f"{name}: layer %{{x}}, token %{{y}}: %{{z:.4f}}<extra></extra>",
            ),
            row=1,
            col=j + 1,
        )
        fig.update_xaxes(title_text="layer (window centre)", row=1, col=j + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        title=f"causal tracing: indirect effect on P({html.escape(result.target)})<br><sub>"
        f"{html.escape(result.prompt)} · P clean {result.p_clean:.4f}, corrupted "
        f"{result.p_corrupted:.4f} (noise {result.noise:g}σ, σ = {result.sigma:.4g}, "
        f"{result.samples} samples; * = subject, corrupted)</sub>",
        height=max(360, 26 * len(y) + 180),
        width=max(900, 380 * len(names)),
        margin={"t": 110},
    )
    return style(fig)


def knockout_figure(result: Knockout) -> go.Figure:
    """Attention knockout: ΔP(o_new) and ΔP(o_true) against the first blocked layer.

    Each point blocks the attention from the query positions to the key positions (default:
    last token to the subject) in a window of layers starting there; Δ is relative to the
    unblocked run of the same model. Line style: the model (vanilla dotted, edited solid).
    """
    n_layers = result.p_true.shape[1]
    x = list(range(n_layers))
    spans = [f"{s}-{min(s + result.window, n_layers) - 1}" for s in x]
    dashes = ("dot", "solid", "dash", "dashdot")
    fig = go.Figure()
    for i, name in enumerate(result.models):
        for label, delta, base, colour in (
            ("ΔP(o_new)", result.delta_new[i], result.base_new[i], O_NEW),
            ("ΔP(o_true)", result.delta_true[i], result.base_true[i], O_TRUE),
        ):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=delta.float().numpy(),
                    mode="lines+markers",
                    name=f"{label}, {name} (unblocked {float(base):.3f})",
                    line={"color": colour, "dash": dashes[i % len(dashes)]},
                    customdata=spans,
                    hovertemplate=f"{html.escape(name)}: layers %{{customdata}}: {label} "
                    "%{y:.4f}<extra></extra>",
                )
            )
    fig.add_hline(y=0, line={"color": "grey", "width": 1})
    keys = ",".join(result.tokens[k].strip() or repr(result.tokens[k]) for k in result.keys)
    queries = ",".join(str(q) for q in result.queries)
    fig.update_layout(
        title=f"attention knockout: query {queries} ↛ keys {html.escape(keys)} in windows of "
        f"{result.window} layers<br><sub>{html.escape(result.prompt)} → o_true "
        f"{html.escape(result.target_true)}, o_new {html.escape(result.target_new)}</sub>",
        height=480,
        margin={"t": 100},
    )
    fig.update_xaxes(
        title_text="first blocked layer (window start)", dtick=1 if n_layers <= 32 else 2
    )
    fig.update_yaxes(title_text="P(blocked) − P(unblocked)")
    return style(fig)
