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
result into report sections; :func:`to_json` into a JSON-able dict. The CLI saves both.
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from transformer_lens import HookedTransformer

from attndrift import (
    capture,
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
from attndrift.edit import Edit

log = logging.getLogger(__name__)

SHOWN_KINDS = ("ES", "PS", "NS", "RS", "DNS", "RS_D")


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
        seconds[f"edit {name}"] = e.info["seconds"]

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
    drifts, attention = {}, {}
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
        record, edits, table, drifts, attention, patches, patch_probe.prompt, lines, path, seconds
    )


def _variants(model, edits):
    return [(name, models.Variant(model, e.hooks(model), name=name)) for name, e in edits.items()]


def _sweep_table(lines: list[results.Line]) -> pd.DataFrame:
    summaries = summary.by_setting(lines)
    names = {"none": "unedited", "rome|g=0": "ROME"}
    rows = {names.get(k, k.replace("rome|g=", "ROME+SADR γ=")): v for k, v in summaries.items()}
    return metrics.table(rows)


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
    r = result.record.request
    e_rome, e_sadr = result.edits["ROME"], result.edits["ROME+SADR"]
    probes = result.probes.copy()
    probes["prompt"] = probes["prompt"].str.slice(-80)
    out = [
        report.Section(
            "1. The edit",
            [
                f"Record {result.record.id} of the embedded dataset: {r.subject!r}, "
                f"{r.prompt!r}: {r.target_true!r} → {r.target_new!r}.",
                f"ROME at layer {e_rome.layers[0]} ({e_rome.info['steps_run']} steps, "
                f"{e_rome.info['seconds']:.0f} s) and ROME+SADR "
                f"(γ = {e_sadr.info['sadr']['gamma']}, {e_sadr.info['steps_run']} steps, "
                f"{e_sadr.info['seconds']:.0f} s); covariance from the preset's corpus.",
            ],
        ),
        report.Section(
            "2. Specificity failure",
            [
                "P(right) and P(wrong) of each probe (a probe succeeds when P(right) > "
                "P(wrong)). Efficacy (ES) should flip to the new object; neighbour (NS), "
                "relation (RS) and distracted probes (DNS, RS_D) should keep their answers."
            ],
            tables=[probes],
        ),
        report.Section(
            "3. Attention drift",
            [
                "Per layer and head: the change of attention from the last token to the "
                "subject's last token (edited − vanilla), averaged over the record's relation "
                "and distracting-neighbour prompts. The drift factor of a prompt is the "
                "largest such change over heads and layers."
            ],
            tables=[_drift_table(result)],
            figures=[
                *(
                    plotting.drift_heatmap(d, "delta").update_layout(title=f"{n}: Δ attention")
                    for n, d in result.drifts.items()
                ),
                *result.attention.values(),
            ],
        ),
        report.Section(
            "4. Restoring patches (ROME edit)",
            [
                f"Prompt {result.patch_prompt!r}: the ROME-edited model runs with one "
                "component replaced by the vanilla model's value at one layer window and "
                "position. P(o_true) after patching (higher = restored)."
            ],
            tables=[_best_patches(result.patches)],
            figures=[plotting.patching_heatmap(result.patches, "p_true")],
        ),
        report.Section(
            "5. Small sweep",
            [
                f"{len({x.record for x in result.sweep_lines})} more records of the embedded "
                f"dataset, ROME vs ROME+SADR; results in {result.sweep_path}."
            ],
            tables=[_sweep_table(result.sweep_lines)],
            notes=["% of probes with P(right) > P(wrong), ± 95 % normal interval."],
        ),
    ]
    return out


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
                "seconds": e.info["seconds"],
                "steps_run": e.info["steps_run"],
                "final": e.info["final"],
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
