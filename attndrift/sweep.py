"""Sweeps: edit every record under every setting, score all probes, append result lines.

For each record (rank r of N takes records r, r+N, …): score every probe on the unedited model
and capture its attention on the RS/DNS prompts once; then, for each setting, edit (as hooks:
the weights are never touched), score every probe under the edit, measure the drift of the
RS/DNS prompts, and append one :class:`attndrift.results.Line` to the results file.

Resuming: rerun the same command. Finished (record, setting) pairs are skipped, also those in
a ``.gz`` copy of the file. A line is only resumed onto if it was produced by the same
:class:`~attndrift.results.Provenance` (model weights, data file, version, git revision) and
its setting resolves to the same editor config; anything else is an error that names the file
(pass a new ``--out``, or ``allow_new_revision`` when only the git revision differs).
"""

import dataclasses
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from attndrift import drift, evaluation, models, results
from attndrift.data import Dataset, Record
from attndrift.edits import restored
from attndrift.results import DriftScores, Line, ProbeScore, Provenance
from attndrift.setting import Editor, Setting
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
    path = results.shard_path(Path(out), rank, world)
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"--out {path}: {path.parent} is not a directory")
    results.prepare_append(path)  # refuses a foreign file, cuts a torn tail
    # finished pairs: this rank's file, the other ranks' shards and .gz copies (a rerun with
    # another number of ranks, or after a rebalance, redoes nothing)
    done_lines = [line for f in results.files(Path(out)) for line in results.read(f)]
    prov = provenance(model, dataset, model_name)
    configs = {s.key: _jsonable(dataclasses.asdict(s.config(model))) for s in settings}
    check_resume(path, done_lines, prov, configs, allow_new_revision)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"--out {path}: {path.parent} is not writable")
    done = {line.key for line in done_lines}
    todo = _todo(dataset.records, settings, rank, world, done)
    n = sum(len(g) for _, g in todo)
    log.info("%s: %d (record, setting) pairs to do", path, n)
    ctx = _Context(model, Editor(model), fluency, prov, configs, rank, world)
    bar = tqdm(total=n, desc=f"sweep r{rank}", unit="edit", disable=not progress)
    for setting, group in todo:
        for line in _group_lines(ctx, setting, group):
            if line.key not in done:
                results.append(path, line)
            bar.update(1)
    bar.close()
    return path


def _checked(dataset, settings, rank: int, world: int) -> Dataset:
    if not settings:
        raise ValueError("a sweep needs at least one setting")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    keys = [s.key for s in settings]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate settings: {keys}")
    if not isinstance(dataset, Dataset):
        dataset = Dataset(tuple(dataset))
    ids = [r.id for r in dataset.records]
    if len(set(ids)) != len(ids):
        raise ValueError("the records repeat an id: each record is swept once")
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


def distributed_rank() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; (0, 1) when not distributed."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def device_for_rank() -> str | None:
    """``cuda:<LOCAL_RANK>`` under torchrun on a CUDA machine, else None (default device)."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return None
