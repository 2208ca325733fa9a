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

The engine computes only what a cell can change. A cell patches layer ``l`` onwards at position
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from attndrift import capture, encoding, models

log = logging.getLogger(__name__)

Direction = Literal["restore", "contaminate"]
DIRECTIONS: tuple[Direction, ...] = ("restore", "contaminate")
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
#: a tile of cells spans this many layers (window starts) and positions
_TILE_LAYERS, _TILE_POSITIONS = 4, 3


@dataclass(frozen=True)
class Component:
    """A patchable activation: its hook in each layer and the axis of its token positions.

    The value of a cell at position ``p`` is the hook's tensor at index ``p`` of ``axis``
    (batch is axis 0), e.g. a query row of an attention pattern (axis 2) or one position of
    an MLP output (axis 1).
    """

    name: str
    hook: Callable[[int], str]  # layer -> hook name
    axis: int  # position axis of the hook's tensor

    def patch(self, x: Tensor, rows: Tensor, pos: Tensor, values: Tensor) -> Tensor:
        """``x`` with ``x[rows[i], …, pos[i], …] = values[i]`` (position on ``axis``)."""
        view = x.movedim(self.axis, 1)  # [batch, pos, ...], a view of x
        view[rows, pos] = values.to(x.dtype)
        return x


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("attn", models.pattern_hook, 2),
        Component("mlp", models.mlp_out_hook, 1),
        Component("attn_out", models.attn_out_hook, 1),
        Component("resid", models.resid_pre_hook, 1),
    )
}


class Cell(NamedTuple):
    """One cell of a sweep and its value (:meth:`Patching.best`)."""

    layer: int  # the window's first layer
    position: int  # the prompt position
    value: float  # P(o_true) (restore) or P(o_new) (contaminate) after the patch


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
# The engine
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


@dataclass(frozen=True)
class _Clean:
    """An unpatched run: its metrics, every value of every component (the patch source), the
    residual stream entering every block, and the key-value cache of every layer."""

    scores: dict[str, Tensor]
    values: dict[str, Tensor]  # hook name -> [seq, ...] the full activation
    resid_pre: Float[Tensor, "seq layer pos d_model"]
    cache: object

    def outcome(self) -> Outcome:
        return Outcome(**{k: float(v[0]) for k, v in self.scores.items()})


@torch.no_grad()
def _clean(variant: models.Variant, base: _Base, components: Sequence[Component], metric) -> _Clean:
    model = variant.model
    layers = range(model.cfg.n_layers)
    names = [c.hook(layer) for c in components for layer in layers]
    names += [models.resid_pre_hook(layer) for layer in layers]
    rec = capture.Recorder({name: None for name in dict.fromkeys(names)})
    hidden, cache = models.final_hidden_and_cache(model, base.tokens, [*variant.hooks, *rec.hooks])
    values = rec.values()
    resid = torch.stack([values[models.resid_pre_hook(layer)] for layer in layers], dim=1)
    return _Clean(_scores(model, hidden, base, 0, metric), values, resid, cache)


def _tiles(cells: Tensor, window: int, n_layers: int) -> list[Tensor]:
    """Cells grouped by tiles of nearby window starts and positions (each tile's cells share
    a late first layer and a late first position)."""
    key = (cells[:, 1] // _TILE_LAYERS) * 100_000 + (cells[:, 2] // _TILE_POSITIONS)
    return [cells[key == k] for k in torch.unique(key)]


def _chunks(tile: Tensor, base: _Base, budget: int, max_cells: int | None) -> list[Tensor]:
    """A tile cut into forward passes of at most ``budget`` padded tokens."""
    width = base.tokens.shape[1] - int(tile[:, 2].min())
    per_pass = max(1, budget // (base.rows * width))
    per_pass = min(per_pass, max_cells or per_pass)
    return [tile[i : i + per_pass] for i in range(0, len(tile), per_pass)]


def _patch_hooks(
    model: HookedTransformer,
    cells: Int[Tensor, "cell 3"],
    components: Sequence[Component],
    window: int,
    source: _Clean,
    rows_per_cell: int,
    offset: int,
) -> list:
    """Hooks that patch every cell of a pass (cells: component, layer, position); the pass
    runs positions ``offset`` onwards. Row ``i * rows_per_cell + r`` is cell ``i``'s copy of
    base sequence ``r``."""
    device = cells.device
    r = torch.arange(rows_per_cell, device=device)
    hooks = []
    for c, component in enumerate(components):
        for layer in range(model.cfg.n_layers):
            start = cells[:, 1]
            mine = (cells[:, 0] == c) & (start <= layer) & (layer < start + window)
            idx = mine.nonzero()[:, 0]
            if len(idx) == 0:
                continue
            rows = (idx[:, None] * rows_per_cell + r).flatten()  # batch rows to patch
            seq = r.repeat(len(idx))  # their base sequence (source row)
            pos = cells[idx, 2].repeat_interleave(rows_per_cell)  # prompt positions
            src = source.values[component.hook(layer)].movedim(component.axis, 1)[seq, pos]

            def patch(x, hook, c=component, rows=rows, pos=pos - offset, src=src) -> Tensor:
                return c.patch(x, rows, pos, src)

            hooks.append((component.hook(layer), patch))
    return hooks


def _unchanged(
    cells: Tensor, components: Sequence[Component], window: int, target: _Clean, source: _Clean
) -> Tensor:
    """[cell] whether the source equals the target at every patched (layer, position)."""
    n_layers = target.resid_pre.shape[1]
    same = {}
    for component in components:
        # [layer, pos]: the two runs' values agree exactly at this (layer, position)
        rows = []
        for layer in range(n_layers):
            a = target.values[component.hook(layer)].movedim(component.axis, 1)
            b = source.values[component.hook(layer)].movedim(component.axis, 1)
            rows.append((a == b).flatten(2).all(-1).all(0))
        same[component.name] = torch.stack(rows)
    out = torch.zeros(len(cells), dtype=torch.bool, device=cells.device)
    for i, (c, layer, pos) in enumerate(cells.tolist()):
        stop = min(layer + window, n_layers)
        out[i] = bool(same[components[c].name][layer:stop, pos].all())
    return out


def _check(components: Sequence[str], direction: str, window: int) -> tuple[Component, ...]:
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
        direction: ``"restore"`` or ``"contaminate"``.
        components: names in :data:`COMPONENTS` (default: attention rows and MLP outputs).
        window: layers per cell, ``[l, l + window)`` clipped at the last layer.
        positions: prompt positions to patch (default: every position, BOS included).
        full_answer: also score every answer token (``p_true_full``, ``p_new_full``).
        metric: optional ``logits [cell, d_vocab] -> [cell]`` of the last prompt position.
        max_batch_tokens: padded tokens per patched forward pass (cells are chunked to fit).
        max_cells: optional cap on cells per forward pass (``1`` = one forward per cell).
        progress: show a progress bar over passes.
    """
    parts = _check(components, direction, window)
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
    t_clean, s_clean = _clean(target, base, parts, metric), _clean(source, base, parts, metric)
    names = {"model": model.cfg.model_name, "edit": e.name}
    # cells: [component, window start, position], in result order
    grid = torch.cartesian_prod(
        torch.arange(len(parts)), torch.arange(n_layers), torch.tensor(positions)
    ).to(base.tokens.device)
    unchanged = _unchanged(grid, parts, window, t_clean, s_clean)
    flat = {k: v[0].expand(len(grid)).clone() for k, v in t_clean.scores.items()}
    todo = grid[~unchanged]
    index = {tuple(c): i for i, c in enumerate(grid.tolist())}
    passes = [
        chunk
        for tile in _tiles(todo, window, n_layers)
        for chunk in _chunks(tile, base, max_batch_tokens, max_cells)
    ]
    for chunk in tqdm(passes, desc=f"patching ({direction})", disable=not progress):
        start, offset = int(chunk[:, 1].min()), int(chunk[:, 2].min())
        n = len(chunk)
        hooks = _patch_hooks(model, chunk, parts, window, s_clean, base.rows, offset)
        with torch.no_grad():
            resid = t_clean.resid_pre[:, start, offset:].repeat(n, 1, 1)
            cache = models.cache_prefix(t_clean.cache, offset, n)
            mask = torch.ones(resid.shape[0], base.tokens.shape[1], device=resid.device)
            hidden = models.final_hidden_from(
                target.model, resid, start, [*target.hooks, *hooks], cache, mask.long()
            )
            scores = _scores(target.model, hidden, base, offset, metric)
        at = torch.tensor([index[tuple(c)] for c in chunk.tolist()], device=grid.device)
        for k, v in scores.items():
            flat[k][at] = v
    return _result(flat, len(parts), n_layers, len(positions), t_clean, s_clean, direction,
                   parts, window, positions, prompt, target_true, target_new, model, base,
                   int(unchanged.sum()), names)  # fmt: skip


def _result(flat, n_c, n_l, n_p, t_clean, s_clean, direction, parts, window, positions,
            prompt, true, new, model, base, skipped, names) -> Patching:  # fmt: skip
    grids = {k: v.cpu().reshape(n_c, n_l, n_p) for k, v in flat.items()}
    t_out, s_out = t_clean.outcome(), s_clean.outcome()
    p_true = grids["p_true"]
    span = s_out.p_true - t_out.p_true
    n_prompt = base.last + 1
    return Patching(
        direction=direction,
        components=tuple(c.name for c in parts),
        window=window,
        positions=positions,
        prompt=prompt,
        target_true=true,
        target_new=new,
        tokens=tuple(encoding.token_strings(model, base.tokens[0, :n_prompt].tolist())),
        target=t_out,
        source=s_out,
        recovery=(p_true - t_out.p_true) / span if abs(span) > 1e-12 else p_true * math.nan,
        gain_pct=100 * (p_true - t_out.p_true) / t_out.p_true
        if t_out.p_true > 0
        else p_true * math.nan,
        skipped=skipped,
        **names,
        **grids,
    )


#: named partials, as TransformerLens' ``get_act_patch_*``: one direction, one component
restore = functools.partial(patch, direction="restore")
contaminate = functools.partial(patch, direction="contaminate")
restore_attn = functools.partial(patch, direction="restore", components=("attn",))
restore_mlp = functools.partial(patch, direction="restore", components=("mlp",))
contaminate_attn = functools.partial(patch, direction="contaminate", components=("attn",))
contaminate_mlp = functools.partial(patch, direction="contaminate", components=("mlp",))
