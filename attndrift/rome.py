"""ROME: rank-one model editing of ``W_out`` at one layer (SPEC §3), optionally with SADR.

The algorithm, in ROME's three parts:

1. **Key** ū: the mean of the MLP key k (``blocks.{L}.mlp.hook_post``) at the subject's last
   token over the context templates filled with the edit prompt. The update direction is
   ``left = C⁻¹ ū`` with C = E[k kᵀ] (:mod:`attndrift.covariance`).
2. **Value** v*: v_0 + δ, δ optimised as in :mod:`attndrift.value` at ``blocks.{L}.hook_mlp_out``
   (with ``γ · L_SADR`` when SADR is on).
3. **Update**: with k₀, m₀ the key and MLP output of the bare prompt at s_last,
   ``ΔW = left (v* − m₀)ᵀ / (leftᵀ k₀)`` in the ``[d_mlp, d_model]`` layout, so the edited MLP
   maps k₀ to v*. ``denominator="mean_key"`` (r-ROME) uses ``leftᵀ ū`` instead.

:func:`edit` returns an :class:`attndrift.edit.Edit`; the model is unchanged on return.
Context templates (SPEC §3.1) are ``"{}"`` plus prefixes sampled from the model, seeded.
"""

import dataclasses
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import covariance, encoding, generation, models, value
from attndrift.covariance import CovarianceConfig
from attndrift.data import EditRequest
from attndrift.edit import Edit
from attndrift.sadr import SadrConfig
from attndrift.value import ValueConfig

log = logging.getLogger(__name__)

#: MEMIT's openings for sampling context templates.
TEMPLATE_OPENINGS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class TemplateConfig:
    """Context templates: ``count`` samples of ``length`` tokens for each (length, count)."""

    lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    seed: int = 0
    top_k: int = 5


@dataclass(frozen=True)
class RomeConfig:
    """ROME hyper-parameters. See :data:`PRESETS` for the documented per-model defaults.

    Attributes:
        layer: the edited layer L.
        value: the δ optimisation (steps, lr, weight decay, clamp, KL factor).
        templates: context templates.
        covariance: where C comes from; ``None`` uses the identity (no C⁻¹ adjustment).
        denominator: ``"k0"`` (ROME's code) or ``"mean_key"`` (r-ROME).
        sadr_steps: optimisation steps when SADR is on (γ > 0): the paper used 80 instead of
            20 on GPT-J; ``None`` keeps ``value.steps``.
    """

    layer: int
    value: ValueConfig = field(default_factory=ValueConfig)
    templates: TemplateConfig = field(default_factory=TemplateConfig)
    covariance: CovarianceConfig | None = field(default_factory=CovarianceConfig)
    denominator: str = "k0"  # "k0" | "mean_key" (validated: a clear error for CLI input)
    sadr_steps: int | None = 80

    def __post_init__(self) -> None:
        if self.denominator not in ("k0", "mean_key"):
            raise ValueError(f"denominator must be 'k0' or 'mean_key', got {self.denominator!r}")

    @property
    def editor(self) -> str:
        return "rome" if self.denominator == "k0" else "r-rome"


_GPTJ = RomeConfig(layer=5)
#: Documented defaults. GPT-2 XL / GPT-J: ROME's released hyper-parameters (SPEC §3);
#: Llama: the paper's Llama-3-8B setting; SmolLM2-135M: layer 6, the best Score among the
#: layers reaching ES and PS >= 90 % in the layer sweep of ``docs/RESULTS.md``
#: (``scripts/layer_sweep.sh``), C from 32k tokens of self-sampled text.
PRESETS: dict[str, RomeConfig] = {
    "gpt2-xl": RomeConfig(layer=17),
    "gpt-j": _GPTJ,
    "llama": RomeConfig(layer=5, value=ValueConfig(steps=25, weight_decay=1e-3)),
    "smollm2-135m": RomeConfig(
        layer=6, covariance=CovarianceConfig(n_tokens=32_768, text_tokens=128)
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
    name = model if isinstance(model, str) else model.cfg.model_name
    key = name.lower()
    if key.startswith("tiny"):
        return PRESETS["tiny"]
    if "smollm2" in key:
        return PRESETS["smollm2-135m"]
    if "gpt2-xl" in key:
        return PRESETS["gpt2-xl"]
    if "gpt-j" in key:
        return PRESETS["gpt-j"]
    if "llama" in key:
        return PRESETS["llama"]
    raise ValueError(f"no ROME preset for {name!r}: pass a RomeConfig (presets: {sorted(PRESETS)})")


def context_templates(model: HookedTransformer, cfg: TemplateConfig) -> tuple[str, ...]:
    """``"{}"`` plus ``"<sampled text>. {}"`` for each configured (length, count); seeded."""
    texts = []
    for i, (length, count) in enumerate(cfg.lengths):
        openings = [TEMPLATE_OPENINGS[j % len(TEMPLATE_OPENINGS)] for j in range(count)]
        texts += generation.sample(
            model, openings, max_new_tokens=length, seed=cfg.seed + i, top_k=cfg.top_k
        )
    # braces would clash with the placeholder; newlines make odd prefixes
    clean = [re.sub(r"\s+", " ", t.replace("{", " ").replace("}", " ")).strip() for t in texts]
    return ("{}", *(f"{t}. {{}}" for t in clean))


@torch.no_grad()
def read_at_subject(
    model: HookedTransformer,
    prompts: Sequence[str],
    subject: str | Sequence[str],
    hook_names: Sequence[str],
    stop_at_layer: int | None = None,
    fwd_hooks: Sequence = (),
) -> dict[str, Tensor]:
    """Activations ``[n_prompts, d]`` of ``hook_names`` at the subject's last token.

    ``subject`` is one subject for all prompts or one per prompt.
    """
    subjects = [subject] * len(prompts) if isinstance(subject, str) else list(subject)
    batch = encoding.encode_batch(model, prompts, subjects)
    rows = torch.arange(len(prompts), device=batch.tokens.device)
    out: dict[str, Tensor] = {}

    def keep(x: Tensor, hook) -> None:
        out[hook.name] = x[rows, batch.subject_last].detach().clone()

    model.run_with_hooks(
        batch.tokens,
        return_type=None,
        stop_at_layer=stop_at_layer,
        fwd_hooks=[*fwd_hooks, *[(n, keep) for n in hook_names]],
    )
    return out


def rank_one(
    cov: Float[Tensor, "d_mlp d_mlp"] | None,
    mean_key: Float[Tensor, " d_mlp"],
    k0: Float[Tensor, " d_mlp"],
    m0: Float[Tensor, " d_model"],
    target: Float[Tensor, " d_model"],
    denominator: Literal["k0", "mean_key"] = "k0",
) -> tuple[Float[Tensor, "d_mlp 1"], Float[Tensor, "1 d_model"]]:
    """ROME's update ``ΔW = left (v* − m₀)ᵀ / (leftᵀ k)`` as factors (left, right).

    ``left = C⁻¹ ū`` (normalised; the product does not depend on its scale), ``k`` = k₀ or ū.
    """
    key = mean_key.double()
    left = key if cov is None else torch.linalg.solve(cov.double(), key)
    left = left / left.norm()
    k = k0 if denominator == "k0" else mean_key
    denom = left @ k.double()
    if denom.abs() < 1e-12:
        raise ValueError("ROME update is degenerate: leftᵀk is zero")
    right = (target.double() - m0.double()) / denom
    dtype = mean_key.dtype
    return left[:, None].to(dtype), right[None, :].to(dtype)


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
        request: subject, prompt, new and true object.
        cfg: hyper-parameters (default: :func:`preset` of the model).
        sadr: SADR settings (``None`` = plain ROME).
        cov: precomputed C for ``cfg.layer`` (default: from ``cfg.covariance``, cached).
        templates: precomputed context templates (default: sampled per ``cfg.templates``).
        progress: show progress bars.
    """
    cfg = cfg or preset(model)
    layer = cfg.layer
    models.check_layer(model, layer)
    clock = _Clock()
    if templates is None:
        templates = context_templates(model, cfg.templates)
    clock.lap("templates")
    if cov is None and cfg.covariance is not None:
        cov = covariance.layer_covariance(model, layer, cfg.covariance, progress=progress)
    clock.lap("covariance")

    key_name, out_name = models.mlp_key_hook(layer), models.mlp_out_hook(layer)
    filled = [value.fill(t, request.prompt) for t in templates]
    acts = read_at_subject(model, filled, request.subject, [key_name, out_name], layer + 1)
    mean_key = acts[key_name].mean(0)
    k0, m0 = acts[key_name][0], acts[out_name][0]  # templates[0] == "{}": the bare prompt
    clock.lap("keys")

    value_cfg = cfg.value
    if sadr is not None and sadr.gamma > 0 and cfg.sadr_steps is not None:
        value_cfg = dataclasses.replace(value_cfg, steps=cfg.sadr_steps)
    objective = value.ValueObjective(model, request, out_name, layer, templates, value_cfg, sadr)
    clock.lap("value_setup")
    result = value.optimise_value(objective, progress=progress, desc=f"ROME L{layer}")
    clock.lap("value_steps")
    left, right = rank_one(cov, mean_key, k0, m0, result.target, cfg.denominator)
    clock.lap("solve")
    info = {
        "steps_run": len(result.trace),
        "final": asdict(result.trace[-1]),
        "trace": [asdict(s) for s in result.trace],
        "value_seconds": result.seconds,
        "seconds": clock.total(),
        "timings": clock.laps,
        "sadr": None if sadr is None else asdict(sadr),
        "n_templates": len(templates),
    }
    return Edit(
        layers=(layer,),
        left=(left,),
        right=(right,),
        requests=(request,),
        editor=cfg.editor + ("+sadr" if sadr is not None and sadr.gamma > 0 else ""),
        hparams=_jsonable(asdict(cfg)),
        model_name=model.cfg.model_name,
        info=info,
    )


class _Clock:
    """Wall time of an edit's phases (``laps``: phase -> seconds)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
