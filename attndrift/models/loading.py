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

import errno
import hashlib
import logging
import os
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

#: architectures whose published editing code feeds prompts without a BOS token
NO_BOS_ARCHITECTURES = ("GPT2LMHeadModel", "GPTJForCausalLM")


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


def cache_dir() -> Path:
    """Where attndrift caches converted weights and statistics.

    ``$ATTNDRIFT_CACHE`` if set, else ``$XDG_CACHE_HOME/attndrift``, else
    ``~/.cache/attndrift``.
    """
    if env := os.environ.get("ATTNDRIFT_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attndrift"


#: a shared cache: files readable by every user, folders readable and searchable
CACHE_FILE_MODE, CACHE_FOLDER_MODE = 0o644, 0o755
PERMISSION_HINT = (
    "Permission denied (a cache of another user? set ATTNDRIFT_CACHE to a folder of yours)"
)


def is_regular(path: Path) -> bool:
    """Whether ``path`` is a regular file (following links): a FIFO or a device in place of
    a cache file would block a reader, or never end."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_cache_bytes(path: Path) -> bytes:
    """The bytes of a cache file; a ValueError if it is not a regular file, a PermissionError
    that names the file."""
    if not is_regular(path):
        raise ValueError(f"{path} is not a regular file")
    try:
        return path.read_bytes()
    except PermissionError:
        raise PermissionError(errno.EACCES, PERMISSION_HINT, str(path)) from None


def cache_folder(path: Path) -> Path:
    """``mkdir -p path``, the folders it creates with mode 0755 (whatever the umask), so
    that a cache shared by several users stays readable; an error names the folder."""
    for folder in [*reversed(path.parents), path]:
        if folder.is_dir():
            continue
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise NotADirectoryError(
                    errno.ENOTDIR, "is not a directory (it is in the cache's way)", str(folder)
                ) from None
            continue
        except PermissionError:
            raise PermissionError(errno.EACCES, PERMISSION_HINT, str(folder)) from None
        folder.chmod(CACHE_FOLDER_MODE)
    return path


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Write a cache file: ``write(tmp)`` fills a temporary file beside ``path`` (unique: pid
    and a random suffix), which is then fsynced and moved into place with ``os.replace``.

    Readers see the old file or the new one, never a partial one; concurrent writers (e.g.
    torchrun ranks filling the same cache) do not collide. The file gets mode 0644, new
    folders 0755; an error (permissions, a full disk) names ``path``. Returns ``path``.
    """
    cache_folder(path.parent)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
        )
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        os.chmod(tmp, CACHE_FILE_MODE)  # mkstemp's 0o600 would hide a shared cache
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # the temporary file's name would say nothing to the user
        if e.filename is not None and not Path(str(e.filename)).name.startswith(f".{path.name}."):
            raise
        text = PERMISSION_HINT if isinstance(e, PermissionError) else e.strerror or str(e)
        raise type(e)(e.errno, text, str(path)) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


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


@contextmanager
def quiet_tl_deprecation() -> Iterator[None]:
    """Silence TransformerLens 3.9's deprecation notice (attndrift pins < 4 on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer.* deprecated")
        yield


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
    return build(cfg, tokenizer, state, device, dtype)


def build(
    cfg: HookedTransformerConfig,
    tokenizer: PreTrainedTokenizerBase,
    state: dict[str, Tensor],
    device: str,
    dtype: torch.dtype,
) -> HookedTransformer:
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
