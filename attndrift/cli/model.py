"""``attndrift prepare`` (install time: the embedded model converted, the covariance of its
default ROME layer cached) and ``attndrift eval`` (the METHOD §5 table of an unedited model)."""

import argparse
import time
from pathlib import Path

from attndrift.cli.common import (
    _check_output,
    _data_args,
    _load_data,
    _load_model,
    _model_args,
    _writing,
    command,
)


@command("prepare", "install-time step: convert the embedded model, cache its covariance")
def prepare(args) -> int:
    """Convert and cache the embedded model, then compute and cache the covariance statistics
    of its default ROME layer (the preset's self-sampled corpus), so that later edits start at
    once."""
    from attndrift import models
    from attndrift.editing import covariance, rome

    p = argparse.ArgumentParser(prog="attndrift prepare", description=prepare.__doc__)
    p.add_argument("--no-covariance", action="store_true", help="only convert the model")
    a = p.parse_args(args)
    t0 = time.perf_counter()
    model = models.load_model(models.EMBEDDED_MODEL)
    print(f"embedded model ready in {models.cache_dir()} ({time.perf_counter() - t0:.1f} s)")
    cfg = rome.preset(model)
    if not a.no_covariance and cfg.covariance is not None:
        t0 = time.perf_counter()
        covariance.layer_covariance(model, cfg.layer, cfg.covariance)
        print(
            f"covariance of layer {cfg.layer} ({cfg.covariance.n_tokens} tokens) ready "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    return 0


@command("eval", "evaluate an (unedited) model: the METHOD §5 table")
def evaluate(args) -> int:
    """Score every probe of the records on the unedited model and print ES PS NS RS DNS Score."""
    from attndrift import evaluation, metrics

    p = argparse.ArgumentParser(prog="attndrift eval", description=evaluate.__doc__)
    _model_args(p)
    _data_args(p)
    p.add_argument("--fluency", action="store_true", help="also sample generation prompts (FL)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward")
    p.add_argument("--csv", type=Path, default=None, help="write the per-probe table here")
    a = p.parse_args(args)
    if a.csv is not None:
        _check_output(a.csv, "--csv")
    ds = _load_data(a)
    model = _load_model(a)
    t0 = time.perf_counter()
    ev = evaluation.evaluate(
        model, ds.records, fluency=a.fluency, max_batch_tokens=a.batch_tokens, progress=True
    )
    dt = time.perf_counter() - t0
    print(f"{len(ds)} records, {len(ev.probes)} probes scored in {dt:.1f} s")
    print(metrics.table({"unedited": ev.summary}).to_string())
    print(
        "(% of probes with P(right) > P(wrong), ± 95 % normal interval; Score: harmonic mean of "
        + ", ".join(ev.summary.score_kinds)
        + ")"
    )
    if a.csv:
        with _writing(a.csv):
            ev.probes.to_csv(a.csv, index=False)
        print(f"per-probe table: {a.csv}")
    return 0
