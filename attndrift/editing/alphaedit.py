"""AlphaEdit: null-space constrained editing (Fang et al., ICLR 2025), METHOD §3.7.

MEMIT's update ``(λC + KKᵀ)⁻¹KR`` trades the new facts against the preserved ones through C.
AlphaEdit removes the trade-off: it projects the update onto the null space of the preserved
keys, so that no preserved key's MLP output changes at all, and spends the whole solve on the
new facts (and, when editing sequentially, on keeping the earlier edits).

1. **Targets** z_i: MEMIT's z optimisation (:mod:`attndrift.editing.value` at
   ``blocks.{L_last}.hook_resid_post``, with SADR's term when given).
2. **Null space** of each layer (:func:`null_space_projection`): with C = E[k kᵀ] the keys'
   second moment (:mod:`attndrift.editing.covariance`; AlphaEdit's code takes the same uncentred
   moment from 100k Wikipedia texts) and C = U diag(σ) Uᵀ, Û = the eigenvectors with σ below
   ``null_threshold`` (an absolute threshold on the eigenvalues of C itself, as AlphaEdit's
   code does: the singular values of C, compared with ``nullspace_threshold`` = 2e-2 in every
   released setting; the paper's text says 1e-2), and ``P = Û Ûᵀ`` ``[d_mlp, d_mlp]``. A
   preserved key k (in the span of the large-eigenvalue directions) has P k ≈ 0.
3. **Spread over layers** as MEMIT's loop (:func:`attndrift.editing.layer_loop.spread`, with
   AlphaEdit's solve): for each layer in turn, with the earlier layers'
   updates in place, K₁ ``[d_mlp, n]`` = each request's key averaged over the templates and
   R ``[n, d_model]`` = (z_i − the current residual at L_last) / (layers left), then
   (:func:`solve`) ``ΔW = (P (K₁K₁ᵀ + K_pK_pᵀ) + α I)⁻¹ P K₁ R``, with K_p the keys of the
   earlier edits of a sequence and α = ``l2_weight``.

**The solve, in attndrift's layout** (``out = key @ W_out``, ``W_out [d_mlp, d_model]``).
AlphaEdit's update is a projected one, ΔW = P X. It asks the new keys to move their outputs
by R, the earlier edits' keys K_p to keep theirs, and ΔW to stay small::

    min_X  ‖K₁ᵀ P X − R‖² + ‖K_pᵀ P X‖² + α ‖P X‖²

(with P X in place of X, preserved keys k₀ give k₀ᵀ P X ≈ 0: their term is gone). Setting
the gradient ``2 P [K₁(K₁ᵀPX − R) + K_pK_pᵀPX + α PX]`` to zero and writing Y = PX (P is a
symmetric projection, so PY = Y): ``P A Y + α Y = P K₁ R`` with A = K₁K₁ᵀ + K_pK_pᵀ, hence
``Y = (P A + α I)⁻¹ P K₁ R``: AlphaEdit's ``R K₁ᵀ P (K_pK_pᵀP + K₁K₁ᵀP + αI)⁻¹`` transposed
into this layout (its code solves exactly this system, with α = ``L2`` = 10). Since
``(PA + αI) P = P (AP + αI)``, ``Y = P (AP + αI)⁻¹ K₁ R``: every column of ΔW lies in the
range of P, so ``k₀ᵀ ΔW = 0`` for every k₀ orthogonal to it (the preserved directions).

**Sequential editing**: :func:`edit_in_sequence` takes an :class:`AlphaEditState` (the
projections, from the first model's C, and K_p) and returns the next one, with this edit's
keys (recomputed on the edited weights, after every layer's update, as AlphaEdit's code
does) appended. :func:`edit` is one edit from an empty state.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import checks, interrupts, models
from attndrift.data import EditRequest
from attndrift.editing import covariance, kit, layer_loop, memit, registry
from attndrift.editing.covariance import CovarianceConfig
from attndrift.editing.edits import Edit
from attndrift.editing.kit import EditorConfig, TemplateConfig
from attndrift.editing.sadr import SadrConfig
from attndrift.editing.value import ValueConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AlphaEditConfig(EditorConfig):
    """AlphaEdit hyper-parameters (defaults: AlphaEdit's released GPT-J values but the layers).

    With the fields of :class:`attndrift.editing.kit.EditorConfig`; C is required (its null space
    is the point), so ``covariance=None`` needs precomputed ``covs``.
    """

    layers: tuple[int, ...]  # the edited MLP layers, ascending; z is optimised after the last
    value: ValueConfig = field(
        default_factory=lambda: ValueConfig(steps=25, clamp_norm_factor=0.75)
    )  # MEMIT's z optimisation (AlphaEdit's GPT-J values)
    null_threshold: int | float = 2e-2  # eigenvalues of C below this span the null space
    l2_weight: int | float = 10.0  # α in (P (K₁K₁ᵀ + K_pK_pᵀ) + α I) (AlphaEdit's "L2")

    def __post_init__(self) -> None:
        checks.layers("AlphaEdit", self.layers)
        checks.number("null_threshold", self.null_threshold, low=0, above=True)
        checks.number("l2_weight", self.l2_weight, low=0, above=True)
        checks.optional_steps("sadr_steps", self.sadr_steps)


#: Documented defaults: AlphaEdit's released GPT-J, GPT-2 XL and Llama-3-8B settings (its
#: z optimisation is MEMIT's; threshold 2e-2, α = 10); SmolLM2: MEMIT's SmolLM2 layers with
#: the released threshold and α (not calibrated further, see the study docs/studies/editors.md);
#: its z optimisation is MEMIT's calibrated one, so a sweep shares z between the two editors.
PRESETS: dict[str, AlphaEditConfig] = {
    "gpt-j": AlphaEditConfig(layers=(3, 4, 5, 6, 7, 8)),
    "gpt2-xl": AlphaEditConfig(
        layers=(13, 14, 15, 16, 17), value=ValueConfig(steps=20, clamp_norm_factor=0.75)
    ),
    "llama": AlphaEditConfig(
        layers=(4, 5, 6, 7, 8), value=ValueConfig(steps=25, lr=0.1, clamp_norm_factor=0.75)
    ),
    "smollm2-135m": AlphaEditConfig(  # MEMIT's calibrated layers and z optimisation
        layers=memit.PRESETS["smollm2-135m"].layers,
        value=memit.PRESETS["smollm2-135m"].value,
        covariance=memit.PRESETS["smollm2-135m"].covariance,
    ),
    "tiny": AlphaEditConfig(
        layers=(0, 1),
        value=ValueConfig(steps=20, clamp_norm_factor=4.0),
        templates=TemplateConfig(lengths=((3, 2), (5, 2))),
        covariance=CovarianceConfig(n_tokens=2000, text_tokens=32),
    ),
}


def preset(model: HookedTransformer | str) -> AlphaEditConfig:
    """The documented default :class:`AlphaEditConfig` for a model (by name)."""
    return kit.preset_for(PRESETS, model, "AlphaEdit")


@dataclass(frozen=True, eq=False)
class AlphaEditState:
    """What sequential AlphaEdit carries from one edit to the next, per layer (float32, as
    AlphaEdit's code keeps P; the solve runs in float64)."""

    projections: dict[int, Float[Tensor, "d_mlp d_mlp"]]  # P, from the first model's C
    keys: dict[int, Float[Tensor, "d_mlp n"]]  # K_p: the keys of every earlier edit

    def after(self, added: dict[int, Tensor]) -> "AlphaEditState":
        """This state with ``added`` keys ``[d_mlp, n]`` appended to K_p of each layer."""
        keys = {layer: torch.cat([k, added[layer].to(k)], dim=1) for layer, k in self.keys.items()}
        return AlphaEditState(self.projections, keys)


def null_space_projection(
    cov: Float[Tensor, "d_mlp d_mlp"], threshold: int | float
) -> Float[Tensor, "d_mlp d_mlp"]:
    """``P = Û Ûᵀ`` (float32) with Û the eigenvectors of C whose eigenvalues are below
    ``threshold`` (absolute): the directions the preserved keys (almost) never take."""
    sigma, u = torch.linalg.eigh(cov.double())  # C is symmetric PSD: eigh == its SVD
    small = u[:, sigma < threshold]  # [d_mlp, null]
    log.info("null space: %d of %d directions below %g", small.shape[1], len(sigma), threshold)
    return (small @ small.T).float()


def solve(
    keys: Float[Tensor, "d_mlp n"],
    projection: Float[Tensor, "d_mlp d_mlp"],
    previous: Float[Tensor, "d_mlp m"],
    l2_weight: int | float,
) -> Float[Tensor, "d_mlp n"]:
    """``left = (P (K₁K₁ᵀ + K_pK_pᵀ) + α I)⁻¹ P K₁`` (float64): ΔW = left @ R (module
    docstring); ``previous`` may have no columns (a first edit).

    With W = [K₁ K_p] (r columns) and U = P W the matrix is α I + U Wᵀ, so Woodbury's identity
    gives ``left = (b − U (α I_r + Wᵀ U)⁻¹ Wᵀ b) / α`` with b = P K₁: an r × r solve instead
    of a d_mlp × d_mlp one (r = the keys of this and the earlier edits)."""
    w = torch.cat([keys.double(), previous.double().to(keys.device)], dim=1)  # [d_mlp, r]
    u = projection.double().to(keys.device) @ w  # P W
    b = u[:, : keys.shape[1]]  # P K₁
    small = l2_weight * torch.eye(w.shape[1], dtype=torch.float64, device=w.device) + w.T @ u
    return (b - u @ torch.linalg.solve(small, w.T @ b)) / l2_weight


def initial_state(
    model: HookedTransformer,
    cfg: AlphaEditConfig,
    covs: dict[int, Tensor] | None = None,
    progress: bool = False,
) -> AlphaEditState:
    """The state before a first edit: P of every layer from C (``covs`` or
    ``cfg.covariance``, cached) of the model's current weights, and no earlier keys."""
    projections = {}
    for layer in cfg.layers:
        if covs is not None and layer in covs:
            c = covs[layer]
        elif cfg.covariance is not None:
            c = covariance.layer_covariance(model, layer, cfg.covariance, progress=progress)
        else:
            raise ValueError("AlphaEdit projects onto C's null space: it needs C (covariance)")
        projections[layer] = null_space_projection(c, cfg.null_threshold)
    empty = torch.zeros(model.cfg.d_mlp, 0, device=models.model_device(model))
    return AlphaEditState(projections, {layer: empty for layer in cfg.layers})


@interrupts.keeps_grad_mode  # an interrupt inside a no_grad block cannot leave it off
def edit_in_sequence(
    model: HookedTransformer,
    requests: Sequence[EditRequest],
    cfg: AlphaEditConfig | None = None,
    *,
    state: AlphaEditState | None = None,
    sadr: SadrConfig | None = None,
    covs: dict[int, Tensor] | None = None,
    templates: Sequence[str] | None = None,
    progress: bool = False,
    memo: kit.TargetMemo | None = None,
) -> tuple[Edit, AlphaEditState]:
    """Compute an AlphaEdit edit of ``requests`` and the state a next edit takes.

    A sequential loop applies each edit before the next::

        state = None
        for batch in batches:
            e, state = alphaedit.edit_in_sequence(model, batch, cfg, state=state)
            edits.add_to_weights(model, e)

    Args:
        model: the model to edit (the model is unchanged on return).
        requests: one or more edit requests (edited together).
        cfg: hyper-parameters (default: :func:`preset` of the model).
        state: the previous edits' state (default: :func:`initial_state` of this model).
        sadr: SADR on the z optimisation (``None`` = plain AlphaEdit).
        covs: precomputed C per layer, for a new state (default: ``cfg.covariance``, cached).
        templates: precomputed context templates.
        progress: show progress bars.
        memo: targets already optimised (:class:`attndrift.editing.kit.TargetMemo`), reused
            where everything they depend on is the same.
    """
    cfg = cfg or preset(model)
    if state is not None and set(state.projections) != set(cfg.layers):
        raise ValueError(f"the state is for layers {sorted(state.projections)}, not {cfg.layers}")
    z_name = models.resid_post_hook(cfg.layers[-1])
    added: dict[int, Tensor] = {}  # this edit's keys on the edited weights (the next one keeps)

    def projections() -> AlphaEditState:
        nonlocal state
        if state is None:  # every P from the weights before this edit (and its layer loop)
            state = initial_state(model, cfg, covs, progress)
        return state

    def spread(requests, z, templates, before: AlphaEditState) -> list:
        def projected(layer: int, keys: Tensor) -> Tensor:
            p, kp = before.projections[layer], before.keys[layer]
            return solve(keys, p.to(keys.device), kp.to(keys.device), cfg.l2_weight)

        factors, keys = layer_loop.spread(
            model, requests, z, hook=z_name, layers=cfg.layers, templates=templates,
            solve=projected, keys_after=True,
        )  # fmt: skip
        added.update(keys)
        return factors

    e = kit.batch_edit(
        model, requests, cfg, name="alphaedit", title="AlphaEdit", hooks=z_name,
        desc="AlphaEdit z", sadr=sadr, templates=templates, progress=progress, memo=memo,
        covariances=projections, spread=spread,
    )  # fmt: skip
    return e, projections().after(added)


def edit(
    model: HookedTransformer,
    requests: Sequence[EditRequest],
    cfg: AlphaEditConfig | None = None,
    *,
    sadr: SadrConfig | None = None,
    covs: dict[int, Tensor] | None = None,
    templates: Sequence[str] | None = None,
    progress: bool = False,
    memo: kit.TargetMemo | None = None,
) -> Edit:
    """One AlphaEdit edit of ``requests`` from the model's current weights (no earlier edits
    to keep); the arguments as :func:`edit_in_sequence`'s."""
    return edit_in_sequence(
        model, requests, cfg, sadr=sadr, covs=covs, templates=templates, progress=progress,
        memo=memo,
    )[0]  # fmt: skip


registry.register(
    registry.EditorSpec(
        name="alphaedit",
        config=AlphaEditConfig,
        presets=PRESETS,
        preset=preset,
        edit=edit,
        edit_in_sequence=edit_in_sequence,
        takes={"layers", "null_threshold"},
        refuses={"identity_cov": "it projects onto C's null space"},
    )
)
