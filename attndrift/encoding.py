"""Encoding: prompts (and answers) to padded token batches with exact positions.

Conventions used everywhere in attndrift:

* ``tokens = bos + encode(prompt) + encode(" " + answer)``. ``bos`` is ``[]`` or
  ``[bos_id]`` as :func:`attndrift.models.bos_prefix` says; the tokenizer never adds special
  tokens. Prompt and answer are encoded separately, so the answer span is exactly the answer's
  tokens whatever the padding (a trailing space of the prompt is dropped first).
* Batches are right-padded: the real tokens of every row sit at positions ``0..length-1``
  exactly as in an unpadded run, and causal attention never lets them see padding.
* ``last`` is the position of the last prompt token (the one that predicts the answer's first
  token); the subject span ``[subject_first, subject_last]`` covers every token that overlaps
  the subject's characters (last occurrence of the subject in the prompt).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import models


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt's token ids (BOS included) and its subject's token span (inclusive)."""

    ids: tuple[int, ...]
    subject_first: int  # -1 when no subject was given
    subject_last: int

    @property
    def last(self) -> int:
        return len(self.ids) - 1


def encode_prompt(
    model: HookedTransformer, prompt: str, subject: str | None = None
) -> EncodedPrompt:
    """Tokenise ``prompt`` (with BOS as the model expects) and locate ``subject`` in it.

    Raises:
        ValueError: the prompt is empty, does not contain ``subject``, or is longer than the
            model's context (``n_ctx`` tokens).
    """
    prompt = prompt.rstrip()
    if not prompt:
        raise ValueError("empty prompt")
    bos = models.bos_prefix(model)
    if subject is None:
        return _fits(model, EncodedPrompt(tuple(bos + models.encode_text(model, prompt)), -1, -1))
    start = prompt.rfind(subject)
    if not subject or start < 0:
        raise ValueError(f"subject {subject!r} not found in prompt {prompt!r}")
    end = start + len(subject)
    enc = model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    overlapping = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    if not overlapping:  # cannot happen with offset-reporting tokenizers; guard anyway
        raise ValueError(f"no token of {prompt!r} overlaps subject {subject!r}")
    n = len(bos)
    return _fits(model, EncodedPrompt(tuple(bos + ids), overlapping[0] + n, overlapping[-1] + n))


def _fits(model: HookedTransformer, e: EncodedPrompt) -> EncodedPrompt:
    """``e``, or a ValueError if it is longer than the model's context."""
    if len(e.ids) > model.cfg.n_ctx:
        text = model.tokenizer.decode(list(e.ids[:8]))
        raise ValueError(
            f"a prompt of {len(e.ids)} tokens is longer than the model's context "
            f"({model.cfg.n_ctx} tokens): {text!r}…"
        )
    return e


def encode_answer(model: HookedTransformer, answer: str) -> tuple[int, ...]:
    """Token ids of ``" " + answer`` (no special tokens)."""
    answer = answer.strip()
    if not answer:
        raise ValueError("empty answer")
    return tuple(models.encode_text(model, " " + answer))


@dataclass(frozen=True)
class Batch:
    """Right-padded token batch with per-row positions (all tensors on the model's device)."""

    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]  # real tokens per row
    last: Int[Tensor, " batch"]  # last prompt token
    subject_first: Int[Tensor, " batch"]
    subject_last: Int[Tensor, " batch"]

    def __len__(self) -> int:
        return self.tokens.shape[0]


def pad(model: HookedTransformer, rows: Sequence[Sequence[int]]) -> Int[Tensor, "batch pos"]:
    """Right-pad token id rows into a ``[batch, pos]`` tensor on the model's device."""
    if not rows:
        raise ValueError("nothing to pad: empty batch")
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), models.pad_id(model), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(models.model_device(model))


def encode_batch(
    model: HookedTransformer,
    prompts: Sequence[str],
    subjects: Sequence[str | None] | None = None,
) -> Batch:
    """Encode prompts (no answers) into a right-padded :class:`Batch`."""
    subjects = subjects if subjects is not None else [None] * len(prompts)
    if len(subjects) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(subjects)} subjects")
    enc = [encode_prompt(model, p, s) for p, s in zip(prompts, subjects, strict=True)]
    device = models.model_device(model)

    def col(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return Batch(
        tokens=pad(model, [e.ids for e in enc]),
        lengths=col([len(e.ids) for e in enc]),
        last=col([e.last for e in enc]),
        subject_first=col([e.subject_first for e in enc]),
        subject_last=col([e.subject_last for e in enc]),
    )


def token_strings(model: HookedTransformer, ids: Sequence[int]) -> list[str]:
    """Readable string of each token (for axis labels)."""
    return [model.tokenizer.decode([i]) for i in ids]
