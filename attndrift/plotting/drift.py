"""Figures of attention drift (:mod:`attndrift.analysis.drift`): layer x head heatmaps, alone
or side by side on one colour scale, and the drift factor against P(o_new)."""

import html
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from attndrift.analysis.drift import METRICS as DRIFT_METRICS
from attndrift.analysis.drift import Drift, FailureAnalysis
from attndrift.plotting.common import (
    _TITLES,
    METRIC_COLOURS,
    VANILLA,
    _colorbar,
    _colour_range,
    _colours,
    _of,
    _range,
    style,
)


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
