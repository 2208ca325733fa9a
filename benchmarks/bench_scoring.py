"""Benchmark: batched probe scoring vs one forward per probe, and vs its own limit.

Scores every METHOD §5 probe of the first records of a data file on the embedded SmolLM2, in one
process:

* **batched**: :func:`attndrift.scoring.answer_nll` (every prompt once, sorted and left-padded
  under a token budget; multi-token answers continue their prompt's key-value cache);
* **one forward per pair** (the reference, ``max_batch_size=1``): ratio ≥ 5x is the target;
* **bare forward, the limit**: the same padded token batches the scorer runs (prompt batches,
  then the continuations on their prompts' caches), the transformer only: no planning, no
  unembedding. The scorer should stay within 1.2x of it.

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
def bare_forward(model, pairs, budget: int) -> float:
    """Seconds of the scorer's forward passes alone (same batches, same padding)."""
    plan = scoring.plan(model, pairs)
    t0 = time.perf_counter()
    for group in scoring._batches([len(p) for p in plan.prompts], budget):
        scoring.hidden_states(model, plan, group, budget)
    return time.perf_counter() - t0


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
    print(
        f"attndrift {__version__} ({git_revision()}); {a.records} records of "
        f"{a.data or 'the embedded dataset'}: {len(probes)} probes, {len(pairs)} answers, "
        f"{len(plan.prompts)} distinct prompts, {len(plan.continuations)} continuations; "
        f"device {models.model_device(model)}, {torch.get_num_threads()} threads"
    )
    scoring.answer_nll(model, pairs[:8])  # warm-up
    t = time.perf_counter()
    batched = scoring.answer_nll(model, pairs, max_batch_tokens=a.batch_tokens)
    t_batched = time.perf_counter() - t
    t_bare = bare_forward(model, pairs, a.batch_tokens)
    t = time.perf_counter()
    single = scoring.answer_nll(model, pairs, max_batch_size=1)
    t_single = time.perf_counter() - t
    rate_b, rate_s = len(probes) / t_batched, len(probes) / t_single
    print(f"batched:                 {t_batched:7.1f} s  {rate_b:7.1f} probes/s")
    print(f"bare forward (limit):    {t_bare:7.1f} s")
    print(f"one forward per pair:    {t_single:7.1f} s  {rate_s:7.1f} probes/s")
    print(f"ratio batched / one-per-pair throughput: {rate_b / rate_s:.2f}x   (target >= 5x)")
    print(f"ratio batched / bare forward time:      {t_batched / t_bare:.2f}x   (target <= 1.2x)")
    print(
        f"max |ΔP| = {(torch.exp(-batched) - torch.exp(-single)).abs().max():.2e}, "
        f"max |ΔNLL| = {(batched - single).abs().max():.2e}"
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
