"""What every figure shares: colours, colour scales and ranges, titles, token labels, the look.

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
from collections import Counter
from collections.abc import Sequence

import plotly.graph_objects as go

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


def _model_colours(names: Sequence[str]) -> list[str]:
    """The first model is the unedited one (grey), then :data:`EDITED` in order."""
    return [VANILLA, *(EDITED[i % len(EDITED)] for i in range(len(names) - 1))]


#: one colour per probe kind (metric) in the trade-off and scatter figures, one line style per
#: curve; none of them is an answer's or a model's colour
METRIC_COLOURS = {"ES": "#009e73", "PS": "#66a61e", "NS": "#7570b3", "RS": "#e7298a",
                  "DNS": "#a6761d", "RS_D": "#4d4d4d"}  # fmt: skip
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
