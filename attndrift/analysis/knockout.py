"""Attention knockout: does the last token need to *see* the subject, and in which layers?

Geva et al. 2023 ("Dissecting recall of factual associations in auto-regressive language
models", section 5) cut the information flow from key positions K to query positions Q in layer l by
setting the attention scores of every head at every pair (q ∈ Q, k ∈ K) to −∞ before the
softmax (``hook_attn_scores``, after the causal mask). The softmax then gives those keys
weight 0 and renormalises each query's attention over the keys it may still see; nothing else
changes (other queries, MLPs, the residual stream). A query that may see no key at all gets an
all-zero attention row (TransformerLens turns the NaN row into zeros).

One layer alone rarely matters (other layers can read the subject instead), so a *window* of
``window`` consecutive layers ``[l, l + window)``, clipped at the last layer, is blocked at
once, for every window start l (Geva et al. use 9 layers on the 48 of GPT-2 XL, centred on
l; here the window starts at l). Each blocked run is scored at the last prompt position:
P(o_true) and P(o_new) (first answer tokens), and their change relative to the unblocked run
of the same model, ``Δ = P(blocked) − P(unblocked)`` (the table also has Geva et al.'s
relative change in %).

Run on the vanilla and on the edited model, with the default Q = the last token and K = every
subject token: if the edited model's failure (a high P(o_new) on a prompt that only mentions
the edited subject, e.g. a distracting-neighbour prompt) disappears when the last token cannot
see the subject in the drifting (upper-middle) layers, while the vanilla model barely cares,
attention drift carries the failure: attention reads the edited subject where it should not.

Batched on the cell engine of patching and tracing (:mod:`attndrift.analysis.cells`): a window is a
cell whose hooks block the scores in its layers (:func:`_block_hooks`), one row per window,
many windows per forward pass under a token budget. Each window runs the whole prompt from
the embedding (the engine's from-scratch passes), so the numbers are those of one forward pass
per window (tested to 1e-5).

Axes: ``model`` (:attr:`Knockout.models` order), ``layer`` (window start, every layer).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import capture, encoding, models
from attndrift.analysis import cells

#: layers per blocked window (Geva et al.'s window on GPT-2 XL)
DEFAULT_WINDOW = 9
DEFAULT_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class Knockout:
    """Blocked-window probabilities of one prompt under several models (CPU tensors).

    Attributes:
        models: the models' names (axis ``model``), e.g. ``("vanilla", "edited")``.
        window: layers per blocked window; axis ``layer`` is the window start.
        queries, keys: the blocked query and key positions (every pair, every head).
        prompt, target_true, target_new: the prompt and the two answers.
        tokens: token string of every prompt position.
        base_true, base_new: P(o_true), P(o_new) of each model's unblocked run.
        p_true, p_new: P(o_true), P(o_new) with the window blocked.
    """

    models: tuple[str, ...]
    window: int
    queries: tuple[int, ...]
    keys: tuple[int, ...]
    prompt: str
    target_true: str
    target_new: str
    tokens: tuple[str, ...]
    base_true: Float[Tensor, " model"]
    base_new: Float[Tensor, " model"]
    p_true: Float[Tensor, "model layer"]
    p_new: Float[Tensor, "model layer"]

    def __repr__(self) -> str:
        return (
            f"Knockout({'/'.join(self.models)}, windows of {self.window} layers × "
            f"{self.p_true.shape[1]} starts on {self.prompt!r}; o_true {self.target_true!r}, "
            f"o_new {self.target_new!r})"
        )

    @property
    def delta_true(self) -> Float[Tensor, "model layer"]:
        """P(o_true) blocked − unblocked."""
        return self.p_true - self.base_true[:, None]

    @property
    def delta_new(self) -> Float[Tensor, "model layer"]:
        """P(o_new) blocked − unblocked."""
        return self.p_new - self.base_new[:, None]

    def removed(self, model: str = "edited") -> Float[Tensor, " layer"]:
        """The fraction of a model's unblocked P(o_new) that blocking each window removes."""
        if model not in self.models:
            raise ValueError(f"unknown model {model!r}: expected one of {self.models}")
        i = self.models.index(model)
        return -self.delta_new[i] / self.base_new[i].clamp_min(1e-12)

    def frame(self) -> pd.DataFrame:
        """Tidy table: one row per (model, window start)."""
        n_m, n_l = self.p_true.shape
        layer = np.tile(np.arange(n_l), n_m)
        table = {
            "model": np.repeat(np.asarray(self.models, dtype=object), n_l),
            "window": self.window,
            "layer": layer,
            "last_layer": np.minimum(layer + self.window, n_l) - 1,
        }
        for name in ("true", "new"):
            p, base = getattr(self, f"p_{name}"), getattr(self, f"base_{name}")
            base = base[:, None].expand(n_m, n_l)
            table[f"p_{name}"] = p.flatten().numpy()
            table[f"base_{name}"] = base.flatten().numpy()
            table[f"delta_{name}"] = (p - base).flatten().numpy()
            table[f"relative_{name}_pct"] = (100 * (p - base) / base).flatten().numpy()
        return pd.DataFrame(table)


def pairs(
    n_positions: int, queries: Sequence[int], keys: Sequence[int]
) -> Bool[Tensor, "query_pos key_pos"]:
    """``[query, key]`` True at every blocked pair (every query with every key)."""
    out = torch.zeros(n_positions, n_positions, dtype=torch.bool)
    if queries and keys:
        out[torch.tensor(queries)[:, None], torch.tensor(keys)] = True
    return out


def _block_hooks(chunk: Tensor, blocked: Tensor) -> list:
    """Knockout's cells: hooks that set the blocked scores to −∞ in every layer of each
    cell's window (cell i: row i of a pass)."""
    hooks = []
    for layer in range(int(chunk[:, cells.START].min()), int(chunk[:, cells.STOP].max())):
        active = (chunk[:, cells.START] <= layer) & (layer < chunk[:, cells.STOP])  # [row]
        if not active.any():
            continue
        mask = active[:, None, None, None] & blocked[None, None]  # [row, 1, query, key]

        def block(scores: Tensor, hook, mask=mask) -> Tensor:
            return scores.masked_fill(mask, float("-inf"))

        hooks.append((models.attn_scores_hook(layer), block))
    return hooks


@torch.no_grad()
def probabilities(
    model: HookedTransformer | models.Variant,
    tokens: Int[Tensor, "one pos"],
    answers: tuple[int, int],
    starts: Sequence[int] | None = None,
    window: int = DEFAULT_WINDOW,
    blocked: Bool[Tensor, "query_pos key_pos"] | None = None,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> Float[Tensor, "row 2"]:
    """P(answers) at the last position: one row per window start (``None``: one unblocked
    row), with ``blocked`` pairs knocked out in layers ``[start, start + window)``."""
    v = models.as_variant(model)
    device, n = tokens.device, tokens.shape[1]
    n_layers = v.model.cfg.n_layers
    # one cell per window start (the unblocked row: a cell of no layers)
    windows = [(0, 0)] if starts is None else [(s, min(s + window, n_layers)) for s in starts]
    grid = torch.tensor([[0, a, b, 0, i] for i, (a, b) in enumerate(windows)], device=device)
    blocked = torch.zeros(n, n, dtype=torch.bool) if blocked is None else blocked
    blocked = blocked.to(device)
    ids = torch.tensor(answers, device=device)
    out = {"p": torch.zeros(len(windows), 2)}

    def score(hidden: Tensor, offset: int, n_cells: int) -> dict[str, Tensor]:
        logits = models.unembed(v.model, hidden[:, -1]).float()
        return {"p": logits.log_softmax(-1)[:, ids].exp().cpu()}

    cells.sweep(
        v, None, grid, out, rows=1, seq_len=n, tokens=tokens,
        hooks=lambda chunk, offset: _block_hooks(chunk, blocked), score=score,
        budget=max_batch_tokens,
    )  # fmt: skip
    return out["p"]


def _positions(name: str, given: Sequence[int] | None, default: tuple[int, ...], n: int):
    out = default if given is None else tuple(int(p) for p in given)
    bad = [p for p in out if not 0 <= p < n]
    if bad:
        raise ValueError(f"{name} positions out of range: {bad} (the prompt has {n})")
    return out


def run(
    vanilla: HookedTransformer | models.Variant,
    edited: HookedTransformer | models.Variant,
    prompt: str,
    subject: str | None,
    target_true: str,
    target_new: str,
    *,
    window: int = DEFAULT_WINDOW,
    queries: Sequence[int] | None = None,
    keys: Sequence[int] | None = None,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> Knockout:
    """Knock out query → key attention in every window of layers, vanilla and edited.

    Args:
        vanilla, edited: models or :class:`~attndrift.models.Variant` (e.g. an edit as hooks);
            same architecture and tokenizer.
        prompt: the prompt (its last token predicts the answer).
        subject: the subject (last occurrence in ``prompt``); the default keys are its tokens.
        target_true, target_new: o_true and o_new.
        window: layers per blocked window, ``[l, l + window)`` clipped at the last layer.
        queries: query positions (default: the last prompt token).
        keys: key positions (default: every subject token); empty = block nothing.
        max_batch_tokens: tokens per forward pass.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 layer, got {window!r}")
    v, e = models.as_variant(vanilla), models.as_variant(edited)
    capture.check_compatible(v.model, e.model)
    model = v.model
    enc = encoding.encode_prompt(model, prompt, subject)
    n = enc.last + 1
    if keys is None and subject is None:
        raise ValueError("give the subject or the key positions")
    subject_keys = tuple(range(enc.subject_first, enc.subject_last + 1))
    queries = _positions("query", queries, (enc.last,), n)
    keys = _positions("key", keys, subject_keys, n)
    tokens = torch.tensor([enc.ids], device=models.model_device(model))
    answers = (encoding.encode_answer(model, target_true)[0],
               encoding.encode_answer(model, target_new)[0])  # fmt: skip
    blocked, starts = pairs(n, queries, keys), range(model.cfg.n_layers)
    base = [probabilities(m, tokens, answers, max_batch_tokens=max_batch_tokens) for m in (v, e)]
    p = [
        probabilities(m, tokens, answers, starts, window, blocked, max_batch_tokens) for m in (v, e)
    ]
    return Knockout(
        models=("vanilla", "edited"),
        window=window,
        queries=queries,
        keys=keys,
        prompt=prompt,
        target_true=target_true,
        target_new=target_new,
        tokens=tuple(encoding.token_strings(model, list(enc.ids))),
        base_true=torch.stack([b[0, 0] for b in base]),
        base_new=torch.stack([b[0, 1] for b in base]),
        p_true=torch.stack([x[:, 0] for x in p]),
        p_new=torch.stack([x[:, 1] for x in p]),
    )
