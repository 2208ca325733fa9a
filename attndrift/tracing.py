"""Causal tracing: which states of a clean run carry a fact (ROME, Meng et al. 2022, Fig. 1).

Three kinds of run of one prompt whose last token predicts the fact's object o (``target``):

* **clean**: the model as it is; P(o) = ``p_clean`` (first token of o).
* **corrupted**: Gaussian noise is added to the token embeddings of the subject's tokens
  (``hook_embed``: the token embeddings only; with learned positions, as in ROME, the
  position embeddings stay clean). The noise has standard deviation ``noise · σ``, where σ is
  the standard deviation of the model's token embeddings over a corpus
  (:func:`embedding_scale`; ROME: ``noise = 3``, σ over the subjects of its known facts). The
  model no longer knows which subject it reads and P(o) drops. Each of ``samples`` noise draws
  is one corrupted run; ``p_corrupted`` is the mean of their P(o) (ROME averages 10 draws).
* **corrupted with one cell restored**: a corrupted run in which one *cell*, a component at
  (layer window, token position), gets back its clean value; P(o) averaged over the same
  noise draws.

The **indirect effect** of a cell is P(restored) − P(corrupted): how much of the fact the
clean state at that cell carries on its own, past the corrupted subject embedding. ROME found
two sites: the MLPs of middle layers at the subject's last token (where it writes its edits),
and the upper layers at the last token.

Components (:data:`COMPONENTS`): ``"hidden"`` = the residual stream leaving block l (ROME's
hidden state h^(l), ``hook_resid_post``), ``"mlp"`` = the MLP output, ``"attn_out"`` = the
attention output. Windows as in ROME: the cell at layer l restores the ``w`` layers
``[l − ⌊w/2⌋, l − ⌊w/2⌋ + w)`` *centred* on l, clipped to the model (:func:`span`), with
w = 1 for the hidden state and w = 10 for the MLP and attention outputs (one MLP layer alone
restores little; a window shows where the MLPs that matter sit).

Noise: drawn once per call from a private ``torch.Generator`` seeded with ``seed``
(:func:`subject_noise`; the global random state is untouched). Draw s is the same tensor in
every run of the call, so every P(restored) − P(corrupted) compares runs under the same noise,
and the same seed gives the same numbers.

Batching (as :mod:`attndrift.patching`): restoring layers l onwards at position p cannot change
anything below l or before p, so each forward pass starts at its cells' first layer from the
corrupted runs' residual stream, runs only the positions from its cells' first position on,
and reads the earlier positions' keys and values from the corrupted runs' key-value cache. A
pass holds many cells times every noise draw (row ``i · samples + s`` = cell i under draw s),
cut to fit a token budget. A cell whose clean value equals every corrupted value at every
restored layer (a position before the subject) changes nothing and is not run: its result is
``p_corrupted``. The numbers are those of one full forward pass per cell (tested to 1e-5).

Axes: ``component`` (:attr:`Tracing.components` order), ``layer`` (window centre, every
layer), ``pos`` (:attr:`Tracing.positions`).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from attndrift import capture, encoding, models
from attndrift.patching import Cell, Component

COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("hidden", models.resid_post_hook, 1),
        Component("mlp", models.mlp_out_hook, 1),
        Component("attn_out", models.attn_out_hook, 1),
    )
}
#: ROME's windows (layers per cell): the hidden state alone, MLP and attention outputs by 10
ROME_WINDOWS: dict[str, int] = {"hidden": 1, "mlp": 10, "attn_out": 10}
#: ROME's noise (in units of σ) and number of noise draws
ROME_NOISE, ROME_SAMPLES = 3.0, 10
DEFAULT_BATCH_TOKENS = 4096
#: a tile of cells spans this many first layers and positions
_TILE_LAYERS, _TILE_POSITIONS = 4, 3


@dataclass(frozen=True)
class Tracing:
    """One prompt's causal trace: a ``[component, layer, pos]`` tensor per measure (CPU).

    Attributes:
        components, windows: the traced components and their windows (layers per cell).
        positions: the traced prompt positions (axis ``pos``).
        prompt, subject, target: the prompt, its corrupted subject and the object o.
        tokens: token string of every prompt position.
        subject_positions: the positions of the subject's tokens (the corrupted ones).
        sigma: σ, the embedding scale; noise: the noise std in units of σ.
        samples, seed: the number of noise draws and their seed.
        p_clean, p_corrupted: P(o) of the clean run and of the corrupted runs (mean).
        p_restored: P(o) with the cell restored (mean over the draws).
        indirect: the indirect effect, ``p_restored − p_corrupted``.
        skipped: cells not run because restoring them changes nothing.
    """

    components: tuple[str, ...]
    windows: tuple[int, ...]
    positions: tuple[int, ...]
    prompt: str
    subject: str
    target: str
    tokens: tuple[str, ...]
    subject_positions: tuple[int, ...]
    sigma: float
    noise: float
    samples: int
    seed: int
    p_clean: float
    p_corrupted: float
    p_restored: Float[Tensor, "component layer pos"]
    indirect: Float[Tensor, "component layer pos"]
    skipped: int = 0

    def __repr__(self) -> str:
        _, n_l, n_p = self.indirect.shape
        return (
            f"Tracing({'/'.join(self.components)} × {n_l} layers × {n_p} positions of "
            f"{self.prompt!r}; P({self.target!r}) clean {self.p_clean:.4f}, corrupted "
            f"{self.p_corrupted:.4f}, largest indirect effect {float(self.indirect.max()):.4f})"
        )

    def best(self, component: str, position: int | None = None) -> Cell:
        """The cell of largest indirect effect (a :class:`~attndrift.patching.Cell`: layer,
        position, value = the effect), over every traced position or at one ``position``."""
        if component not in self.components:
            raise ValueError(f"component {component!r} was not traced ({self.components})")
        grid = self.indirect[self.components.index(component)]
        columns = list(range(len(self.positions)))
        if position is not None:
            if position not in self.positions:
                raise ValueError(f"position {position} was not traced ({self.positions})")
            columns = [self.positions.index(position)]
        layer, j = divmod(int(grid[:, columns].argmax()), len(columns))
        return Cell(layer, self.positions[columns[j]], float(grid[layer, columns[j]]))

    def frame(self) -> pd.DataFrame:
        """Tidy table: one row per cell, with the layers it restores."""
        n_c, n_l, n_p = self.indirect.shape
        comp = np.repeat(np.arange(n_c), n_l * n_p)
        layer = np.tile(np.repeat(np.arange(n_l), n_p), n_c)
        pos = np.tile(np.asarray(self.positions), n_c * n_l)
        windows = np.asarray(self.windows)[comp]
        spans = [span(int(lay), int(w), n_l) for lay, w in zip(layer, windows, strict=True)]
        return pd.DataFrame(
            {
                "component": np.asarray(self.components, dtype=object)[comp],
                "window": windows,
                "layer": layer,
                "first_layer": [s.start for s in spans],
                "last_layer": [s.stop - 1 for s in spans],
                "position": pos,
                "token": np.asarray(self.tokens, dtype=object)[pos],
                "subject": np.isin(pos, self.subject_positions),
                "p_restored": self.p_restored.flatten().numpy(),
                "indirect": self.indirect.flatten().numpy(),
                "p_clean": self.p_clean,
                "p_corrupted": self.p_corrupted,
            }
        )


def span(layer: int, window: int, n_layers: int) -> range:
    """The layers a cell at ``layer`` restores: ``window`` layers centred on it (ROME)."""
    first = layer - window // 2
    return range(max(0, first), min(n_layers, first + window))


@torch.no_grad()
def embedding_scale(model: HookedTransformer, texts: Sequence[str]) -> float:
    """σ: the standard deviation of the token embeddings (``hook_embed``) over ``texts``.

    Every element of every token embedding of the corpus counts once (no BOS, no padding;
    ROME measures it over the subjects of its known facts). The noise of
    :func:`trace` is a multiple of σ, so that it is large compared with the embeddings
    whatever their scale.
    """
    ids = [i for text in texts for i in models.encode_text(model, text)]
    if len(ids) < 2:
        raise ValueError(f"need at least 2 corpus tokens to measure σ, got {len(ids)}")
    name = models.embed_hook()
    tokens = torch.tensor(ids, device=models.model_device(model))
    parts = [
        capture.record(model, chunk[None], {name: None}, stop_at_layer=0)[name][0].double()
        for chunk in tokens.split(model.cfg.n_ctx)
    ]
    return float(torch.cat(parts).std())


def subject_noise(
    model: HookedTransformer, n_tokens: int, *, std: int | float, samples: int, seed: int
) -> Float[Tensor, "sample subject d_model"]:
    """The noise of every corrupted run: ``samples`` draws of ``[n_tokens, d_model]`` values,
    i.i.d. N(0, std²), from a private generator seeded with ``seed`` (same seed, same noise)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, n_tokens, model.cfg.d_model, generator=generator)
    return (z * std).to(models.model_device(model), model.cfg.dtype)


def _corrupt_hook(noise: Float[Tensor, "sample subject d_model"], first: int) -> tuple:
    """Adds draw ``s`` of ``noise`` to row ``s``'s token embeddings from position ``first``."""

    def corrupt(x: Tensor, hook) -> Tensor:
        x = x.clone()
        x[:, first : first + noise.shape[1]] += noise.to(x.dtype)
        return x

    return models.embed_hook(), corrupt


@dataclass(frozen=True)
class _Run:
    """A run (one row per noise draw): P(o), every component's value at every layer, the
    residual stream entering every block, and the key-value cache of every layer (``None``
    for the clean run, which is never continued)."""

    p: Float[Tensor, " row"]
    values: dict[str, Tensor]  # hook name -> [row, pos, d_model]
    resid_pre: Float[Tensor, "row layer pos d_model"]
    cache: object


def _prob(
    model: HookedTransformer, hidden: Float[Tensor, "row d_model"], target: int
) -> Float[Tensor, " row"]:
    return models.unembed(model, hidden).float().log_softmax(-1)[:, target].exp()


@torch.no_grad()
def _runs(
    variant: models.Variant,
    tokens: Int[Tensor, "one pos"],
    noise: Float[Tensor, "sample subject d_model"],
    first: int,
    parts,
    target: int,
) -> tuple[_Run, _Run]:
    """The clean run and the corrupted runs, as rows of one forward pass (row 0 clean, row
    ``1 + s`` under draw s, as in ROME), so that positions the noise cannot reach have
    bit-identical values in every row."""
    model = variant.model
    layers = range(model.cfg.n_layers)
    names = [c.hook(layer) for c in parts for layer in layers]
    names += [models.resid_pre_hook(layer) for layer in layers]
    rec = capture.Recorder(dict.fromkeys(names))
    noise = torch.cat([torch.zeros_like(noise[:1]), noise])
    hooks = [*variant.hooks, _corrupt_hook(noise, first), *rec.hooks]
    hidden, cache = models.final_hidden_and_cache(model, tokens.repeat(len(noise), 1), hooks)
    values = rec.values()
    resid = torch.stack([values[models.resid_pre_hook(layer)] for layer in layers], dim=1)
    p = _prob(model, hidden[:, -1], target)
    rows = torch.arange(1, len(noise), device=tokens.device)
    clean = _Run(p[:1], {k: v[:1] for k, v in values.items()}, resid[:1], None)
    corrupted = _Run(p[1:], {k: v[1:] for k, v in values.items()}, resid[1:],
                     models.cache_rows(cache, rows))  # fmt: skip
    return clean, corrupted


def _cells(windows: Sequence[int], n_layers: int, positions: Sequence[int]) -> Tensor:
    """Every cell in result order: ``[component, first layer, stop layer, position, index]``."""
    grid = torch.cartesian_prod(
        torch.arange(len(windows)), torch.arange(n_layers), torch.tensor(positions)
    )
    w = torch.tensor(windows)[grid[:, 0]]
    first = grid[:, 1] - w // 2
    start, stop = first.clamp_min(0), (first + w).clamp_max(n_layers)
    return torch.stack([grid[:, 0], start, stop, grid[:, 2], torch.arange(len(grid))], dim=1)


def _unchanged(
    cells: Tensor, parts, clean: _Run, corrupted: _Run, n_layers: int, first: int
) -> Tensor:
    """[cell] whether restoring it changes nothing: its position lies before the subject (no
    noise reaches it) or its clean value equals every corrupted one at each restored layer."""
    same = [
        torch.stack(
            [
                (corrupted.values[c.hook(layer)] == clean.values[c.hook(layer)]).all(-1).all(0)
                for layer in range(n_layers)
            ]
        ).cpu()  # [layer, pos]
        for c in parts
    ]
    return torch.tensor(
        [p < first or bool(same[c][a:b, p].all()) for c, a, b, p, _ in cells.tolist()]
    )


def _passes(cells: Tensor, samples: int, n_prompt: int, budget: int) -> list[Tensor]:
    """Cells grouped by tiles of nearby first layers and positions, each tile cut into passes
    of at most ``budget`` tokens (rows x positions run)."""
    key = (cells[:, 1] // _TILE_LAYERS) * 100_000 + cells[:, 3] // _TILE_POSITIONS
    passes = []
    for k in torch.unique(key):
        tile = cells[key == k]
        width = n_prompt - int(tile[:, 3].min())
        passes += list(tile.split(max(1, budget // (samples * width))))
    return passes


def _restore_hooks(chunk: Tensor, parts, clean: _Run, samples: int, offset: int) -> list:
    """Hooks that put back the clean value of every cell of a pass (cell i: rows
    ``i · samples + s``) at its position, in each layer of its window."""
    device = clean.resid_pre.device
    chunk = chunk.to(device)
    draws = torch.arange(samples, device=device)
    hooks = []
    for c, part in enumerate(parts):
        for layer in range(int(chunk[:, 1].min()), int(chunk[:, 2].max())):
            mine = (chunk[:, 0] == c) & (chunk[:, 1] <= layer) & (layer < chunk[:, 2])
            idx = mine.nonzero()[:, 0]
            if len(idx) == 0:
                continue
            rows = (idx[:, None] * samples + draws).flatten()
            pos = chunk[idx, 3].repeat_interleave(samples)
            src = clean.values[part.hook(layer)][0, pos]

            def restore(x, hook, part=part, rows=rows, pos=pos - offset, src=src) -> Tensor:
                return part.patch(x, rows, pos, src)

            hooks.append((part.hook(layer), restore))
    return hooks


@torch.no_grad()
def _restored(variant, chunk: Tensor, parts, clean, corrupted, target: int, last: int) -> Tensor:
    """Mean P(o) over the noise draws of each cell of one pass."""
    model, n, samples = variant.model, len(chunk), corrupted.p.shape[0]
    start, offset = int(chunk[:, 1].min()), int(chunk[:, 3].min())
    hooks = _restore_hooks(chunk, parts, clean, samples, offset)
    resid = corrupted.resid_pre[:, start, offset:].repeat(n, 1, 1)
    cache = models.cache_prefix(corrupted.cache, offset, n)
    mask = torch.ones(resid.shape[0], last + 1, dtype=torch.long, device=resid.device)
    hidden = models.final_hidden_from(model, resid, start, [*variant.hooks, *hooks], cache, mask)
    return _prob(model, hidden[:, last - offset], target).reshape(n, samples).mean(1).cpu()


def _windows(names: tuple[str, ...], windows: int | Mapping[str, int] | None) -> tuple[int, ...]:
    if windows is None or isinstance(windows, Mapping):
        given = dict(windows or {})
        unknown = set(given) - set(names)
        if unknown:
            raise ValueError(f"windows for components not traced: {sorted(unknown)}")
        out = tuple(given.get(c, ROME_WINDOWS[c]) for c in names)
    else:
        out = (windows,) * len(names)
    for w in out:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"a window must be an integer >= 1 layer, got {w!r}")
    return out


def _check(components, samples: int, noise, sigma) -> tuple[Component, ...]:
    names = tuple(components)
    for c in names:
        if c not in COMPONENTS:
            raise ValueError(f"unknown component {c!r}: expected one of {tuple(COMPONENTS)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"need distinct components, got {names}")
    if samples < 1:
        raise ValueError(f"need at least one noise sample, got {samples}")
    if noise < 0 or (sigma is not None and not sigma > 0):
        raise ValueError(f"noise must be >= 0 and sigma > 0, got {noise}, {sigma}")
    return tuple(COMPONENTS[c] for c in names)


def trace(
    model: HookedTransformer | models.Variant,
    prompt: str,
    subject: str,
    target: str,
    *,
    sigma: int | float | None = None,
    noise: int | float = ROME_NOISE,
    samples: int = ROME_SAMPLES,
    seed: int = 0,
    components: Sequence[str] = ("hidden", "mlp", "attn_out"),
    windows: int | Mapping[str, int] | None = None,
    positions: Sequence[int] | None = None,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = False,
) -> Tracing:
    """Causal tracing of one fact: the indirect effect of every (component, layer, position).

    Args:
        model: a model or a :class:`~attndrift.models.Variant` (e.g. an edited model).
        prompt: the prompt (its last token predicts the object).
        subject: the subject, whose tokens (last occurrence in ``prompt``) are corrupted.
        target: the object o whose first-token probability is measured.
        sigma: the embedding scale σ (:func:`embedding_scale` of a corpus; default: measured
            on ``prompt`` alone, a rough estimate).
        noise: the noise std in units of σ (ROME: 3).
        samples: noise draws per run, averaged (ROME: 10).
        seed: seed of the noise draws.
        components: names in :data:`COMPONENTS`.
        windows: layers per cell: one number for every component, or per component (default:
            :data:`ROME_WINDOWS`); windows are centred on the cell's layer (:func:`span`).
        positions: prompt positions to trace (default: every position).
        max_batch_tokens: tokens per forward pass (rows x positions run).
        progress: show a progress bar over passes.
    """
    parts = _check(components, samples, noise, sigma)
    wins = _windows(tuple(c.name for c in parts), windows)
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    variant = models.as_variant(model)
    m = variant.model
    enc = encoding.encode_prompt(m, prompt, subject)
    n_prompt, n_layers = enc.last + 1, m.cfg.n_layers
    positions = tuple(range(n_prompt)) if positions is None else tuple(int(p) for p in positions)
    if not positions or any(not 0 <= p < n_prompt for p in positions):
        raise ValueError(f"positions must lie in [0, {n_prompt}), got {positions}")
    sigma = embedding_scale(m, [prompt]) if sigma is None else float(sigma)
    first, n_subject = enc.subject_first, enc.subject_last - enc.subject_first + 1
    z = subject_noise(m, n_subject, std=noise * sigma, samples=samples, seed=seed)
    tokens = torch.tensor([enc.ids], device=models.model_device(m))
    target_id = encoding.encode_answer(m, target)[0]
    clean, corrupted = _runs(variant, tokens, z, first, parts, target_id)
    cells = _cells(wins, n_layers, positions)
    unchanged = _unchanged(cells, parts, clean, corrupted, n_layers, first)
    p_corrupted = float(corrupted.p.mean())
    p = torch.full((len(cells),), p_corrupted)
    passes = _passes(cells[~unchanged], samples, n_prompt, max_batch_tokens)
    for chunk in tqdm(passes, desc="causal tracing", disable=not progress):
        p[chunk[:, 4]] = _restored(variant, chunk, parts, clean, corrupted, target_id, enc.last)
    p = p.reshape(len(parts), n_layers, len(positions))
    return Tracing(
        components=tuple(c.name for c in parts),
        windows=wins,
        positions=positions,
        prompt=prompt,
        subject=subject,
        target=target,
        tokens=tuple(encoding.token_strings(m, list(enc.ids))),
        subject_positions=tuple(range(first, first + n_subject)),
        sigma=sigma,
        noise=float(noise),
        samples=samples,
        seed=seed,
        p_clean=float(clean.p[0]),
        p_corrupted=p_corrupted,
        p_restored=p,
        indirect=p - p_corrupted,
        skipped=int(unchanged.sum()),
    )


def frame(results: Tracing | Sequence[Tracing]) -> pd.DataFrame:
    """One tidy table of one or several traces (a ``prompt`` column tells them apart)."""
    results = [results] if isinstance(results, Tracing) else list(results)
    return pd.concat([r.frame().assign(prompt=r.prompt) for r in results], ignore_index=True)
