"""The cell engine of patching, causal tracing and attention knockout.

Each of the three analyses changes a run of one prompt in *cells*: a cell acts on layers
``[start, stop)`` at prompt positions ``position`` onwards, and is scored at the end of the
run. What they share, and this module holds:

* **components** (:class:`Component`): an activation with a hook per layer and the axis of its
  token positions, whose value at a cell's position a patch replaces;
* **the cell grid** (:func:`grid`): every (component, layer, position) cell, with its layers
  (a window starting at the layer, or centred on it) and its slot in the result;
* **recorded runs** (:func:`record`, :class:`Run`): a forward pass that keeps every
  component's value at every layer, the residual stream entering every block and the
  key-value cache;
* **the unchanged-cell skip** (:func:`unchanged`): a cell whose new values equal the run's
  own at every layer it patches changes nothing and is not run;
* **chunked passes** (:func:`passes`): cells grouped into tiles of nearby layers and positions
  and cut into forward passes under a token budget;
* **patch hooks** (:func:`patch_hooks`): the hooks that write each cell's values into its own
  rows of a pass;
* **the resumed forward** (:func:`sweep`): a cell changes nothing below its first layer and
  before its first position, so each pass starts at its cells' first layer from the run's
  residual stream, runs only the positions from its cells' first position on, and reads the
  earlier positions' keys and values from the run's key-value cache (or, for attention
  knockout, runs the whole prompt: the numbers of one forward pass per window).

Row ``i · rows + r`` of a pass is cell ``i``'s copy of row ``r`` of the run it continues
(patching: the prompt and, with full answers, the o_new row; tracing: the noise draws;
knockout: the prompt alone). The analyses keep only what is theirs: their components, how a
cell changes its rows (the patch source, or knockout's blocked scores) and their scores.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from attndrift import capture, models

#: a tile of cells spans this many first layers and positions
TILE_LAYERS, TILE_POSITIONS = 4, 3
#: the columns of a cell: its component, its layers [start, stop), its position, its slot
COMPONENT, START, STOP, POSITION, SLOT = range(5)


class Cell(NamedTuple):
    """One cell of a sweep and its value (``best`` of a patching sweep or a causal trace)."""

    layer: int  # the window's first layer
    position: int  # the prompt position
    value: float  # patching: P(o_true) (restore) or P(o_new) (contaminate); tracing: the effect


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


@dataclass(frozen=True)
class Run:
    """A recorded run: every component's value at every layer (a patch source, or what a
    patch is compared with), the residual stream entering every block, and the key-value
    cache of every layer (what cells continue)."""

    values: dict[str, Tensor]  # hook name -> [row, ...] the full activation
    resid_pre: Float[Tensor, "row layer pos d_model"]
    cache: object

    def rows(self, rows: Int[Tensor, " n"], cache: bool = True) -> "Run":
        """The run of some of its rows (values, residuals and, unless ``cache`` is false: a
        run that is a patch source only, the key-value cache)."""
        return Run(
            {k: v[rows] for k, v in self.values.items()},
            self.resid_pre[rows],
            models.cache_rows(self.cache, rows) if cache else None,
        )


@torch.no_grad()
def record(
    variant: models.Variant,
    tokens: Int[Tensor, "row pos"],
    components: Sequence[Component],
    hooks: Sequence = (),
) -> tuple[Float[Tensor, "row pos d_model"], Run]:
    """Run ``tokens`` (under the variant's hooks, then ``hooks``) keeping what cells need;
    the final hidden states and the :class:`Run`."""
    model = variant.model
    layers = range(model.cfg.n_layers)
    names = [c.hook(layer) for c in components for layer in layers]
    names += [models.resid_pre_hook(layer) for layer in layers]
    rec = capture.Recorder(dict.fromkeys(names))
    hidden, cache = models.final_hidden_and_cache(
        model, tokens, [*variant.hooks, *hooks, *rec.hooks]
    )
    values = rec.values()
    resid = torch.stack([values[models.resid_pre_hook(layer)] for layer in layers], dim=1)
    return hidden, Run(values, resid, cache)


def grid(
    windows: Sequence[int], n_layers: int, positions: Sequence[int], *, centred: bool = False
) -> Int[Tensor, "cell 5"]:
    """Every cell, in result order (component, then layer, then position): ``[component,
    start, stop, position, slot]``. Component ``c``'s cell at layer ``l`` spans
    ``windows[c]`` layers from ``l`` (``centred``: centred on ``l``, as ROME's tracing),
    clipped to the model."""
    cells = torch.cartesian_prod(
        torch.arange(len(windows)), torch.arange(n_layers), torch.tensor(positions)
    )
    w = torch.tensor(windows)[cells[:, 0]]
    first = cells[:, 1] - (w // 2 if centred else 0)
    start, stop = first.clamp_min(0), (first + w).clamp_max(n_layers)
    slot = torch.arange(len(cells))
    return torch.stack([cells[:, 0], start, stop, cells[:, 2], slot], dim=1)


def unchanged(
    cells: Int[Tensor, "cell 5"],
    components: Sequence[Component],
    run: Run,
    new: Run,
    n_layers: int,
) -> Bool[Tensor, " cell"]:
    """[cell] whether the cell changes nothing: ``new``'s values (broadcast over ``run``'s
    rows) equal ``run``'s at every layer and the position it patches."""
    same = []
    for component in components:
        # [layer, pos]: the two runs' values agree exactly at this (layer, position)
        rows = []
        for layer in range(n_layers):
            a = run.values[component.hook(layer)].movedim(component.axis, 1)
            b = new.values[component.hook(layer)].movedim(component.axis, 1)
            rows.append((a == b).flatten(2).all(-1).all(0))
        same.append(torch.stack(rows).cpu())
    return torch.tensor(
        [bool(same[c][a:b, p].all()) for c, a, b, p, _ in cells.tolist()], dtype=torch.bool
    )


def passes(
    cells: Int[Tensor, "cell 5"],
    rows: int,
    seq_len: int,
    budget: int,
    max_cells: int | None = None,
) -> list[Tensor]:
    """Cells grouped into tiles of nearby first layers and positions (each tile's cells share
    a late first layer and a late first position), each tile cut into passes of at most
    ``budget`` tokens (rows x positions run) and ``max_cells`` cells."""
    key = (cells[:, START] // TILE_LAYERS) * 100_000 + cells[:, POSITION] // TILE_POSITIONS
    out = []
    for k in torch.unique(key):
        tile = cells[key == k]
        width = seq_len - int(tile[:, POSITION].min())
        per_pass = max(1, budget // (rows * width))
        per_pass = min(per_pass, max_cells or per_pass)
        out += list(tile.split(per_pass))
    return out


def patch_hooks(
    chunk: Int[Tensor, "cell 5"],
    components: Sequence[Component],
    source: Run,
    source_rows: Int[Tensor, " rows"],
    offset: int,
) -> list:
    """Hooks that write the source's values into every cell of a pass (that runs positions
    ``offset`` onwards): cell ``i``'s rows ``i · rows + r`` get, in each layer of the cell,
    component ``c``'s value of source row ``source_rows[r]`` at the cell's position."""
    device = source.resid_pre.device
    chunk, source_rows = chunk.to(device), source_rows.to(device)
    per_cell = len(source_rows)
    r = torch.arange(per_cell, device=device)
    hooks = []
    for c, component in enumerate(components):
        for layer in range(int(chunk[:, START].min()), int(chunk[:, STOP].max())):
            inside = (chunk[:, START] <= layer) & (layer < chunk[:, STOP])
            mine = (chunk[:, COMPONENT] == c) & inside
            idx = mine.nonzero()[:, 0]
            if len(idx) == 0:
                continue
            rows = (idx[:, None] * per_cell + r).flatten()  # batch rows to patch
            seq = source_rows.repeat(len(idx))  # their source rows
            pos = chunk[idx, POSITION].repeat_interleave(per_cell)  # prompt positions
            src = source.values[component.hook(layer)].movedim(component.axis, 1)[seq, pos]

            def patch(x, hook, c=component, rows=rows, pos=pos - offset, src=src) -> Tensor:
                return c.patch(x, rows, pos, src)

            hooks.append((component.hook(layer), patch))
    return hooks


@torch.no_grad()
def sweep(
    variant: models.Variant,
    run: Run | None,
    cells: Int[Tensor, "cell 5"],
    out: dict[str, Tensor],
    *,
    rows: int,
    seq_len: int,
    hooks: Callable[[Tensor, int], list],
    score: Callable[[Tensor, int, int], dict[str, Tensor]],
    budget: int,
    max_cells: int | None = None,
    tokens: Int[Tensor, "rows pos"] | None = None,
    progress: bool = False,
    desc: str = "cells",
) -> None:
    """Run every cell, continuing ``run`` (of the variant's model, ``rows`` rows of
    ``seq_len`` positions) in chunked passes (:func:`passes`), and write its scores into its
    slot of ``out`` (name -> [slots]).

    Without a ``run`` (``None``), each pass runs ``tokens`` whole from the embedding, one copy
    per cell, the cells in their order cut into passes of at most ``budget`` tokens (attention
    knockout: the numbers of one forward pass per cell).

    ``hooks(chunk, offset)``: the hooks that make each cell of a pass (running positions
    ``offset`` onwards) what it is; ``score(hidden, offset, n_cells)``: the scores of a
    pass's final hidden states ``[n_cells · rows, positions from offset, d_model]``, one per
    cell (name -> [n_cells])."""
    if run is None:
        if tokens is None:
            raise ValueError("a sweep without a run to continue needs the tokens to run")
        chunks = list(cells.split(max(1, budget // (rows * seq_len))))
    else:
        chunks = passes(cells, rows, seq_len, budget, max_cells)
    for chunk in tqdm(chunks, desc=desc, disable=not progress):
        n = len(chunk)
        if run is None:
            made = hooks(chunk, 0)
            batch = tokens.repeat(n, 1)
            hidden = models.final_hidden(
                variant.model, batch, [*variant.hooks, *made], attention_mask=torch.ones_like(batch)
            )
            offset = 0
        else:
            start, offset = int(chunk[:, START].min()), int(chunk[:, POSITION].min())
            made = hooks(chunk, offset)
            resid = run.resid_pre[:, start, offset:].repeat(n, 1, 1)
            cache = models.cache_prefix(run.cache, offset, n)
            mask = torch.ones(resid.shape[0], seq_len, dtype=torch.long, device=resid.device)
            hidden = models.final_hidden_from(
                variant.model, resid, start, [*variant.hooks, *made], cache, mask
            )
        for k, v in score(hidden, offset, n).items():
            out[k][chunk[:, SLOT].to(out[k].device)] = v.to(out[k].device)
