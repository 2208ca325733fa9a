"""What the commands share: the command table (:func:`command`), the model, data and editor
arguments, the checks that refuse an output before any work, and loading data and the model."""

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
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
    """Editor flags, one per :class:`attndrift.editing.setting.Setting` field (default: the
    preset)."""
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
    """The :class:`attndrift.editing.setting.Setting` (or, with ``grid``, every combination) of
    the parsed editor flags."""
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
