"""``attndrift sweep`` (edit every record under each setting; resumable JSON-lines results)
and ``attndrift summarize`` (tables, paired tests, selection rules and drift of sweep results)."""

import argparse
from pathlib import Path

from attndrift.cli.common import (
    _check_output,
    _data_args,
    _in_ranges,
    _load_data,
    _load_model,
    _model_args,
    _ranges,
    _setting_args,
    _writing,
    command,
    settings_from_args,
)


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
