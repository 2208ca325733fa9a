"""Benchmark: batched probe scoring vs one forward per probe (and the weight-layout speed-up).

Scores every SPEC §5 probe of the first 20 records of the dev data on the embedded SmolLM2
twice in one process — batched (attndrift.scoring defaults) and one forward per (prompt,
answer) — and prints scored probes per second, their ratio and the largest difference.
Then times a TransformerLens forward with and without :func:`attndrift.models.fast_layout`.

    python benchmarks/bench_scoring.py [--records 20] [--data PATH]
"""

import argparse
import time
from pathlib import Path

import torch

from attndrift import data, encoding, models, scoring

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "merged_counterfact_dev.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", type=int, default=20)
    p.add_argument("--data", type=Path, default=DEV)
    a = p.parse_args()
    model = models.load_model("smollm2-135m")
    probes = data.probes_of(data.load_dataset(a.data).select(limit=a.records).records)
    pairs = [(x.prompt, x.right) for x in probes] + [(x.prompt, x.wrong) for x in probes]
    print(
        f"{a.records} dev records: {len(probes)} probes, {len(pairs)} answers, "
        f"device {models.model_device(model)}, {torch.get_num_threads()} threads"
    )

    scoring.answer_nll(model, pairs[:8])  # warm-up
    t = time.perf_counter()
    batched = scoring.answer_nll(model, pairs)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    single = scoring.answer_nll(model, pairs, max_batch_size=1)
    t_single = time.perf_counter() - t
    rate_b, rate_s = len(probes) / t_batched, len(probes) / t_single
    print(f"batched:           {t_batched:7.1f} s  {rate_b:7.1f} probes/s")
    print(f"one per forward:   {t_single:7.1f} s  {rate_s:7.1f} probes/s")
    print(f"ratio (batched / one-per-forward throughput): {rate_b / rate_s:.2f}x")
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
