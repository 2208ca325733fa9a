"""Benchmark: batched probe scoring vs one forward per probe, and vs its own limit.

Scores every METHOD §5 probe of the first records of a data file on the embedded SmolLM2, in one
process:

* **batched**: :func:`attndrift.scoring.answer_nll` (every prompt once, sorted and left-padded
  under a token budget; token prefixes several prompts share, such as the sentence stating the
  edit that every DNS and RS_D probe of a record begins with, run once; multi-token answers
  continue their prompt's key-value cache);
* **batched, no shared prefixes** (``share_prefixes=False``): every prompt from its first token;
* **one forward per pair** (the reference, ``max_batch_size=1``): ratio ≥ 7x is the target;
* **bare forward, the limit**: the same padded token batches the scorer runs (the shared
  prefixes, the prompt batches on their caches, then the continuations), the transformer only:
  no planning, no unembedding. The scorer should stay within 1.2x of it.

Then the weight-layout speed-up of :func:`attndrift.models.fast_layout`.

    python benchmarks/bench_scoring.py [--data merged_counterfact_dev.json] [--records 20]
"""

import argparse
import time
from pathlib import Path

import torch

from attndrift import data, encoding, models, scoring
from attndrift.version import __version__, git_revision


@torch.no_grad()
def bare_forward(model, plan, budget: int) -> float:
    """Seconds of the scorer's forward passes alone (same batches, same padding)."""
    t0 = time.perf_counter()
    for _ in scoring.forward_passes(model, plan, budget):
        pass
    return time.perf_counter() - t0


def tokens_run(plan, budget: int) -> tuple[int, int]:
    """(real, padded) tokens of the prompt passes (shared prefixes once, then the rest)."""
    real = padded = 0
    for members in scoring.rounds(plan, budget):
        widths = [len(plan.prefixes[i]) for i in {plan.prompt_prefix[p] for p in members
                                                  if plan.shared(p)}]  # fmt: skip
        real += sum(widths)
        padded += len(widths) * max(widths, default=0)
        rest = [len(plan.prompts[p]) - plan.shared(p) for p in members]
        for group in scoring._batches(rest, budget):
            real += sum(rest[j] for j in group)
            padded += len(group) * max(rest[j] for j in group)
    return real, padded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", type=int, default=20)
    p.add_argument("--data", type=Path, default=None, help="default: the embedded dataset")
    p.add_argument("--batch-tokens", type=int, default=scoring.DEFAULT_BATCH_TOKENS)
    a = p.parse_args()
    model = models.load_model("smollm2-135m")
    ds = data.load_dataset(a.data) if a.data else data.load_embedded()
    probes = data.probes_of(ds.select(limit=a.records).records)
    pairs = [(x.prompt, x.right) for x in probes] + [(x.prompt, x.wrong) for x in probes]
    plan = scoring.plan(model, pairs)
    plain_plan = scoring.plan(model, pairs, share_prefixes=False)
    real, padded = tokens_run(plan, a.batch_tokens)
    real0, padded0 = tokens_run(plain_plan, a.batch_tokens)
    print(
        f"attndrift {__version__} ({git_revision()}); {a.records} records of "
        f"{a.data or 'the embedded dataset'}: {len(probes)} probes, {len(pairs)} answers, "
        f"{len(plan.prompts)} distinct prompts, {len(plan.prefixes)} shared prefixes, "
        f"{len(plan.continuations)} continuations; device {models.model_device(model)}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"prompt tokens run: {real} ({padded} padded) with shared prefixes, "
          f"{real0} ({padded0} padded) without")  # fmt: skip
    scoring.answer_nll(model, pairs[:8])  # warm-up
    t = time.perf_counter()
    batched = scoring.answer_nll(model, pairs, max_batch_tokens=a.batch_tokens)
    t_batched = time.perf_counter() - t
    t_bare = bare_forward(model, plan, a.batch_tokens)
    t = time.perf_counter()
    plain = scoring.answer_nll(model, pairs, max_batch_tokens=a.batch_tokens, share_prefixes=False)
    t_plain = time.perf_counter() - t
    t = time.perf_counter()
    single = scoring.answer_nll(model, pairs, max_batch_size=1)
    t_single = time.perf_counter() - t
    rate_b, rate_p, rate_s = (len(probes) / x for x in (t_batched, t_plain, t_single))
    print(f"batched:                 {t_batched:7.1f} s  {rate_b:7.1f} probes/s")
    print(f"bare forward (limit):    {t_bare:7.1f} s")
    print(f"no shared prefixes:      {t_plain:7.1f} s  {rate_p:7.1f} probes/s")
    print(f"one forward per pair:    {t_single:7.1f} s  {rate_s:7.1f} probes/s")
    print(f"ratio batched / one-per-pair throughput: {rate_b / rate_s:.2f}x   (target >= 7x)")
    print(f"ratio batched / bare forward time:      {t_batched / t_bare:.2f}x   (target <= 1.2x)")
    print(f"ratio no-shared / batched time:         {t_plain / t_batched:.2f}x")
    for name, x in (("one-per-pair", single), ("no shared prefixes", plain)):
        print(
            f"vs {name}: max |ΔP| = {(torch.exp(-batched) - torch.exp(-x)).abs().max():.2e}, "
            f"max |ΔNLL| = {(batched - x).abs().max():.2e}"
        )

    ids = torch.tensor([encoding.encode_prompt(model, probes[0].prompt).ids] * 16)
    with torch.no_grad():
        model(ids)
        t = time.perf_counter()
        for _ in range(5):
            fast_logits = model(ids)
        t_fast = (time.perf_counter() - t) / 5
        for p_ in model.parameters():  # TransformerLens' own (contiguous) layout
            p_.data = p_.data.contiguous()
        model(ids)
        t = time.perf_counter()
        for _ in range(5):
            plain_logits = model(ids)
        t_plain = (time.perf_counter() - t) / 5
    print(
        f"forward [16 x {ids.shape[1]}]: TL layout {t_plain * 1e3:.0f} ms, fast_layout "
        f"{t_fast * 1e3:.0f} ms: {t_plain / t_fast:.2f}x faster; "
        f"max |Δlogit| = {(fast_logits - plain_logits).abs().max():.1e}"
    )


if __name__ == "__main__":
    main()
