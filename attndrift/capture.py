"""Capture: the few activations drift and patching need, gathered inside forward hooks.

A *capture* runs a model (or a :class:`~attndrift.models.Variant`: a model plus forward hooks,
e.g. an edit) once over a right-padded :class:`~attndrift.encoding.Batch` and keeps only

* attention pattern rows ``P^{l,h}[q, :]`` of every head of the chosen layers at chosen query
  positions ``q`` (default: the last prompt token; ``"all"`` keeps every query row), and
* MLP outputs (``hook_mlp_out``) of the chosen layers at chosen positions,

gathering them *inside* the hooks, so a capture of the last-token rows of a 30-layer model
holds ``layer x head_index x key_pos`` numbers per prompt instead of a full activation cache.
The forward pass stops after the last layer asked for. :func:`pair` captures a vanilla and an
edited run of the same batch; :func:`full` is the full ``run_with_cache`` (only when asked:
reference tests, benchmarks).

Positions are per row (prompts differ in length): ``"last"`` (the last prompt token),
``"subject_last"`` (the subject's last token), ``"all"`` (every position of the padded width;
rows past a prompt's length are padding), or an explicit ``[batch, n]`` tensor of positions.

Axes (TransformerLens vocabulary): ``batch`` prompts, ``layer`` the captured layers (in
:attr:`Capture.layers` order), ``head_index`` query heads (all of them, also for GQA models),
``query_pos`` the captured query rows, ``key_pos`` the padded width, ``pos`` the captured MLP
positions, ``d_model``. Every tensor stays on the model's device.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedTransformer

from attndrift import models
from attndrift.encoding import Batch

#: Named positions (annotated as ``str`` so that a wrong name is a ValueError that lists these).
POSITION_NAMES = ("last", "subject_last", "all")
#: A name of :data:`POSITION_NAMES` or ``[batch, n]`` positions (``_n``: each argument has its
#: own width).
Positions = str | Int[Tensor, "batch _n"]


@dataclass(frozen=True)
class Capture:
    """Attention rows and MLP outputs of one run (``None`` = not captured).

    Attributes:
        batch: the encoded prompts (tokens, lengths, last token, subject span).
        layers: the captured layers; axis ``layer`` of the tensors follows this order.
        queries: query position of each captured attention row, per prompt.
        pattern: ``pattern[b, i, h, j, k] = P^{layers[i], h}[queries[b, j], k]``.
        positions: position of each captured MLP output, per prompt.
        mlp_out: ``mlp_out[b, i, j] = hook_mlp_out of layers[i] at positions[b, j]``.
    """

    batch: Batch
    layers: tuple[int, ...]
    queries: Int[Tensor, "batch query_pos"] | None = None
    pattern: Float[Tensor, "batch layer head_index query_pos key_pos"] | None = None
    positions: Int[Tensor, "batch pos"] | None = None
    mlp_out: Float[Tensor, "batch layer pos d_model"] | None = None


@dataclass(frozen=True)
class Pair:
    """Captures of a vanilla and an edited run of the same batch (same layers, same rows)."""

    vanilla: Capture
    edited: Capture


def resolve_positions(batch: Batch, spec: Positions) -> Int[Tensor, "batch _n"]:
    """Positions ``[batch, n]`` named by ``spec`` for every row of ``batch``.

    Raises:
        ValueError: unknown name, no subject in the batch, wrong shape, or a position outside
            its prompt.
    """
    n_rows, width = batch.tokens.shape
    device = batch.tokens.device
    if isinstance(spec, str):
        if spec == "last":
            return batch.last[:, None]
        if spec == "subject_last":
            if (batch.subject_last < 0).any():
                raise ValueError("'subject_last' needs a subject for every prompt")
            return batch.subject_last[:, None]
        if spec == "all":
            return torch.arange(width, device=device).expand(n_rows, width)
        raise ValueError(
            f"unknown positions {spec!r}: expected one of {POSITION_NAMES} or a [batch, n] "
            "tensor of positions"
        )
    if spec.shape[0] != n_rows:
        raise ValueError(f"positions have {spec.shape[0]} rows but the batch has {n_rows}")
    spec = spec.to(device=device, dtype=torch.long)
    if (spec < 0).any() or (spec >= batch.lengths[:, None]).any():
        raise ValueError(
            f"position out of range: positions must lie in [0, length) of each prompt "
            f"(lengths {batch.lengths.tolist()}), got {spec.tolist()}"
        )
    return spec


def check_layers(model: HookedTransformer, layers: Sequence[int] | None) -> tuple[int, ...]:
    """``layers`` validated (in range, no repeats), or every layer of ``model``."""
    if layers is None:
        return tuple(range(model.cfg.n_layers))
    layers = tuple(int(layer) for layer in layers)
    if not layers:
        raise ValueError("no layers to capture")
    if len(set(layers)) != len(layers):
        raise ValueError(f"repeated layers in {layers}")
    for layer in layers:
        models.check_layer(model, layer)
    return layers


def check_compatible(a: HookedTransformer, b: HookedTransformer) -> None:
    """Raise a ValueError unless ``a`` and ``b`` share architecture shape and vocabulary."""
    if a is b:
        return
    fields = (
        "original_architecture",
        "n_layers",
        "n_heads",
        "n_key_value_heads",
        "d_model",
        "d_head",
        "d_mlp",
        "d_vocab",
    )
    diff = [f for f in fields if getattr(a.cfg, f) != getattr(b.cfg, f)]
    if diff:
        detail = ", ".join(f"{f} {getattr(a.cfg, f)} vs {getattr(b.cfg, f)}" for f in diff)
        raise ValueError(f"mismatched models: {detail}")
    ta, tb = a.tokenizer, b.tokenizer
    if ta is not tb and (ta is None or tb is None or ta.get_vocab() != tb.get_vocab()):
        raise ValueError("mismatched models: the tokenizers differ")


@dataclass(frozen=True)
class Select:
    """Positions to keep of an activation: ``positions[b]`` along ``axis`` of row ``b``."""

    axis: int  # position axis of the activation (batch is axis 0), e.g. 2: a pattern's query
    positions: Int[Tensor, "batch _n"]


class Recorder:
    """Forward hooks that keep chosen positions of any activations, gathered inside the hooks.

    The one capture primitive of attndrift (as TransformerLens' ``run_with_cache(names_filter=
    …)``, but keeping only the selected positions): ``selections`` maps hook names to a
    :class:`Select` (those positions) or ``None`` (the whole activation). Add :attr:`hooks` to
    any forward pass (after a variant's own hooks, so that an edited value is what gets
    kept), then read :meth:`values`. With ``detach=False`` the kept values carry gradients.
    """

    def __init__(self, selections: dict[str, Select | None], *, detach: bool = True) -> None:
        self.selections, self.detach = dict(selections), detach
        self._kept: dict[str, Tensor] = {}
        self.hooks = [(name, self._keep) for name in self.selections]

    def _keep(self, x: Tensor, hook) -> None:
        x = x.detach() if self.detach else x
        sel = self.selections[hook.name]
        if sel is not None:
            view = x.movedim(sel.axis, 1)  # [batch, pos, ...]
            p = sel.positions.to(x.device)
            rows = torch.arange(view.shape[0], device=x.device)[:, None]
            x = view[rows, p].movedim(1, sel.axis)  # [batch, ..., n, ...]
        self._kept[hook.name] = x

    def values(self) -> dict[str, Tensor]:
        """The kept activations of the last forward pass, by hook name."""
        missing = [name for name in self.selections if name not in self._kept]
        if missing:
            raise RuntimeError(f"no activations recorded for {missing}: run a forward pass")
        return dict(self._kept)


def record(
    model: HookedTransformer | models.Variant,
    tokens: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
    selections: dict[str, Select | None],
    *,
    stop_at_layer: int | None = None,
    start_at_layer: int | None = None,
) -> dict[str, Tensor]:
    """One forward pass (no gradients) keeping ``selections`` (see :class:`Recorder`). With
    ``start_at_layer``, ``tokens`` is the input residual of that block (``[batch, pos,
    d_model]``, as kept at its ``hook_resid_pre``) and the blocks before it do not run."""
    v = models.as_variant(model)
    rec = Recorder(selections)
    with torch.no_grad(), models.hooked(v.model, [*v.hooks, *rec.hooks]):
        v.model(
            tokens, start_at_layer=start_at_layer, stop_at_layer=stop_at_layer, return_type=None
        )
    return rec.values()


@torch.no_grad()
def run(
    model: HookedTransformer | models.Variant,
    batch: Batch,
    *,
    layers: Sequence[int] | None = None,
    queries: Positions | None = "last",
    mlp_positions: Positions | None = None,
) -> Capture:
    """One forward pass of ``model`` over ``batch``, keeping only the requested activations.

    Args:
        model: a model, or a :class:`~attndrift.models.Variant` (model + hooks).
        batch: right-padded prompts from :func:`attndrift.encoding.encode_batch`.
        layers: layers to capture (default: all).
        queries: query rows of the attention patterns to keep (``None``: no patterns).
        mlp_positions: positions of the MLP outputs to keep (``None``: no MLP outputs).
    """
    v = models.as_variant(model)
    if queries is None and mlp_positions is None:
        raise ValueError("nothing to capture: give queries and/or mlp_positions")
    layers = check_layers(v.model, layers)
    q = None if queries is None else resolve_positions(batch, queries)
    p = None if mlp_positions is None else resolve_positions(batch, mlp_positions)
    selections: dict[str, Select | None] = {}
    for layer in layers:
        if q is not None:
            selections[models.pattern_hook(layer)] = Select(2, q)
        if p is not None:
            selections[models.mlp_out_hook(layer)] = Select(1, p)
    kept = record(v, batch.tokens, selections, stop_at_layer=max(layers) + 1)
    pattern = mlp = None
    if q is not None:
        pattern = torch.stack([kept[models.pattern_hook(layer)] for layer in layers], dim=1)
    if p is not None:
        mlp = torch.stack([kept[models.mlp_out_hook(layer)] for layer in layers], dim=1)
    return Capture(batch, layers, q, pattern, p, mlp)


def pair(
    vanilla: HookedTransformer | models.Variant,
    edited: HookedTransformer | models.Variant,
    batch: Batch,
    *,
    layers: Sequence[int] | None = None,
    queries: Positions | None = "last",
    mlp_positions: Positions | None = None,
) -> Pair:
    """:func:`run` of the vanilla and the edited model on the same batch.

    Raises:
        ValueError: the two models differ in shape or tokenizer.
    """
    v, e = models.as_variant(vanilla), models.as_variant(edited)
    check_compatible(v.model, e.model)
    kwargs = {"layers": layers, "queries": queries, "mlp_positions": mlp_positions}
    return Pair(run(v, batch, **kwargs), run(e, batch, **kwargs))


@torch.no_grad()
def full(
    model: HookedTransformer | models.Variant, tokens: Int[Tensor, "batch pos"]
) -> ActivationCache:
    """The full TransformerLens activation cache of a run (under the variant's hooks).

    Memory grows with ``layers x heads x pos²``: for reference checks and benchmarks only.
    """
    v = models.as_variant(model)
    with models.hooked(v.model, v.hooks):
        _, cache = v.model.run_with_cache(tokens)
    return cache
