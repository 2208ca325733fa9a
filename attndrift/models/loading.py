"""Loading a :class:`~transformer_lens.HookedTransformer`, unprocessed, from any source.

All sources are loaded *without* TransformerLens weight processing (no ``fold_ln``, no
centering), so that an edit of ``blocks[L].mlp.W_out`` means exactly what it means in the
original checkpoint:

* ``"smollm2-135m"``: the embedded default (:mod:`attndrift.models.embedded`);
* any official TransformerLens model name (``"gpt2-xl"``, ``"EleutherAI/gpt-j-6B"``, …), for
  users with the Hugging Face hub;
* a local Hugging Face checkpoint directory of a supported architecture;
* ``"tiny-gpt2"`` / ``"tiny-gptj"`` / ``"tiny-llama"``: random test models
  (:mod:`attndrift.models.tiny`).

BOS: GPT-2 and GPT-J are loaded with the convention of ROME's and the SADR paper's code, *no*
BOS token before the prompt (``prepend_bos=True`` restores TransformerLens' default); Llama
models and SmolLM2 follow their tokenizers (Llama: BOS; SmolLM2: none).
"""

import logging
import time
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

# the cache helpers and the builder, here too under their former home's names
from attndrift._io import (  # noqa: F401
    CACHE_FILE_MODE,
    CACHE_FOLDER_MODE,
    PERMISSION_HINT,
    atomic_write,
    cache_dir,
    cache_folder,
    is_regular,
    read_cache_bytes,
)
from attndrift.models.building import (  # noqa: F401
    build,
    fast_layout,
    fingerprint,
    quiet_tl_deprecation,
)

log = logging.getLogger(__name__)

#: architectures whose published editing code feeds prompts without a BOS token
NO_BOS_ARCHITECTURES = ("GPT2LMHeadModel", "GPTJForCausalLM")


def default_device() -> str:
    """CUDA when available, else CPU (TransformerLens' choice)."""
    from transformer_lens.utilities.devices import get_device

    return str(get_device())


def _checked_device(device: str | torch.device | None) -> str:
    """``device`` (default: :func:`default_device`), refused with a clear error if absent."""
    if device is None:
        return default_device()
    name = str(device)
    try:
        parsed = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, mps …)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    return name


def load_model(
    name: str = "smollm2-135m",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    n_devices: int = 1,
    prepend_bos: bool | None = None,
) -> HookedTransformer:
    """Load a model as an unprocessed :class:`HookedTransformer` in eval mode.

    Args:
        name: ``"smollm2-135m"`` (embedded, offline), an official TransformerLens model name,
            a local Hugging Face checkpoint directory, or ``"tiny-gpt2"`` / ``"tiny-gptj"`` /
            ``"tiny-llama"`` (random test models, ``tiny_model`` with seed 0).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``…; default: CUDA if available, else CPU.
        dtype: parameter dtype (float32 is the default and what tests use).
        n_devices: split the blocks over this many GPUs (TransformerLens' placement, official
            models only); attndrift moves its tensors to each block's device.
        prepend_bos: put a BOS token before every prompt. Default: no for GPT-2 and GPT-J
            (the convention of ROME's and the SADR paper's code, so that results compare with
            theirs), the tokenizer's own choice otherwise (Llama: yes, SmolLM2: no).
    """
    from attndrift.models.embedded import EMBEDDED_MODEL, load_embedded_model
    from attndrift.models.tiny import TINY_NAMES, tiny_model

    device = _checked_device(device)
    if n_devices > 1 and (name == EMBEDDED_MODEL or name in TINY_NAMES or Path(name).is_dir()):
        raise ValueError("n_devices > 1 is for official TransformerLens models (large ones)")
    t0 = time.perf_counter()
    if name == EMBEDDED_MODEL:
        model = load_embedded_model(device, dtype)
    elif name in TINY_NAMES:
        model = tiny_model(name.removeprefix("tiny-"), seed=0, device=device, dtype=dtype)
    elif Path(name).is_dir():
        model = _load_local_hf(Path(name), device, dtype)
    else:
        model = _load_official(name, device, dtype, n_devices)
    arch = model.cfg.original_architecture
    if prepend_bos is None and name not in TINY_NAMES and arch in NO_BOS_ARCHITECTURES:
        prepend_bos = False
    if prepend_bos is not None:
        model.cfg.default_prepend_bos = prepend_bos
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
            f"unknown model {name!r}: expected 'smollm2-135m', an official TransformerLens "
            "model name (e.g. 'gpt2-xl', 'EleutherAI/gpt-j-6B') or a local checkpoint directory"
        ) from None
    with quiet_tl_deprecation():
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
    return build(cfg, tokenizer, state)
