"""Sweeps: edit every record under every setting, score all probes, append result lines.

For each record (rank r of N takes records r, r+N, …): score every probe on the unedited model
and capture its attention on the RS/DNS prompts once; then, for each setting, edit (as hooks:
the weights are never touched), score every probe under the edit, measure the drift of the
RS/DNS prompts, and append one :class:`attndrift.experiments.results.Line` to the results file.

Resuming: rerun the same command. Finished (record, setting) pairs are skipped, also those in
a ``.gz`` copy of the file. A line is only resumed onto if it was produced by the same
:class:`~attndrift.experiments.results.Provenance` (model weights, data file, version, git revision)
and its setting resolves to the same editor config; anything else is an error that names the file
(pass a new ``--out``, or ``allow_new_revision`` when only the git revision differs).
"""

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from attndrift import evaluation, models
from attndrift.analysis import drift
from attndrift.data import Dataset, Record
from attndrift.editing.edits import restored
from attndrift.editing.setting import Editor, Setting
from attndrift.experiments import results
from attndrift.experiments.results import DriftScores, Line, ProbeScore, Provenance
from attndrift.version import __version__, git_revision

log = logging.getLogger(__name__)

#: probe kinds whose drift is measured (they contain the edited subject)
DRIFT_KINDS = ("RS", "DNS")


def _jsonable(obj) -> dict:
    return json.loads(json.dumps(obj))


def _scores(ev: evaluation.Evaluation) -> tuple[ProbeScore, ...]:
    t = ev.probes
    return tuple(
        ProbeScore(k, float(r), float(w))
        for k, r, w in zip(t["kind"], t["p_right"], t["p_wrong"], strict=True)
    )


class _RecordState:
    """What a record's settings share: the unedited scores and attention captures."""

    def __init__(self, model: HookedTransformer, record: Record, fluency: bool):
        t0 = time.perf_counter()
        self.record_id = record.id
        self.pre = evaluation.evaluate(model, [record], fluency=fluency)
        self.drift_probes = [p for p in record.probes(DRIFT_KINDS) if p.subject in p.prompt]
        self.vanilla = None
        if self.drift_probes:
            prompts = [p.prompt for p in self.drift_probes]
            subjects = [p.subject for p in self.drift_probes]
            self.vanilla = drift.reference(model, prompts, subjects)
        self.seconds = time.perf_counter() - t0

    def drift(
        self, model: HookedTransformer, edited: models.Variant, post: evaluation.Evaluation
    ) -> DriftScores:
        """Drift factor of the RS/DNS probes (those containing the subject), per layer, with
        the edited model's P(o_new) of each (its ``p_wrong``), for the Fig. 4 analysis."""
        probes = self.drift_probes
        if not probes:
            return DriftScores((), (), (), (), (), ())
        d = drift.measure(
            model,
            edited,
            [p.prompt for p in probes],
            [p.subject for p in probes],
            vanilla_captures=self.vanilla,
        )
        per_layer = d.factor_per_layer().float().cpu()  # [prompt, layer]
        factor = per_layer.max(-1)
        # (kind, prompt) -> P(o_new); a prompt repeated in a record has the same score
        t = post.probes
        p_new = dict(zip(zip(t["kind"], t["prompt"], strict=True), t["p_wrong"], strict=True))
        return DriftScores(
            kinds=tuple(p.kind for p in probes),
            factor=tuple(round(float(x), 5) for x in factor.values),
            factor_layer=tuple(d.layers[int(i)] for i in factor.indices),
            layers=tuple(d.layers),
            per_layer=tuple(tuple(round(float(x), 4) for x in row) for row in per_layer),
            p_new=tuple(float(p_new[(p.kind, p.prompt)]) for p in probes),
        )


def shard_of(index: int, world: int) -> int:
    """The rank that runs the ``index``-th record: round robin, shifted by one every round,
    so that every rank gets records of every position modulo ``world`` (data files that
    alternate record kinds, as the merged CounterFact file does, stay balanced)."""
    return (index + index // world) % world


def provenance(model: HookedTransformer, dataset: Dataset, model_name: str = "") -> Provenance:
    """The provenance of lines this model and dataset produce now."""
    return Provenance(
        model=model_name or model.cfg.model_name,
        fingerprint=models.fingerprint(model),
        data=dataset.path,
        data_sha256=dataset.sha256,
        version=__version__,
        git=git_revision(),
    )


def check_resume(
    path: Path,
    lines: Sequence[Line],
    prov: Provenance,
    configs: dict[str, dict],
    allow_new_revision: bool = False,
) -> None:
    """Raise a ValueError unless every line of ``path`` may be resumed onto by this run."""
    for line in lines:
        if line.provenance is None:
            raise ValueError(f"{path} holds lines without provenance: pass a new --out")
        old = dataclasses.asdict(line.provenance)
        for name, value in dataclasses.asdict(prov).items():
            if name == "data" or (name == "git" and allow_new_revision):
                continue
            if old[name] != value:
                hint = " (allow_new_revision resumes across revisions)" if name == "git" else ""
                raise ValueError(
                    f"{path} was written with {name} {old[name]!r}, this run has {value!r}: "
                    f"pass a new --out{hint}"
                )
        key = line.setting.key
        if key in configs and line.config != configs[key]:
            raise ValueError(
                f"{path}: setting {key!r} resolved to another editor config when that line was "
                "written (a changed preset?): pass a new --out"
            )


def run(
    model: HookedTransformer,
    dataset: Dataset | Sequence[Record],
    settings: Sequence[Setting],
    out: str | Path,
    *,
    fluency: bool = False,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    model_name: str = "",
    allow_new_revision: bool = False,
) -> Path:
    """Run (or resume) a sweep; returns the results file this rank wrote to.

    Records are edited one at a time, or in groups of ``setting.group`` consecutive records:
    a batch (one edit of all their requests) or a sequence (each edit computed and applied on
    the weights the previous ones left; the weights are restored after the group). Every
    record of a group is then scored under the group's final state.

    Args:
        model: the model (restored after every edit or group).
        dataset: the records, in order; rank r of ``world`` takes the groups of
            :func:`shard_of`.
        settings: editor settings; every record is edited under each.
        out: results file (JSON lines); shards get a rank suffix.
        fluency: also sample generation prompts (FL) before and after.
        model_name: the name lines record (default: ``model.cfg.model_name``).
        allow_new_revision: resume onto lines written by another git revision of the same
            version (for code changes that leave the numbers alone).
    """
    dataset = _checked(dataset, settings, rank, world)
    results.check_out_name(Path(out))  # x.jsonl.gz: refused, x.jsonl resumes from it
    path = results.shard_path(Path(out), rank, world)
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"--out {path}: {path.parent} is not a directory")
    prov = provenance(model, dataset, model_name)
    configs = {s.key: _jsonable(dataclasses.asdict(s.config(model))) for s in settings}
    # everything checked before the file is touched (or created by the lock) …
    check_resume(path, _done_lines(out, path), prov, configs, allow_new_revision)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"--out {path}: {path.parent} is not writable")
    with results.locked(path):  # … and again under the lock: the file is this run's now
        results.prepare_append(path)  # completes a last line's newline, cuts a torn tail
        done_lines = _done_lines(out, path)
        check_resume(path, done_lines, prov, configs, allow_new_revision)
        done = {line.key for line in done_lines}
        todo = _todo(dataset.records, settings, rank, world, done)
        n = sum(len(g) for _, g in todo)
        log.info("%s: %d (record, setting) pairs to do", path, n)
        ctx = _Context(model, Editor(model), fluency, prov, configs, rank, world)
        bar = tqdm(total=n, desc=f"sweep r{rank}", unit="edit", disable=not progress)
        try:
            for setting, group in todo:
                for line in _group_lines(ctx, setting, group):
                    if line.key not in done:
                        results.append(path, line)
                    bar.update(1)
        finally:  # closed now, not when collected (after an interrupt's message)
            bar.close()
    return path


def _done_lines(out: str | Path, path: Path) -> list[Line]:
    """Finished lines: this rank's file (refused if foreign), the other ranks' shards and the
    .gz copies (a rerun with another number of ranks, or after a rebalance, redoes nothing)."""
    mine = results.check_appendable(path)
    return mine + [x for f in results.files(Path(out)) if f != path for x in results.read(f)]


def _checked(dataset, settings, rank: int, world: int) -> Dataset:
    if not settings:
        raise ValueError("a sweep needs at least one setting")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    keys = [s.key for s in settings]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate settings: {keys}")
    if not isinstance(dataset, Dataset):
        dataset = Dataset(tuple(dataset))  # refuses repeated ids
    if not len(dataset):
        raise ValueError("no records to sweep")
    return dataset


def _todo(records, settings, rank: int, world: int, done: set) -> list[tuple[Setting, list]]:
    """(setting, group of records) still to run by this rank, record-major (a record's
    unedited scores are computed once for all its settings)."""
    todo = []
    for s in settings:
        groups = [list(records[i : i + s.group]) for i in range(0, len(records), s.group)]
        todo += [
            (g[0].id, s, g)
            for i, g in enumerate(groups)
            if shard_of(i, world) == rank and any((r.id, s.key) not in done for r in g)
        ]
    order = {r.id: i for i, r in enumerate(records)}
    return [(s, g) for _, s, g in sorted(todo, key=lambda x: order[x[0]])]


@dataclass
class _Context:
    """What every line of a sweep run shares."""

    model: HookedTransformer
    editor: Editor
    fluency: bool
    provenance: Provenance
    configs: dict[str, dict]
    rank: int
    world: int
    states: dict[int, _RecordState] = dataclasses.field(default_factory=dict)

    def state(self, record: Record) -> _RecordState:
        """The record's unedited scores and captures (kept for the record's settings)."""
        if record.id not in self.states:
            self.states = {record.id: _RecordState(self.model, record, self.fluency)}
        return self.states[record.id]


def _group_lines(ctx: _Context, setting: Setting, group: list[Record]) -> list[Line]:
    """Edit a group of records under ``setting`` and score each: its lines."""
    model = ctx.model
    states = [ctx.state(r) if len(group) == 1 else _RecordState(model, r, ctx.fluency)
              for r in group]  # fmt: skip
    t0 = time.perf_counter()
    if setting.sequential is not None:
        with restored(model, _group_layers(ctx, setting)):
            edits = ctx.editor.sequence(setting, [r.request for r in group])
            t1 = time.perf_counter()
            return _score_group(ctx, setting, group, states, edits, models.Variant(model), t0, t1)
    if setting.batch is not None:
        e = ctx.editor(setting, [r.request for r in group])
        edits = [e] * len(group)
    else:
        edits = [ctx.editor(setting, [group[0].request])]
    t1 = time.perf_counter()
    variant = models.Variant(model, edits[-1].hooks(model))
    return _score_group(ctx, setting, group, states, edits, variant, t0, t1)


def _group_layers(ctx: _Context, setting: Setting) -> tuple[int, ...]:
    cfg = setting.config(ctx.model)
    return (cfg.layer,) if hasattr(cfg, "layer") else tuple(cfg.layers)


def _score_group(ctx, setting, group, states, edits, variant, t0: float, t1: float) -> list[Line]:
    lines = []
    for i, (record, state) in enumerate(zip(group, states, strict=True)):
        t2 = time.perf_counter()
        post = evaluation.evaluate(variant, [record], fluency=ctx.fluency)
        t3 = time.perf_counter()
        drift_scores = state.drift(ctx.model, variant, post)
        t4 = time.perf_counter()
        e = edits[min(i, len(edits) - 1)]
        seconds = {
            "record_setup": round(state.seconds, 3),  # once per record: unedited scores
            "edit": round((t1 - t0) / len(group), 3),  # the group's editing, per record
            **{f"edit_{k}": round(v, 3) for k, v in e.run.timings},
            "post_eval": round(t3 - t2, 3),
            "drift": round(t4 - t3, 3),
        }
        extra = {
            "device": str(models.model_device(ctx.model)),
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "rank": ctx.rank,
            "world": ctx.world,
        }
        if len(group) > 1:
            extra["group"] = [r.id for r in group]
        lines.append(
            Line(
                record=record.id,
                setting=setting,
                editor=e.editor,
                layers=tuple(e.layers),
                request=record.request,
                pre=_scores(state.pre),
                post=_scores(post),
                fluency_pre=state.pre.summary.fluency,
                fluency_post=post.summary.fluency,
                drift=drift_scores,
                steps_run=e.run.steps_run,
                final=dataclasses.asdict(e.run.final),
                config=ctx.configs[setting.key],
                seconds=seconds,
                provenance=ctx.provenance,
                extra=extra,
            )
        )
    return lines


#: seconds the ranks of a distributed sweep wait for each other to start
#: (``$ATTNDRIFT_RENDEZVOUS_TIMEOUT`` overrides it)
RENDEZVOUS_SECONDS = 600.0


def _env_int(name: str, default: int, low: int = 0) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer (torchrun's variables)") from None
    if value < low:
        raise ValueError(f"{name}={value} must be >= {low} (torchrun's variables)")
    return value


def distributed_rank() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; (0, 1) when not distributed.

    Checked before any process group starts (a wrong value would otherwise wait for peers
    that never come): ``RANK`` and ``WORLD_SIZE`` integers with 0 <= RANK < WORLD_SIZE, and,
    when distributed, ``MASTER_ADDR`` and ``MASTER_PORT`` set (a ValueError names the
    variable).
    """
    world = _env_int("WORLD_SIZE", 1, low=1)
    rank = _env_int("RANK", 0)
    if rank >= world:
        raise ValueError(f"RANK={rank} is not in 0..{world - 1} (WORLD_SIZE={world})")
    _env_int("LOCAL_RANK", 0)
    if world > 1:
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={world} but {' and '.join(missing)} not set: start the ranks with "
                "torchrun (or set WORLD_SIZE=1)"
            )
        port = _env_int("MASTER_PORT", 0, low=1)
        if port > 65535:
            raise ValueError(f"MASTER_PORT={port} is not a port (1..65535)")
    return rank, world


def rendezvous_seconds() -> float:
    """How long ranks wait for each other (``$ATTNDRIFT_RENDEZVOUS_TIMEOUT``, default
    :data:`RENDEZVOUS_SECONDS`)."""
    text = os.environ.get("ATTNDRIFT_RENDEZVOUS_TIMEOUT")
    if text is None:
        return RENDEZVOUS_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"ATTNDRIFT_RENDEZVOUS_TIMEOUT={text!r} must be a number of seconds > 0")
    return value


_FINISH_GROUP = []  # the process group of finish(): ranks may end hours apart


def start(backend: str, rank: int, world: int) -> None:
    """Join the other ranks (the default process group), waiting at most
    :func:`rendezvous_seconds`; a RuntimeError that says so when they do not come."""
    import torch.distributed as dist

    seconds = rendezvous_seconds()
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=dt.timedelta(seconds=seconds)
        )
        # the end of the sweep waits for the slowest rank: no rendezvous timeout there
        _FINISH_GROUP[:] = [dist.new_group(backend="gloo", timeout=dt.timedelta(days=30))]
    except (RuntimeError, TimeoutError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            f"rank {rank} of {world}: the other ranks did not join at {where} within "
            f"{seconds:g} s ({first[:120]}): start every rank with torchrun "
            "(ATTNDRIFT_RENDEZVOUS_TIMEOUT sets the wait)"
        ) from None


def finish() -> None:
    """Wait for every rank to finish its shard, then leave the process group."""
    import torch.distributed as dist

    dist.barrier(group=_FINISH_GROUP[0] if _FINISH_GROUP else None)
    _FINISH_GROUP.clear()
    dist.destroy_process_group()


def device_for_rank() -> str | None:
    """``cuda:<LOCAL_RANK>`` under torchrun on a CUDA machine, else None (default device)."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{_env_int('LOCAL_RANK', 0)}"
    return None
