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
