"""Plotting: the only module that makes figures. Every function returns a plotly ``go.Figure``.

Figures present numbers computed elsewhere (:mod:`attndrift.drift`, :mod:`attndrift.patching`,
:mod:`attndrift.capture`); nothing here runs a model or calls ``.show()``.

* :func:`drift_heatmap`: layer x head (diverging scale centred on 0 for differences,
  sequential for KL and attention);
* :func:`patching_heatmap`: layer x token for each direction (rows) and component (columns);
* :func:`attention_rows`: vanilla vs edited attention of chosen (layer, head)s over the tokens;
* :func:`drift_scatter`: drift factor vs P(o_new) with a least-squares line and ρ in the title;
* :func:`tradeoff`: ES/PS vs NS/RS/DNS across SADR's γ, with and without head selection;
* :func:`save_html` (standalone, plotly.js embedded) and :func:`save_png` (needs kaleido and a
  Chrome/Chromium; a clear RuntimeError otherwise).

Token labels are made unique (``"Paris·3"`` = the token at position 3) because plotly merges
equal categories on an axis.
"""

import html
import importlib.util
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attndrift.capture import Pair
from attndrift.drift import METRICS as DRIFT_METRICS
from attndrift.drift import Drift, FailureAnalysis
from attndrift.patching import CELL_METRICS, Patching

DIVERGING = "RdBu_r"
SEQUENTIAL = "Viridis"
#: metrics that are differences (diverging colour scale centred on 0)
_DIFFERENCES = frozenset({"delta", "mass_delta", "logit_diff", "recovery", "gain_pct"})
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
}


def unique_labels(tokens: Sequence[str]) -> list[str]:
    """Token strings as axis labels: newlines shown as ↵, repeated tokens as ``"tok·pos"``."""
    shown = [t.replace("\n", "↵") for t in tokens]
    shown = [t if t.strip() else repr(t) for t in shown]
    counts = Counter(shown)
    return [f"{t}·{i}" if counts[t] > 1 else t for i, t in enumerate(shown)]


def _colours(metric: str) -> dict:
    if metric in _DIFFERENCES:
        return {"colorscale": DIVERGING, "zmid": 0.0}
    return {"colorscale": SEQUENTIAL}


def drift_heatmap(d: Drift, metric: str = "delta", prompt: int | None = None) -> go.Figure:
    """Layer x head heatmap of a drift metric, for one prompt or averaged over prompts.

    Args:
        d: the drift.
        metric: ``kl``, ``a_vanilla``, ``a_edited``, ``delta``, ``mass_vanilla``,
            ``mass_edited`` or ``mass_delta``.
        prompt: index of the prompt (default: mean over prompts).
    """
    if metric not in DRIFT_METRICS:
        raise ValueError(f"unknown drift metric {metric!r}: expected one of {DRIFT_METRICS}")
    values = getattr(d, metric).detach().float().cpu()
    if prompt is None:
        z, which = values.mean(0), f"mean over {values.shape[0]} prompts"
    else:
        if not 0 <= prompt < values.shape[0]:
            raise ValueError(f"prompt {prompt} out of range: {values.shape[0]} prompts")
        z, which = values[prompt], f"prompt {prompt}: {d.prompts[prompt]!r}"
    fig = go.Figure(
        go.Heatmap(
            z=z.numpy(),
            x=list(range(z.shape[1])),
            y=list(d.layers),
            colorbar={"title": metric},
            hovertemplate="layer %{y}, head %{x}: %{z:.4f}<extra></extra>",
            **_colours(metric),
        )
    )
    fig.update_layout(title=f"{_TITLES[metric]}<br><sub>{html.escape(which)}</sub>")
    fig.update_xaxes(title_text="head", dtick=1)
    fig.update_yaxes(title_text="layer")
    return fig


def patching_heatmap(results: Patching | Sequence[Patching], metric: str = "p_true") -> go.Figure:
    """Layer x token heatmaps: one row per direction, one column per component.

    Args:
        results: one or several sweeps (e.g. restore and contaminate) of one prompt.
        metric: one of :data:`attndrift.patching.CELL_METRICS`.
    """
    results = [results] if isinstance(results, Patching) else list(results)
    if not results:
        raise ValueError("no patching results to plot")
    if metric not in CELL_METRICS:
        raise ValueError(f"unknown metric {metric!r}: expected one of {CELL_METRICS}")
    components = results[0].components
    titles = [f"{r.direction} · {c} (window {r.window})" for r in results for c in components]
    fig = make_subplots(
        rows=len(results),
        cols=len(components),
        subplot_titles=titles,
        shared_yaxes=True,
        vertical_spacing=0.12 if len(results) > 1 else 0.0,
    )
    for i, r in enumerate(results):
        if r.components != components:
            raise ValueError("every sweep must cover the same components")
        labels = unique_labels(r.tokens)
        x = [labels[p] for p in r.positions]
        values = r.metric(metric).float()
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
            fig.update_xaxes(title_text="token", row=i + 1, col=j + 1, tickangle=-45)
            fig.update_yaxes(title_text="layer (window start)", row=i + 1, col=j + 1)
    colours = _colours(metric)
    coloraxis = {"colorscale": colours["colorscale"], "colorbar": {"title": metric}}
    if "zmid" in colours:
        coloraxis["cmid"] = 0.0
    r0 = results[0]
    fig.update_layout(
        coloraxis=coloraxis,
        title=f"{_TITLES[metric]} after patching<br><sub>{html.escape(r0.prompt)} → "
        f"o_true {html.escape(r0.target_true)}, o_new {html.escape(r0.target_new)}</sub>",
        height=320 * len(results) + 120,
    )
    return fig


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
    )
    for i, (layer, head) in enumerate(heads):
        if layer not in pair.vanilla.layers:
            raise ValueError(f"layer {layer} was not captured (captured: {pair.vanilla.layers})")
        li = pair.vanilla.layers.index(layer)
        for name, cap, colour in (
            ("vanilla", pair.vanilla, "#1f77b4"),
            ("edited", pair.edited, "#d62728"),
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
        fig.update_yaxes(title_text="attention", row=i + 1, col=1)
    fig.update_xaxes(title_text="key token", row=len(heads), col=1, tickangle=-45)
    fig.update_layout(
        barmode="group",
        title="attention of the query row: vanilla vs edited",
        height=220 * len(heads) + 160,
    )
    return fig


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
                text=part["prompt"],
                hovertemplate="%{text}<br>drift %{x:.3f}, P(o_new) %{y:.3f}<extra></extra>",
            )
        )
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        xs = np.array([x.min(), x.max()])
        fig.add_trace(
            go.Scatter(x=xs, y=slope * xs + intercept, mode="lines", name="least squares")
        )
    c = analysis.overall
    fig.update_layout(
        title=f"drift factor vs P(o_new): Pearson ρ = {c.pearson:.2f} (p = {c.pearson_p:.1e}), "
        f"Spearman ρ = {c.spearman:.2f} (p = {c.spearman_p:.1e}), n = {c.n}"
    )
    fig.update_xaxes(title_text="drift factor (max over layers and heads of Δ attention to s_last)")
    fig.update_yaxes(title_text="P(o_new) under the edited model")
    return fig


def tradeoff(frame, editor: str | None = None) -> go.Figure:
    """The γ trade-off: edit success (ES, PS) and specificity (NS, RS, DNS) against γ.

    Args:
        frame: :func:`attndrift.summary.tradeoff` — one row per setting with ``editor``,
            ``gamma``, ``selection`` and each metric with ``_low``/``_high`` interval bounds.
        editor: plot one editor's rows only (default: all, distinguished by line style).
    """
    if editor is not None:
        frame = frame[frame["editor"] == editor]
    if frame.empty:
        raise ValueError("no settings to plot")
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("edit success", "specificity"), shared_yaxes=True
    )
    gammas = sorted(frame["gamma"].unique())
    labels = [f"{g:g}" for g in gammas]
    for (ed, selection), part in frame.groupby(["editor", "selection"], sort=True):
        part = part.set_index("gamma").reindex(gammas)
        style = "solid" if selection else "dash"
        suffix = f"{ed}, {'selected heads' if selection else 'all heads'}"
        for col, kinds in ((1, ("ES", "PS")), (2, ("NS", "RS", "DNS"))):
            for kind in kinds:
                y = part[kind].to_numpy(float)
                if np.isnan(y).all():
                    continue
                fig.add_trace(
                    go.Scatter(
                        x=labels,
                        y=100 * y,
                        error_y={
                            "type": "data",
                            "symmetric": False,
                            "array": 100 * (part[f"{kind}_high"].to_numpy(float) - y),
                            "arrayminus": 100 * (y - part[f"{kind}_low"].to_numpy(float)),
                        },
                        mode="lines+markers",
                        line={"dash": style},
                        name=f"{kind} ({suffix})",
                    ),
                    row=1,
                    col=col,
                )
    fig.update_xaxes(title_text="SADR γ", type="category")
    fig.update_yaxes(title_text="% of probes right (95 % interval)", row=1, col=1)
    fig.update_layout(title="SADR trade-off: edit success vs specificity across γ")
    return fig


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


def _kaleido_available() -> bool:
    return importlib.util.find_spec("kaleido") is not None


def save_png(fig: go.Figure, path: str | Path) -> Path:
    """Write a PNG with kaleido (not a dependency of attndrift).

    Raises:
        RuntimeError: kaleido is not installed, or it cannot render (e.g. no Chrome/Chromium).
    """
    if not _kaleido_available():
        raise RuntimeError(
            "save_png needs the optional package kaleido and a Chrome/Chromium browser "
            "(pip install kaleido); use save_html for a standalone file instead"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.write_image(path, format="png")
    except Exception as err:
        raise RuntimeError(
            f"kaleido could not render the PNG ({type(err).__name__}: {err}); it needs a "
            "Chrome/Chromium browser. Use save_html for a standalone file instead"
        ) from err
    return path
