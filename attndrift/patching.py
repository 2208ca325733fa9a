"""Patching: restore and contaminate components between a vanilla and an edited run (SPEC §2).

Two runs of one prompt, vanilla G and edited G*. A *cell* is ``(component, layer l,
position p)`` with a window ``w``: the component of layers ``[l, l + w)`` (clipped at the last
layer) at prompt position ``p`` is replaced by the other run's value.

* components: ``"attn"`` = the attention pattern rows of all heads at query position ``p``
  (``hook_pattern[:, :, p, :]``); ``"mlp"`` = the MLP output at ``p`` (``hook_mlp_out[:, p]``);
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
* with ``full_answer``: ``p_true_full``, ``p_new_full`` = exp(−mean NLL) of every answer token.

The engine is batched: each forward pass carries many cells (the prompt repeated once per
cell; inside each layer's hook only the rows whose window covers that layer are patched, at
their position, with index tensors built once per chunk), chunked by a token budget. Nothing
changes before a cell's first patched layer, so cells are ordered layer-major and each pass
starts at its chunk's first window start from the clean target run's residual stream (about
half the compute of running every layer). It gives the numbers of TransformerLens'
one-forward-per-cell ``generic_activation_patch`` (tested).

Axes: ``component`` (:attr:`Patching.components` order), ``layer`` (window start, every
layer), ``pos`` (:attr:`Patching.positions`).
"""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from attndrift import capture, encoding, models

log = logging.getLogger(__name__)

Component = Literal["attn", "mlp"]
Direction = Literal["restore", "contaminate"]
COMPONENTS: tuple[Component, ...] = ("attn", "mlp")
DIRECTIONS: tuple[Direction, ...] = ("restore", "contaminate")
DEFAULT_BATCH_TOKENS = 4096
#: metrics of every cell, in :meth:`Patching.frame` column order
METRICS = ("p_true", "p_new", "logit_diff", "recovery", "gain_pct", "p_true_full", "p_new_full")


@dataclass(frozen=True)
class Outcome:
    """Metrics of one unpatched run (``*_full`` are NaN unless the full answer was scored)."""

    p_true: float
    p_new: float
    logit_diff: float
    p_true_full: float = math.nan
    p_new_full: float = math.nan


@dataclass(frozen=True)
class Patching:
    """One direction's sweep: a ``[component, layer, pos]`` tensor per metric (CPU).

    Attributes:
        direction: ``"restore"`` (G* patched with G) or ``"contaminate"`` (G patched with G*).
        components, window, positions: the sweep (``layer`` = window start, all layers).
        prompt, target_true, target_new: the prompt and the two answers.
        tokens: token string of every prompt position.
        target, source: unpatched outcomes of the model that runs and of the other one.
        p_true, p_new, logit_diff, recovery, gain_pct, p_true_full, p_new_full: see the module
            docstring (``*_full`` are NaN unless ``full_answer``).
    """

    direction: Direction
    components: tuple[Component, ...]
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

    def metric(self, name: str) -> Float[Tensor, "component layer pos"]:
        """The tensor of one metric by name (one of :data:`METRICS`)."""
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}: expected one of {METRICS}")
        return getattr(self, name)

    def frame(self) -> pd.DataFrame:
        """Tidy table: one row per cell."""
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
        for name in METRICS:
            table[name] = getattr(self, name).flatten().numpy()
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


@dataclass(frozen=True)
class _Scores:
    """Metrics of many runs (one per cell), as tensors."""

    p_true: Float[Tensor, " cell"]
    p_new: Float[Tensor, " cell"]
    logit_diff: Float[Tensor, " cell"]
    p_true_full: Float[Tensor, " cell"]
    p_new_full: Float[Tensor, " cell"]

    def outcome(self, i: int = 0) -> Outcome:
        return Outcome(*(float(getattr(self, f)[i]) for f in Outcome.__dataclass_fields__))


def _answer_nll(
    model: HookedTransformer,
    hidden: Float[Tensor, "cell pos d_model"],
    start: int,
    ids: tuple[int, ...],
) -> Float[Tensor, " cell"]:
    """Mean NLL of answer ``ids`` predicted at positions ``start, start+1, …``."""
    logits = models.unembed(model, hidden[:, start : start + len(ids)]).float()
    target = torch.tensor(ids, device=hidden.device)[None, :, None].expand(len(hidden), -1, 1)
    return -logits.log_softmax(-1).gather(-1, target)[..., 0].mean(-1)


def _scores(
    model: HookedTransformer, hidden: Float[Tensor, "row pos d_model"], base: _Base
) -> _Scores:
    """Metrics of runs whose rows repeat ``base`` (row ``i * base.rows + r``)."""
    r = base.rows
    first = hidden[0::r, base.last]  # [cell, d_model]
    logits = models.unembed(model, first).float()
    logp = logits.log_softmax(-1)
    t, n = base.true_ids[0], base.new_ids[0]
    nan = torch.full((len(first),), math.nan, device=hidden.device)
    full_true = full_new = nan
    if base.full:
        full_true = torch.exp(-_answer_nll(model, hidden[0::r], base.last, base.true_ids))
        full_new = torch.exp(-_answer_nll(model, hidden[1::r], base.last, base.new_ids))
    return _Scores(
        p_true=logp[:, t].exp(),
        p_new=logp[:, n].exp(),
        logit_diff=logits[:, n] - logits[:, t],
        p_true_full=full_true,
        p_new_full=full_new,
    )


@dataclass(frozen=True)
class _Clean:
    """An unpatched run: its metrics, every pattern row and MLP output (the patch source), and
    the residual stream after every layer (where patched runs of later cells start)."""

    capture: capture.Capture
    scores: _Scores
    resid_post: Float[Tensor, "seq layer pos d_model"]


@torch.no_grad()
def _clean(variant: models.Variant, base: _Base) -> _Clean:
    device = base.tokens.device
    batch = encoding.Batch(
        tokens=base.tokens,
        lengths=torch.full((base.rows,), base.tokens.shape[1], device=device),
        last=torch.full((base.rows,), base.last, device=device),
        subject_first=torch.full((base.rows,), -1, device=device),
        subject_last=torch.full((base.rows,), -1, device=device),
    )
    model = variant.model
    rec = capture.Recorder(model, batch, queries="all", mlp_positions="all")
    resid: dict[int, Tensor] = {}

    def keep(x: Tensor, hook) -> None:
        resid[hook.layer()] = x.detach().clone()

    layers = range(model.cfg.n_layers)
    keep_hooks = [(models.resid_post_hook(layer), keep) for layer in layers]
    hidden = models.final_hidden(model, base.tokens, [*variant.hooks, *rec.hooks, *keep_hooks])
    return _Clean(
        rec.result(),
        _scores(model, hidden, base),
        torch.stack([resid[layer] for layer in layers], dim=1),
    )


def _patch_hooks(
    model: HookedTransformer,
    cells: Int[Tensor, "cell 3"],
    components: tuple[Component, ...],
    window: int,
    source: capture.Capture,
    rows_per_cell: int,
) -> list:
    """Hooks that patch every cell of a chunk in one pass (cells: component, layer, position).

    Row ``i * rows_per_cell + r`` belongs to cell ``i`` and repeats base sequence ``r``.
    """
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
            pos = cells[idx, 2].repeat_interleave(rows_per_cell)
            li = source.layers.index(layer)
            if component == "attn":
                src = source.pattern[:, li]  # [seq, head_index, query_pos, key_pos]

                def patch_attn(x: Tensor, hook, rows=rows, seq=seq, pos=pos, src=src) -> Tensor:
                    x[rows, :, pos, :] = src[seq, :, pos, :].to(x.dtype)
                    return x

                hooks.append((models.pattern_hook(layer), patch_attn))
            else:
                src = source.mlp_out[:, li]  # [seq, pos, d_model]

                def patch_mlp(x: Tensor, hook, rows=rows, seq=seq, pos=pos, src=src) -> Tensor:
                    x[rows, pos] = src[seq, pos].to(x.dtype)
                    return x

                hooks.append((models.mlp_out_hook(layer), patch_mlp))
    return hooks


def _check(
    components: Sequence[str], directions: Sequence[str], window: int
) -> tuple[tuple[Component, ...], tuple[Direction, ...]]:
    components, directions = tuple(components), tuple(directions)
    for c in components:
        if c not in COMPONENTS:
            raise ValueError(f"unknown component {c!r}: expected one of {COMPONENTS}")
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"unknown direction {d!r}: expected one of {DIRECTIONS}")
    if not components or not directions:
        raise ValueError("need at least one component and one direction")
    if len(set(components)) != len(components) or len(set(directions)) != len(directions):
        raise ValueError("repeated components or directions")
    if window < 1:
        raise ValueError(f"window must be >= 1 layer, got {window}")
    return components, directions


def sweep(
    vanilla: HookedTransformer | models.Variant,
    edited: HookedTransformer | models.Variant,
    prompt: str,
    target_true: str,
    target_new: str,
    *,
    directions: Sequence[str] = DIRECTIONS,
    components: Sequence[str] = COMPONENTS,
    window: int = 1,
    positions: Sequence[int] | None = None,
    full_answer: bool = False,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_cells: int | None = None,
    progress: bool = False,
) -> tuple[Patching, ...]:
    """Patch every (component, layer window, position) cell, batched; one result per direction.

    Args:
        vanilla, edited: models or :class:`~attndrift.models.Variant` (e.g. an edit as hooks);
            same architecture and tokenizer.
        prompt: the prompt (its last token predicts the answer).
        target_true, target_new: o_true and o_new.
        directions: ``"restore"`` and/or ``"contaminate"``.
        components: ``"attn"`` and/or ``"mlp"``.
        window: layers per cell, ``[l, l + window)`` clipped at the last layer.
        positions: prompt positions to patch (default: every position, BOS included).
        full_answer: also score every answer token (``p_true_full``, ``p_new_full``).
        max_batch_tokens: padded tokens per patched forward pass (cells are chunked to fit).
        max_cells: optional cap on cells per forward pass (``1`` = one forward per cell).
        progress: show a progress bar over chunks.
    """
    components, directions = _check(components, directions, window)
    if max_batch_tokens < 1 or (max_cells is not None and max_cells < 1):
        raise ValueError(
            f"max_batch_tokens and max_cells must be positive, got {max_batch_tokens}, {max_cells}"
        )
    v, e = models.as_variant(vanilla), models.as_variant(edited)
    capture.check_compatible(v.model, e.model)
    model = v.model
    base = _base(model, prompt, target_true, target_new, full_answer)
    n_prompt = base.last + 1
    positions = tuple(range(n_prompt)) if positions is None else tuple(int(p) for p in positions)
    bad = [p for p in positions if not 0 <= p < n_prompt]
    if bad or not positions:
        raise ValueError(f"position out of range: {bad or 'none'} (the prompt has {n_prompt})")
    clean = {"vanilla": _clean(v, base), "edited": _clean(e, base)}
    tokens = tuple(encoding.token_strings(model, base.tokens[0, :n_prompt].tolist()))
    n_layers = model.cfg.n_layers
    # cells in layer-major order, so that each chunk starts as late as its first cell allows
    order = torch.cartesian_prod(
        torch.arange(n_layers), torch.arange(len(components)), torch.arange(len(positions))
    )  # [cell, 3]: layer (window start), component, index into positions
    cells = order[:, [1, 0, 2]].clone()  # component, layer, position
    cells[:, 2] = torch.tensor(positions)[order[:, 2]]
    cells = cells.to(base.tokens.device)
    per_pass = max(1, max_batch_tokens // (base.rows * base.tokens.shape[1]))
    per_pass = min(per_pass, max_cells or per_pass)
    out = []
    for direction in directions:
        target, t_name, s_name = (
            (e, "edited", "vanilla") if direction == "restore" else (v, "vanilla", "edited")
        )
        t_clean, s_clean = clean[t_name], clean[s_name]
        parts = []
        chunks = range(0, len(cells), per_pass)
        for i in tqdm(chunks, desc=f"patching ({direction})", disable=not progress):
            chunk = cells[i : i + per_pass]
            hooks = [
                *target.hooks,
                *_patch_hooks(model, chunk, components, window, s_clean.capture, base.rows),
            ]
            # nothing changes before the chunk's first patched layer: start from the clean
            # target run's residual stream there
            start = int(chunk[:, 1].min())
            with torch.no_grad():
                if start == 0:
                    hidden = models.final_hidden(
                        target.model, base.tokens.repeat(len(chunk), 1), hooks
                    )
                else:
                    resid = t_clean.resid_post[:, start - 1].repeat(len(chunk), 1, 1)
                    hidden = models.final_hidden_from(target.model, resid, start, hooks)
                parts.append(_scores(target.model, hidden, base))

        def grid_of(name: str, parts=parts) -> Tensor:
            flat = torch.cat([getattr(p, name) for p in parts]).cpu()
            return (
                flat.reshape(n_layers, len(components), len(positions)).transpose(0, 1).contiguous()
            )

        p_true = grid_of("p_true")
        t_out, s_out = t_clean.scores.outcome(), s_clean.scores.outcome()
        span = s_out.p_true - t_out.p_true
        out.append(
            Patching(
                direction=direction,
                components=components,
                window=window,
                positions=positions,
                prompt=prompt,
                target_true=target_true,
                target_new=target_new,
                tokens=tokens,
                target=t_out,
                source=s_out,
                p_true=p_true,
                p_new=grid_of("p_new"),
                logit_diff=grid_of("logit_diff"),
                recovery=(p_true - t_out.p_true) / span if abs(span) > 1e-12 else p_true * math.nan,
                gain_pct=100 * (p_true - t_out.p_true) / t_out.p_true
                if t_out.p_true > 0
                else p_true * math.nan,
                p_true_full=grid_of("p_true_full"),
                p_new_full=grid_of("p_new_full"),
            )
        )
    return tuple(out)


def patch(
    vanilla: HookedTransformer | models.Variant,
    edited: HookedTransformer | models.Variant,
    prompt: str,
    target_true: str,
    target_new: str,
    *,
    direction: str,
    **kwargs,
) -> Patching:
    """:func:`sweep` of one direction (``kwargs``: the other options of :func:`sweep`)."""
    (result,) = sweep(
        vanilla, edited, prompt, target_true, target_new, directions=(direction,), **kwargs
    )
    return result


def restore(vanilla, edited, prompt: str, target_true: str, target_new: str, **kwargs) -> Patching:
    """Run the edited model with the vanilla model's values patched in (paper Fig. 5)."""
    return patch(vanilla, edited, prompt, target_true, target_new, direction="restore", **kwargs)


def contaminate(
    vanilla, edited, prompt: str, target_true: str, target_new: str, **kwargs
) -> Patching:
    """Run the vanilla model with the edited model's values patched in (paper Fig. 3)."""
    return patch(
        vanilla, edited, prompt, target_true, target_new, direction="contaminate", **kwargs
    )
