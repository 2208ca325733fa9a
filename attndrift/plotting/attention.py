"""Attention over a prompt's tokens, vanilla against edited (:mod:`attndrift.capture`): the
rows of a few chosen heads, and a viewer with the layer on a slider and the head in a dropdown
(circuitsvis' habit) that works offline; the subject shaded."""

import html
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attndrift.capture import Capture, Pair
from attndrift.plotting.common import _model_colours, style, unique_labels


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
