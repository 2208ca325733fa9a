"""The analyses of one edit on one record, each writing figures (HTML) and a CSV table:
``attndrift drift``, ``patch``, ``trace`` (causal tracing, on the unedited model) and
``knockout``. An edit is made on the fly or read from a saved file."""

import argparse
import sys
import time
from pathlib import Path

from attndrift.cli.common import (
    _check_output,
    _data_args,
    _load_data,
    _load_model,
    _model_args,
    _setting_args,
    _setting_fields,
    _writing,
    command,
    make_edit,
    settings_from_args,
)


def _analysis_edit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("edit (made on the fly, or a saved one)")
    g.add_argument("--record", type=int, default=None, help="record id (default: the first)")
    g.add_argument("--edit", type=Path, default=None, help="a saved edit (.safetensors)")
    _setting_args(p)
    p.add_argument("--out", type=Path, required=True, help="directory for the HTML and CSV files")


def _analysis_setup(a):
    """(record, model, edit, edited variant) for the drift and patch commands."""
    from attndrift import data, models
    from attndrift.analysis import patching
    from attndrift.editing.edits import Edit

    # every option and output checked before any work (loading, editing, writing)
    _check_output(a.out, "--out", directory=True)
    if a.edit is None:
        settings_from_args(a)
        saved = a.out / "edit.safetensors"
        if saved.exists():
            raise ValueError(
                f"--out {a.out} already holds an edit: pass --edit {saved} to analyse it "
                "again, or another --out"
            )
    for flag in ("kinds", "kind"):  # drift's --kinds, patch's --kind
        kinds = [k.strip() for k in str(getattr(a, flag, "")).split(",") if k.strip()]
        unknown = [k for k in kinds if k not in data.PROBE_KINDS]
        if unknown:
            raise ValueError(
                f"--{flag}: unknown probe kind {unknown[0]!r}: expected one of {data.PROBE_KINDS}"
            )
    if hasattr(a, "directions"):  # patch
        components = [c.strip() for c in a.components.split(",")]
        for d in a.directions.split(","):
            patching.check_options(components, d.strip(), a.window)
        for x in (a.positions or "").split(","):
            if x.strip() and not x.strip().lstrip("-").isdigit():
                raise ValueError(f"--positions: expected integers, got {x.strip()!r}")
    if a.edit is not None:
        changed = [f.name for f, _ in _setting_fields() if getattr(a, f.name) not in (None, False)]
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise ValueError(f"{flags}: editor options apply to on-the-fly edits, not --edit")
        if not a.edit.exists():
            raise FileNotFoundError(f"edit file not found: {a.edit}")
    ds = _load_data(a)
    if not len(ds):
        raise ValueError("no records selected")
    record = ds.by_id(a.record) if a.record is not None else ds[0]
    model = _load_model(a)
    if a.edit is not None:
        e = Edit.load(a.edit, device=models.model_device(model))
        e.check(model)  # another model's edit: refused before any warning or work
        if record.request not in e.requests:
            print(f"warning: {a.edit} was not made for record {record.id}", file=sys.stderr)
    else:
        e = make_edit(model, [record.request], settings_from_args(a)[0])
        with _writing(a.out):
            a.out.mkdir(parents=True, exist_ok=True)
            e.save(a.out / "edit.safetensors")
        cov = e.run.config.covariance
        cov_text = "identity covariance" if cov is None else f"C from {cov.n_tokens} tokens"
        print(
            f"{e.editor} edit at layers {list(e.layers)} ({cov_text}) in "
            f"{e.run.seconds:.1f} s; saved to {a.out / 'edit.safetensors'}"
        )
    r = record.request
    print(f"record {record.id}: {r.subject!r}: {r.target_true!r} -> {r.target_new!r}")
    return record, model, e, models.Variant(model, e.hooks(model), name=e.editor)


@command("drift", "attention drift of an edit on a record's probes (figures + CSV)")
def drift_command(args) -> int:
    """Measure the attention drift (METHOD §1) of one edit on its record's probes: per-head drift
    of the last token's attention, the drift factor of each probe against P(o_new), and the
    attention rows of the most drifting heads. Writes drift.html, drift.csv and probes.csv."""
    from attndrift import capture, encoding, plotting
    from attndrift.analysis import drift

    p = argparse.ArgumentParser(prog="attndrift drift", description=drift_command.__doc__)
    _model_args(p)
    _data_args(p)
    _analysis_edit_args(p)
    p.add_argument("--kinds", default="RS,DNS", help="probe kinds (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="attention rows of the top N heads")
    a = p.parse_args(args)
    record, model, _, edited = _analysis_setup(a)
    probes = record.probes([k.strip() for k in a.kinds.split(",")])
    if not probes:
        raise ValueError(f"record {record.id} has no probes of kinds {a.kinds}")
    t0 = time.perf_counter()
    analysis = drift.versus_failure(model, [(edited, probes)])
    kept = [pr for pr in probes if pr.prompt in set(analysis.probes["prompt"])]
    d = drift.measure(model, edited, [pr.prompt for pr in kept], [pr.subject for pr in kept])
    worst = int(d.factor().argmax())
    heads = drift.top_heads(d, worst, a.heads)
    batch = encoding.encode_batch(model, [d.prompts[worst]], [d.subjects[worst]])
    pair = capture.pair(model, edited, batch, layers=sorted({layer for layer, _ in heads}))
    tokens = encoding.token_strings(model, batch.tokens[0].tolist())
    print(f"{len(kept)} probes analysed in {time.perf_counter() - t0:.1f} s")

    with _writing(a.out):
        a.out.mkdir(parents=True, exist_ok=True)
        d.frame().to_csv(a.out / "drift.csv", index=False)
        analysis.probes.to_csv(a.out / "probes.csv", index=False)
    figures = [
        plotting.drift_heatmap(d, "delta"),
        plotting.drift_heatmap(d, "kl"),
        plotting.drift_heatmap(d, "delta", prompt=worst),
        plotting.attention_rows(pair, tokens, heads),
        plotting.drift_scatter(analysis),
    ]
    with _writing(a.out):
        plotting.save_html(figures, a.out / "drift.html")
    c = analysis.overall
    print(
        f"drift factor: max {float(d.factor().max()):.3f}, mean {float(d.factor().mean()):.3f}; "
        f"vs P(o_new): Pearson {c.pearson:.2f} (p {c.pearson_p:.1e}), "
        f"Spearman {c.spearman:.2f} (p {c.spearman_p:.1e}), n {c.n}"
    )
    print(f"most drifting prompt: {d.prompts[worst]!r}")
    for layer, head in heads:
        li = d.layers.index(layer)
        print(
            f"  layer {layer:>2} head {head:>2}: attention to s_last "
            f"{float(d.a_vanilla[worst, li, head]):.3f} -> {float(d.a_edited[worst, li, head]):.3f}"
        )
    print(f"wrote {a.out / 'drift.html'}, {a.out / 'drift.csv'}, {a.out / 'probes.csv'}")
    return 0


@command("patch", "restore / contaminate patching sweep of an edit on one prompt (figures + CSV)")
def patch_command(args) -> int:
    """Patch attention pattern rows and MLP outputs between the vanilla and the edited model
    (METHOD §2) at every layer window and prompt position of one probe: restore (edited run,
    vanilla values) and contaminate (vanilla run, edited values). Writes patching.html and
    patching.csv."""
    from attndrift import plotting
    from attndrift.analysis import drift, patching

    p = argparse.ArgumentParser(prog="attndrift patch", description=patch_command.__doc__)
    _model_args(p)
    _data_args(p)
    _analysis_edit_args(p)
    p.add_argument("--kind", default="DNS", help="probe kind (default: %(default)s)")
    p.add_argument("--probe", type=int, default=0, help="which probe of that kind (default: 0)")
    p.add_argument("--window", type=int, default=1, help="layers per cell (default: 1)")
    p.add_argument(
        "--components", default="attn,mlp", help="attn, mlp, attn_out, resid (default: attn,mlp)"
    )
    p.add_argument("--directions", default="restore,contaminate", help="restore and/or contaminate")
    p.add_argument(
        "--positions", default=None, help="comma-separated prompt positions (default: all)"
    )
    p.add_argument("--full-answer", action="store_true", help="also score the full answers")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward")
    a = p.parse_args(args)
    record, model, _, edited = _analysis_setup(a)
    probe = _probe(record, a.kind, a.probe)
    true, new = drift.answers(probe)
    t0 = time.perf_counter()
    results = [
        patching.patch(
            model,
            edited,
            probe.prompt,
            true,
            new,
            direction=d.strip(),
            components=[c.strip() for c in a.components.split(",")],
            window=a.window,
            positions=[int(x) for x in a.positions.split(",")] if a.positions else None,
            full_answer=a.full_answer,
            max_batch_tokens=a.batch_tokens,
            progress=True,
        )
        for d in a.directions.split(",")
    ]
    n_cells = sum(r.p_true.numel() for r in results)
    print(f"{n_cells} cells patched in {time.perf_counter() - t0:.1f} s")
    metrics = ["p_true", "p_new", "recovery"] + (["p_true_full"] if a.full_answer else [])
    with _writing(a.out):
        a.out.mkdir(parents=True, exist_ok=True)
        patching.frame(results).to_csv(a.out / "patching.csv", index=False)
        plotting.save_html(
            [plotting.patching_heatmap(results, m) for m in metrics], a.out / "patching.html"
        )
    print(f"{probe.kind} prompt: {probe.prompt!r}  (o_true {true!r}, o_new {new!r})")
    for r in results:
        t, s = r.target, r.source
        print(
            f"{r.direction}: unpatched P(o_true) {t.p_true:.4f} P(o_new) {t.p_new:.4f}; "
            f"other model P(o_true) {s.p_true:.4f} P(o_new) {s.p_new:.4f}"
        )
        for component in r.components:
            layer, pos, value = r.best(component)
            what, base = (
                ("P(o_true)", t.p_true) if r.direction == "restore" else ("P(o_new)", t.p_new)
            )
            print(
                f"  {component:<8} largest {what} {value:.4f} (unpatched {base:.4f}) at layers "
                f"{layer}-{min(layer + r.window, model.cfg.n_layers) - 1}, "
                f"token {r.tokens[pos]!r} (position {pos})"
            )
    print(f"wrote {a.out / 'patching.html'}, {a.out / 'patching.csv'}")
    return 0


@command("trace", "causal tracing (ROME Fig. 1): where the unedited model recalls a fact")
def trace_command(args) -> int:
    """Causal tracing (ROME, Meng et al. 2022) of one probe of a record on the unedited model:
    add Gaussian noise (NOISE x σ, σ = the token-embedding std over the data's subjects) to the
    subject's token embeddings, restore one cell of the clean run at a time (hidden state, MLP
    output or attention output at a layer window and position) and measure P(o_true); the
    indirect effect of a cell is P(restored) - P(corrupted). Writes tracing.html and
    tracing.csv."""
    from attndrift import data, plotting
    from attndrift.analysis import drift, tracing

    p = argparse.ArgumentParser(prog="attndrift trace", description=trace_command.__doc__)
    _trace_args(p)
    a = p.parse_args(args)
    windows = _windows(a.window)
    ds = _load_data(a)
    if not len(ds):
        raise ValueError("no records selected")
    record = ds.by_id(a.record) if a.record is not None else ds[0]
    probe = _probe(record, a.kind, a.probe)
    true, _ = drift.answers(probe)
    model = _load_model(a)
    everything = data.load_dataset(a.data, lenient=True) if a.data else data.load_embedded()
    subjects = sorted({r.request.subject for r in everything.records})
    sigma = tracing.embedding_scale(model, subjects)
    t0 = time.perf_counter()
    t = tracing.trace(model, probe.prompt, probe.subject, true, sigma=sigma, noise=a.noise,
                      samples=a.samples, seed=a.seed, windows=windows,
                      components=[c.strip() for c in a.components.split(",")],
                      max_batch_tokens=a.batch_tokens, progress=True)  # fmt: skip
    print(f"{t.indirect.numel()} cells traced in {time.perf_counter() - t0:.1f} s")
    with _writing(a.out):
        a.out.mkdir(parents=True, exist_ok=True)
        tracing.frame(t).to_csv(a.out / "tracing.csv", index=False)
        plotting.save_html(plotting.tracing_heatmap(t), a.out / "tracing.html")
    print(f"{probe.kind} prompt: {probe.prompt!r} -> {true!r}; subject tokens "
          f"{[t.tokens[i] for i in t.subject_positions]}")  # fmt: skip
    print(f"σ = {sigma:.4g} (token-embedding std over {len(subjects)} subjects); noise "
          f"{a.noise:g}σ, {a.samples} samples; P(o_true) clean {t.p_clean:.4f}, corrupted "
          f"{t.p_corrupted:.4f}")  # fmt: skip
    _print_best_cells(t, model.cfg.n_layers)
    print(f"wrote {a.out / 'tracing.html'}, {a.out / 'tracing.csv'}")
    return 0


def _trace_args(p: argparse.ArgumentParser) -> None:
    from attndrift.analysis import tracing

    _model_args(p)
    _data_args(p)
    p.add_argument("--record", type=int, default=None, help="record id (default: the first)")
    p.add_argument("--kind", default="ES", help="probe kind (default: %(default)s: the fact)")
    p.add_argument("--probe", type=int, default=0, help="which probe of that kind (default: 0)")
    p.add_argument(
        "--window",
        default=None,
        help="layers per cell, centred on the layer: N for every component, or e.g. "
        "hidden=1,mlp=10,attn_out=10 (default: ROME's, that example)",
    )
    p.add_argument("--samples", type=int, default=tracing.ROME_SAMPLES, help="noise draws")
    p.add_argument(
        "--noise", type=float, default=tracing.ROME_NOISE, help="noise std in units of σ"
    )
    p.add_argument(
        "--components", default="hidden,mlp,attn_out", help="hidden, mlp, attn_out (default: all)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward pass")
    p.add_argument("--out", type=Path, required=True, help="directory for the HTML and CSV files")


def _windows(text: str | None) -> int | dict[str, int] | None:
    """``--window``: ``N`` for every component, or ``hidden=1,mlp=10``."""
    if not text:
        return None
    if "=" not in text:
        return int(text)
    pairs = [part.split("=") for part in text.split(",") if part.strip()]
    return {name.strip(): int(value) for name, value in pairs}


def _probe(record, kind: str, index: int):
    """The ``index``-th probe of ``kind`` of the record; a ValueError if there is none."""
    probes = record.probes([kind])
    if not 0 <= index < len(probes):
        raise ValueError(f"record {record.id} has {len(probes)} {kind} probes, not {index + 1}")
    return probes[index]


def _print_best_cells(t, n_layers: int) -> None:
    from attndrift.analysis import tracing

    last_subject = t.subject_positions[-1]
    print("largest indirect effect per component (layer = window centre):")
    for c, w in zip(t.components, t.windows, strict=True):
        layer, pos, value = t.best(c)
        s = tracing.span(layer, w, n_layers)
        text = (
            f"  {c:<8} {value:+.4f} at layer {layer} (layers {s.start}-{s.stop - 1}), "
            f"token {t.tokens[pos]!r} (position {pos})"
        )
        layer, _, value = t.best(c, last_subject)
        print(text + f"; at the subject's last token: {value:+.4f} at layer {layer}")


@command("knockout", "attention knockout: block last token -> subject per layer window")
def knockout_command(args) -> int:
    """Attention knockout (Geva et al. 2023) of an edit on one probe of a record: set the
    attention scores from the last token to every subject token to -inf in a window of layers
    (every head), for every window start, in the vanilla and the edited model, and measure the
    change of P(o_true) and P(o_new). If the edited model's P(o_new) on a distracting-neighbour
    prompt vanishes when the last token cannot see the subject in the drifting layers,
    attention drift carries the failure. Writes knockout.html and knockout.csv."""
    from attndrift import plotting
    from attndrift.analysis import drift, knockout

    p = argparse.ArgumentParser(prog="attndrift knockout", description=knockout_command.__doc__)
    _model_args(p)
    _data_args(p)
    _analysis_edit_args(p)
    p.add_argument("--kind", default="DNS", help="probe kind (default: %(default)s)")
    p.add_argument("--probe", type=int, default=0, help="which probe of that kind (default: 0)")
    p.add_argument(
        "--window",
        type=int,
        default=knockout.DEFAULT_WINDOW,
        help="layers per blocked window (default: %(default)s)",
    )
    p.add_argument("--top", type=int, default=3, help="windows to print (default: 3)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward pass")
    a = p.parse_args(args)
    record, model, _, edited = _analysis_setup(a)
    probe = _probe(record, a.kind, a.probe)
    true, new = drift.answers(probe)
    t0 = time.perf_counter()
    k = knockout.run(model, edited, probe.prompt, probe.subject, true, new, window=a.window,
                     max_batch_tokens=a.batch_tokens)  # fmt: skip
    print(f"{2 * k.p_true.shape[1]} windows blocked in {time.perf_counter() - t0:.1f} s")
    with _writing(a.out):
        a.out.mkdir(parents=True, exist_ok=True)
        k.frame().to_csv(a.out / "knockout.csv", index=False)
        plotting.save_html(plotting.knockout_figure(k), a.out / "knockout.html")
    print(f"{probe.kind} prompt: {probe.prompt!r}  (o_true {true!r}, o_new {new!r})")
    print(f"blocked: last token -> subject tokens {[k.tokens[i] for i in k.keys]}")
    for i, name in enumerate(k.models):
        print(
            f"{name}: unblocked P(o_true) {float(k.base_true[i]):.4f} "
            f"P(o_new) {float(k.base_new[i]):.4f}"
        )
    _print_top_windows(k, a.top)
    print(f"wrote {a.out / 'knockout.html'}, {a.out / 'knockout.csv'}")
    return 0


def _print_top_windows(k, top: int) -> None:
    removed = k.removed("edited")
    n_layers = k.p_true.shape[1]
    layers = f"{k.window} layers" if k.window > 1 else "1 layer"
    print(f"windows of {layers} where blocking removes most of the edited P(o_new):")
    for layer in removed.argsort(descending=True)[:top].tolist():
        last = min(layer + k.window, n_layers) - 1
        print(
            f"  layers {layer}-{last}: edited P(o_new) {float(k.base_new[1]):.4f} -> "
            f"{float(k.p_new[1, layer]):.4f} ({-100 * float(removed[layer]):+.0f} %), "
            f"P(o_true) {float(k.base_true[1]):.4f} -> {float(k.p_true[1, layer]):.4f}; "
            f"vanilla P(o_new) -> {float(k.p_new[0, layer]):.4f}, "
            f"P(o_true) -> {float(k.p_true[0, layer]):.4f}"
        )
