"""Edits as values: low-rank weight deltas that can be saved, loaded, applied and undone.

An :class:`Edit` holds, for each edited layer L, factors ``left [d_mlp, r]`` and
``right [r, d_model]`` with ``ΔW_out[L] = left @ right`` (ROME: r = 1; MEMIT: r = number of
requests). It records the requests, the editor, how it was made (:class:`EditRun`: the
editor's config, SADR, the optimisation traces and targets, timings), the model it was made
on (name and weight fingerprint) and the library version.

Two ways to use it, with the same logits (tested):

* :func:`applied` — a context manager that adds ΔW to ``W_out`` and restores the original
  weights *bit-exactly* in ``finally`` (also when the body raises);
* :meth:`Edit.hooks` — forward hooks that add ``key @ left @ right`` to the MLP output, so one
  copy of the weights serves as both the vanilla and the edited model
  (``models.Variant(model, edit.hooks(model))``).

An edit fits only the weights it was computed on: :meth:`Edit.check` (called by both) refuses
another model, or the same model with other weights (another edit applied first).

Files are safetensors (tensors) with the JSON description in the safetensors metadata: no
pickle. A file is verified when it is loaded: it carries the sha256 of its tensors (names,
dtypes, shapes and bytes) and of its metadata, checked on load, so a flipped bit or an edited
field is refused; the layer list must be integers without repeats, the factors floating-point
matrices of matching shapes, and the model fingerprint present (an edit that cannot be
checked against its model is not applied). Files saved before checksums were stored (no
``attndrift.sha256`` entry) are still read, with a logged warning that they are unverified;
saving them again adds the checksums.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import interrupts, models
from attndrift.data import EditRequest
from attndrift.editing import registry
from attndrift.editing.sadr import SadrConfig
from attndrift.editing.value import StepLog
from attndrift.version import __version__

log = logging.getLogger(__name__)

#: the safetensors metadata entries of an edit file: its description, and the checksums
META_KEY, SHA_KEY = "attndrift.edit", "attndrift.sha256"


@dataclass(frozen=True)
class EditRun:
    """How an edit was made (not needed to apply it)."""

    config: object  # the editor's config (rome.RomeConfig, memit.MemitConfig… of attndrift.editing)
    sadr: SadrConfig | None  # SADR's settings (None: no SADR)
    traces: tuple[tuple[StepLog, ...], ...]  # the δ / z optimisation of each request
    targets: tuple[Float[Tensor, " d_model"], ...]  # v* (ROME) / z (MEMIT) of each request
    seconds: float  # wall time of the whole edit
    timings: tuple[tuple[str, float], ...]  # (phase, seconds)
    n_templates: int  # context templates (the bare prompt included)

    @property
    def steps_run(self) -> int:
        """Optimisation steps of the first request (early stopping may cut the budget)."""
        return len(self.traces[0])

    @property
    def final(self) -> StepLog:
        """The loss terms at the first request's last step."""
        return self.traces[0][-1]

    def __repr__(self) -> str:
        sadr = "" if self.sadr is None else f", SADR γ={self.sadr.gamma:g}"
        steps = "/".join(str(len(t)) for t in self.traces)
        return (
            f"EditRun({type(self.config).__name__}{sadr}, steps run {steps}, "
            f"{self.seconds:.1f} s, {self.n_templates} templates)"
        )


@dataclass(frozen=True)
class Edit:
    """A (multi-)layer low-rank change of ``W_out`` and where it came from."""

    layers: tuple[int, ...]  # edited layers, ascending
    left: tuple[Float[Tensor, "d_mlp rank"], ...]  # one factor pair per layer
    right: tuple[Float[Tensor, "rank d_model"], ...]
    requests: tuple[EditRequest, ...]
    editor: str  # "rome", "rome+sadr", "r-rome", "memit", …
    run: EditRun | None = None  # how it was made (None: built by hand)
    model_name: str = ""
    model_fingerprint: str = ""  # attndrift.models.fingerprint of the weights it was made on
    version: str = __version__

    def __post_init__(self) -> None:
        if not (len(self.layers) == len(self.left) == len(self.right)):
            raise ValueError("Edit needs one (left, right) pair per layer")
        _check_layers(self.layers)
        for layer, a, b in zip(self.layers, self.left, self.right, strict=True):
            _check_factor(layer, a, b)
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise ValueError(
                    f"layer {layer}: left {tuple(a.shape)} and right {tuple(b.shape)} "
                    "are not [d_mlp, r] and [r, d_model]"
                )
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"layer {layer}: the edit's factors are not finite (NaN or inf)")

    def __repr__(self) -> str:
        facts = "; ".join(
            f"{r.subject!r}: {r.target_true!r} → {r.target_new!r}" for r in self.requests[:3]
        )
        more = f" (+{len(self.requests) - 3} more)" if len(self.requests) > 3 else ""
        layers = ",".join(map(str, self.layers))
        layers = f"layer {layers}" if len(self.layers) == 1 else f"layers {layers}"
        rank = "/".join(str(a.shape[1]) for a in self.left)
        run = "" if self.run is None else f", {self.run.steps_run} steps, {self.run.seconds:.1f} s"
        model = f" on {self.model_name}" if self.model_name else ""
        return f"Edit({self.editor}{model}, {layers}, rank {rank}{run}: {facts}{more})"

    def delta(self, i: int) -> Float[Tensor, "d_mlp d_model"]:
        """ΔW_out of the i-th edited layer."""
        return self.left[i] @ self.right[i]

    def check(self, model: HookedTransformer) -> None:
        """Raise a ValueError if this edit was not made for ``model``'s current weights."""
        for layer, a, b in zip(self.layers, self.left, self.right, strict=True):
            models.check_layer(model, layer)
            if a.shape[0] != model.cfg.d_mlp or b.shape[1] != model.cfg.d_model:
                raise ValueError(
                    f"edit for d_mlp={a.shape[0]}, d_model={b.shape[1]} does not fit model "
                    f"{model.cfg.model_name} (d_mlp={model.cfg.d_mlp}, d_model={model.cfg.d_model})"
                )
        if not self.model_fingerprint and self.model_name not in ("", model.cfg.model_name):
            raise ValueError(
                f"this edit was made on {self.model_name!r}; the model is {model.cfg.model_name!r}"
            )
        if self.model_fingerprint and self.model_fingerprint != models.fingerprint(model):
            raise ValueError(
                f"this edit was made on {self.model_name!r} with weights "
                f"{self.model_fingerprint}; the model is {model.cfg.model_name!r} with weights "
                f"{models.fingerprint(model)} (another model, or other edits in its weights)"
            )

    def hooks(self, model: HookedTransformer) -> tuple:
        """Forward hooks that apply the edit to the MLP outputs (weights untouched)."""
        self.check(model)
        hooks = []
        for layer, a, b in zip(self.layers, self.left, self.right, strict=True):
            keys: dict[str, Tensor] = {}

            def keep(k: Tensor, hook, keys=keys) -> None:
                keys["k"] = k

            def add(out: Tensor, hook, keys=keys, a=a, b=b) -> Tensor:
                a_, b_ = a.to(out.device, out.dtype), b.to(out.device, out.dtype)
                return out + (keys.pop("k") @ a_) @ b_

            hooks += [(models.mlp_key_hook(layer), keep), (models.mlp_out_hook(layer), add)]
        return tuple(hooks)

    # ---------------------------------------------------------------- files

    def save(self, path: str | Path) -> Path:
        """Write the edit as safetensors (factors, targets) + JSON metadata (the rest)."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = Path(path)
        if not self.model_fingerprint:
            raise ValueError(
                "an edit without the fingerprint of its model cannot be saved (it could not be "
                "checked when loaded): give model_fingerprint=models.fingerprint(model)"
            )
        tensors = {}
        for i, layer in enumerate(self.layers):
            tensors[f"layer{layer}.left"] = self.left[i].detach().cpu().contiguous()
            tensors[f"layer{layer}.right"] = self.right[i].detach().cpu().contiguous()
        run = None
        if self.run is not None:
            for i, t in enumerate(self.run.targets):
                tensors[f"run.target{i}"] = t.detach().cpu().contiguous()
            run = {
                "config_type": type(self.run.config).__name__,
                "config": asdict(self.run.config),
                "sadr": None if self.run.sadr is None else asdict(self.run.sadr),
                "traces": [[asdict(s) for s in t] for t in self.run.traces],
                "seconds": self.run.seconds,
                "timings": [list(x) for x in self.run.timings],
                "n_templates": self.run.n_templates,
            }
        meta = {
            "layers": list(self.layers),
            "requests": [asdict(r) for r in self.requests],
            "editor": self.editor,
            "run": run,
            "model_name": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "version": self.version,
        }
        meta_text = json.dumps(meta)
        sums = json.dumps({"tensors": _tensors_sha256(tensors), "metadata": _sha256(meta_text)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, tmp, metadata={META_KEY: meta_text, SHA_KEY: sums})
            tmp.replace(path)
        except (OSError, SafetensorError) as e:  # a full disk: the message names the file
            if isinstance(e, OSError) and e.filename:
                raise
            errno_ = getattr(e, "errno", None)
            raise OSError(errno_, f"cannot write the edit ({e})", str(path)) from None
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Edit":
        """Read an edit written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a (complete) attndrift edit file.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"edit file not found: {path}")
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not an edit file")
        if not path.is_file():  # a FIFO would block, a device never end
            raise ValueError(f"{path} is not a regular file, not an edit file")
        try:
            with safe_open(path, "pt", device="cpu") as f:
                stored = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
            meta_text = stored.get(META_KEY)
            if meta_text is None:
                raise ValueError("no attndrift metadata")
            _verify(path, stored, meta_text, tensors)
            meta = json.loads(meta_text)
            if not isinstance(meta, dict):
                raise ValueError("the metadata is not a JSON object")
            layers = _meta_layers(meta.get("layers"))
            fingerprint = meta.get("model_fingerprint")
            if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{16}", fingerprint):
                raise ValueError(
                    f"model fingerprint {fingerprint!r} is not one (blank or altered): the edit "
                    "cannot be checked against a model"
                )
            run = meta.get("run")
            names = [f"layer{layer}.{side}" for layer in layers for side in ("left", "right")]
            names += [] if run is None else [f"run.target{i}" for i in range(len(run["traces"]))]
            if sorted(names) != sorted(tensors):
                extra, missing = set(tensors) - set(names), set(names) - set(tensors)
                raise ValueError(
                    f"tensors {sorted(extra)} are not in its layer list, {sorted(missing)} missing"
                )
            for layer in layers:
                _check_factor(layer, tensors[f"layer{layer}.left"], tensors[f"layer{layer}.right"])
            device = str(device)
            left = tuple(tensors[f"layer{layer}.left"].to(device) for layer in layers)
            right = tuple(tensors[f"layer{layer}.right"].to(device) for layer in layers)
            targets = () if run is None else tuple(
                tensors[f"run.target{i}"].to(device) for i in range(len(run["traces"]))
            )  # fmt: skip
            return cls(
                layers=layers,
                left=left,
                right=right,
                requests=tuple(EditRequest(**r) for r in meta["requests"]),
                editor=meta["editor"],
                run=None if run is None else _run_from(run, targets),
                model_name=meta["model_name"],
                model_fingerprint=fingerprint,
                version=meta["version"],
            )
        except (SafetensorError, OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            if isinstance(e, PermissionError):
                raise
            raise ValueError(f"{path} is not an attndrift edit file ({e})") from None
        except ValueError as e:
            raise ValueError(f"{path} is not an attndrift edit file ({e})") from None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 of the tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _verify(path: Path, stored: dict, meta_text: str, tensors: dict[str, Tensor]) -> None:
    """Check the file's checksums (a ValueError on a mismatch; a warning when it has none)."""
    sums_text = stored.get(SHA_KEY)
    if sums_text is None:
        log.warning(
            "%s has no checksums (saved before they were stored): loaded unverified; "
            "save it again to add them",
            path,
        )
        return
    try:
        sums = json.loads(sums_text)
        want_meta, want_tensors = sums["metadata"], sums["tensors"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError("its checksums are unreadable") from None
    if _sha256(meta_text) != want_meta:
        raise ValueError("its metadata does not match its sha256 (edited or damaged)")
    if _tensors_sha256(tensors) != want_tensors:
        raise ValueError("its tensors do not match their sha256 (edited or damaged)")


def _check_layers(layers: object) -> None:
    """A ValueError unless ``layers`` is a non-empty sequence of distinct integers >= 0."""
    if not isinstance(layers, tuple | list) or not layers:
        raise ValueError(f"an edit needs at least one layer, got {layers!r}")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layers must be integers >= 0, got {layer!r}")
    repeated = sorted({x for x in layers if list(layers).count(x) > 1})
    if repeated:
        raise ValueError(f"layer {repeated[0]} is listed twice (its ΔW would be added twice)")


def _meta_layers(value: object) -> tuple[int, ...]:
    _check_layers(value)
    return tuple(value)


def _check_factor(layer: int, a: Tensor, b: Tensor) -> None:
    """A ValueError unless both factors are floating-point matrices."""
    for side, t in (("left", a), ("right", b)):
        if not isinstance(t, Tensor):
            raise ValueError(f"layer {layer}: the {side} factor is not a tensor")
        if not t.is_floating_point():
            raise ValueError(f"layer {layer}: the {side} factor is {t.dtype}, not floating point")
        if t.ndim != 2:
            raise ValueError(
                f"layer {layer}: the {side} factor has shape {tuple(t.shape)}, not 2-D"
            )


def _run_from(meta: dict, targets: tuple[Tensor, ...]) -> EditRun:
    return EditRun(
        config=from_dict(registry.config_class(meta["config_type"]), meta["config"]),
        sadr=None if meta["sadr"] is None else from_dict(SadrConfig, meta["sadr"]),
        traces=tuple(tuple(from_dict(StepLog, s) for s in t) for t in meta["traces"]),
        targets=targets,
        seconds=float(meta["seconds"]),
        timings=tuple((str(k), float(v)) for k, v in meta["timings"]),
        n_templates=int(meta["n_templates"]),
    )


def from_dict(cls: type, data: dict):
    """A (nested, frozen) dataclass from its ``asdict`` JSON form (lists become tuples)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
        inner = next((k for k in kinds if dataclasses.is_dataclass(k)), None)
        if isinstance(v, dict) and inner is not None:
            v = from_dict(inner, v)
        values[f.name] = _tuples(v)
    return cls(**values)


def _tuples(v):
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    return v


@contextmanager
def restored(model: HookedTransformer, layers: tuple[int, ...] | list[int]) -> Iterator[None]:
    """Snapshot ``W_out`` of ``layers`` and copy it back on exit, whatever happens inside
    (also an interrupt during the copy: :func:`attndrift.interrupts.on_exit`)."""
    weights = [models.mlp_out_weight(model, layer) for layer in layers]
    saved = [w.detach().clone() for w in weights]

    def copy_back() -> None:
        with torch.no_grad():
            for w, s in zip(weights, saved, strict=True):
                w.copy_(s)

    with interrupts.on_exit(copy_back):
        yield


def add_to_weights(model: HookedTransformer, edit: Edit) -> None:
    """Add the edit's ΔW to ``W_out`` in place (not undone: see :func:`applied`)."""
    edit.check(model)
    with torch.no_grad():
        for i, layer in enumerate(edit.layers):
            w = models.mlp_out_weight(model, layer)
            w.add_(edit.delta(i).to(w.device, w.dtype))


@contextmanager
def applied(model: HookedTransformer, edit: Edit) -> Iterator[HookedTransformer]:
    """Apply ``edit`` to the weights for the duration of the block, then restore them exactly."""
    with interrupts.grad_mode_kept():  # whatever interrupts the no_grad blocks of check()
        edit.check(model)
        with restored(model, edit.layers):
            add_to_weights(model, edit)
            yield model
