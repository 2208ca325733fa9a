"""Benchmark: editing speed: the value step against the machine's matrix-product rate, the lean
forward against TransformerLens' hooked forward, the prefix cache against the full forward.

Everything runs side by side in one process, on the same request, weights, templates and
covariance; the printed ratios are what the targets refer to:

1. **value step** (forward + backward of L(δ)) of each path: every position from layer L (the
   full forward, the reference), the δ-dependent positions from layer L+1 over the prefix
   key-value cache through TransformerLens' hooked forward (``hooked``, the path before the
   lean forward, :func:`attndrift.editing.value.hooked_forward`) and through the lean forward
   (``lean``, :mod:`attndrift.models.lean`), with and without SADR; the step's FLOPs counted
   from the shapes, the matrix-product rate measured here (``[2048, d_model] @ [d_model,
   d_mlp]``, the model's dtype; also at the step's own shape, its tokens as rows) and the
   fraction of each that each path achieves; peak memory;
2. **whole edit** (templates and C cached, as in a sweep): ROME and ROME+SADR at the preset,
   and ROME+SADR for 80 steps (no early stop), hooked forward (old) against the lean forward
   (new), and the largest relative difference of their saved tensors;
3. **a sweep record**: one record under ROME and ROME+SADR, edit + every probe before and after
   + drift: the old loop (full-forward edits, the unedited scores and the vanilla attention
   recomputed for every setting) vs :func:`attndrift.experiments.sweep.run`;
4. **steps run** under each preset (ROME, ROME+SADR, MEMIT, MEMIT+SADR) on a few records:
   how often early stopping triggers;
5. **the closed-form solves** of MEMIT (``(λC + KKᵀ)⁻¹K``) and AlphaEdit
   (``(P(KKᵀ + K_pK_pᵀ) + αI)⁻¹PK``) at the model's C of the MEMIT preset's last layer, for
   n = 1, 10, 50 keys: the dense d_mlp × d_mlp solve (old) against Woodbury's identity with C
   factored once (new), and the largest relative difference of the two;
6. **the keys of MEMIT's layer loop** for a batch of n = 1, 10, 50 requests (the dataset's
   first n) at the MEMIT preset's layers, each layer's MLP changed after its keys are read as
   in the loop: a forward from the embedding per layer (old) against
   :class:`attndrift.editing.kit.MeanKeys`, which resumes from the residual before the last layer
   read (new), and whether the keys are bit-identical.

Times are wall-clock medians; on a machine shared with other work, compare only the ratios of
one run (and the achieved fractions, whose rate is measured in the same run).

    python benchmarks/bench_edit.py [--data merged_counterfact_dev.json --record 1]
        [--model smollm2-135m | gpt2-random] [--device cuda] [--reps 5] [--steps-records 3]
        [--skip 1,2,3,4,5,6]
"""

import argparse
import contextlib
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import matmul_rate, peak_bytes

from attndrift import data, evaluation, models
from attndrift.analysis import drift
from attndrift.editing import rome, sadr, setting, value
from attndrift.experiments import results, sweep
from attndrift.version import __version__, git_revision

GAMMA = 0.2
EDIT_GAMMA = 0.05  # SADR's γ of the whole-edit timings


def _step(objective: value.ValueObjective) -> float:
    """Seconds of one forward + backward of L(δ) at a fixed non-zero δ."""
    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(objective.init.shape, generator=g) * 0.1).to(objective.init.device)
    delta.requires_grad_(True)
    with value.frozen(objective.model):
        t = time.perf_counter()
        objective(delta).total.backward()
        if delta.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t


def step_ratios(model, req, cfg, templates, reps: int) -> None:
    layer, hook = cfg.layer, models.mlp_out_hook(cfg.layer)

    def objective(cached: bool, s, lean: bool = True) -> value.ValueObjective:
        vcfg = dataclasses.replace(cfg.value, prefix_cache=cached)
        if lean:
            return value.ValueObjective(model, req, hook, layer, templates, vcfg, s)
        with value.hooked_forward():
            return value.ValueObjective(model, req, hook, layer, templates, vcfg, s)

    restrain = sadr.SadrConfig(GAMMA)
    objs = {
        "full": objective(False, None),
        "hooked": objective(True, None, lean=False),
        "lean": objective(True, None),
        "hooked+SADR": objective(True, restrain, lean=False),
        "lean+SADR": objective(True, restrain),
    }
    times: dict[str, list[float]] = {k: [] for k in objs}
    for obj in objs.values():  # warm-up
        _step(obj)
    for _ in range(reps):  # interleaved, so that a slow moment hits every variant
        for name, obj in objs.items():
            times[name].append(_step(obj))
    med = {k: statistics.median(v) for k, v in times.items()}
    lean = objs["lean"]
    print(f"value step ({lean.step_shape[0]} rows; positions per row run each step: "
          f"full {objs['full'].step_shape[1]} from layer {layer}, prefix-cached "
          f"{lean.step_shape[1]} from layer {layer + 1}), median of {reps}:")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:<12} {v * 1e3:7.0f} ms")
    print(f"  ratio lean / hooked:           {med['lean'] / med['hooked']:.2f}x")
    print(f"  ratio lean+SADR / hooked+SADR: {med['lean+SADR'] / med['hooked+SADR']:.2f}x")
    print(f"  ratio hooked / full:           {med['hooked'] / med['full']:.2f}x")
    print(f"  ratio lean+SADR / lean:        {med['lean+SADR'] / med['lean']:.2f}x")
    flops = lean.step_flops()
    d, d_mlp = model.cfg.d_model, model.cfg.d_mlp
    device = models.model_device(model)
    rate = matmul_rate(2048, d, d_mlp, device=device, dtype=model.cfg.dtype)
    print(f"  step FLOPs (matrix products, from the shapes): {flops['total'] / 1e9:.1f} GFLOP "
          f"(forward {flops['forward'] / 1e9:.1f}, backward {flops['backward'] / 1e9:.1f}); "
          f"matmul rate here [2048 x {d} x {d_mlp}]: {rate / 1e9:.0f} GFLOP/s")  # fmt: skip
    # the same rate at the step's own product shape (its tokens as rows): small products run
    # below the large-product rate, so this is the tighter limit of the step
    tokens = lean.step_shape[0] * lean.step_shape[1]
    rate_step = matmul_rate(tokens, d, d_mlp, device=device, dtype=model.cfg.dtype)
    print(f"  matmul rate at the step's shape [{tokens} x {d} x {d_mlp}]: {rate_step / 1e9:.0f} "
          f"GFLOP/s ({rate_step / rate:.0%} of the large-product rate)")  # fmt: skip
    for k in ("lean", "hooked", "lean+SADR", "hooked+SADR"):
        achieved = flops["total"] / med[k]
        print(f"  {k:<12} {med[k] * 1e3:6.0f} ms: {achieved / 1e9:6.1f} GFLOP/s = "
              f"{achieved / rate:.0%} of the matmul rate, {achieved / rate_step:.0%} of the "
              f"rate at the step's shape")  # fmt: skip
    peaks = {k: peak_bytes(lambda o=o: _step(o))[0] for k, o in objs.items()}
    print(
        "  peak memory of a step: "
        + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in peaks.items())
    )


def _max_rel_diff(a, b) -> float:
    """Largest relative difference (Frobenius) of two edits' saved factors."""
    pairs = [*zip(a.left, b.left, strict=True), *zip(a.right, b.right, strict=True)]
    return max(((x - y).norm() / x.norm()).item() for x, y in pairs)


def whole_edits(model, req, cfg, templates, cov) -> None:
    print(f"whole edit (templates and C cached), hooked forward (old) vs lean forward (new), "
          f"SADR γ={EDIT_GAMMA}:")  # fmt: skip
    long = dataclasses.replace(cfg, sadr_steps=80, value=dataclasses.replace(
        cfg.value, steps=80, early_stop_loss=0.0))  # fmt: skip
    cases = (
        ("ROME", cfg, None),
        ("ROME+SADR", cfg, sadr.SadrConfig(EDIT_GAMMA)),
        ("ROME+SADR 80", long, sadr.SadrConfig(EDIT_GAMMA)),
    )
    for name, c, s in cases:
        t, out = {}, {}
        for label in ("old", "new"):
            context = value.hooked_forward() if label == "old" else contextlib.nullcontext()
            t0 = time.perf_counter()
            with context:
                out[label] = rome.edit(model, req, c, sadr=s, cov=cov, templates=templates)
            t[label] = time.perf_counter() - t0
        steps = out["new"].run.steps_run
        print(f"  {name:<12} old {t['old']:6.1f} s, new {t['new']:6.1f} s ({steps} steps): "
              f"new / old {t['new'] / t['old']:.2f}x (target <= 0.5x); saved tensors' largest "
              f"relative difference {_max_rel_diff(out['old'], out['new']):.1e}")  # fmt: skip


def solves(model, editor, reps: int = 3) -> None:
    from attndrift.editing import alphaedit, memit

    mcfg = memit.preset(model)
    layer = mcfg.layers[-1]
    cov = editor.covariance(mcfg, layer)
    if cov is None:
        print("solves: the MEMIT preset has no C (identity): nothing to compare")
        return
    lam = mcfg.mom2_update_weight
    p = alphaedit.null_space_projection(cov, alphaedit.preset(model).null_threshold)
    g = torch.Generator().manual_seed(0)
    d = cov.shape[0]
    print(f"closed-form solves at layer {layer} (d_mlp {d}), median of {reps}:")

    def timed(f, *args):
        out, times = None, []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = f(*args)
            times.append(time.perf_counter() - t0)
        return out, statistics.median(times)

    def memit_dense(c64, keys):
        return torch.linalg.solve(lam * c64 + keys @ keys.T, keys)

    def alpha_dense(p64, keys, w):
        return torch.linalg.solve(p64 @ (w @ w.T) + 10.0 * torch.eye(d, dtype=w.dtype), p64 @ keys)

    c64, p64 = cov.double(), p.double()
    for n in (1, 10, 50):
        keys = torch.randn(d, n, generator=g, dtype=torch.float64)
        prev = torch.randn(d, 2 * n, generator=g, dtype=torch.float64)
        for name, (old, t_old), (new, t_new), extra in (
            ("MEMIT", timed(memit_dense, c64, keys), timed(memit.least_squares, cov, keys, lam),
             ""),
            ("AlphaEdit", timed(alpha_dense, p64, keys, torch.cat([keys, prev], dim=1)),
             timed(alphaedit.solve, keys, p, prev, 10.0), f"; {2 * n} earlier keys"),
        ):  # fmt: skip
            err = ((new - old).norm() / old.norm()).item()
            print(f"  {name:<9} n={n:<3} old {1e3 * t_old:7.1f} ms, new {1e3 * t_new:6.1f} ms: "
                  f"old / new {t_old / t_new:6.1f}x (rel. diff {err:.1e}{extra})")  # fmt: skip


def _old_record(model, record, settings) -> float:
    """The sweep loop before this change, for one record (returns seconds)."""
    editor = setting.Editor(model)
    t0 = time.perf_counter()
    for s in settings:
        evaluation.evaluate(model, [record])  # the unedited scores, again for every setting
        cfg = s.config(model)
        cfg = dataclasses.replace(cfg, value=dataclasses.replace(cfg.value, prefix_cache=False))
        cov = editor.covariance(cfg, cfg.layer)
        e = rome.edit(model, record.request, cfg, sadr=s.sadr(), cov=cov,
                      templates=editor.templates(cfg))  # fmt: skip
        edited = models.Variant(model, e.hooks(model))
        evaluation.evaluate(edited, [record])
        probes = [p for p in record.probes(sweep.DRIFT_KINDS) if p.subject in p.prompt]
        if probes:  # the vanilla attention, again for every setting
            drift.measure(model, edited, [p.prompt for p in probes], [p.subject for p in probes])
    return time.perf_counter() - t0


def sweep_record(model, record) -> None:
    settings = [setting.Setting(), setting.Setting(sadr_gamma=GAMMA)]
    old = _old_record(model, record, settings)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sweep.run(model, [record], settings, Path(tmp) / "r.jsonl", progress=False)
        new = time.perf_counter() - t0
        (line,) = [x for x in results.read(Path(tmp) / "r.jsonl") if x.setting.sadr_gamma]
    print(f"sweep record {record.id} (ROME and ROME+SADR, every probe, drift): old {old:.1f} s, "
          f"new {new:.1f} s: old / new {old / new:.2f}x")  # fmt: skip
    print("  where a ROME+SADR line's time goes: " + ", ".join(
        f"{k} {v:.2f} s" for k, v in line.seconds.items()))  # fmt: skip


def steps_per_preset(model, records) -> None:
    editor = setting.Editor(model)
    rows = {
        "ROME": setting.Setting(),
        f"ROME+SADR γ={GAMMA}": setting.Setting(sadr_gamma=GAMMA),
        "MEMIT": setting.Setting("memit"),
        f"MEMIT+SADR γ={GAMMA / 2:g}": setting.Setting("memit", GAMMA / 2),
    }
    print(f"steps run under each preset ({len(records)} records; early stopping = fewer than "
          "the budget):")  # fmt: skip
    for name, s in rows.items():
        cfg = s.config(model)
        budget = cfg.value.steps if not s.sadr_gamma or cfg.sadr_steps is None else cfg.sadr_steps
        steps = [editor(s, [r.request]).run.steps_run for r in records]
        stopped = sum(n < budget for n in steps)
        rule = f"{cfg.value.early_stop_on} < {cfg.value.early_stop_loss:g}"
        print(f"  {name:<18} budget {budget:3d}, stop on {rule}: steps {steps}, "
              f"stopped early {stopped}/{len(steps)}")  # fmt: skip


def loop_keys(model, ds, editor) -> None:
    from attndrift.editing import edits, kit, memit

    cfg = memit.preset(model)
    templates = editor.templates(cfg)
    g = torch.Generator().manual_seed(0)
    print(f"keys of MEMIT's loop at layers {list(cfg.layers)}, {len(templates)} templates:")
    for n in (1, 10, 50):
        requests = [r.request for r in ds.records[:n]]
        changes = [torch.randn(models.mlp_out_weight(model, layer).shape, generator=g) * 1e-3
                   for layer in cfg.layers]  # fmt: skip
        out, times = [], []
        for new in (False, True):
            t0, kept = time.perf_counter(), []
            read = kit.MeanKeys(model, requests, templates) if new else None
            with edits.restored(model, cfg.layers):
                for layer, change in zip(cfg.layers, changes, strict=True):
                    kept.append(read(layer) if new else
                                kit.MeanKeys(model, requests, templates)(layer))  # fmt: skip
                    with torch.no_grad():
                        models.mlp_out_weight(model, layer).add_(change)
            times.append(time.perf_counter() - t0)
            out.append(kept)
        same = all(torch.equal(a, b) for a, b in zip(*out, strict=True))
        print(
            f"  n={n:<3} old {times[0]:6.2f} s, new {times[1]:6.2f} s: "
            f"old / new {times[0] / times[1]:4.2f}x (keys bit-identical: {same})"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="default: the embedded dataset")
    p.add_argument("--record", type=int, default=None, help="default: the first record")
    p.add_argument("--model", default=models.EMBEDDED_MODEL, help="or gpt2-random (timing only)")
    p.add_argument("--device", default=None)
    p.add_argument("--reps", type=int, default=5, help="value steps per variant (median)")
    p.add_argument("--steps-records", type=int, default=3, help="records of part 4 (0: skip)")
    p.add_argument("--skip", default="", help="parts to skip, e.g. 3,4")
    a = p.parse_args()
    skip = {int(x) for x in a.skip.split(",") if x}
    if a.model == "gpt2-random":
        model = models.tiny_model("gpt2", device=a.device, **models.GPT2_SMALL)
    else:
        model = models.load_model(a.model, device=a.device)
    ds = data.load_dataset(a.data) if a.data else data.load_embedded()
    record = ds.by_id(a.record) if a.record is not None else ds[0]
    cfg = rome.preset(model)
    editor = setting.Editor(model)
    templates = editor.templates(cfg)
    cov = editor.covariance(cfg, cfg.layer)
    print(f"attndrift {__version__} ({git_revision()}), {model.cfg.model_name} on "
          f"{models.model_device(model)}, {torch.get_num_threads()} threads; record {record.id}: "
          f"{record.request.subject!r} -> {record.request.target_new!r}")  # fmt: skip
    if 1 not in skip:
        step_ratios(model, record.request, cfg, templates, a.reps)
    if 2 not in skip:
        whole_edits(model, record.request, cfg, templates, cov)
    if 3 not in skip:
        sweep_record(model, record)
    if 4 not in skip and a.steps_records:
        steps_per_preset(model, list(ds.records[: a.steps_records]))
    if 5 not in skip:
        solves(model, editor)
    if 6 not in skip:
        loop_keys(model, ds, editor)


if __name__ == "__main__":
    main()
