"""Results: the JSON-lines files a sweep writes, and their lines read back as typed records.

A results file holds one JSON object per line, one :class:`Line` per finished (record,
setting): the request, the setting (and the editor config it resolved to), every probe's
P(right) / P(wrong) before and after the edit, fluency, the drift factor of the record's
RS/DNS probes, timings, and the :class:`Provenance` of the numbers (model name and weight
fingerprint, data file sha256, library version, git revision).

* **Atomic appends.** A line is written with one ``write`` of the whole line, then
  ``fsync``; a run killed at any moment (``kill -9`` included) leaves complete lines and at
  most one torn last line, which :func:`prepare_append` cuts before the next append. A last
  line that is complete but lacks its newline (a file edited by hand) is kept, and its newline
  completed.
* **One writer.** :func:`locked` holds an advisory lock (``fcntl.flock``) on the file for the
  length of a sweep; a second sweep onto the same file is refused, naming the holder.
* **Only results files are touched.** :func:`prepare_append` refuses a file whose lines are not
  results lines (e.g. ``--out notes.txt``) before changing a byte of it.
* **Compressed copies.** ``X.jsonl.gz`` beside ``X.jsonl`` is read as part of it, so committed
  gzipped results resume and summarize like the plain file. Sweeps append plain lines only:
  ``--out X.jsonl.gz`` is refused (pass ``--out X.jsonl``; its ``.gz`` copy counts as done).
* **Shards.** Rank ``r`` of ``N`` writes ``X.rank<r>-of-<N>.jsonl``; :func:`load` reads ``X``,
  its shards and their ``.gz`` copies, de-duplicated by (record, setting).
* **No silent mixing.** :func:`load` refuses lines of different provenance (model weights,
  data file, version) unless asked for them apart (:func:`load_by_provenance`), and refuses
  two lines of the same (record, setting) and provenance whose numbers differ.

:func:`probes_frame` gives the per-probe numbers as a tidy ``pandas.DataFrame``.
"""

import contextlib
import dataclasses
import errno
import fcntl
import gzip
import json
import logging
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from attndrift.data import EditRequest
from attndrift.editing.setting import Setting

log = logging.getLogger(__name__)

#: every line starts with this (how a torn last line is told from foreign text)
LINE_START = b'{"record":'


@dataclass(frozen=True)
class Provenance:
    """What produced a line; a sweep resumes only onto lines of the same provenance."""

    model: str  # model name
    fingerprint: str  # hash of every weight (attndrift.models.fingerprint)
    data: str  # data file the records came from (informational)
    data_sha256: str  # sha256 of that file (or of the in-memory records)
    version: str  # attndrift version
    git: str  # git revision of the attndrift checkout ("-dirty" if modified)


@dataclass(frozen=True)
class ProbeScore:
    """One probe's answer probabilities."""

    kind: str  # ES, PS, NS, RS, DNS, RS_D, AS
    p_right: float
    p_wrong: float

    @property
    def success(self) -> bool:
        return self.p_right > self.p_wrong


@dataclass(frozen=True)
class DriftScores:
    """Drift factor of each RS/DNS probe of the record under the edit (paper Fig. 4)."""

    kinds: tuple[str, ...]  # probe kind of each measured probe
    factor: tuple[float, ...]  # max over layers and heads of Δ attention last → s_last
    factor_layer: tuple[int, ...]  # layer where the factor is reached
    layers: tuple[int, ...]  # the analysed layers (columns of per_layer)
    per_layer: tuple[tuple[float, ...], ...]  # [probe][layer] max over heads
    p_new: tuple[float, ...]  # the edited model's P(o_new) of each probe

    @property
    def mean(self) -> float | None:
        return sum(self.factor) / len(self.factor) if self.factor else None


@dataclass(frozen=True)
class Line:
    """One (record, setting) of a sweep."""

    record: int
    setting: Setting
    editor: str  # the edit's editor name, e.g. "rome+sadr"
    layers: tuple[int, ...]  # edited layers
    request: EditRequest
    pre: tuple[ProbeScore, ...]  # the unedited model
    post: tuple[ProbeScore, ...]  # the edited model
    fluency_pre: float | None
    fluency_post: float | None
    drift: DriftScores
    steps_run: int | None  # optimisation steps run (ROME; the first request's for MEMIT)
    final: dict  # loss terms at the last step
    config: dict  # the editor config the setting resolved to
    seconds: dict[str, float]
    provenance: Provenance | None  # None: written before provenance was recorded
    extra: dict = dataclasses.field(default_factory=dict)  # device, time, rank, world

    @property
    def key(self) -> tuple[int, str]:
        return (self.record, self.setting.key)

    def to_json(self) -> dict:
        return {
            "record": self.record,
            "setting": self.setting.key,
            "settings": dataclasses.asdict(self.setting),
            "editor": self.editor,
            "layers": list(self.layers),
            "request": dataclasses.asdict(self.request),
            "pre": {"probes": [list(dataclasses.astuple(p)) for p in self.pre],
                    "fluency": self.fluency_pre},
            "post": {"probes": [list(dataclasses.astuple(p)) for p in self.post],
                     "fluency": self.fluency_post},
            "drift": dataclasses.asdict(self.drift),
            "edit": {"steps_run": self.steps_run, "final": self.final, "config": self.config},
            "seconds": self.seconds,
            "provenance": None if self.provenance is None else dataclasses.asdict(self.provenance),
            **self.extra,
        }  # fmt: skip

    @classmethod
    def from_json(cls, obj: dict) -> "Line":
        record = obj["record"]
        if isinstance(record, bool) or not isinstance(record, int):
            raise ValueError(f"record id {record!r} is not an integer")

        def probes(part: dict) -> tuple[ProbeScore, ...]:
            return tuple(ProbeScore(k, float(r), float(w)) for k, r, w in part["probes"])

        d = obj["drift"]
        drift = DriftScores(
            kinds=tuple(d["kinds"]),
            factor=tuple(d["factor"]),
            factor_layer=tuple(d["factor_layer"]),
            layers=tuple(d.get("layers", ())),
            per_layer=tuple(tuple(r) for r in d["per_layer"]),
            p_new=tuple(d["p_new"]),
        )
        known = {"record", "setting", "settings", "editor", "layers", "request", "pre", "post",
                 "drift", "edit", "seconds", "provenance"}  # fmt: skip
        setting = Setting.from_dict(obj["settings"])
        if setting.key != obj["setting"]:
            raise ValueError(f"setting {obj['setting']!r} does not match its fields")
        prov = obj.get("provenance")
        return cls(
            record=record,
            setting=setting,
            editor=obj["editor"],
            layers=tuple(obj["layers"]),
            request=EditRequest(**obj["request"]),
            pre=probes(obj["pre"]),
            post=probes(obj["post"]),
            fluency_pre=obj["pre"].get("fluency"),
            fluency_post=obj["post"].get("fluency"),
            drift=drift,
            steps_run=obj["edit"].get("steps_run"),
            final=obj["edit"].get("final") or {},
            config=obj["edit"].get("config") or {},
            seconds=obj.get("seconds", {}),
            provenance=None if prov is None else Provenance(**prov),
            extra={k: v for k, v in obj.items() if k not in known},
        )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def shard_path(out: Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes (``out`` itself when not distributed)."""
    if world == 1:
        return out
    return out.with_name(f"{out.stem}.rank{rank}-of-{world}{out.suffix or '.jsonl'}")


def _gz(path: Path) -> Path:
    return path.with_name(path.name + ".gz")


def _read_bytes(path: Path) -> bytes:
    if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or a device would block or never end
        raise ValueError(f"{path} is not a regular file")
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def _parse(path: Path, data: bytes) -> tuple[list[Line], bool]:
    """The lines of a file's bytes, and whether its last line (without newline) is torn."""
    chunks = data.split(b"\n")
    out, torn = [], False
    for i, chunk in enumerate(chunks):
        if not chunk.strip():
            continue
        torn_tail = i == len(chunks) - 1 and chunk.startswith(LINE_START)
        try:
            out.append(Line.from_json(json.loads(chunk)))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if torn_tail:  # cut by prepare_append before the next write
                torn = True
                continue
            raise ValueError(f"{path}: line {i + 1} is not a results line (invalid JSON)") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: line {i + 1} is not a results line ({e!r})") from None
    return out, torn


def read(path: Path) -> list[Line]:
    """The complete lines of one results file (``.gz`` or plain; a torn last line is ignored,
    a complete last line without its newline is read).

    Raises:
        ValueError: a line that is not a results line (names the file and the line), or a
            path that is not a regular file.
    """
    path = Path(path)
    if not path.exists():
        return []
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a results file")
    try:
        data = _read_bytes(path)
    except (OSError, EOFError) as e:
        if isinstance(e, PermissionError):
            raise
        raise ValueError(f"{path}: cannot be read as a results file ({e})") from None
    return _parse(path, data)[0]


def check_out_name(out: Path) -> None:
    """Refuse a ``.gz`` results name: sweeps append plain JSON lines (a ``.gz`` copy beside
    the plain file is read as part of it, so a committed gzipped file still resumes)."""
    out = Path(out)
    if out.suffix == ".gz":
        raise ValueError(
            f"--out {out}: sweeps append plain JSON lines; pass --out {out.with_suffix('')} "
            f"(a {out.name} beside it is read as part of it: resumed and summarized)"
        )


def check_appendable(path: Path) -> list[Line]:
    """The lines of ``path`` if a sweep may append to it (absent, or a plain results file);
    a ValueError otherwise. Changes nothing."""
    path = Path(path)
    check_out_name(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"--out {path} is not a file")
    return read(path)  # raises, untouched, on foreign content


def prepare_append(path: Path) -> list[Line]:
    """Check that ``path`` is absent or a results file, then make it end with a newline: a
    complete last line without its newline gets one, a torn last line is cut; its lines.

    Nothing is changed unless every complete line is a results line. Call it under
    :func:`locked` (another writer's line is never taken for a torn one).
    """
    path = Path(path)
    lines = check_appendable(path)
    if not path.exists() or path.stat().st_size == 0:
        return lines
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return lines
    keep = data.rfind(b"\n") + 1
    tail = data[keep:]
    if not tail.startswith(LINE_START):
        raise ValueError(f"{path} does not end like a results file: pass a new --out")
    if not _parse(path, tail)[1]:  # a complete line: keep it
        log.info("%s: the last line lacks its newline: completing it", path)
        _write_all(path, b"\n")
        return lines
    log.warning("%s: cutting a torn last line (%d bytes)", path, len(tail))
    with path.open("rb+") as f:
        f.truncate(keep)
    return lines


def _holder(path: Path) -> str:
    """Who holds the lock of ``path``: the process of ``/proc/locks`` (Linux), if found."""
    try:
        st = path.stat()
        inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            pids = [int(x.split()[4]) for x in f if "FLOCK" in x and f" {inode} " in x]
    except (OSError, ValueError, IndexError):
        pids = []
    for pid in pids:
        if pid == os.getpid():
            return f"this process (pid {pid})"
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = ""
        return f"pid {pid}" + (f": {cmd[:160]}" if cmd else "")
    return "another process"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on the results file ``path`` (created
    if absent) for the block; a ValueError naming the holder if another writer has it.

    The lock goes with the process: a killed sweep (``kill -9`` included) releases it.
    """
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"--out {path} is being written by another sweep ({_holder(path)}): wait for it "
                "to finish, or pass another --out"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_all(path: Path, data: bytes) -> None:
    """Append ``data`` with one write, flushed and fsynced; an OSError names ``path``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"short write: {written} of {len(data)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if e.filename:
            raise
        raise type(e)(e.errno, e.strerror or str(e), str(path)) from None


def append(path: Path, line: Line) -> None:
    """Append one line with a single write, flushed and fsynced."""
    text = (json.dumps(line.to_json(), separators=(",", ":"), allow_nan=False) + "\n").encode()
    _write_all(path, text)


def files(out: Path) -> list[Path]:
    """``out``, its rank shards, and the ``.gz`` copies of each, that exist."""
    out = Path(out)
    if out.suffix == ".gz":
        return [out] if out.exists() else []
    suffix = out.suffix or ".jsonl"
    shards = sorted(out.parent.glob(f"{out.stem}.rank*-of-*{suffix}"))
    shards += sorted(out.parent.glob(f"{out.stem}.rank*-of-*{suffix}.gz"))
    plain = sorted({p.with_suffix("") if p.suffix == ".gz" else p for p in shards})
    found = []
    for p in [out, *plain]:
        found += [q for q in (p, _gz(p)) if q.exists()]
    return found


#: what may differ between two lines of the same numbers (timings, where and when they ran)
_INCIDENTAL = ("seconds", "device", "time", "rank", "world")


def origin(prov: Provenance | None) -> tuple:
    """What results must share to be summarized together: model, weights, data, version (the
    git revision may differ: a sweep resumes across revisions only when asked)."""
    if prov is None:
        return ()
    return (prov.model, prov.fingerprint, prov.data_sha256, prov.version)


def origin_label(prov: Provenance | None) -> str:
    """A provenance as a row label, e.g. ``SmolLM2 (f26ec046…), data dev.json (6e284f1f),
    attndrift 0.1.0``."""
    if prov is None:
        return "no provenance recorded"
    data = Path(prov.data).name or "records in memory"
    return (
        f"{prov.model} ({prov.fingerprint[:8]}), data {data} ({prov.data_sha256[:8]}), "
        f"attndrift {prov.version}"
    )


def _numbers(line: Line) -> dict:
    obj = line.to_json()
    for k in _INCIDENTAL:
        obj.pop(k, None)
    if obj["provenance"] is not None:
        obj["provenance"].pop("git", None)
    return obj


def load_by_provenance(paths: Iterable[str | Path]) -> dict[str, list[Line]]:
    """The lines of the given results files (with shards and ``.gz`` copies), grouped by
    provenance (:func:`origin`; keys: :func:`origin_label`), each group de-duplicated by
    (record, setting): the first one read wins.

    Raises:
        FileNotFoundError: a path with no results file.
        ValueError: two lines of the same provenance and (record, setting) with other numbers
            (two runs that disagree: which one to show is not for attndrift to guess).
    """
    groups: dict[tuple, dict[tuple, tuple[Line, Path]]] = {}
    labels: dict[tuple, str] = {}
    for p in paths:
        found = files(Path(p))
        if not found:
            raise FileNotFoundError(f"no results at {p} (nor rank shards or .gz beside it)")
        for f in found:
            for line in read(f):
                key = origin(line.provenance)
                labels.setdefault(key, origin_label(line.provenance))
                group = groups.setdefault(key, {})
                first = group.get(line.key)
                if first is None:
                    group[line.key] = (line, f)
                elif _numbers(first[0]) != _numbers(line):
                    raise ValueError(
                        f"{f}: record {line.record}, setting {line.setting.key!r} has other "
                        f"numbers than its line in {first[1]} (same provenance): keep one of them"
                    )
    out: dict[str, list[Line]] = {}
    for key, group in groups.items():
        label = labels[key]
        if label in out:  # two provenances with the same label (fingerprints alike at 8)
            label = f"{label} [{key[1]}]"
        out[label] = [line for line, _ in group.values()]
    return out


def load(paths: Iterable[str | Path]) -> list[Line]:
    """All lines of the given results files (with shards and ``.gz`` copies), de-duplicated
    by (record, setting): the first one read wins.

    Raises:
        FileNotFoundError: a path with no results file.
        ValueError: lines of different provenance (other model weights, data file or
            version: :func:`load_by_provenance` keeps them apart), or two lines of the same
            (record, setting) whose numbers differ.
    """
    paths = list(paths)
    groups = load_by_provenance(paths)
    if len(groups) > 1:
        raise ValueError(
            f"the results mix {len(groups)} provenances ({'; '.join(groups)}): summarize them "
            "apart, or keep them as separate rows (summarize --by-provenance)"
        )
    return next(iter(groups.values()), [])


def probes_frame(lines: Sequence[Line]) -> pd.DataFrame:
    """Tidy per-probe table of many lines.

    Columns: ``record``, ``setting`` (key), ``phase`` (``"pre"``: unedited, ``"post"``:
    edited), ``index`` (the probe's position in its record), ``kind``, ``p_right``,
    ``p_wrong``, ``success`` (``p_right > p_wrong``).
    """
    rows = []
    for line in lines:
        for phase, probes in (("pre", line.pre), ("post", line.post)):
            for i, p in enumerate(probes):
                rows.append((line.record, line.setting.key, phase, i, p.kind, p.p_right, p.p_wrong))
    frame = pd.DataFrame(
        rows, columns=["record", "setting", "phase", "index", "kind", "p_right", "p_wrong"]
    )
    frame["success"] = frame["p_right"] > frame["p_wrong"]
    return frame
