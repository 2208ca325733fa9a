"""Localisation: causal tracing (:mod:`attndrift.analysis.tracing`, ROME's Fig. 1) and
attention knockout (:mod:`attndrift.analysis.knockout`)."""

import html

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attndrift.analysis.knockout import Knockout
from attndrift.analysis.tracing import Tracing
from attndrift.plotting.common import O_NEW, O_TRUE, SEQUENTIAL, style, unique_labels

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
