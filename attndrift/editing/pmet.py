"""PMET: precise model editing in a transformer (Li et al., AAAI 2024), METHOD §3.6.

PMET notes that the residual stream after a block is the sum of the attention output, the MLP
output and the block's input, and that MEMIT's target z lumps them together although only the
MLP weights are edited. It optimises two deltas instead, and writes only the MLP's part:

1. **Targets** (per request): δ_a added to the attention output (``blocks.{L}.hook_attn_out``)
   and δ_m added to the MLP output (``blocks.{L}.hook_mlp_out``) of the last layer L of the
   range, at the subject's last token of every rewriting prompt, optimised jointly by Adam on
   the objective of METHOD §3.3 (:class:`attndrift.editing.value.ValueObjective` with both hooks,
   and SADR's term when given) with, as PMET's code does it:

   * weight decay ``weight_decay · (‖δ_a‖ / ‖a_0‖² + ‖δ_m‖ / ‖m_0‖²)``, each delta relative
     to its own initial activation, and each clamped to ``clamp_norm_factor`` times its own
     initial norm after every step;
   * the NLL schedule of PMET's ``compute_zs``: after the loss of a step is evaluated, if o_new
     is already the argmax at every target position of every rewriting prompt, the NLL term
     weighs ``greedy_nll_factor`` (0.1) in the following steps, and the optimisation stops if
     the essence KL term (``kl_factor`` · KL) is at most ``greedy_kl_stop`` (0.01) as well;
     once o_new stops being the argmax, the weight returns to 1. PMET's code tests this as the
     exact float equality of the mean probability of o_new with the mean of the maximal
     probabilities, which holds exactly when o_new is the argmax everywhere.

   The MLP target m*_i = m_0 + δ_m is kept; the attention delta only shapes it.
2. **Spread over layers** L_1 < … < L_m as MEMIT's loop (:mod:`attndrift.editing.memit`), with
   the MLP output of L_m in place of the residual: for each layer in turn, with the earlier layers'
   updates in place, K ``[d_mlp, n]`` = each request's key averaged over the templates,
   R ``[n, d_model]`` = (m*_i − the current MLP output of L_m at s_last) / d, and
   ``ΔW = (λ C + K Kᵀ)⁻¹ K R``. PMET's code divides by d = √(layers left)
   (``spread="sqrt"``, the default); ``spread="layers_left"`` divides by the layers left, as
   MEMIT does.

:func:`edit` returns an :class:`attndrift.editing.edits.Edit` with one factor pair per layer
(``left = (λC + KKᵀ)⁻¹K``, ``right = R``) whose run records the MLP targets m*_i and the
traces (``delta_norm`` = ‖δ_m‖); the model is unchanged on return.
"""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import checks, interrupts, models
from attndrift.data import EditRequest
from attndrift.editing import kit, layer_loop, memit, registry, value
from attndrift.editing.covariance import CovarianceConfig
from attndrift.editing.edits import Edit
from attndrift.editing.kit import EditorConfig, TemplateConfig
from attndrift.editing.sadr import SadrConfig
from attndrift.editing.value import ValueConfig, ValueObjective, ValueResult

log = logging.getLogger(__name__)


#: what R is divided by: √(layers left) (PMET's code) or the layers left (MEMIT)
Spread = Literal["sqrt", "layers_left"]


@dataclass(frozen=True, kw_only=True)
class PmetConfig(EditorConfig):
    """PMET hyper-parameters (defaults: PMET's GPT-J values in EasyEdit but the layers).

    With the fields of :class:`attndrift.editing.kit.EditorConfig`; ``sadr_steps``: the SADR paper
    ran PMET + SADR 40 steps on GPT-J.
    """

    layers: tuple[int, ...]  # the edited MLP layers, ascending; the deltas sit in the last
    value: ValueConfig = field(
        default_factory=lambda: ValueConfig(
            steps=30, lr=0.2, weight_decay=0.5, clamp_norm_factor=0.75, kl_factor=1.0
        )
    )  # the two deltas' optimisation (EasyEdit's PMET GPT-J values)
    mom2_update_weight: int | float = 15000.0  # λ in (λ C + K Kᵀ)
    spread: str = "sqrt"  # a Spread (str: checks.option says why); "sqrt": PMET's code
    greedy_nll_factor: int | float = 0.1  # NLL weight while o_new is the argmax everywhere
    greedy_kl_stop: int | float = 0.01  # then stop once kl_factor · KL is at most this
    sadr_steps: int | None = 40

    def __post_init__(self) -> None:
        checks.layers("PMET", self.layers)
        checks.number("mom2_update_weight", self.mom2_update_weight, low=0, above=True)
        checks.option("spread", self.spread, Spread)
        checks.number("greedy_nll_factor", self.greedy_nll_factor, low=0)
        checks.number("greedy_kl_stop", self.greedy_kl_stop, low=0)
        checks.optional_steps("sadr_steps", self.sadr_steps)


#: Documented defaults. GPT-J: PMET's hyper-parameters in EasyEdit, which the SADR paper's
#: PMET runs use (layers 3-8, 30 steps at lr 0.2, weight decay 0.5, clamp 0.75, KL factor 1,
#: λ 15000; 40 steps with SADR); Llama: the SADR code's Llama-3-8B PMET setting; SmolLM2:
#: MEMIT's SmolLM2 layers, and lr 0.5, clamp 4, λ 2000 from the tuning slice of the study
#: docs/studies/calibration.md (at GPT-J's lr 0.2 the MLP delta stays too small to edit 95 % of
#: facts in 30 steps), with SADR in PMET's own step budget.
PRESETS: dict[str, PmetConfig] = {
    "gpt-j": PmetConfig(layers=(3, 4, 5, 6, 7, 8)),
    "llama": PmetConfig(
        layers=(4, 5, 6, 7, 8),
        value=ValueConfig(steps=20, lr=0.5, weight_decay=0.5, clamp_norm_factor=4.0),
        sadr_steps=None,
    ),
    "smollm2-135m": PmetConfig(
        layers=(4, 5, 6, 7, 8),
        value=ValueConfig(steps=30, lr=0.5, weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=1.0),
        mom2_update_weight=2000.0,
        covariance=CovarianceConfig(n_tokens=32_768, text_tokens=128),
        sadr_steps=None,  # SADR in PMET's own budget: no step-count confound
    ),
    "tiny": PmetConfig(
        layers=(0, 1),
        value=ValueConfig(steps=20, clamp_norm_factor=4.0),
        templates=TemplateConfig(lengths=((3, 2), (5, 2))),
        covariance=CovarianceConfig(n_tokens=2000, text_tokens=32),
        sadr_steps=None,
    ),
}
#: the SADR paper's γ for PMET + SADR on GPT-J
SADR_GAMMA = 0.08


def preset(model: HookedTransformer | str) -> PmetConfig:
    """The documented default :class:`PmetConfig` for a model (by name)."""
    return kit.preset_for(PRESETS, model, "PMET")


def delta_hooks(layer: int) -> tuple[str, str]:
    """The two activations PMET adds a delta to: attention output, then MLP output."""
    return models.attn_out_hook(layer), models.mlp_out_hook(layer)


def nll_schedule(cfg: PmetConfig) -> value.Schedule:
    """PMET's NLL schedule (module docstring) as a step schedule of
    :func:`attndrift.editing.value.optimise`: after a step where o_new is the argmax everywhere, the
    NLL term weighs ``greedy_nll_factor`` (else 1), and the optimisation stops if
    ``kl_factor`` · KL is at most ``greedy_kl_stop`` as well."""

    def schedule(terms: value.LossTerms) -> tuple[float, str | None]:
        greedy = bool(terms.greedy)
        factor = cfg.greedy_nll_factor if greedy else 1.0
        if greedy and terms.kl.item() <= cfg.greedy_kl_stop:
            return (
                factor,
                f"o_new leads everywhere and KL {terms.kl.item():.3g} <= {cfg.greedy_kl_stop:g}",
            )
        return factor, None

    return schedule


def optimise_deltas(
    objective: ValueObjective, cfg: PmetConfig, progress: bool = False, desc: str = "PMET"
) -> tuple[ValueResult, ...]:
    """Adam on the stacked deltas of a several-hook objective, with PMET's NLL schedule
    (:func:`attndrift.editing.value.optimise` with :func:`nll_schedule`).

    As :func:`attndrift.editing.value.optimise_value` (at most ``steps − 1`` updates, the early stop
    on ``early_stop_on``, the model frozen), but each δ_h is clamped to
    ``clamp_norm_factor · ‖v_0,h‖`` on its own and the NLL weight follows PMET (module
    docstring). Returns one :class:`~attndrift.editing.value.ValueResult` per hook, in the
    objective's hook order, whose traces share every term but ``delta_norm`` (‖δ_h‖).
    """
    return value.optimise(objective, nll_schedule(cfg), progress=progress, desc=desc)


@interrupts.keeps_grad_mode  # an interrupt inside a no_grad block cannot leave it off
def edit(
    model: HookedTransformer,
    requests: Sequence[EditRequest],
    cfg: PmetConfig | None = None,
    *,
    sadr: SadrConfig | None = None,
    covs: dict[int, Tensor] | None = None,
    templates: Sequence[str] | None = None,
    progress: bool = False,
    memo: kit.TargetMemo | None = None,
) -> Edit:
    """Compute a PMET edit of ``requests`` (the model is unchanged on return).

    Args:
        model: the model to edit.
        requests: one or more edit requests (edited together).
        cfg: hyper-parameters (default: :func:`preset` of the model).
        sadr: SADR on the deltas' optimisation (``None`` = plain PMET).
        covs: precomputed C per layer (default: from ``cfg.covariance``, cached).
        templates: precomputed context templates.
        progress: show progress bars.
        memo: deltas already optimised (:class:`attndrift.editing.kit.TargetMemo`), reused where
            everything they depend on is the same (a λ grid optimises them once).
    """
    cfg = cfg or preset(model)
    share = math.sqrt if cfg.spread == "sqrt" else float
    m_name = models.mlp_out_hook(cfg.layers[-1])

    def spread(requests, targets, templates, covs_now) -> list:
        """MEMIT's layer loop on the MLP output of the last layer."""
        solve = memit.least_squares_solve(covs_now, cfg.mom2_update_weight)
        return layer_loop.spread(model, requests, targets, hook=m_name, layers=cfg.layers,
                                 templates=templates, solve=solve, share=share)[0]  # fmt: skip

    # the targets: the MLP delta's result per request (the attention delta is not written)
    return kit.batch_edit(
        model, requests, cfg, name="pmet", title="PMET", hooks=delta_hooks(cfg.layers[-1]),
        desc="PMET deltas", sadr=sadr, templates=templates, progress=progress, memo=memo,
        covariances=lambda: memit.covariances(model, cfg, covs, progress), spread=spread,
        optimise=lambda objective, **kw: optimise_deltas(objective, cfg, **kw)[1],
        reads=(cfg.greedy_nll_factor, cfg.greedy_kl_stop),
    )  # fmt: skip


registry.register(
    registry.EditorSpec(
        name="pmet",
        config=PmetConfig,
        presets=PRESETS,
        preset=preset,
        edit=edit,
        takes={"layers", "mom2_weight"},
    )
)
