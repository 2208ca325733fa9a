"""Covariance: the second moment C = E[k kᵀ] of MLP keys at a layer (METHOD §3.2).

k is the input of ``W_out`` (``blocks.{L}.mlp.hook_post``) at every real token of a text
corpus (BOS and padding excluded). ROME's update direction is ``C⁻¹ k``; MEMIT solves
``(λ C + K Kᵀ)⁻¹ K`` (both through :func:`solve`, which factors each C once). C is streamed in
batches (accumulated in float64) and cached on disk, keyed by the model's fingerprint, the
layer, the corpus and the token count. A cache file whose key or checksum does not match is
recomputed, never used.

Corpora (:func:`corpus_texts`):

* a list of strings;
* a path: ``.json`` (a list of strings, or of objects with a ``"text"``/``"Text"`` field) or
  any text file (one text per non-empty line);
* ``"hf:NAME[:CONFIG[:SPLIT]]"``: a Hugging Face dataset's ``text`` column (needs the hub);
* ``"samples"`` (the offline default): text sampled from the model itself (seeded top-k
  sampling from generic openings), which needs no data at all.
"""

import hashlib
import json
import logging
import os
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from attndrift import capture, checks, encoding, generation, models
from attndrift._io import PERMISSION_HINT, atomic_write, is_regular, read_cache_bytes

log = logging.getLogger(__name__)

#: Openings for the offline "samples" corpus (MEMIT's five, plus more for variety).
SAMPLE_OPENINGS = (
    "The", "Therefore", "Because", "I", "You", "In", "When", "It", "A", "This", "We",
    "After", "According to", "There", "He", "She", "On", "For", "Many", "One",
)  # fmt: skip


_CHUNK = 128

#: id(C) -> (weak reference to C, C's version, its float64 Cholesky factor or None)
_FACTORS: dict[int, tuple[weakref.ref, int, Tensor | None]] = {}


def cholesky(cov: Tensor) -> Tensor | None:
    """C's lower Cholesky factor in float64, or None if C is not positive definite. Computed
    once and remembered for as long as that tensor lives unchanged (a sweep factors each
    layer's C once)."""
    found = _FACTORS.get(id(cov))
    if found is None or found[0]() is not cov or found[1] != cov._version:
        factor, info = torch.linalg.cholesky_ex(cov.detach().double())
        found = (weakref.ref(cov), cov._version, factor if int(info) == 0 else None)
        _FACTORS[id(cov)] = found
        weakref.finalize(cov, _FACTORS.pop, id(cov), None)
    return found[2]


def solve(cov: Tensor | None, rhs: Tensor) -> Tensor:
    """``C⁻¹ rhs`` in float64 (``cov=None``: C = I) by C's remembered Cholesky factor
    (:func:`cholesky`): triangular solves, O(d² n), not a dense solve, O(d³). A C that is
    not positive definite falls back to the dense solve."""
    rhs = rhs.double()
    if cov is None:
        return rhs
    factor = cholesky(cov)
    if factor is None:
        return torch.linalg.solve(cov.double(), rhs)
    column = rhs.dim() == 1
    out = torch.cholesky_solve(rhs.to(factor.device).reshape(len(rhs), -1), factor)
    return out[:, 0] if column else out


@dataclass(frozen=True)
class CovarianceConfig:
    """Where C comes from.

    Attributes:
        corpus: ``"samples"``, a path, ``"hf:..."`` or a list of texts (see module doc).
        n_tokens: key vectors to average (ROME/MEMIT used 100k Wikipedia samples).
        text_tokens: tokens per text (texts are truncated; samples are this long).
        seed: seed of the ``"samples"`` corpus.
        batch_tokens: padded tokens per forward pass.
    """

    corpus: str | tuple[str, ...] = "samples"
    n_tokens: int = 100_000
    text_tokens: int = 128
    seed: int = 0
    batch_tokens: int = 8192

    def __post_init__(self) -> None:
        checks.number("n_tokens", self.n_tokens, low=1, integer=True)
        checks.number("text_tokens", self.text_tokens, low=1, integer=True)
        checks.number("seed", self.seed, low=0, integer=True)
        checks.number("batch_tokens", self.batch_tokens, low=1, integer=True)


def corpus_texts(model: HookedTransformer, cfg: CovarianceConfig) -> list[str]:
    """The texts of ``cfg.corpus`` (enough of them for ``cfg.n_tokens`` when sampling)."""
    corpus = cfg.corpus
    if isinstance(corpus, tuple | list):
        return list(corpus)
    if corpus == "samples":
        n_texts = -(-cfg.n_tokens // cfg.text_tokens)
        return sampled_corpus(model, n_texts, cfg.text_tokens, cfg.seed)
    if corpus.startswith("hf:"):
        import datasets  # optional, online

        name, *rest = corpus[3:].split(":")
        config = rest[0] if rest else None
        split = rest[1] if len(rest) > 1 else "train"
        return [t for t in datasets.load_dataset(name, config, split=split)["text"] if t.strip()]
    path = Path(corpus)
    if not path.exists():
        raise FileNotFoundError(f"covariance corpus {corpus!r}: no such file, and not 'samples'")
    if path.suffix == ".json":
        items = json.loads(path.read_text())
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of texts")
        return [it if isinstance(it, str) else it.get("text", it.get("Text", "")) for it in items]
    return [line for line in path.read_text().splitlines() if line.strip()]


def sampled_corpus(
    model: HookedTransformer, n_texts: int, text_tokens: int, seed: int
) -> list[str]:
    """``n_texts`` texts of ``text_tokens`` tokens sampled from the model (top-k 40), cached.

    Texts are drawn in whole chunks of 128 with seeds ``seed, seed+1, …``, so a larger corpus
    extends a smaller one and the cache of the largest corpus serves every smaller request.
    """
    directory = models.cache_dir() / "corpora"
    stem = f"{model.cfg.model_name}-{models.fingerprint(model)}-s{seed}-t{text_tokens}"
    for path in sorted(directory.glob(f"{stem}-n*.json")):
        size = path.stem.rsplit("-n", 1)[1]
        if not size.isdigit() or int(size) < n_texts:
            continue
        texts = _cached_corpus(path, int(size))
        if texts is not None:
            return texts[:n_texts]
    log.info("sampling %d texts of %d tokens for the covariance corpus", n_texts, text_tokens)
    texts: list[str] = []
    # whole chunks only: chunk i is the same whatever n_texts, so corpora nest
    for i in tqdm(range(0, n_texts, _CHUNK), desc="sampling corpus", unit="chunk"):
        openings = [SAMPLE_OPENINGS[j % len(SAMPLE_OPENINGS)] for j in range(_CHUNK)]
        texts += generation.sample(
            model,
            openings,
            max_new_tokens=text_tokens,
            seed=seed + i // _CHUNK,
            top_k=40,
            max_batch=_CHUNK,
        )
    text = json.dumps(texts)
    atomic_write(directory / f"{stem}-n{len(texts)}.json", lambda tmp: tmp.write_text(text))
    return texts[:n_texts]


def _cached_corpus(path: Path, size: int) -> list[str] | None:
    """The texts of a corpus cache file if it holds the ``size`` texts its name says; None
    (and the damaged file removed, with a warning that names it) otherwise."""
    texts, problem = None, "not a regular file"
    if is_regular(path):  # (a FIFO would block the reader)
        try:
            texts, problem = json.loads(read_cache_bytes(path)), None
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
    if problem is None:
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            problem = "not a JSON list of texts"
        elif len(texts) != size:
            problem = f"{len(texts)} texts, its name says {size}"
    if problem is None:
        return texts
    log.warning("damaged corpus cache %s (%s): sampling again", path, problem)
    if is_regular(path):
        path.unlink(missing_ok=True)
    return None


def _corpus_name(cfg: CovarianceConfig) -> str:
    """The corpus as a user would name it (for messages)."""
    c = cfg.corpus
    if isinstance(c, tuple | list):
        return f"({len(c)} texts given in the config)"
    return repr(c)


def _corpus_id(cfg: CovarianceConfig) -> str:
    c = cfg.corpus
    if isinstance(c, tuple | list):
        return "texts-" + hashlib.sha256("\x00".join(c).encode()).hexdigest()[:12]
    if c == "samples":
        return f"samples-s{cfg.seed}-t{cfg.text_tokens}"
    if c.startswith("hf:"):
        return c.replace("/", "_").replace(":", "_")
    p = Path(c)
    return f"{p.stem}-{hashlib.sha256(p.read_bytes()).hexdigest()[:12]}"


@torch.no_grad()
def second_moment(
    model: HookedTransformer,
    layer: int,
    texts: Sequence[str],
    *,
    n_tokens: int,
    text_tokens: int = 128,
    batch_tokens: int = 8192,
    progress: bool = False,
) -> tuple[Float[Tensor, "d_mlp d_mlp"], int]:
    """E[k kᵀ] over the first ``n_tokens`` real tokens of ``texts``; returns (C, tokens used)."""
    models.check_layer(model, layer)
    bos = models.bos_prefix(model)
    n_bos = len(bos)
    if n_bos + text_tokens > model.cfg.n_ctx:
        raise ValueError(
            f"text_tokens={text_tokens} does not fit the model's context ({model.cfg.n_ctx} tokens)"
        )
    # texts longer than the context are cut to text_tokens: encoded here, not as prompts
    rows = [
        (bos + models.encode_text(model, t.rstrip()))[: n_bos + text_tokens]
        for t in texts
        if t.strip()
    ]
    rows = [r for r in rows if len(r) > n_bos]
    d = model.cfg.d_mlp
    device = models.model_device(model)
    total = torch.zeros(d, d, dtype=torch.float64, device=device)
    used = 0
    per_batch = max(1, batch_tokens // max(len(r) for r in rows)) if rows else 1
    bar = tqdm(total=n_tokens, desc=f"covariance L{layer}", unit="tok", disable=not progress)
    for start in range(0, len(rows), per_batch):
        if used >= n_tokens:
            break
        chunk = rows[start : start + per_batch]
        tokens = encoding.pad(model, chunk)
        name = models.mlp_key_hook(layer)
        k = capture.record(model, tokens, {name: None}, stop_at_layer=layer + 1)[name]
        keys = torch.cat([k[i, n_bos : len(r)] for i, r in enumerate(chunk)])  # [tokens, d_mlp]
        keys = keys[: n_tokens - used].float()
        total += (keys.T @ keys).double()
        used += keys.shape[0]
        bar.update(keys.shape[0])
    bar.close()
    if used == 0:
        raise ValueError("covariance corpus has no tokens")
    if used < 0.99 * n_tokens:  # re-encoding sampled text loses a few tokens: fine
        log.warning("covariance corpus gave %d tokens, fewer than the %d asked for", used, n_tokens)
    if used < d:
        log.warning("C from %d tokens < d_mlp=%d is singular", used, d)
    return (total / used).float(), used


def layer_covariance(
    model: HookedTransformer,
    layer: int,
    cfg: CovarianceConfig = CovarianceConfig(),
    *,
    cache: bool = True,
    progress: bool = True,
) -> Float[Tensor, "d_mlp d_mlp"]:
    """C = E[k kᵀ] at ``layer`` for ``cfg``, from the disk cache when valid."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    key = {
        "model": model.cfg.model_name,
        "fingerprint": models.fingerprint(model),
        "layer": str(layer),
        "corpus": _corpus_id(cfg),
        "n_tokens": str(cfg.n_tokens),
        "text_tokens": str(cfg.text_tokens),
    }
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = models.cache_dir() / "covariance" / f"{key['model']}-L{layer}-{name}.safetensors"
    device = models.model_device(model)
    if cache and path.exists() and not is_regular(path):  # a FIFO would block the reader
        log.warning("covariance cache %s is not a regular file: recomputing", path)
    elif cache and path.exists():
        if not os.access(path, os.R_OK):
            raise PermissionError(13, PERMISSION_HINT, str(path))
        try:
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            stats = load_file(path)["mom2"]
            ok = all(meta.get(k) == v for k, v in key.items()) and meta.get("sha256") == _digest(
                stats
            )
            if ok:
                return stats.to(device)
            log.warning("covariance cache %s does not match its key or checksum: recomputing", path)
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            log.warning("covariance cache %s is unreadable (%s): recomputing", path, e)
    t0 = time.perf_counter()
    texts = corpus_texts(model, cfg)
    stats, used = second_moment(
        model,
        layer,
        texts,
        n_tokens=cfg.n_tokens,
        text_tokens=cfg.text_tokens,
        batch_tokens=cfg.batch_tokens,
        progress=progress,
    )
    if used < 0.99 * cfg.n_tokens:  # re-encoding sampled text loses a few tokens: fine
        raise ValueError(
            f"covariance corpus {_corpus_name(cfg)} has {used} tokens, fewer than the "
            f"{cfg.n_tokens} of n_tokens (--cov-tokens): give a larger corpus or fewer tokens"
        )
    log.info(
        "covariance of layer %d from %d tokens in %.0f s", layer, used, time.perf_counter() - t0
    )
    if cache:
        cpu = stats.cpu().contiguous()
        meta = {**key, "sha256": _digest(cpu), "used": str(used)}
        atomic_write(path, lambda tmp: save_file({"mom2": cpu}, tmp, metadata=meta))
    return stats


def _digest(t: Tensor) -> str:
    return hashlib.sha256(t.cpu().contiguous().numpy().tobytes()).hexdigest()
