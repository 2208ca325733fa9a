"""Command line: ``attndrift <command> --help``.

The CLI presents and saves; the computation lives in the library modules.
"""

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

COMMANDS: dict[str, tuple[str, Callable]] = {}


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


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default=None,
        help="records in the merged or ROME counterfact format (default: the embedded dataset)",
    )
    p.add_argument("--limit", type=int, default=None, help="use at most this many records")
    p.add_argument(
        "--records", default=None, help="comma-separated record ids (default: all, in file order)"
    )
    p.add_argument("--lenient", action="store_true", help="skip (and report) malformed records")


def _load_data(args):
    from attndrift import data

    ds = data.load_dataset(args.data, lenient=args.lenient) if args.data else data.load_embedded()
    for s in ds.skipped:
        print(f"skipped record {s.record}: {s.field}: {s.problem}", file=sys.stderr)
    ids = [int(x) for x in args.records.split(",")] if args.records else None
    return ds.select(ids=ids, limit=args.limit)


def _load_model(args):
    from attndrift import models

    t0 = time.perf_counter()
    model = models.load_model(args.model, device=args.device)
    print(f"model {args.model} on {models.model_device(model)} ({time.perf_counter() - t0:.1f} s)")
    return model


@command("prepare", "install-time step: convert and cache the embedded model")
def prepare(args) -> int:
    from attndrift import models

    p = argparse.ArgumentParser(prog="attndrift prepare", description=prepare.__doc__)
    p.parse_args(args)
    t0 = time.perf_counter()
    models.load_model(models.EMBEDDED_MODEL, device="cpu")
    print(f"embedded model ready in {models.cache_dir()} ({time.perf_counter() - t0:.1f} s)")
    return 0


@command("eval", "evaluate an (unedited) model: the SPEC §5 table")
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
        ev.probes.to_csv(a.csv, index=False)
        print(f"per-probe table: {a.csv}")
    return 0


def _edit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("editor")
    g.add_argument("--editor", choices=("rome", "memit"), default="rome")
    g.add_argument("--sadr-gamma", type=float, default=0.0, help="SADR weight γ (0 = off)")
    g.add_argument("--all-heads", action="store_true", help="SADR ablation: restrain every head")
    g.add_argument("--layer", type=int, default=None, help="ROME layer (default: preset)")
    g.add_argument("--layers", default=None, help="MEMIT layers, e.g. 2,3,4,5,6")
    g.add_argument("--steps", type=int, default=None, help="optimisation steps (default: preset)")
    g.add_argument("--r-rome", action="store_true", help="r-ROME denominator (mean key)")
    g.add_argument(
        "--identity-cov", action="store_true", help="no covariance adjustment (quick, crude)"
    )
    g.add_argument(
        "--cov-tokens", type=int, default=None, help="tokens for C (default: preset config)"
    )


def editor_from_args(model, a):
    """(kind, config, SadrConfig | None) from parsed editor arguments."""
    import dataclasses

    from attndrift import memit, rome
    from attndrift.sadr import SadrConfig

    sadr = SadrConfig(gamma=a.sadr_gamma, all_heads=a.all_heads) if a.sadr_gamma > 0 else None
    if a.all_heads and sadr is None:
        raise ValueError("--all-heads needs --sadr-gamma > 0")
    cfg = rome.preset(model) if a.editor == "rome" else memit.preset(model)
    changes: dict = {}
    if a.editor == "rome":
        if a.layer is not None:
            changes["layer"] = a.layer
        if a.r_rome:
            changes["denominator"] = "mean_key"
    else:
        if a.layers:
            changes["layers"] = tuple(int(x) for x in a.layers.split(","))
        if a.r_rome:
            raise ValueError("--r-rome applies to --editor rome only")
    if a.steps is not None:
        changes["value"] = dataclasses.replace(cfg.value, steps=a.steps)
    if a.identity_cov:
        changes["covariance"] = None
    elif a.cov_tokens is not None:
        changes["covariance"] = dataclasses.replace(cfg.covariance, n_tokens=a.cov_tokens)
    return a.editor, dataclasses.replace(cfg, **changes), sadr


def make_edit(model, requests, kind, cfg, sadr, progress=True):
    from attndrift import memit, rome

    if kind == "rome":
        if len(requests) != 1:
            raise ValueError("ROME edits one request at a time; use --editor memit for several")
        return rome.edit(model, requests[0], cfg, sadr=sadr, progress=progress)
    return memit.edit(model, requests, cfg, sadr=sadr, progress=progress)


@command("edit", "edit one fact (ROME / MEMIT, optional SADR); show before/after probes")
def edit_command(args) -> int:
    """Edit a fact given on the command line or as a record of a data file, print probe
    probabilities before and after, and optionally save the edit."""
    from attndrift import data, scoring
    from attndrift.edit import applied

    p = argparse.ArgumentParser(prog="attndrift edit", description=edit_command.__doc__)
    _model_args(p)
    p.add_argument("--data", default=None, help="data file (default: the embedded dataset)")
    p.add_argument("--record", type=int, default=None, help="record id to edit")
    p.add_argument("--subject", help="subject, e.g. 'Eiffel Tower'")
    p.add_argument("--prompt", help="prompt containing the subject")
    p.add_argument("--new", help="new object")
    p.add_argument("--true", help="true object")
    p.add_argument("--neighbor", action="append", default=[], help="neighbour prompt (true obj)")
    _edit_args(p)
    p.add_argument("--out", type=Path, default=None, help="save the edit (.safetensors)")
    a = p.parse_args(args)
    if a.record is not None:
        ds = data.load_dataset(a.data) if a.data else data.load_embedded()
        record = ds.by_id(a.record)
    elif a.subject and a.prompt and a.new and a.true:
        request = data.EditRequest(a.subject, a.prompt, a.new, a.true)
        record = data.Record(0, request, neighborhood=tuple((n, a.true) for n in a.neighbor))
    else:
        p.error("give --record ID, or all of --subject --prompt --new --true")
    model = _load_model(a)
    kind, cfg, sadr = editor_from_args(model, a)
    probes = []
    for k in ("ES", "NS", "RS", "DNS", "RS_D"):
        probes += record.probes([k])[:1]
    before = scoring.score_probes(model, probes)
    e = make_edit(model, [record.request], kind, cfg, sadr)
    with applied(model, e):
        after = scoring.score_probes(model, probes)
    r = record.request
    print(
        f"\nedit: {r.subject!r}: {r.target_true!r} -> {r.target_new!r} with {e.editor} "
        f"(layers {list(e.layers)}, {e.info['seconds']:.1f} s)"
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
        e.save(a.out)
        print(f"edit saved to {a.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: attndrift <command> [options]   (attndrift <command> --help)\n")
        print("attndrift: attention drift in edited language models, and SADR editing\n")
        for name, (help_, _) in COMMANDS.items():
            print(f"  {name:<10} {help_}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"attndrift: unknown command {name!r}; try attndrift --help", file=sys.stderr)
        return 2
    try:
        return COMMANDS[name][1](rest)
    except (ValueError, FileNotFoundError) as e:
        print(f"attndrift {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
