"""Command line: ``attndrift <command> --help``.

The CLI presents and saves; the computation lives in the library modules.
"""

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

COMMANDS: dict[str, tuple[str, Callable]] = {}
#: commands that pick up where an interrupted run stopped
RESUMABLE = ("sweep",)


def command(name: str, help: str):
    def register(fn: Callable) -> Callable:
        COMMANDS[name] = (help, fn)
        return fn

    return register


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="smollm2-135m (embedded, offline), an official TransformerLens name, or a local "
        "HF checkpoint directory (default: %(default)s)",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)"
    )
    _dtype_arg(p)


def _dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="the model weights' dtype (δ, covariance statistics and solves stay float32 or "
        "float64; default: %(default)s)",
    )


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default=None,
        help="records in the merged or ROME counterfact format (default: the embedded dataset)",
    )
    p.add_argument(
        "--limit", type=_count("--limit"), default=None, help="use at most this many records"
    )
    p.add_argument(
        "--records", default=None, help="record ids, e.g. 3,5,10-14 (default: all, in file order)"
    )
    p.add_argument("--lenient", action="store_true", help="skip (and report) malformed records")


def _count(flag: str) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= 0, refused naming ``flag`` otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
        return value

    return parse


def _ranges(text: str) -> list[tuple[int, int]]:
    """``--records``: the inclusive ranges of ``"3,5,10-14"`` (not expanded: a range of a
    billion ids costs nothing); a ValueError naming ``--records`` for anything else (not
    integers, an empty range, an id given twice, no id at all)."""
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        if not part.strip():
            continue
        first, dash, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)
        except ValueError:
            raise ValueError(
                f"--records: expected ids and ranges like 3,5,10-14, got {part.strip()!r}"
            ) from None
        if hi < lo:
            raise ValueError(f"--records: the range {lo}-{hi} is empty (write it {hi}-{lo})")
        ranges.append((lo, hi))
    if not ranges:
        raise ValueError(f"--records: no record id in {text!r}")
    highest = None
    for lo, hi in sorted(ranges):
        if highest is not None and lo <= highest:
            raise ValueError(f"--records: record {lo} is given more than once")
        highest = hi if highest is None else max(highest, hi)
    return ranges


def _in_ranges(record: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= record <= hi for lo, hi in ranges)


def _ids(text: str, known=None) -> list[int]:
    """Record ids from ``"3,5,10-14"`` (ranges inclusive), in the order given.

    With ``known`` (a :class:`attndrift.data.Dataset`) the ranges are resolved against its
    ids without being expanded: an id it lacks is a KeyError naming the first one. Without,
    the ranges are expanded (at most a million ids).
    """
    import bisect

    ranges = _ranges(text)
    if known is None:
        total = sum(hi - lo + 1 for lo, hi in ranges)
        if total > 1_000_000:
            raise ValueError(f"--records: {total} ids is more than a data file holds")
        return [i for lo, hi in ranges for i in range(lo, hi + 1)]
    have = sorted(r.id for r in known.records)
    out: list[int] = []
    for lo, hi in ranges:
        inside = have[bisect.bisect_left(have, lo) : bisect.bisect_right(have, hi)]
        if len(inside) != hi - lo + 1:  # the first id of the range that the data lacks
            missing = next((lo + k for k, i in enumerate(inside) if i != lo + k), lo + len(inside))
            raise KeyError(f"no record with id {missing} in {known.path or 'this dataset'}")
        out += inside
    return out


def _load_data(args):
    from attndrift import data

    if args.records is not None:
        _ranges(args.records)  # bad ids: before reading
    ds = data.load_dataset(args.data, lenient=args.lenient) if args.data else data.load_embedded()
    for s in ds.skipped:
        print(f"skipped record {s.record}: {s.field}: {s.problem}", file=sys.stderr)
    ids = _ids(args.records, known=ds) if args.records is not None else None
    selected = ds.select(ids=ids, limit=args.limit)
    if not len(selected):  # said now, before a model loads
        if ds.skipped and not len(ds):
            why = f"--lenient skipped all {len(ds.skipped)} records of {ds.path}"
        elif not len(ds):
            why = f"{ds.path} holds no records"
        else:
            why = "--limit 0"
        raise ValueError(f"no records selected: {why}")
    return selected


def _check_output(path: Path, flag: str, directory: bool = False) -> None:
    """Refuse, before any work, an output that could not be written: a folder where a file
    goes (or the reverse), a file in the way of its folder, a folder without write access."""
    if directory and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a directory")
    if not directory and path.is_dir():
        raise ValueError(f"{flag} {path} is a directory, not a file")
    if not directory and path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{flag} {path}: the file is not writable")
    folder = path if directory else path.parent
    while not folder.exists() and folder != folder.parent:  # the nearest existing folder
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: the directory {folder} is not writable")


@contextlib.contextmanager
def _writing(path: Path):
    """An OSError of the block that names no file (a full disk: "No space left on device")
    names ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def _load_model(args):
    from attndrift import models

    t0 = time.perf_counter()
    import torch

    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    model = models.load_model(args.model, device=args.device, dtype=dtype)
    print(f"model {args.model} on {models.model_device(model)} ({time.perf_counter() - t0:.1f} s)")
    return model


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


@command("sweep", "edit every record under each setting; resumable JSON-lines results")
def sweep_command(args) -> int:
    """Edit every record (weights untouched: edits run as hooks), score all METHOD §5 probes
    before and after, and append one JSON line per (record, setting) to --out. Every editor
    option takes a comma-separated list (MEMIT layer sets: separated by ';'): the sweep runs
    every combination. Rerunning with the same --out resumes. Under torchrun each rank takes a
    disjoint shard of the records."""
    from attndrift.experiments import results, sweep

    p = argparse.ArgumentParser(prog="attndrift sweep", description=sweep_command.__doc__)
    _model_args(p)
    _data_args(p)
    _setting_args(p, grid=True)
    p.add_argument("--fluency", action="store_true", help="also measure fluency (FL)")
    p.add_argument("--out", type=Path, required=True, help="results file (JSON lines)")
    p.add_argument(
        "--allow-new-revision",
        action="store_true",
        help="resume onto lines written by another git revision of this version",
    )
    a = p.parse_args(args)
    settings = settings_from_args(a, grid=True)
    results.check_out_name(a.out)
    _check_output(a.out, "--out")
    rank, world = sweep.distributed_rank()  # torchrun's variables: checked before waiting
    ds = _load_data(a)
    if world > 1:
        sweep.start("nccl" if a.device and "cuda" in a.device else "gloo", rank, world)
        a.device = a.device or sweep.device_for_rank()
    model = _load_model(a)
    print(f"{len(ds)} records x {len(settings)} settings: " + ", ".join(s.key for s in settings))
    path = sweep.run(
        model,
        ds,
        settings,
        a.out,
        fluency=a.fluency,
        rank=rank,
        world=world,
        allow_new_revision=a.allow_new_revision,
    )
    print(f"rank {rank}/{world}: results in {path}")
    if world > 1:
        sweep.finish()
        if rank != 0:
            return 0
    print(_table_text(results.load([a.out])))
    return 0


def _table_text(lines, interval: str = "normal", markdown: bool = False) -> str:
    from attndrift import metrics
    from attndrift.experiments import summary

    summaries = summary.by_setting(lines)
    counts = summary.records_per_setting(lines)
    n_pre = len({line.record for line in lines})
    rows = {f"none (n={n_pre})": summaries.pop("none")}
    rows |= {f"{k} (n={counts[k]})": v for k, v in summaries.items()}
    frame = metrics.table(rows, interval=interval)
    text = summary.markdown(frame) if markdown else frame.to_string()
    what = "± 95 % normal interval" if interval == "normal" else "[95 % Wilson interval] (n)"
    text += f"\n\n(% of probes with P(right) > P(wrong), {what} over probes)"
    rest = summary.support(lines)
    text += "\n\nwhat each row rests on: records / probes per metric; edit strength (median "
    text += "log-odds margin of the edited model's ES and PS probes) and mean steps run\n"
    return text + (summary.markdown(rest) if markdown else rest.to_string())


def _glance_text(lines, markdown: bool = False) -> str:
    from attndrift.experiments import summary

    frame = summary.glance(lines)
    text = summary.markdown(frame) if markdown else frame.to_string()
    note = "% of probes with P(right) > P(wrong); ES margin: median log-odds of the edit prompt"
    return f"{text}\n\n({note})"


@command("summarize", "tables of sweep results: Table 3, paired tests, selection, drift")
def summarize_command(args) -> int:
    """Merge results files (their rank shards and .gz copies) and print the Table-3 layout (ES
    PS NS RS DNS RS_D Score, FL) per setting next to the pre-edit row, with 95 % intervals;
    optionally paired tests between settings, a selection rule's verdict, drift versus failure
    by probe kind, and the γ trade-off plot."""
    from attndrift.experiments import results, summary

    p = argparse.ArgumentParser(prog="attndrift summarize", description=summarize_command.__doc__)
    p.add_argument("results", nargs="+", type=Path, help="results files of attndrift sweep")
    p.add_argument("--records", default=None, help="only these record ids, e.g. 0-199")
    p.add_argument(
        "--settings", default=None, help="only these setting keys (;-separated), in order"
    )
    p.add_argument("--paired", action="store_true", help="only records with every setting's line")
    p.add_argument("--interval", choices=("normal", "wilson"), default="normal")
    p.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    p.add_argument(
        "--glance",
        action="store_true",
        help="a compact table (ES PS RS DNS in %%, records, ES margin per setting) instead of "
        "the Table-3 layout and what it rests on",
    )
    p.add_argument("--choose", choices=sorted(summary.RULES), help="apply a selection rule")
    p.add_argument("--compare", action="append", default=[], metavar="A;B",
                   help="paired tests of setting B against setting A (repeatable)")  # fmt: skip
    p.add_argument("--drift", action="append", default=[], metavar="SETTING",
                   help="drift vs P(o_new) of SETTING's RS/DNS probes (repeatable)")  # fmt: skip
    p.add_argument("--drift-plot", type=Path, default=None, help="scatter plot of the first")
    p.add_argument("--drift-table", action="store_true",
                   help="drift vs P(o_new) of every setting, RS and DNS apart")  # fmt: skip
    p.add_argument("--plot", type=Path, default=None, help="write the trade-off figures (HTML)")
    p.add_argument("--csv", type=Path, default=None, help="write the trade-off numbers (CSV)")
    p.add_argument("--by-provenance", action="store_true",
                   help="results of different models, data files or versions: summarize each "
                   "apart, labelled by its provenance (default: refused)")  # fmt: skip
    a = p.parse_args(args)
    for flag in ("--drift-plot", "--plot", "--csv"):
        path = getattr(a, flag[2:].replace("-", "_"))
        if path is not None:
            _check_output(path, flag)
    if a.records:
        _ranges(a.records)
    if a.by_provenance:
        groups = results.load_by_provenance(a.results)
        if len(groups) > 1 and (a.plot or a.csv or a.drift_plot):
            raise ValueError(
                f"--plot, --csv and --drift-plot take one provenance; these results hold "
                f"{len(groups)}: summarize them apart"
            )
    else:
        groups = {"": results.load(a.results)}
    selected = {label: _selected_lines(group, a) for label, group in groups.items()}
    for lines in selected.values():  # every named setting checked before anything is printed
        _check_named_settings(lines, a)
    for label, lines in selected.items():
        if label:
            print(f"\nprovenance: {label}")
        _summarize(lines, a)
    return 0


def _summarize(lines, a) -> None:
    from attndrift.experiments import summary

    print(
        _glance_text(lines, a.markdown) if a.glance else _table_text(lines, a.interval, a.markdown)
    )
    if a.choose:
        _print_choice(lines, a.choose, a.markdown)
    for pair in a.compare:
        _print_paired(lines, pair, a.markdown)
    for i, key in enumerate(a.drift):
        _print_drift(lines, key, a.drift_plot if i == 0 else None)
    if a.drift_table:
        frame = summary.drift_table(lines)
        print("\ndrift factor vs P(o_new) per setting and probe kind (paper Fig. 4):")
        print(summary.markdown(frame) if a.markdown else frame.to_string())
    if a.plot or a.csv:
        frame = summary.tradeoff(lines)
        if a.csv:
            with _writing(a.csv):
                frame.to_csv(a.csv, index=False)
            print(f"trade-off numbers: {a.csv}")
        if a.plot:
            from attndrift import plotting

            figures = [plotting.tradeoff_map(frame)]
            try:  # the γ curves need one setting per (curve, γ); the map takes any settings
                figures.insert(0, plotting.tradeoff(frame))
            except ValueError as e:
                print(f"γ curves not drawn ({e}); the map is")
            with _writing(a.plot):
                plotting.save_html(figures, a.plot)
            print(f"trade-off plot: {a.plot}")


def _check_named_settings(lines, a) -> None:
    """Every setting that --compare and --drift name has lines (a typo is not skipped)."""
    have = {x.setting.key for x in lines}
    named = [("--drift", key.strip()) for key in a.drift]
    for pair in a.compare:
        first, sep, second = pair.partition(";")
        if not sep:
            raise ValueError(f"--compare {pair!r}: expected 'SETTING_A;SETTING_B'")
        named += [("--compare", first.strip()), ("--compare", second.strip())]
    for flag, key in named:
        if key not in have:
            shown = sorted(have)[:8] + (["…"] if len(have) > 8 else [])
            raise ValueError(
                f"{flag}: no lines of setting {key!r} (the results have {'; '.join(shown)})"
            )


def _selected_lines(lines, a):
    from attndrift.experiments import summary

    if a.records:
        ranges = _ranges(a.records)
        lines = [x for x in lines if _in_ranges(x.record, ranges)]
    if a.settings:
        keys = [k.strip() for k in a.settings.split(";") if k.strip()]
        missing = set(keys) - {x.setting.key for x in lines}
        if missing:
            raise ValueError(f"--settings: no lines for {sorted(missing)}")
        lines = sorted((x for x in lines if x.setting.key in keys),
                       key=lambda x: keys.index(x.setting.key))  # fmt: skip
    if a.paired:
        lines = summary.paired(lines)
    if not lines:
        raise ValueError("no result lines left to summarize (check --records/--settings/--paired)")
    return lines


def _print_choice(lines, rule: str, markdown: bool) -> None:
    from attndrift.experiments import summary

    frame = summary.choose(lines, rule)
    cols = ["setting", "ES", "PS", "NS", "RS", "DNS", "Score", "mean_steps", "objective",
            "eligible", "chosen"]  # fmt: skip
    shown = frame[cols].set_index("setting")
    for c in ("ES", "PS", "NS", "RS", "DNS", "Score", "objective"):
        shown[c] = [f"{100 * v:.1f}" for v in shown[c]]
    shown["mean_steps"] = [f"{v:.1f}" for v in shown["mean_steps"]]
    print(f"\nrule {rule!r}: {summary.RULES[rule].text}")
    print(summary.markdown(shown) if markdown else shown.to_string())
    chosen = frame[frame["chosen"]]
    if frame.attrs["fallback"]:
        print(f"chosen (none is eligible; the rule's fallback): {chosen['setting'].iloc[0]}")
    else:
        print("chosen: " + (chosen["setting"].iloc[0] if len(chosen) else "none is eligible"))


def _p_boot(p: float) -> str:
    """A bootstrap p-value; 0 (no resample crossed 0) is only below 1 / the resamples."""
    from attndrift.experiments import summary

    return f"< {1 / summary.N_BOOT:.0e}" if p == 0 else f"{p:.3g}"


def _print_paired(lines, pair: str, markdown: bool) -> None:
    import pandas as pd

    from attndrift.experiments import summary

    a, sep, b = pair.partition(";")
    if not sep:
        raise ValueError(f"--compare {pair!r}: expected 'SETTING_A;SETTING_B'")
    tests = summary.paired_tests(lines, a.strip(), b.strip())
    rows = {
        t.metric: {
            "records": t.n_records,
            "probes": t.n_probes,
            "A": f"{100 * t.mean_a:.1f}",
            "B": f"{100 * t.mean_b:.1f}",
            "B − A [95 % interval, records]": f"{100 * t.diff:+.1f} [{100 * t.diff_low:+.1f}, "
            f"{100 * t.diff_high:+.1f}]",
            "p (records)": _p_boot(t.p_bootstrap),
            "probe-level: only A / only B": f"{t.only_a} / {t.only_b}",
            "p (McNemar, probe-level)": f"{t.p_mcnemar:.3g}",
        }
        for t in tests
    }
    frame = pd.DataFrame(rows).T
    frame.index.name = "metric"
    print(f"\npaired: A = {a.strip()}, B = {b.strip()} (same probes; records resampled)")
    print(summary.markdown(frame) if markdown else frame.to_string())
    try:
        drifts = summary.paired_drift(lines, a.strip(), b.strip())
    except ValueError:  # no drift measured under one of them
        return
    rows = {
        d.kind: {
            "records": d.n_records,
            "probes": d.n_probes,
            "A": f"{d.mean_a:.3f}",
            "B": f"{d.mean_b:.3f}",
            "B − A [95 % interval, records]": f"{d.diff:+.3f} [{d.diff_low:+.3f}, "
            f"{d.diff_high:+.3f}]",
            "p (records)": _p_boot(d.p_bootstrap),
            "p (Wilcoxon, probe-level)": f"{d.p_wilcoxon:.3g}",
        }
        for d in drifts
    }
    frame = pd.DataFrame(rows).T
    frame.index.name = "drift factor"
    print("\npaired drift factor of the same RS/DNS probes (B − A < 0: B drifts less)")
    print(summary.markdown(frame) if markdown else frame.to_string())


def _print_drift(lines, key: str, plot: Path | None) -> None:
    from attndrift.experiments import summary

    for kinds in (None, ["RS"], ["DNS"]):
        try:
            fa = summary.drift_vs_failure(lines, key, kinds)
        except ValueError:
            continue
        c, n_records = fa.overall, fa.probes["record"].nunique()
        label = "RS/DNS" if kinds is None else kinds[0]
        low, high = summary.pearson_interval(
            fa.probes["record"].to_numpy(), fa.probes["factor"], fa.probes["p_new"]
        )
        print(
            f"\ndrift factor vs P(o_new), {key}, {n_records} edits, {c.n} {label} probes: "
            f"Pearson {c.pearson:.3f} [95 % interval over records {low:.2f}, {high:.2f}] "
            f"(probe-level p {c.pearson_p:.1e}), Spearman {c.spearman:.3f} (probe-level p "
            f"{c.spearman_p:.1e})"
        )
        print("by layer range (drift factor = max over the range's layers):")
        print(fa.by_range.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
        if plot and kinds is None:
            from attndrift import plotting

            with _writing(plot):
                plotting.save_html(plotting.drift_scatter(fa), plot)
            print(f"scatter plot: {plot}")


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


def _parse(name: str, kind: type, text: str):
    """One value of option ``--name``; a ValueError that names the option otherwise."""
    try:
        if kind is tuple:
            return tuple(int(x) for x in text.split(",") if x.strip())
        return kind(text)
    except ValueError:
        what = {int: "an integer", float: "a number", tuple: "comma-separated integers"}
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{flag}: expected {what.get(kind, 'a value')}, got {text!r}") from None


def _setting_fields():
    import dataclasses
    import typing

    from attndrift.editing.setting import Setting

    for f in dataclasses.fields(Setting):
        kinds = [t for t in typing.get_args(f.type) if t is not type(None)] or [f.type]
        kind = typing.get_origin(kinds[0]) or kinds[0]
        yield f, kind


def _setting_args(p: argparse.ArgumentParser, grid: bool = False) -> None:
    """Editor flags, one per :class:`attndrift.setting.Setting` field (default: the preset)."""
    g = p.add_argument_group("editor (every option left out keeps the model's preset)")
    for f, kind in _setting_fields():
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            g.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        sep = ";" if kind is tuple else ","
        more = f" ({sep}-separated values: one setting each)" if grid else ""
        g.add_argument(flag, default=None, metavar=f.name.upper(), help=f.metadata["help"] + more)


def settings_from_args(a, grid: bool = False) -> list:
    """The :class:`attndrift.setting.Setting` (or, with ``grid``, every combination) of the
    parsed editor flags."""
    from attndrift.editing import setting

    options: dict[str, list] = {}
    for f, kind in _setting_fields():
        value = getattr(a, f.name)
        if kind is bool:
            if value:
                options[f.name] = [True]
            continue
        if value is None:
            continue
        sep = ";" if kind is tuple else ","
        texts = value.split(sep) if grid else [value]
        options[f.name] = [_parse(f.name, kind, t.strip()) for t in texts if t.strip()]
        if not options[f.name]:
            raise ValueError(f"--{f.name.replace('_', '-')}: no value given")
    _note_huge(options)
    if not grid:  # one setting: every option given applies (or the setting refuses it)
        return [setting.Setting(**{k: v[0] for k, v in options.items()})]
    settings = setting.grid(**options)
    if not settings:
        raise ValueError("no setting to run: --all-heads needs --sadr-gamma > 0")
    for name in options:  # an option that no setting of the grid takes would be lost silently
        if all(getattr(s, name) is None or getattr(s, name) is False for s in settings):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} applies to no setting of this sweep (another editor's?)")
    return settings


#: values above these are legal but take long: a log line says what will happen
HUGE = {"steps": 1_000, "cov_tokens": 10_000_000}


def _note_huge(options: dict[str, list]) -> None:
    log = logging.getLogger("attndrift.cli")
    steps = max((v for v in options.get("steps", []) if isinstance(v, int)), default=0)
    if steps > HUGE["steps"]:
        log.warning(
            "--steps %d: every edit runs up to %d optimisation steps, each a forward and a "
            "backward pass (the presets run 20 to 30; early stopping may end sooner)",
            steps,
            steps,
        )
    tokens = max((v for v in options.get("cov_tokens", []) if isinstance(v, int)), default=0)
    if tokens > HUGE["cov_tokens"]:
        log.warning(
            "--cov-tokens %d: the covariance of each edited layer averages %d token keys "
            "(the presets: 2,000 to 100,000); the sampled corpus generates about %d texts "
            "first; computed once per layer, then cached",
            tokens,
            tokens,
            -(-tokens // 128),
        )


def make_edit(model, requests, s):
    from attndrift.editing.setting import Editor

    return Editor(model, progress=True)(s, requests)


@command("edit", "edit one fact (ROME / MEMIT, optional SADR); show before/after probes")
def edit_command(args) -> int:
    """Edit a fact given on the command line or as a record of a data file, print probe
    probabilities before and after, and optionally save the edit."""
    from attndrift import data, scoring
    from attndrift.editing.edits import applied

    p = argparse.ArgumentParser(prog="attndrift edit", description=edit_command.__doc__)
    _model_args(p)
    p.add_argument("--data", default=None, help="data file (default: the embedded dataset)")
    p.add_argument("--record", type=int, default=None, help="record id to edit")
    p.add_argument("--subject", help="subject, e.g. 'Eiffel Tower'")
    p.add_argument("--prompt", help="prompt containing the subject")
    p.add_argument("--new", help="new object")
    p.add_argument("--true", help="true object")
    p.add_argument("--neighbor", action="append", default=[], help="neighbour prompt (true obj)")
    _setting_args(p)
    p.add_argument("--out", type=Path, default=None, help="save the edit (.safetensors)")
    a = p.parse_args(args)
    if a.out is not None:
        _check_output(a.out, "--out")
    if a.record is not None:
        ds = data.load_dataset(a.data) if a.data else data.load_embedded()
        record = ds.by_id(a.record)
    elif a.subject and a.prompt and a.new and a.true:
        request = data.EditRequest(
            subject=a.subject, prompt=a.prompt, target_true=a.true, target_new=a.new
        )
        record = data.Record(0, request, neighborhood=tuple((n, a.true) for n in a.neighbor))
    else:
        p.error("give --record ID, or all of --subject --prompt --new --true")
    (setting,) = settings_from_args(a)
    model = _load_model(a)
    probes = []
    for k in ("ES", "NS", "RS", "DNS", "RS_D"):
        probes += record.probes([k])[:1]
    before = scoring.score_probes(model, probes)
    e = make_edit(model, [record.request], setting)
    with applied(model, e):
        after = scoring.score_probes(model, probes)
    r = record.request
    print(
        f"\nedit: {r.subject!r}: {r.target_true!r} -> {r.target_new!r} with {e.editor} "
        f"(layers {list(e.layers)}, {e.run.seconds:.1f} s)"
    )
    print(f"{'probe':<5} {'P(right) before -> after':>26} {'P(wrong) before -> after':>26}  prompt")
    for i, probe in enumerate(probes):
        b, c = before.iloc[i], after.iloc[i]
        text = probe.prompt if len(probe.prompt) < 70 else "…" + probe.prompt[-69:]
        print(
            f"{probe.kind:<5} {b.p_right:>12.4f} -> {c.p_right:<10.4f} "
            f"{b.p_wrong:>12.4f} -> {c.p_wrong:<10.4f}  {text}  [{probe.right} / {probe.wrong}]"
        )
    if a.out:
        with _writing(a.out):
            e.save(a.out)
        print(f"edit saved to {a.out}")
    return 0


def _analysis_edit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("edit (made on the fly, or a saved one)")
    g.add_argument("--record", type=int, default=None, help="record id (default: the first)")
    g.add_argument("--edit", type=Path, default=None, help="a saved edit (.safetensors)")
    _setting_args(p)
    p.add_argument("--out", type=Path, required=True, help="directory for the HTML and CSV files")


def _analysis_setup(a):
    """(record, model, edit, edited variant) for the drift and patch commands."""
    from attndrift import data, models
    from attndrift.analysis import patching
    from attndrift.editing.edits import Edit

    # every option and output checked before any work (loading, editing, writing)
    _check_output(a.out, "--out", directory=True)
    if a.edit is None:
        settings_from_args(a)
        saved = a.out / "edit.safetensors"
        if saved.exists():
            raise ValueError(
                f"--out {a.out} already holds an edit: pass --edit {saved} to analyse it "
                "again, or another --out"
            )
    for flag in ("kinds", "kind"):  # drift's --kinds, patch's --kind
        kinds = [k.strip() for k in str(getattr(a, flag, "")).split(",") if k.strip()]
        unknown = [k for k in kinds if k not in data.PROBE_KINDS]
        if unknown:
            raise ValueError(
                f"--{flag}: unknown probe kind {unknown[0]!r}: expected one of {data.PROBE_KINDS}"
            )
    if hasattr(a, "directions"):  # patch
        components = [c.strip() for c in a.components.split(",")]
        for d in a.directions.split(","):
            patching.check_options(components, d.strip(), a.window)
        for x in (a.positions or "").split(","):
            if x.strip() and not x.strip().lstrip("-").isdigit():
                raise ValueError(f"--positions: expected integers, got {x.strip()!r}")
    if a.edit is not None:
        changed = [f.name for f, _ in _setting_fields() if getattr(a, f.name) not in (None, False)]
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise ValueError(f"{flags}: editor options apply to on-the-fly edits, not --edit")
        if not a.edit.exists():
            raise FileNotFoundError(f"edit file not found: {a.edit}")
    ds = _load_data(a)
    if not len(ds):
        raise ValueError("no records selected")
    record = ds.by_id(a.record) if a.record is not None else ds[0]
    model = _load_model(a)
    if a.edit is not None:
        e = Edit.load(a.edit, device=models.model_device(model))
        e.check(model)  # another model's edit: refused before any warning or work
        if record.request not in e.requests:
            print(f"warning: {a.edit} was not made for record {record.id}", file=sys.stderr)
    else:
        e = make_edit(model, [record.request], settings_from_args(a)[0])
        with _writing(a.out):
            a.out.mkdir(parents=True, exist_ok=True)
            e.save(a.out / "edit.safetensors")
        cov = e.run.config.covariance
        cov_text = "identity covariance" if cov is None else f"C from {cov.n_tokens} tokens"
        print(
            f"{e.editor} edit at layers {list(e.layers)} ({cov_text}) in "
            f"{e.run.seconds:.1f} s; saved to {a.out / 'edit.safetensors'}"
        )
    r = record.request
    print(f"record {record.id}: {r.subject!r}: {r.target_true!r} -> {r.target_new!r}")
    return record, model, e, models.Variant(model, e.hooks(model), name=e.editor)


@command("drift", "attention drift of an edit on a record's probes (figures + CSV)")
def drift_command(args) -> int:
    """Measure the attention drift (METHOD §1) of one edit on its record's probes: per-head drift
    of the last token's attention, the drift factor of each probe against P(o_new), and the
    attention rows of the most drifting heads. Writes drift.html, drift.csv and probes.csv."""
    from attndrift import capture, encoding, plotting
    from attndrift.analysis import drift

    p = argparse.ArgumentParser(prog="attndrift drift", description=drift_command.__doc__)
    _model_args(p)
    _data_args(p)
    _analysis_edit_args(p)
    p.add_argument("--kinds", default="RS,DNS", help="probe kinds (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="attention rows of the top N heads")
    a = p.parse_args(args)
    record, model, _, edited = _analysis_setup(a)
    probes = record.probes([k.strip() for k in a.kinds.split(",")])
    if not probes:
        raise ValueError(f"record {record.id} has no probes of kinds {a.kinds}")
    t0 = time.perf_counter()
    analysis = drift.versus_failure(model, [(edited, probes)])
    kept = [pr for pr in probes if pr.prompt in set(analysis.probes["prompt"])]
    d = drift.measure(model, edited, [pr.prompt for pr in kept], [pr.subject for pr in kept])
    worst = int(d.factor().argmax())
    heads = drift.top_heads(d, worst, a.heads)
    batch = encoding.encode_batch(model, [d.prompts[worst]], [d.subjects[worst]])
    pair = capture.pair(model, edited, batch, layers=sorted({layer for layer, _ in heads}))
    tokens = encoding.token_strings(model, batch.tokens[0].tolist())
    print(f"{len(kept)} probes analysed in {time.perf_counter() - t0:.1f} s")

    with _writing(a.out):
        a.out.mkdir(parents=True, exist_ok=True)
        d.frame().to_csv(a.out / "drift.csv", index=False)
        analysis.probes.to_csv(a.out / "probes.csv", index=False)
    figures = [
        plotting.drift_heatmap(d, "delta"),
        plotting.drift_heatmap(d, "kl"),
        plotting.drift_heatmap(d, "delta", prompt=worst),
        plotting.attention_rows(pair, tokens, heads),
        plotting.drift_scatter(analysis),
    ]
    with _writing(a.out):
        plotting.save_html(figures, a.out / "drift.html")
    c = analysis.overall
    print(
        f"drift factor: max {float(d.factor().max()):.3f}, mean {float(d.factor().mean()):.3f}; "
        f"vs P(o_new): Pearson {c.pearson:.2f} (p {c.pearson_p:.1e}), "
        f"Spearman {c.spearman:.2f} (p {c.spearman_p:.1e}), n {c.n}"
    )
    print(f"most drifting prompt: {d.prompts[worst]!r}")
    for layer, head in heads:
        li = d.layers.index(layer)
        print(
            f"  layer {layer:>2} head {head:>2}: attention to s_last "
            f"{float(d.a_vanilla[worst, li, head]):.3f} -> {float(d.a_edited[worst, li, head]):.3f}"
        )
    print(f"wrote {a.out / 'drift.html'}, {a.out / 'drift.csv'}, {a.out / 'probes.csv'}")
    return 0


@command("patch", "restore / contaminate patching sweep of an edit on one prompt (figures + CSV)")
def patch_command(args) -> int:
    """Patch attention pattern rows and MLP outputs between the vanilla and the edited model
    (METHOD §2) at every layer window and prompt position of one probe: restore (edited run,
    vanilla values) and contaminate (vanilla run, edited values). Writes patching.html and
    patching.csv."""
    from attndrift import plotting
    from attndrift.analysis import drift, patching

    p = argparse.ArgumentParser(prog="attndrift patch", description=patch_command.__doc__)
    _model_args(p)
    _data_args(p)
    _analysis_edit_args(p)
    p.add_argument("--kind", default="DNS", help="probe kind (default: %(default)s)")
    p.add_argument("--probe", type=int, default=0, help="which probe of that kind (default: 0)")
    p.add_argument("--window", type=int, default=1, help="layers per cell (default: 1)")
    p.add_argument(
        "--components", default="attn,mlp", help="attn, mlp, attn_out, resid (default: attn,mlp)"
    )
    p.add_argument("--directions", default="restore,contaminate", help="restore and/or contaminate")
    p.add_argument(
        "--positions", default=None, help="comma-separated prompt positions (default: all)"
    )
    p.add_argument("--full-answer", action="store_true", help="also score the full answers")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward")
    a = p.parse_args(args)
    record, model, _, edited = _analysis_setup(a)
    probe = _probe(record, a.kind, a.probe)
    true, new = drift.answers(probe)
    t0 = time.perf_counter()
    results = [
        patching.patch(
            model,
            edited,
            probe.prompt,
            true,
            new,
            direction=d.strip(),
            components=[c.strip() for c in a.components.split(",")],
            window=a.window,
            positions=[int(x) for x in a.positions.split(",")] if a.positions else None,
            full_answer=a.full_answer,
            max_batch_tokens=a.batch_tokens,
            progress=True,
        )
        for d in a.directions.split(",")
    ]
    n_cells = sum(r.p_true.numel() for r in results)
    print(f"{n_cells} cells patched in {time.perf_counter() - t0:.1f} s")
    metrics = ["p_true", "p_new", "recovery"] + (["p_true_full"] if a.full_answer else [])
    with _writing(a.out):
        a.out.mkdir(parents=True, exist_ok=True)
        patching.frame(results).to_csv(a.out / "patching.csv", index=False)
        plotting.save_html(
            [plotting.patching_heatmap(results, m) for m in metrics], a.out / "patching.html"
        )
    print(f"{probe.kind} prompt: {probe.prompt!r}  (o_true {true!r}, o_new {new!r})")
    for r in results:
        t, s = r.target, r.source
        print(
            f"{r.direction}: unpatched P(o_true) {t.p_true:.4f} P(o_new) {t.p_new:.4f}; "
            f"other model P(o_true) {s.p_true:.4f} P(o_new) {s.p_new:.4f}"
        )
        for component in r.components:
            layer, pos, value = r.best(component)
            what, base = (
                ("P(o_true)", t.p_true) if r.direction == "restore" else ("P(o_new)", t.p_new)
            )
            print(
                f"  {component:<8} largest {what} {value:.4f} (unpatched {base:.4f}) at layers "
                f"{layer}-{min(layer + r.window, model.cfg.n_layers) - 1}, "
                f"token {r.tokens[pos]!r} (position {pos})"
            )
    print(f"wrote {a.out / 'patching.html'}, {a.out / 'patching.csv'}")
    return 0


def _error_text(e: BaseException) -> str:
    """One line that says what is wrong (and, for file errors, which path)."""
    if isinstance(e, KeyError) and e.args:  # an unknown record id: its message is args[0]
        text = str(e.args[0])
    elif isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename:
        text = f"{e.filename}: {e.strerror or e}"
        if e.filename2:
            text += f" (-> {e.filename2})"
    else:
        text = str(e) or type(e).__name__
    if isinstance(e, FloatingPointError | RuntimeError) and type(e).__name__ not in text:
        text = f"{type(e).__name__}: {text}"
    return " ".join(text.split())  # one line


@command("trace", "causal tracing (ROME Fig. 1): where the unedited model recalls a fact")
def trace_command(args) -> int:
    """Causal tracing (ROME, Meng et al. 2022) of one probe of a record on the unedited model:
    add Gaussian noise (NOISE x σ, σ = the token-embedding std over the data's subjects) to the
    subject's token embeddings, restore one cell of the clean run at a time (hidden state, MLP
    output or attention output at a layer window and position) and measure P(o_true); the
    indirect effect of a cell is P(restored) - P(corrupted). Writes tracing.html and
    tracing.csv."""
    from attndrift import data, plotting
    from attndrift.analysis import drift, tracing

    p = argparse.ArgumentParser(prog="attndrift trace", description=trace_command.__doc__)
    _trace_args(p)
    a = p.parse_args(args)
    windows = _windows(a.window)
    ds = _load_data(a)
    if not len(ds):
        raise ValueError("no records selected")
    record = ds.by_id(a.record) if a.record is not None else ds[0]
    probe = _probe(record, a.kind, a.probe)
    true, _ = drift.answers(probe)
    model = _load_model(a)
    everything = data.load_dataset(a.data, lenient=True) if a.data else data.load_embedded()
    subjects = sorted({r.request.subject for r in everything.records})
    sigma = tracing.embedding_scale(model, subjects)
    t0 = time.perf_counter()
    t = tracing.trace(model, probe.prompt, probe.subject, true, sigma=sigma, noise=a.noise,
                      samples=a.samples, seed=a.seed, windows=windows,
                      components=[c.strip() for c in a.components.split(",")],
                      max_batch_tokens=a.batch_tokens, progress=True)  # fmt: skip
    print(f"{t.indirect.numel()} cells traced in {time.perf_counter() - t0:.1f} s")
    with _writing(a.out):
        a.out.mkdir(parents=True, exist_ok=True)
        tracing.frame(t).to_csv(a.out / "tracing.csv", index=False)
        plotting.save_html(plotting.tracing_heatmap(t), a.out / "tracing.html")
    print(f"{probe.kind} prompt: {probe.prompt!r} -> {true!r}; subject tokens "
          f"{[t.tokens[i] for i in t.subject_positions]}")  # fmt: skip
    print(f"σ = {sigma:.4g} (token-embedding std over {len(subjects)} subjects); noise "
          f"{a.noise:g}σ, {a.samples} samples; P(o_true) clean {t.p_clean:.4f}, corrupted "
          f"{t.p_corrupted:.4f}")  # fmt: skip
    _print_best_cells(t, model.cfg.n_layers)
    print(f"wrote {a.out / 'tracing.html'}, {a.out / 'tracing.csv'}")
    return 0


def _trace_args(p: argparse.ArgumentParser) -> None:
    from attndrift.analysis import tracing

    _model_args(p)
    _data_args(p)
    p.add_argument("--record", type=int, default=None, help="record id (default: the first)")
    p.add_argument("--kind", default="ES", help="probe kind (default: %(default)s: the fact)")
    p.add_argument("--probe", type=int, default=0, help="which probe of that kind (default: 0)")
    p.add_argument(
        "--window",
        default=None,
        help="layers per cell, centred on the layer: N for every component, or e.g. "
        "hidden=1,mlp=10,attn_out=10 (default: ROME's, that example)",
    )
    p.add_argument("--samples", type=int, default=tracing.ROME_SAMPLES, help="noise draws")
    p.add_argument(
        "--noise", type=float, default=tracing.ROME_NOISE, help="noise std in units of σ"
    )
    p.add_argument(
        "--components", default="hidden,mlp,attn_out", help="hidden, mlp, attn_out (default: all)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward pass")
    p.add_argument("--out", type=Path, required=True, help="directory for the HTML and CSV files")


def _windows(text: str | None) -> int | dict[str, int] | None:
    """``--window``: ``N`` for every component, or ``hidden=1,mlp=10``."""
    if not text:
        return None
    if "=" not in text:
        return int(text)
    pairs = [part.split("=") for part in text.split(",") if part.strip()]
    return {name.strip(): int(value) for name, value in pairs}


def _probe(record, kind: str, index: int):
    """The ``index``-th probe of ``kind`` of the record; a ValueError if there is none."""
    probes = record.probes([kind])
    if not 0 <= index < len(probes):
        raise ValueError(f"record {record.id} has {len(probes)} {kind} probes, not {index + 1}")
    return probes[index]


def _print_best_cells(t, n_layers: int) -> None:
    from attndrift.analysis import tracing

    last_subject = t.subject_positions[-1]
    print("largest indirect effect per component (layer = window centre):")
    for c, w in zip(t.components, t.windows, strict=True):
        layer, pos, value = t.best(c)
        s = tracing.span(layer, w, n_layers)
        text = (
            f"  {c:<8} {value:+.4f} at layer {layer} (layers {s.start}-{s.stop - 1}), "
            f"token {t.tokens[pos]!r} (position {pos})"
        )
        layer, _, value = t.best(c, last_subject)
        print(text + f"; at the subject's last token: {value:+.4f} at layer {layer}")


@command("knockout", "attention knockout: block last token -> subject per layer window")
def knockout_command(args) -> int:
    """Attention knockout (Geva et al. 2023) of an edit on one probe of a record: set the
    attention scores from the last token to every subject token to -inf in a window of layers
    (every head), for every window start, in the vanilla and the edited model, and measure the
    change of P(o_true) and P(o_new). If the edited model's P(o_new) on a distracting-neighbour
    prompt vanishes when the last token cannot see the subject in the drifting layers,
    attention drift carries the failure. Writes knockout.html and knockout.csv."""
    from attndrift import plotting
    from attndrift.analysis import drift, knockout

    p = argparse.ArgumentParser(prog="attndrift knockout", description=knockout_command.__doc__)
    _model_args(p)
    _data_args(p)
    _analysis_edit_args(p)
    p.add_argument("--kind", default="DNS", help="probe kind (default: %(default)s)")
    p.add_argument("--probe", type=int, default=0, help="which probe of that kind (default: 0)")
    p.add_argument(
        "--window",
        type=int,
        default=knockout.DEFAULT_WINDOW,
        help="layers per blocked window (default: %(default)s)",
    )
    p.add_argument("--top", type=int, default=3, help="windows to print (default: 3)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward pass")
    a = p.parse_args(args)
    record, model, _, edited = _analysis_setup(a)
    probe = _probe(record, a.kind, a.probe)
    true, new = drift.answers(probe)
    t0 = time.perf_counter()
    k = knockout.run(model, edited, probe.prompt, probe.subject, true, new, window=a.window,
                     max_batch_tokens=a.batch_tokens)  # fmt: skip
    print(f"{2 * k.p_true.shape[1]} windows blocked in {time.perf_counter() - t0:.1f} s")
    with _writing(a.out):
        a.out.mkdir(parents=True, exist_ok=True)
        k.frame().to_csv(a.out / "knockout.csv", index=False)
        plotting.save_html(plotting.knockout_figure(k), a.out / "knockout.html")
    print(f"{probe.kind} prompt: {probe.prompt!r}  (o_true {true!r}, o_new {new!r})")
    print(f"blocked: last token -> subject tokens {[k.tokens[i] for i in k.keys]}")
    for i, name in enumerate(k.models):
        print(
            f"{name}: unblocked P(o_true) {float(k.base_true[i]):.4f} "
            f"P(o_new) {float(k.base_new[i]):.4f}"
        )
    _print_top_windows(k, a.top)
    print(f"wrote {a.out / 'knockout.html'}, {a.out / 'knockout.csv'}")
    return 0


def _print_top_windows(k, top: int) -> None:
    removed = k.removed("edited")
    n_layers = k.p_true.shape[1]
    layers = f"{k.window} layers" if k.window > 1 else "1 layer"
    print(f"windows of {layers} where blocking removes most of the edited P(o_new):")
    for layer in removed.argsort(descending=True)[:top].tolist():
        last = min(layer + k.window, n_layers) - 1
        print(
            f"  layers {layer}-{last}: edited P(o_new) {float(k.base_new[1]):.4f} -> "
            f"{float(k.p_new[1, layer]):.4f} ({-100 * float(removed[layer]):+.0f} %), "
            f"P(o_true) {float(k.base_true[1]):.4f} -> {float(k.p_true[1, layer]):.4f}; "
            f"vanilla P(o_new) -> {float(k.p_new[0, layer]):.4f}, "
            f"P(o_true) -> {float(k.p_true[0, layer]):.4f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``attndrift <command> [options]``; expected failures print one line
    ``attndrift <command>: error: <message>`` to stderr and return 2 (``--debug``, anywhere on
    the line: re-raise them, with the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: attndrift <command> [options]   (attndrift <command> --help)\n")
        print("attndrift: attention drift in edited language models, and SADR editing\n")
        for name, (help_, _) in COMMANDS.items():
            print(f"  {name:<10} {help_}")
        print("\n  --debug    (any command) show the traceback of an error")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"attndrift: error: unknown command {name!r}; try attndrift --help", file=sys.stderr)
        return 2
    from safetensors import SafetensorError

    expected = (
        ValueError,  # bad values, malformed data (JSONDecodeError, UnicodeDecodeError)
        OSError,  # missing, unreadable or unwritable files (FileNotFoundError, PermissionError)
        SafetensorError,  # a damaged .safetensors file
        RuntimeError,  # device selection, a damaged cache, torch refusing a shape
        FloatingPointError,  # a non-finite loss while editing
        KeyError,  # an unknown record id
    )
    try:
        return COMMANDS[name][1](rest)
    except expected as e:
        if debug:
            raise
        print(f"attndrift {name}: error: {_error_text(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the model and the files are intact (the guarantees)
        if debug:
            raise
        hint = "; rerun the same command to resume" if name in RESUMABLE else ""
        print(f"\nattndrift {name}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
