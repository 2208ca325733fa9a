"""Forward helpers: partial forward passes, key-value caches, tokens, and the unembedding.

attndrift never computes the full ``[batch, pos, d_vocab]`` logits when it needs a few rows:
:func:`final_hidden` stops before the unembedding and :func:`unembed` maps chosen rows only.
Runs that share a prefix reuse its keys and values (:func:`prefix_cache`,
:func:`final_hidden_and_cache`, :func:`cache_rows`, :func:`cache_prefix`); positions (rotary
or learned) follow the attention mask, so left padding keeps every token at its unpadded
position.

BOS convention: attndrift never lets a tokenizer add special tokens. A BOS token is
prepended by attndrift itself iff ``model.cfg.default_prepend_bos`` is true (see
:func:`bos_prefix`; :func:`attndrift.models.load_model` sets it per model family).
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import interrupts


@contextmanager
def hooked(model: HookedTransformer, fwd_hooks: Sequence = ()) -> Iterator[HookedTransformer]:
    """Forward hooks ``(hook name, function)`` on ``model`` for the duration of the block.

    Like TransformerLens' ``model.hooks(...)``, but attndrift removes its own hooks in its own
    cleanup, which an interrupt cannot cut short (:func:`attndrift.interrupts.on_exit`): the
    model is hook-free, with ``context_level`` back, even after Ctrl-C during the cleanup.
    """
    level = model.context_level + 1  # the hooks of this block, and only these, carry it
    points = []  # (hook point, its torch-level hooks before this block)

    def remove() -> None:
        for point, before in points:
            point.remove_hooks("fwd", including_permanent=False, level=level)
            # a hook torch registered but TransformerLens did not list yet (an interrupt
            # inside add_hook): removed too
            listed = {h.hook.id for h in point.fwd_hooks}
            for key in [k for k in point._forward_hooks if k not in before | listed]:
                for table in (point._forward_hooks, point._forward_hooks_with_kwargs,
                              point._forward_hooks_always_called):  # fmt: skip
                    table.pop(key, None)
        # min: also right when run late (an interrupt in contextlib's exit, the generator
        # closed after an enclosing block already counted down)
        model.context_level = min(model.context_level, level - 1)

    with interrupts.on_exit(remove):
        model.context_level = level
        for name, fn in fwd_hooks:
            if name not in model.hook_dict:
                raise ValueError(f"no hook point named {name!r} in {model.cfg.model_name}")
            point = model.hook_dict[name]
            points.append((point, set(point._forward_hooks)))
            point.add_hook(fn, dir="fwd", level=level)
        yield model


def final_hidden(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    fwd_hooks: list | tuple = (),
    past_kv_cache=None,
    attention_mask: Int[Tensor, "batch key_pos"] | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """Normalised final residual stream (input of the unembedding), under optional hooks.

    With ``past_kv_cache`` (see :func:`kv_cache`), ``tokens`` continue the cached rows.
    ``attention_mask`` (1 = real token; without a cache ``[batch, pos]``, with a frozen cache
    ``[batch, cached + pos]``) marks padding; positions follow it.
    """
    kwargs = {}
    if past_kv_cache is not None or attention_mask is not None:
        # explicit mask: TransformerLens would otherwise mask tokens equal to the pad id
        mask = attention_mask if attention_mask is not None else torch.ones_like(tokens)
        if past_kv_cache is not None and past_kv_cache.frozen:
            # TransformerLens appends the new positions' mask to the cache's own
            mask = mask[:, -tokens.shape[1] :]
        kwargs = {"past_kv_cache": past_kv_cache, "attention_mask": mask}
    with hooked(model, fwd_hooks):
        # all blocks, then the final norm *with* its gain (ln_final.hook_normalized is pre-gain)
        resid = model(tokens, stop_at_layer=model.cfg.n_layers, **kwargs)
        return model.ln_final(resid) if model.cfg.normalization_type is not None else resid


def final_hidden_from(
    model: HookedTransformer,
    resid_pre: Float[Tensor, "batch pos d_model"],
    layer: int,
    fwd_hooks: list | tuple = (),
    past_kv_cache=None,
    attention_mask: Int[Tensor, "batch key_pos"] | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """Like :func:`final_hidden`, but starting at block ``layer`` from its input residual.

    Skips the blocks before ``layer`` when only later activations change (e.g. in an
    optimisation loop that perturbs layer ``layer``). With ``past_kv_cache`` (a frozen
    :func:`prefix_cache`), the rows continue the cached prefix; ``attention_mask`` then covers
    the cached and the new positions (``[batch, prefix + pos]``, 0 = padding).
    """
    kwargs = {}
    if past_kv_cache is not None:
        if attention_mask is None:
            raise ValueError("a prefix cache needs the attention mask of prefix + new positions")
        kwargs = {"past_kv_cache": past_kv_cache, "attention_mask": attention_mask}
    with hooked(model, fwd_hooks):
        resid = model(resid_pre, start_at_layer=layer, stop_at_layer=model.cfg.n_layers, **kwargs)
        return model.ln_final(resid) if model.cfg.normalization_type is not None else resid


def prefix_cache(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch prefix"],
    attention_mask: Int[Tensor, "batch prefix"],
    fwd_hooks: list | tuple = (),
):
    """A frozen key-value cache of left-padded prefixes (every layer), for reuse by many runs.

    ``tokens`` are left-padded (``attention_mask`` 0 on the padding), so that every row's
    prefix ends at the same column and the continuations that use the cache line up. Positions
    (rotary or learned) follow the mask, so each real token sits at its unpadded position.
    ``fwd_hooks`` (e.g. an edit as a hook) act on the prefix's pass.
    """
    cache = kv_cache(model, tokens.shape[0])
    if tokens.shape[1] > 0:
        with torch.no_grad(), hooked(model, fwd_hooks):
            model(tokens, attention_mask=attention_mask, past_kv_cache=cache, return_type=None)
    else:
        cache.previous_attention_mask = attention_mask.to(cache.previous_attention_mask)
    cache.freeze()
    return cache


def resid_after_prefix(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    cache,
    attention_mask: Int[Tensor, "batch pos"],
    stop_at_layer: int,
    fwd_hooks: list | tuple = (),
) -> Float[Tensor, "batch pos d_model"]:
    """Residual stream before block ``stop_at_layer`` of ``tokens`` continuing a frozen
    :func:`prefix_cache` (``attention_mask``: the new positions only)."""
    with torch.no_grad(), hooked(model, fwd_hooks):
        return model(
            tokens, attention_mask=attention_mask, past_kv_cache=cache, stop_at_layer=stop_at_layer
        )


def final_hidden_and_cache(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    fwd_hooks: list | tuple = (),
    attention_mask: Int[Tensor, "batch pos"] | None = None,
):
    """:func:`final_hidden` of ``tokens``, and the key-value cache of every layer it filled
    (reusable with :func:`cache_prefix` / :func:`cache_rows` by runs that continue ``tokens``).
    """
    cache = kv_cache(model, tokens.shape[0])
    hidden = final_hidden(model, tokens, fwd_hooks, cache, attention_mask)
    return hidden, cache


def cache_rows(cache, rows: Int[Tensor, " n"], last: int | None = None):
    """A frozen cache whose row ``i`` is row ``rows[i]`` of ``cache``: every position, or its
    ``last`` positions (of a left-padded cache: each row's last tokens, less padding)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    start = 0 if last is None else cache.previous_attention_mask.shape[1] - last
    entries = [
        TransformerLensKeyValueCacheEntry(
            e.past_keys[rows.to(e.past_keys.device), start:],
            e.past_values[rows.to(e.past_values.device), start:],
            frozen=True,
        )
        for e in cache.entries
    ]
    mask = cache.previous_attention_mask[rows.to(cache.previous_attention_mask.device), start:]
    return TransformerLensKeyValueCache(entries, mask, frozen=True)


def cache_prefix(cache, stop: int, repeats: int):
    """A frozen cache of the first ``stop`` positions of ``cache``, its rows tiled ``repeats``
    times (row ``i * batch + r`` continues row ``r``)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [
        TransformerLensKeyValueCacheEntry(
            e.past_keys[:, :stop].repeat(repeats, 1, 1, 1),
            e.past_values[:, :stop].repeat(repeats, 1, 1, 1),
            frozen=True,
        )
        for e in cache.entries
    ]
    mask = cache.previous_attention_mask[:, :stop].repeat(repeats, 1)
    return TransformerLensKeyValueCache(entries, mask, frozen=True)


def kv_cache(model: HookedTransformer, batch: int):
    """An empty TransformerLens key-value cache for ``batch`` rows (incremental decoding)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)


def unembed(
    model: HookedTransformer, hidden: Float[Tensor, "*rows d_model"]
) -> Float[Tensor, "*rows d_vocab"]:
    """Logits from final hidden states (TransformerLens' unembed, for chosen rows only)."""
    w = model.unembed.W_U
    return hidden.to(w.device) @ w + model.unembed.b_U


def bos_prefix(model: HookedTransformer) -> list[int]:
    """``[bos_id]`` if the model expects a BOS token (``cfg.default_prepend_bos``), else ``[]``."""
    if not model.cfg.default_prepend_bos:
        return []
    bos = model.tokenizer.bos_token_id
    if bos is None:
        raise ValueError("model expects a BOS token but its tokenizer has none")
    return [bos]


def encode_text(model: HookedTransformer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (attndrift adds BOS itself)."""
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def pad_id(model: HookedTransformer) -> int:
    pad = model.tokenizer.pad_token_id
    return pad if pad is not None else model.tokenizer.eos_token_id
