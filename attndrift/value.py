"""Value optimisation: the v* (ROME) and z (MEMIT) objective of SPEC §3.3, with SADR (§4).

An additive δ ∈ R^{d_model} is added to one activation (ROME: the MLP output of layer L,
MEMIT: the residual stream after layer L) at the subject's last token of every prompt in one
batch:

* rewriting prompts: each context template filled with the edit prompt, followed by
  ``o_new``'s tokens but the last (teacher forcing);
* the essence prompt ``"{subject} is a"``.

and Adam minimises

    L(δ) = mean_j NLL(o_new | rewriting prompt j)                      (per-token mean)
         + kl_factor · KL(p_δ(·|essence) ‖ p_0(·|essence))              at s_last
         + weight_decay · ‖δ‖ / ‖v_0‖²
         + γ · L_SADR                                                   (optional, sadr.py)

projecting δ onto ``‖δ‖ ≤ clamp_norm_factor · ‖v_0‖`` after each step and stopping once
``L < early_stop_loss``; like ROME's code, at most ``steps − 1`` updates are made and the
returned δ is the one whose loss was last evaluated. The model's parameters are frozen (their
``requires_grad`` flags are restored afterwards); gradients reach δ through the attention
pattern hooks that SADR reads.
"""

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from attndrift import encoding, models, sadr
from attndrift.data import EditRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueConfig:
    """Hyper-parameters of the δ optimisation (ROME's names; GPT-J values as defaults)."""

    steps: int = 20  # v_num_grad_steps
    lr: float = 0.5  # v_lr
    weight_decay: float = 0.5  # v_weight_decay
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    essence_prompt: str = "{} is a"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if "{}" not in self.essence_prompt:
            raise ValueError("essence_prompt needs '{}' for the subject")


@dataclass(frozen=True)
class LossTerms:
    """The terms of L(δ) at one δ (``sadr`` unweighted; ``total`` includes γ·sadr)."""

    total: Tensor
    nll: Tensor
    kl: Tensor
    weight_decay: Tensor
    sadr: Tensor
    heads: Tensor  # [layers after the edit]: restrained heads per layer, mean over prompts
    p_new: Tensor  # mean over rewriting prompts of exp(-NLL)


@dataclass(frozen=True)
class StepLog:
    """One optimisation step (numbers as Python floats, for logs and JSON)."""

    step: int
    loss: float
    nll: float
    kl: float
    weight_decay: float
    sadr: float
    p_new: float
    delta_norm: float
    heads: tuple[float, ...]


@dataclass(frozen=True)
class ValueResult:
    """δ, the activation it is added to (v_0 / z_0), and the per-step trace."""

    delta: Float[Tensor, " d_model"]
    init: Float[Tensor, " d_model"]
    trace: tuple[StepLog, ...]
    seconds: float

    @property
    def target(self) -> Float[Tensor, " d_model"]:
        """v* = v_0 + δ."""
        return self.init + self.delta


@contextmanager
def frozen(model: HookedTransformer) -> Iterator[None]:
    """Parameters without gradients inside the block; previous flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def fill(template: str, prompt: str) -> str:
    """``template`` with its ``{}`` replaced by ``prompt`` (prompt may contain braces)."""
    return template.replace("{}", prompt, 1)


class ValueObjective:
    """L(δ) for one request, hook point and template set; see the module docstring.

    Construction runs the model once at δ = 0 to record v_0, the essence distribution p_0 and
    (for SADR) the vanilla attention rows.

    Args:
        model: the model (unchanged by this class).
        request: the edit.
        hook_name: activation δ is added to (``models.mlp_out_hook(L)`` or
            ``models.resid_post_hook(L)``).
        layer: the layer of ``hook_name``; SADR reads the attention of layers > ``layer``.
        templates: context templates; ``templates[0]`` must be ``"{}"`` (the bare prompt,
            whose activation is v_0).
        cfg: hyper-parameters.
        sadr_cfg: SADR settings, or None for none. With γ = 0 the SADR term is computed and
            logged but not added, so the optimisation is exactly plain ROME.
    """

    def __init__(
        self,
        model: HookedTransformer,
        request: EditRequest,
        hook_name: str,
        layer: int,
        templates: Sequence[str],
        cfg: ValueConfig,
        sadr_cfg: sadr.SadrConfig | None = None,
    ):
        if not templates or templates[0] != "{}":
            raise ValueError('templates[0] must be "{}" (the bare edit prompt)')
        models.check_layer(model, layer)
        self.model, self.cfg, self.sadr_cfg, self.hook_name = model, cfg, sadr_cfg, hook_name
        target = encoding.encode_answer(model, request.target_new)
        self.target = target
        rows, subject_last, prompt_last = [], [], []
        for t in templates:
            e = encoding.encode_prompt(model, fill(t, request.prompt), request.subject)
            rows.append(e.ids + target[:-1])
            subject_last.append(e.subject_last)
            prompt_last.append(e.last)
        essence = encoding.encode_prompt(
            model, cfg.essence_prompt.format(request.subject), request.subject
        )
        rows.append(essence.ids)
        subject_last.append(essence.subject_last)
        device = models.model_device(model)
        self.n_rewrite = len(templates)
        self.tokens = encoding.pad(model, rows)
        self.subject_last = torch.tensor(subject_last, device=device)
        self.prompt_last = torch.tensor(prompt_last, device=device)
        # delta goes to (row, subject_last[row]) of every row
        self.onehot = torch.zeros(self.tokens.shape, device=device, dtype=model.cfg.dtype)
        self.onehot[torch.arange(len(rows), device=device), self.subject_last] = 1.0
        # positions predicting o_new's tokens in the rewriting rows
        n_t = len(target)
        self.nll_rows = torch.arange(self.n_rewrite, device=device).repeat_interleave(n_t)
        self.nll_pos = (self.prompt_last[:, None] + torch.arange(n_t, device=device)).flatten()
        self.nll_target = torch.tensor(target, device=device).repeat(self.n_rewrite)
        self.sadr_layers = list(range(layer + 1, model.cfg.n_layers))
        self.layer = layer

        with torch.no_grad():
            # blocks before `layer` do not depend on delta: run them once, start there later
            self.resid_pre = model(self.tokens, stop_at_layer=layer)
            zero = torch.zeros(model.cfg.d_model, device=device, dtype=model.cfg.dtype)
            hidden, init, rows_now = self._forward(zero, capture_init=True)
            self.init = init
            self.essence_logp0 = self._essence_logp(hidden)
            self.vanilla_rows = rows_now  # [prompt, layer, head, key] at delta = 0

    def _forward(self, delta: Tensor, capture_init: bool = False):
        store: dict[str, Tensor] = {}
        pattern_rows: dict[int, Tensor] = {}
        prompts = torch.arange(self.n_rewrite, device=self.tokens.device)

        def add_delta(x: Tensor, hook) -> Tensor:
            if capture_init:
                store["init"] = x[0, self.subject_last[0]].detach().clone().to(self.tokens.device)
            # (multi-GPU models: the loss lives on the first device, this layer may not)
            return x + self.onehot.to(x.device)[:, :, None] * delta.to(x.device)

        def keep_rows(pattern: Tensor, hook) -> None:
            layer = hook.layer()
            # query row t_j of each rewriting prompt: [prompt, head, key]
            rows = pattern[prompts.to(pattern.device), :, self.prompt_last.to(pattern.device), :]
            pattern_rows[layer] = rows.to(self.tokens.device)  # one device (multi-GPU models)

        hooks = [(self.hook_name, add_delta)]
        if self.sadr_cfg is not None:
            hooks += [(models.pattern_hook(layer), keep_rows) for layer in self.sadr_layers]
        hidden = models.final_hidden_from(self.model, self.resid_pre, self.layer, fwd_hooks=hooks)
        hidden = hidden.to(self.tokens.device)
        rows = (
            torch.stack([pattern_rows[layer] for layer in self.sadr_layers], dim=1)
            if self.sadr_cfg is not None and self.sadr_layers
            else None
        )
        return hidden, store.get("init"), rows

    def _essence_logp(self, hidden: Tensor) -> Tensor:
        h = hidden[self.n_rewrite, self.subject_last[self.n_rewrite]]
        return torch.log_softmax(models.unembed(self.model, h).float(), -1)

    def __call__(self, delta: Float[Tensor, " d_model"]) -> LossTerms:
        """All loss terms at ``delta`` (differentiable w.r.t. ``delta``)."""
        hidden, _, rows = self._forward(delta)
        picked = hidden[self.nll_rows, self.nll_pos]
        logp = torch.log_softmax(models.unembed(self.model, picked).float(), -1)
        token_logp = logp.gather(1, self.nll_target[:, None])[:, 0]
        per_prompt = -token_logp.view(self.n_rewrite, len(self.target)).mean(1)
        nll = per_prompt.mean()
        ess = self._essence_logp(hidden)
        kl = self.cfg.kl_factor * (ess.exp() * (ess - self.essence_logp0)).sum()
        wd = self.cfg.weight_decay * delta.norm() / self.init.norm() ** 2
        total = nll + kl + wd
        zero = torch.zeros((), device=delta.device)
        sadr_term, heads = zero, torch.zeros(len(self.sadr_layers), device=delta.device)
        if rows is not None:
            subject = self.subject_last[: self.n_rewrite]
            sadr_term, heads = sadr.sadr_loss(
                self.vanilla_rows, rows, subject, all_heads=self.sadr_cfg.all_heads
            )
            if self.sadr_cfg.gamma > 0:
                total = total + self.sadr_cfg.gamma * sadr_term
        return LossTerms(total, nll, kl, wd, sadr_term, heads, torch.exp(-per_prompt).mean())


def optimise_value(
    objective: ValueObjective, progress: bool = False, desc: str = "value"
) -> ValueResult:
    """Adam on δ as ROME does it (see module docstring); returns δ, v_0 and the trace."""
    cfg, model = objective.cfg, objective.model
    t0 = time.perf_counter()
    delta = torch.zeros_like(objective.init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    max_norm = cfg.clamp_norm_factor * objective.init.norm()
    trace = []
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", disable=not progress, leave=False)
    with frozen(model):
        for step in bar:
            opt.zero_grad()
            terms = objective(delta)
            trace.append(
                StepLog(
                    step=step,
                    loss=terms.total.item(),
                    nll=terms.nll.item(),
                    kl=terms.kl.item(),
                    weight_decay=terms.weight_decay.item(),
                    sadr=terms.sadr.item(),
                    p_new=terms.p_new.item(),
                    delta_norm=delta.norm().item(),
                    heads=tuple(round(h, 3) for h in terms.heads.tolist()),
                )
            )
            log.debug("%s", trace[-1])
            bar.set_postfix(loss=f"{trace[-1].loss:.3f}", p_new=f"{trace[-1].p_new:.2f}")
            if terms.total.item() < cfg.early_stop_loss or step == cfg.steps - 1:
                break
            terms.total.backward()
            opt.step()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    bar.close()
    return ValueResult(delta.detach(), objective.init, tuple(trace), time.perf_counter() - t0)
