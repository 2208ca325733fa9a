"""``attndrift edit``: edit one fact, print the probes before and after, save the edit."""

import argparse
from pathlib import Path

from attndrift.cli.common import (
    _check_output,
    _load_model,
    _model_args,
    _setting_args,
    _writing,
    command,
    make_edit,
    settings_from_args,
)


@command("edit", "edit one fact (ROME / MEMIT, optional SADR); show before/after probes")
def edit_command(args) -> int:
    """Edit a fact given on the command line or as a record of a data file, print probe
    probabilities before and after, and optionally save the edit."""
    from attndrift import data, scoring
    from attndrift.editing.edits import applied

    p = argparse.ArgumentParser(prog="attndrift edit", description=edit_command.__doc__)
    _model_args(p)
    p.add_argument("--data", default=None, help="data file (default: the embedded dataset)")
    p.add_argument("--record", type=int, default=None, help="record id to edit")
    p.add_argument("--subject", help="subject, e.g. 'Eiffel Tower'")
    p.add_argument("--prompt", help="prompt containing the subject")
    p.add_argument("--new", help="new object")
    p.add_argument("--true", help="true object")
    p.add_argument("--neighbor", action="append", default=[], help="neighbour prompt (true obj)")
    _setting_args(p)
    p.add_argument("--out", type=Path, default=None, help="save the edit (.safetensors)")
    a = p.parse_args(args)
    if a.out is not None:
        _check_output(a.out, "--out")
    if a.record is not None:
        ds = data.load_dataset(a.data) if a.data else data.load_embedded()
        record = ds.by_id(a.record)
    elif a.subject and a.prompt and a.new and a.true:
        request = data.EditRequest(
            subject=a.subject, prompt=a.prompt, target_true=a.true, target_new=a.new
        )
        record = data.Record(0, request, neighborhood=tuple((n, a.true) for n in a.neighbor))
    else:
        p.error("give --record ID, or all of --subject --prompt --new --true")
    (setting,) = settings_from_args(a)
    model = _load_model(a)
    probes = []
    for k in ("ES", "NS", "RS", "DNS", "RS_D"):
        probes += record.probes([k])[:1]
    before = scoring.score_probes(model, probes)
    e = make_edit(model, [record.request], setting)
    with applied(model, e):
        after = scoring.score_probes(model, probes)
    r = record.request
    print(
        f"\nedit: {r.subject!r}: {r.target_true!r} -> {r.target_new!r} with {e.editor} "
        f"(layers {list(e.layers)}, {e.run.seconds:.1f} s)"
    )
    print(f"{'probe':<5} {'P(right) before -> after':>26} {'P(wrong) before -> after':>26}  prompt")
    for i, probe in enumerate(probes):
        b, c = before.iloc[i], after.iloc[i]
        text = probe.prompt if len(probe.prompt) < 70 else "…" + probe.prompt[-69:]
        print(
            f"{probe.kind:<5} {b.p_right:>12.4f} -> {c.p_right:<10.4f} "
            f"{b.p_wrong:>12.4f} -> {c.p_wrong:<10.4f}  {text}  [{probe.right} / {probe.wrong}]"
        )
    if a.out:
        with _writing(a.out):
            e.save(a.out)
        print(f"edit saved to {a.out}")
    return 0
