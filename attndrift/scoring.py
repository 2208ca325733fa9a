"""Scoring: batched answer probabilities of (prompt, answer) pairs.

The score of an answer (METHOD §5) is the mean per-token negative log-likelihood of its tokens,
teacher-forced after ``prompt + " " + answer``; ``P = exp(-NLL)``. The scorer

* encodes every distinct prompt and answer once (:mod:`attndrift.encoding` conventions);
* runs every distinct prompt once: prompts sorted by length, left-padded into batches under a
  token budget (``max_batch_tokens``), keeping each batch's key-value cache. Which prompts
  share a batch is chosen to cost the fewest padded tokens plus a fixed price per forward pass
  (``_batches``): one batch of very different lengths would be half padding;
  The last prompt position predicts every answer's first token, so the right and wrong
  single-token answers of a probe cost nothing more;
* runs the rest of each multi-token answer (its tokens but the last) as a short continuation
  of its prompt's cached keys and values, so a prompt is never run twice; an answer whose
  inputs are a prefix of another's (``" New York"`` of ``" New York City"``) rides on it;
* unembeds *only* the positions that predict answer tokens (not the whole
  ``[batch, pos, d_vocab]`` logits); on CUDA out-of-memory the budget is halved and retried,

and gives the numbers of one forward per pair (tested to 1e-5).
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from attndrift import encoding, models
from attndrift.data import Probe

log = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class Plan:
    """What the scorer runs: every distinct prompt once, and every distinct continuation.

    ``continuations[c] = (prompt index, tokens)``: a multi-token answer's inputs after its
    prompt (its tokens but the last). Pair ``i`` reads its first answer token at its prompt's
    last position and token ``j >= 1`` at position ``j - 1`` of continuation ``pair_cont[i]``.
    """

    prompts: list[tuple[int, ...]]
    continuations: list[tuple[int, tuple[int, ...]]]
    pair_prompt: list[int]  # pair -> prompt index
    pair_cont: list[int]  # pair -> continuation index (-1: a one-token answer)
    answer: list[tuple[int, ...]]  # pair -> answer token ids


def plan(model: HookedTransformer, pairs: Sequence[tuple[str, str]]) -> Plan:
    """The prompts and continuations that score ``pairs`` (see :class:`Plan`)."""
    prompt_index: dict[str, int] = {}  # prompt text -> index of its (distinct) token ids
    by_ids: dict[tuple[int, ...], int] = {}
    prompts: list[tuple[int, ...]] = []
    answers: dict[str, tuple[int, ...]] = {}
    for prompt, answer in pairs:
        if prompt not in prompt_index:
            ids = encoding.encode_prompt(model, prompt).ids
            if ids not in by_ids:
                by_ids[ids] = len(prompts)
                prompts.append(ids)
            prompt_index[prompt] = by_ids[ids]
        if answer not in answers:
            answers[answer] = encoding.encode_answer(model, answer)
    continuations: list[tuple[int, tuple[int, ...]]] = []
    by_prompt: dict[int, list[int]] = {}
    pair_cont = [-1] * len(pairs)
    # longest answers first, so that shorter ones can ride on their continuations
    for i in sorted(range(len(pairs)), key=lambda i: -len(answers[pairs[i][1]])):
        p, inputs = prompt_index[pairs[i][0]], answers[pairs[i][1]][:-1]
        if not inputs:
            continue
        for c in by_prompt.setdefault(p, []):
            if continuations[c][1][: len(inputs)] == inputs:
                pair_cont[i] = c
                break
        else:
            pair_cont[i] = len(continuations)
            by_prompt[p].append(len(continuations))
            continuations.append((p, inputs))
    return Plan(
        prompts,
        continuations,
        [prompt_index[p] for p, _ in pairs],
        pair_cont,
        [answers[a] for _, a in pairs],
    )


PASS_OVERHEAD_TOKENS = 96
"""What one more forward pass costs, in padded tokens: a pass runs every layer whatever its
size, and small matrix products run below full speed. Chosen on SmolLM2 on 2 CPU cores
(the study docs/studies/speed.md: 32 to 256 score alike); it decides when splitting a batch
to cut its padding pays."""


def _batches(
    lengths: list[int],
    max_tokens: int,
    max_size: int | None = None,
    overhead: int | None = None,
) -> list[list[int]]:
    """Group indices into forward passes of at most ``max_tokens`` padded tokens (rows x
    longest row) and ``max_size`` rows, at the least cost ``sum(overhead + rows x longest)``.

    Rows are sorted longest first and each pass takes a run of them, so padding only fills a
    row up to the longest of its pass. Which runs, is chosen by dynamic programming over the
    sorted order: one big batch of very different lengths pays for its padding, many small
    ones pay ``overhead`` each (default :data:`PASS_OVERHEAD_TOKENS`).
    """
    overhead = PASS_OVERHEAD_TOKENS if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    # best[j]: least cost of the first j sorted rows; cut[j]: where its last pass starts
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for i in range(n):
        width = lengths[order[i]]  # the longest row of any pass starting at i
        rows = max(1, max_tokens // max(width, 1))
        if max_size is not None:
            rows = min(rows, max_size)
        for j in range(i + 1, min(n, i + rows) + 1):
            cost = best[i] + overhead + (j - i) * width
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def answer_nll(
    model: HookedTransformer,
    pairs: Sequence[tuple[str, str]],
    *,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_batch_size: int | None = None,
    fwd_hooks: Sequence = (),
    progress: bool = False,
) -> Float[Tensor, " n"]:
    """Mean per-token NLL of each answer after its prompt, for many pairs at once.

    Args:
        model: the model (its current weights and hooks are used).
        pairs: ``(prompt, answer)`` pairs; the answer is scored after ``prompt + " "``.
        max_batch_tokens: padded tokens per forward pass (rows x longest row).
        max_batch_size: optional cap on prompts per forward pass; ``1`` is the reference:
            one forward per pair over its prompt and answer, nothing shared.
        fwd_hooks: extra TransformerLens forward hooks for every pass (e.g. an edit as a hook).
        progress: show a progress bar.

    Returns:
        ``[n]`` float32 tensor on CPU, aligned with ``pairs``.
    """
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
    out = torch.empty(len(pairs), dtype=torch.float32)
    if not pairs:
        return out
    if max_batch_size == 1:
        return _one_per_pair(model, pairs, fwd_hooks, progress)
    the_plan = plan(model, pairs)
    budget = max_batch_tokens
    pending = _batches([len(p) for p in the_plan.prompts], budget, max_batch_size)
    bar = tqdm(total=len(pairs), desc="scoring", unit="answer", disable=not progress)
    while pending:
        group = pending.pop(0)
        try:
            done = _score_prompts(model, the_plan, group, budget, fwd_hooks)
        except torch.cuda.OutOfMemoryError:
            if len(group) == 1 and budget == 1:
                raise
            budget = max(1, budget // 2)
            log.warning("out of memory: halving the scoring batch budget to %d tokens", budget)
            torch.cuda.empty_cache()
            lengths = [len(the_plan.prompts[p]) for p in group]
            pending = [[group[j] for j in g] for g in _batches(lengths, budget)] + pending
            continue
        for i, nll in done.items():
            out[i] = nll
        bar.update(len(done))
    bar.close()
    return out


@torch.no_grad()
def hidden_states(
    model: HookedTransformer, the_plan: Plan, group: list[int], budget: int, fwd_hooks=()
) -> tuple[Tensor, dict[int, Tensor]]:
    """The forward passes of one batch of prompts (``group``: prompt indices), nothing else.

    Returns the last prompt position's hidden state of each prompt (``[len(group), d_model]``,
    it predicts every answer's first token) and, by continuation index, the hidden states of
    the continuations of these prompts (``[n, d_model]``, position ``j`` predicts answer token
    ``j + 1``).
    """
    pad = models.pad_id(model)
    width = max(len(the_plan.prompts[p]) for p in group)
    rows = [[pad] * (width - len(the_plan.prompts[p])) + list(the_plan.prompts[p]) for p in group]
    mask = [
        [0] * (width - len(the_plan.prompts[p])) + [1] * len(the_plan.prompts[p]) for p in group
    ]
    device = models.model_device(model)
    tokens = torch.tensor(rows, device=device)
    mask_t = torch.tensor(mask, device=device)
    hidden, cache = models.final_hidden_and_cache(model, tokens, fwd_hooks, attention_mask=mask_t)
    row_of = {p: r for r, p in enumerate(group)}
    # continuations of these prompts, in batches that continue the prompts' cached rows
    conts = [c for c, (p, _) in enumerate(the_plan.continuations) if p in row_of]
    cont_hidden: dict[int, Tensor] = {}
    # (a continuation row attends to its prompt's cached width too)
    lengths = [width + len(the_plan.continuations[c][1]) for c in conts]
    for chunk in _batches(lengths, budget):
        ids = [conts[j] for j in chunk]
        n = max(len(the_plan.continuations[c][1]) for c in ids)
        seqs = [list(the_plan.continuations[c][1]) for c in ids]
        cont_tokens = torch.tensor([s + [pad] * (n - len(s)) for s in seqs], device=device)
        src = torch.tensor([row_of[the_plan.continuations[c][0]] for c in ids], device=device)
        cont_mask = torch.cat([mask_t[src], torch.ones_like(cont_tokens)], dim=1)
        h = models.final_hidden(
            model, cont_tokens, fwd_hooks, models.cache_rows(cache, src), cont_mask
        )
        cont_hidden.update({c: h[k] for k, c in enumerate(ids)})
    return hidden[:, -1], cont_hidden


@torch.no_grad()
def _score_prompts(
    model: HookedTransformer, the_plan: Plan, group: list[int], budget: int, fwd_hooks
) -> dict[int, float]:
    """NLL of every pair whose prompt is in ``group`` (prompt indices)."""
    last, cont_hidden = hidden_states(model, the_plan, group, budget, fwd_hooks)
    row_of = {p: r for r, p in enumerate(group)}
    # every answer token's predicting hidden state, unembedded together
    members = [i for i, p in enumerate(the_plan.pair_prompt) if p in row_of]
    picked, target, owner = [], [], []
    for k, i in enumerate(members):
        answer = the_plan.answer[i]
        picked.append(last[row_of[the_plan.pair_prompt[i]]])
        if len(answer) > 1:
            picked.extend(cont_hidden[the_plan.pair_cont[i]][: len(answer) - 1])
        target.extend(answer)
        owner.extend([k] * len(answer))
    h = torch.stack(picked)  # [answer tokens, d_model]
    logp = torch.log_softmax(models.unembed(model, h).float(), dim=-1)
    token_logp = logp.gather(1, torch.tensor(target, device=h.device)[:, None])[:, 0]
    owner_t = torch.tensor(owner, device=h.device)
    total = torch.zeros(len(members), device=h.device).index_add_(0, owner_t, token_logp)
    count = torch.zeros(len(members), device=h.device).index_add_(
        0, owner_t, torch.ones_like(token_logp)
    )
    return dict(zip(members, (-total / count).cpu().tolist(), strict=True))


@torch.no_grad()
def _one_per_pair(model, pairs, fwd_hooks, progress) -> Tensor:
    """The reference: one forward per pair over ``prompt + answer[:-1]``, nothing shared."""
    out = torch.empty(len(pairs), dtype=torch.float32)
    device = models.model_device(model)
    for i, (prompt, answer) in enumerate(tqdm(pairs, desc="scoring", disable=not progress)):
        p = encoding.encode_prompt(model, prompt).ids
        a = encoding.encode_answer(model, answer)
        tokens = torch.tensor([p + a[:-1]], device=device)
        hidden = models.final_hidden(model, tokens, fwd_hooks)[0, len(p) - 1 :]
        logp = torch.log_softmax(models.unembed(model, hidden).float(), -1)
        out[i] = -logp.gather(1, torch.tensor(a, device=device)[:, None]).mean().item()
    return out


def score_probes(
    model: HookedTransformer,
    probes: Sequence[Probe],
    *,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    fwd_hooks: Sequence = (),
    progress: bool = False,
) -> pd.DataFrame:
    """Score both answers of every probe: one tidy row per probe.

    Columns: ``record, kind, prompt, right, wrong, nll_right, nll_wrong, p_right, p_wrong,
    success`` (``success = p_right > p_wrong``).
    """
    pairs = [(p.prompt, p.right) for p in probes] + [(p.prompt, p.wrong) for p in probes]
    nll = answer_nll(
        model, pairs, max_batch_tokens=max_batch_tokens, fwd_hooks=fwd_hooks, progress=progress
    ).numpy()
    n = len(probes)
    frame = pd.DataFrame(
        {
            "record": [p.record for p in probes],
            "kind": [p.kind for p in probes],
            "prompt": [p.prompt for p in probes],
            "right": [p.right for p in probes],
            "wrong": [p.wrong for p in probes],
            "nll_right": nll[:n],
            "nll_wrong": nll[n:],
        }
    )
    frame["p_right"] = torch.exp(-torch.from_numpy(nll[:n])).numpy()
    frame["p_wrong"] = torch.exp(-torch.from_numpy(nll[n:])).numpy()
    frame["success"] = frame["nll_right"] < frame["nll_wrong"]
    return frame
