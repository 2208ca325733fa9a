"""Patching: restore and contaminate components between a vanilla and an edited run (METHOD §2).

Two runs of one prompt, vanilla G and edited G*. A *cell* is ``(component, layer l,
position p)`` with a window ``w``: the component of layers ``[l, l + w)`` (clipped at the last
layer) at prompt position ``p`` is replaced by the other run's value.

* components (:class:`Component`: a hook per layer and the axis of its token positions):
  ``"attn"`` = the attention pattern rows of all heads at query position ``p``
  (``hook_pattern[:, :, p, :]``), ``"mlp"`` = the MLP output at ``p`` (``hook_mlp_out[:, p]``),
  ``"attn_out"`` = the attention output at ``p``, ``"resid"`` = the residual stream entering the
  block at ``p``. A new component is one more :class:`Component`; the engine does not change.
* directions: ``"restore"`` runs G* with G's values patched in (paper Fig. 5);
  ``"contaminate"`` runs G with G*'s values patched in (paper Fig. 3).

Metrics of each patched run, at the last prompt token ("first" = the answer's first token):
``p_true``, ``p_new`` (first-token probabilities of o_true and o_new), ``logit_diff``
(o_new − o_true first-token logits), and relative to the unpatched runs of the *target* model
(the one that runs: G* for restore, G for contaminate) and the *source* (the other one):

* ``recovery = (p_true − p_true[target]) / (p_true[source] − p_true[target])``: the fraction of
  the way to the source's P(o_true) (restore: the recovered fraction; contaminate: the fraction
  of the total drop reproduced); NaN when the two unpatched runs agree;
* ``gain_pct = 100 (p_true − p_true[target]) / p_true[target]``: the relative change in % (the
  paper's "relative gain");
* with ``full_answer``: ``p_true_full``, ``p_new_full`` = exp(−mean NLL) of every answer token;
* with ``metric``: any function of the last position's logits (``custom``).

The cell engine (:mod:`attndrift.analysis.cells`, shared with causal tracing and attention knockout;
this module keeps its components, patch sources and scores) computes only what a cell can
change. A cell patches layer ``l`` onwards at position
``p``: nothing below ``l`` and nothing before ``p`` changes, so each patched pass starts at its
cells' first layer from the clean target run's residual stream, runs only the positions from
its cells' first position on, and reads the earlier positions' keys and values from the clean
run's key-value cache. Cells are grouped into tiles of nearby layers and positions (many cells
per forward pass, little recomputation). A cell whose source values equal the target's at
every patched layer changes nothing and is not run (its result is the clean target run's,
e.g. every layer below an edited one). The numbers are those of TransformerLens'
one-forward-per-cell ``generic_activation_patch`` (tested to 1e-5).

Axes: ``component`` (:attr:`Patching.components` order), ``layer`` (window start, every
layer), ``pos`` (:attr:`Patching.positions`).
"""

import functools
import logging
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import capture, encoding, models
from attndrift.analysis import cells
from attndrift.analysis.cells import Cell, Component

log = logging.getLogger(__name__)

Direction = Literal["restore", "contaminate"]
DIRECTIONS: tuple[Direction, ...] = typing.get_args(Direction)
DEFAULT_BATCH_TOKENS = 4096
#: metrics of every cell, in :meth:`Patching.frame` column order
CELL_METRICS = (
    "p_true",
    "p_new",
    "logit_diff",
    "recovery",
    "gain_pct",
    "p_true_full",
    "p_new_full",
    "custom",
)
#: metrics computed only when asked for (``full_answer``, ``metric``): NaN otherwise
_OPTIONAL_METRICS = frozenset({"p_true_full", "p_new_full", "custom"})


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("attn", models.pattern_hook, 2),
        Component("mlp", models.mlp_out_hook, 1),
        Component("attn_out", models.attn_out_hook, 1),
        Component("resid", models.resid_pre_hook, 1),
    )
}


@dataclass(frozen=True)
class Outcome:
    """Metrics of one unpatched run (``*_full`` are NaN unless the full answer was scored)."""

    p_true: float
    p_new: float
    logit_diff: float
    p_true_full: float = math.nan
    p_new_full: float = math.nan
    custom: float = math.nan


@dataclass(frozen=True)
class Patching:
    """One direction's sweep: a ``[component, layer, pos]`` tensor per metric (CPU).

    Attributes:
        direction: ``"restore"`` (G* patched with G) or ``"contaminate"`` (G patched with G*).
        components, window, positions: the sweep (``layer`` = window start, all layers).
        prompt, target_true, target_new: the prompt and the two answers.
        tokens: token string of every prompt position.
        target, source: unpatched outcomes of the model that runs and of the other one.
        p_true, p_new, logit_diff, recovery, gain_pct, p_true_full, p_new_full, custom: see
            the module docstring (``*_full`` NaN unless ``full_answer``, ``custom`` unless
            ``metric``).
        skipped: cells not run because the patch changes nothing (result: the target's).
        model, edit: names of the model and of the edited variant (figure titles).
    """

    direction: Direction
    components: tuple[str, ...]
    window: int
    positions: tuple[int, ...]
    prompt: str
    target_true: str
    target_new: str
    tokens: tuple[str, ...]
    target: Outcome
    source: Outcome
    p_true: Float[Tensor, "component layer pos"]
    p_new: Float[Tensor, "component layer pos"]
    logit_diff: Float[Tensor, "component layer pos"]
    recovery: Float[Tensor, "component layer pos"]
    gain_pct: Float[Tensor, "component layer pos"]
    p_true_full: Float[Tensor, "component layer pos"]
    p_new_full: Float[Tensor, "component layer pos"]
    custom: Float[Tensor, "component layer pos"]
    skipped: int = 0
    model: str = ""
    edit: str = ""

    def __repr__(self) -> str:
        _, n_l, n_p = self.p_true.shape
        edit = f" of {self.edit}" if self.edit else ""
        return (
            f"Patching({self.direction}{edit}, {'/'.join(self.components)} × {n_l} layers "
            f"(window {self.window}) × {n_p} positions of {self.prompt!r}; P(o_true "
            f"{self.target_true!r}): unpatched {self.target.p_true:.4f}, source "
            f"{self.source.p_true:.4f})"
        )

    def metric(self, name: str) -> Float[Tensor, "component layer pos"]:
        """The tensor of one metric by name (one of :data:`CELL_METRICS`)."""
        if name not in CELL_METRICS:
            raise ValueError(f"unknown metric {name!r}: expected one of {CELL_METRICS}")
        return getattr(self, name)

    def best(self, component: str) -> "Cell":
        """The cell that moves furthest the patch's way: a :class:`Cell` (layer, position,
        value).

        Restoring looks for the largest P(o_true) (the vanilla answer back), contaminating for
        the largest P(o_new) (the edited answer carried into the vanilla model).
        """
        if component not in self.components:
            raise ValueError(f"component {component!r} was not patched ({self.components})")
        grid = (self.p_true if self.direction == "restore" else self.p_new)[
            self.components.index(component)
        ]
        layer, i = divmod(int(grid.argmax()), len(self.positions))
        return Cell(layer, self.positions[i], float(grid[layer, i]))

    def frame(self) -> pd.DataFrame:
        """Tidy table: one row per cell; the optional metrics (``p_true_full``, ``p_new_full``,
        ``custom``) only when they were computed."""
        n_c, n_l, n_p = self.p_true.shape
        comp = np.repeat(np.asarray(self.components, dtype=object), n_l * n_p)
        pos = np.tile(np.asarray(self.positions), n_c * n_l)
        table = {
            "component": comp,
            "direction": self.direction,
            "window": self.window,
            "layer": np.tile(np.repeat(np.arange(n_l), n_p), n_c),
            "position": pos,
            "token": np.asarray(self.tokens, dtype=object)[pos],
        }
        for name in CELL_METRICS:
            values = getattr(self, name).flatten().numpy()
            if name in _OPTIONAL_METRICS and np.isnan(values).all():
                continue
            table[name] = values
        return pd.DataFrame(table)


def frame(results: Patching | Sequence[Patching]) -> pd.DataFrame:
    """One tidy table of one or several sweeps (e.g. both directions)."""
    results = [results] if isinstance(results, Patching) else list(results)
    return pd.concat([r.frame() for r in results], ignore_index=True)


# --------------------------------------------------------------------------------------------
# Sources and scores (the cells, passes and hooks: attndrift.analysis.cells)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Base:
    """The sequences every cell repeats: row 0 scores o_true, row 1 (full answers) o_new."""

    tokens: Int[Tensor, "seq pos"]
    last: int  # last prompt position (predicts the first answer token)
    true_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    full: bool

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]


def _base(model: HookedTransformer, prompt: str, true: str, new: str, full: bool) -> _Base:
    ids = encoding.encode_prompt(model, prompt).ids
    true_ids, new_ids = encoding.encode_answer(model, true), encoding.encode_answer(model, new)
    if true_ids[0] == new_ids[0]:
        log.warning("o_true and o_new share their first token: first-token metrics coincide")
    seqs = [ids + true_ids[:-1], ids + new_ids[:-1]] if full else [ids]
    return _Base(encoding.pad(model, seqs), len(ids) - 1, true_ids, new_ids, full)


def _answer_nll(
    model: HookedTransformer, hidden: Float[Tensor, "cell pos d_model"], start: int, ids
) -> Float[Tensor, " cell"]:
    """Mean NLL of answer ``ids`` predicted at positions ``start, start+1, …``."""
    logits = models.unembed(model, hidden[:, start : start + len(ids)]).float()
    target = torch.tensor(ids, device=hidden.device)[None, :, None].expand(len(hidden), -1, 1)
    return -logits.log_softmax(-1).gather(-1, target)[..., 0].mean(-1)


def _scores(
    model: HookedTransformer,
    hidden: Float[Tensor, "row pos d_model"],
    base: _Base,
    offset: int,
    metric: Callable | None,
) -> dict[str, Tensor]:
    """Metrics of runs whose rows repeat ``base`` (row ``i * base.rows + r``), from hidden
    states of positions ``offset`` onwards."""
    r, last = base.rows, base.last - offset
    logits = models.unembed(model, hidden[0::r, last]).float()  # [cell, d_vocab]
    logp = logits.log_softmax(-1)
    t, n = base.true_ids[0], base.new_ids[0]
    nan = torch.full((len(logits),), math.nan, device=hidden.device)
    out = {
        "p_true": logp[:, t].exp(),
        "p_new": logp[:, n].exp(),
        "logit_diff": logits[:, n] - logits[:, t],
        "p_true_full": nan,
        "p_new_full": nan,
        "custom": nan if metric is None else metric(logits).float(),
    }
    if base.full:
        out["p_true_full"] = torch.exp(-_answer_nll(model, hidden[0::r], last, base.true_ids))
        out["p_new_full"] = torch.exp(-_answer_nll(model, hidden[1::r], last, base.new_ids))
    return out


def _outcome(scores: dict[str, Tensor]) -> Outcome:
    return Outcome(**{k: float(v[0]) for k, v in scores.items()})


def check_options(components: Sequence[str], direction: str, window: int) -> tuple[Component, ...]:
    """The components of a sweep by name; a ValueError for an unknown component or
    direction, no or repeated components, or a window that is not an integer >= 1."""
    names = tuple(components)
    for c in names:
        if c not in COMPONENTS:
            raise ValueError(f"unknown component {c!r}: expected one of {tuple(COMPONENTS)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}: expected one of {DIRECTIONS}")
    if not names:
        raise ValueError("need at least one component")
    if len(set(names)) != len(names):
        raise ValueError(f"repeated components in {names}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 layer, got {window!r}")
    return tuple(COMPONENTS[c] for c in names)


def patch(
    vanilla: HookedTransformer | models.Variant,
    edited: HookedTransformer | models.Variant,
    prompt: str,
    target_true: str,
    target_new: str,
    *,
    direction: str,
    components: Sequence[str] = ("attn", "mlp"),
    window: int = 1,
    positions: Sequence[int] | None = None,
    full_answer: bool = False,
    metric: Callable[[Tensor], Tensor] | None = None,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_cells: int | None = None,
    progress: bool = False,
) -> Patching:
    """Patch every (component, layer window, position) cell in one direction, batched.

    Args:
        vanilla, edited: models or :class:`~attndrift.models.Variant` (e.g. an edit as hooks);
            same architecture and tokenizer.
        prompt: the prompt (its last token predicts the answer).
        target_true, target_new: o_true and o_new.
        direction: ``"restore"`` or ``"contaminate"`` (a :data:`Direction`; typed ``str``:
            a bad value gets this module's one-line ValueError, see
            :func:`attndrift.checks.option`).
        components: names in :data:`COMPONENTS` (default: attention rows and MLP outputs).
        window: layers per cell, ``[l, l + window)`` clipped at the last layer.
        positions: prompt positions to patch (default: every position, BOS included).
        full_answer: also score every answer token (``p_true_full``, ``p_new_full``).
        metric: optional ``logits [cell, d_vocab] -> [cell]`` of the last prompt position.
        max_batch_tokens: padded tokens per patched forward pass (cells are chunked to fit).
        max_cells: optional cap on cells per forward pass (``1`` = one forward per cell).
        progress: show a progress bar over passes.
    """
    parts = check_options(components, direction, window)
    if max_batch_tokens < 1 or (max_cells is not None and max_cells < 1):
        raise ValueError(
            f"max_batch_tokens and max_cells must be positive, got {max_batch_tokens}, {max_cells}"
        )
    v, e = models.as_variant(vanilla), models.as_variant(edited)
    capture.check_compatible(v.model, e.model)
    model = v.model
    base = _base(model, prompt, target_true, target_new, full_answer)
    n_prompt, n_layers = base.last + 1, model.cfg.n_layers
    positions = tuple(range(n_prompt)) if positions is None else tuple(int(p) for p in positions)
    bad = [p for p in positions if not 0 <= p < n_prompt]
    if bad or not positions:
        raise ValueError(f"position out of range: {bad or 'none'} (the prompt has {n_prompt})")
    target, source = (e, v) if direction == "restore" else (v, e)
    t_hidden, t_run = cells.record(target, base.tokens, parts)
    s_hidden, s_run = cells.record(source, base.tokens, parts)
    with torch.no_grad():
        t_scores = _scores(model, t_hidden, base, 0, metric)
        s_scores = _scores(model, s_hidden, base, 0, metric)
    grid = cells.grid((window,) * len(parts), n_layers, positions)
    unchanged = cells.unchanged(grid, parts, t_run, s_run, n_layers)
    flat = {k: v[0].expand(len(grid)).clone() for k, v in t_scores.items()}
    source_rows = torch.arange(base.rows)  # cell row r takes the source's row r
    cells.sweep(
        target, t_run, grid[~unchanged], flat, rows=base.rows, seq_len=base.tokens.shape[1],
        hooks=lambda chunk, offset: cells.patch_hooks(chunk, parts, s_run, source_rows, offset),
        score=lambda hidden, offset, n: _scores(target.model, hidden, base, offset, metric),
        budget=max_batch_tokens, max_cells=max_cells, progress=progress,
        desc=f"patching ({direction})",
    )  # fmt: skip
    grids = {k: v.cpu().reshape(len(parts), n_layers, len(positions)) for k, v in flat.items()}
    return _result(
        grids, target=_outcome(t_scores), source=_outcome(s_scores), direction=direction,
        components=tuple(c.name for c in parts), window=window, positions=positions,
        prompt=prompt, target_true=target_true, target_new=target_new,
        model=model.cfg.model_name, edit=e.name,
        tokens=tuple(encoding.token_strings(model, base.tokens[0, :n_prompt].tolist())),
        skipped=int(unchanged.sum()),
    )  # fmt: skip


def _result(grids: dict[str, Tensor], *, target: Outcome, **fields) -> Patching:
    """The :class:`Patching` of the metric ``grids`` ``[component, layer, pos]`` (and the
    other fields of the sweep), with recovery and gain relative to the ``target`` run."""
    p_true = grids["p_true"]
    span = fields["source"].p_true - target.p_true
    return Patching(
        target=target,
        recovery=(p_true - target.p_true) / span if abs(span) > 1e-12 else p_true * math.nan,
        gain_pct=100 * (p_true - target.p_true) / target.p_true
        if target.p_true > 0
        else p_true * math.nan,
        **fields,
        **grids,
    )


#: named partials, as TransformerLens' ``get_act_patch_*``: one direction, one component
restore = functools.partial(patch, direction="restore")
contaminate = functools.partial(patch, direction="contaminate")
restore_attn = functools.partial(patch, direction="restore", components=("attn",))
restore_mlp = functools.partial(patch, direction="restore", components=("mlp",))
contaminate_attn = functools.partial(patch, direction="contaminate", components=("attn",))
contaminate_mlp = functools.partial(patch, direction="contaminate", components=("mlp",))
