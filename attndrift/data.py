"""Data: edit requests, CounterFact-style records, their probes, and loaders.

An :class:`EditRequest` asks to rewrite one fact (subject, relation prompt, true → new object).
A :class:`Record` bundles a request with the prompts that test it. :meth:`Record.probes`
turns a record into the :class:`Probe` set of METHOD §5 — each a prompt with a right and a
wrong answer:

=====  =====================================================  ===============  =========
kind   prompts                                                right            wrong
=====  =====================================================  ===============  =========
ES     the edit prompt                                        o_new            o_true
PS     paraphrase prompts                                     o_new            o_true
NS     other subjects, same relation                          their object     o_new
RS     same subject, other relations                          that answer      o_new
DNS    NS prompts prefixed by ``"{edit prompt} {o_new}. "``   their object     o_new
RS_D   RS prompts with the same prefix                        that answer      o_new
AS     subject-alias prompts (merged WikiData records)        o_new            o_true
=====  =====================================================  ===============  =========

Absence is explicit: a probe set a record does not have is ``None`` (a present but empty list
is ``()``).

Inputs are checked where they enter, with a message that names the file, the record and the
field: subjects and targets must have visible text (whitespace and format characters such as
U+200B do not count, :func:`attndrift.checks.visible`); prompts must not be empty; a ROME
template has exactly one ``{}`` and no other field; record ids are integers (``case_id``, or
the record's position when absent; ``null`` is refused) and unique within a dataset. Loaders
read (a) the paper's merged format (``requested_rewrite``, ``p-paraphrase``,
``l-neighbor``, ``l-relation``, ``p-subject_alias``, ``generation``) and (b) ROME's
``counterfact.json`` (template prompts with ``"{}"``). Fields neither metric uses
(``p-reasoning``, ``o-commonsense``, ROME's ``attribute_prompts``) are not loaded.
"""

import hashlib
import json
import logging
import stat
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from attndrift.checks import template_problem, visible

log = logging.getLogger(__name__)

ProbeKind = Literal["ES", "PS", "NS", "RS", "DNS", "RS_D", "AS"]
PROBE_KINDS: tuple[ProbeKind, ...] = ("ES", "PS", "NS", "RS", "DNS", "RS_D", "AS")
#: The metrics whose harmonic mean is the Score (METHOD §5).
SCORE_KINDS: tuple[ProbeKind, ...] = ("ES", "PS", "NS", "RS", "DNS")


class DataError(ValueError):
    """A malformed record: says which record and which field."""

    def __init__(self, record: int | str, field_name: str, problem: str):
        self.record, self.field, self.problem = record, field_name, problem
        super().__init__(f"record {record}: field {field_name!r}: {problem}")


@dataclass(frozen=True, kw_only=True)
class EditRequest:
    """Rewrite ``subject``'s object in ``prompt`` from ``target_true`` to ``target_new``.

    ``prompt`` contains the subject, e.g. ``"The Eiffel Tower is located in the city of"``.
    Fields are keyword-only: ``EditRequest(subject=…, prompt=…, target_true=…,
    target_new=…)``, so that the two objects cannot be swapped by position (everywhere in
    attndrift the true object comes before the new one).
    """

    subject: str
    prompt: str
    target_true: str
    target_new: str
    relation_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("subject", "prompt", "target_new", "target_true"):
            value = getattr(self, name)
            if not isinstance(value, str) or not visible(value):
                raise ValueError(
                    f"EditRequest.{name} must be a non-empty string (whitespace and format "
                    f"characters do not count), got {value!r}"
                )
        if self.subject not in self.prompt:
            raise ValueError(
                f"EditRequest.prompt must contain the subject {self.subject!r}: {self.prompt!r}"
            )
        if visible(self.target_new) == visible(self.target_true):  # o_true == o_new: degenerate
            raise ValueError(
                f"EditRequest.target_new equals target_true ({self.target_new!r}): nothing to edit"
            )

    @property
    def template(self) -> str:
        """The prompt with the (first) subject occurrence replaced by ``{}``."""
        return self.prompt.replace(self.subject, "{}", 1)

    @property
    def distraction(self) -> str:
        """The prefix of distracting probes: ``"{edit prompt} {o_new}. "``."""
        return f"{self.prompt} {self.target_new}. "


@dataclass(frozen=True)
class Probe:
    """One prompt with a right and a wrong answer; ``subject`` is the edited subject."""

    kind: ProbeKind
    prompt: str
    right: str
    wrong: str
    subject: str
    record: int = -1


@dataclass(frozen=True)
class Record:
    """An edit request plus its evaluation prompts (``None`` = not in the source data)."""

    id: int
    request: EditRequest
    paraphrase_prompts: tuple[str, ...] | None = None
    neighborhood: tuple[tuple[str, str], ...] | None = None  # (prompt, its true object)
    relation: tuple[tuple[str, str], ...] | None = None  # (prompt, answer), same subject
    alias_prompts: tuple[str, ...] | None = None
    generation_prompts: tuple[str, ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        _check_id(self.id)
        new = visible(self.request.target_new)
        for name, pairs in (("neighborhood", self.neighborhood), ("relation", self.relation)):
            for i, (_, answer) in enumerate(pairs or ()):
                if visible(answer) == new:  # o_true == o_new for its probes: degenerate
                    raise ValueError(
                        f"record {self.id}: the {name} answer {i} ({answer!r}) equals target_new: "
                        "its probes could not tell right from wrong"
                    )

    def available(self) -> tuple[ProbeKind, ...]:
        """Probe kinds this record has data for."""
        have = {
            "ES": True,
            "PS": self.paraphrase_prompts is not None,
            "NS": self.neighborhood is not None,
            "RS": self.relation is not None,
            "DNS": self.neighborhood is not None,
            "RS_D": self.relation is not None,
            "AS": self.alias_prompts is not None,
        }
        return tuple(k for k in PROBE_KINDS if have[k])

    def probes(self, kinds: Iterable[ProbeKind] = PROBE_KINDS) -> list[Probe]:
        """The METHOD §5 probes of this record, for the requested kinds it has."""
        kinds = set(kinds)
        unknown = kinds - set(PROBE_KINDS)
        if unknown:
            raise ValueError(f"unknown probe kinds {sorted(unknown)}: expected {PROBE_KINDS}")
        r = self.request
        new, true, subj, rid = r.target_new, r.target_true, r.subject, self.id
        out: list[Probe] = []
        if "ES" in kinds:
            out.append(Probe("ES", r.prompt, new, true, subj, rid))
        if "PS" in kinds:
            out += [Probe("PS", p, new, true, subj, rid) for p in self.paraphrase_prompts or ()]
        if "AS" in kinds:
            out += [Probe("AS", p, new, true, subj, rid) for p in self.alias_prompts or ()]
        for kind, distracted, pairs in (
            ("NS", "DNS", self.neighborhood or ()),
            ("RS", "RS_D", self.relation or ()),
        ):
            for prompt, answer in pairs:
                if kind in kinds:
                    out.append(Probe(kind, prompt, answer, new, subj, rid))
                if distracted in kinds:
                    out.append(Probe(distracted, r.distraction + prompt, answer, new, subj, rid))
        return out


@dataclass(frozen=True)
class Skipped:
    """A record that lenient loading left out, and why."""

    record: int
    field: str
    problem: str


@dataclass(frozen=True)
class Dataset:
    """Records loaded from one file, plus what lenient loading skipped (never silently).

    ``sha256`` identifies the source: the file's sha256, or (records built in memory) the
    sha256 of their canonical JSON (:func:`records_sha256`).
    """

    records: tuple[Record, ...]
    skipped: tuple[Skipped, ...] = ()
    path: str = ""
    sha256: str = ""

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for r in self.records:
            if r.id in seen:
                where = f" in {self.path}" if self.path else ""
                raise ValueError(
                    f"the records repeat an id ({r.id}{where}): every record needs its own id"
                )
            seen.add(r.id)
        if not self.sha256:
            object.__setattr__(self, "sha256", records_sha256(self.records))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]

    def by_id(self, record_id: int) -> Record:
        for r in self.records:
            if r.id == record_id:
                return r
        raise KeyError(f"no record with id {record_id} in {self.path or 'this dataset'}")

    def select(self, ids: Sequence[int] | None = None, limit: int | None = None) -> "Dataset":
        """Records with the given ids (in that order), then at most ``limit`` of them.

        The selection keeps the source's ``sha256`` (results record which file they came from;
        the record ids say which part of it).
        """
        if ids is not None:
            repeated = [i for i, n in Counter(ids).items() if n > 1]
            if repeated:
                raise ValueError(f"record {repeated[0]} is selected more than once")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        ):
            raise ValueError(f"limit must be an integer >= 0, got {limit!r}")
        records = list(self.records)
        if ids is not None:
            index = {r.id: r for r in self.records}
            records = [index[i] if i in index else self.by_id(i) for i in ids]  # by_id: KeyError
        if limit is not None:
            records = records[:limit]
        return Dataset(tuple(records), self.skipped, self.path, self.sha256)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def load_dataset(path: str | Path, *, lenient: bool = False) -> Dataset:
    """Load a JSON list of records in the merged or ROME ``counterfact.json`` format.

    Args:
        path: the JSON file.
        lenient: if false (default), the first malformed record raises :class:`DataError`
            naming the record and field; if true, malformed records are skipped, logged, and
            listed in :attr:`Dataset.skipped`.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data path {path} is a directory, not a JSON file of records")
    mode = path.stat().st_mode if path.exists() else 0
    if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):  # /dev/zero would never end
        raise ValueError(f"data path {path} is a device, not a JSON file of records")
    try:
        raw_bytes = path.read_bytes()
        raw = json.loads(raw_bytes.decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    records, skipped = [], []
    for index, item in enumerate(raw):
        try:
            records.append(parse_record(item, index))
        except DataError as e:
            if not lenient:
                raise DataError(e.record, e.field, f"{e.problem} (in {path})") from None
            log.warning("skipping %s", e)
            skipped.append(Skipped(index, e.field, e.problem))
    sha = hashlib.sha256(raw_bytes).hexdigest()
    return Dataset(tuple(records), tuple(skipped), str(path), sha)  # refuses repeated ids


def _check_id(rid: object) -> None:
    if rid is None:
        raise ValueError("a record id is null: give every record an integer id (or none)")
    if isinstance(rid, bool) or not isinstance(rid, int):
        raise ValueError(
            f'record id {rid!r} is a {type(rid).__name__}: record ids are integers ("7" and 7 '
            "would be two different records)"
        )


def parse_record(item: dict, index: int) -> Record:
    """One record of either format; ``index`` is its position (the id unless it has one)."""
    if not isinstance(item, dict):
        raise DataError(index, "<record>", f"expected an object, got {type(item).__name__}")
    rid = item.get("case_id", index)
    try:
        _check_id(rid)
    except ValueError as e:
        raise DataError(f"#{index}", "case_id", str(e)) from None
    rw = _get(item, "requested_rewrite", dict, rid)
    if isinstance(rw.get("target_new"), dict):
        return _parse_rome(item, rw, rid)
    return _parse_merged(item, rw, rid)


def _get(obj: dict, key: str, kind: type, rid, where: str = ""):
    name = f"{where}{key}"
    if key not in obj:
        raise DataError(rid, name, "missing")
    value = obj[key]
    if not isinstance(value, kind):
        raise DataError(rid, name, f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _text(obj: dict, key: str, rid, where: str = "") -> str:
    value = _get(obj, key, str, rid, where)
    if not visible(value):
        shown = f" ({value!r}: whitespace and format characters only)" if value else ""
        raise DataError(rid, f"{where}{key}", "empty" + shown)
    return value


def _request(rid, subject: str, prompt: str, new: str, true: str, relation) -> EditRequest:
    if subject not in prompt:
        raise DataError(rid, "requested_rewrite.prompt", f"does not contain subject {subject!r}")
    if visible(new) == visible(true):
        raise DataError(rid, "requested_rewrite.target_new", "equals target_true")
    return EditRequest(
        subject=subject, prompt=prompt, target_true=true, target_new=new, relation_id=relation
    )


def _prompt_list(item: dict, key: str, rid) -> tuple[str, ...] | None:
    if key not in item:
        return None
    block = item[key]
    prompts = block.get("prompts") if isinstance(block, dict) else block
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise DataError(rid, f"{key}.prompts", "expected a list of strings")
    _no_empty(prompts, f"{key}.prompts", rid)
    return tuple(prompts)


def _no_empty(prompts: list, name: str, rid) -> None:
    for i, prompt in enumerate(prompts):
        if not visible(prompt):
            raise DataError(rid, f"{name}[{i}]", f"empty prompt {prompt!r}")


def _pairs(item: dict, key: str, rid, new: str) -> tuple[tuple[str, str], ...] | None:
    if key not in item:
        return None
    block = _get(item, key, dict, rid)
    prompts = _get(block, "prompts", list, rid, f"{key}.")
    targets = _get(block, "targets", list, rid, f"{key}.")
    if len(prompts) != len(targets):
        raise DataError(rid, key, f"{len(prompts)} prompts but {len(targets)} targets")
    if not all(isinstance(p, str) for p in prompts):
        raise DataError(rid, f"{key}.prompts", "expected a list of strings")
    _no_empty(prompts, f"{key}.prompts", rid)
    for i, t in enumerate(targets):
        if not isinstance(t, str) or not visible(t):
            raise DataError(rid, f"{key}.targets[{i}]", f"empty or non-string target {t!r}")
        if visible(t) == visible(new):
            raise DataError(rid, f"{key}.targets[{i}]", f"{t!r} equals target_new (degenerate)")
    return tuple(zip(prompts, targets, strict=True))


def _parse_merged(item: dict, rw: dict, rid) -> Record:
    where = "requested_rewrite."
    request = _request(
        rid,
        _text(rw, "subject", rid, where),
        _text(rw, "prompt", rid, where),
        _text(rw, "target_new", rid, where),
        _text(rw, "target_true", rid, where),
        rw.get("relation_id"),
    )
    return Record(
        id=rid,
        request=request,
        paraphrase_prompts=_prompt_list(item, "p-paraphrase", rid),
        neighborhood=_pairs(item, "l-neighbor", rid, request.target_new),
        relation=_pairs(item, "l-relation", rid, request.target_new),
        alias_prompts=_prompt_list(item, "p-subject_alias", rid),
        generation_prompts=_prompt_list(item, "generation", rid),
        source="merged",
    )


def _parse_rome(item: dict, rw: dict, rid) -> Record:
    where = "requested_rewrite."
    subject = _text(rw, "subject", rid, where)
    template = _text(rw, "prompt", rid, where)
    problem = template_problem(template)
    if problem:
        raise DataError(rid, "requested_rewrite.prompt", f"{problem}: {template!r}")
    new = _text(_get(rw, "target_new", dict, rid, where), "str", rid, f"{where}target_new.")
    true = _text(_get(rw, "target_true", dict, rid, where), "str", rid, f"{where}target_true.")
    request = _request(rid, subject, template.format(subject), new, true, rw.get("relation_id"))
    neighborhood = _prompt_list(item, "neighborhood_prompts", rid)
    return Record(
        id=rid,
        request=request,
        paraphrase_prompts=_prompt_list(item, "paraphrase_prompts", rid),
        neighborhood=None if neighborhood is None else tuple((p, true) for p in neighborhood),
        relation=None,
        generation_prompts=_prompt_list(item, "generation_prompts", rid),
        source="rome",
    )


def embedded_dataset_path() -> Path:
    """The embedded well-known-facts dataset (merged format): ``assets/known_facts.json``.

    In a checkout or editable install it is read from the repository's ``assets/``; wheels
    ship it as the resource package ``attndrift.assets``.
    """
    repo = Path(__file__).resolve().parent.parent / "assets" / "known_facts.json"
    if repo.exists():
        return repo
    from importlib.resources import files

    return Path(str(files("attndrift.assets") / "known_facts.json"))


def load_embedded(*, lenient: bool = False) -> Dataset:
    """The embedded dataset of well-known facts SmolLM2-135M gets right before editing."""
    return load_dataset(embedded_dataset_path(), lenient=lenient)


def records_sha256(records: Iterable[Record]) -> str:
    """sha256 of the records' canonical JSON (identifies records built in memory)."""
    text = json.dumps([asdict(r) for r in records], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def probes_of(records: Iterable[Record], kinds: Iterable[ProbeKind] = PROBE_KINDS) -> list[Probe]:
    """All probes of ``records`` for ``kinds``, in record order."""
    kinds = tuple(kinds)
    return [p for r in records for p in r.probes(kinds)]
