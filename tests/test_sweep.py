import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from attndrift import data, models
from attndrift.editing import edits, setting
from attndrift.experiments import results, summary, sweep

REPO = Path(__file__).resolve().parents[1]
QUICK = dict(identity_cov=True, steps=3)


@pytest.fixture
def records():
    return data.load_embedded().select(limit=3)


def test_setting_keys_and_validation():
    assert setting.Setting().key == "rome|g=0"
    s = setting.Setting("memit", 0.005, True, layers=(1, 2), steps=5)
    assert s.key == "memit|g=0.005|all|layers=1,2|steps=5"
    assert setting.Setting(weight_decay=1e-3, early_stop_on="nll").key == (
        "rome|g=0|weight_decay=0.001|early_stop_on=nll"
    )
    assert setting.Setting.from_dict(dataclasses.asdict(s)) == s
    with pytest.raises(ValueError, match="editor must be one of"):
        setting.Setting("grace")
    with pytest.raises(ValueError, match="need sadr_gamma > 0"):
        setting.Setting(all_heads=True)
    with pytest.raises(ValueError, match="SADR threshold must be one of"):
        setting.Setting(sadr_gamma=0.1, sadr_threshold="max")
    variant = setting.Setting(sadr_gamma=0.1, sadr_queries="after_subject", sadr_relations=True)
    assert variant.key == "rome|g=0.1|sadr_queries=after_subject|sadr_relations"
    assert variant.sadr().variant == "queries=after_subject,relation_prompts"
    with pytest.raises(ValueError, match="sadr_gamma must be a finite number >= 0, got nan"):
        setting.Setting(sadr_gamma=float("nan"))
    with pytest.raises(
        ValueError, match="layers applies to the memit, pmet and alphaedit editors only"
    ):
        setting.Setting(layers=(1, 2))


def test_setting_grid_and_overrides(tiny_llama):
    assert [s.key for s in setting.grid(sadr_gamma=[0.0, 0.1], all_heads=[True])] == [
        "rome|g=0",
        "rome|g=0.1|all",
    ]
    grid = setting.grid(editor=["rome", "memit"], sadr_gamma=[0.0, 0.1], layer=[2])
    assert [s.key for s in grid] == [
        "rome|g=0|layer=2",
        "rome|g=0.1|layer=2",
        "memit|g=0",
        "memit|g=0.1",
    ]
    cfg = setting.Setting(steps=7, weight_decay=0.01, clamp=0.5, sadr_gamma=0.2).config(tiny_llama)
    assert (cfg.value.steps, cfg.sadr_steps) == (7, None)
    assert (cfg.value.weight_decay, cfg.value.clamp_norm_factor) == (0.01, 0.5)
    mcfg = setting.Setting("memit", mom2_weight=10.0, layers=(0, 2)).config(tiny_llama)
    assert (mcfg.mom2_update_weight, mcfg.layers) == (10.0, (0, 2))


def test_sweep_resumes_without_duplicates(tiny_llama, records, tmp_path):
    out = tmp_path / "r.jsonl"
    settings = [setting.Setting(**QUICK), setting.Setting(sadr_gamma=0.01, **QUICK)]
    sweep.run(tiny_llama, records, settings, out, progress=False)
    lines = results.read(out)
    assert len(lines) == 6
    assert {x.key for x in lines} == {(r.id, s.key) for r in records.records for s in settings}
    first = lines[0]
    prov = first.provenance
    assert prov.version and prov.git and prov.model == tiny_llama.cfg.model_name
    assert prov.fingerprint == models.fingerprint(tiny_llama) and prov.data_sha256
    assert len(first.post) == len(first.pre) > 0
    assert first.drift.factor, "RS/DNS probes carry a drift factor"
    # rerun: nothing to do, nothing appended
    sweep.run(tiny_llama, records, settings, out, progress=False)
    assert out.read_bytes().count(b"\n") == 6
    # a torn last line is cut and its pair redone
    text = out.read_bytes()
    cut = text[: text.rfind(b"\n", 0, len(text) - 1) + 1] + b'{"record": 2, "sett'
    out.write_bytes(cut)
    assert len(results.read(out)) == 5
    sweep.run(tiny_llama, records, settings, out, progress=False)
    again = results.read(out)
    assert len(again) == 6 and b'{"record": 2, "sett' not in out.read_bytes()


def test_summary_matches_direct_evaluation(tiny_llama, records, tmp_path):
    from attndrift import evaluation

    out = tmp_path / "r.jsonl"
    sweep.run(tiny_llama, records, [setting.Setting(**QUICK)], out, progress=False)
    s = summary.by_setting(results.load([out]))
    direct = evaluation.evaluate(tiny_llama, records.records).summary
    for k in ("ES", "NS", "RS", "DNS"):
        assert s["none"].metrics[k].mean == pytest.approx(direct.metrics[k].mean)
        assert s["none"].metrics[k].n == direct.metrics[k].n
    frame = summary.tradeoff(results.load([out]))
    assert list(frame["setting"]) == ["rome|g=0|steps=3|identity_cov"]
    assert list(frame["variant"]) == [""]
    from attndrift import metrics

    row = frame.iloc[0]
    assert row["RS_DNS"] == metrics.harmonic_mean([row["RS"], row["DNS"]]) and row["RS_DNS"] > 0
    both = setting.Setting(sadr_gamma=0.2, sadr_relations=True, relation_kl=5.0)
    assert summary.variant_of(both) == "sadr_relations,relation_kl=5"
    assert summary.variant_of(setting.Setting(sadr_gamma=0.2, sadr_threshold="own")) == (
        "sadr_threshold=own"
    )


def test_summarize_plot_draws_the_map_when_gamma_curves_cannot_be(tiny_llama, records, tmp_path,
                                                                 capsys):  # fmt: skip
    from attndrift import cli

    out = tmp_path / "r.jsonl"
    two = [setting.Setting(**QUICK), setting.Setting(**(QUICK | {"steps": 4}))]  # both γ = 0
    sweep.run(tiny_llama, records, two, out, progress=False)
    plot, csv = tmp_path / "t.html", tmp_path / "t.csv"
    assert cli.main(["summarize", str(out), "--plot", str(plot), "--csv", str(csv)]) == 0
    printed = capsys.readouterr().out
    assert "γ curves not drawn (two settings of rome" in printed
    html = plot.read_text()
    assert "one point per setting" in html and "edit success vs specificity" not in html
    assert len(pd.read_csv(csv)) == 2
    one = ["summarize", str(out), "--settings", two[0].key, "--plot", str(plot)]
    assert cli.main(one) == 0  # one setting per γ: both figures
    printed = capsys.readouterr().out
    assert "γ curves not drawn" not in printed, printed[-300:]
    assert "edit success vs specificity" in plot.read_text()


def test_failure_analysis_from_sweep_lines(tiny_llama, records, tmp_path, capsys):
    from attndrift import models
    from attndrift.analysis import drift

    out = tmp_path / "r.jsonl"
    quick = setting.Setting(**QUICK)
    sweep.run(tiny_llama, records, [quick], out, progress=False)
    lines = results.load([out])
    analysis = summary.drift_vs_failure(lines, quick.key)
    n = sum(len(x.drift.kinds) for x in lines)
    assert len(analysis.probes) == n == analysis.overall.n and n > 3
    assert analysis.factor_per_layer.shape == (n, tiny_llama.cfg.n_layers)
    # the stored numbers are those of a direct measurement under the same edit
    editor = setting.Editor(tiny_llama)
    record = records.records[0]
    e = editor(quick, [record.request])
    probes = [p for p in record.probes(sweep.DRIFT_KINDS) if p.subject in p.prompt]
    variant = models.Variant(tiny_llama, e.hooks(tiny_llama))
    d = drift.measure(tiny_llama, variant, [p.prompt for p in probes], [p.subject for p in probes])
    first = analysis.probes[analysis.probes["record"] == record.id]["factor"].to_numpy()
    np.testing.assert_allclose(first, d.factor().numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="no drift measurements"):
        summary.drift_vs_failure(lines, "memit|g=0")

    from attndrift import cli

    capsys.readouterr()
    plot = tmp_path / "scatter.html"
    assert cli.main(["summarize", str(out), "--drift", quick.key, "--drift-plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    c = analysis.overall
    assert f"{len(records)} edits, {n} RS/DNS probes: Pearson {c.pearson:.3f}" in printed
    # the one-table form: a row per probe kind measured, each kind's own correlation
    table = summary.drift_table(lines)
    for _, row in table.iterrows():
        fa = summary.drift_vs_failure(lines, quick.key, [row["kind"]])
        assert row["probes"] == fa.overall.n and row["edits"] == fa.probes["record"].nunique()
        assert row["drift factor"] == f"{fa.probes['factor'].mean():.2f}"
        assert row["P(o_new)"] == f"{fa.probes['p_new'].mean():.3f}"
    assert set(table["kind"]) == {k for x in lines for k in x.drift.kinds} & {"RS", "DNS"}
    assert table["probes"].sum() == sum(k in ("RS", "DNS") for x in lines for k in x.drift.kinds)
    assert cli.main(["summarize", str(out), "--drift-table", "--markdown"]) == 0
    assert "| setting | kind | edits | probes |" in capsys.readouterr().out
    assert f"Spearman {c.spearman:.3f}" in printed and plot.stat().st_size > 1_000_000


def test_bad_runs(tiny_llama, records, tmp_path):
    with pytest.raises(ValueError, match="at least one setting"):
        sweep.run(tiny_llama, records, [], tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="duplicate settings"):
        sweep.run(tiny_llama, records, [setting.Setting(), setting.Setting()], tmp_path / "x.jsonl")
    with pytest.raises(FileNotFoundError, match="no results"):
        results.load([tmp_path / "none.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1 is not a results line"):
        results.read(bad)


def _cli(*args, env=None):
    return [sys.executable, "-m", "attndrift.cli", *args]


def _sweep_args(out, limit):
    return [
        "sweep", "--model", "tiny-llama", "--limit", str(limit), "--identity-cov",
        "--steps", "3", "--sadr-gamma", "0,0.01", "--out", str(out), "--device", "cpu",
    ]  # fmt: skip


def _env(tmp_path):
    env = dict(os.environ, ATTNDRIFT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def test_kill_9_and_resume(tmp_path):
    out = tmp_path / "killed.jsonl"
    env = _env(tmp_path)
    proc = subprocess.Popen(_cli(*_sweep_args(out, 8)), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = out.read_bytes().count(b"\n")
    assert 3 <= n_before < 16, "killed mid-run"
    subprocess.run(_cli(*_sweep_args(out, 8)), cwd=REPO, env=env, check=True,
                   capture_output=True)  # fmt: skip
    lines = results.read(out)
    keys = [x.key for x in lines]
    assert len(keys) == len(set(keys)) == 16
    # same numbers as an uninterrupted run
    clean = tmp_path / "clean.jsonl"
    subprocess.run(_cli(*_sweep_args(clean, 8)), cwd=REPO, env=env, check=True,
                   capture_output=True)  # fmt: skip
    ref = {x.key: x.post for x in results.read(clean)}
    for x in lines:
        assert x.post == ref[x.key]


def test_two_process_sweep_matches_one_process(tmp_path):
    env = _env(tmp_path)
    one = tmp_path / "one.jsonl"
    subprocess.run(_cli(*_sweep_args(one, 5)), cwd=REPO, env=env, check=True,
                   capture_output=True)  # fmt: skip
    two = tmp_path / "two.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", "-m", "attndrift.cli", *_sweep_args(two, 5)]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    shards = sorted(tmp_path.glob("two.rank*-of-2.jsonl"))
    assert len(shards) == 2
    per_rank = [{x.record for x in results.read(s)} for s in shards]
    assert per_rank[0].isdisjoint(per_rank[1])
    merged = {x.key: x for x in results.load([two])}
    single = {x.key: x for x in results.read(one)}
    assert merged.keys() == single.keys() and len(single) == 10
    for key, x in single.items():
        for a, b in zip(x.post, merged[key].post, strict=True):
            assert a.kind == b.kind
            assert a.p_right == pytest.approx(b.p_right, rel=1e-5)
            assert a.p_wrong == pytest.approx(b.p_wrong, rel=1e-5)
    assert "none (n=5)" in res.stdout


def test_fluency_is_measured_before_and_after(tiny_llama, tmp_path):
    from attndrift import evaluation, generation, metrics

    records = data.load_embedded().select(limit=1)
    out = tmp_path / "fl.jsonl"
    sweep.run(tiny_llama, records, [setting.Setting(**QUICK)], out, fluency=True, progress=False)
    (line,) = results.read(out)
    assert line.fluency_pre > 0 and line.fluency_post > 0
    texts = generation.sample(
        tiny_llama, list(records[0].generation_prompts), max_new_tokens=evaluation.FLUENCY_TOKENS
    )
    assert line.fluency_pre == pytest.approx(metrics.fluency(texts))
    s = summary.by_setting([line])
    assert s["none"].fluency == pytest.approx(line.fluency_pre)
    assert "FL" in metrics.table(s).columns


def test_paired_keeps_records_with_every_setting():
    def line(record, gamma):
        return results.Line(
            record=record,
            setting=setting.Setting(sadr_gamma=gamma),
            editor="rome",
            layers=(1,),
            request=data.load_embedded()[0].request,
            pre=(),
            post=(),
            fluency_pre=None,
            fluency_post=None,
            drift=results.DriftScores((), (), (), (), (), ()),
            steps_run=1,
            final={},
            config={},
            seconds={},
            provenance=None,
        )

    lines = [line(1, 0.0), line(1, 0.1), line(2, 0.0), line(3, 0.1)]
    assert summary.paired(lines) == lines[:2]
    assert summary.paired(lines[2:3]) == lines[2:3]


def test_resume_only_onto_lines_of_the_same_provenance(tiny_llama, tiny, records, tmp_path):
    out = tmp_path / "r.jsonl"
    quick = [setting.Setting(**QUICK)]
    sweep.run(tiny_llama, records, quick, out, progress=False)
    before = out.read_bytes()
    if tiny.cfg.model_name != tiny_llama.cfg.model_name:
        with pytest.raises(ValueError, match=f"{out} was written with model"):
            sweep.run(tiny, records, quick, out, progress=False)
    other = data.Dataset(records.records, path="other.json", sha256="0" * 64)
    with pytest.raises(ValueError, match="was written with data_sha256"):
        sweep.run(tiny_llama, other, quick, out, progress=False)
    with pytest.raises(ValueError, match="repeat an id"):
        sweep.run(tiny_llama, list(records.records) * 2, quick, out, progress=False)
    assert out.read_bytes() == before  # refused before anything was written


def test_out_must_be_a_results_file(tiny_llama, records, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nlast line without newline")
    with pytest.raises(ValueError, match="not a results line"):
        sweep.run(tiny_llama, records, [setting.Setting(**QUICK)], notes, progress=False)
    assert notes.read_text() == "my notes\nlast line without newline"


def test_gz_copy_counts_as_done_and_is_summarized(tiny_llama, records, tmp_path):
    import gzip

    out = tmp_path / "r.jsonl"
    sweep.run(tiny_llama, records, [setting.Setting(**QUICK)], out, progress=False)
    gz = tmp_path / "r.jsonl.gz"
    gz.write_bytes(gzip.compress(out.read_bytes()))
    out.unlink()
    assert len(results.load([out])) == len(records)  # read from the .gz copy
    sweep.run(tiny_llama, records, [setting.Setting(**QUICK)], out, progress=False)
    assert not out.exists() or out.stat().st_size == 0  # nothing left to do


def test_sequential_and_batch_groups(tiny_llama, records, tmp_path):
    from attndrift import evaluation, models
    from attndrift.editing import memit

    snap = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    seq = setting.Setting(sequential=3, **QUICK)
    batch = setting.Setting("memit", batch=3, mom2_weight=1.0, **QUICK)
    out = tmp_path / "groups.jsonl"
    sweep.run(tiny_llama, records, [seq, batch], out, progress=False)
    for n, p in tiny_llama.named_parameters():
        assert torch.equal(p, snap[n]), n  # restored after the sequence
    lines = {x.key: x for x in results.read(out)}
    ids = [r.id for r in records.records]
    assert {k[0] for k in lines} == set(ids) and len(lines) == 6
    assert all(x.extra["group"] == ids for x in lines.values())
    # the sequence by hand: each edit on the weights the previous ones left, all scored after
    editor = setting.Editor(tiny_llama)
    with edits.restored(tiny_llama, (seq.config(tiny_llama).layer,)):
        for r in records.records:
            edits.add_to_weights(tiny_llama, editor(seq, [r.request]))
        for r in records.records:
            want = evaluation.evaluate(tiny_llama, [r]).probes["p_right"].tolist()
            got = [p.p_right for p in lines[(r.id, seq.key)].post]
            np.testing.assert_allclose(got, want, rtol=1e-5)
    # the batch: one MEMIT edit of the three requests
    e = memit.edit(tiny_llama, [r.request for r in records.records], batch.config(tiny_llama),
                   templates=editor.templates(batch.config(tiny_llama)))  # fmt: skip
    variant = models.Variant(tiny_llama, e.hooks(tiny_llama))
    for r in records.records:
        want = evaluation.evaluate(variant, [r]).probes["p_right"].tolist()
        np.testing.assert_allclose(
            [p.p_right for p in lines[(r.id, batch.key)].post], want, rtol=1e-5
        )
    with pytest.raises(ValueError, match="batch editing needs a batch editor"):
        setting.Setting(batch=2)


def test_a_group_of_one_is_the_plain_edit():
    plain = setting.Setting("memit", mom2_weight=1.0)
    assert setting.Setting("memit", batch=1, mom2_weight=1.0) == plain
    assert setting.Setting("rome", sequential=1).key == setting.Setting("rome").key == "rome|g=0"
    assert setting.grid(editor=["memit"], batch=[1, 3]) == [
        setting.Setting("memit"), setting.Setting("memit", batch=3)
    ]  # fmt: skip


def test_a_batch_grid_optimises_each_target_once(tiny_llama, records, tmp_path, monkeypatch):
    from attndrift.editing import value

    calls, real = [], value.optimise_value
    monkeypatch.setattr(value, "optimise_value", lambda o, **k: calls.append(o) or real(o, **k))
    settings = setting.grid(editor=["memit"], batch=[1, 3], mom2_weight=[1.0], **{
        k: [v] for k, v in QUICK.items()})  # fmt: skip
    sweep.run(tiny_llama, records, settings, tmp_path / "b.jsonl", progress=False)
    assert len(results.read(tmp_path / "b.jsonl")) == 2 * len(records.records)
    assert len(calls) == len(records.records)  # each record's z once, for both batch sizes


def test_alphaedit_sequences_carry_the_previous_keys(tiny_llama, records, tmp_path, monkeypatch):
    from attndrift.editing import registry

    monkeypatch.setenv("ATTNDRIFT_CACHE", str(tmp_path / "cache"))
    s = setting.Setting("alphaedit", sequential=2, steps=3)
    states = []
    spec = registry.get("alphaedit")
    real = spec.edit_in_sequence

    def spy(*args, **kwargs):
        states.append(kwargs.get("state"))
        return real(*args, **kwargs)

    # the Editor calls the editor through its registry entry
    monkeypatch.setitem(
        registry._SPECS, "alphaedit", dataclasses.replace(spec, edit_in_sequence=spy)
    )
    editor = setting.Editor(tiny_llama)
    snap = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    with edits.restored(tiny_llama, s.config(tiny_llama).layers):
        out = editor.sequence(s, [r.request for r in records.records[:2]])
    assert len(out) == 2 and states[0] is None and states[1] is not None
    for n, p in tiny_llama.named_parameters():
        assert torch.equal(p, snap[n]), n


def test_two_concurrent_sweeps_on_one_out(tmp_path):
    """A second sweep onto a file another sweep is writing is refused at once, naming the
    first one's process; the file holds every (record, setting) once; Ctrl-C stops the first
    with one line, and the lock goes with it."""
    out = tmp_path / "shared.jsonl"
    env = _env(tmp_path)
    args = ["sweep", "--model", "tiny-llama", "--limit", "40", "--identity-cov", "--steps", "50",
            "--out", str(out), "--device", "cpu"]  # fmt: skip
    first = subprocess.Popen(_cli(*args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and (not out.exists() or b"\n" not in out.read_bytes()):
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        second = subprocess.run(_cli(*args), cwd=REPO, env=env, capture_output=True, text=True)
        assert first.poll() is None, "the first sweep ended before the second started"
        assert second.returncode == 2
        last = second.stderr.strip().splitlines()[-1]
        assert re.fullmatch(
            rf"attndrift sweep: error: --out {re.escape(str(out))} is being written by another "
            rf"sweep \(pid {first.pid}: .*attndrift\.cli sweep .*\): wait for it to finish, or "
            r"pass another --out",
            last,
        ), last
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130
    lines = [x for x in err.splitlines() if x.startswith("attndrift")]
    assert lines == ["attndrift sweep: interrupted; rerun the same command to resume"], err[-2000:]
    keys = [x.key for x in results.read(out)]
    assert keys and len(keys) == len(set(keys)) and out.read_bytes().endswith(b"\n")
    # the lock went with the process: the same command takes the file again
    args[args.index("--limit") + 1] = str(len(keys))
    again = subprocess.run(_cli(*args), cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [x.key for x in results.read(out)] == keys  # nothing to do: nothing appended


def test_a_last_line_without_its_newline_is_kept(tiny_llama, tmp_path):
    """A complete last line that lacks its newline (a file edited by hand) is kept, also when
    the rerun's --records leave its record out; only an unparseable tail is cut."""
    out = tmp_path / "r.jsonl"
    quick = [setting.Setting(**QUICK)]
    four = data.load_embedded().select(limit=4)
    sweep.run(tiny_llama, four, quick, out, progress=False)
    text = out.read_bytes()
    out.write_bytes(text[:-1])  # the newline of the last line removed
    assert len(results.read(out)) == 4
    sweep.run(tiny_llama, four.select(ids=[r.id for r in four.records[:3]]), quick, out,
              progress=False)  # fmt: skip
    assert out.read_bytes() == text  # the newline completed, the line kept, nothing redone
    assert [x.key for x in results.read(out)] == [(r.id, quick[0].key) for r in four.records]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_without_peers_stops_with_one_line(rank, tmp_path):
    """Under torchrun's variables with no other rank: a timeout, then one line that says so
    (rank 0 waits for the others, rank 1 for the master)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peers = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env = _env(tmp_path) | peers | {"RANK": str(rank), "WORLD_SIZE": "2"}
    env["ATTNDRIFT_RENDEZVOUS_TIMEOUT"] = "2"
    args = ["sweep", "--model", "tiny-llama", "--records", "0", "--out", str(tmp_path / "r.jsonl")]
    t0 = time.time()
    res = subprocess.run(_cli(*args), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"attndrift sweep: error: RuntimeError: rank {rank} of 2: the other ranks did not join "
        rf"at 127\.0\.0\.1:{port} within 2 s \(.*\): start every rank with torchrun "
        r"\(ATTNDRIFT_RENDEZVOUS_TIMEOUT sets the wait\)",
        last,
    ), last
    assert time.time() - t0 < 240
    assert not list(tmp_path.glob("r*.jsonl"))  # nothing written


def test_summarize_keeps_provenances_apart_only_when_asked(tmp_path, capsys):
    """Results of two models over the same (record, setting): refused together; with
    --by-provenance, one table per provenance, each labelled."""
    from attndrift import cli
    from tests.helpers import make_line

    prov = results.Provenance("tiny-llama-s0", "0123456789abcdef", "/x/d.json", "a" * 64,
                              "0.1.0", "g1")  # fmt: skip
    other = dataclasses.replace(prov, model="tiny-gpt2-s0", fingerprint="fedcba9876543210")
    for name, p, ok in (("a", prov, 1), ("b", other, 0)):
        for record in (0, 1):
            line = make_line(record, [("ES", ok), ("NS", 1)])
            results.append(tmp_path / f"{name}.jsonl", dataclasses.replace(line, provenance=p))
    files = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    with pytest.raises(ValueError, match="the results mix 2 provenances"):
        results.load(files)
    assert cli.main(["summarize", *files, "--by-provenance"]) == 0
    out = capsys.readouterr().out
    labels = [x for x in out.splitlines() if x.startswith("provenance: ")]
    assert labels == [
        "provenance: tiny-llama-s0 (01234567), data d.json (aaaaaaaa), attndrift 0.1.0",
        "provenance: tiny-gpt2-s0 (fedcba98), data d.json (aaaaaaaa), attndrift 0.1.0",
    ]
    rows = [x.split()[2] for x in out.splitlines() if x.startswith("rome|g=0 (n=2)")]
    assert rows == ["100.0", "0.0"]  # ES of each model's lines, in their own table
    # another git revision of the same version: one provenance (a resumed sweep's lines)
    newer = dataclasses.replace(prov, git="g2")
    line = dataclasses.replace(make_line(2, [("ES", 1), ("NS", 1)]), provenance=newer)
    results.append(tmp_path / "a.jsonl", line)
    assert len(results.load([files[0]])) == 3
