"""Edits as values: low-rank weight deltas that can be saved, loaded, applied and undone.

An :class:`Edit` holds, for each edited layer L, factors ``left [d_mlp, r]`` and
``right [r, d_model]`` with ``ΔW_out[L] = left @ right`` (ROME: r = 1; MEMIT: r = number of
requests). It records the requests, the editor, its hyper-parameters and the library version.

Two ways to use it, with the same logits (tested):

* :func:`applied` — a context manager that adds ΔW to ``W_out`` and restores the original
  weights *bit-exactly* in ``finally`` (also when the body raises);
* :meth:`Edit.hooks` — forward hooks that add ``key @ left @ right`` to the MLP output, so one
  copy of the weights serves as both the vanilla and the edited model
  (``models.Variant(model, edit.hooks(model))``).

Files are safetensors (tensors) with the JSON description in the safetensors metadata: no
pickle.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import models
from attndrift.data import EditRequest
from attndrift.version import __version__


@dataclass(frozen=True)
class Edit:
    """A (multi-)layer low-rank change of ``W_out`` and where it came from."""

    layers: tuple[int, ...]
    left: tuple[Float[Tensor, "d_mlp rank"], ...]
    right: tuple[Float[Tensor, "rank d_model"], ...]
    requests: tuple[EditRequest, ...]
    editor: str  # "rome", "r-rome", "memit"
    hparams: dict = field(default_factory=dict)
    model_name: str = ""
    info: dict = field(default_factory=dict)  # losses, timings, SADR settings, ...
    version: str = __version__

    def __post_init__(self) -> None:
        if not (len(self.layers) == len(self.left) == len(self.right)):
            raise ValueError("Edit needs one (left, right) pair per layer")
        for layer, a, b in zip(self.layers, self.left, self.right, strict=True):
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise ValueError(
                    f"layer {layer}: left {tuple(a.shape)} and right {tuple(b.shape)} "
                    "are not [d_mlp, r] and [r, d_model]"
                )

    def delta(self, i: int) -> Float[Tensor, "d_mlp d_model"]:
        """ΔW_out of the i-th edited layer."""
        return self.left[i] @ self.right[i]

    def check(self, model: HookedTransformer) -> None:
        """Raise a ValueError if this edit does not fit ``model``."""
        for layer, a, b in zip(self.layers, self.left, self.right, strict=True):
            models.check_layer(model, layer)
            if a.shape[0] != model.cfg.d_mlp or b.shape[1] != model.cfg.d_model:
                raise ValueError(
                    f"edit for d_mlp={a.shape[0]}, d_model={b.shape[1]} does not fit model "
                    f"{model.cfg.model_name} (d_mlp={model.cfg.d_mlp}, d_model={model.cfg.d_model})"
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
        """Write the edit as safetensors (factors) + JSON metadata (everything else)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {}
        for i, layer in enumerate(self.layers):
            tensors[f"layer{layer}.left"] = self.left[i].detach().cpu().contiguous()
            tensors[f"layer{layer}.right"] = self.right[i].detach().cpu().contiguous()
        meta = {
            "layers": list(self.layers),
            "requests": [asdict(r) for r in self.requests],
            "editor": self.editor,
            "hparams": self.hparams,
            "model_name": self.model_name,
            "info": self.info,
            "version": self.version,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path, metadata={"attndrift.edit": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Edit":
        """Read an edit written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"edit file not found: {path}")
        with safe_open(path, "pt", device=str(device)) as f:
            meta_text = (f.metadata() or {}).get("attndrift.edit")
            if meta_text is None:
                raise ValueError(f"{path} is not an attndrift edit file (no metadata)")
            meta = json.loads(meta_text)
            layers = tuple(meta["layers"])
            left = tuple(f.get_tensor(f"layer{layer}.left") for layer in layers)
            right = tuple(f.get_tensor(f"layer{layer}.right") for layer in layers)
        return cls(
            layers=layers,
            left=left,
            right=right,
            requests=tuple(EditRequest(**r) for r in meta["requests"]),
            editor=meta["editor"],
            hparams=meta["hparams"],
            model_name=meta["model_name"],
            info=meta["info"],
            version=meta["version"],
        )


@contextmanager
def restored(model: HookedTransformer, layers: tuple[int, ...] | list[int]) -> Iterator[None]:
    """Snapshot ``W_out`` of ``layers`` and copy it back on exit, whatever happens inside."""
    weights = [models.mlp_out_weight(model, layer) for layer in layers]
    saved = [w.detach().clone() for w in weights]
    try:
        yield
    finally:
        with torch.no_grad():
            for w, s in zip(weights, saved, strict=True):
                w.copy_(s)


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
    edit.check(model)
    with restored(model, edit.layers):
        add_to_weights(model, edit)
        yield model
