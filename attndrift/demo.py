"""Demo: the main job on the embedded model — one fact from failure to mitigation.

1. Edit one fact of the embedded dataset with ROME and with ROME+SADR.
2. Specificity failure: the record's probes (efficacy, neighbour, relation, distracting
   neighbour, distracted relation) before and after each edit.
3. Attention drift of each edit on the record's relation and distracting-neighbour prompts:
   per-head Δ attention to the subject, KL, the most drifting heads' attention rows.
4. Restoring patches: vanilla attention rows vs vanilla MLP outputs put into the ROME-edited
   run of a distracting-neighbour prompt, every layer window × position.
5. A small resumable sweep over a few more embedded records (ROME vs ROME+SADR).

:func:`run` computes (and writes only the sweep's own results file); :func:`sections` turns the
result into report sections, led by one headline figure (P(o_true) and P(o_new) on the
distracting-neighbour prompts per model); :func:`to_json` into a JSON-able dict. The CLI saves
both.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from attndrift import (
    capture,
    checks,
    data,
    drift,
    encoding,
    metrics,
    models,
    patching,
    plotting,
    report,
    results,
    scoring,
    setting,
    summary,
    sweep,
)
from attndrift.edits import Edit

log = logging.getLogger(__name__)

SHOWN_KINDS = ("ES", "PS", "NS", "RS", "DNS", "RS_D")
#: the embedded record the demo edits, chosen by the rule of :func:`choose_probe` over every
#: embedded record (``scripts/demo_record.py`` applies it)
RECORD = 0


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. The step counts default to the presets; ``sadr_gamma`` is the γ
    selected for SmolLM2 on dev records 1000-1007 (docs/RESULTS.md; the paper's GPT-J γ was
    0.01, which restrains SmolLM2's drift too little)."""

    record: int = 0
    sadr_gamma: float = 0.2
    sweep_records: tuple[int, ...] = (19, 49)
    window: int = 1
    heads: int = 4
    steps: int | None = None  # value-optimisation steps of every edit (None: the presets)
    identity_cov: bool = False  # quick and crude: no C⁻¹ adjustment

    def __post_init__(self) -> None:
        checks.number("record", self.record, low=0, integer=True)
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
        checks.number("heads", self.heads, low=1, integer=True)
        if self.steps is not None:
            checks.number("steps", self.steps, low=1, integer=True)


@dataclass(frozen=True)
class DemoResult:
    record: data.Record
    edits: dict[str, Edit]
    probes: pd.DataFrame
    drifts: dict[str, drift.Drift]
    attention: dict[str, go.Figure]
    patches: tuple[patching.Patching, ...]
    patch_prompt: str
    sweep_lines: list[results.Line]
    sweep_path: Path
    seconds: dict[str, float] = field(default_factory=dict)
    #: per edit, the prompt of its largest drift factor (the one of its ``attention`` figure)
    attention_prompts: dict[str, str] = field(default_factory=dict)


def run(
    model: HookedTransformer, cfg: DemoConfig, sweep_out: Path, progress: bool = True
) -> DemoResult:
    """Run the demo on ``model`` (the embedded dataset); the sweep appends to ``sweep_out``."""
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    dataset = data.load_embedded()
    record = dataset.by_id(cfg.record)
    quick = {"steps": cfg.steps, "identity_cov": cfg.identity_cov}
    settings = {
        "ROME": setting.Setting("rome", **quick),
        "ROME+SADR": setting.Setting("rome", cfg.sadr_gamma, **quick),
    }
    editor = setting.Editor(model, progress=progress)
    edits = {name: editor(s, [record.request]) for name, s in settings.items()}
    seconds["edits"] = time.perf_counter() - t
    for name, e in edits.items():
        seconds[f"edit {name}"] = e.run.seconds

    t = time.perf_counter()
    probes = [p for k in SHOWN_KINDS for p in record.probes([k])]
    table = scoring.score_probes(model, probes)[["kind", "prompt", "right", "wrong"]].copy()
    for name, variant in [("unedited", models.Variant(model)), *_variants(model, edits)]:
        scored = scoring.score_probes(model, probes, fwd_hooks=variant.hooks)
        table[f"P(right) {name}"] = scored["p_right"].to_numpy()
        table[f"P(wrong) {name}"] = scored["p_wrong"].to_numpy()
        table[f"ok {name}"] = scored["success"].to_numpy()
    seconds["probes"] = time.perf_counter() - t

    t = time.perf_counter()
    drift_probes = [p for p in record.probes(("RS", "DNS")) if p.subject in p.prompt]
    prompts, subjects = [p.prompt for p in drift_probes], [p.subject for p in drift_probes]
    drifts, attention, attention_prompts = {}, {}, {}
    for name, variant in _variants(model, edits):
        d = drift.measure(model, variant, prompts, subjects)
        drifts[name] = d
        worst = int(d.factor().argmax())
        heads = drift.top_heads(d, worst, cfg.heads)
        batch = encoding.encode_batch(model, [prompts[worst]], [subjects[worst]])
        pair = capture.pair(model, variant, batch, layers=sorted({h[0] for h in heads}))
        tokens = encoding.token_strings(model, batch.tokens[0].tolist())
        fig = plotting.attention_rows(pair, tokens, heads)
        fig.update_layout(title=f"{name}: most drifting heads on {prompts[worst]!r}")
        attention[name] = fig
        attention_prompts[name] = prompts[worst]
    seconds["drift"] = time.perf_counter() - t

    t = time.perf_counter()
    dns = record.probes(["DNS"]) or record.probes(["RS"])
    patch_probe = dns[0]
    rome_variant = dict(_variants(model, edits))["ROME"]
    patches = (
        patching.restore(
            model,
            rome_variant,
            patch_probe.prompt,
            *drift.answers(patch_probe),
            window=cfg.window,
            progress=progress,
        ),
    )
    seconds["patching"] = time.perf_counter() - t

    t = time.perf_counter()
    others = dataset.select(ids=list(cfg.sweep_records))
    path = sweep.run(model, others, list(settings.values()), sweep_out, progress=progress)
    lines = results.load([path])
    seconds["sweep"] = time.perf_counter() - t
    return DemoResult(
        record,
        edits,
        table,
        drifts,
        attention,
        patches,
        patch_probe.prompt,
        lines,
        path,
        seconds,
        attention_prompts,
    )


#: the probe kinds the demo's failing probe is chosen from: distracting neighbours and relations
FAILING_KINDS = ("DNS", "RS")


def probe_rises(table: pd.DataFrame, edited: str = "ROME") -> pd.DataFrame:
    """The DNS and RS probes of a probe table with how far the edit moved them to ``o_new``.

    For these probes ``right`` is o_true and ``wrong`` is o_new; ``rise`` is the change of
    ``P(o_new) − P(o_true)`` from the unedited model to ``edited``. ``eligible``: the unedited
    model answers the probe right, so that the edit is what breaks it.

    Args:
        table: a probe table with ``kind``, ``prompt``, ``right``, ``wrong`` and the columns
            ``P(right) {model}`` and ``P(wrong) {model}`` of ``unedited`` and ``edited``.
        edited: the edited model's name in those columns.
    """
    part = table[table["kind"].isin(FAILING_KINDS)]
    before = part["P(wrong) unedited"] - part["P(right) unedited"]
    after = part[f"P(wrong) {edited}"] - part[f"P(right) {edited}"]
    return part.assign(rise=(after - before).to_numpy(float), eligible=(before < 0).to_numpy(bool))


def choose_probe(rises: pd.DataFrame) -> pd.Series:
    """The demo's rule: among the eligible probes of :func:`probe_rises`, the one whose
    P(o_new) − P(o_true) rises most under the edit (the first of equal rises)."""
    eligible = rises[rises["eligible"]]
    if eligible.empty:
        raise ValueError("no distracting-neighbour or relation probe that the unedited model "
                         "answers right")  # fmt: skip
    return eligible.loc[eligible["rise"].idxmax()]


def probe_table(
    model: HookedTransformer,
    probes: Sequence[data.Probe],
    variants: Sequence[tuple[str, models.Variant]],
) -> pd.DataFrame:
    """``kind, prompt, right, wrong`` and, per model, ``P(right) {name}``, ``P(wrong) {name}``
    and ``ok {name}`` (P(right) > P(wrong)) of every probe."""
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
        parts.append(probe_rises(probe_table(model, record.probes(FAILING_KINDS), variants)))
    return pd.concat(parts, ignore_index=True)


def _variants(model, edits):
    return [(name, models.Variant(model, e.hooks(model), name=name)) for name, e in edits.items()]


#: metrics resting on fewer probes are marked as too few to read
SMALL_N = 20
#: the models of the probe table and the headline figure, in order
MODELS = ("unedited", "ROME", "ROME+SADR")


def _setting_label(key: str, lines: list[results.Line]) -> str:
    """``"ROME"``, ``"ROME+SADR γ=0.2"``, with the remaining options of the key in brackets."""
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


def _headline(result: DemoResult) -> report.Figure:
    """P(o_true) and P(o_new) on the record's distracting-neighbour probes, per model."""
    probes = result.probes
    kind = "DNS" if (probes["kind"] == "DNS").any() else "RS"
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
    else:  # a record without neighbours: its relation prompts (right: the relation's answer)
        what = (
            f"P(right answer, blue) and P(o_new = {r.target_new!r}, red) on the {len(part)} "
            f"relation prompts of record {result.record.id} (other questions about "
            f"{r.subject!r}, whose answers the edit should keep)"
        )
    caption = (
        f"{what}, per model: dots are single prompts, dashes their means; mean P(o_new): {means}."
    )
    return report.Figure(_paper(fig), caption)


def _paper(fig: go.Figure) -> go.Figure:
    """The report's figure style: white background, readable font."""
    return fig.update_layout(template="plotly_white", font={"size": 13})


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
                "mean KL (all heads)": float(d.kl.mean()),
            }
        )
    return pd.DataFrame(rows).set_index("edit")


def sections(result: DemoResult) -> list[report.Section]:
    """Report sections of a demo result."""
    return [
        report.Section("At a glance", figures=[_headline(result)]),
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
    return report.Section(
        "1. The edit",
        [
            f"Record {result.record.id} of the embedded dataset: {r.subject!r}, "
            f"{r.prompt!r}: {r.target_true!r} → {r.target_new!r}.",
            f"ROME at layer {e_rome.layers[0]} ({e_rome.run.steps_run} steps, "
            f"{e_rome.run.seconds:.0f} s) and ROME+SADR "
            f"(γ = {e_sadr.run.sadr.gamma}, {e_sadr.run.steps_run} steps, "
            f"{e_sadr.run.seconds:.0f} s); {covariance}.",
        ],
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
    if result.drifts:
        zmax = plotting.common_zmax(list(result.drifts.values()))
        n_drift = len(next(iter(result.drifts.values())).prompts)
        figures.append(
            report.Figure(
                _paper(plotting.drift_heatmaps(result.drifts, zmax=zmax)).update_layout(
                    title_text="", margin={"t": 40}, height=420
                ),
                f"Δ attention (edited − vanilla) from the last token to the subject's last "
                f"token, per layer and head, mean over {n_drift} prompts, for each edit on one "
                f"colour scale (±{zmax:.3f}): red = more attention to the subject after the "
                "edit.",
            )
        )
    for name, fig in result.attention.items():
        heads = len(fig.layout.annotations)  # one subplot title per head
        prompt = result.attention_prompts.get(name)
        on = f"{prompt!r} (the prompt with the largest drift factor)" if prompt else "a prompt"
        figures.append(
            report.Figure(
                _paper(go.Figure(fig)).update_layout(
                    title_text="", height=130 * max(heads, 1) + 100, margin={"t": 50}
                ),
                f"{name}: attention of the last token over the tokens of {on}, vanilla (blue) "
                "vs edited (red), in the heads whose attention to the subject's last token "
                "grew most.",
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
    figure = report.Figure(
        _paper(plotting.patching_heatmap(result.patches, "p_true")).update_layout(
            title_text="", margin={"t": 50}
        ),
        "P(o_true) of the ROME-edited model with the attention output (left) or the MLP "
        "output (right) of one layer window at one token restored to its vanilla value; "
        "bright cells restore the true answer.",
    )
    return report.Section(
        "4. Restoring patches (ROME edit)",
        [
            f"Prompt {result.patch_prompt!r}: the ROME-edited model runs with one "
            "component replaced by the vanilla model's value at one layer window and "
            "position. P(o_true) after patching (higher = restored)."
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
    frame = patching.frame(results)
    base = frame.groupby("component")["p_true"].idxmax()
    cols = ["component", "layer", "position", "token", "p_true", "p_new", "recovery"]
    return frame.loc[base, [c for c in cols if c in frame.columns]].set_index("component")


def to_json(result: DemoResult) -> dict:
    """JSON-able summary: the edit, probe outcomes, drift, best patches, sweep metrics."""
    sweep_rows = {k: v.row() for k, v in summary.by_setting(result.sweep_lines).items()}
    return {
        "record": result.record.id,
        "request": result.record.request.__dict__,
        "edits": {
            n: {
                "editor": e.editor,
                "layers": list(e.layers),
                "seconds": e.run.seconds,
                "steps_run": e.run.steps_run,
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
