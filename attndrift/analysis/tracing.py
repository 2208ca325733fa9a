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

Batching (the cell engine of :mod:`attndrift.analysis.cells`, shared with patching; this module
keeps its components, noise and scores): restoring layers l onwards at position p cannot change
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
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import capture, encoding, models
from attndrift.analysis import cells
from attndrift.analysis.cells import Cell, Component

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
        """The cell of largest indirect effect (a :class:`~attndrift.analysis.cells.Cell`: layer,
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


def _prob(
    model: HookedTransformer, hidden: Float[Tensor, "row d_model"], target: int
) -> Float[Tensor, " row"]:
    return models.unembed(model, hidden).float().log_softmax(-1)[:, target].exp()


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
    # the clean run and the corrupted runs as rows of one forward pass (row 0 clean, row
    # 1 + s under draw s, as in ROME), so that positions the noise cannot reach have
    # bit-identical values in every row
    noise_rows = torch.cat([torch.zeros_like(z[:1]), z])
    hidden, both = cells.record(
        variant, tokens.repeat(len(noise_rows), 1), parts, [_corrupt_hook(noise_rows, first)]
    )
    with torch.no_grad():
        p_all = _prob(m, hidden[:, -1], target_id)
    clean = both.rows(torch.tensor([0], device=tokens.device), cache=False)  # never continued
    corrupted = both.rows(torch.arange(1, len(noise_rows), device=tokens.device))
    grid = cells.grid(wins, n_layers, positions, centred=True)
    # a cell before the subject (no noise reaches it), or whose clean values equal every
    # corrupted one at each restored layer, changes nothing
    unchanged = (grid[:, cells.POSITION] < first) | cells.unchanged(
        grid, parts, corrupted, clean, n_layers
    )
    p_corrupted = float(p_all[1:].mean())
    p = {"p": torch.full((len(grid),), p_corrupted)}
    last = enc.last

    def score(hidden: Tensor, offset: int, n: int) -> dict[str, Tensor]:
        """Mean P(o) over the noise draws of each cell of one pass."""
        return {"p": _prob(m, hidden[:, last - offset], target_id).reshape(n, samples).mean(1)}

    cells.sweep(
        variant, corrupted, grid[~unchanged], p, rows=samples, seq_len=n_prompt,
        hooks=lambda chunk, offset: cells.patch_hooks(
            chunk, parts, clean, torch.zeros(samples, dtype=torch.long), offset
        ),
        score=score, budget=max_batch_tokens, progress=progress, desc="causal tracing",
    )  # fmt: skip
    p = p["p"]
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
        p_clean=float(p_all[0]),
        p_corrupted=p_corrupted,
        p_restored=p,
        indirect=p - p_corrupted,
        skipped=int(unchanged.sum()),
    )


def frame(results: Tracing | Sequence[Tracing]) -> pd.DataFrame:
    """One tidy table of one or several traces (a ``prompt`` column tells them apart)."""
    results = [results] if isinstance(results, Tracing) else list(results)
    return pd.concat([r.frame().assign(prompt=r.prompt) for r in results], ignore_index=True)
