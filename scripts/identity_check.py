"""Bit-identity check: edits of every editor, and patching, tracing and knockout tables.

``save`` computes, in one process, on tiny random models of every architecture (and, with
``--smollm``, on the embedded SmolLM2):

* edits of every editor through its own module (ROME, r-ROME, ROME + SADR, ROME with the
  value-side variants, MEMIT, PMET, PMET + SADR, AlphaEdit, AlphaEdit in sequence) and through
  :class:`attndrift.editing.setting.Editor` (one call per editor, and a sequence), with their
  factors, targets and optimisation traces;
* patching sweeps (both directions, every component, windows 1 and 3, full answers, a custom
  metric, one cell per pass), causal traces and attention knockouts of a fixed random edit,

and writes them to one file (``torch.save``). ``compare`` reads two such files and checks
every tensor with ``torch.equal`` and every number and table exactly (NaN equals NaN)::

    ATTNDRIFT_CACHE=/tmp/idcache OMP_NUM_THREADS=1 python scripts/identity_check.py save a.pt
    ATTNDRIFT_CACHE=/tmp/idcache OMP_NUM_THREADS=1 PYTHONPATH=/other/checkout \\
        python scripts/identity_check.py save b.pt
    python scripts/identity_check.py compare a.pt b.pt

Covariances are computed (and cached under ``$ATTNDRIFT_CACHE``) from the presets' small tiny
corpora; on SmolLM2 from a 2,048-token corpus. Wall times and timings are not compared.
"""

import argparse
import dataclasses
import math
import sys
import traceback
from pathlib import Path

import pandas as pd
import torch

import attndrift
from attndrift import data, models
from attndrift.analysis import knockout, patching, tracing
from attndrift.editing import alphaedit, edits, memit, pmet, rome, sadr, setting, value
from attndrift.editing.covariance import CovarianceConfig

REQUESTS = [
    data.EditRequest(
        subject="Eiffel Tower",
        prompt="The Eiffel Tower is located in the city of",
        target_true="Paris",
        target_new="Rome",
    ),
    data.EditRequest(
        subject="Louvre",
        prompt="The Louvre is located in the city of",
        target_true="Paris",
        target_new="London",
    ),
]
PROMPT, SUBJECT, TRUE, NEW = (
    "The Eiffel Tower is located in the city of",
    "Eiffel Tower",
    "Paris",
    "Rome",
)


def _edit(e: edits.Edit) -> dict:
    out = {
        "layers": e.layers,
        "left": e.left,
        "right": e.right,
        "editor": e.editor,
        "requests": [dataclasses.asdict(r) for r in e.requests],
        "model_fingerprint": e.model_fingerprint,
    }
    if e.run is not None:
        out |= {
            "config_type": type(e.run.config).__name__,
            "config": dataclasses.asdict(e.run.config),
            "sadr": None if e.run.sadr is None else dataclasses.asdict(e.run.sadr),
            "targets": e.run.targets,
            "traces": [[dataclasses.asdict(s) for s in t] for t in e.run.traces],
            "n_templates": e.run.n_templates,
            "laps": sorted(k for k, _ in e.run.timings),
        }
    return out


def _fields(obj) -> dict:
    """A result dataclass's fields (tensors, numbers, outcomes), for exact comparison."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return out


def _random_edit(model, layer: int = 1, seed: int = 0) -> edits.Edit:
    g = torch.Generator().manual_seed(seed)
    return edits.Edit(
        layers=(layer,),
        left=(torch.randn(model.cfg.d_mlp, 1, generator=g),),
        right=(torch.randn(1, model.cfg.d_model, generator=g),),
        requests=(REQUESTS[0],),
        editor="random",
    )


def _case(out: dict, name: str, fn) -> None:
    """Run one case; its result (or its error, which must also be the same) under ``name``."""
    print(f"  {name}", flush=True)
    try:
        out[name] = fn()
    except Exception as e:  # an error is a result to compare
        traceback.print_exc()
        out[name] = {"error": f"{type(e).__name__}: {e}"}


def _steps(cfg, steps: int):
    return dataclasses.replace(cfg, value=dataclasses.replace(cfg.value, steps=steps))


def edit_cases(out: dict, tag: str, model, steps: int, cov: CovarianceConfig | None) -> None:
    """Edits of every editor on ``model`` (``cov``: the covariance config of every editor;
    None: each preset's)."""

    def cfg_of(module, **changes):
        c = _steps(module.preset(model), steps)
        if cov is not None:
            changes.setdefault("covariance", cov)
        return dataclasses.replace(c, **changes)

    r0 = REQUESTS[0]
    s = sadr.SadrConfig(gamma=0.5)
    _case(out, f"{tag}/rome", lambda: _edit(rome.edit(model, r0, cfg_of(rome))))
    _case(
        out,
        f"{tag}/r-rome",
        lambda: _edit(rome.edit(model, r0, cfg_of(rome, denominator="mean_key"))),
    )
    _case(
        out,
        f"{tag}/rome+sadr",
        lambda: _edit(rome.edit(model, r0, cfg_of(rome, sadr_steps=None), sadr=s)),
    )
    sel = sadr.SadrConfig(gamma=0.5, all_heads=True, queries="after_subject", keys="subject")
    _case(
        out,
        f"{tag}/rome+sadr-variant",
        lambda: _edit(rome.edit(model, r0, cfg_of(rome, sadr_steps=None), sadr=sel)),
    )

    def variants():
        c = cfg_of(rome)
        v = dataclasses.replace(
            c.value, stop_margin=0.5, offtarget=0.3, relation_kl=0.2, early_stop_on="loss"
        )
        return _edit(rome.edit(model, r0, dataclasses.replace(c, value=v)))

    _case(out, f"{tag}/rome-value-variants", variants)

    def margin_only():
        c = cfg_of(rome)
        v = dataclasses.replace(c.value, stop_margin=-1.0, early_stop_on="margin")
        return _edit(rome.edit(model, r0, dataclasses.replace(c, value=v)))

    _case(out, f"{tag}/rome-margin-stop", margin_only)
    _case(out, f"{tag}/memit", lambda: _edit(memit.edit(model, REQUESTS, cfg_of(memit))))
    _case(
        out, f"{tag}/memit+sadr", lambda: _edit(memit.edit(model, REQUESTS, cfg_of(memit), sadr=s))
    )
    _case(out, f"{tag}/pmet", lambda: _edit(pmet.edit(model, REQUESTS, cfg_of(pmet))))
    _case(
        out,
        f"{tag}/pmet-layers-left",
        lambda: _edit(pmet.edit(model, REQUESTS, cfg_of(pmet, spread="layers_left"))),
    )
    _case(out, f"{tag}/pmet+sadr", lambda: _edit(pmet.edit(model, REQUESTS, cfg_of(pmet), sadr=s)))

    def pmet_greedy():  # the NLL schedule exercised: a one-token target led early
        v = value.ValueConfig(
            steps=12, lr=2.0, clamp_norm_factor=100.0, weight_decay=0.0, early_stop_loss=0.0
        )
        c = cfg_of(pmet, value=v, greedy_kl_stop=0.05)
        req = dataclasses.replace(r0, target_new="the")
        return _edit(pmet.edit(model, [req], c))

    _case(out, f"{tag}/pmet-greedy-schedule", pmet_greedy)
    _case(
        out, f"{tag}/alphaedit", lambda: _edit(alphaedit.edit(model, REQUESTS, cfg_of(alphaedit)))
    )

    def alpha_sequence():
        c, state, got = cfg_of(alphaedit), None, []
        with edits.restored(model, c.layers):
            for r in REQUESTS:
                e, state = alphaedit.edit_in_sequence(model, [r], c, state=state)
                edits.add_to_weights(model, e)
                got.append(_edit(e))
        return {"edits": got, "projections": state.projections, "keys": state.keys}

    _case(out, f"{tag}/alphaedit-sequence", alpha_sequence)

    # through Setting and Editor (the dispatch the command line and sweeps use)
    quick = {"steps": steps} | ({"cov_tokens": cov.n_tokens} if cov is not None else {})
    editor = setting.Editor(model)
    for name in ("rome", "memit", "pmet", "alphaedit"):
        st = setting.Setting(editor=name, **quick)
        reqs = REQUESTS[:1] if name == "rome" else REQUESTS
        _case(out, f"{tag}/Editor/{name}", lambda st=st, reqs=reqs: _edit(editor(st, reqs)))
    st = setting.Setting(editor="memit", mom2_weight=100.0, sadr_gamma=0.2, **quick)
    _case(out, f"{tag}/Editor/memit-lambda-sadr", lambda: _edit(editor(st, REQUESTS)))
    for name in ("rome", "alphaedit"):
        st = setting.Setting(editor=name, sequential=2, **quick)

        def seq(st=st):
            c = st.config(model)
            layers = getattr(c, "layers", None) or (c.layer,)
            with edits.restored(model, layers):
                return [_edit(e) for e in editor.sequence(st, REQUESTS)]

        _case(out, f"{tag}/Editor/sequence-{name}", seq)


def analysis_cases(out: dict, tag: str, model, full: bool = True) -> None:
    """Patching, tracing and knockout of a fixed random edit (``full``: every variant)."""
    edited = models.Variant(model, _random_edit(model).hooks(model))

    def metric(logits):
        return logits[:, 0] - logits[:, 1]

    windows = (1, 3) if full else (1,)
    for direction in patching.DIRECTIONS:
        for w in windows:
            name = f"{tag}/patching/{direction}/w{w}"

            def run(direction=direction, w=w):
                r = patching.patch(
                    model,
                    edited,
                    PROMPT,
                    TRUE,
                    NEW,
                    direction=direction,
                    components=("attn", "mlp", "attn_out", "resid"),
                    window=w,
                    full_answer=True,
                    metric=metric,
                )
                return {"fields": _fields(r), "frame": patching.frame(r)}

            _case(out, name, run)
    if full:

        def one_per_pass():
            r = patching.patch(
                model,
                edited,
                PROMPT,
                TRUE,
                NEW,
                direction="restore",
                positions=(0, 3, 5),
                max_cells=1,
                max_batch_tokens=64,
            )
            return {"fields": _fields(r), "frame": patching.frame(r)}

        _case(out, f"{tag}/patching/one-cell-per-pass", one_per_pass)

    def trace(variant, **kw):
        t = tracing.trace(variant, PROMPT, SUBJECT, TRUE, samples=3, seed=1, **kw)
        return {"fields": _fields(t), "frame": tracing.frame(t)}

    _case(out, f"{tag}/tracing/vanilla", lambda: trace(model))
    if full:
        _case(
            out,
            f"{tag}/tracing/edited-windows",
            lambda: trace(
                edited, windows={"hidden": 2, "mlp": 3}, sigma=0.7, components=("hidden", "mlp")
            ),
        )
        _case(
            out,
            f"{tag}/tracing/small-budget",
            lambda: trace(model, positions=(1, 2, 4, 8), max_batch_tokens=16, windows=1),
        )

    def knock(**kw):
        k = knockout.run(model, edited, PROMPT, SUBJECT, TRUE, NEW, **kw)
        return {"fields": _fields(k), "frame": k.frame()}

    _case(out, f"{tag}/knockout/w2", lambda: knock(window=2))
    if full:
        _case(out, f"{tag}/knockout/default", lambda: knock())
        _case(
            out,
            f"{tag}/knockout/queries-keys",
            lambda: knock(window=1, queries=(5, 8), keys=(0, 1, 2), max_batch_tokens=20),
        )
        _case(out, f"{tag}/knockout/no-keys", lambda: knock(window=2, keys=()))


def save(path: Path, smollm: bool) -> None:
    torch.set_num_threads(1)
    out: dict = {"version": attndrift.__version__, "package": attndrift.__file__}
    print(f"attndrift from {attndrift.__file__}", flush=True)
    for arch in models.TINY_ARCHS:
        model = models.tiny_model(arch, seed=0)
        print(arch, flush=True)
        edit_cases(out, arch, model, steps=8, cov=None)
        analysis_cases(out, arch, model)
    if smollm:
        model = models.load_model(models.EMBEDDED_MODEL, device="cpu")
        print("smollm2", flush=True)
        edit_cases(out, "smollm2", model, steps=4, cov=CovarianceConfig(n_tokens=2048))
        analysis_cases(out, "smollm2", model, full=False)
    torch.save(out, path)
    print(f"wrote {len(out) - 2} cases to {path}")


def _same(a, b, where: str, bad: list[str]) -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(torch.nan_to_num(a, nan=7.25), torch.nan_to_num(b, nan=7.25))
            and torch.equal(a.isnan(), b.isnan())
        )
        if not ok:
            diff = ""
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
                diff = f" (max |diff| {(a.double() - b.double()).abs().nan_to_num().max():.3g})"
            bad.append(f"{where}: tensors differ{diff}")
    elif isinstance(a, pd.DataFrame) or isinstance(b, pd.DataFrame):
        common = [c for c in a.columns if c in set(b.columns)]
        if list(a.columns) != list(b.columns):
            print(f"note: {where}: columns {list(a.columns)} vs {list(b.columns)}")
        if not a[common].equals(b[common]):
            bad.append(f"{where}: tables differ")
    elif isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            bad.append(f"{where}: keys {sorted(set(a) ^ set(b))} differ")
        for k in sorted(set(a) & set(b), key=str):
            _same(a[k], b[k], f"{where}/{k}", bad)
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            bad.append(f"{where}: lengths {len(a)} and {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _same(x, y, f"{where}[{i}]", bad)
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        pass
    elif a != b:
        bad.append(f"{where}: {a!r} != {b!r}")


def compare(a_path: Path, b_path: Path) -> int:
    a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
    print(f"{a_path}: {a.pop('package')} ({a.pop('version')})")
    print(f"{b_path}: {b.pop('package')} ({b.pop('version')})")
    bad: list[str] = []
    different = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            bad.append(f"{name}: only in {'the first' if name in a else 'the second'} file")
            different += 1
            continue
        before = len(bad)
        _same(a[name], b[name], name, bad)
        errors = [x.get("error") for x in (a[name], b[name]) if isinstance(x, dict)]
        note = f" (both: {errors[0]})" if any(errors) and len(bad) == before else ""
        different += len(bad) > before
        print(f"{'identical' if len(bad) == before else 'DIFFERENT'}  {name}{note}")
    for line in bad:
        print("  " + line)
    n = len(set(a) | set(b))
    print(f"{n - different} of {n} cases identical" + (f"; {len(bad)} differences" if bad else ""))
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="compute every case and save it")
    s.add_argument("out", type=Path)
    s.add_argument("--smollm", action="store_true", help="also the embedded SmolLM2")
    c = sub.add_parser("compare", help="compare two saved files exactly")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    a = p.parse_args()
    if a.cmd == "save":
        save(a.out, a.smollm)
        return 0
    return compare(a.a, a.b)


if __name__ == "__main__":
    sys.exit(main())
