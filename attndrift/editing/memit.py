"""MEMIT: mass-editing memory over a range of MLP layers (METHOD §3, last paragraph).

For a batch of requests:

1. **Target residuals** z_i: for each request, δ_i is optimised on the residual stream after
   the last layer of the range (``blocks.{L_last}.hook_resid_post``) at the subject's last
   token, with the same objective as ROME's v* (:mod:`attndrift.editing.value`, including SADR when
   given); z_i = z_i⁰ + δ_i.
2. **Spread over layers** L_1 < … < L_m (:func:`attndrift.editing.layer_loop.spread`): for each
   layer in turn, with the updates of the earlier layers already in place,

   * K ``[d_mlp, n]``: each request's key at s_last, averaged over the context templates;
   * R ``[n, d_model]``: (z_i − current residual at L_last) / (number of layers left);
   * ``ΔW = (λ C + K Kᵀ)⁻¹ K R`` in the ``[d_mlp, d_model]`` layout (λ = mom2_update_weight;
     :func:`least_squares`).

:func:`edit` returns an :class:`attndrift.editing.edits.Edit` with one factor pair per layer
(``left = (λC + KKᵀ)⁻¹K``, ``right = R``); the model is unchanged on return.
"""

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformer_lens import HookedTransformer

from attndrift import checks, interrupts, models
from attndrift.data import EditRequest
from attndrift.editing import covariance, kit, layer_loop, registry
from attndrift.editing.covariance import CovarianceConfig
from attndrift.editing.edits import Edit
from attndrift.editing.kit import EditorConfig, TemplateConfig
from attndrift.editing.sadr import SadrConfig
from attndrift.editing.value import ValueConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class MemitConfig(EditorConfig):
    """MEMIT hyper-parameters (defaults: MEMIT's released GPT-J values but the layers).

    With the fields of :class:`attndrift.editing.kit.EditorConfig`; MEMIT clamps δ to
    0.75 ‖z⁰‖ on GPT-J.
    """

    layers: tuple[int, ...]  # the edited MLP layers, ascending; z is optimised after the last
    value: ValueConfig = field(
        default_factory=lambda: ValueConfig(steps=25, clamp_norm_factor=0.75)
    )  # MEMIT's z optimisation
    mom2_update_weight: float = 15000.0  # λ in (λ C + K Kᵀ)

    def __post_init__(self) -> None:
        checks.layers("MEMIT", self.layers)
        checks.number("mom2_update_weight", self.mom2_update_weight, low=0, above=True)
        checks.optional_steps("sadr_steps", self.sadr_steps)


#: Documented defaults (MEMIT's released GPT-J and GPT-2 XL settings; Llama per the SADR
#: paper's setting; SmolLM2: five layers centred on its ROME layer 6, λ = 2000 and early
#: stopping on the NLL term, chosen by the rule of the study docs/studies/calibration.md).
PRESETS: dict[str, MemitConfig] = {
    "gpt-j": MemitConfig(layers=(3, 4, 5, 6, 7, 8)),
    "gpt2-xl": MemitConfig(
        layers=(13, 14, 15, 16, 17),
        value=ValueConfig(steps=20, clamp_norm_factor=0.75),
        mom2_update_weight=20000.0,
    ),
    "llama": MemitConfig(
        layers=(4, 5, 6, 7, 8),
        value=ValueConfig(steps=25, weight_decay=1e-3, clamp_norm_factor=0.75),
    ),
    "smollm2-135m": MemitConfig(  # calibrated on dev records 1000-1059 (the same study)
        layers=(4, 5, 6, 7, 8),
        value=ValueConfig(steps=25, clamp_norm_factor=0.75, early_stop_on="nll"),
        mom2_update_weight=2000.0,
        covariance=CovarianceConfig(n_tokens=32_768, text_tokens=128),
    ),
    "tiny": MemitConfig(
        layers=(0, 1),
        value=ValueConfig(steps=20, clamp_norm_factor=4.0),
        templates=TemplateConfig(lengths=((3, 2), (5, 2))),
        covariance=CovarianceConfig(n_tokens=2000, text_tokens=32),
    ),
}
#: the paper used 0.005 for MEMIT + SADR on GPT-J
SADR_GAMMA = 0.005


def preset(model: HookedTransformer | str) -> MemitConfig:
    """The documented default :class:`MemitConfig` for a model (by name)."""
    return kit.preset_for(PRESETS, model, "MEMIT")


def covariances(model, cfg: EditorConfig, given, progress) -> dict[int, torch.Tensor | None]:
    """C of each of ``cfg.layers`` (MEMIT's or PMET's config): given, from ``cfg.covariance``
    (cached), or None (the identity); all from the weights as they are now (before a layer
    loop edits any)."""
    out: dict[int, torch.Tensor | None] = {}
    for layer in cfg.layers:
        if given is not None and layer in given:
            out[layer] = given[layer]
        elif cfg.covariance is not None:
            out[layer] = covariance.layer_covariance(
                model, layer, cfg.covariance, progress=progress
            )
        else:
            out[layer] = None
    return out


def least_squares(cov: torch.Tensor | None, keys: torch.Tensor, mom2_weight: float) -> torch.Tensor:
    """``(λ C + K Kᵀ)⁻¹ K`` (float64, ``[d_mlp, n]``; ``cov=None``: C = I), by Woodbury's
    identity ``(λC + KKᵀ)⁻¹K = (λC)⁻¹K (I + Kᵀ(λC)⁻¹K)⁻¹``: with C factored once
    (:func:`attndrift.editing.covariance.solve`), n triangular solves and an n × n solve. A C that
    is not positive definite takes the dense solve."""
    keys = keys.double()
    if cov is not None and covariance.cholesky(cov) is None:
        return torch.linalg.solve(mom2_weight * cov.double() + keys @ keys.T, keys)
    ck = covariance.solve(cov, keys).to(keys.device) / mom2_weight  # (λC)⁻¹K  [d_mlp, n]
    small = torch.eye(keys.shape[1], dtype=torch.float64, device=keys.device) + keys.T @ ck
    return torch.linalg.solve(small, ck.T).T  # small is symmetric


def least_squares_solve(
    covs: Mapping[int, torch.Tensor | None], mom2_weight: float
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """MEMIT's solve for :func:`attndrift.editing.layer_loop.spread`: ``(layer, K) ->
    (λ C_layer + K Kᵀ)⁻¹ K`` (:func:`least_squares`; a C of None is the identity)."""

    def solve(layer: int, keys: torch.Tensor) -> torch.Tensor:
        return least_squares(covs[layer], keys, mom2_weight)

    return solve


def spread(
    model: HookedTransformer,
    requests: Sequence[EditRequest],
    targets: torch.Tensor,
    hook: str,
    layers: Sequence[int],
    mom2_weight: float,
    covs: dict[int, torch.Tensor | None],
    templates: Sequence[str],
    share: Callable[[int], float] = float,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """MEMIT's layer loop (METHOD §3.5): :func:`attndrift.editing.layer_loop.spread` with MEMIT's
    least-squares solve (:func:`least_squares_solve`). Returns the factors (left [d_mlp, n],
    right [n, d_model]) per layer; the weights are restored on return."""
    solve = least_squares_solve(covs, mom2_weight)
    return layer_loop.spread(model, requests, targets, hook=hook, layers=layers,
                             templates=templates, solve=solve, share=share)[0]  # fmt: skip


@interrupts.keeps_grad_mode  # an interrupt inside a no_grad block cannot leave it off
def edit(
    model: HookedTransformer,
    requests: Sequence[EditRequest],
    cfg: MemitConfig | None = None,
    *,
    sadr: SadrConfig | None = None,
    covs: dict[int, torch.Tensor] | None = None,
    templates: Sequence[str] | None = None,
    progress: bool = False,
    memo: kit.TargetMemo | None = None,
) -> Edit:
    """Compute a MEMIT edit of ``requests`` (the model is unchanged on return).

    Args:
        model: the model to edit.
        requests: one or more edit requests (edited together).
        cfg: hyper-parameters (default: :func:`preset` of the model).
        sadr: SADR on the z optimisation (``None`` = plain MEMIT).
        covs: precomputed C per layer (default: from ``cfg.covariance``, cached).
        templates: precomputed context templates.
        progress: show progress bars.
        memo: targets already optimised (:class:`attndrift.editing.kit.TargetMemo`), reused
            where everything they depend on is the same (a grid over λ optimises z once).
    """
    cfg = cfg or preset(model)
    z_name = models.resid_post_hook(cfg.layers[-1])

    def spread(requests, z, templates, covs_now) -> list:
        solve = least_squares_solve(covs_now, cfg.mom2_update_weight)
        return layer_loop.spread(model, requests, z, hook=z_name, layers=cfg.layers,
                                 templates=templates, solve=solve)[0]  # fmt: skip

    # every C from the unedited weights, before the layer loop changes the lower layers (also
    # keeps the on-disk cache key, which hashes the weights, the same for every layer)
    return kit.batch_edit(
        model, requests, cfg, name="memit", title="MEMIT", hooks=z_name, desc="MEMIT z",
        sadr=sadr, templates=templates, progress=progress, memo=memo,
        covariances=lambda: covariances(model, cfg, covs, progress), spread=spread,
    )  # fmt: skip


registry.register(
    registry.EditorSpec(
        name="memit",
        config=MemitConfig,
        presets=PRESETS,
        preset=preset,
        edit=edit,
        takes={"layers", "mom2_weight"},
    )
)
