"""One-shot check of a GPU machine: run it with ``scripts/gpu_check.sh`` (see there).

Stages (each written to the JSON file as soon as it ends, so a run cut short keeps what it did;
a failing stage does not stop the others):

* ``environment``: torch, CUDA, the cards, attndrift's version;
* ``tests``: the fast tests with ``ATTNDRIFT_TEST_DEVICE=<device>`` (counts, failed test ids,
  skip reasons; the log beside the JSON);
* ``agreement``: the CPU against the device on one model: a ROME+SADR edit (10 steps, fixed
  templates, no covariance), the scores of the record's probes, its drift table (the CPU's edit
  applied on both) and a restoring patching table, each with its stated tolerance
  (:data:`TOLERANCES`); float32 products (TF32 off);
* ``timing`` on the device: the matrix-product rate (float32 and bfloat16), the value step
  (lean and hooked forward, with and without SADR: time, FLOPs from the shapes, fraction of the
  rate), scoring (the batched scorer against its bare forward and the one-forward-per-pair
  loop) and a patching sweep;
* ``sweep``: a two-process sweep (torchrun; NCCL when the machine has two GPUs or more, else
  Gloo with both ranks on the one GPU, since NCCL cannot run two ranks on one device) against
  a one-process sweep of the same records and settings: same lines, every probe's P and every
  drift number within the tolerance.

Exit status 0 when every stage that ran is ``ok``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _import() -> None:
    """The heavy imports, once the arguments are checked (a bad argument fails at once)."""
    global np, torch, matmul_rate, __version__, git_revision
    global data, drift, models, patching, results, rome, sadr, scoring, setting, sweep, value
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import matmul_rate

    from attndrift import data, models, scoring
    from attndrift.analysis import drift, patching
    from attndrift.editing import rome, sadr, setting, value
    from attndrift.experiments import results, sweep
    from attndrift.version import __version__, git_revision


STAGES = ("tests", "agreement", "timing", "sweep")
#: CPU against the device (float32 on both, TF32 off), and one process against two
TOLERANCES = {
    "edit": 1e-3,  # the edit's weight change left @ right: relative Frobenius difference
    "scores": 1e-5,  # P(answer) of every probe of the record: absolute
    "drift": 1e-4,  # drift factor of every (probe, layer): absolute
    "patching": 1e-4,  # recovery of every patched cell: absolute
    "sweep": 1e-4,  # every probe's P and every drift number of every line: absolute
}
TEMPLATES = ("{}", "The following is a fact. {}", "I read this today. {}")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, reps: int = 1) -> tuple[float, object]:
    """Median seconds of ``reps`` calls (after one warm-up), and the last result."""
    out = fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def environment(device: str) -> dict:
    from importlib.metadata import version

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformer_lens": version("transformer-lens"),
        "attndrift": __version__,
        "git": git_revision(),
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
        with contextlib.suppress(Exception):  # (a build without NCCL)
            nccl = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    return info


def tests(device: str, timeout: int, pytest_args: list[str], log_path: Path) -> dict:
    env = dict(os.environ, ATTNDRIFT_TEST_DEVICE=device)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *pytest_args]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        text, code = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as err:
        text = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        code = None
    log_path.write_text(text)
    counts = {
        k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)
    }
    out = {
        "command": " ".join(cmd),
        "seconds": round(time.perf_counter() - t0, 1),
        "timed_out": code is None,
        "counts": counts,
        "failures": re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M),
        "skip_reasons": sorted(set(re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", text, re.M))),
        "log": str(log_path),
    }
    out["ok"] = code == 0
    return out


def _record():
    return data.load_embedded()[0]


def _edit(model, record):
    cfg = rome.preset(model)
    cfg = dataclasses.replace(
        cfg, covariance=None, sadr_steps=10, value=dataclasses.replace(cfg.value, steps=10)
    )
    return rome.edit(model, record.request, cfg, sadr=sadr.SadrConfig(0.1), templates=TEMPLATES)


def _check(out: dict, name: str, diff: float) -> None:
    out[name] = {"max_diff": diff, "tolerance": TOLERANCES[name], "ok": diff <= TOLERANCES[name]}


def agreement(model_name: str, device: str) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = models.load_model(model_name, device="cpu")
    dev = models.load_model(model_name, device=device)
    record = _record()
    out: dict = {"model": model_name, "record": record.id}
    e_cpu, e_dev = _edit(cpu, record), _edit(dev, record)
    w_cpu = e_cpu.left[0].double().cpu() @ e_cpu.right[0].double().cpu()
    w_dev = e_dev.left[0].double().cpu() @ e_dev.right[0].double().cpu()
    _check(out, "edit", float((w_dev - w_cpu).norm() / w_cpu.norm()))
    out["edit"]["steps_run"] = [e_cpu.run.steps_run, e_dev.run.steps_run]
    probes = record.probes()
    pairs = [(p.prompt, p.right) for p in probes] + [(p.prompt, p.wrong) for p in probes]
    p_cpu = torch.exp(-scoring.answer_nll(cpu, pairs))
    p_dev = torch.exp(-scoring.answer_nll(dev, pairs))
    _check(out, "scores", float((p_dev - p_cpu).abs().max()))
    kept = [p for p in record.probes(["RS", "DNS"]) if p.subject in p.prompt]
    tables = []
    for model in (cpu, dev):
        variant = models.Variant(model, e_cpu.hooks(model))
        d = drift.measure(model, variant, [p.prompt for p in kept], [p.subject for p in kept])
        probe = kept[-1]
        patch = patching.patch(
            model, variant, probe.prompt, probe.right, probe.wrong, direction="restore"
        )
        tables.append(
            (d.factor_per_layer().double().cpu(), patch.recovery.double().cpu().flatten())
        )
    (f_cpu, r_cpu), (f_dev, r_dev) = tables
    _check(out, "drift", float((f_dev - f_cpu).abs().max()))
    _check(out, "patching", float(np.nanmax((r_dev - r_cpu).abs().numpy())))
    out["patching"]["same_best_cell"] = int(np.nanargmax(r_cpu)) == int(np.nanargmax(r_dev))
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def timing(model_name: str, device: str, n_records: int, reps: int) -> dict:
    model = models.load_model(model_name, device=device)
    cfg = rome.preset(model)
    d, d_mlp = model.cfg.d_model, model.cfg.d_mlp
    out: dict = {"model": model_name, "device": str(models.model_device(model))}
    rates = {
        "float32": matmul_rate(2048, d, d_mlp, device=device),
        "bfloat16": matmul_rate(2048, d, d_mlp, device=device, dtype=torch.bfloat16),
    }
    out["matmul_gflops"] = {k: round(v / 1e9, 1) for k, v in rates.items()}
    out["matmul_shape"] = [2048, d, d_mlp]
    request = _record().request
    hook = models.mlp_out_hook(cfg.layer)
    steps = {}
    for label, restrain in (("", None), ("+SADR", sadr.SadrConfig(0.05))):
        for path in ("lean", "hooked"):
            context = value.hooked_forward() if path == "hooked" else contextlib.nullcontext()
            with context:
                objective = value.ValueObjective(
                    model, request, hook, cfg.layer, TEMPLATES, cfg.value, restrain
                )
            delta = torch.randn(objective.init.shape, device=objective.init.device) * 0.1
            delta.requires_grad_(True)

            def step(o=objective, x=delta):
                o(x).total.backward()

            with value.frozen(model):
                seconds, _ = _timed(step, device, reps)
            flops = objective.step_flops()["total"]
            steps[path + label] = {
                "ms": round(seconds * 1e3, 2),
                "gflop": round(flops / 1e9, 3),
                "fraction_of_matmul_rate": round(flops / seconds / rates["float32"], 3),
            }
    out["value_step"] = steps
    records = data.load_embedded().select(limit=n_records).records
    probes = data.probes_of(records)
    pairs = [(p.prompt, p.right) for p in probes] + [(p.prompt, p.wrong) for p in probes]
    plan = scoring.plan(model, pairs)
    t_batched, _ = _timed(lambda: scoring.answer_nll(model, pairs), device)
    t_bare, _ = _timed(lambda: list(scoring.forward_passes(model, plan, 4096)), device)
    t_single, _ = _timed(lambda: scoring.answer_nll(model, pairs, max_batch_size=1), device)
    out["scoring"] = {
        "records": n_records,
        "answers": len(pairs),
        "batched_s": round(t_batched, 3),
        "bare_forward_s": round(t_bare, 3),
        "one_per_pair_s": round(t_single, 3),
        "batched_over_bare": round(t_batched / t_bare, 2),
        "speedup_over_one_per_pair": round(t_single / t_batched, 2),
    }
    probe = records[0].probes(["DNS"])[0] if records[0].probes(["DNS"]) else probes[0]
    variant = models.Variant(model, _edit(model, records[0]).hooks(model))
    t_patch, result = _timed(
        lambda: patching.patch(
            model, variant, probe.prompt, probe.right, probe.wrong, direction="restore"
        ),
        device,
    )
    cells = int(np.prod(result.recovery.shape))
    out["patching"] = {
        "cells": cells,
        "s": round(t_patch, 3),
        "cells_per_s": round(cells / t_patch),
    }
    if torch.device(device).type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    out["ok"] = True
    return out


def _sweep_settings() -> tuple:
    return (
        setting.Setting(identity_cov=True, steps=3),
        setting.Setting(identity_cov=True, steps=3, sadr_gamma=0.1),
    )


def _sweep_numbers(line: results.Line) -> np.ndarray:
    d = line.drift
    numbers = [x for p in line.post for x in (p.p_right, p.p_wrong)]
    numbers += [*d.factor, *d.p_new, *(x for row in d.per_layer for x in row)]
    return np.asarray(numbers, dtype=float)


def sweep_stage(model_name: str, device: str, n_records: int, work: Path) -> dict:
    records = data.load_embedded().select(limit=n_records).records
    one = work / "one.jsonl"
    model = models.load_model(model_name, device=device)
    t0 = time.perf_counter()
    sweep.run(model, records, _sweep_settings(), one, progress=False)
    t_one = time.perf_counter() - t0
    del model
    two = work / "two.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(Path(__file__)), "--sweep-worker", "--model", model_name, "--device",
           device, "--records", str(n_records), "--out", str(two)]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    t_two = time.perf_counter() - t0
    out: dict = {"records": n_records, "settings": [s.key for s in _sweep_settings()]}
    out |= {"one_process_s": round(t_one, 1), "two_process_s": round(t_two, 1)}
    if res.returncode != 0:
        out |= {"ok": False, "error": (res.stdout + res.stderr)[-3000:]}
        return out
    info = json.loads(res.stdout.strip().splitlines()[-1])
    out |= info
    single = {x.key: x for x in results.read(one)}
    merged = {x.key: x for x in results.load([two])}
    shards = sorted(work.glob("two.rank*-of-2.jsonl"))
    per_rank = [{x.record for x in results.read(s)} for s in shards]
    out["shards"] = len(shards)
    out["disjoint_shards"] = len(per_rank) == 2 and per_rank[0].isdisjoint(per_rank[1])
    out["same_lines"] = single.keys() == merged.keys()
    diff = 0.0
    for key in single.keys() & merged.keys():
        a, b = _sweep_numbers(single[key]), _sweep_numbers(merged[key])
        diff = max(diff, float(np.nanmax(np.abs(a - b))) if a.size == b.size else float("inf"))
    out |= {"max_diff": diff, "tolerance": TOLERANCES["sweep"]}
    out["ok"] = out["same_lines"] and out["disjoint_shards"] and diff <= TOLERANCES["sweep"]
    return out


def sweep_worker(model_name: str, device: str, n_records: int, out: Path) -> None:
    """One rank of the two-process sweep (under torchrun)."""
    import torch.distributed as dist

    rank, world = sweep.distributed_rank()
    cuda = torch.device(device).type == "cuda"
    n_gpus = torch.cuda.device_count() if cuda else 0
    backend = "nccl" if cuda and n_gpus >= world else "gloo"
    here = f"cuda:{rank % n_gpus}" if cuda else device
    if cuda:
        torch.cuda.set_device(here)
    dist.init_process_group(backend)
    model = models.load_model(model_name, device=here)
    records = data.load_embedded().select(limit=n_records).records
    sweep.run(model, records, _sweep_settings(), out, rank=rank, world=world, progress=False)
    dist.barrier()
    devices = [None] * world
    dist.all_gather_object(devices, here)
    dist.destroy_process_group()
    if rank == 0:
        note = None
        if cuda and backend == "gloo":
            note = f"{n_gpus} GPU: NCCL cannot run {world} ranks on one device; ran Gloo"
        print(json.dumps({"backend": backend, "world": world, "devices": devices, "note": note}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="tiny-llama", help="tiny-llama or smollm2-135m")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--skip", default="", help=f"stages to skip, of {','.join(STAGES)}")
    p.add_argument("--quick", action="store_true", help="fewer records and repetitions")
    p.add_argument("--tests-timeout", type=int, default=240)
    p.add_argument("--pytest-args", default="-m 'not slow'")
    p.add_argument("--records", type=int, default=None)
    p.add_argument("--sweep-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    skip = {s for s in a.skip.split(",") if s}
    if skip - set(STAGES):
        p.error(f"--skip: unknown stages {sorted(skip - set(STAGES))}; expected {STAGES}")
    import torch

    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available here")
    _import()
    if a.sweep_worker:
        sweep_worker(a.model, a.device, a.records, a.out)
        return 0
    n_records = a.records or (2 if a.quick else 20)
    reps = 2 if a.quick else 5
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "model": a.model}
    report["environment"] = environment(a.device)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        a.out.write_text(json.dumps(report, indent=1, default=str))

    with tempfile.TemporaryDirectory() as tmp:
        stages = {
            "tests": lambda: tests(
                a.device, a.tests_timeout, _split(a.pytest_args), a.out.with_suffix(".tests.log")
            ),
            "agreement": lambda: agreement(a.model, a.device),
            "timing": lambda: timing(a.model, a.device, n_records, reps),
            "sweep": lambda: sweep_stage(a.model, a.device, min(n_records, 4), Path(tmp)),
        }
        for name, run in stages.items():
            if name in skip:
                report[name] = {"skipped": True}
                continue
            t0 = time.perf_counter()
            try:
                report[name] = run()
            except Exception as err:  # a failing stage is a result; the others still run
                report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
            report[name]["stage_s"] = round(time.perf_counter() - t0, 1)
            print(f"{name}: {'ok' if report[name].get('ok') else 'FAILED'} "
                  f"({report[name]['stage_s']} s)", flush=True)  # fmt: skip
            save()
    ran = [report[s] for s in STAGES if s not in skip]
    report["ok"] = all(r.get("ok") for r in ran)
    save()
    print(f"{'all stages ok' if report['ok'] else 'some stages FAILED'}: {a.out}")
    return 0 if report["ok"] else 1


def _split(text: str) -> list[str]:
    import shlex

    return shlex.split(text)


if __name__ == "__main__":
    sys.exit(main())
