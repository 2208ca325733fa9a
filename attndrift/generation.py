"""Generation: seeded top-k sampling of continuations.

Used for ROME's context templates (SPEC §3.1) and for fluency (SPEC §5, FL). Deterministic
given ``seed`` (a private ``torch.Generator``; the global RNG is untouched). Rows are
right-padded and grow independently, so prompts of different lengths share a batch.
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
) -> list[str]:
    """Sample ``max_new_tokens`` tokens after each prompt; returns prompt + continuation.

    Args:
        model: the model (current weights; ``fwd_hooks`` are applied on every step).
        prompts: the prompts; repeat a prompt to draw several samples of it.
        max_new_tokens: tokens to add to every prompt.
        seed: sampling seed.
        top_k: sample among the ``top_k`` most likely tokens (ROME uses 5).
    """
    if max_new_tokens < 1 or top_k < 1:
        raise ValueError("max_new_tokens and top_k must be positive")
    if not prompts:
        return []
    device = models.model_device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    enc = [encoding.encode_prompt(model, p).ids for p in prompts]
    n_bos = len(models.bos_prefix(model))
    lengths = torch.tensor([len(e) for e in enc], device=device)
    tokens = encoding.pad(model, enc)
    tokens = torch.cat(
        [tokens, torch.full((len(enc), max_new_tokens), models.pad_id(model), device=device)], 1
    )
    rows = torch.arange(len(enc), device=device)
    for _ in range(max_new_tokens):
        width = int(lengths.max())
        hidden = models.final_hidden(model, tokens[:, :width], fwd_hooks=list(fwd_hooks))
        logits = models.unembed(model, hidden[rows, lengths - 1]).float()
        top = logits.topk(top_k, dim=-1)
        choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)[:, 0]
        tokens[rows, lengths] = top.indices[rows, choice]
        lengths = lengths + 1
    return [
        model.tokenizer.decode(tokens[i, n_bos : int(lengths[i])].tolist())
        for i in range(len(enc))
    ]
