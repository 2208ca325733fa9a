"""Value optimisation: the v* (ROME) and z (MEMIT) objective of METHOD §3.3, with SADR (§4).

An additive δ ∈ R^{d_model} is added to one activation (ROME: the MLP output of layer L,
MEMIT: the residual stream after layer L) at the subject's last token of every prompt in one
batch:

* rewriting prompts: each context template filled with the edit prompt, followed by
  ``o_new``'s tokens but the last (teacher forcing);
* the essence prompt ``"{subject} is a"``.

and Adam minimises

    L(δ) = mean_j NLL(o_new | rewriting prompt j)                      (per-token mean)
         + kl_factor · KL(p_δ(·|essence) ‖ p_0(·|essence))              at s_last
         + relation_kl · mean_r KL(p_δ(·|relation r) ‖ p_0(·|relation r)) at the last token
         + offtarget · mean_o max(0, log P_δ(o_new|o) − log P_0(o_new|o))  off-target prompts
         + weight_decay · ‖δ‖ / ‖v_0‖²
         + γ · L_SADR                                                   (optional, sadr.py)

The relation term (a variant, off by default: ``relation_kl = 0``) keeps the subject's other
facts: the next-token distribution after generic relation prompts of the subject
(:data:`attndrift.editing.sadr.RELATION_TEMPLATES`, none of the evaluation's prompts) stays
where the unedited model had it. The loss terms report it inside ``kl``.

The off-target term (a variant, off by default: ``offtarget = 0``) is a hinge in the spirit of
APP (Ma et al., 2024): it penalises only a *rise* of the length-normalised log-probability of
``o_new`` (teacher-forced, mean over its tokens) on prompts that must not answer it, and leaves
the rest of their next-token distribution free. The off-target prompts are the generic relation
prompts of the subject and *distractors*: the sentence stating the edit,
``"{edit prompt} {o_new}. "``, followed by a query about another subject of the same relation
(:mod:`attndrift.distractors`; none of them an evaluation prompt). SADR can restrain the
distractors' attention too (``SadrConfig.prompts``): there, reading the subject is never needed.

Stopping: besides ROME's rule, a *margin stop* (``stop_margin = m``) also requires the edit
prompt's margin, ``log P_δ(o_new) − log P_δ(o_true)`` (length-normalised, as the evaluation
scores answers), to reach m; ``early_stop_on="margin"`` stops on the margin alone (plain ROME
stopped at a given edit strength: the efficacy-matched baseline of a variant).

projecting δ onto ``‖δ‖ ≤ clamp_norm_factor · ‖v_0‖`` after each step and stopping once
``L < early_stop_loss`` (ROME's rule; ``early_stop_on="nll"`` compares the NLL term alone,
which can trigger when the weight-decay term alone stays above the threshold; see above for
the margin stop); like ROME's
code, at most ``steps − 1`` updates are made and the returned δ is the one whose loss was last
evaluated. The model's parameters are frozen (their
``requires_grad`` flags are restored afterwards); gradients reach δ through the attention
pattern hooks that SADR reads.
"""

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from attndrift import capture, checks, distractors, encoding, interrupts, models
from attndrift.data import EditRequest
from attndrift.editing import sadr

log = logging.getLogger(__name__)


#: what stops the optimisation early: the whole loss (ROME), the NLL term, or the edit prompt's
#: margin alone
StopOn = Literal["loss", "nll", "margin"]


@dataclass(frozen=True)
class ValueConfig:
    """Hyper-parameters of the δ optimisation (ROME's names; GPT-J values as defaults)."""

    steps: int = 20  # v_num_grad_steps
    lr: float = 0.5  # v_lr
    weight_decay: float = 0.5  # v_weight_decay
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05  # stop once the watched quantity falls below this
    # what stops early (a StopOn; typed str: checks.option says why): "loss" (ROME: the whole
    # L), "nll" (the NLL term alone), "margin" (the edit prompt's margin alone reaches
    # stop_margin)
    early_stop_on: str = "loss"
    essence_prompt: str = "{} is a"
    relation_kl: float = 0.0  # variant: weight of the relation prompts' KL (0: ROME's loss)
    prefix_cache: bool = True  # each step runs only what δ reaches (False: full reference)
    stop_margin: float | None = None  # variant: stopping also needs this edit-prompt margin
    offtarget: float = 0.0  # variant: weight of the off-target hinge (0: ROME's loss)
    distractors: int = 2  # distractor prompts per request (off-target term, SADR's distractors)

    def __post_init__(self) -> None:
        checks.number("steps", self.steps, low=1, integer=True)
        checks.number("lr", self.lr, low=0, above=True)
        checks.number("weight_decay", self.weight_decay, low=0)
        checks.number("clamp_norm_factor", self.clamp_norm_factor, low=0, above=True)
        checks.number("kl_factor", self.kl_factor, low=0)
        checks.number("relation_kl", self.relation_kl, low=0)
        checks.number("early_stop_loss", self.early_stop_loss, low=0)
        checks.option("early_stop_on", self.early_stop_on, StopOn)
        if not isinstance(self.essence_prompt, str) or checks.template_problem(self.essence_prompt):
            raise ValueError("essence_prompt needs exactly one '{}' for the subject")
        if self.stop_margin is not None:
            checks.number("stop_margin", self.stop_margin)
        if self.early_stop_on == "margin" and self.stop_margin is None:
            raise ValueError('early_stop_on="margin" needs stop_margin (the margin to reach)')
        checks.number("offtarget", self.offtarget, low=0)
        checks.number("distractors", self.distractors, low=0, integer=True)

    @property
    def needs_distractors(self) -> bool:
        """Whether the objective scores distractor prompts (the off-target term)."""
        return self.offtarget > 0 and self.distractors > 0


@dataclass(frozen=True)
class LossTerms:
    """The terms of L(δ) at one δ (``sadr`` unweighted; ``total`` includes γ·sadr and the
    weighted off-target hinge)."""

    total: Tensor
    nll: Tensor
    kl: Tensor
    weight_decay: Tensor
    sadr: Tensor
    heads: Tensor  # [layers after the edit]: restrained heads per layer, mean over prompts
    p_new: Tensor  # mean over rewriting prompts of exp(-NLL)
    offtarget: Tensor | None = None  # the hinge, unweighted (None: the term is off)
    margin: Tensor | None = None  # the edit prompt's margin (None: no margin stop)
    # o_new's token is the argmax (ties count) at every target position of every rewriting
    # prompt (a detached bool; PMET's NLL schedule reads it)
    greedy: Tensor | None = None


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
    offtarget: float | None = None  # the off-target hinge, unweighted (None: off)
    margin: float | None = None  # log P(o_new) − log P(o_true) on the edit prompt (None: off)

    def __repr__(self) -> str:
        sadr = ""
        if self.heads:
            sadr = f", sadr {self.sadr:.4g}, heads restrained {sum(self.heads):.1f}"
        return (
            f"StepLog(step {self.step}: loss {self.loss:.4g}, nll {self.nll:.4g}, kl "
            f"{self.kl:.4g}, weight decay {self.weight_decay:.4g}{sadr}, P(o_new) "
            f"{self.p_new:.3f}, ‖δ‖ {self.delta_norm:.3g})"
        )


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
    """Parameters without gradients inside the block; previous flags restored after (also
    after an interrupt: :func:`attndrift.interrupts.on_exit`)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore() -> None:
        for p, flag in flags:
            p.requires_grad_(flag)

    with interrupts.on_exit(restore):
        for p, _ in flags:
            p.requires_grad_(False)
        yield


@dataclass(frozen=True)
class _Rows:
    """The rows of the optimisation batch: the rewriting prompts (each context template
    filled with the edit prompt, then o_new's tokens but the last), the essence prompt, and,
    where a variant reads them: generic relation prompts of the subject (SADR's relation
    prompts, the relation KL term), off-target prompts followed by o_new's tokens (the hinge:
    the relation prompts, then the distractors), distractors alone (SADR on distractors
    without the hinge), and the edit prompt followed by o_true's tokens (the margin)."""

    ids: list[tuple[int, ...]]
    subject_first: list[int]
    subject_last: list[int]
    prompt_last: list[int]  # t_j: the last prompt token (predicts the answer's first token)
    n_rewrite: int  # rows 0 .. n_rewrite - 1 are rewriting prompts; then the essence row
    sadr_rows: list[int]  # the rows whose attention SADR restrains
    relation_rows: list[int]  # the generic relation prompts (empty unless a variant uses them)
    offtarget_rows: list[int]  # off-target prompts + o_new's tokens (empty: the hinge is off)
    true_row: int | None  # the edit prompt + o_true's tokens (None: no margin)


def _encode_rows(model, request, templates, target, cfg, sadr_cfg, queries) -> _Rows:
    encoded = [
        (encoding.encode_prompt(model, fill(t, request.prompt), request.subject), target)
        for t in templates
    ]
    essence = cfg.essence_prompt.format(request.subject)
    encoded.append((encoding.encode_prompt(model, essence, request.subject), ()))
    n_rewrite = len(templates)

    def add(prompts: Sequence[str], answer: tuple[int, ...] = ()) -> list[int]:
        start = len(encoded)
        for p in prompts:
            encoded.append((encoding.encode_prompt(model, p, request.subject), answer))
        return list(range(start, len(encoded)))

    restrained = sadr_cfg is not None and sadr_cfg.relation_prompts
    relations = [fill(t, request.subject) for t in sadr.RELATION_TEMPLATES]
    relation_rows = add(relations) if restrained or cfg.relation_kl > 0 else []
    distracting = [request.distraction + q for q in queries]
    offtarget_rows: list[int] = []
    if cfg.offtarget > 0:
        offtarget_rows = add(relations + distracting, target)
        distractor_rows = offtarget_rows[len(relations) :]
    elif sadr_cfg is not None and sadr_cfg.prompts != "rewrite":
        distractor_rows = add(distracting)
    else:
        distractor_rows = []
    true_row = None
    if cfg.stop_margin is not None:
        true_row = add([request.prompt], encoding.encode_answer(model, request.target_true))[0]
    sadr_rows = []
    if sadr_cfg is not None:
        if sadr_cfg.prompts != "distractors":
            sadr_rows += range(n_rewrite)
        if sadr_cfg.prompts != "rewrite":
            if not distractor_rows:
                raise ValueError(
                    "SADR on distractors needs distractor prompts: none for this request "
                    f"({request.subject!r}; ValueConfig.distractors = {cfg.distractors})"
                )
            sadr_rows += distractor_rows
        if restrained:
            sadr_rows += relation_rows
    return _Rows(
        ids=[e.ids + answer[:-1] for e, answer in encoded],
        subject_first=[e.subject_first for e, _ in encoded],
        subject_last=[e.subject_last for e, _ in encoded],
        prompt_last=[e.last for e, _ in encoded],
        n_rewrite=n_rewrite,
        sadr_rows=sadr_rows,
        relation_rows=relation_rows,
        offtarget_rows=offtarget_rows,
        true_row=true_row,
    )


def fill(template: str, prompt: str) -> str:
    """``template`` with its ``{}`` replaced by ``prompt`` (prompt may contain braces)."""
    return template.replace("{}", prompt, 1)


@dataclass(frozen=True)
class _Start:
    """The step batch before any step: its tokens (and attention mask and prefix cache, when
    prefix-cached), the residual the steps start from, and v_0."""

    tokens: Tensor  # [row, pos], or [row, width + n]: the prefix columns, then the suffix
    mask: Tensor | None  # [row, width + n], 1 on real tokens (prefix-cached only)
    cache: object | None  # the rows' frozen prefix cache (prefix-cached only)
    resid: Tensor  # [row, pos, d_model]: what the steps start from
    init: Tensor  # v_0 ([d_model], or [n_hooks, d_model])
    q_shift: list[int]  # per row: query positions of the step batch = prompt positions - this
    k_shift: list[int]  # per row: key positions of the step batch = prompt positions + this

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, positions) every step runs."""
        return tuple(self.resid.shape[:2])


def _start_full(model, rows: _Rows, layer: int, hook_names: Sequence[str], stacked: bool):
    """Reference: every position of every row runs from layer L at each step."""
    device = models.model_device(model)
    subject_last = torch.tensor(rows.subject_last, device=device)
    tokens = encoding.pad(model, rows.ids)
    # blocks before `layer` do not depend on delta: run them once, start there later
    resid = model(tokens, stop_at_layer=layer)
    at = capture.Select(1, subject_last[:, None])
    kept = capture.record(model, tokens, {n: at for n in hook_names}, stop_at_layer=layer + 1)
    init = [kept[n][0, 0].to(device) for n in hook_names]  # row 0 ("{}") at s_0
    zero = [0] * len(rows.ids)
    return _Start(tokens, None, None, resid, _precise(_stack(init, stacked)), zero, zero)


def _start_suffix(model, rows: _Rows, layer: int, hook_names: Sequence[str], stacked: bool):
    """Cache each row's prefix (positions < s_j) and run the rest up to layer L. The prefix
    is left-padded so that row j's s_j lands in column ``width``; the suffix is right-padded."""
    device, pad = models.model_device(model), models.pad_id(model)
    subject_last = rows.subject_last
    width = max(subject_last)
    suffixes = [r[s:] for r, s in zip(rows.ids, subject_last, strict=True)]
    n = max(len(x) for x in suffixes)
    prefix = [
        [pad] * (width - s) + list(r[:s]) for r, s in zip(rows.ids, subject_last, strict=True)
    ]
    suffix = [list(x) + [pad] * (n - len(x)) for x in suffixes]
    mask = [
        [0] * (width - s) + [1] * (s + len(x)) + [0] * (n - len(x))
        for s, x in zip(subject_last, suffixes, strict=True)
    ]
    tokens = torch.tensor([p + x for p, x in zip(prefix, suffix, strict=True)]).to(device)
    mask = torch.tensor(mask, device=device)  # [row, width + n]
    cache = models.prefix_cache(model, tokens[:, :width], mask[:, :width])
    # one hook: the residual after block L at s_j onwards, delta adds to it from here on;
    # several: the residual entering block L (the steps run block L with the deltas' hooks)
    entering = models.resid_pre_hook(layer)
    names = (*hook_names, entering) if stacked else hook_names
    rec = capture.Recorder(dict.fromkeys(names))
    after = models.resid_after_prefix(
        model, tokens[:, width:], cache, mask[:, width:], layer + 1, rec.hooks
    )
    kept = rec.values()
    resid = kept[entering].clone() if stacked else after  # [row, n, d_model]
    # row 0 ("{}") at its s_j, the first position that runs: v_0 / z_0
    init = [kept[name][0, 0].clone().to(device) for name in hook_names]
    # step coordinates: queries start at s_j, keys are shifted by width - s_j
    k_shift = [width - x for x in subject_last]
    return _Start(
        tokens, mask, cache, resid, _precise(_stack(init, stacked)), subject_last, k_shift
    )


def _stack(init: list[Tensor], stacked: bool) -> Tensor:
    return torch.stack(init) if stacked else init[0]


@dataclass(frozen=True)
class _Layout:
    """Where δ goes and where each loss term reads the step batch (row, position): the NLL's
    target positions, the relation prompts' last tokens, the answer rows (the off-target
    prompts' o_new, then the edit prompt's o_true)."""

    delta_pos: Tensor  # [row]: s_j
    onehot: Tensor  # [row, pos]: 1 at (row, s_j), where δ adds
    query: Tensor  # [prompt]: t_j of each rewriting prompt
    nll_rows: Tensor  # the NLL's (row, position, o_new token) of each target token
    nll_pos: Tensor
    nll_target: Tensor
    relation_rows: Tensor  # the relation prompts' rows and last tokens
    relation_query: Tensor
    answer_rows: Tensor  # each answer token's (row, position, token, answer row)
    answer_pos: Tensor
    answer_target: Tensor
    answer_of: Tensor
    n_answers: int

    @classmethod
    def place(cls, rows: _Rows, start: _Start, target, true_target, dtype, device) -> "_Layout":
        n_rows, width = start.shape
        s = [x - q for x, q in zip(rows.subject_last, start.q_shift, strict=True)]
        delta_pos = torch.tensor(s, device=device)
        onehot = torch.zeros(n_rows, width, device=device, dtype=dtype)
        onehot[torch.arange(n_rows, device=device), delta_pos] = 1.0
        # t_j, then the positions predicting o_new's tokens in the rewriting rows
        t = [x - q for x, q in zip(rows.prompt_last, start.q_shift, strict=True)]
        query = torch.tensor(t[: rows.n_rewrite], device=device)
        n_t = len(target)
        answers = [(j, target) for j in rows.offtarget_rows]
        if rows.true_row is not None:
            answers.append((rows.true_row, true_target))
        where = [(j, t[j] + i, tok, a) for a, (j, ans) in enumerate(answers)
                 for i, tok in enumerate(ans)]  # fmt: skip
        answer_rows, answer_pos, answer_target, answer_of = (
            torch.tensor([w[k] for w in where], device=device, dtype=torch.long) for k in range(4)
        )
        return cls(
            delta_pos=delta_pos,
            onehot=onehot,
            query=query,
            nll_rows=torch.arange(rows.n_rewrite, device=device).repeat_interleave(n_t),
            nll_pos=(query[:, None] + torch.arange(n_t, device=device)).flatten(),
            nll_target=torch.tensor(target, device=device).repeat(rows.n_rewrite),
            relation_rows=torch.tensor(rows.relation_rows, device=device, dtype=torch.long),
            relation_query=torch.tensor(
                [t[j] for j in rows.relation_rows], device=device, dtype=torch.long
            ),
            answer_rows=answer_rows,
            answer_pos=answer_pos,
            answer_target=answer_target,
            answer_of=answer_of,
            n_answers=len(answers),
        )

    def read_positions(self, essence_row: int) -> tuple[Tensor, Tensor]:
        """(rows, positions) whose final hidden states a loss term reads: the NLL's target
        positions, the essence row at s_j, the relation prompts' last tokens and the answer
        rows' positions. A new term that reads the hidden states elsewhere adds them here."""
        essence = torch.tensor([essence_row], device=self.delta_pos.device)
        rows = torch.cat([self.nll_rows, essence, self.relation_rows, self.answer_rows])
        pos = torch.cat(
            [self.nll_pos, self.delta_pos[essence], self.relation_query, self.answer_pos]
        )
        return rows, pos


@dataclass(frozen=True)
class _SadrRows:
    """The rows SADR restrains: their query positions (padded, with weights summing to 1 per
    prompt) and subject keys, in step-batch coordinates."""

    rows: Tensor  # [prompt]: rows of the step batch
    query: Tensor  # [prompt, query]
    weight: Tensor  # [prompt, query]
    subject: Tensor  # [prompt, key] bool: the subject's keys (the cached prefix's columns too)

    @classmethod
    def place(cls, rows: _Rows, cfg: sadr.SadrConfig, start: _Start, device) -> "_SadrRows":
        queries, keys = [], []
        for j in rows.sadr_rows:
            first, last, t = rows.subject_first[j], rows.subject_last[j], rows.prompt_last[j]
            q = [t] if cfg.queries == "last" else list(range(last + 1, t + 1)) or [t]
            queries.append([x - start.q_shift[j] for x in q])
            k = [last] if cfg.keys == "subject_last" else list(range(first, last + 1))
            keys.append([x + start.k_shift[j] for x in k])
        n_q = max(len(q) for q in queries)
        n_keys = start.tokens.shape[1]  # every key: the cached prefix (padded) and the rest
        subject = torch.zeros(len(keys), n_keys, dtype=torch.bool, device=device)
        for i, k in enumerate(keys):
            subject[i, k] = True
        return cls(
            rows=torch.tensor(rows.sadr_rows, device=device, dtype=torch.long),
            query=torch.tensor([q + q[:1] * (n_q - len(q)) for q in queries], device=device),
            weight=torch.tensor(
                [[1 / len(q)] * len(q) + [0.0] * (n_q - len(q)) for q in queries], device=device
            ),  # [prompt, query]: each prompt's rows sum to 1
            subject=subject,
        )


@dataclass(frozen=True)
class _References:
    """The loss terms' references at δ = 0."""

    essence: Tensor  # [d_vocab]: log p_0(·|essence prompt) at s_j
    relation: Tensor | None  # [relation prompt, d_vocab] (None: the relation term is off)
    vanilla_rows: Tensor | None  # SADR's attention rows (None: no SADR)
    offtarget: Tensor  # [off-target prompt]: log P_0(o_new) (the hinge's reference)


def _kl(logp: Tensor, logp0: Tensor) -> Tensor:
    """KL(p ‖ p_0) over the last axis, from log-probabilities."""
    return (logp.exp() * (logp - logp0)).sum(-1)


def _nll(logits: Tensor, layout: _Layout, n_rewrite: int) -> tuple[Tensor, Tensor]:
    """Per rewriting prompt, the mean NLL of o_new's tokens (``[prompt]``), and whether o_new's
    token is the argmax (ties count) at every target position (a detached bool)."""
    token_nll = torch.nn.functional.cross_entropy(logits, layout.nll_target, reduction="none")
    per_prompt = token_nll.view(n_rewrite, -1).mean(1)
    with torch.no_grad():
        target_logit = logits.gather(1, layout.nll_target[:, None])[:, 0]
        greedy = (target_logit >= logits.max(-1).values).all()
    return per_prompt, greedy


def _weight_decay(factor: float, delta: Tensor, init: Tensor, stacked: bool) -> Tensor:
    """``factor`` · ‖δ‖ / ‖v_0‖² (several deltas: the sum of one such term per δ, each against
    its own v_0)."""
    if stacked:
        return factor * (delta.norm(dim=-1) / init.norm(dim=-1) ** 2).sum()
    return factor * delta.norm() / init.norm() ** 2


def _hinge(lp: Tensor, lp0: Tensor) -> Tensor:
    """The off-target hinge: the mean rise of log P(o_new) over the off-target prompts."""
    return torch.relu(lp - lp0).mean()


class ValueObjective:
    """L(δ) for one request, hook point and template set; see the module docstring.

    Construction records v_0 (up to layer L). The references at δ = 0 (the essence
    distribution p_0, SADR's vanilla attention rows, ...: :attr:`references`) come from the
    first call at δ = 0, an optimisation's first step, whose forward they share.

    The parts: :class:`_Start` (the step batch before any step), :class:`_Layout` (where δ goes
    and where each term reads), :class:`_SadrRows` (the rows SADR restrains), and the loss
    terms as functions (:func:`_nll`, :func:`_kl`, :func:`_weight_decay`, :func:`_hinge`,
    :func:`attndrift.editing.sadr.sadr_loss`); this class runs the forward and composes them.

    Only what δ can reach is recomputed at each step (``cfg.prefix_cache``, the default): δ
    enters at the subject's last token s_j of row j, in layer L, so nothing before s_j and
    nothing below layer L+1 changes. Construction runs each row's prefix (positions < s_j)
    once into a frozen key-value cache (left-padded, so that every row's s_j falls in the same
    column) and the rest of the row (s_j onwards, right-padded) up to layer L; every step then
    runs only those positions, from layer L+1, attending to the cached prefix. Rotary and
    learned positions follow the attention mask, so every token keeps its unpadded position.
    ``prefix_cache=False`` runs every position from layer L with δ added by a hook: the
    reference the tests compare against (same losses to float rounding).

    Several hooks (PMET: ``[models.attn_out_hook(L), models.mlp_out_hook(L)]``) optimise one δ
    per hook, stacked ``[n_hooks, d_model]`` in the order given, with v_0 stacked the same way
    and a weight decay term per hook, each relative to its own ‖v_0‖². An attention-output δ
    also feeds the MLP of block L in sequential blocks (GPT-2, Llama; GPT-J's are parallel), so
    with several hooks the prefix-cached steps start at block L, not L+1: the suffix positions
    run from the residual entering block L, with the deltas added by hooks, still reading the
    prefix from the key-value cache. Such an objective is optimised by
    :func:`optimise` (one norm clamp per δ; PMET: :func:`attndrift.editing.pmet.optimise_deltas`);
    :func:`optimise_value` takes one hook.

    A call takes the NLL term's weight in ``total`` (``nll_factor``, 1 by default: the plain
    L(δ); a step schedule such as PMET's lowers it) and reports whether o_new's token was the
    argmax everywhere (:attr:`LossTerms.greedy`); the objective itself does not change.

    Args:
        model: the model (unchanged by this class).
        request: the edit.
        hook_name: activation δ is added to (``models.mlp_out_hook(L)`` or
            ``models.resid_post_hook(L)``); both feed the residual after block L additively.
            A sequence of hook names of block L: one δ per hook (see above).
        layer: the layer of ``hook_name``; SADR reads the attention of layers > ``layer``.
        templates: context templates; ``templates[0]`` must be ``"{}"`` (the bare prompt,
            whose activation is v_0).
        cfg: hyper-parameters.
        sadr_cfg: SADR settings, or None for none. With γ = 0 the SADR term is computed and
            logged but not added, so the optimisation is exactly plain ROME.
        queries: the distractors' queries (each follows the sentence stating the edit), where
            the off-target term or SADR reads distractors; default:
            :func:`attndrift.distractors.queries` of the request (``cfg.distractors`` of them).
    """

    def __init__(
        self,
        model: HookedTransformer,
        request: EditRequest,
        hook_name: str | Sequence[str],
        layer: int,
        templates: Sequence[str],
        cfg: ValueConfig,
        sadr_cfg: sadr.SadrConfig | None = None,
        queries: Sequence[str] | None = None,
    ):
        if not templates or templates[0] != "{}":
            raise ValueError('templates[0] must be "{}" (the bare edit prompt)')
        models.check_layer(model, layer)
        self.model, self.cfg, self.sadr_cfg, self.hook_name = model, cfg, sadr_cfg, hook_name
        # one hook: δ [d_model]; a sequence of hooks: one δ per hook, stacked [n_hooks, d_model]
        self.stacked = not isinstance(hook_name, str)
        self.hook_names = tuple(hook_name) if self.stacked else (hook_name,)
        if self.stacked:
            self._check_block_hooks(layer)
        self.layer, self.prefix_cached = layer, cfg.prefix_cache
        self.target = encoding.encode_answer(model, request.target_new)
        self.true_target = encoding.encode_answer(model, request.target_true)
        if queries is None:
            wanted = cfg.needs_distractors or (
                sadr_cfg is not None and sadr_cfg.prompts != "rewrite"
            )
            queries = distractors.queries(request, cfg.distractors) if wanted else ()
        self.queries = tuple(queries)
        self.rows = rows = _encode_rows(
            model, request, templates, self.target, cfg, sadr_cfg, self.queries
        )
        self.n_rewrite = rows.n_rewrite
        self.sadr_layers = list(range(layer + 1, model.cfg.n_layers))
        self.device = device = models.model_device(model)
        begin = _start_suffix if cfg.prefix_cache else _start_full
        with torch.no_grad():
            self.start = begin(model, rows, layer, self.hook_names, self.stacked)
        self.lean_allowed = cfg.prefix_cache and _LEAN[0]  # see hooked_forward
        self.init = self.start.init
        self.layout = _Layout.place(
            rows, self.start, self.target, self.true_target, model.cfg.dtype, device
        )
        self.sadr = (
            None if sadr_cfg is None else _SadrRows.place(rows, sadr_cfg, self.start, device)
        )
        self._refs: _References | None = None  # at δ = 0: from the first step, or on demand
        if not _LEAN[0]:  # inside hooked_forward: as before, a forward of their own at once
            _ = self.references

    @property
    def references(self) -> "_References":
        """What the loss terms compare against, at δ = 0: the essence and relation prompts'
        distributions, SADR's attention rows, the off-target prompts' log P(o_new). The first
        call at δ = 0 (an optimisation's first step) records them from its own forward, which
        runs the same operations; asked for earlier, they take a forward of their own."""
        if self._refs is None:
            zero = self.init.new_zeros(self.init.shape, dtype=self.model.cfg.dtype)  # δ = 0
            with torch.no_grad():
                self._record_references(*self._forward(zero))
        return self._refs

    def _record_references(self, hidden: Tensor, rows: Tensor | None) -> None:
        with torch.no_grad():
            self._refs = _References(
                essence=self._essence_logp(hidden),
                relation=self._relation_logp(hidden),
                vanilla_rows=None if rows is None else rows.detach(),
                offtarget=self._answer_logp(hidden)[: len(self.rows.offtarget_rows)],
            )

    @property
    def vanilla_rows(self) -> Tensor | None:
        """SADR's attention rows at δ = 0 (``[prompt, layer, head, query, key]``)."""
        return self.references.vanilla_rows

    @property
    def step_shape(self) -> tuple[int, int]:
        """(rows, positions) every step runs."""
        return self.start.shape

    def _check_block_hooks(self, layer: int) -> None:
        """Several deltas: distinct hooks, each inside block ``layer`` (the steps start there)."""
        names = self.hook_names
        if not names or len(set(names)) != len(names):
            raise ValueError(f"hook names must be distinct and at least one, got {names}")
        outside = [n for n in names if not models.in_block(n, layer)]
        if outside:
            raise ValueError(f"hooks {outside} are not in block {layer}: one δ per hook of a block")

    def _forward(self, delta: Tensor) -> tuple[Tensor, Tensor | None]:
        """Final hidden states of the step batch at ``delta``, and SADR's attention rows.

        The prefix-cached steps of one δ run the lean forward (:mod:`attndrift.models.lean`)
        where it covers the model, TransformerLens' hooked forward otherwise (and inside
        :func:`hooked_forward`). The lean forward runs the last block's MLP only at the
        positions :meth:`_read_positions` names; the others are NaN, so that a loss term
        reading a position not named there fails at once (``check_finite``).
        """
        start, onehot = self.start, self.layout.onehot
        restrained = self.sadr is not None and self.sadr_layers
        lean = self._lean_forward() if self.prefix_cached and not self.stacked else None
        if lean is not None:
            resid = start.resid + (onehot[:, :, None] * delta).to(start.resid.dtype)
            if restrained:
                hidden, rows = lean(resid, self.sadr.rows, self.sadr.query)
            else:
                hidden, rows = lean(resid)
            return hidden.to(self.device), None if rows is None else _precise(rows)
        hooks, rec = [], None
        if restrained:
            # SADR's query rows of its prompts (other rows pick position 0, unused)
            query = self.sadr.query.new_zeros(self.step_shape[0], self.sadr.query.shape[1])
            query[self.sadr.rows] = self.sadr.query  # [row, query]
            at = capture.Select(2, query)
            rec = capture.Recorder(
                {models.pattern_hook(layer): at for layer in self.sadr_layers}, detach=False
            )
            hooks = list(rec.hooks)
        if self.prefix_cached and not self.stacked:
            resid = start.resid + (onehot[:, :, None] * delta).to(start.resid.dtype)
            hidden = models.final_hidden_from(
                self.model, resid, self.layer + 1, hooks, start.cache, start.mask
            )
        else:  # from block L, each delta added by a hook (reference, or several deltas)
            cached = (start.cache, start.mask) if self.prefix_cached else ()
            hooks = self._delta_hooks(delta) + hooks
            hidden = models.final_hidden_from(self.model, start.resid, self.layer, hooks, *cached)
        hidden = hidden.to(self.device)
        if rec is None:
            return hidden, None
        kept = rec.values()
        rows = torch.stack(  # [prompt, layer, head, query, key]
            [kept[models.pattern_hook(layer)][self.sadr.rows].to(self.device)
             for layer in self.sadr_layers],
            dim=1,
        )  # fmt: skip
        return hidden, _precise(rows)

    def _lean_forward(self) -> models.SuffixForward | None:
        """The lean forward of the prefix-cached steps (built at the first step), or None:
        the model needs TransformerLens' forward, or :func:`hooked_forward` is on."""
        if not self.lean_allowed or models.has_hooks(self.model):
            return None
        if not hasattr(self, "_lean"):
            read = torch.zeros(self.step_shape, dtype=torch.bool, device=self.device)
            read[self._read_positions()] = True
            self._lean = models.suffix_forward(
                self.model, self.start.cache, self.start.mask, self.layer + 1, read
            )
        return self._lean

    def _read_positions(self) -> tuple[Tensor, Tensor]:
        """(rows, positions) of the step batch whose final hidden states a loss term reads
        (:meth:`_Layout.read_positions`)."""
        return self.layout.read_positions(self.n_rewrite)

    def step_flops(self) -> dict[str, int]:
        """Floating-point operations of one step's forward and backward pass through the
        lean forward (:func:`attndrift.models.lean.step_flops`), from the shapes of the step
        batch (prefix-cached steps of one δ)."""
        n_rows, n_pos = self.step_shape
        prefix = self.start.tokens.shape[1] - n_pos
        n_read = len(self._read_positions()[0])
        return models.lean.step_flops(self.model, n_rows, n_pos, prefix, self.layer + 1, n_read)

    def _delta_hooks(self, delta: Tensor) -> list:
        """Hooks adding each δ at (row, delta_pos[row]) of its activation."""
        deltas = list(delta) if self.stacked else [delta]  # each [d_model]
        onehot = self.layout.onehot

        def adder(d: Tensor):
            def add_delta(x: Tensor, hook) -> Tensor:
                # (multi-GPU models: the loss lives on the first device, this layer may not)
                return x + (onehot.to(x.device)[:, :, None] * d.to(x.device)).to(x.dtype)

            return add_delta

        return [(n, adder(d)) for n, d in zip(self.hook_names, deltas, strict=True)]

    def _essence_logp(self, hidden: Tensor) -> Tensor:
        h = hidden[self.n_rewrite, self.layout.delta_pos[self.n_rewrite]]
        return torch.log_softmax(_logits(self.model, h), -1)

    def _relation_logp(self, hidden: Tensor) -> Tensor | None:
        """Next-token log-probabilities after each relation prompt (None: the term is off)."""
        if self.cfg.relation_kl == 0:
            return None
        h = hidden[self.layout.relation_rows, self.layout.relation_query]
        return torch.log_softmax(_logits(self.model, h), -1)

    def _answer_logp(self, hidden: Tensor) -> Tensor:
        """Length-normalised log P(answer) of each answer row (``[n_answers]``: the off-target
        prompts' o_new, then the edit prompt's o_true); its own unembedding, so that the
        other terms are computed exactly as without these rows."""
        at = self.layout
        if at.n_answers == 0:
            return hidden.new_zeros(0)
        logits = _logits(self.model, hidden[at.answer_rows, at.answer_pos])
        token_lp = -torch.nn.functional.cross_entropy(
            logits, at.answer_target, reduction="none"
        )  # [answer tokens]
        total = token_lp.new_zeros(at.n_answers).index_add(0, at.answer_of, token_lp)
        count = torch.bincount(at.answer_of, minlength=at.n_answers)
        return total / count

    def __call__(
        self, delta: Float[Tensor, "*hooks d_model"], nll_factor: float = 1.0
    ) -> LossTerms:
        """All loss terms at ``delta`` (``[d_model]``, or ``[n_hooks, d_model]`` with several
        hooks; differentiable w.r.t. ``delta``), the NLL term weighing ``nll_factor`` in
        ``total``."""
        cfg, at = self.cfg, self.layout
        hidden, rows = self._forward(delta)
        if self._refs is None and not bool(delta.detach().any()):  # δ = 0: the references
            self._record_references(hidden.detach(), rows)
        refs = self.references
        # one unembedding (W_U is read once) for the target positions, the essence row and
        # (relation KL term) the relation prompts' last tokens
        essence = hidden[self.n_rewrite, at.delta_pos[self.n_rewrite]][None]
        picked = [hidden[at.nll_rows, at.nll_pos], essence]
        if refs.relation is not None:
            picked.append(hidden[at.relation_rows, at.relation_query])
        n_rel = len(at.relation_rows) if refs.relation is not None else 0
        logits = _logits(self.model, torch.cat(picked))  # [target tokens + 1 + n_rel, d_vocab]
        logits, rel_logits = logits[: len(logits) - n_rel], logits[len(logits) - n_rel :]
        per_prompt, greedy = _nll(logits[:-1], at, self.n_rewrite)
        nll = per_prompt.mean()
        kl = cfg.kl_factor * _kl(torch.log_softmax(logits[-1], -1), refs.essence)
        if refs.relation is not None:  # the relation variant: mean over its prompts
            rel = torch.log_softmax(rel_logits, -1)
            kl = kl + cfg.relation_kl * _kl(rel, refs.relation).mean()
        wd = _weight_decay(cfg.weight_decay, delta, self.init, self.stacked)
        total = nll_factor * nll + kl + wd
        zero = torch.zeros((), device=delta.device)
        sadr_term, heads = zero, torch.zeros(len(self.sadr_layers), device=delta.device)
        if rows is not None:
            sadr_term, heads = sadr.sadr_loss(
                refs.vanilla_rows, rows, self.sadr.subject, self.sadr.weight, self.sadr_cfg
            )
            if self.sadr_cfg.gamma > 0:
                total = total + self.sadr_cfg.gamma * sadr_term
        offtarget = margin = None
        if at.n_answers:
            lp = self._answer_logp(hidden)  # [off-target rows (+ the o_true row)]
            n_off = len(self.rows.offtarget_rows)
            if n_off:  # the hinge: only a rise of log P(o_new) counts
                offtarget = _hinge(lp[:n_off], refs.offtarget)
                total = total + cfg.offtarget * offtarget
            if self.rows.true_row is not None:  # row 0 is the bare edit prompt
                margin = (-per_prompt[0] - lp[-1]).detach()
        p_new = torch.exp(-per_prompt).mean()
        return LossTerms(total, nll, kl, wd, sadr_term, heads, p_new, offtarget, margin, greedy)


#: whether prefix-cached value steps may run the lean forward (see :func:`hooked_forward`)
_LEAN = [True]


@contextmanager
def hooked_forward() -> Iterator[None]:
    """Inside the block, value steps run through TransformerLens' hooked forward, as they did
    before the lean forward (:mod:`attndrift.models.lean`), and an objective records its
    references at δ = 0 by a forward of its own at construction, as it did before they came
    from the first step: the baseline that benchmarks and checks compare against. Objectives
    built inside keep this choice."""
    before = _LEAN[0]
    _LEAN[0] = False
    try:
        yield
    finally:
        _LEAN[0] = before


def _precise(x: Tensor) -> Tensor:
    """``x`` in float32 at least: δ, v_0 and SADR's attention rows of a half-precision model
    (the optimisation stays in float32; a float64 model keeps float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _logits(model: HookedTransformer, h: Tensor) -> Tensor:
    """Logits of hidden states ``h``, in float32 at least (half precision is upcast; a float64
    model keeps float64, which the gradient checks need)."""
    logits = models.unembed(model, h)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


_TERMS = ("loss", "nll", "kl", "weight_decay", "sadr", "p_new", "delta_norm", "offtarget", "margin")


def step_log(step: int, terms: LossTerms, delta_norm: float) -> StepLog:
    """One step's loss terms as numbers."""
    return StepLog(
        step=step,
        loss=terms.total.item(),
        nll=terms.nll.item(),
        kl=terms.kl.item(),
        weight_decay=terms.weight_decay.item(),
        sadr=terms.sadr.item(),
        p_new=terms.p_new.item(),
        delta_norm=delta_norm,
        heads=tuple(round(h, 3) for h in terms.heads.tolist()),
        offtarget=None if terms.offtarget is None else terms.offtarget.item(),
        margin=None if terms.margin is None else terms.margin.item(),
    )


def stop_reason(cfg: ValueConfig, entry: StepLog) -> str | None:
    """Why the optimisation stops after evaluating ``entry`` (None: it goes on): the watched
    term below ``early_stop_loss`` and, with a margin stop, the edit prompt's margin at least
    ``stop_margin`` (``early_stop_on="margin"``: the margin alone)."""
    margin_text = ""
    if cfg.stop_margin is not None:
        if entry.margin is None or entry.margin < cfg.stop_margin:
            return None
        margin_text = f"margin {entry.margin:.2f} >= {cfg.stop_margin:g}"
        if cfg.early_stop_on == "margin":
            return margin_text
    watched = entry.loss if cfg.early_stop_on == "loss" else entry.nll
    if watched >= cfg.early_stop_loss:
        return None
    name = "loss" if cfg.early_stop_on == "loss" else "NLL"
    reason = f"{name} {watched:.3f} < {cfg.early_stop_loss:g}"
    return f"{reason}, {margin_text}" if margin_text else reason


def check_finite(desc: str, entry: StepLog, lr: float, delta: Tensor | None = None) -> None:
    """Stop with a FloatingPointError naming the term and the step when a loss term (or δ,
    after an update, or its norm, which the clamp divides by) is NaN or inf: every later step,
    and the edit, would be garbage."""
    bad = [
        k for k in _TERMS if getattr(entry, k) is not None and not math.isfinite(getattr(entry, k))
    ]
    if bad or not math.isfinite(sum(entry.heads)):
        term = (bad or ["heads"])[0]
        raise FloatingPointError(
            f"{desc}: loss term {term} is {getattr(entry, term, 'NaN')} at step {entry.step}"
            f" (not finite); lower lr (now {lr:g}) or check the model's weights"
        )
    if delta is not None and not (torch.isfinite(delta).all() and torch.isfinite(delta.norm())):
        raise FloatingPointError(
            f"{desc}: δ is not finite (‖δ‖ = {delta.norm().item()}) after the update of step "
            f"{entry.step}; lower lr (now {lr:g})"
        )


def _end(bar: tqdm, step: int, reason: str) -> None:
    """The progress bar's last word: where the optimisation stopped, and why."""
    bar.set_postfix_str(f"stopped at step {step + 1}: {reason}", refresh=True)
    log.debug("stopped at step %d: %s", step + 1, reason)


#: A step schedule: called with a step's loss terms once they are evaluated (and the stop
#: rules found no reason to stop), it returns the NLL term's weight for the following steps and
#: a reason to stop now (None: go on). PMET's: :func:`attndrift.editing.pmet.nll_schedule`.
Schedule = Callable[[LossTerms], tuple[float, str | None]]


def optimise(
    objective: ValueObjective,
    schedule: Schedule | None = None,
    *,
    progress: bool = False,
    desc: str = "value",
) -> tuple[ValueResult, ...]:
    """Adam on δ as ROME does it (see the module docstring), with an optional step
    ``schedule``; one :class:`ValueResult` per hook of the objective (in its hook order),
    whose traces share every term but ``delta_norm`` (‖δ_h‖).

    At most ``steps − 1`` updates; after each evaluation the optimisation stops on
    :func:`stop_reason`, then on the schedule's reason, else updates δ and clamps each δ_h to
    ``clamp_norm_factor · ‖v_0,h‖``. The model is frozen meanwhile (:func:`frozen`).

    Raises:
        FloatingPointError: a loss term or δ is NaN or inf (naming the term and the step);
            the model is left as it was (its ``requires_grad`` flags restored).
    """
    cfg, model, stacked = objective.cfg, objective.model, objective.stacked
    t0 = time.perf_counter()
    delta = torch.zeros_like(objective.init, requires_grad=True)  # [n_hooks,] d_model
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    if stacked:  # one ball per delta: [n_hooks, 1]
        max_norm = cfg.clamp_norm_factor * objective.init.norm(dim=-1, keepdim=True)
    else:
        max_norm = cfg.clamp_norm_factor * objective.init.norm()
    trace, norms = [], []  # per step: the terms, and ‖δ_h‖ per hook
    nll_factor = 1.0
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", disable=not progress, leave=False)
    try:
        with frozen(model):
            for step in bar:
                opt.zero_grad()
                terms = objective(delta, nll_factor=nll_factor)
                if stacked:
                    norms.append(delta.detach().norm(dim=-1).tolist())
                    trace.append(step_log(step, terms, 0.0))  # ‖δ_h‖: per hook, below
                else:
                    trace.append(step_log(step, terms, delta.norm().item()))
                log.debug("%s", trace[-1])
                check_finite(desc, trace[-1], cfg.lr)
                bar.set_postfix(loss=f"{trace[-1].loss:.3f}", p_new=f"{trace[-1].p_new:.2f}")
                reason = stop_reason(cfg, trace[-1])
                if reason is None and schedule is not None:
                    nll_factor, reason = schedule(terms)
                if reason is not None or step == cfg.steps - 1:
                    _end(bar, step, reason or "the step budget is spent")
                    break
                terms.total.backward()
                opt.step()
                with torch.no_grad():
                    check_finite(desc, trace[-1], cfg.lr, delta)
                    _clamp(delta, max_norm)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if not stacked:
        return (ValueResult(delta.detach(), objective.init, tuple(trace), seconds),)
    return tuple(
        ValueResult(
            delta[h].detach(),
            objective.init[h],
            tuple(
                dataclasses.replace(e, delta_norm=n[h]) for e, n in zip(trace, norms, strict=True)
            ),
            seconds,
        )
        for h in range(delta.shape[0])
    )


def _clamp(delta: Tensor, max_norm: Tensor) -> None:
    """Project δ (each δ_h of a stack) into its ball ‖δ_h‖ ≤ max_norm_h, in place."""
    if delta.ndim == 1:
        norm = delta.norm()
        if norm > max_norm:
            delta.mul_(max_norm / norm)
    else:
        norm = delta.norm(dim=-1, keepdim=True)  # [n_hooks, 1]
        delta.mul_(torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm)))


def optimise_value(
    objective: ValueObjective, progress: bool = False, desc: str = "value"
) -> ValueResult:
    """Adam on the δ of a one-hook objective, as ROME does it (:func:`optimise` without a
    schedule); returns δ, v_0 and the trace.

    Raises:
        ValueError: the objective has several hooks (:func:`optimise` takes those).
        FloatingPointError: a loss term or δ is NaN or inf (naming the term and the step);
            the model is left as it was (its ``requires_grad`` flags restored).
    """
    if objective.stacked:
        raise ValueError("optimise_value takes a one-hook objective (optimise: several hooks)")
    return optimise(objective, progress=progress, desc=desc)[0]
