"""``attndrift demo``: the main job, a failing probe from edit to drift, patching and SADR,
written as one HTML report and a JSON summary."""

import argparse
import time
from pathlib import Path

from attndrift.cli.common import (
    _dtype_arg,
    _load_model,
    command,
)


@command("demo", "the main job: a failing probe from edit to drift, patching and SADR -> report")
def demo_command(args) -> int:
    """On the embedded SmolLM2 and dataset (offline): take the fact and the probe that ROME
    breaks most (by the rule of attndrift.demo.choose_probe), edit the fact with ROME and
    ROME+SADR, show the specificity failure, measure attention drift, localise the failure by
    restoring vanilla attention or MLP outputs, run a small sweep, and write one
    self-contained HTML report plus a JSON summary."""
    import json

    from attndrift import models
    from attndrift.editing import sadr
    from attndrift.experiments import demo, report
    from attndrift.version import __version__, git_revision

    p = argparse.ArgumentParser(prog="attndrift demo", description=demo_command.__doc__)
    p.add_argument("--model", default=models.EMBEDDED_MODEL, help="(default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda … (default: cuda if available)")
    _dtype_arg(p)
    p.add_argument(
        "--record",
        type=int,
        default=demo.DemoConfig.record,
        help="record of the embedded dataset to edit (default: %(default)s, the rule's choice)",
    )
    preset = sadr.preset(models.EMBEDDED_MODEL).gamma
    p.add_argument(
        "--sadr-gamma",
        type=float,
        default=None,
        help=f"SADR's weight γ for the ROME+SADR edit (default: the model's preset, "
        f"attndrift.sadr.preset: {preset:g} for {models.EMBEDDED_MODEL})",
    )
    p.add_argument(
        "--sweep-records",
        default=",".join(map(str, demo.DemoConfig.sweep_records)),
        help="embedded records of the small sweep (default: %(default)s)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=demo.DemoConfig.window,
        help="layers per restored window in the patching sweep (default: %(default)s)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="edit steps (default: the presets' budgets)"
    )
    p.add_argument(
        "--identity-cov",
        action="store_true",
        help="no covariance adjustment (quick, crude; default: the preset's covariance)",
    )
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="(default: %(default)s)")
    a = p.parse_args(args)
    cfg = demo.DemoConfig(
        record=a.record,
        sadr_gamma=a.sadr_gamma,
        sweep_records=tuple(int(x) for x in a.sweep_records.split(",") if x.strip()),
        window=a.window,
        steps=a.steps,
        identity_cov=a.identity_cov,
    )
    t0 = time.perf_counter()
    model = _load_model(a)
    a.out.mkdir(parents=True, exist_ok=True)
    # one results file per code revision: a sweep resumes only onto lines of its own revision
    result = demo.run(model, cfg, a.out / f"sweep-{git_revision()}.jsonl")
    r = result.record.request
    print(f"\nrecord {result.record.id}: {r.subject!r}: {r.target_true!r} -> {r.target_new!r}")
    print("\n".join(demo.sentences(result)))
    shown = result.probes[["kind", "right", "wrong"]].copy()
    for name in demo.MODELS:
        shown[name] = [
            f"{x:.3f}/{y:.3f}"
            for x, y in zip(
                result.probes[f"P(right) {name}"], result.probes[f"P(wrong) {name}"], strict=True
            )
        ]
    print("\nP(right)/P(wrong) per probe:")
    print(shown.to_string(index=False))
    print("\nattention drift on the record's RS/DNS prompts:")
    print(demo._drift_table(result).to_string())
    print(f"\nbest restoring cell per component (ROME edit, {result.probe.prompt!r}):")
    print(demo._best_patches(result.patches).to_string())
    print(f"\nsmall sweep (% of probes right [95 % Wilson interval], † under {demo.SMALL_N}):")
    small = demo._sweep_small_n(result.sweep_lines)
    sweep_table = demo._sweep_table(result.sweep_lines).where(~small, lambda t: t + " †")
    print(sweep_table.T.rename_axis("metric").to_string())  # metrics as rows: cells are wide
    footer = (
        f"attndrift {__version__} ({git_revision()}), model {model.cfg.model_name} on "
        f"{models.model_device(model)}, {time.perf_counter() - t0:.0f} s"
    )
    page = report.render("attndrift demo: attention drift after a knowledge edit",
                         demo.sections(result), footer)  # fmt: skip
    (a.out / "report.html").write_text(page, encoding="utf-8")
    info = demo.to_json(result) | {"version": __version__, "git": git_revision()}
    (a.out / "summary.json").write_text(json.dumps(info, indent=1, default=str))
    print(f"\nreport: {(a.out / 'report.html').resolve()}")
    print(f"summary: {(a.out / 'summary.json').resolve()}  ({time.perf_counter() - t0:.0f} s)")
    return 0
