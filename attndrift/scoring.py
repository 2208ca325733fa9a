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
* runs a token prefix that several prompts begin with (at least :data:`MIN_SHARED_TOKENS`
  tokens, e.g. the sentence stating the edit, ``"{edit prompt} {o_new}. "``, which every
  DNS and RS_D probe of a record begins with) once, and each of those prompts from its key-value
  cache: the prompts sharing a prefix go to one batch, after one pass over the batch's prefixes;
* runs the rest of each multi-token answer (its tokens but the last) as a short continuation
  of its prompt's cached keys and values, so a prompt is never run twice; an answer whose
  inputs are a prefix of another's (``" New York"`` of ``" New York City"``) rides on it;
* unembeds *only* the positions that predict answer tokens (not the whole
  ``[batch, pos, d_vocab]`` logits); on CUDA out-of-memory the budget is halved and retried,

and gives the numbers of one forward per pair (tested to 1e-5).
"""

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

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
    prefixes: list[tuple[int, ...]] = field(default_factory=list)  # shared token prefixes
    prompt_prefix: list[int] = field(default_factory=list)  # prompt -> prefix index (-1: none)

    def shared(self, prompt: int) -> int:
        """How many of the prompt's first tokens run in its shared prefix (0: none)."""
        i = self.prompt_prefix[prompt] if self.prompt_prefix else -1
        return len(self.prefixes[i]) if i >= 0 else 0

    def units(self) -> list[list[int]]:
        """Prompts that run in one batch: those sharing a prefix together, the others alone."""
        by_prefix: dict[int, list[int]] = {}
        units = []
        for p in range(len(self.prompts)):
            i = self.prompt_prefix[p] if self.prompt_prefix else -1
            if i < 0:
                units.append([p])
            else:
                if i not in by_prefix:
                    by_prefix[i] = []
                    units.append(by_prefix[i])
                by_prefix[i].append(p)
        return units


MIN_SHARED_TOKENS = 6
"""Prompts that begin with at least this many equal tokens run them once, as a shared prefix
(fewer are not worth the extra pass over the prefixes)."""


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def shared_prefixes(
    prompts: Sequence[tuple[int, ...]], min_shared: int = MIN_SHARED_TOKENS
) -> tuple[list[tuple[int, ...]], list[int]]:
    """Token prefixes that several prompts begin with, and each prompt's (-1: none).

    Prompts are sorted, and runs of neighbours that share at least ``min_shared`` tokens share
    the prefix common to the whole run. Every prompt keeps at least its last token out of the
    prefix (its hidden state predicts the answer): a prompt that is itself the common prefix of
    the others (the edit prompt, before its distracted probes) leaves the run, whose prefix then
    grows.
    """
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    runs: list[list[int]] = []
    for i in order:
        if runs and _common(prompts[runs[-1][-1]], prompts[i]) >= min_shared:
            runs[-1].append(i)
        else:
            runs.append([i])
    prefixes: list[tuple[int, ...]] = []
    prompt_prefix = [-1] * len(prompts)
    for run in runs:
        while len(run) > 1:
            n = min(_common(prompts[a], prompts[b]) for a, b in itertools.pairwise(run))
            short = [i for i in run if len(prompts[i]) <= n]
            if not short:
                break
            run = [i for i in run if i not in short]
        if len(run) > 1 and n >= min_shared:
            for i in run:
                prompt_prefix[i] = len(prefixes)
            prefixes.append(prompts[run[0]][:n])
    return prefixes, prompt_prefix


def plan(
    model: HookedTransformer, pairs: Sequence[tuple[str, str]], share_prefixes: bool = True
) -> Plan:
    """The prompts and continuations that score ``pairs`` (see :class:`Plan`); with
    ``share_prefixes``, the prompts' shared token prefixes (:func:`shared_prefixes`)."""
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
    prefixes, prompt_prefix = shared_prefixes(prompts) if share_prefixes else ([], [])
    return Plan(
        prompts,
        continuations,
        [prompt_index[p] for p, _ in pairs],
        pair_cont,
        [answers[a] for _, a in pairs],
        prefixes,
        prompt_prefix,
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
    rows: list[int] | None = None,
) -> list[list[int]]:
    """Group indices into forward passes of at most ``max_tokens`` padded tokens (rows x
    longest row) and ``max_size`` rows, at the least cost ``sum(overhead + rows x longest)``.

    Rows are sorted longest first and each pass takes a run of them, so padding only fills a
    row up to the longest of its pass. Which runs, is chosen by dynamic programming over the
    sorted order: one big batch of very different lengths pays for its padding, many small
    ones pay ``overhead`` each (default :data:`PASS_OVERHEAD_TOKENS`). ``rows[i]`` (default 1)
    is how many rows item ``i`` stands for (prompts sharing a prefix go together); an item
    over the budget runs alone.
    """
    overhead = PASS_OVERHEAD_TOKENS if overhead is None else overhead
    rows = [1] * len(lengths) if rows is None else rows
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    # best[j]: least cost of the first j sorted items; cut[j]: where its last pass starts
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for i in range(n):
        width = max(lengths[order[i]], 1)  # the longest row of any pass starting at i
        size = 0
        for j in range(i + 1, n + 1):
            size += rows[order[j - 1]]
            too_big = size * width > max_tokens or (max_size is not None and size > max_size)
            if too_big and j > i + 1:
                break
            cost = best[i] + overhead + size * lengths[order[i]]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def rounds(
    the_plan: Plan, max_tokens: int, prompts: Sequence[int] | None = None
) -> list[list[int]]:
    """``prompts`` (default: all, in plan order) in rounds whose shared prefixes run in one pass
    of at most ``max_tokens`` padded tokens, every prefix's prompts in one round. Only a
    round's prefix cache is held at a time; its prompts are batched freely."""
    wanted = set(range(len(the_plan.prompts)) if prompts is None else prompts)
    out: list[list[int]] = []
    members: list[int] = []
    n_prefixes = width = 0
    for unit in the_plan.units():
        unit = [p for p in unit if p in wanted]
        if not unit:
            continue
        n = the_plan.shared(unit[0])
        if n:
            if members and (n_prefixes + 1) * max(width, n) > max_tokens:
                out.append(members)
                members, n_prefixes, width = [], 0, 0
            n_prefixes, width = n_prefixes + 1, max(width, n)
        members.extend(unit)
    return [*out, members] if members else out


@dataclass(frozen=True)
class Prefixes:
    """One pass over a round's shared prefixes: the frozen cache (left-padded) and each
    prefix's row in it (None: the round has no shared prefix)."""

    cache: object | None
    row: dict[int, int]


@torch.no_grad()
def prefix_pass(
    model: HookedTransformer, the_plan: Plan, prompts: Sequence[int], fwd_hooks=()
) -> Prefixes:
    """Run the shared prefixes of ``prompts`` once (one left-padded pass)."""
    wanted = sorted({the_plan.prompt_prefix[p] for p in prompts if the_plan.shared(p)})
    if not wanted:
        return Prefixes(None, {})
    device, pad = models.model_device(model), models.pad_id(model)
    seqs = [the_plan.prefixes[i] for i in wanted]
    width = max(len(x) for x in seqs)
    tokens = torch.tensor([[pad] * (width - len(x)) + list(x) for x in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], device=device)
    cache = models.prefix_cache(model, tokens, mask, fwd_hooks)
    return Prefixes(cache, {i: r for r, i in enumerate(wanted)})


def forward_passes(
    model: HookedTransformer,
    the_plan: Plan,
    max_tokens: int,
    max_size: int | None = None,
    fwd_hooks: Sequence = (),
) -> Iterator[tuple[list[int], Tensor, dict[int, Tensor]]]:
    """Every forward pass the scorer runs, batch by batch: ``(prompt indices, their last
    hidden states, their continuations' hidden states)`` (see :func:`hidden_states`). On CUDA
    out-of-memory the token budget is halved and the batch split again."""
    budget = max_tokens

    def halve(what: str) -> None:
        nonlocal budget
        if budget == 1:
            raise torch.cuda.OutOfMemoryError(f"out of memory scoring {what} at 1 token")
        budget = max(1, budget // 2)
        log.warning("out of memory: halving the scoring batch budget to %d tokens", budget)
        torch.cuda.empty_cache()

    todo = rounds(the_plan, budget)
    while todo:
        members = todo.pop(0)
        try:
            prefixes = prefix_pass(model, the_plan, members, fwd_hooks)
        except torch.cuda.OutOfMemoryError:
            halve("the shared prefixes")
            todo = rounds(the_plan, budget, members) + todo
            continue
        lengths = [len(the_plan.prompts[p]) - the_plan.shared(p) for p in members]
        pending = [[members[j] for j in g] for g in _batches(lengths, budget, max_size)]
        while pending:
            group = pending.pop(0)
            try:
                last, cont = hidden_states(model, the_plan, group, budget, fwd_hooks, prefixes)
            except torch.cuda.OutOfMemoryError:
                if len(group) == 1 and budget == 1:
                    raise
                halve("a batch")
                rest = [len(the_plan.prompts[p]) - the_plan.shared(p) for p in group]
                pending = [[group[j] for j in g] for g in _batches(rest, budget)] + pending
                continue
            yield group, last, cont


def answer_nll(
    model: HookedTransformer,
    pairs: Sequence[tuple[str, str]],
    *,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_batch_size: int | None = None,
    fwd_hooks: Sequence = (),
    progress: bool = False,
    share_prefixes: bool = True,
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
        share_prefixes: run token prefixes that several prompts share once (False: every
            prompt from its first token, the scorer before shared prefixes).

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
    the_plan = plan(model, pairs, share_prefixes)
    bar = tqdm(total=len(pairs), desc="scoring", unit="answer", disable=not progress)
    passes = forward_passes(model, the_plan, max_batch_tokens, max_batch_size, fwd_hooks)
    for group, last, cont_hidden in passes:
        done = _score_prompts(model, the_plan, group, last, cont_hidden)
        for i, nll in done.items():
            out[i] = nll
        bar.update(len(done))
    bar.close()
    return out


@torch.no_grad()
def hidden_states(
    model: HookedTransformer,
    the_plan: Plan,
    group: list[int],
    budget: int,
    fwd_hooks=(),
    prefixes: Prefixes | None = None,
) -> tuple[Tensor, dict[int, Tensor]]:
    """The forward passes of one batch of prompts (``group``: prompt indices), nothing else.

    Returns the last prompt position's hidden state of each prompt (``[len(group), d_model]``,
    it predicts every answer's first token) and, by continuation index, the hidden states of
    the continuations of these prompts (``[n, d_model]``, position ``j`` predicts answer token
    ``j + 1``). A prompt with a shared prefix runs its tokens after the prefix, on the prefix's
    key-value cache (``prefixes``: from :func:`prefix_pass`, else run here); the rest of every
    prompt is left-padded, so that each ends in the last column (padding between the prefix
    and the rest is masked).
    """
    pad = models.pad_id(model)
    device = models.model_device(model)
    rest = [the_plan.prompts[p][the_plan.shared(p) :] for p in group]
    width = max(len(r) for r in rest)
    tokens = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rest], device=device)
    mask_t = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest], device=device)
    if prefixes is None:
        prefixes = prefix_pass(model, the_plan, group, fwd_hooks)
    cache = _gather(model, the_plan, group, prefixes)
    hidden = models.final_hidden(model, tokens, fwd_hooks, cache, mask_t)
    full_mask = cache.previous_attention_mask  # the prefixes' columns, then these
    row_of = {p: r for r, p in enumerate(group)}
    # continuations of these prompts, in batches that continue the prompts' cached rows
    conts = [c for c, (p, _) in enumerate(the_plan.continuations) if p in row_of]
    cont_hidden: dict[int, Tensor] = {}
    # (a continuation row attends to its prompt's cached width too)
    lengths = [full_mask.shape[1] + len(the_plan.continuations[c][1]) for c in conts]
    for chunk in _batches(lengths, budget):
        ids = [conts[j] for j in chunk]
        n = max(len(the_plan.continuations[c][1]) for c in ids)
        seqs = [list(the_plan.continuations[c][1]) for c in ids]
        cont_tokens = torch.tensor([s + [pad] * (n - len(s)) for s in seqs], device=device)
        src = torch.tensor([row_of[the_plan.continuations[c][0]] for c in ids], device=device)
        cont_mask = torch.cat([full_mask[src], torch.ones_like(cont_tokens)], dim=1)
        h = models.final_hidden(
            model, cont_tokens, fwd_hooks, models.cache_rows(cache, src), cont_mask
        )
        cont_hidden.update({c: h[k] for k, c in enumerate(ids)})
    return hidden[:, -1], cont_hidden


def _gather(model: HookedTransformer, the_plan: Plan, group: list[int], prefixes: Prefixes):
    """A key-value cache, open for appending, with each prompt's shared prefix left-padded to
    the batch's longest (an empty cache when no prompt of the batch has one)."""
    width = max(the_plan.shared(p) for p in group)
    if width == 0:
        return models.kv_cache(model, len(group))
    device = models.model_device(model)
    # a prompt without a prefix borrows a row with every column masked
    rows = [prefixes.row[the_plan.prompt_prefix[p]] if the_plan.shared(p) else 0 for p in group]
    cache = models.cache_rows(prefixes.cache, torch.tensor(rows, device=device), last=width)
    alone = torch.tensor([not the_plan.shared(p) for p in group], device=device)
    cache.previous_attention_mask[alone] = 0
    cache.unfreeze()
    return cache


@torch.no_grad()
def _score_prompts(
    model: HookedTransformer,
    the_plan: Plan,
    group: list[int],
    last: Tensor,
    cont_hidden: dict[int, Tensor],
) -> dict[int, float]:
    """NLL of every pair whose prompt is in ``group`` (prompt indices), from the hidden states
    of their forward passes."""
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
