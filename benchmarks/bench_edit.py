"""Benchmark: a ROME edit with and without SADR, and the covariance computation.

Edits the same request of the embedded dataset on the embedded SmolLM2 with plain ROME and
with ROME+SADR (γ = 0.01), the same number of optimisation steps each (early stopping off),
side by side in one process, and prints the wall time per edit and per step and their ratio.
Then computes C = E[kkᵀ] at the edit layer from a fresh corpus in a subprocess and prints its
time and peak memory (against a subprocess that only loads the model).

    python benchmarks/bench_edit.py [--steps 20] [--record 0] [--cov-tokens 20000]
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from attndrift import data, models, rome, sadr, value

CHILD = r"""
import json, resource, sys, time
from attndrift import covariance, models
model = models.load_model("smollm2-135m")
out = {"load_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if sys.argv[1] != "load-only":
    cfg = covariance.CovarianceConfig(n_tokens=int(sys.argv[2]))
    t = time.perf_counter()
    texts = covariance.corpus_texts(model, cfg)
    out["corpus_s"] = time.perf_counter() - t
    t = time.perf_counter()
    c, used = covariance.second_moment(model, int(sys.argv[1]), texts, n_tokens=cfg.n_tokens)
    out["moment_s"] = time.perf_counter() - t
    out["tokens"] = used
out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def _child(*args: str, cache: str) -> dict:
    env = dict(os.environ, ATTNDRIFT_CACHE=cache)
    # the converted model is shared; corpora and statistics are fresh
    res = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--record", type=int, default=0)
    p.add_argument("--cov-tokens", type=int, default=20_000)
    p.add_argument("--no-cov", action="store_true", help="skip the covariance measurement")
    a = p.parse_args()
    model = models.load_model("smollm2-135m")
    req = data.load_embedded().by_id(a.record).request
    cfg = rome.preset(model)
    cfg = dataclasses.replace(
        cfg,
        covariance=None,  # timed separately below
        value=dataclasses.replace(cfg.value, steps=a.steps, early_stop_loss=0.0),
        sadr_steps=None,  # same number of steps with and without SADR
    )
    templates = rome.context_templates(model, cfg.templates)
    print(
        f"ROME at layer {cfg.layer} of SmolLM2-135M on {req.subject!r}, {a.steps} steps, "
        f"{len(templates)} templates, {models.model_device(model)}"
    )
    times = {}
    for name, s in (("ROME", None), ("ROME+SADR", sadr.SadrConfig(gamma=0.01))):
        rome.edit(model, req, dataclasses.replace(cfg, value=value.ValueConfig(steps=2)),
                  templates=templates, sadr=s)  # fmt: skip
        t = time.perf_counter()
        e = rome.edit(model, req, cfg, templates=templates, sadr=s)
        times[name] = time.perf_counter() - t
        print(
            f"{name:<10} {times[name]:6.1f} s per edit, {times[name] / a.steps:5.2f} s per step, "
            f"final P(o_new) {e.info['final']['p_new']:.3f}"
        )
    print(f"ratio ROME+SADR / ROME: {times['ROME+SADR'] / times['ROME']:.2f}x")

    if a.no_cov:
        return
    base = models.cache_dir()
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(base / "models", os.path.join(tmp, "models"))
        idle = _child("load-only", cache=tmp)
        cov = _child(str(cfg.layer), str(a.cov_tokens), cache=tmp)
    print(
        f"covariance at layer {cfg.layer} from {cov['tokens']} self-sampled tokens: sampling "
        f"{cov['corpus_s']:.0f} s, E[kkᵀ] {cov['moment_s']:.1f} s; peak RSS {cov['peak_mb']:.0f} "
        f"MB vs {idle['peak_mb']:.0f} MB for loading the model alone "
        f"(+{cov['peak_mb'] - idle['peak_mb']:.0f} MB)"
    )


if __name__ == "__main__":
    main()
