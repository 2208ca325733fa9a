"""Demo: the main job on the embedded model — one fact that ROME breaks, from failure to mitigation.

1. **The fact and the probe**, by a written rule (:func:`choose_probe`): among the
   distracting-neighbour (DNS) and relation (RS) probes that the unedited model answers right,
   the one whose P(o_new) − P(o_true) rises most under ROME at the model's preset. Applied to
   every embedded record (:func:`survey`, ``scripts/demo_record.py``), the rule chose
   :data:`RECORD`; within the record, the demo applies it at run time to choose the probe.
2. **Edits**: ROME and ROME+SADR, each at the model's preset; SADR's γ is the model's
   (:func:`attndrift.editing.sadr.preset`).
3. **Specificity failure**: every probe of the record before and after each edit.
4. **Attention drift** of each edit on the record's RS and DNS prompts (per-head Δ attention
   to the subject, KL), and the attention of the chosen probe's prompt under the three models
   (:func:`attndrift.plotting.attention_viewer`).
5. **Localisation** on the chosen probe: the ROME run with vanilla attention pattern rows or
   vanilla MLP outputs restored, every layer window × position, as a normalised recovery
   ``(P − P_edited) / (P_vanilla − P_edited)`` of P(o_true); and the last token's attention
   rows restored in every layer after the edited one at once.
6. **A small resumable sweep** over a few more embedded records (ROME vs ROME+SADR).

:func:`run` computes (and writes only the sweep's own results file); :func:`sentences` says
what happened in a few sentences computed from the result; :func:`sections` turns the result
into report sections (led by those sentences and one headline figure); :func:`to_json` into a
JSON-able dict. The CLI saves both.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from attndrift import capture, checks, data, encoding, metrics, models, plotting, scoring
from attndrift.analysis import drift, patching
from attndrift.editing import sadr, setting
from attndrift.editing.edits import Edit
from attndrift.experiments import report, results, summary, sweep

log = logging.getLogger(__name__)

SHOWN_KINDS = ("ES", "PS", "NS", "RS", "DNS", "RS_D")
#: the probe kinds the demo's failing probe is chosen from: distracting neighbours and relations
FAILING_KINDS = ("DNS", "RS")
#: the embedded record the demo edits: the record of :func:`choose_probe`'s probe over every
#: embedded record under ROME at SmolLM2's preset (``scripts/demo_record.py`` applies the rule)
RECORD = 34
#: the models of the probe table and the headline figure, in order
MODELS = ("unedited", "ROME", "ROME+SADR")
#: metrics resting on fewer probes are marked as too few to read
SMALL_N = 20
KIND_NAMES = {"DNS": "distracting-neighbour", "RS": "relation"}


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. The edits default to the model's presets."""

    record: int = RECORD  # the embedded record to edit
    sadr_gamma: float | None = None  # SADR's γ (None: the model's, sadr.preset)
    sweep_records: tuple[int, ...] = (19, 49)  # embedded records of the small sweep
    window: int = 1  # layers per restored window in the patching sweep
    steps: int | None = None  # value-optimisation steps of every edit (None: the presets)
    identity_cov: bool = False  # quick and crude: no C⁻¹ adjustment

    def __post_init__(self) -> None:
        checks.number("record", self.record, low=0, integer=True)
        if self.sadr_gamma is not None:
            checks.number("sadr_gamma", self.sadr_gamma, low=0, above=True)
        if not isinstance(self.sweep_records, tuple) or not self.sweep_records:
            raise ValueError(
                f"sweep_records needs at least one record id, got {self.sweep_records!r}"
            )
        for r in self.sweep_records:
            checks.number("sweep_records", r, low=0, integer=True)
        if len(set(self.sweep_records)) != len(self.sweep_records):
            raise ValueError(f"sweep_records repeats a record: {self.sweep_records}")
        checks.number("window", self.window, low=1, integer=True)
        if self.steps is not None:
            checks.number("steps", self.steps, low=1, integer=True)


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run` computed (figures are drawn from it by :func:`sections`)."""

    record: data.Record
    edits: dict[str, Edit]  # "ROME", "ROME+SADR"
    probes: pd.DataFrame  # every shown probe under every model (:func:`probe_table`)
    rises: pd.DataFrame  # the record's DNS/RS probes and their rise under ROME
    probe: data.Probe  # the failing probe the rule chose
    drifts: dict[str, drift.Drift]  # per edit, on the record's RS/DNS prompts
    views: dict[str, capture.Capture]  # the chosen probe's attention under each model
    view_tokens: tuple[str, ...]  # the chosen probe's tokens
    patches: tuple[patching.Patching, ...]  # restore sweep of the chosen probe (ROME)
    after: patching.Patching  # the last token's attention restored from a layer on, at once
    sweep_lines: list[results.Line]
    sweep_path: Path
    seconds: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The rule that chooses the fact and the probe
# --------------------------------------------------------------------------------------------


def probe_rises(table: pd.DataFrame, edited: str = "ROME") -> pd.DataFrame:
    """The DNS and RS probes of a probe table with how far the edit moved them to ``o_new``.

    For these probes ``right`` is o_true and ``wrong`` is o_new; ``rise`` is the change of
    ``P(o_new) − P(o_true)`` from the unedited model to ``edited``. ``eligible``: the unedited
    model answers the probe right (the edit is what breaks it), and for a distracting-neighbour
    probe, the edited model still answers its neighbour's own prompt (the NS probe it extends)
    right: the failure comes from the edited fact in the context, not from an edit that already
    changed the neighbour.

    Args:
        table: a probe table (:func:`probe_table`) with the record's NS, DNS and RS probes
            under ``unedited`` and ``edited``.
        edited: the edited model's name in its columns.
    """
    part = table[table["kind"].isin(FAILING_KINDS)]
    before = part["P(wrong) unedited"] - part["P(right) unedited"]
    after = part[f"P(wrong) {edited}"] - part[f"P(right) {edited}"]
    neighbours = table[table["kind"] == "NS"]
    kept = []
    for kind, prompt, record in part[["kind", "prompt", "record"]].itertuples(index=False):
        if kind != "DNS":
            kept.append(True)
            continue
        suffix = np.array([prompt.endswith(" " + p) for p in neighbours["prompt"]], dtype=bool)
        own = neighbours[(neighbours["record"] == record).to_numpy(bool) & suffix]
        if len(own) != 1:
            raise ValueError(f"no NS probe in the table for the DNS probe {prompt!r}")
        kept.append(bool(own[f"ok {edited}"].iloc[0]))
    eligible = (before < 0).to_numpy(bool) & np.asarray(kept, dtype=bool)
    return part.assign(rise=(after - before).to_numpy(float), eligible=eligible)


def choose_probe(rises: pd.DataFrame) -> pd.Series:
    """The demo's rule: among the eligible probes of :func:`probe_rises`, the one whose
    P(o_new) − P(o_true) rises most under the edit (the first of equal rises)."""
    eligible = rises[rises["eligible"]]
    if eligible.empty:
        raise ValueError(
            "no distracting-neighbour or relation probe that the unedited model answers right"
        )
    return eligible.loc[eligible["rise"].idxmax()]


def probe_table(
    model: HookedTransformer,
    probes: Sequence[data.Probe],
    variants: Sequence[tuple[str, models.Variant]],
) -> pd.DataFrame:
    """``record, kind, prompt, right, wrong`` and, per model, ``P(right) {name}``,
    ``P(wrong) {name}`` and ``ok {name}`` (P(right) > P(wrong)) of every probe."""
    table = scoring.score_probes(model, probes)[["record", "kind", "prompt", "right", "wrong"]]
    table = table.copy()
    for name, variant in variants:
        scored = scoring.score_probes(model, probes, fwd_hooks=variant.hooks)
        table[f"P(right) {name}"] = scored["p_right"].to_numpy()
        table[f"P(wrong) {name}"] = scored["p_wrong"].to_numpy()
        table[f"ok {name}"] = scored["success"].to_numpy()
    return table


def survey(
    model: HookedTransformer, records: Sequence[data.Record], progress: bool = False
) -> pd.DataFrame:
    """:func:`probe_rises` of every record under ROME at the model's preset: the table the
    demo's record is chosen from (the record of :func:`choose_probe` over all of them).

    One ROME edit per record: minutes on the embedded dataset (``scripts/demo_record.py``).
    """
    editor = setting.Editor(model)
    parts = []
    for record in tqdm(records, desc="ROME per record", disable=not progress):
        edit = editor(setting.Setting("rome"), [record.request])
        variants = [
            ("unedited", models.Variant(model)),
            ("ROME", models.Variant(model, edit.hooks(model), name="ROME")),
        ]
        probes = record.probes(("NS", *FAILING_KINDS))
        parts.append(probe_rises(probe_table(model, probes, variants)))
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(
    model: HookedTransformer, cfg: DemoConfig, sweep_out: Path, progress: bool = True
) -> DemoResult:
    """Run the demo on ``model`` (the embedded dataset); the sweep appends to ``sweep_out``."""
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    dataset = data.load_embedded()
    record = dataset.by_id(cfg.record)
    gamma = cfg.sadr_gamma if cfg.sadr_gamma is not None else sadr.preset(model).gamma
    quick = {"steps": cfg.steps, "identity_cov": cfg.identity_cov}
    settings = {
        "ROME": setting.Setting("rome", **quick),
        "ROME+SADR": setting.Setting("rome", gamma, **quick),
    }
    editor = setting.Editor(model, progress=progress)
    edits = {name: editor(s, [record.request]) for name, s in settings.items()}
    variants = {
        "unedited": models.Variant(model, name="unedited"),
        **{n: models.Variant(model, e.hooks(model), name=n) for n, e in edits.items()},
    }
    seconds["edits"] = time.perf_counter() - t

    t = time.perf_counter()
    shown = [p for k in SHOWN_KINDS for p in record.probes([k])]
    table = probe_table(model, shown, list(variants.items()))
    rises = probe_rises(table)
    probe = _probe(record, choose_probe(rises))
    seconds["probes"] = time.perf_counter() - t

    t = time.perf_counter()
    drift_probes = [p for p in record.probes(FAILING_KINDS) if p.subject in p.prompt]
    prompts, subjects = [p.prompt for p in drift_probes], [p.subject for p in drift_probes]
    reference = drift.reference(model, prompts, subjects)
    drifts = {
        n: drift.measure(model, variants[n], prompts, subjects, vanilla_captures=reference)
        for n in edits
    }
    batch = encoding.encode_batch(model, [probe.prompt], [probe.subject])
    views = {n: capture.run(v, batch) for n, v in variants.items()}
    tokens = tuple(encoding.token_strings(model, batch.tokens[0].tolist()))
    seconds["drift"] = time.perf_counter() - t

    t = time.perf_counter()
    answers = drift.answers(probe)
    patches = (
        patching.restore(
            model, variants["ROME"], probe.prompt, *answers, window=cfg.window, progress=progress
        ),
    )
    # the last token's attention rows restored in every layer from a start to the last layer
    n_layers, last = model.cfg.n_layers, len(tokens) - 1
    after = patching.restore(
        model, variants["ROME"], probe.prompt, *answers,
        components=("attn",), window=n_layers, positions=[last],
    )  # fmt: skip
    seconds["patching"] = time.perf_counter() - t

    t = time.perf_counter()
    others = dataset.select(ids=list(cfg.sweep_records))
    path = sweep.run(model, others, list(settings.values()), sweep_out, progress=progress)
    lines = results.load([path])
    seconds["sweep"] = time.perf_counter() - t
    return DemoResult(
        record=record,
        edits=edits,
        probes=table,
        rises=rises,
        probe=probe,
        drifts=drifts,
        views=views,
        view_tokens=tokens,
        patches=patches,
        after=after,
        sweep_lines=lines,
        sweep_path=path,
        seconds=seconds,
    )


def _probe(record: data.Record, row: pd.Series) -> data.Probe:
    """The record's probe of a probe-table row."""
    return next(
        p
        for p in record.probes([row["kind"]])
        if (p.prompt, p.right) == (row["prompt"], row["right"])
    )


# --------------------------------------------------------------------------------------------
# What happened, in numbers and in sentences
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Findings:
    """The numbers the report's opening sentences state (computed by :func:`findings`)."""

    kind: str  # the chosen probe's kind (DNS or RS)
    n: int  # the record's probes of that kind
    wrong: dict[str, int]  # per model: how many of them answer o_new (P(o_new) > P(o_true))
    paraphrases: int  # the record's paraphrase (PS) probes
    kept: dict[str, int]  # per edit: how many paraphrases answer o_new
    p_vanilla: float  # the chosen probe's first-token P(right answer), unedited
    p_edited: float  # … under ROME
    attention: float  # recovery when the last token's attention is restored after the edit
    attention_layers: tuple[int, int]  # … in these layers (first, last)
    best_mlp: patching.Cell  # the MLP cell that restores most
    best_mlp_recovery: float
    factor: dict[str, float]  # per edit: the largest drift factor on the record's prompts


def findings(result: DemoResult) -> Findings:
    """The numbers behind :func:`sentences`."""
    table, kind = result.probes, result.probe.kind
    part = table[table["kind"] == kind]
    wrong = {m: int((~part[f"ok {m}"].astype(bool)).sum()) for m in MODELS}
    ps = table[table["kind"] == "PS"]
    kept = {m: int(ps[f"ok {m}"].astype(bool).sum()) for m in MODELS[1:]}
    r = result.patches[0]
    mlp = r.components.index("mlp")
    cell = r.best("mlp")
    first = result.edits["ROME"].layers[-1] + 1  # the first layer the edit's output reaches
    n_layers = result.after.p_true.shape[1]
    start = min(first, n_layers - 1)
    return Findings(
        kind=kind,
        n=len(part),
        wrong=wrong,
        paraphrases=len(ps),
        kept=kept,
        p_vanilla=r.source.p_true,
        p_edited=r.target.p_true,
        attention=float(result.after.recovery[0, start, 0]),
        attention_layers=(start, n_layers - 1),
        best_mlp=cell,
        best_mlp_recovery=float(r.recovery[mlp, cell.layer, r.positions.index(cell.position)]),
        factor={n: float(d.factor().max()) for n, d in result.drifts.items()},
    )


def _percent(x: float) -> str:
    """A recovery in %, rounded to whole points ("—" when undefined)."""
    return "—" if not np.isfinite(x) else f"{round(100 * x) + 0:d} %"


def sentences(result: DemoResult) -> list[str]:
    """What happened, in four sentences computed from the run."""
    f, r = findings(result), result.record.request
    kinds = f"{KIND_NAMES[f.kind]} prompts"
    p_new = f"P({r.target_new!r}) > P({r.target_true!r})"
    gamma = result.edits["ROME+SADR"].run.sadr.gamma
    r0 = result.patches[0]
    token = r0.tokens[f.best_mlp.position]
    a, b = f.attention_layers
    span = f"layer {a}" if a == b else f"layers {a}–{b}"
    return [
        f"ROME rewrites {r.subject!r}: {r.target_true!r} → {r.target_new!r} at layer "
        f"{result.edits['ROME'].layers[0]}; afterwards {f.wrong['ROME']} of the record's "
        f"{f.n} {kinds} answer {r.target_new!r} ({p_new}), against "
        f"{f.wrong['unedited']} of {f.n} before the edit.",
        f"On the one ROME breaks most, {result.probe.prompt!r}, P({result.probe.right!r}) falls "
        f"from "
        f"{f.p_vanilla:.3f} to {f.p_edited:.3f}; restoring the vanilla attention pattern rows "
        f"of the last token in {span} (every layer after the edited one) recovers "
        f"{_percent(f.attention)} of that fall, and the best single MLP output (layer "
        f"{f.best_mlp.layer}, token {token!r}) {_percent(f.best_mlp_recovery)}.",
        f"ROME+SADR (γ = {gamma:g}) leaves {f.wrong['ROME+SADR']} of the {f.n} {kinds} "
        f"answering {r.target_new!r} (ROME: {f.wrong['ROME']}); the largest increase of "
        f"attention to the subject on the record's prompts is {f.factor['ROME+SADR']:.2f} "
        f"under ROME+SADR and {f.factor['ROME']:.2f} under ROME.",
        f"Paraphrases that answer {r.target_new!r}: {f.kept['ROME+SADR']} of "
        f"{f.paraphrases} under ROME+SADR, {f.kept['ROME']} of {f.paraphrases} under ROME.",
    ]


# --------------------------------------------------------------------------------------------
# Report sections
# --------------------------------------------------------------------------------------------


def _setting_label(key: str, lines: list[results.Line]) -> str:
    """``"ROME"``, ``"ROME+SADR γ=…"``, with the remaining options of the key in brackets."""
    if key == "none":
        return "unedited"
    s = next(x.setting for x in lines if x.setting.key == key)
    name = s.editor.upper() if s.sadr_gamma == 0 else f"{s.editor.upper()}+SADR γ={s.sadr_gamma:g}"
    rest = [p for p in key.split("|")[2:] if p]
    return f"{name} ({', '.join(rest)})" if rest else name


def _sweep_summaries(lines: list[results.Line]) -> dict[str, metrics.Summary]:
    return {_setting_label(k, lines): v for k, v in summary.by_setting(lines).items()}


def _sweep_table(lines: list[results.Line]) -> pd.DataFrame:
    """The small sweep's metrics per setting, with 95 % Wilson intervals and probe counts."""
    return metrics.table(_sweep_summaries(lines), interval="wilson")


def _sweep_small_n(lines: list[results.Line]) -> pd.DataFrame:
    """True where a cell of :func:`_sweep_table` rests on some but fewer than :data:`SMALL_N`
    probes (the Score: where any of its metrics does)."""
    frame = _sweep_table(lines)
    small = pd.DataFrame(False, index=frame.index, columns=frame.columns)
    for name, s in _sweep_summaries(lines).items():
        for k in frame.columns:
            if k in s.metrics:
                small.loc[name, k] = 0 < s.metrics[k].n < SMALL_N
        if "Score" in frame.columns:
            small.loc[name, "Score"] = any(s.metrics[k].n < SMALL_N for k in s.score_kinds)
    return small


def _probe_table(probes: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The probe table as shown (full prompts, ``P(right) / P(wrong)`` per model) and the
    mask of its failed cells (P(right) ≤ P(wrong))."""
    names = [m for m in MODELS if f"P(right) {m}" in probes.columns]
    group = "P(right) / P(wrong)"
    shown = pd.DataFrame(
        {
            ("", "probe"): probes["kind"].to_numpy(),
            ("", "prompt"): probes["prompt"].to_numpy(),
            ("", "right"): probes["right"].to_numpy(),
            ("", "wrong"): probes["wrong"].to_numpy(),
        }
    )
    fails = {}
    for m in names:
        shown[(group, m)] = [
            f"{r:.3f} / {w:.3f}"
            for r, w in zip(probes[f"P(right) {m}"], probes[f"P(wrong) {m}"], strict=True)
        ]
        fails[(group, m)] = ~probes[f"ok {m}"].to_numpy(bool)
    shown.columns = pd.MultiIndex.from_tuples(shown.columns)
    failed = pd.DataFrame(fails, index=shown.index)
    failed.columns = pd.MultiIndex.from_tuples(failed.columns)
    return shown, failed


def _model_name(result: DemoResult) -> str:
    return result.edits["ROME"].model_name or "the model"


def _headline(result: DemoResult) -> report.Figure:
    """P(o_true) and P(o_new) on the record's probes of the chosen kind, per model."""
    probes, kind = result.probes, result.probe.kind
    part = probes[probes["kind"] == kind]
    names = [m for m in MODELS if f"P(right) {m}" in probes.columns]
    # DNS and RS probes: right = o_true, wrong = o_new
    p_true = {m: part[f"P(right) {m}"].to_numpy(float) for m in names}
    p_new = {m: part[f"P(wrong) {m}"].to_numpy(float) for m in names}
    fig = plotting.headline(p_true, p_new, prompts=list(part["prompt"]))
    r = result.record.request
    means = ", ".join(f"{p_new[m].mean():.3f} {m}" for m in names)
    if kind == "DNS":
        what = (
            f"P(o_true = {r.target_true!r}, blue) and P(o_new = {r.target_new!r}, red) on the "
            f"{len(part)} distracting-neighbour prompts of record {result.record.id} (a "
            f"question about another subject, whose answer stays {r.target_true!r}, asked "
            f"right after the edited fact stated with {r.target_new!r})"
        )
    else:  # relation prompts (right: the relation's answer)
        what = (
            f"P(right answer, blue) and P(o_new = {r.target_new!r}, red) on the {len(part)} "
            f"relation prompts of record {result.record.id} (other questions about "
            f"{r.subject!r}, whose answers the edit should keep)"
        )
    caption = (
        f"{what}, under the unedited {_model_name(result)}, ROME and ROME+SADR: dots are "
        f"single prompts, dashes their means; mean P(o_new): {means}."
    )
    return report.Figure(fig, caption)


def _drift_table(result: DemoResult) -> pd.DataFrame:
    rows = []
    for name, d in result.drifts.items():
        factor = d.factor()
        per_layer = d.factor_per_layer().mean(0)
        rows.append(
            {
                "edit": name,
                "mean drift factor": float(factor.mean()),
                "max drift factor": float(factor.max()),
                "layer of largest mean drift": d.layers[int(per_layer.argmax())],
                "mean KL (all heads, nats)": float(d.kl.mean()),
            }
        )
    return pd.DataFrame(rows).set_index("edit").round(3)


def sections(result: DemoResult) -> list[report.Section]:
    """Report sections of a demo result."""
    return [
        report.Section("What happened", sentences(result), figures=[_headline(result)]),
        _edit_section(result),
        _failure_section(result),
        _drift_section(result),
        _patch_section(result),
        _sweep_section(result),
    ]


def _edit_section(result: DemoResult) -> report.Section:
    r = result.record.request
    e_rome, e_sadr = result.edits["ROME"], result.edits["ROME+SADR"]
    covariance = (
        "identity covariance (quick and crude: no C⁻¹ adjustment)"
        if e_rome.run.config.covariance is None
        else "covariance from the preset's corpus"
    )
    rule = (
        "The fact and the probe are chosen by a written rule: among the distracting-neighbour "
        "and relation probes that the unedited model answers right (a distracting-neighbour "
        "probe only where ROME keeps its neighbour's own prompt right, so that the failure "
        "comes from the edited fact in the context), the one whose P(o_new) − P(o_true) rises "
        "most under ROME at the model's preset. "
        f"Over every embedded record the rule chose record {RECORD}; within the edited "
        "record it chooses the probe (table below)."
    )
    return report.Section(
        "1. The fact, the probe and the edits",
        [
            rule,
            f"Record {result.record.id} of the embedded dataset: {r.subject!r}, "
            f"{r.prompt!r}: {r.target_true!r} → {r.target_new!r}. The probe: "
            f"{result.probe.prompt!r} ({KIND_NAMES[result.probe.kind]}, right answer "
            f"{result.probe.right!r}).",
            f"ROME at layer {e_rome.layers[0]} ({e_rome.run.steps_run} optimisation steps, "
            f"{e_rome.run.seconds:.0f} s) and ROME+SADR (γ = {e_sadr.run.sadr.gamma:g}, "
            f"{e_sadr.run.steps_run} steps of at most {_budget(e_sadr)}, "
            f"{e_sadr.run.seconds:.0f} s); {covariance}.",
        ],
        tables=[report.table(_rises_table(result), wrap=["prompt"])],
        notes=[
            "rise: the change of P(o_new) − P(o_true) from the unedited model to ROME; "
            "chosen: the probe the rule picks."
        ],
    )


def _budget(edit: Edit) -> int:
    cfg = edit.run.config
    return cfg.sadr_steps or cfg.value.steps


def _rises_table(result: DemoResult) -> pd.DataFrame:
    rises = result.rises
    chosen = (rises["prompt"] == result.probe.prompt) & (rises["kind"] == result.probe.kind)
    return pd.DataFrame(
        {
            "probe": rises["kind"].to_numpy(),
            "prompt": rises["prompt"].to_numpy(),
            "o_true": rises["right"].to_numpy(),
            "o_new": rises["wrong"].to_numpy(),
            "P(o_new) − P(o_true), unedited": (
                rises["P(wrong) unedited"] - rises["P(right) unedited"]
            ).to_numpy(),
            "… under ROME": (rises["P(wrong) ROME"] - rises["P(right) ROME"]).to_numpy(),
            "rise": rises["rise"].to_numpy(),
            "chosen": chosen.to_numpy(bool),
        }
    )


def _failure_section(result: DemoResult) -> report.Section:
    probes, failed = _probe_table(result.probes)
    return report.Section(
        "2. Specificity failure",
        [
            "P(right) and P(wrong) of each probe under each model; a probe succeeds when "
            "P(right) > P(wrong). Efficacy (ES) and paraphrase (PS) probes should flip to "
            "the new object; neighbour (NS), relation (RS) and distracted probes (DNS, "
            "RS_D: the same prompts after the edited fact) should keep their answers."
        ],
        tables=[report.table(probes, failed, wrap=[("", "prompt")], group=("", "probe"))],
        notes=[
            "✗ on red: the probe fails under that model (P(right) ≤ P(wrong)). The "
            "unedited model fails ES and PS by design: it does not know the new fact yet."
        ],
    )


def _drift_section(result: DemoResult) -> report.Section:
    figures = []
    model = _model_name(result)
    if result.drifts:
        zmax = plotting.common_zmax(list(result.drifts.values()))
        n_drift = len(next(iter(result.drifts.values())).prompts)
        figures.append(
            report.Figure(
                plotting.drift_heatmaps(result.drifts, zmax=zmax).update_layout(
                    title_text="", margin={"t": 40}, height=420
                ),
                f"Δ attention (edited − vanilla) from the last token to the subject's last "
                f"token, per layer and head of {model}, mean over {n_drift} relation and "
                f"distracting-neighbour prompts, for each edit on one colour scale (±{zmax:.3f}): "
                "orange = more attention to the subject after the edit, purple = less.",
            )
        )
    viewer = plotting.attention_viewer(
        result.views,
        result.view_tokens,
        title=f"attention of the last token of the chosen probe · {model}",
    )
    figures.append(
        report.Figure(
            viewer,
            f"The attention pattern row of the last token of {result.probe.prompt!r} over its "
            f"tokens, under the unedited model (grey), ROME (orange) and ROME+SADR (teal); the "
            "subject's tokens are shaded. Choose the layer with the slider and the head in the "
            "menu; it opens at the head whose attention to the subject's last token grew most "
            "under ROME.",
        )
    )
    return report.Section(
        "3. Attention drift",
        [
            "Per layer and head: the change of attention from the last token to the "
            "subject's last token (edited − vanilla), averaged over the record's relation "
            "and distracting-neighbour prompts. The drift factor of a prompt is the "
            "largest such change over heads and layers."
        ],
        tables=[report.table(_drift_table(result))],
        figures=figures,
    )


def _patch_section(result: DemoResult) -> report.Section:
    r = result.patches[0]
    f = findings(result)
    a, b = f.attention_layers
    figure = report.Figure(
        plotting.patching_heatmap(result.patches, "recovery").update_layout(height=520),
        f"Recovery of P({r.target_true!r}) in the ROME-edited run of {r.prompt!r} when one "
        f"component is restored to its vanilla value: the attention pattern rows of all heads "
        f"at one token (left) or the MLP output at one token (right), in a window of "
        f"{r.window} layer{'s' if r.window > 1 else ''} starting at each layer. Recovery = "
        "(P − P_edited) / (P_vanilla − P_edited): 0 = the edited run (P_edited = "
        f"{r.target.p_true:.4f}), 1 = the vanilla run (P_vanilla = {r.source.p_true:.4f}); "
        "blue restores the true answer, red pushes further towards the new one.",
    )
    return report.Section(
        "4. Localising the failure (ROME edit)",
        [
            f"Prompt {r.prompt!r}: the ROME-edited model runs with one component replaced by "
            "the vanilla model's value at one layer window and position.",
            f"Restoring the last token's attention pattern rows in layers {a}–{b} at once "
            f"recovers {_percent(f.attention)} of the fall of P({r.target_true!r}).",
        ],
        tables=[report.table(_best_patches(result.patches))],
        figures=[figure],
    )


def _sweep_section(result: DemoResult) -> report.Section:
    lines = result.sweep_lines
    n_records = len({x.record for x in lines})
    paragraphs = [
        f"{n_records} more record{'s' if n_records != 1 else ''} of the embedded dataset, "
        f"ROME vs ROME+SADR; results in {result.sweep_path}."
    ]
    counts = [m.n for x in _sweep_summaries(lines).values() for m in x.metrics.values()]
    if max(counts, default=0) < SMALL_N:
        paragraphs.append(
            f"Too few probes to read: every number here rests on fewer than {SMALL_N} probes "
            f"({n_records} record{'s' if n_records != 1 else ''}), so this table shows that "
            "the sweep runs, not how the editors compare; attndrift sweep on more records "
            "gives numbers to compare."
        )
    table, small = _sweep_table(lines), _sweep_small_n(lines)
    return report.Section(
        "5. Small sweep",
        paragraphs,
        # metrics as rows: the Wilson cells are wide
        tables=[report.table(table.T.rename_axis("metric"), uncertain=small.T)],
        notes=[
            "Each cell: % of probes with P(right) > P(wrong) [95 % Wilson score interval] "
            "(n = number of probes). Score: harmonic mean of ES, PS, NS, RS and DNS.",
            f"† fewer than {SMALL_N} probes: too few to read (the interval is tens of points "
            "wide).",
        ],
    )


def _best_patches(results: tuple[patching.Patching, ...]) -> pd.DataFrame:
    """The restoring cell of each component with the largest recovery."""
    frame = patching.frame(results)
    frame["component"] = frame["component"].map(lambda c: plotting.COMPONENT_NAMES.get(c, c))
    best = frame.groupby("component", sort=False)["recovery"].idxmax()
    cols = ["component", "layer", "position", "token", "p_true", "p_new", "recovery"]
    return frame.loc[best, cols].set_index("component").round(4)


def to_json(result: DemoResult) -> dict:
    """JSON-able summary: the edit, the probe, probe outcomes, drift, patches, sweep metrics."""
    sweep_rows = {k: v.row() for k, v in summary.by_setting(result.sweep_lines).items()}
    f = findings(result)
    return {
        "record": result.record.id,
        "request": result.record.request.__dict__,
        "probe": asdict(result.probe),
        "sentences": sentences(result),
        "findings": asdict(f) | {"best_mlp": f.best_mlp._asdict()},
        "edits": {
            n: {
                "editor": e.editor,
                "layers": list(e.layers),
                "seconds": e.run.seconds,
                "steps_run": e.run.steps_run,
                "sadr_gamma": None if e.run.sadr is None else e.run.sadr.gamma,
                "final": asdict(e.run.final),
            }
            for n, e in result.edits.items()
        },
        "probes": result.probes.to_dict(orient="records"),
        "drift": _drift_table(result).reset_index().to_dict(orient="records"),
        "best_patches": _best_patches(result.patches).reset_index().to_dict(orient="records"),
        "sweep": {
            k: {m: (None if v != v else v) for m, v in row.items()} for k, row in sweep_rows.items()
        },
        "seconds": result.seconds,
    }
