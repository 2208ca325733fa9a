"""ROME: rank-one model editing of ``W_out`` at one layer (METHOD §3), optionally with SADR.

The algorithm, in ROME's three parts:

1. **Key** ū: the mean of the MLP key k (``blocks.{L}.mlp.hook_post``) at the subject's last
   token over the context templates filled with the edit prompt. The update direction is
   ``left = C⁻¹ ū`` with C = E[k kᵀ] (:mod:`attndrift.editing.covariance`).
2. **Value** v*: v_0 + δ, δ optimised as in :mod:`attndrift.editing.value` at
   ``blocks.{L}.hook_mlp_out`` (with ``γ · L_SADR`` when SADR is on).
3. **Update**: with k₀, m₀ the key and MLP output of the bare prompt at s_last,
   ``ΔW = left (v* − m₀)ᵀ / (leftᵀ k₀)`` in the ``[d_mlp, d_model]`` layout, so the edited MLP
   maps k₀ to v*. ``denominator="mean_key"`` (r-ROME) uses ``leftᵀ ū`` instead.

:func:`edit` returns an :class:`attndrift.editing.edits.Edit`; the model is unchanged on return.
Context templates (METHOD §3.1) are ``"{}"`` plus prefixes sampled from the model, seeded.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import checks, interrupts, models
from attndrift.data import EditRequest
from attndrift.editing import covariance, kit, registry, value
from attndrift.editing.covariance import CovarianceConfig
from attndrift.editing.edits import Edit
from attndrift.editing.kit import EditorConfig, TemplateConfig
from attndrift.editing.sadr import SadrConfig
from attndrift.editing.value import ValueConfig

log = logging.getLogger(__name__)


#: what ROME's update divides by: leftᵀ k₀ (ROME's code) or leftᵀ ū (r-ROME)
Denominator = Literal["k0", "mean_key"]


@dataclass(frozen=True, kw_only=True)
class RomeConfig(EditorConfig):
    """ROME hyper-parameters. See :data:`PRESETS` for the documented per-model defaults.

    With the fields of :class:`attndrift.editing.kit.EditorConfig` (value, templates, covariance,
    sadr_steps: the paper ran 80 steps with SADR instead of 20 on GPT-J).
    """

    layer: int  # the edited layer L
    denominator: str = "k0"  # a Denominator (str: checks.option says why); "mean_key": r-ROME
    sadr_steps: int | None = 80

    def __post_init__(self) -> None:
        checks.number("layer", self.layer, low=0, integer=True)
        checks.option("denominator", self.denominator, Denominator)
        checks.optional_steps("sadr_steps", self.sadr_steps)

    @property
    def editor(self) -> str:
        return "rome" if self.denominator == "k0" else "r-rome"


_GPTJ = RomeConfig(layer=5)
#: Documented defaults. GPT-2 XL / GPT-J: ROME's released hyper-parameters (METHOD §3);
#: Llama: the paper's Llama-3-8B setting; SmolLM2-135M: layer 6, the best Score among the
#: layers reaching ES and PS >= 90 % in the layer sweep of ``docs/studies/calibration.md``
#: (``scripts/layer_sweep.sh``), C from 32k tokens of self-sampled text, and the value
#: optimisation calibrated on dev records 1000-1099 by the rule of the study
#: ``docs/studies/calibration.md``: at most 25 steps, stopping when the NLL term (not
#: the whole loss) falls below 0.05.
PRESETS: dict[str, RomeConfig] = {
    "gpt2-xl": RomeConfig(layer=17),
    "gpt-j": _GPTJ,
    "llama": RomeConfig(layer=5, value=ValueConfig(steps=25, weight_decay=1e-3)),
    "smollm2-135m": RomeConfig(
        layer=6,
        value=ValueConfig(steps=25, early_stop_on="nll"),
        covariance=CovarianceConfig(n_tokens=32_768, text_tokens=128),
    ),
    "tiny": RomeConfig(
        layer=1,
        value=ValueConfig(steps=20),
        templates=TemplateConfig(lengths=((3, 2), (5, 2))),
        covariance=CovarianceConfig(n_tokens=2000, text_tokens=32),
        sadr_steps=None,
    ),
}


def preset(model: HookedTransformer | str) -> RomeConfig:
    """The documented default :class:`RomeConfig` for a model (by name)."""
    return kit.preset_for(PRESETS, model, "ROME")


def rank_one(
    cov: Float[Tensor, "d_mlp d_mlp"] | None,
    mean_key: Float[Tensor, " d_mlp"],
    k0: Float[Tensor, " d_mlp"],
    m0: Float[Tensor, " d_model"],
    target: Float[Tensor, " d_model"],
    denominator: Denominator = "k0",
) -> tuple[Float[Tensor, "d_mlp 1"], Float[Tensor, "1 d_model"]]:
    """ROME's update ``ΔW = left (v* − m₀)ᵀ / (leftᵀ k)`` as factors (left, right).

    ``left = C⁻¹ ū`` (normalised; the product does not depend on its scale), ``k`` = k₀ or ū.
    """
    key = mean_key.double()
    left = covariance.solve(cov, key)  # C⁻¹ū (C factored once per C)
    left = left / left.norm()
    k = k0 if denominator == "k0" else mean_key
    denom = left @ k.double()
    if denom.abs() < 1e-12:
        raise ValueError("ROME update is degenerate: leftᵀk is zero")
    right = (target.double() - m0.double()) / denom
    dtype = mean_key.dtype
    return left[:, None].to(dtype), right[None, :].to(dtype)


@interrupts.keeps_grad_mode  # an interrupt inside a no_grad block cannot leave it off
def edit(
    model: HookedTransformer,
    request: EditRequest,
    cfg: RomeConfig | None = None,
    *,
    sadr: SadrConfig | None = None,
    cov: Tensor | None = None,
    templates: Sequence[str] | None = None,
    progress: bool = False,
) -> Edit:
    """Compute a ROME edit of ``request`` (the model is unchanged on return).

    Args:
        model: the model to edit.
        request: subject, prompt, true and new object.
        cfg: hyper-parameters (default: :func:`preset` of the model).
        sadr: SADR settings (``None`` = plain ROME).
        cov: precomputed C for ``cfg.layer`` (default: from ``cfg.covariance``, cached).
        templates: precomputed context templates (default: sampled per ``cfg.templates``).
        progress: show progress bars.
    """
    cfg = cfg or preset(model)
    layer = cfg.layer
    clock, templates = kit.begin(model, (layer,), cfg, templates)
    if cov is None and cfg.covariance is not None:
        cov = covariance.layer_covariance(model, layer, cfg.covariance, progress=progress)
    clock.lap("covariance")
    key_name, out_name = models.mlp_key_hook(layer), models.mlp_out_hook(layer)
    prompts = kit.filled(templates, request.prompt)
    acts = kit.keys_at_subject(model, prompts, request.subject, [key_name, out_name], layer + 1)
    mean_key = acts[key_name].mean(0)  # [d_mlp]: ū
    k0, m0 = acts[key_name][0], acts[out_name][0]  # templates[0] == "{}": the bare prompt
    clock.lap("keys")
    value_cfg = kit.value_config(cfg, sadr)
    objective = value.ValueObjective(model, request, out_name, layer, templates, value_cfg, sadr)
    clock.lap("value_setup")
    result = value.optimise_value(objective, progress=progress, desc=f"ROME L{layer}")
    clock.lap("value_steps")
    left, right = rank_one(cov, mean_key, k0, m0, result.target, cfg.denominator)
    clock.lap("solve")
    return kit.finish(
        model, name=cfg.editor, cfg=cfg, sadr=sadr, requests=[request], layers=[layer],
        factors=[(left, right)], results=[result], clock=clock, n_templates=len(templates),
    )  # fmt: skip


def _edit_requests(
    model: HookedTransformer,
    requests: Sequence[EditRequest],
    cfg: RomeConfig,
    *,
    sadr: SadrConfig | None,
    covs: dict[int, Tensor],
    templates: Sequence[str] | None,
    progress: bool,
    memo: kit.TargetMemo | None,
) -> Edit:
    """:func:`edit` called as the registry calls every editor (one request; C of its layer
    in ``covs`` or none: the identity; ROME keeps no memo of targets)."""
    if len(requests) != 1:
        raise ValueError("ROME edits one request at a time")
    return edit(model, requests[0], cfg, sadr=sadr, cov=covs.get(cfg.layer), templates=templates,
                progress=progress)  # fmt: skip


registry.register(
    registry.EditorSpec(
        name="rome",
        config=RomeConfig,
        presets=PRESETS,
        preset=preset,
        edit=_edit_requests,
        takes={"layer", "r_rome"},
        batch=False,
        layers=lambda cfg: (cfg.layer,),
    )
)
