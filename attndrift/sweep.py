"""Sweeps: edit every record under every setting, score all probes, append JSON lines.

A results file holds one JSON object per line, one line per finished (record, setting):
the request, the setting, every probe's P(right)/P(wrong) before and after the edit, the
summary metrics, the drift factor of the record's RS/DNS probes, timings, the library version
and git revision. Lines are appended with one ``write`` of the whole line followed by
``flush`` + ``fsync``; a rerun with the same output file skips the finished pairs, so a run
killed at any moment (``kill -9`` included) resumes with nothing lost or duplicated. A torn
last line (killed mid-write) is cut off before anything is appended.

Scale-out: under ``torchrun --nproc_per_node N`` each rank takes every N-th record and writes
``<out>.rank<r>-of-<N>.jsonl`` next to ``<out>``; :func:`load_results` reads them all (and
``<out>`` itself), so ``attndrift summarize`` merges them.
"""

import dataclasses
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from attndrift import covariance, drift, evaluation, memit, metrics, models, rome
from attndrift.data import PROBE_KINDS, Dataset, EditRequest, Record
from attndrift.edit import Edit
from attndrift.sadr import SadrConfig
from attndrift.version import __version__, git_revision

log = logging.getLogger(__name__)

#: probe kinds whose drift is measured (they contain the edited subject)
DRIFT_KINDS = ("RS", "DNS")


@dataclass(frozen=True)
class Setting:
    """One editor configuration of a sweep.

    Attributes:
        editor: ``"rome"`` or ``"memit"``.
        sadr_gamma: SADR weight (0 = off).
        all_heads: SADR ablation (restrain every head).
        layer: ROME layer override; layers: MEMIT layers override.
        steps: optimisation steps override (with or without SADR; default: the preset's
            ``value.steps``, or its ``sadr_steps`` when γ > 0); cov_tokens: covariance tokens.
        identity_cov: no covariance adjustment.
        r_rome: ROME with r-ROME's denominator (mean key).
    """

    editor: str = "rome"
    sadr_gamma: float = 0.0
    all_heads: bool = False
    layer: int | None = None
    layers: tuple[int, ...] | None = None
    steps: int | None = None
    cov_tokens: int | None = None
    identity_cov: bool = False
    r_rome: bool = False

    def __post_init__(self) -> None:
        if self.r_rome and self.editor != "rome":
            raise ValueError("r_rome applies to the rome editor only")
        if self.editor not in ("rome", "memit"):
            raise ValueError(f"editor must be 'rome' or 'memit', got {self.editor!r}")
        if self.sadr_gamma < 0:
            raise ValueError(f"sadr_gamma must be >= 0, got {self.sadr_gamma}")
        if self.all_heads and self.sadr_gamma == 0:
            raise ValueError("all_heads needs sadr_gamma > 0")

    @property
    def key(self) -> str:
        """Stable identifier, e.g. ``rome|g=0.01|all`` (defaults left out)."""
        parts = [self.editor, f"g={self.sadr_gamma:g}"]
        if self.all_heads:
            parts.append("all")
        for name in ("layer", "layers", "steps", "cov_tokens"):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name}={','.join(map(str, v)) if name == 'layers' else v}")
        if self.identity_cov:
            parts.append("identity_cov")
        if self.r_rome:
            parts.append("r-rome")
        return "|".join(parts)

    def sadr(self) -> SadrConfig | None:
        return SadrConfig(self.sadr_gamma, self.all_heads) if self.sadr_gamma > 0 else None

    def config(self, model: HookedTransformer):
        """The editor's config: the model's preset with this setting's overrides."""
        base = rome.preset(model) if self.editor == "rome" else memit.preset(model)
        changes: dict = {}
        if self.editor == "rome" and self.layer is not None:
            changes["layer"] = self.layer
        if self.r_rome:
            changes["denominator"] = "mean_key"
        if self.editor == "memit" and self.layers is not None:
            changes["layers"] = self.layers
        if self.steps is not None:  # for whichever of value.steps / sadr_steps applies
            changes["value"] = dataclasses.replace(base.value, steps=self.steps)
            changes["sadr_steps"] = None
        if self.identity_cov:
            changes["covariance"] = None
        elif self.cov_tokens is not None and base.covariance is not None:
            changes["covariance"] = dataclasses.replace(base.covariance, n_tokens=self.cov_tokens)
        return dataclasses.replace(base, **changes)


class Editor:
    """Makes edits for settings, reusing context templates and covariances across records."""

    def __init__(self, model: HookedTransformer, progress: bool = False):
        self.model, self.progress = model, progress
        self._templates: dict = {}
        self._covs: dict = {}

    def _cov(self, cfg, layer: int):
        if cfg.covariance is None:
            return None
        key = (layer, cfg.covariance)
        if key not in self._covs:
            self._covs[key] = covariance.layer_covariance(
                self.model, layer, cfg.covariance, progress=self.progress
            )
        return self._covs[key]

    def __call__(self, setting: Setting, requests: Sequence[EditRequest]) -> Edit:
        cfg = setting.config(self.model)
        if cfg.templates not in self._templates:
            self._templates[cfg.templates] = rome.context_templates(self.model, cfg.templates)
        templates = self._templates[cfg.templates]
        if setting.editor == "rome":
            if len(requests) != 1:
                raise ValueError("ROME edits one request at a time")
            return rome.edit(
                self.model,
                requests[0],
                cfg,
                sadr=setting.sadr(),
                cov=self._cov(cfg, cfg.layer),
                templates=templates,
                progress=self.progress,
            )
        covs = {layer: self._cov(cfg, layer) for layer in cfg.layers}
        covs = {k: v for k, v in covs.items() if v is not None}
        return memit.edit(
            self.model,
            requests,
            cfg,
            sadr=setting.sadr(),
            covs=covs,
            templates=templates,
            progress=self.progress,
        )


# --------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------


def shard_path(out: Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes (``out`` itself when not distributed)."""
    if world == 1:
        return out
    return out.with_name(f"{out.stem}.rank{rank}-of-{world}{out.suffix or '.jsonl'}")


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (a run killed mid-write) so that appends stay line-aligned."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        log.warning("%s: cutting a torn last line (%d bytes)", path, len(data) - keep)
        f.truncate(keep)


def append_line(path: Path, obj: dict) -> None:
    """Append one JSON line with a single write, flushed and fsynced."""
    line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path) -> list[dict]:
    """The complete JSON lines of one results file (a torn last line is ignored)."""
    out = []
    if not path.exists():
        return out
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn tail, repaired on the next append
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return out


def result_files(out: Path) -> list[Path]:
    """``out`` and its rank shards."""
    files = [out] if out.exists() else []
    return files + sorted(out.parent.glob(f"{out.stem}.rank*-of-*{out.suffix or '.jsonl'}"))


def load_results(paths: Iterable[str | Path]) -> list[dict]:
    """All result lines of the given files and their rank shards, de-duplicated."""
    seen, out = set(), []
    for p in paths:
        p = Path(p)
        files = result_files(p)
        if not files:
            raise FileNotFoundError(f"no results at {p} (nor rank shards beside it)")
        for f in files:
            for line in read_lines(f):
                key = (line["record"], line["setting"])
                if key not in seen:
                    seen.add(key)
                    out.append(line)
    return out


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _probe_rows(table: pd.DataFrame) -> list[list]:
    return [
        [k, float(r), float(w)]
        for k, r, w in zip(table["kind"], table["p_right"], table["p_wrong"], strict=True)
    ]


def _summary(ev: evaluation.Evaluation) -> dict:
    return {k: (None if v != v else v) for k, v in ev.summary.row().items()}  # NaN -> null


def _drift(model: HookedTransformer, e: Edit, record: Record, post: pd.DataFrame) -> dict:
    """Drift factor of the record's RS/DNS probes (those containing the subject), per layer,
    with the edited model's P(o_new) of each (its ``p_wrong``), for the Fig. 4 analysis."""
    probes = [p for p in record.probes(DRIFT_KINDS) if p.subject in p.prompt]
    if not probes:
        return {"kinds": [], "factor": [], "factor_layer": [], "per_layer": [], "p_new": [],
                "mean": None}  # fmt: skip
    edited = models.Variant(model, e.hooks(model))
    d = drift.measure(model, edited, [p.prompt for p in probes], [p.subject for p in probes])
    per_layer = d.factor_per_layer().float().cpu()  # [prompt, layer]
    factor = per_layer.max(-1)
    # (kind, prompt) -> P(o_new); a prompt repeated in a record has the same score
    p_new = dict(zip(zip(post["kind"], post["prompt"], strict=True), post["p_wrong"], strict=True))
    return {
        "kinds": [p.kind for p in probes],
        "factor": [round(float(x), 5) for x in factor.values],
        "factor_layer": [d.layers[int(i)] for i in factor.indices],
        "layers": list(d.layers),
        "per_layer": [[round(float(x), 4) for x in row] for row in per_layer],
        "p_new": [float(p_new[(p.kind, p.prompt)]) for p in probes],
        "mean": float(factor.values.mean()),
    }


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
) -> Path:
    """Run (or resume) a sweep; returns the results file this rank wrote to.

    Args:
        model: the model (restored after every edit: edits are applied as hooks).
        dataset: the records, in order; rank r of ``world`` takes records r, r+world, ….
        settings: editor settings; every record is edited under each.
        out: results file (JSON lines); shards get a rank suffix.
        fluency: also sample generation prompts (FL) before and after.
    """
    if not settings:
        raise ValueError("a sweep needs at least one setting")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    keys = [s.key for s in settings]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate settings: {keys}")
    records = list(dataset.records if isinstance(dataset, Dataset) else dataset)[rank::world]
    path = shard_path(Path(out), rank, world)
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(path)
    done = {(line["record"], line["setting"]) for line in read_lines(path)}
    todo = [(r, s) for r in records for s in settings if (r.id, s.key) not in done]
    log.info(
        "%s: %d of %d (record, setting) pairs to do", path, len(todo), len(records) * len(settings)
    )
    editor = Editor(model, progress=False)
    name = model_name or model.cfg.model_name
    pre_cache: dict[int, tuple[evaluation.Evaluation, float]] = {}
    for record, setting in tqdm(todo, desc=f"sweep r{rank}", unit="edit", disable=not progress):
        t0 = time.perf_counter()
        if record.id not in pre_cache:
            pre_cache.clear()
            ev = evaluation.evaluate(model, [record], fluency=fluency)
            pre_cache[record.id] = (ev, time.perf_counter() - t0)
        pre, pre_s = pre_cache[record.id]
        t1 = time.perf_counter()
        e = editor(setting, [record.request])
        t2 = time.perf_counter()
        post = evaluation.evaluate(models.Variant(model, e.hooks(model)), [record], fluency=fluency)
        t3 = time.perf_counter()
        drift_info = _drift(model, e, record, post.probes)
        t4 = time.perf_counter()
        append_line(
            path,
            {
                "record": record.id,
                "setting": setting.key,
                "settings": dataclasses.asdict(setting),
                "editor": e.editor,
                "layers": list(e.layers),
                "request": dataclasses.asdict(record.request),
                "pre": {"probes": _probe_rows(pre.probes), "summary": _summary(pre)},
                "post": {"probes": _probe_rows(post.probes), "summary": _summary(post)},
                "drift": drift_info,
                "edit": {
                    "steps_run": e.info.get("steps_run"),
                    "final": e.info.get("final"),
                    "hparams": e.hparams,
                },
                "seconds": {
                    "pre_eval": round(pre_s, 3),
                    "edit": round(t2 - t1, 3),
                    "post_eval": round(t3 - t2, 3),
                    "drift": round(t4 - t3, 3),
                },
                "model": name,
                "device": str(models.model_device(model)),
                "version": __version__,
                "git": git_revision(),
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "rank": rank,
                "world": world,
            },
        )
    return path


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def _summary_of(rows: list[list], fluency: float | None = None) -> metrics.Summary:
    table = pd.DataFrame(rows, columns=["kind", "p_right", "p_wrong"])
    table["success"] = table["p_right"] > table["p_wrong"]
    return metrics.summarize(table, fluency=fluency)


def summarize(lines: Sequence[dict]) -> dict[str, metrics.Summary]:
    """Micro-averaged metrics per setting, plus the pre-edit row ``"none"`` (first).

    The pre-edit row uses each record once (records may appear under several settings).
    """
    if not lines:
        raise ValueError("no results to summarize")
    pre: dict[int, list] = {}
    by_setting: dict[str, list] = {}
    fl_pre: dict[int, float] = {}
    fl_post: dict[str, list[float]] = {}
    for line in lines:
        pre.setdefault(line["record"], line["pre"]["probes"])
        by_setting.setdefault(line["setting"], []).extend(line["post"]["probes"])
        if (f := line["pre"]["summary"].get("FL")) is not None:
            fl_pre[line["record"]] = f
        if (f := line["post"]["summary"].get("FL")) is not None:
            fl_post.setdefault(line["setting"], []).append(f)
    out = {
        "none": _summary_of(
            [row for rows in pre.values() for row in rows],
            sum(fl_pre.values()) / len(fl_pre) if fl_pre else None,
        )
    }
    for key, rows in by_setting.items():
        fl = fl_post.get(key)
        out[key] = _summary_of(rows, sum(fl) / len(fl) if fl else None)
    return out


def paired(lines: Sequence[dict]) -> list[dict]:
    """The lines of the records that have a line under every setting (for a like-for-like
    comparison of settings while a sweep is unfinished)."""
    settings = {line["setting"] for line in lines}
    have: dict[int, set[str]] = {}
    for line in lines:
        have.setdefault(line["record"], set()).add(line["setting"])
    return [line for line in lines if have[line["record"]] == settings]


def records_per_setting(lines: Sequence[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in lines:
        counts[line["setting"]] = counts.get(line["setting"], 0) + 1
    return counts


def tradeoff(lines: Sequence[dict]) -> pd.DataFrame:
    """One row per setting: γ, head selection, and ES PS NS RS DNS (+ intervals) in [0, 1]."""
    summaries = summarize(lines)
    settings = {line["setting"]: line["settings"] for line in lines}
    rows = []
    for key, s in summaries.items():
        if key == "none":
            continue
        row = {
            "setting": key,
            "editor": settings[key]["editor"],
            "gamma": settings[key]["sadr_gamma"],
            "selection": not settings[key]["all_heads"],
        }
        for k in PROBE_KINDS:
            m = s.metrics[k]
            row |= {k: m.mean, f"{k}_low": m.low, f"{k}_high": m.high}
        row["Score"] = s.score
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["editor", "selection", "gamma"]).reset_index(drop=True)


def failure_analysis(lines: Sequence[dict], setting: str) -> drift.FailureAnalysis:
    """Paper Fig. 4 over a sweep: each RS/DNS probe's drift factor vs its P(o_new) under the
    edit of ``setting``, pooled over records (Pearson, Spearman, per layer range)."""
    rows, per_layer, layers = [], [], None
    for line in lines:
        if line["setting"] != setting or not line["drift"]["kinds"]:
            continue
        d = line["drift"]
        layers = d["layers"]
        for i, kind in enumerate(d["kinds"]):
            rows.append(
                {
                    "record": line["record"],
                    "kind": kind,
                    "prompt": "",
                    "p_new": d["p_new"][i],
                    "factor": d["factor"][i],
                    "factor_layer": d["factor_layer"][i],
                }
            )
            per_layer.append(d["per_layer"][i])
    if not rows:
        raise ValueError(f"no drift measurements for setting {setting!r}")
    return drift.failure_analysis(pd.DataFrame(rows), torch.tensor(per_layer), layers)


def distributed_rank() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; (0, 1) when not distributed."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def device_for_rank() -> str | None:
    """``cuda:<LOCAL_RANK>`` under torchrun on a CUDA machine, else None (default device)."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return None
