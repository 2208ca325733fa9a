"""Fault injection: Ctrl-C at any moment of an edit leaves the model exactly as it was.

A KeyboardInterrupt is raised at the N-th traced line event (``sys.settrace``: every Python
line of the call and of everything it calls, attndrift, TransformerLens and PyTorch alike) of
``rome.edit``, ``memit.edit`` and a forward pass under ``edits.applied``, N drawn uniformly
within the call's length (its line events, counted once without interruption) from a fixed
seed. After every draw: every parameter is bit-exact (values and strides), ``requires_grad``
flags are as before, no hook point holds a hook (TransformerLens' lists and torch's own
tables) and ``model.context_level`` is back to 0; torch's grad mode and the thread's signal
mask are as before.

The command line under faults (Ctrl-C in a sweep, a full disk, a cache of another user,
FIFOs and devices where files are expected, damaged caches): one line each (or a warning and
a recomputation), the exit status it promises, and the files intact.
"""

import errno
import json
import logging
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from attndrift import cli, data, models
from attndrift.editing import edits, memit, rome
from attndrift.editing.sadr import SadrConfig
from attndrift.editing.value import ValueConfig
from attndrift.experiments import results
from tests.helpers import TEMPLATES, request

REQ = request(prompt="The Eiffel Tower is located in")
OTHER = data.EditRequest(
    subject="Louvre", prompt="The Louvre is in", target_true="Paris", target_new="Berlin"
)

DRAWS = {"rome": 80, "rome+sadr": 20, "memit": 50, "applied": 70}  # 220 draws in all


#: the test run's runtime type checks (not there outside the tests): their own lines untraced
_CHECKERS = ("<@beartype", "/beartype/", "/jaxtyping/")
#: weak reference callbacks: called from C, like ``__del__``
_FINALIZERS = ("/weakref.py", "/_weakrefset.py")


def _untraced(frame, depth: int = 8) -> bool:
    """Type-check wrappers; finalizers (``__del__``, weak reference callbacks) and what they
    call: Python ignores an exception raised there, so it would not interrupt the call."""
    if any(s in frame.f_code.co_filename for s in _CHECKERS):
        return True
    f = frame
    for _ in range(depth):
        if f is None:
            return False
        if f.f_code.co_name == "__del__" or any(s in f.f_code.co_filename for s in _FINALIZERS):
            return True
        f = f.f_back
    return False


class _Tracer:
    """A trace function counting line events; raises KeyboardInterrupt at event ``at``."""

    def __init__(self, at: int | None = None):
        self.at, self.count = at, 0

    def __call__(self, frame, event, arg):
        if event == "call" and _untraced(frame):
            return None
        if event == "line":
            self.count += 1
            if self.count == self.at:
                raise KeyboardInterrupt(f"injected at line event {self.at}")
        return self


def _traced(fn, tracer: _Tracer):
    sys.settrace(tracer)
    try:
        return fn()
    finally:
        sys.settrace(None)


def _state(model) -> dict:
    return {
        n: (p.detach().clone(), p.stride(), p.requires_grad) for n, p in model.named_parameters()
    }


def _assert_intact(model, state: dict, where: str) -> None:
    for n, p in model.named_parameters():
        saved, stride, grad = state[n]
        assert torch.equal(p, saved), f"{where}: {n} changed"
        assert p.stride() == stride, f"{where}: {n}: strides changed"
        assert p.requires_grad == grad, f"{where}: {n}: requires_grad changed"
    hooked = [k for k, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
    assert not hooked, f"{where}: hooks left on {hooked[:3]}"
    hooked = [k for k, hp in model.hook_dict.items() if hp._forward_hooks or hp._backward_hooks]
    assert not hooked, f"{where}: torch hooks left on {hooked[:3]}"
    assert model.context_level == 0, f"{where}: context_level {model.context_level}"
    assert torch.is_grad_enabled(), f"{where}: grad mode left off"
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set(), f"{where}: signals blocked"


@pytest.fixture(scope="module")
def calls():
    """name -> (model, the call): each a small, complete use of the library."""
    llama, gpt2, gptj = (models.tiny_model(a, seed=0) for a in ("llama", "gpt2", "gptj"))
    # mixed requires_grad flags: the optimisation freezes them and must put them back
    gpt2.blocks[0].attn.W_Q.requires_grad_(False)
    value = ValueConfig(steps=2)
    rome_cfg = rome.RomeConfig(layer=1, covariance=None, value=value)
    sadr_cfg = rome.RomeConfig(layer=2, covariance=None, value=value)  # SADR reads layer 3
    memit_cfg = memit.MemitConfig(layers=(1, 2), covariance=None, value=value)
    saved = rome.edit(gptj, REQ, rome_cfg, templates=TEMPLATES)
    tokens = torch.tensor([[1, 5, 9, 13, 17, 21]])

    def forward_under_edit():
        with edits.applied(gptj, saved):
            return gptj(tokens)

    return {
        "rome": (llama, lambda: rome.edit(llama, REQ, rome_cfg, templates=TEMPLATES)),
        "rome+sadr": (
            gpt2,
            lambda: rome.edit(gpt2, REQ, sadr_cfg, sadr=SadrConfig(gamma=0.5), templates=TEMPLATES),
        ),
        "memit": (
            gptj,
            lambda: memit.edit(gptj, [REQ, OTHER], memit_cfg, templates=TEMPLATES),
        ),
        "applied": (gptj, forward_under_edit),
    }


@pytest.mark.parametrize("name", list(DRAWS))
def test_interrupt_anywhere_restores_everything(name, calls):
    model, call = calls[name]
    state = _state(model)
    call()  # warm caches (fingerprint, imports) so that the count below is what draws see
    counter = _Tracer()
    _traced(call, counter)
    length = counter.count
    assert length > 100, length
    print(f"{name}: {length} line events")
    _assert_intact(model, state, f"{name} uninterrupted")
    rng = random.Random(f"{name}-0")
    outcomes: Counter = Counter()
    for _ in range(DRAWS[name]):
        at = rng.randint(1, length)
        try:
            _traced(call, _Tracer(at))
            outcomes["completed"] += 1
        except KeyboardInterrupt:
            outcomes["interrupted"] += 1
        _assert_intact(model, state, f"{name}, interrupt at line event {at} of {length}")
    assert outcomes["interrupted"] >= 0.9 * DRAWS[name], outcomes
    # the model still works: an uninterrupted call after all the faults gives the same edit
    if name != "applied":
        again = call()
        _assert_intact(model, state, f"{name} after the draws")
        assert again.layers


def test_draw_count():
    assert sum(DRAWS.values()) >= 200


# --------------------------------------------------------------------------------------------
# The command line under faults: one line each, the status it promises, files intact
# --------------------------------------------------------------------------------------------

SWEEP = ["sweep", "--model", "tiny-llama", "--device", "cpu", "--identity-cov", "--steps", "2"]
FULL = "No space left on device"


def _disk_full(path_part: str):
    """An ``os.write`` that fails like a full disk on files whose path contains ``path_part``
    (no file name in the error, as the kernel gives it)."""
    real = os.write

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if path_part in target:
            raise OSError(errno.ENOSPC, FULL)
        return real(fd, data)

    return write


def _interrupt_second_append(mp, w: Path) -> None:
    real, calls = results.append, []

    def append(path, line):
        calls.append(line)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, line)

    mp.setattr(results, "append", append)


def _fail_csv(mp, w: Path) -> None:
    import pandas as pd

    def to_csv(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, FULL)

    mp.setattr(pd.DataFrame, "to_csv", to_csv)


def _fail_save_file(mp, w: Path) -> None:
    import safetensors.torch

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # the temporary file is removed
        raise OSError(errno.ENOSPC, FULL)

    mp.setattr(safetensors.torch, "save_file", save_file)


def _refuse_cache_temporaries(mp, w: Path) -> None:
    import tempfile

    def mkstemp(*args, dir=None, prefix="", **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}abc.tmp")

    mp.setattr(tempfile, "mkstemp", mkstemp)


#: (id, fault injected, arguments ({w}: the folder), exit status, regex of the one line,
#:  files expected in the folder afterwards)
FAULTS = [
    (
        "ctrl-c-in-sweep",
        _interrupt_second_append,
        [*SWEEP, "--limit", "3", "--out", "{w}/r.jsonl"],
        130,
        r"^attndrift sweep: interrupted; rerun the same command to resume$",
        {"r.jsonl"},
    ),
    (
        "disk-full-in-sweep",
        lambda mp, w: mp.setattr(os, "write", _disk_full("r.jsonl")),
        [*SWEEP, "--limit", "2", "--out", "{w}/r.jsonl"],
        2,
        rf"^attndrift sweep: error: .*/r\.jsonl: {FULL}$",
        {"r.jsonl"},
    ),
    (
        "disk-full-eval-csv",
        _fail_csv,
        ["eval", "--model", "tiny-llama", "--device", "cpu", "--limit", "1", "--csv", "{w}/p.csv"],
        2,
        rf"^attndrift eval: error: .*/p\.csv: {FULL}$",
        set(),
    ),
    (
        "disk-full-edit-out",
        _fail_save_file,
        [
            "edit",
            "--model",
            "tiny-llama",
            "--device",
            "cpu",
            "--identity-cov",
            "--steps",
            "2",
            "--record",
            "0",
            "--out",
            "{w}/e.safetensors",
        ],
        2,
        rf"^attndrift edit: error: .*/e\.safetensors: cannot write the edit \(.*{FULL}.*\)$",
        set(),
    ),
    (
        "cache-of-another-user",
        _refuse_cache_temporaries,
        ["edit", "--model", "tiny-llama", "--device", "cpu", "--steps", "2", "--record", "0"],
        2,
        r"^attndrift edit: error: .*/cache/corpora/tiny-llama-s0-[0-9a-f]+-s0-t32-n128\.json: "
        r"Permission denied \(a cache of another user\? set ATTNDRIFT_CACHE",
        set(),
    ),
]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNDRIFT_CACHE", str(tmp_path / "cache"))
    w = tmp_path / "work"
    w.mkdir()
    return w


@pytest.mark.parametrize(
    ("inject", "args", "status", "message", "left"),
    [c[1:] for c in FAULTS],
    ids=[c[0] for c in FAULTS],
)
def test_command_line_under_faults(inject, args, status, message, left, folder, monkeypatch,
                                   capsys):  # fmt: skip
    argv = [a.replace("{w}", str(folder)) for a in args]
    with monkeypatch.context() as mp:
        inject(mp, folder)
        got = cli.main(argv)
    assert got == status
    lines = [x.rsplit("\r", 1)[-1].rstrip() for x in capsys.readouterr().err.split("\n")]
    said = [x for x in lines if x.startswith("attndrift")]
    assert len(said) == 1 and re.search(message, said[0]), said
    assert {p.name for p in folder.iterdir()} == left  # nothing else created (no temporary)
    for name in left:  # results: complete lines only, and the same command resumes
        data = (folder / name).read_bytes()
        assert not data or data.endswith(b"\n")
        before = results.read(folder / name)
        assert cli.main(argv) == 0
        after = results.read(folder / name)
        assert [x.key for x in after[: len(before)]] == [x.key for x in before]
        assert len({x.key for x in after}) == len(after) > len(before)


def test_fault_count():
    assert len(FAULTS) >= 5 and len({c[0] for c in FAULTS}) == len(FAULTS)


#: unblocks a reader stuck on FIFOs after a delay (a separate process: a reader blocked in C
#: may hold the GIL, so no thread of the test would run)
_UNBLOCKER = """
import os, sys, time
time.sleep(float(sys.argv[1]))
while True:
    for fifo in sys.argv[2:]:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    time.sleep(0.2)
"""


def _in_time(fn, fifos, seconds: float = 120.0):
    """``fn()``, failing (not hanging the suite) if it blocks on one of the ``fifos``: after
    ``seconds`` another process opens them for writing, the reader sees their end, and the
    test fails on the time it took."""
    helper = subprocess.Popen([sys.executable, "-c", _UNBLOCKER, str(seconds), *map(str, fifos)])
    t0 = time.monotonic()
    try:
        value = fn()
    finally:
        helper.kill()
        helper.wait()
        assert time.monotonic() - t0 < seconds, f"blocked on {[str(f) for f in fifos]}"
    return value


@pytest.mark.parametrize("what", ["results", "edit", "data-device"])
def test_special_files_do_not_block(what, folder, capsys):
    """A FIFO where a results or edit file is expected, a device as data: refused at once."""
    fifo = folder / "fifo"
    os.mkfifo(fifo)
    args = {
        "results": ["summarize", str(fifo)],
        "edit": ["drift", "--model", "tiny-llama", "--device", "cpu", "--edit", str(fifo),
                 "--out", str(folder / "d")],
        "data-device": ["eval", "--model", "tiny-llama", "--data", "/dev/zero"],
    }[what]  # fmt: skip
    assert _in_time(lambda: cli.main(args), [fifo]) == 2
    err = capsys.readouterr().err
    assert re.search(r"(fifo|/dev/zero) is (not a regular file|a device)", err), err


def test_cache_files_that_are_not_regular_are_recomputed(folder, caplog):
    """A FIFO in place of a covariance or corpus cache file: recomputed (with a warning that
    names the file), never read; the new cache file replaces it."""
    from attndrift.editing import covariance

    model = models.tiny_model("llama", seed=0)
    cfg = rome.preset(model).covariance
    first = covariance.layer_covariance(model, 1, cfg, progress=False)
    cache = Path(os.environ["ATTNDRIFT_CACHE"])
    (cov_file,) = (cache / "covariance").glob("*.safetensors")
    (corpus_file,) = (cache / "corpora").glob("*.json")
    for f in (cov_file, corpus_file):
        f.unlink()
        os.mkfifo(f)
    with caplog.at_level(logging.WARNING):
        again = _in_time(
            lambda: covariance.layer_covariance(model, 1, cfg, progress=False),
            [cov_file, corpus_file],
        )
    assert torch.equal(first, again)
    text = caplog.text
    assert f"covariance cache {cov_file} is not a regular file: recomputing" in text
    assert f"damaged corpus cache {corpus_file} (" in text and "not a regular file" in text
    assert cov_file.is_file() and corpus_file.is_file()  # the FIFOs replaced
    assert (
        stat.S_IMODE(cov_file.stat().st_mode) == stat.S_IMODE(corpus_file.stat().st_mode) == 0o644
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [("{}", "not a JSON list of texts"), ('["one text"]', "1 texts, its name says 128"),
     ("[1, 2]", "not a JSON list of texts"), ("[", "Expecting value")],
)  # fmt: skip
def test_damaged_corpus_cache_is_resampled(content, problem, folder, caplog):
    """A corpus cache that is not what its name says is named, removed and sampled again
    (not reported as a corpus too small)."""
    from attndrift.editing import covariance

    model = models.tiny_model("llama", seed=0)
    texts = covariance.sampled_corpus(model, 100, 32, 0)
    (path,) = (Path(os.environ["ATTNDRIFT_CACHE"]) / "corpora").glob("*-n128.json")
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        again = covariance.sampled_corpus(model, 100, 32, 0)
    assert again == texts
    assert f"damaged corpus cache {path} ({problem}" in caplog.text
    assert json.loads(path.read_text())[:100] == texts


def test_model_cache_file_replaced_by_a_fifo_is_converted_again(folder, monkeypatch, caplog):
    """model.safetensors replaced by a FIFO: named in a warning, converted again; no read."""
    from attndrift.models import embedded

    target = embedded._embedded_cache()
    state = {"embed.W_E": torch.arange(12.0).reshape(4, 3)}
    embedded.write_cache(target, state, models.tiny_tokenizer(), {"d_vocab": 4, "n_layers": 1})
    weights = target / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    with caplog.at_level(logging.WARNING):
        assert _in_time(lambda: embedded._verified(target), [weights]) is None
    assert "model.safetensors is not a regular file: converting again" in caplog.text


def test_caches_are_shared_files_whatever_the_umask(folder):
    """Cache files 0644 and folders 0755 under a private umask (077): a second user of the
    cache reads them."""
    from attndrift.models import embedded, loading

    old = os.umask(0o077)
    try:
        target = embedded._embedded_cache()
        state = {"embed.W_E": torch.arange(12.0).reshape(4, 3)}
        embedded.write_cache(target, state, models.tiny_tokenizer(), {"d_vocab": 4, "n_layers": 1})
        path = loading.atomic_write(folder / "cache" / "deep" / "er" / "c.json",
                                    lambda tmp: tmp.write_text("[]"))  # fmt: skip
    finally:
        os.umask(old)
    cache = Path(os.environ["ATTNDRIFT_CACHE"])
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [*cache.rglob("*"), path, path.parent]}
    assert modes
    for p, mode in modes.items():
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))
