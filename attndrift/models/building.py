"""Building a :class:`~transformer_lens.HookedTransformer` from a config, a tokenizer and a
state dict, unprocessed; the weight layout TransformerLens' kernels read; the weight
fingerprint. A leaf of :mod:`attndrift.models`: the loaders (:mod:`~attndrift.models.loading`,
:mod:`~attndrift.models.embedded`, :mod:`~attndrift.models.tiny`) all build through it."""

import hashlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerBase


def fingerprint(model: HookedTransformer) -> str:
    """Hash of the model's name and of every byte of every parameter (sha256, ~0.5 s for 135M).

    Identifies the weights that produced a cached statistic, an edit or a result line: any
    changed element changes it. The values are hashed in their logical order, whatever the
    layout. The hash is remembered on the model until a parameter changes (PyTorch counts
    every in-place change of a tensor; a replaced tensor has a new address).
    """
    params = list(model.named_parameters())
    state = (model.cfg.model_name, *((p.data_ptr(), p._version, p.dtype) for _, p in params))
    cached = model.__dict__.get("_attndrift_fingerprint")
    if cached is not None and cached[0] == state:
        return cached[1]
    h = hashlib.sha256(model.cfg.model_name.encode())
    with torch.no_grad():
        for name, p in params:
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(memoryview(p.detach().cpu().contiguous().view(torch.uint8).numpy()))
    value = h.hexdigest()[:16]
    model.__dict__["_attndrift_fingerprint"] = (state, value)
    return value


@contextmanager
def quiet_tl_deprecation() -> Iterator[None]:
    """Silence TransformerLens 3.9's deprecation notice (attndrift pins < 4 on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer.* deprecated")
        yield


def build(
    cfg: HookedTransformerConfig, tokenizer: PreTrainedTokenizerBase, state: dict[str, Tensor]
) -> HookedTransformer:
    """An unprocessed model of ``cfg`` with the weights ``state``, in TransformerLens' fast
    layout. ``cfg`` alone says where and in which dtype: ``cfg.device`` (and ``cfg.n_devices``)
    and ``cfg.dtype``; ``state``'s tensors are copied into parameters of that dtype."""
    with quiet_tl_deprecation():
        model = HookedTransformer(
            cfg, tokenizer, move_to_device=False, default_padding_side="right"
        )
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.move_model_modules_to_device()  # follows cfg.device (and n_devices)
    return fast_layout(model)


def _store_permuted(p: torch.nn.Parameter, order: tuple[int, ...]) -> None:
    """Keep ``p``'s values but lay its memory out in axis order ``order``."""
    inverse = tuple(order.index(i) for i in range(len(order)))
    p.data = p.data.permute(*order).contiguous().permute(*inverse)


def fast_layout(model: HookedTransformer) -> HookedTransformer:
    """Store weights in the memory layout TransformerLens' kernels read, in place.

    TransformerLens 3.9 computes ``W.T.contiguous()`` (gated MLP, unembed) or
    ``rearrange(W, ...)`` + reshape (attention Q and O) on every forward, which copies each
    weight matrix each time: 70 % of a SmolLM2 forward on CPU. Storing those parameters
    transposed makes the copies no-ops. Values, shapes and results are unchanged (bit-identical
    logits, tested); only strides differ. Returns ``model``.
    """
    for block in model.blocks:
        if model.cfg.gated_mlp:
            for name in ("W_in", "W_gate", "W_out"):
                _store_permuted(getattr(block.mlp, name), (1, 0))
        _store_permuted(block.attn.W_Q, (0, 2, 1))
        if model.cfg.n_key_value_heads is None:
            _store_permuted(block.attn.W_K, (0, 2, 1))
            _store_permuted(block.attn.W_V, (0, 2, 1))
        _store_permuted(block.attn.W_O, (2, 0, 1))
    _store_permuted(model.unembed.W_U, (1, 0))
    return model
