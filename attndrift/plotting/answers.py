"""The answers' probabilities per model: P(o_true) and P(o_new), each prompt a dot."""

import html
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from attndrift.plotting.common import O_NEW, O_TRUE, style

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
