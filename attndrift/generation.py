"""Generation: seeded top-k sampling of continuations.

Used for ROME's context templates (METHOD §3.1), the offline covariance corpus, and fluency
(METHOD §5, FL). Deterministic given ``seed`` (a private ``torch.Generator``; the global RNG is
untouched). Prompts are grouped by token length and each group is decoded with a key-value
cache, so no padding is ever needed.
"""

from collections.abc import Sequence

import torch
from transformer_lens import HookedTransformer

from attndrift import encoding, models


@torch.no_grad()
def sample(
    model: HookedTransformer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    seed: int = 0,
    top_k: int = 5,
    fwd_hooks: Sequence = (),
    max_batch: int = 64,
) -> list[str]:
    """Sample ``max_new_tokens`` tokens after each prompt; returns prompt + continuation.

    Args:
        model: the model (current weights; ``fwd_hooks`` are applied on every step).
        prompts: the prompts; repeat a prompt to draw several samples of it.
        max_new_tokens: tokens to add to every prompt.
        seed: sampling seed.
        top_k: sample among the ``top_k`` most likely tokens (ROME uses 5; 1 = greedy).
        max_batch: rows decoded together.
    """
    if max_new_tokens < 1 or top_k < 1:
        raise ValueError("max_new_tokens and top_k must be positive")
    device = models.model_device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    enc = [encoding.encode_prompt(model, p).ids for p in prompts]
    n_bos = len(models.bos_prefix(model))
    out: list[str] = [""] * len(enc)
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(enc):
        groups.setdefault(len(e), []).append(i)
    for length in sorted(groups):
        members = groups[length]
        for start in range(0, len(members), max_batch):
            rows = members[start : start + max_batch]
            tokens = torch.tensor([enc[i] for i in rows], device=device)
            done = _decode(model, tokens, max_new_tokens, top_k, gen, list(fwd_hooks))
            for i, ids in zip(rows, done.tolist(), strict=True):
                out[i] = model.tokenizer.decode(ids[n_bos:])
    return out


def _decode(model, tokens, max_new_tokens, top_k, gen, fwd_hooks) -> torch.Tensor:
    cache = models.kv_cache(model, tokens.shape[0])
    step = tokens
    for _ in range(max_new_tokens):
        hidden = models.final_hidden(model, step, fwd_hooks=fwd_hooks, past_kv_cache=cache)
        logits = models.unembed(model, hidden[:, -1]).float()
        top = logits.topk(top_k, dim=-1)
        choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)
        step = top.indices.gather(1, choice)  # [batch, 1]
        tokens = torch.cat([tokens, step], 1)
    return tokens
