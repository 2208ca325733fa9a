"""Results: the JSON-lines files a sweep writes, and their lines read back as typed records.

A results file holds one JSON object per line, one :class:`Line` per finished (record,
setting): the request, the setting (and the editor config it resolved to), every probe's
P(right) / P(wrong) before and after the edit, fluency, the drift factor of the record's
RS/DNS probes, timings, and the :class:`Provenance` of the numbers (model name and weight
fingerprint, data file sha256, library version, git revision).

* **Atomic appends.** A line is written with one ``write`` of the whole line, then
  ``fsync``; a run killed at any moment (``kill -9`` included) leaves complete lines and at
  most one torn last line, which :func:`prepare_append` cuts before the next append.
* **Only results files are touched.** :func:`prepare_append` refuses a file whose lines are not
  results lines (e.g. ``--out notes.txt``) before changing a byte of it.
* **Compressed copies.** ``X.jsonl.gz`` beside ``X.jsonl`` is read as part of it, so committed
  gzipped results resume and summarize like the plain file.
* **Shards.** Rank ``r`` of ``N`` writes ``X.rank<r>-of-<N>.jsonl``; :func:`load` reads ``X``,
  its shards and their ``.gz`` copies, de-duplicated by (record, setting).

:func:`probes_frame` gives the per-probe numbers as a tidy ``pandas.DataFrame``.
"""

import dataclasses
import gzip
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from attndrift.data import EditRequest
from attndrift.setting import Setting

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
            record=obj["record"],
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
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def read(path: Path) -> list[Line]:
    """The complete lines of one results file (``.gz`` or plain; a torn last line is ignored).

    Raises:
        ValueError: a line that is not a results line (names the file and the line).
    """
    path = Path(path)
    if not path.exists():
        return []
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a results file")
    try:
        chunks = _read_bytes(path).split(b"\n")
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot be read as a results file ({e})") from None
    out = []
    for i, chunk in enumerate(chunks):
        if not chunk.strip():
            continue
        torn_tail = i == len(chunks) - 1 and chunk.startswith(LINE_START)
        try:
            out.append(Line.from_json(json.loads(chunk)))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if torn_tail:  # cut by prepare_append before the next write
                continue
            raise ValueError(f"{path}: line {i + 1} is not a results line (invalid JSON)") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: line {i + 1} is not a results line ({e!r})") from None
    return out


def prepare_append(path: Path) -> list[Line]:
    """Check that ``path`` is absent or a results file, cut a torn last line; its lines.

    Nothing is changed unless every complete line is a results line.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"--out {path} is not a file")
    lines = read(path)  # raises, untouched, on foreign content
    if path.exists() and path.stat().st_size > 0:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            if not data[keep:].startswith(LINE_START):
                raise ValueError(f"{path} does not end like a results file: pass a new --out")
            log.warning("%s: cutting a torn last line (%d bytes)", path, len(data) - keep)
            with path.open("rb+") as f:
                f.truncate(keep)
    return lines


def append(path: Path, line: Line) -> None:
    """Append one line with a single write, flushed and fsynced."""
    text = (json.dumps(line.to_json(), separators=(",", ":"), allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, text)
        if written != len(text):
            raise OSError(f"short write to {path}: {written} of {len(text)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


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


def load(paths: Iterable[str | Path]) -> list[Line]:
    """All lines of the given results files (with shards and ``.gz`` copies), de-duplicated
    by (record, setting): the first one read wins."""
    seen, out = set(), []
    for p in paths:
        found = files(Path(p))
        if not found:
            raise FileNotFoundError(f"no results at {p} (nor rank shards or .gz beside it)")
        for f in found:
            for line in read(f):
                if line.key not in seen:
                    seen.add(line.key)
                    out.append(line)
    return out


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
