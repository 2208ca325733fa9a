import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from attndrift import data, sweep

REPO = Path(__file__).resolve().parents[1]
QUICK = dict(identity_cov=True, steps=3)


@pytest.fixture
def records():
    return data.load_embedded().select(limit=3)


def test_setting_keys_and_validation():
    assert sweep.Setting().key == "rome|g=0"
    s = sweep.Setting("memit", 0.005, True, layers=(1, 2), steps=5)
    assert s.key == "memit|g=0.005|all|layers=1,2|steps=5"
    with pytest.raises(ValueError, match="editor must be"):
        sweep.Setting("grace")
    with pytest.raises(ValueError, match="all_heads needs"):
        sweep.Setting(all_heads=True)


def test_sweep_resumes_without_duplicates(tiny_llama, records, tmp_path):
    out = tmp_path / "r.jsonl"
    settings = [sweep.Setting(**QUICK), sweep.Setting(sadr_gamma=0.01, **QUICK)]
    sweep.run(tiny_llama, records, settings, out, progress=False)
    lines = sweep.read_lines(out)
    assert len(lines) == 6
    assert {(x["record"], x["setting"]) for x in lines} == {
        (r.id, s.key) for r in records.records for s in settings
    }
    first = lines[0]
    assert first["version"] and first["git"] and first["model"] == tiny_llama.cfg.model_name
    assert len(first["post"]["probes"]) == len(first["pre"]["probes"]) > 0
    assert first["drift"]["factor"], "RS/DNS probes carry a drift factor"
    # rerun: nothing to do, nothing appended
    sweep.run(tiny_llama, records, settings, out, progress=False)
    assert out.read_bytes().count(b"\n") == 6
    # a torn last line is cut and its pair redone
    text = out.read_bytes()
    cut = text[: text.rfind(b"\n", 0, len(text) - 1) + 1] + b'{"record": 2, "sett'
    out.write_bytes(cut)
    assert len(sweep.read_lines(out)) == 5
    sweep.run(tiny_llama, records, settings, out, progress=False)
    again = sweep.read_lines(out)
    assert len(again) == 6 and b'{"record": 2, "sett' not in out.read_bytes()


def test_summary_matches_direct_evaluation(tiny_llama, records, tmp_path):
    from attndrift import evaluation

    out = tmp_path / "r.jsonl"
    sweep.run(tiny_llama, records, [sweep.Setting(**QUICK)], out, progress=False)
    s = sweep.summarize(sweep.load_results([out]))
    direct = evaluation.evaluate(tiny_llama, records.records).summary
    for k in ("ES", "NS", "RS", "DNS"):
        assert s["none"].metrics[k].mean == pytest.approx(direct.metrics[k].mean)
        assert s["none"].metrics[k].n == direct.metrics[k].n
    frame = sweep.tradeoff(sweep.load_results([out]))
    assert list(frame["setting"]) == ["rome|g=0|steps=3|identity_cov"]


def test_failure_analysis_from_sweep_lines(tiny_llama, records, tmp_path, capsys):
    from attndrift import drift, models

    out = tmp_path / "r.jsonl"
    setting = sweep.Setting(**QUICK)
    sweep.run(tiny_llama, records, [setting], out, progress=False)
    lines = sweep.load_results([out])
    analysis = sweep.failure_analysis(lines, setting.key)
    n = sum(len(x["drift"]["kinds"]) for x in lines)
    assert len(analysis.probes) == n == analysis.overall.n and n > 3
    assert analysis.factor_per_layer.shape == (n, tiny_llama.cfg.n_layers)
    # the stored numbers are those of a direct measurement under the same edit
    editor = sweep.Editor(tiny_llama)
    record = records.records[0]
    e = editor(setting, [record.request])
    probes = [p for p in record.probes(sweep.DRIFT_KINDS) if p.subject in p.prompt]
    variant = models.Variant(tiny_llama, e.hooks(tiny_llama))
    d = drift.measure(tiny_llama, variant, [p.prompt for p in probes], [p.subject for p in probes])
    first = analysis.probes[analysis.probes["record"] == record.id]["factor"].to_numpy()
    np.testing.assert_allclose(first, d.factor().numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="no drift measurements"):
        sweep.failure_analysis(lines, "memit|g=0")

    from attndrift import cli

    capsys.readouterr()
    plot = tmp_path / "scatter.html"
    assert cli.main(["summarize", str(out), "--drift", setting.key, "--drift-plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    c = analysis.overall
    assert f"{len(records)} edits, {n} RS/DNS probes: Pearson {c.pearson:.3f}" in printed
    assert f"Spearman {c.spearman:.3f}" in printed and plot.stat().st_size > 1_000_000


def test_bad_runs(tiny_llama, records, tmp_path):
    with pytest.raises(ValueError, match="at least one setting"):
        sweep.run(tiny_llama, records, [], tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="duplicate settings"):
        sweep.run(tiny_llama, records, [sweep.Setting(), sweep.Setting()], tmp_path / "x.jsonl")
    with pytest.raises(FileNotFoundError, match="no results"):
        sweep.load_results([tmp_path / "none.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        sweep.read_lines(bad)


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
    lines = sweep.read_lines(out)
    keys = [(x["record"], x["setting"]) for x in lines]
    assert len(keys) == len(set(keys)) == 16
    # same numbers as an uninterrupted run
    clean = tmp_path / "clean.jsonl"
    subprocess.run(_cli(*_sweep_args(clean, 8)), cwd=REPO, env=env, check=True,
                   capture_output=True)  # fmt: skip
    ref = {(x["record"], x["setting"]): x["post"]["probes"] for x in sweep.read_lines(clean)}
    for x in lines:
        assert x["post"]["probes"] == ref[(x["record"], x["setting"])]


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
    per_rank = [{x["record"] for x in sweep.read_lines(s)} for s in shards]
    assert per_rank[0].isdisjoint(per_rank[1])
    merged = {(x["record"], x["setting"]): x for x in sweep.load_results([two])}
    single = {(x["record"], x["setting"]): x for x in sweep.read_lines(one)}
    assert merged.keys() == single.keys() and len(single) == 10
    for key, x in single.items():
        for a, b in zip(x["post"]["probes"], merged[key]["post"]["probes"], strict=True):
            assert a[0] == b[0]
            assert a[1] == pytest.approx(b[1], rel=1e-5) and a[2] == pytest.approx(b[2], rel=1e-5)
    assert "none (n=5)" in res.stdout


def test_fluency_is_measured_before_and_after(tiny_llama, tmp_path):
    from attndrift import evaluation, generation, metrics

    records = data.load_embedded().select(limit=1)
    out = tmp_path / "fl.jsonl"
    sweep.run(tiny_llama, records, [sweep.Setting(**QUICK)], out, fluency=True, progress=False)
    (line,) = sweep.read_lines(out)
    assert line["pre"]["summary"]["FL"] > 0 and line["post"]["summary"]["FL"] > 0
    texts = generation.sample(
        tiny_llama, list(records[0].generation_prompts), max_new_tokens=evaluation.FLUENCY_TOKENS
    )
    assert line["pre"]["summary"]["FL"] == pytest.approx(metrics.fluency(texts))
    s = sweep.summarize([line])
    assert s["none"].fluency == pytest.approx(line["pre"]["summary"]["FL"])
    assert "FL" in metrics.table(s).columns


def test_paired_keeps_records_with_every_setting():
    lines = [
        {"record": 1, "setting": "a"},
        {"record": 1, "setting": "b"},
        {"record": 2, "setting": "a"},
        {"record": 3, "setting": "b"},
    ]
    assert sweep.paired(lines) == lines[:2]
    assert sweep.paired(lines[2:3]) == lines[2:3]
