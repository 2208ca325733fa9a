"""The mechanism of the relation failure on SmolLM2 (docs/RESULTS.md, "Why relation specificity
fails"): is a failing relation (RS) probe carried by attention — *where* the last token looks —
or by the edited subject representation itself? Distracting-neighbour (DNS) probes are analysed
the same way for comparison.

For each record of a data slice, a ROME edit at the model's preset (as hooks), then for every
RS and DNS probe that contains the subject:

1. **patches** at the probe's last token and at the subject's last token (METHOD §2):
   * ``restore attn``: the edited run with the vanilla attention pattern rows of *every* layer
     after the edited one at the last token (one cell: window = all those layers);
   * ``contaminate attn``: the vanilla run with the edited rows there;
   * ``restore mlp``: the edited run with the vanilla MLP output of the edited layer at the
     subject's last token (removes the edit where it enters);
   each with P(o_true), P(o_new) and whether the probe succeeds (P(right) > P(wrong), first
   tokens);
2. **heads**: the drift of attention last → s_last (METHOD §1) of every head after the edited
   layer on the edit's own rewriting prompts (the templates SADR restrains), on the record's RS
   probes and on its DNS probes; and which heads SADR's rule would restrain at the edit.

Writes one JSON line per record (``--out``, gzipped by the caller) and prints the summary
tables. Usage::

    python scripts/relation_mechanism.py DATA --records 1100-1139 --out runs/mechanism.jsonl
    python scripts/relation_mechanism.py DATA --out results/mechanism_1100-1119.jsonl.gz \
        --plot mechanism.html

``--plot`` writes the figures: the failing probes fixed by each patch, and per head, its mean
drift on the rewriting prompts against its drift on the RS (DNS) probes, coloured by how often
SADR's rule restrains it.
"""

import argparse
import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
from scipy import stats

from attndrift import data, encoding, models
from attndrift.analysis import drift, patching
from attndrift.cli.common import _ids
from attndrift.editing import kit, setting


def _first_token_success(p: patching.Patching, cell: tuple[int, int, int], right_is_true: bool):
    c, layer, pos = cell
    p_true, p_new = float(p.p_true[c, layer, pos]), float(p.p_new[c, layer, pos])
    return {"p_true": p_true, "p_new": p_new, "ok": (p_true > p_new) == right_is_true}


def probe_patches(model, edited, probe, layer: int) -> dict:
    """The three patches of item 1 for one probe (first-token metrics)."""
    true, new = drift.answers(probe)
    enc = encoding.encode_prompt(model, probe.prompt, probe.subject)
    after = model.cfg.n_layers - layer - 1  # every layer after the edited one
    out = {"kind": probe.kind, "prompt": probe.prompt}
    for direction in ("restore", "contaminate"):
        r = patching.patch(model, edited, probe.prompt, true, new, direction=direction,
                           components=("attn",), window=after, positions=[enc.last])  # fmt: skip
        out[f"{direction}_attn"] = _first_token_success(r, (0, layer + 1, 0), True)
        out[f"{direction}_none"] = {"p_true": r.target.p_true, "p_new": r.target.p_new,
                                    "ok": r.target.p_true > r.target.p_new}  # fmt: skip
        out[f"{direction}_source"] = {"p_true": r.source.p_true, "p_new": r.source.p_new}
    r = patching.restore(model, edited, probe.prompt, true, new, components=("mlp",),
                         positions=[enc.subject_last])  # fmt: skip
    out["restore_mlp"] = _first_token_success(r, (0, layer, 0), True)
    return out


def head_drift(model, edited, prompts, subjects, layer: int) -> list[list[float]]:
    """Mean Δ attention last → s_last per (layer after the edit, head) over the prompts."""
    d = drift.measure(model, edited, prompts, subjects, layers=range(layer + 1, model.cfg.n_layers))
    return d.delta.mean(0).tolist()


def sadr_heads(model, edited, prompts, subjects, layer: int) -> list[list[float]]:
    """How often each head (layers after the edit) would be restrained by SADR's rule at the
    edit: its attention t → s_last above the largest vanilla one of its layer."""
    d = drift.measure(model, edited, prompts, subjects, layers=range(layer + 1, model.cfg.n_layers))
    threshold = d.a_vanilla.amax(-1, keepdim=True)  # [prompt, layer, 1]
    return (d.a_edited > threshold).float().mean(0).tolist()


def record_line(model, editor, s: setting.Setting, record) -> dict:
    e = editor(s, [record.request])
    edited = models.Variant(model, e.hooks(model))
    layer = e.layers[-1]
    cfg = s.config(model)
    rewrite = kit.filled(editor.templates(cfg), record.request.prompt)
    subj = record.request.subject
    line = {"record": record.id, "setting": s.key, "layer": layer,
            "heads_rewrite": head_drift(model, edited, rewrite, [subj] * len(rewrite), layer),
            "sadr_rewrite": sadr_heads(model, edited, rewrite, [subj] * len(rewrite), layer),
            "probes": []}  # fmt: skip
    for kind in ("RS", "DNS"):
        probes = [p for p in record.probes([kind]) if p.subject in p.prompt]
        if not probes:
            continue
        prompts = [p.prompt for p in probes]
        line[f"heads_{kind}"] = head_drift(model, edited, prompts, [subj] * len(probes), layer)
        line["probes"] += [probe_patches(model, edited, p, layer) for p in probes]
    return line


def summarize(lines: list[dict]) -> None:
    probes = [p for line in lines for p in line["probes"]]
    print(f"{len(lines)} edits, {len(probes)} RS/DNS probes containing the subject")
    print(f"{'kind':<4} {'n':>4} {'vanilla ok':>10} {'edited ok':>9} {'failing':>7} | "
          f"{'fixed by: restore attn':>22} {'restore MLP':>11} | "
          f"{'caused by: contaminate attn':>27}")  # fmt: skip
    for kind in ("RS", "DNS"):
        ps = [p for p in probes if p["kind"] == kind]
        if not ps:
            continue
        failing = _failing(ps)
        fixed_attn = sum(p["restore_attn"]["ok"] for p in failing)
        fixed_mlp = sum(p["restore_mlp"]["ok"] for p in failing)
        caused = sum(not p["contaminate_attn"]["ok"] for p in failing)
        n_f = max(len(failing), 1)
        print(f"{kind:<4} {len(ps):>4} {sum(p['contaminate_none']['ok'] for p in ps):>10} "
              f"{sum(p['restore_none']['ok'] for p in ps):>9} {len(failing):>7} | "
              f"{fixed_attn:>6} ({100 * fixed_attn / n_f:5.1f} %)       "
              f"{fixed_mlp:>4} ({100 * fixed_mlp / n_f:3.0f} %) | "
              f"{caused:>12} ({100 * caused / n_f:5.1f} %)")  # fmt: skip
    print("\nheads after the edited layer: does SADR restrain the heads that drift on RS / DNS?")
    for kind in ("RS", "DNS"):
        pairs = [(np.ravel(x["sadr_rewrite"]), np.ravel(x[f"heads_{kind}"]),
                  np.ravel(x["heads_rewrite"])) for x in lines if f"heads_{kind}" in x]  # fmt: skip
        if not pairs:
            continue
        sadr = np.mean([p[0] for p in pairs], 0)
        target = np.mean([p[1] for p in pairs], 0)
        rewrite = np.mean([p[2] for p in pairs], 0)
        top = lambda v, k=10: set(np.argsort(-v)[:k].tolist())
        rho = stats.spearmanr(rewrite, target)
        print(f"  {kind}: Spearman over heads of mean drift (rewriting prompts vs {kind} probes) "
              f"{rho.statistic:.2f} (p {rho.pvalue:.1e}); top-10 overlap: drift "
              f"{len(top(rewrite) & top(target))}/10, SADR-restrained "
              f"{len(top(sadr) & top(target))}/10; the {kind} top-10 heads get "
              f"{target[list(top(target))].mean():.3f} drift on {kind}, "
              f"{rewrite[list(top(target))].mean():.3f} on the rewriting prompts")  # fmt: skip


def _failing(probes: list[dict]) -> list[dict]:
    """Probes the vanilla model gets right (P(o_true) > P(o_new)) and the edited one wrong."""
    return [p for p in probes if p["restore_source"]["p_true"] > p["restore_source"]["p_new"]
            and not p["restore_none"]["ok"]]  # fmt: skip


def figures(lines: list[dict]) -> list:
    """The patch outcomes of the failing probes, and the per-head drift scatter per kind."""
    import plotly.graph_objects as go

    from attndrift import plotting

    records = sorted({x["record"] for x in lines})
    of = f"ROME on SmolLM2-135M, dev records {records[0]}-{records[-1]}"
    probes = [p for line in lines for p in line["probes"]]
    bars = go.Figure()
    patches = (("fixed by restoring vanilla attention", "restore_attn", True, "#7570b3"),
               ("fixed by restoring the vanilla MLP", "restore_mlp", True, "#66a61e"),
               ("caused by edited attention alone", "contaminate_attn", False,
                plotting.EDITED[0]))  # fmt: skip
    for label, key, want, colour in patches:
        ys, texts = [], []
        for kind in ("RS", "DNS"):
            failing = _failing([p for p in probes if p["kind"] == kind])
            k = sum(p[key]["ok"] == want for p in failing)
            ys.append(100 * k / max(len(failing), 1))
            texts.append(f"{k}/{len(failing)}")
        bars.add_trace(go.Bar(x=["RS", "DNS"], y=ys, text=texts, name=label,
                              marker_color=colour, textposition="outside"))  # fmt: skip
    bars.update_layout(title=f"Failing probes (vanilla right, edited wrong): what each patch "
                             f"does<br><sub>{of}</sub>", yaxis_title="% of failing probes",
                       barmode="group", yaxis_range=[0, 110], height=460,
                       margin={"t": 90})  # fmt: skip
    out = [plotting.style(bars)]
    for kind in ("RS", "DNS"):
        rows = [x for x in lines if f"heads_{kind}" in x]
        if not rows:
            continue
        rewrite = np.mean([np.ravel(x["heads_rewrite"]) for x in rows], 0)
        target = np.mean([np.ravel(x[f"heads_{kind}"]) for x in rows], 0)
        restrained = np.mean([np.ravel(x["sadr_rewrite"]) for x in rows], 0)
        layer, n_heads = rows[0]["layer"], np.shape(rows[0]["heads_rewrite"])[1]
        names = [f"L{layer + 1 + i // n_heads}H{i % n_heads}" for i in range(len(rewrite))]
        fig = go.Figure(go.Scatter(
            x=rewrite, y=target, mode="markers", text=names,
            marker={"color": restrained, "colorscale": "Viridis", "showscale": True, "cmin": 0,
                    "cmax": 1, "colorbar": {"title": {"text": "how often SADR<br>restrains the "
                                                      "head<br>(fraction)", "side": "right"}}},
        ))  # fmt: skip
        fig.update_layout(
            title=f"Per head: attention drift to the subject on the rewriting prompts vs on "
                  f"{kind} probes<br><sub>{of}: {len(rows)} edits</sub>",
            xaxis_title="mean Δ attention last → s_last, rewriting prompts",
            yaxis_title=f"mean Δ attention last → s_last,<br>{kind} probes",
            height=460, margin={"t": 90},
        )  # fmt: skip
        out.append(plotting.style(fig))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", type=Path)
    p.add_argument("--records", default=None, help="record ids, e.g. 1100-1139")
    p.add_argument(
        "--out", type=Path, required=True, help="JSON lines; a committed .jsonl.gz: summarise it"
    )
    p.add_argument("--plot", type=Path, default=None, help="write the figures (HTML)")
    a = p.parse_args()
    if a.out.suffix == ".gz":
        with gzip.open(a.out, "rt", encoding="utf-8") as f:
            lines = [json.loads(x) for x in f if x.strip()]
        summarize(lines)
        if a.plot:
            from attndrift import plotting

            plotting.save_html(figures(lines), a.plot)
            print(f"figures: {a.plot}")
        return
    if a.records is None:
        p.error("--records is required unless --out is a committed .jsonl.gz")
    model = models.load_model("smollm2-135m")
    ds = data.load_dataset(a.data).select(ids=_ids(a.records))
    done = set()
    if a.out.exists():
        done = {json.loads(x)["record"] for x in a.out.read_text().splitlines() if x.strip()}
    editor, s = setting.Editor(model), setting.Setting()
    for record in ds.records:
        if record.id in done:
            continue
        line = record_line(model, editor, s, record)
        line["config"] = json.loads(json.dumps(dataclasses.asdict(s.config(model))))
        with a.out.open("a") as f:
            f.write(json.dumps(line) + "\n")
    summarize([json.loads(x) for x in a.out.read_text().splitlines() if x.strip()])


if __name__ == "__main__":
    main()
