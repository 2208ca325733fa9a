"""The layer loop of the batch editors (METHOD §3.5): targets spread over a range of layers.

MEMIT, PMET and AlphaEdit write their targets into layers L_1 < … < L_m the same way and
differ only in the solve. For each layer in turn, with the updates of the earlier layers
already in the weights:

* K ``[d_mlp, n]``: each request's MLP key at the subject's last token, averaged over the
  context templates (:class:`attndrift.editing.kit.MeanKeys`);
* R ``[n, d_model]``: the targets minus what the watched activation (at L_m) reads now at the
  subjects, divided by ``share(layers left)`` (MEMIT: the layers left; PMET: their root);
* ``left = solve(layer, K)`` ``[d_mlp, n]`` and ``ΔW = left @ R``, added to ``W_out`` before
  the next layer's keys are read.

The solves: MEMIT's least squares ``(λC + KKᵀ)⁻¹K``
(:func:`attndrift.editing.memit.least_squares_solve`, also PMET's) and AlphaEdit's null-space
projected one (:func:`attndrift.editing.alphaedit.solve`).
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import models
from attndrift.data import EditRequest
from attndrift.editing import kit
from attndrift.editing.edits import restored

#: ``solve(layer, keys [d_mlp, n] float64) -> left [d_mlp, n] float64``
Solve = Callable[[int, Tensor], Tensor]


def spread(
    model: HookedTransformer,
    requests: Sequence[EditRequest],
    targets: Tensor,
    *,
    hook: str,
    layers: Sequence[int],
    templates: Sequence[str],
    solve: Solve,
    share: Callable[[int], float] = float,
    keys_after: bool = False,
) -> tuple[list[tuple[Tensor, Tensor]], dict[int, Tensor]]:
    """The layer loop (module docstring): ``targets`` [n, d_model] at ``hook`` (an activation
    of the last of ``layers``) written into the MLPs of ``layers`` by ``solve``. The weights
    are restored on return.

    Returns the factors ``(left [d_mlp, n], right [n, d_model])`` per layer, in the model's
    dtype, and, with ``keys_after``, each layer's mean keys ``[d_mlp, n]`` (float32) read
    with every layer's update in place (AlphaEdit's keys for the next edit of a sequence);
    else an empty dict.
    """
    z_layer = layers[-1]
    prompts, subjects = [r.prompt for r in requests], [r.subject for r in requests]
    factors = []
    read_keys = kit.MeanKeys(model, requests, templates)  # each layer's update comes after
    with restored(model, layers):
        for i, layer in enumerate(layers):
            keys = read_keys(layer).double().T  # [d_mlp, n]
            now = kit.keys_at_subject(model, prompts, subjects, [hook], z_layer + 1)[hook]
            resid = (targets - now).double() / share(len(layers) - i)  # [n, d_model]
            left = solve(layer, keys)  # [d_mlp, n]
            factors.append((left.to(model.cfg.dtype), resid.to(model.cfg.dtype)))
            w = models.mlp_out_weight(model, layer)
            with torch.no_grad():
                w.add_((left @ resid).to(w.dtype))
        after: dict[int, Tensor] = {}
        if keys_after:
            read_keys = kit.MeanKeys(model, requests, templates)  # the weights as edited
            after = {layer: read_keys(layer).float().T for layer in layers}  # [d_mlp, n] each
    return factors, after
