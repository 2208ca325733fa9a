"""Plotting: the only module that makes figures. Every function returns a plotly ``go.Figure``.

Figures present numbers computed elsewhere (:mod:`attndrift.drift`, :mod:`attndrift.patching`,
:mod:`attndrift.capture`); nothing here runs a model or calls ``.show()``.

* :func:`headline`: P(o_true) and P(o_new) per model: each prompt a dot, the mean a labelled dash;
* :func:`drift_heatmap`: layer x head (diverging scale centred on 0 for differences,
  sequential for KL and attention), optionally on a fixed range (``zmax``);
* :func:`drift_heatmaps`: several drifts side by side on one shared colour scale (figures that
  are compared share one scale: :func:`common_zmax`);
* :func:`patching_heatmap`: layer x token for each direction (rows) and component (columns);
* :func:`attention_rows`: vanilla vs edited attention of chosen (layer, head)s over the tokens;
* :func:`drift_scatter`: drift factor vs P(o_new) with a least-squares line and ρ in the title;
* :func:`tradeoff`: ES/PS vs NS/RS/DNS across SADR's γ, with and without head selection, one
  curve per variant; :func:`tradeoff_map`: PS against the harmonic mean of RS and DNS, one
  point per setting;
* :func:`tracing_heatmap`: causal tracing, token x layer per component (ROME's Fig. 1);
* :func:`knockout_figure`: ΔP(o_new), ΔP(o_true) per blocked window, vanilla vs edited;
* :func:`save_html` (standalone, plotly.js embedded) and :func:`save_png` (needs kaleido and a
  Chrome/Chromium; a clear RuntimeError otherwise).

Token labels are made unique (``"Paris·3"`` = the token at position 3) because plotly merges
equal categories on an axis.
"""

import html
import importlib.util
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from attndrift.capture import Pair
from attndrift.drift import METRICS as DRIFT_METRICS
from attndrift.drift import Drift, FailureAnalysis
from attndrift.knockout import Knockout
from attndrift.patching import CELL_METRICS, Patching
from attndrift.tracing import Tracing

DIVERGING = "RdBu_r"
SEQUENTIAL = "Viridis"
#: colours of the true and the new object in every figure
O_TRUE, O_NEW = "#2166ac", "#b2182b"
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
    scale (an edit that drifts less then looks paler, not equally drifted).

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


def drift_heatmap(
    d: Drift, metric: str = "delta", prompt: int | None = None, zmax: int | float | None = None
) -> go.Figure:
    """Layer x head heatmap of a drift metric, for one prompt or averaged over prompts.

    Args:
        d: the drift.
        metric: ``kl``, ``a_vanilla``, ``a_edited``, ``delta``, ``mass_vanilla``,
            ``mass_edited`` or ``mass_delta``.
        prompt: index of the prompt (default: mean over prompts).
        zmax: a fixed colour range: ``[-zmax, zmax]`` for differences (``delta``,
            ``mass_delta``), ``[0, zmax]`` otherwise (default: the plotly autoscale). Use
            :func:`common_zmax` to give heatmaps that are compared one range.
    """
    z, which = _drift_values(d, metric, prompt)
    fixed = _range(metric, zmax)
    colours = _colours(metric)
    if fixed is not None:
        colours = {"colorscale": colours["colorscale"], "zmin": fixed[0], "zmax": fixed[1]}
    fig = go.Figure(
        go.Heatmap(
            z=z.numpy(),
            x=list(range(z.shape[1])),
            y=list(d.layers),
            colorbar={"title": metric},
            hovertemplate="layer %{y}, head %{x}: %{z:.4f}<extra></extra>",
            **colours,
        )
    )
    fig.update_layout(title=f"{_TITLES[metric]}<br><sub>{html.escape(which)}</sub>")
    fig.update_xaxes(title_text="head", dtick=1)
    fig.update_yaxes(title_text="layer")
    return fig


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
        zmax: the shared range (default: :func:`common_zmax` of these drifts).
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
        subplot_titles=names,
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
    fig.update_layout(
        coloraxis={
            "colorscale": _colours(metric)["colorscale"],
            "cmin": low,
            "cmax": high,
            "colorbar": {"title": {"text": metric, "side": "right"}, "thickness": 14},
        },
        title=f"{_TITLES[metric]}<br><sub>{html.escape(which)}; one colour scale for all "
        "panels</sub>",
        height=460,
        margin={"t": 110},
    )
    return fig


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


#: one colour per metric in the trade-off figures, one line style per curve
METRIC_COLOURS = {"ES": "#1f77b4", "PS": "#d62728", "NS": "#2ca02c", "RS": "#9467bd",
                  "DNS": "#ff7f0e"}  # fmt: skip
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def tradeoff(frame, editor: str | None = None) -> go.Figure:
    """The γ trade-off: edit success (ES, PS) and specificity (NS, RS, DNS) against γ.

    One curve per editor, head selection and variant (a colour per metric, a line style per
    curve); an editor's γ = 0 row (its baseline) starts every curve of that editor.

    Args:
        frame: :func:`attndrift.summary.tradeoff` — one row per setting with ``editor``,
            ``gamma``, ``selection`` (``variant``: optional) and each metric with
            ``_low``/``_high`` interval bounds.
        editor: plot one editor's rows only (default: all).
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
                        connectgaps=True,
                        line={"dash": DASHES[i % len(DASHES)], "color": METRIC_COLOURS[kind]},
                        name=f"{kind} ({suffix})",
                    ),
                    row=1,
                    col=col,
                )
    fig.update_xaxes(title_text="SADR γ", type="category")
    fig.update_yaxes(title_text="% of probes right (95 % interval)", row=1, col=1)
    fig.update_layout(title="SADR trade-off: edit success vs specificity across γ")
    return fig


def _short_keys(keys: list[str]) -> list[str]:
    """Setting keys without the ``|``-parts they all share (``rome``, ``steps=80``, …)."""
    parts = [k.split("|") for k in keys]
    shared = set.intersection(*map(set, parts)) if len(keys) > 1 else set()
    return ["|".join(p for p in ps if p not in shared) or "|".join(ps) for ps in parts]


def tradeoff_map(frame) -> go.Figure:
    """Every setting as one point: paraphrase success (PS) against the harmonic mean of RS and
    DNS (``RS_DNS``, what the SADR rule maximises), with ES in the hover text; up and right is
    better.

    Args:
        frame: :func:`attndrift.summary.tradeoff`.
    """
    if frame.empty:
        raise ValueError("no settings to plot")
    fig = go.Figure(
        go.Scatter(
            x=100 * frame["RS_DNS"].to_numpy(float),
            y=100 * frame["PS"].to_numpy(float),
            mode="markers+text",
            text=_short_keys(list(frame["setting"])),
            textposition=[("top center", "bottom center")[i % 2] for i in range(len(frame))],
            customdata=list(frame["setting"]),
            hovertext=[f"ES {100 * e:.1f}" for e in frame["ES"].to_numpy(float)],
            name="settings",
        )
    )
    fig.update_xaxes(title_text="harmonic mean of RS and DNS (%)")
    fig.update_yaxes(title_text="PS (%)")
    fig.update_layout(title="Specificity against generalisation, one point per setting")
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
                colorbar={"x": right + 0.005, "thickness": 10, "len": 0.8},
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
    return fig


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
    return fig
