"""TransformerLens names and handles: hook points, the edited weight, devices, variants.

Every hook name attndrift uses is spelled here, once. Axes follow TransformerLens:
``[batch, pos, d_model]`` residual activations, ``[batch, head_index, query_pos, key_pos]``
attention patterns.
"""

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer


def pattern_hook(layer: int) -> str:
    """Attention probabilities, ``[batch, head_index, query_pos, key_pos]``."""
    return f"blocks.{layer}.attn.hook_pattern"


def attn_scores_hook(layer: int) -> str:
    """Attention scores before the softmax (causal mask applied),
    ``[batch, head_index, query_pos, key_pos]``."""
    return f"blocks.{layer}.attn.hook_attn_scores"


def embed_hook() -> str:
    """Token embeddings (without learned positions), ``[batch, pos, d_model]``."""
    return "hook_embed"


def mlp_key_hook(layer: int) -> str:
    """Input of ``W_out`` (ROME's key k), ``[batch, pos, d_mlp]``."""
    return f"blocks.{layer}.mlp.hook_post"


def mlp_out_hook(layer: int) -> str:
    """Output of the MLP (ROME's value), ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.hook_mlp_out"


def resid_pre_hook(layer: int) -> str:
    """Residual stream entering block ``layer``, ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.hook_resid_pre"


def attn_out_hook(layer: int) -> str:
    """Attention output of ``layer`` (all heads, ``W_O`` applied), ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.hook_attn_out"


def resid_post_hook(layer: int) -> str:
    """Residual stream after block ``layer``, ``[batch, pos, d_model]`` (MEMIT's z)."""
    return f"blocks.{layer}.hook_resid_post"


def in_block(hook: str, layer: int) -> bool:
    """Whether the hook point ``hook`` lies inside block ``layer``."""
    return hook.startswith(f"blocks.{layer}.")


def mlp_out_weight(model: HookedTransformer, layer: int) -> torch.nn.Parameter:
    """``W_out`` of the MLP of ``layer``, shape ``[d_mlp, d_model]`` (out = key @ W_out + b_out)."""
    check_layer(model, layer)
    return model.blocks[layer].mlp.W_out


def check_layer(model: HookedTransformer, layer: int) -> None:
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer {layer} is out of range for a {model.cfg.n_layers}-layer model")


def model_device(model: HookedTransformer) -> torch.device:
    """Device of the embedding (first block on multi-device models)."""
    return model.embed.W_E.device


@dataclass(frozen=True)
class Variant:
    """A model plus forward hooks that change it, e.g. an edit applied as a hook.

    Lets one copy of the weights serve as both the vanilla and the edited model:
    ``Variant(model)`` is vanilla, ``Variant(model, edit.hooks(model))`` is edited.
    """

    model: HookedTransformer
    hooks: tuple = ()
    name: str = ""


def as_variant(model: "HookedTransformer | Variant") -> Variant:
    return model if isinstance(model, Variant) else Variant(model)
