"""Every bad input is refused with one line that names the problem, and changes nothing.

A table of bad inputs to the command line (``attndrift.cli.main`` in-process) and to the API
(configs, loaders, editors, analyses). Each case asserts:

* the command exits with status 2 (the API raises the expected exception type);
* the message is ONE line and matches the case's regex (it says what is wrong);
* no file of the working folder was created, removed or changed (paths, bytes, mtimes);
* the models involved are unchanged (every parameter bit-exact, strides, ``requires_grad``)
  and hook-free.

Only tiny random models: the command line's ``--model tiny-llama`` / ``tiny-gpt2`` resolve
to this module's models, so that the checks above see the very models the commands used.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
from pathlib import Path

import pytest
import torch

from attndrift import _io, cli, data, models, scoring
from attndrift.analysis import drift, patching
from attndrift.editing import covariance, edits, memit, rome, setting
from attndrift.editing.covariance import CovarianceConfig
from attndrift.editing.kit import TemplateConfig
from attndrift.editing.sadr import SadrConfig
from attndrift.editing.value import ValueConfig
from attndrift.experiments import results, sweep
from attndrift.experiments.demo import DemoConfig
from attndrift.models import embedded, loading
from tests.helpers import REQUEST, TEMPLATES, skip_if_cuda_here

NAN, INF = math.nan, math.inf
REQ = REQUEST
LONG_PROMPT = " ".join(["word"] * 2000) + " Paris is the capital of"
#: a quick on-the-fly edit for the command line
TINY = ["--model", "tiny-llama", "--device", "cpu"]
QUICK = [*TINY, "--identity-cov", "--steps", "2"]
EDIT = ["edit", *QUICK, "--record", "0"]
EVAL = ["eval", "--model", "tiny-llama", "--device", "cpu"]
SWEEP = ["sweep", *QUICK, "--records", "0"]
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _quick_rome(layer: int = 1) -> rome.RomeConfig:
    return rome.RomeConfig(layer=layer, covariance=None, value=ValueConfig(steps=2))


# --------------------------------------------------------------------------------------------
# The world every case runs in: a working folder, a cache folder, the tiny models
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class World:
    dir: Path  # the working folder (snapshotted around every case)
    cache: Path  # $ATTNDRIFT_CACHE
    llama: object
    gpt2: object
    dataset: data.Dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("bad_inputs")
    w = root / "work"
    w.mkdir()
    cache = root / "cache"
    gpt2 = models.tiny_model("gpt2", seed=0)
    (w / "notes.txt").write_text("my notes: not a results file\n")
    (w / "afile").write_text("a regular file\n")
    (w / "adir").mkdir()
    (w / "adir" / "keep.txt").write_text("keep me\n")
    (w / "latin1.json").write_bytes(b'[{"subject": "caf\xe9"}]')
    (w / "bad.json").write_text('[{"case_id": 0, "requested_rewrite": ')
    (w / "object.json").write_text('{"records": []}')
    (w / "malformed.json").write_text('[{"case_id": 7, "requested_rewrite": {"prompt": 3}}]')
    (w / "random.safetensors").write_bytes(random.Random(0).randbytes(4096))
    made = rome.edit(tiny_llama, REQ, _quick_rome(), templates=TEMPLATES)
    (w / "done").mkdir()
    made.save(w / "done" / "edit.safetensors")
    whole = (w / "done" / "edit.safetensors").read_bytes()
    (w / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    rome.edit(gpt2, REQ, _quick_rome(), templates=TEMPLATES).save(w / "gpt2_edit.safetensors")
    (w / "readonly").mkdir()
    (w / "readonly").chmod(0o500)
    _tampered_edits(w, gpt2)
    _bad_data_files(w)
    _results_files(w)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNDRIFT_CACHE", str(cache))
        yield World(w, cache, tiny_llama, gpt2, data.load_embedded())
    (w / "readonly").chmod(0o700)


def tamper(src: Path, dst: Path, meta=None, tensors=None, rehash: bool = True) -> Path:
    """Copy the edit file ``src`` to ``dst`` with its metadata and tensors changed in place by
    ``meta(dict)`` and ``tensors(dict)``; ``rehash``: with checksums that match the change
    (so that the check after the checksum is what refuses it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, "pt") as f:
        stored = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    m = json.loads(stored[edits.META_KEY])
    if meta is not None:
        meta(m)
    if tensors is not None:
        tensors(ts)
    stored[edits.META_KEY] = text = json.dumps(m)
    if rehash:
        stored[edits.SHA_KEY] = json.dumps(
            {"tensors": edits._tensors_sha256(ts), "metadata": edits._sha256(text)}
        )
    save_file(ts, dst, metadata=stored)
    return dst


def _tampered_edits(w: Path, gpt2) -> None:
    """One edit file per check of ``Edit.load`` / ``Edit.check``, each tampered that way."""
    good = w / "done" / "edit.safetensors"
    raw = bytearray(good.read_bytes())
    raw[-3] ^= 0x01  # one flipped bit of the last tensor's data, same size
    (w / "edit_bitflip.safetensors").write_bytes(bytes(raw))
    tamper(good, w / "edit_meta.safetensors", meta=lambda m: m.update(editor="memit"), rehash=False)
    tamper(
        w / "gpt2_edit.safetensors",
        w / "gpt2_blank.safetensors",
        meta=lambda m: m.update(model_fingerprint=""),
    )
    tamper(good, w / "edit_twice.safetensors", meta=lambda m: m.update(layers=[1, 1]))
    tamper(good, w / "edit_nolayers.safetensors", meta=lambda m: m.update(layers=[]))
    tamper(good, w / "edit_layertext.safetensors", meta=lambda m: m.update(layers=["1"]))

    def to_int(ts):
        ts["layer1.left"] = ts["layer1.left"].round().to(torch.int64)

    tamper(good, w / "edit_int64.safetensors", tensors=to_int)
    tamper(good, w / "edit_extra.safetensors", tensors=lambda ts: ts.update(
        {"layer2.left": ts["layer1.left"].clone()}))  # fmt: skip

    def to_layer9(ts):
        for side in ("left", "right"):
            ts[f"layer9.{side}"] = ts.pop(f"layer1.{side}")

    tamper(good, w / "edit_layer9.safetensors", meta=lambda m: m.update(layers=[9]),
           tensors=to_layer9)  # fmt: skip

    def wider(ts):
        ts["layer1.left"] = torch.cat([ts["layer1.left"], ts["layer1.left"][:1]])

    tamper(good, w / "edit_wide.safetensors", tensors=wider)


def _merged_record(**changes) -> dict:
    record = {
        "case_id": 0,
        "requested_rewrite": {
            "prompt": "The Eiffel Tower is located in the city of",
            "subject": "Eiffel Tower",
            "target_new": "Rome",
            "target_true": "Paris",
        },
        "l-neighbor": {"prompts": ["The Louvre is in the city of"], "targets": ["Paris"]},
        "l-relation": {"prompts": ["The Eiffel Tower was designed by"], "targets": ["Eiffel"]},
    }
    for key, value in changes.items():
        if key in record["requested_rewrite"]:
            record["requested_rewrite"][key] = value
        else:
            record[key] = value
    return record


def _rome_record(template: str) -> dict:
    return {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": template,
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English"},
            "target_true": {"str": "French"},
        },
    }


def _bad_data_files(w: Path) -> None:
    files = {
        "empty.json": [],
        "zwsp.json": [_merged_record(target_new="\u200b\ufeff")],
        "dup-ids.json": [
            _merged_record(),
            _merged_record(subject="Louvre", prompt="The Louvre is"),
        ],
        "null-id.json": [_merged_record(case_id=None)],
        "mixed-ids.json": [_merged_record(case_id=7), _merged_record(case_id="7")],
        "rome-field.json": [_rome_record("The mother tongue of {} in {city} is")],
        "rome-brace.json": [_rome_record("The mother tongue of {} is {")],
        "rome-two.json": [_rome_record("{} and {} speak")],
        "empty-neighbor.json": [
            _merged_record(**{"l-neighbor": {"prompts": [" "], "targets": ["Paris"]}})
        ],
        "empty-relation.json": [
            _merged_record(**{"l-relation": {"prompts": [""], "targets": ["Eiffel"]}})
        ],
        "degenerate.json": [
            _merged_record(**{"l-neighbor": {"prompts": ["The Louvre is in"], "targets": ["Rome"]}})
        ],
    }
    for name, records in files.items():
        (w / name).write_text(json.dumps(records))


def _results_files(w: Path) -> None:
    """Results of two provenances (prov_a, prov_b: another model) over the same (record,
    setting), one disagreeing with prov_a, and an empty results file (held.jsonl)."""
    from tests.helpers import make_line

    prov = results.Provenance("tiny-llama-s0", "0123456789abcdef", "d.json", "a" * 64, "0.1.0", "g")
    other = dataclasses.replace(prov, model="tiny-gpt2-s0", fingerprint="fedcba9876543210")
    line = make_line(0, [("ES", 1), ("NS", 0)])
    for name, p, ok in (("prov_a", prov, 1), ("prov_b", other, 1), ("prov_a_other", prov, 0)):
        x = dataclasses.replace(line, provenance=p, post=make_line(0, [("ES", ok), ("NS", 0)]).post)
        results.append(w / f"{name}.jsonl", x)
    (w / "held.jsonl").write_bytes(b"")


def _files(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder``: (kind, size, mtime, sha256) of files, ("dir",) of folders,
    (mode, mtime) of anything else (a FIFO: never read)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_dir():
            out[rel] = ("dir",)
        elif not p.is_file():
            out[rel] = (p.stat().st_mode, p.stat().st_mtime_ns)
        else:
            st = p.stat()
            out[rel] = (
                "file",
                st.st_size,
                st.st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return out


def _model_state(model) -> dict:
    return {
        n: (p.detach().clone(), p.stride(), p.requires_grad) for n, p in model.named_parameters()
    }


def _assert_model_unchanged(model, state: dict) -> None:
    for n, p in model.named_parameters():
        saved, stride, grad = state[n]
        assert torch.equal(p, saved), f"{n} changed"
        assert p.stride() == stride, f"{n}: strides changed"
        assert p.requires_grad == grad, f"{n}: requires_grad changed"
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    assert model.context_level == 0
    assert torch.is_grad_enabled()


@pytest.fixture
def guarded(world, monkeypatch):
    """Run a case against ``world``: the command line's tiny models are the world's, and
    afterwards nothing in the working folder, nor any model, has changed."""
    real_load = models.load_model

    def load_model(name="smollm2-135m", device=None, dtype=torch.float32, **kwargs):
        shared = {"tiny-llama": world.llama, "tiny-gpt2": world.gpt2}
        if name in shared:
            loading._checked_device(device)  # the device check still runs
            return shared[name]
        return real_load(name, device=device, dtype=dtype, **kwargs)

    monkeypatch.setattr(models, "load_model", load_model)
    if AS_ROOT:  # root ignores permission bits: os.access answers as for another user
        real_access = os.access
        readonly = (world.dir / "readonly").resolve()

        def access(path, mode, *args, **kwargs):
            p = Path(path).resolve()
            if mode & os.W_OK and (p == readonly or readonly in p.parents):
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    before = _files(world.dir)
    states = [(m, _model_state(m)) for m in (world.llama, world.gpt2)]
    yield world
    assert _files(world.dir) == before, "the working folder changed"
    for model, state in states:
        _assert_model_unchanged(model, state)


def _visible_lines(text: str) -> list[str]:
    """Lines as a terminal shows them (progress bars redraw after carriage returns)."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    return [line for line in lines if line]


# --------------------------------------------------------------------------------------------
# Command line: (id, arguments ({w}: the working folder), regex of the error line)
# --------------------------------------------------------------------------------------------

CLI_CASES = [
    # editor options: NaN, inf, out of range, wrong kind
    ("sadr-gamma-nan", [*EDIT, "--sadr-gamma", "nan"], r"sadr_gamma must be a finite .*got nan"),
    ("sadr-gamma-inf", [*EDIT, "--sadr-gamma", "inf"], r"sadr_gamma must be a finite .*got inf"),
    ("sadr-gamma-negative", [*EDIT, "--sadr-gamma", "-0.5"], r"sadr_gamma .*>= 0, got -0\.5"),
    ("sadr-gamma-text", [*EDIT, "--sadr-gamma", "lots"], r"--sadr-gamma: expected a number"),
    ("weight-decay-nan", [*EDIT, "--weight-decay", "nan"], r"weight_decay must be .*got nan"),
    ("clamp-negative", [*EDIT, "--clamp", "-1"], r"clamp must be a finite number > 0, got -1"),
    ("clamp-zero", [*EDIT, "--clamp", "0"], r"clamp must be a finite number > 0, got 0"),
    ("lr-zero", [*EDIT, "--lr", "0"], r"lr must be a finite number > 0"),
    ("lr-inf", [*EDIT, "--lr", "inf"], r"lr must be a finite number > 0, got inf"),
    ("kl-factor-negative", [*EDIT, "--kl-factor", "-0.1"], r"kl_factor must be .*>= 0"),
    ("early-stop-nan", [*EDIT, "--early-stop", "nan"], r"early_stop must be a finite"),
    ("early-stop-on", [*EDIT, "--early-stop-on", "both"], r"early_stop_on must be one of"),
    (
        "steps-zero",
        ["edit", *TINY, "--record", "0", "--steps", "0"],
        r"steps must be an integer >= 1",
    ),
    (
        "steps-fraction",
        ["edit", *TINY, "--record", "0", "--steps", "2.5"],
        r"--steps: expected an int",
    ),
    ("layer-negative", [*EDIT, "--layer", "-1"], r"layer must be an integer >= 0, got -1"),
    ("layer-beyond-model", [*EDIT, "--layer", "99"], r"layer 99"),
    ("layers-text", [*EDIT, "--editor", "memit", "--layers", "a"], r"--layers: expected comma"),
    ("memit-descending", [*EDIT, "--editor", "memit", "--layers", "2,1"], r"ascending"),
    ("unknown-editor", [*EDIT, "--editor", "grace"], r"editor must be one of 'rome', 'memit'"),
    ("all-heads-no-sadr", [*EDIT, "--all-heads"], r"all_heads.* needs? sadr_gamma > 0"),
    ("mom2-for-rome", [*EDIT, "--mom2-weight", "10"], r"mom2_weight applies to the memit"),
    ("cov-tokens-zero", ["edit", *TINY, "--record", "0", "--cov-tokens", "0"], r"cov_tokens must"),
    ("lr-overflows", [*EDIT, "--lr", "1e30"], r"not finite .*step 0; lower lr"),
    # devices and models
    ("device-cuda", [*EVAL, "--device", "cuda"], r"--device cuda: CUDA is not available"),
    ("device-nonsense", [*EVAL, "--device", "banana"], r"--device 'banana' is not a device"),
    ("unknown-model", ["eval", "--model", "no-such/model"], r"unknown model 'no-such/model'"),
    # the edit request
    (
        "prompt-longer-than-context",
        [
            "edit",
            *QUICK,
            "--subject",
            "Paris",
            "--prompt",
            LONG_PROMPT,
            "--new",
            "Rome",
            "--true",
            "France",
        ],
        r"prompt of \d+ tokens is longer than the model's context \(256 tokens\)",
    ),
    (
        "subject-not-in-prompt",
        [
            "edit",
            *QUICK,
            "--subject",
            "Berlin",
            "--prompt",
            "Paris is in",
            "--new",
            "Rome",
            "--true",
            "France",
        ],
        r"prompt must contain the subject 'Berlin'",
    ),
    (
        "new-equals-true",
        [
            "edit",
            *QUICK,
            "--subject",
            "Paris",
            "--prompt",
            "Paris is in",
            "--new",
            "France",
            "--true",
            "France",
        ],
        r"target_new equals target_true",
    ),
    ("unknown-record", ["edit", *QUICK, "--record", "99999"], r"no record with id 99999"),
    ("no-request", ["edit", *QUICK], r"give --record ID, or all of"),
    # outputs checked before any work
    ("edit-out-under-file", [*EDIT, "--out", "{w}/afile/e.safetensors"], r"afile is not a dir"),
    ("edit-out-is-dir", [*EDIT, "--out", "{w}/adir"], r"adir is a directory, not a file"),
    ("edit-out-unwritable", [*EDIT, "--out", "{w}/readonly/e.safetensors"], r"not writable"),
    ("eval-csv-under-file", [*EVAL, "--csv", "{w}/afile/x/p.csv"], r"afile is not a directory"),
    ("eval-csv-is-dir", [*EVAL, "--csv", "{w}/adir"], r"--csv .*adir is a directory"),
    ("eval-csv-unwritable", [*EVAL, "--csv", "{w}/readonly/p.csv"], r"readonly is not writable"),
    # record selection
    ("limit-negative", [*EVAL, "--limit", "-1"], r"argument --limit: must be an integer >= 0"),
    ("limit-text", [*EVAL, "--limit", "all"], r"argument --limit: expected an integer"),
    ("records-text", [*EVAL, "--records", "abc"], r"--records: expected ids and ranges"),
    ("records-empty-range", [*EVAL, "--records", "5-2"], r"--records: the range 5-2 is empty"),
    ("records-repeated", [*EVAL, "--records", "0,0"], r"--records: record 0 is given more"),
    ("records-overlap", [*EVAL, "--records", "0-3,2"], r"--records: record 2 is given more"),
    ("records-negative", [*EVAL, "--records", "-3"], r"--records: expected ids and ranges"),
    ("records-none", [*EVAL, "--records", ","], r"--records: no record id"),
    ("records-unknown", [*EVAL, "--records", "100000"], r"no record with id 100000"),
    # data files
    ("data-directory", [*EVAL, "--data", "{w}/adir"], r"data path .*adir is a directory"),
    ("data-not-utf8", [*EVAL, "--data", "{w}/latin1.json"], r"latin1\.json is not UTF-8"),
    ("data-invalid-json", [*EVAL, "--data", "{w}/bad.json"], r"bad\.json is not valid JSON"),
    ("data-missing", [*EVAL, "--data", "{w}/nope.json"], r"data file not found: .*nope\.json"),
    ("data-not-a-list", [*EVAL, "--data", "{w}/object.json"], r"expected a JSON list of records"),
    ("data-malformed", [*EVAL, "--data", "{w}/malformed.json"], r"record 7: field"),
    ("edit-data-directory", ["edit", *QUICK, "--data", "{w}/adir", "--record", "0"], r"is a dir"),
    ("batch-tokens-zero", [*EVAL, "--batch-tokens", "0"], r"max_batch_tokens must be positive"),
    # saved edits
    (
        "drift-edit-truncated",
        ["drift", *QUICK[:4], "--edit", "{w}/truncated.safetensors", "--out", "{w}/d"],
        r"truncated\.safetensors is not an attndrift edit file",
    ),
    (
        "drift-edit-random",
        ["drift", *QUICK[:4], "--edit", "{w}/random.safetensors", "--out", "{w}/d"],
        r"random\.safetensors is not an attndrift edit file",
    ),
    (
        "patch-edit-truncated",
        ["patch", *QUICK[:4], "--edit", "{w}/truncated.safetensors", "--out", "{w}/d"],
        r"truncated\.safetensors is not an attndrift edit file",
    ),
    (
        "patch-edit-random",
        ["patch", *QUICK[:4], "--edit", "{w}/random.safetensors", "--out", "{w}/d"],
        r"random\.safetensors is not an attndrift edit file",
    ),
    (
        "drift-edit-missing",
        ["drift", *QUICK[:4], "--edit", "{w}/nope.safetensors", "--out", "{w}/d"],
        r"edit file not found",
    ),
    (
        "drift-edit-is-dir",
        ["drift", *QUICK[:4], "--edit", "{w}/adir", "--out", "{w}/d"],
        r"adir is a directory, not an edit file",
    ),
    (
        "edit-of-another-arch",
        ["drift", *QUICK[:4], "--edit", "{w}/gpt2_edit.safetensors", "--out", "{w}/d"],
        r"(edit for d_mlp=\d+.* does not fit|made on 'tiny-gpt2)",
    ),
    (
        "saved-edit-and-options",
        ["drift", *QUICK, "--edit", "{w}/done/edit.safetensors", "--out", "{w}/d"],
        r"--steps, --identity-cov: editor options apply to on-the-fly",
    ),
    # drift and patch outputs, options
    (
        "drift-out-has-edit",
        ["drift", *QUICK, "--out", "{w}/done"],
        r"--out .*done already holds an edit: pass --edit .*done/edit\.safetensors",
    ),
    (
        "patch-out-has-edit",
        ["patch", *QUICK, "--out", "{w}/done"],
        r"--out .*done already holds an edit: pass --edit .*done/edit\.safetensors",
    ),
    ("drift-out-is-file", ["drift", *QUICK, "--out", "{w}/afile"], r"afile is a file, not a dir"),
    ("patch-out-under-file", ["patch", *QUICK, "--out", "{w}/afile/d"], r"afile is not a dir"),
    ("patch-out-unwritable", ["patch", *QUICK, "--out", "{w}/readonly/d"], r"is not writable"),
    (
        "drift-sadr-gamma-inf",
        ["drift", *QUICK, "--sadr-gamma", "inf", "--out", "{w}/d"],
        r"sadr_gamma must be a finite number >= 0, got inf",
    ),
    (
        "patch-window-negative",
        ["patch", *QUICK, "--window", "-1", "--out", "{w}/d"],
        r"window must be an integer >= 1 layer, got -1",
    ),
    (
        "patch-component",
        ["patch", *QUICK, "--components", "attn,mlpp", "--out", "{w}/d"],
        r"unknown component 'mlpp'",
    ),
    (
        "patch-direction",
        ["patch", *QUICK, "--directions", "sideways", "--out", "{w}/d"],
        r"unknown direction 'sideways'",
    ),
    (
        "patch-positions",
        ["patch", *QUICK, "--positions", "0,x", "--out", "{w}/d"],
        r"--positions: expected integers, got 'x'",
    ),
    (
        "drift-probe-kind",
        ["drift", *QUICK, "--kinds", "RS,XX", "--out", "{w}/d"],
        r"--kinds: unknown probe kind 'XX'",
    ),
    (
        "patch-probe-kind",
        ["patch", *QUICK, "--kind", "YY", "--out", "{w}/d"],
        r"--kind: unknown probe kind 'YY'",
    ),
    # sweeps and results
    ("sweep-onto-notes", [*SWEEP, "--out", "{w}/notes.txt"], r"notes\.txt: line 1 is not a res"),
    ("sweep-out-under-file", [*SWEEP, "--out", "{w}/afile/r.jsonl"], r"afile is not a directory"),
    ("sweep-out-is-dir", [*SWEEP, "--out", "{w}/adir"], r"adir is a directory, not a file"),
    ("sweep-gamma-nan", [*SWEEP, "--sadr-gamma", "0,nan", "--out", "{w}/r.jsonl"], r"got nan"),
    ("sweep-limit-negative", [*SWEEP, "--limit", "-1", "--out", "{w}/r.jsonl"], r"--limit: must"),
    (
        "sweep-option-unused",
        [*SWEEP, "--mom2-weight", "10", "--out", "{w}/r.jsonl"],
        r"--mom2-weight applies to no setting of this sweep",
    ),
    (
        "sweep-all-heads-baseline",
        [*SWEEP, "--sadr-gamma", "0", "--all-heads", "--out", "{w}/r.jsonl"],
        r"--all-heads applies to no setting",
    ),
    ("summarize-missing", ["summarize", "{w}/none.jsonl"], r"no results at .*none\.jsonl"),
    ("summarize-notes", ["summarize", "{w}/notes.txt"], r"notes\.txt: line 1 is not a results"),
    # the demo's own options (refused before the model loads)
    ("demo-gamma-nan", ["demo", "--sadr-gamma", "nan", "--out", "{w}/demo"], r"sadr_gamma must"),
    ("demo-record", ["demo", "--record", "-1", "--out", "{w}/demo"], r"record must be an int"),
    ("demo-window", ["demo", "--window", "0", "--out", "{w}/demo"], r"window must be an int"),
    ("unknown-command", ["frobnicate"], r"unknown command 'frobnicate'"),
    # record selection: ranges resolved against the data, never expanded
    ("records-huge-range", [*EVAL, "--records", "0-20000000000"], r"no record with id 85 in"),
    ("records-huge-overlap", [*EVAL, "--records", "0-10000000000,5"], r"record 5 is given more"),
    ("limit-zero", [*EVAL, "--limit", "0"], r"no records selected: --limit 0"),
    (
        "sweep-limit-zero",
        ["sweep", *QUICK, "--limit", "0", "--out", "{w}/r.jsonl"],
        r"no records selected: --limit 0",
    ),
    (
        "data-empty",
        [*EVAL, "--data", "{w}/empty.json"],
        r"no records selected: .*empty\.json holds",
    ),
    (
        "data-all-skipped",
        [*EVAL, "--lenient", "--data", "{w}/malformed.json"],
        r"no records selected: --lenient skipped all 1 records of .*malformed\.json",
    ),
    # inputs normalised and checked where they enter: file, record and field named
    (
        "data-zero-width-target",
        [*EVAL, "--data", "{w}/zwsp.json"],
        r"record 0: field 'requested_rewrite\.target_new': empty .*format characters.*zwsp\.json",
    ),
    ("data-null-id", [*EVAL, "--data", "{w}/null-id.json"], r"record #0: field 'case_id': .*null"),
    ("data-mixed-ids", [*EVAL, "--data", "{w}/mixed-ids.json"], r"record id '7' is a str"),
    (
        "edit-repeated-ids",
        ["edit", *QUICK, "--data", "{w}/dup-ids.json", "--record", "0"],
        r"the records repeat an id \(0 in .*dup-ids\.json\)",
    ),
    (
        "data-rome-field",
        [*EVAL, "--data", "{w}/rome-field.json"],
        r"record 7: field 'requested_rewrite\.prompt': has the field \{city\}.*rome-field\.json",
    ),
    (
        "data-rome-brace",
        [*EVAL, "--data", "{w}/rome-brace.json"],
        r"record 7: field 'requested_rewrite\.prompt': is not a template .*rome-brace\.json",
    ),
    (
        "data-rome-two-fields",
        [*EVAL, "--data", "{w}/rome-two.json"],
        r"record 7: field 'requested_rewrite\.prompt': has 2 '\{\}'.*rome-two\.json",
    ),
    (
        "data-empty-neighbor",
        [*EVAL, "--data", "{w}/empty-neighbor.json"],
        r"record 0: field 'l-neighbor\.prompts\[0\]': empty prompt ' '.*empty-neighbor\.json",
    ),
    (
        "data-empty-relation",
        [*EVAL, "--data", "{w}/empty-relation.json"],
        r"record 0: field 'l-relation\.prompts\[0\]': empty prompt ''",
    ),
    (
        "data-degenerate-neighbor",
        [*EVAL, "--data", "{w}/degenerate.json"],
        r"record 0: field 'l-neighbor\.targets\[0\]': 'Rome' equals target_new",
    ),
    (
        "edit-new-zero-width",
        [
            "edit",
            *QUICK,
            "--subject",
            "Paris",
            "--prompt",
            "Paris is in",
            "--new",
            "\u200b",
            "--true",
            "France",
        ],
        r"target_new must be a non-empty string .*'\\u200b'",
    ),
    (
        "edit-new-equals-true-invisibly",
        [
            "edit",
            *QUICK,
            "--subject",
            "Paris",
            "--prompt",
            "Paris is in",
            "--new",
            "France\u200d",
            "--true",
            "France",
        ],
        r"target_new equals target_true .*nothing to edit",
    ),
    (
        "edit-subject-zero-width",
        [
            "edit",
            *QUICK,
            "--subject",
            "\u200b",
            "--prompt",
            "\u200b is in",
            "--new",
            "Rome",
            "--true",
            "France",
        ],
        r"EditRequest\.subject must be a non-empty string",
    ),
    # edit files: every check of Edit.load and Edit.check, through the command line
    (
        "drift-edit-bit-flipped",
        ["drift", *QUICK[:4], "--edit", "{w}/edit_bitflip.safetensors", "--out", "{w}/d"],
        r"edit_bitflip\.safetensors is not an attndrift edit file \(its tensors do not match",
    ),
    (
        "drift-edit-metadata-edited",
        ["drift", *QUICK[:4], "--edit", "{w}/edit_meta.safetensors", "--out", "{w}/d"],
        r"edit_meta\.safetensors .*its metadata does not match its sha256",
    ),
    (
        "drift-edit-fingerprint-blank",
        ["drift", *QUICK[:4], "--edit", "{w}/gpt2_blank.safetensors", "--out", "{w}/d"],
        r"gpt2_blank\.safetensors .*model fingerprint '' is not one",
    ),
    (
        "patch-edit-layers-twice",
        ["patch", *QUICK[:4], "--edit", "{w}/edit_twice.safetensors", "--out", "{w}/d"],
        r"layer 1 is listed twice",
    ),
    (
        "drift-edit-no-layers",
        ["drift", *QUICK[:4], "--edit", "{w}/edit_nolayers.safetensors", "--out", "{w}/d"],
        r"an edit needs at least one layer",
    ),
    (
        "drift-edit-layers-text",
        ["drift", *QUICK[:4], "--edit", "{w}/edit_layertext.safetensors", "--out", "{w}/d"],
        r"layers must be integers >= 0, got '1'",
    ),
    (
        "drift-edit-int64",
        ["drift", *QUICK[:4], "--edit", "{w}/edit_int64.safetensors", "--out", "{w}/d"],
        r"layer 1: the left factor is torch\.int64, not floating",
    ),
    (
        "drift-edit-extra-tensor",
        ["drift", *QUICK[:4], "--edit", "{w}/edit_extra.safetensors", "--out", "{w}/d"],
        r"tensors \['layer2\.left'\] are not in its layer",
    ),
    (
        "drift-edit-layer-beyond",
        ["drift", *QUICK[:4], "--edit", "{w}/edit_layer9.safetensors", "--out", "{w}/d"],
        r"layer 9 is out of range for a 4-layer model",
    ),
    (
        "drift-edit-wrong-shape",
        ["drift", *QUICK[:4], "--edit", "{w}/edit_wide.safetensors", "--out", "{w}/d"],
        r"edit for d_mlp=\d+, d_model=\d+ does not fit model",
    ),
    # the results store
    (
        "sweep-out-gz",
        [*SWEEP, "--out", "{w}/r.jsonl.gz"],
        r"--out .*r\.jsonl\.gz: sweeps append plain JSON lines; pass --out .*r\.jsonl \(",
    ),
    (
        "summarize-mixed-provenance",
        ["summarize", "{w}/prov_a.jsonl", "{w}/prov_b.jsonl"],
        r"the results mix 2 provenances \(tiny-llama-s0 .*; tiny-gpt2-s0 .*--by-provenance",
    ),
    (
        "summarize-disagreeing-lines",
        ["summarize", "{w}/prov_a.jsonl", "{w}/prov_a_other.jsonl"],
        r"prov_a_other\.jsonl: record 0, setting 'rome\|g=0' has other numbers than its line "
        r"in .*prov_a\.jsonl \(same provenance\)",
    ),
    (
        "summarize-unknown-drift",
        ["summarize", "{w}/prov_a.jsonl", "--drift", "nope"],
        r"--drift: no lines of setting 'nope' \(the results have rome\|g=0\)",
    ),
    (
        "summarize-unknown-compare",
        ["summarize", "{w}/prov_a.jsonl", "--compare", "rome|g=0;rome|g=0.5"],
        r"--compare: no lines of setting 'rome\|g=0\.5'",
    ),
    (
        "summarize-plot-under-file",
        ["summarize", "{w}/prov_a.jsonl", "--plot", "{w}/afile/p.html"],
        r"--plot .*afile/p\.html: .*afile is not a directory",
    ),
    (
        "summarize-csv-is-dir",
        ["summarize", "{w}/prov_a.jsonl", "--csv", "{w}/adir"],
        r"--csv .*adir is a directory, not a file",
    ),
    (
        "summarize-drift-plot-unwritable",
        [
            "summarize",
            "{w}/prov_a.jsonl",
            "--drift",
            "rome|g=0",
            "--drift-plot",
            "{w}/readonly/d.html",
        ],
        r"readonly is not writable",
    ),
    (
        "summarize-by-provenance-csv",
        [
            "summarize",
            "{w}/prov_a.jsonl",
            "{w}/prov_b.jsonl",
            "--by-provenance",
            "--csv",
            "{w}/t.csv",
        ],
        r"--plot, --csv and --drift-plot take one provenance; these results hold 2",
    ),
    (
        "summarize-records-huge",
        ["summarize", "{w}/prov_a.jsonl", "--records", "5000000000-90000000000"],
        r"no result lines left to summarize",
    ),
]


@pytest.mark.parametrize(
    ("args", "message"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_command_line_refuses(args, message, guarded, capsys, request):
    skip_if_cuda_here(request.node.callspec.id)
    _assert_refused(args, message, guarded, capsys)


def _assert_refused(args, message, guarded, capsys) -> None:
    argv = [a.replace("{w}", str(guarded.dir)) for a in args]
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    assert status == 2
    lines = _visible_lines(capsys.readouterr().err)
    errors = [line for line in lines if re.match(r"attndrift( \S+)?: error: ", line)]
    assert len(errors) == 1, lines
    assert re.search(message, errors[0]), errors[0]
    others = [line for line in lines if line not in errors]
    usage = [line for line in others if line.startswith("usage:") or line.startswith(" ")]
    usage += [line for line in others if line.startswith("skipped record ")]  # --lenient's
    assert sorted(others) == sorted(usage), others  # only argparse's usage next to the error


#: torchrun's variables, refused before any process group starts (nothing waits for a peer)
TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PEERS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29513"}
ENV_CASES = [
    ("rank-beyond-world", {"RANK": "3", "WORLD_SIZE": "2", **PEERS}, r"RANK=3 is not in 0\.\.1"),
    ("rank-without-world", {"RANK": "1"}, r"RANK=1 is not in 0\.\.0 \(WORLD_SIZE=1\)"),
    ("world-size-text", {"WORLD_SIZE": "abc"}, r"WORLD_SIZE='abc' is not an integer"),
    ("world-size-zero", {"WORLD_SIZE": "0"}, r"WORLD_SIZE=0 must be >= 1"),
    ("rank-negative", {"RANK": "-1", "WORLD_SIZE": "2", **PEERS}, r"RANK=-1 must be >= 0"),
    ("no-master", {"RANK": "0", "WORLD_SIZE": "2"}, r"MASTER_ADDR and MASTER_PORT not set"),
    (
        "master-port-text",
        {"RANK": "0", "WORLD_SIZE": "2", **PEERS, "MASTER_PORT": "http"},
        r"MASTER_PORT='http' is not an integer",
    ),
    (
        "master-port-beyond",
        {"RANK": "0", "WORLD_SIZE": "2", **PEERS, "MASTER_PORT": "70000"},
        r"MASTER_PORT=70000 is not a port",
    ),
    ("local-rank-text", {"LOCAL_RANK": "first"}, r"LOCAL_RANK='first' is not an integer"),
    (
        "rendezvous-timeout-text",
        {"RANK": "0", "WORLD_SIZE": "2", **PEERS, "ATTNDRIFT_RENDEZVOUS_TIMEOUT": "soon"},
        r"ATTNDRIFT_RENDEZVOUS_TIMEOUT='soon' must be a number of seconds > 0",
    ),
]


@pytest.mark.parametrize(
    ("env", "message"), [c[1:] for c in ENV_CASES], ids=[c[0] for c in ENV_CASES]
)
def test_command_line_refuses_torchrun_variables(env, message, guarded, capsys, monkeypatch):
    for name in (*TORCHRUN, "ATTNDRIFT_RENDEZVOUS_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _assert_refused([*SWEEP, "--out", "{w}/r.jsonl"], message, guarded, capsys)


def test_command_line_case_count():
    assert len(CLI_CASES) >= 40 and len({c[0] for c in CLI_CASES}) == len(CLI_CASES)
    assert len({c[0] for c in ENV_CASES}) == len(ENV_CASES) >= 10


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            PermissionError(13, "Permission denied", "/data/x.json"),
            "/data/x.json: Permission denied",
        ),
        (IsADirectoryError(21, "Is a directory", "/out"), "/out: Is a directory"),
        (KeyError("no record with id 5 in d.json"), "no record with id 5 in d.json"),
        (ValueError("two\nlines"), "two lines"),
        (FloatingPointError("loss term kl is nan"), "FloatingPointError: loss term kl is nan"),
    ],
)
def test_error_lines_name_the_path(error, line):
    assert cli._error_text(error) == line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, guarded, capsys):
    args = [*EVAL, "--records", "5-2"]
    argv = ["--debug", *args] if where == "before" else [*args[:1], "--debug", *args[1:]]
    with pytest.raises(ValueError, match="the range 5-2 is empty"):
        cli.main(argv)


# --------------------------------------------------------------------------------------------
# API: (id, call(world), exception type, regex of its message)
# --------------------------------------------------------------------------------------------


def _dataset(w: World) -> data.Dataset:
    return w.dataset.select(ids=[0])


def _patch(w: World, edited=None, **kwargs):
    args = {"direction": "restore", "window": 1} | kwargs
    return patching.patch(w.llama, edited or w.llama, REQ.prompt, "Paris", "Rome", **args)


def _apply_other_arch(w: World, mp) -> None:
    with edits.applied(w.llama, edits.Edit.load(w.dir / "gpt2_edit.safetensors")):
        raise AssertionError("an edit of another architecture was applied")


def _non_finite_edit(w: World, mp) -> None:
    d_mlp, d_model = w.llama.cfg.d_mlp, w.llama.cfg.d_model
    left, right = torch.full((d_mlp, 1), NAN), torch.ones(1, d_model)
    edits.Edit(layers=(1,), left=(left,), right=(right,), requests=(REQ,), editor="rome")


class CacheRejected(Exception):
    """The model cache was refused (and a conversion started); carries the warning."""


@contextlib.contextmanager
def _warnings_of(name: str):
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, logger = Keep(level=logging.WARNING), logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _fake_model_cache(w: World) -> Path:
    """A converted-model cache in the world's cache folder, with made-up tiny weights."""
    target = embedded._embedded_cache()
    state = {"embed.W_E": torch.arange(12.0).reshape(4, 3)}
    embedded.write_cache(target, state, models.tiny_tokenizer(), {"d_vocab": 4, "n_layers": 1})
    assert embedded._cache_complete(target)
    return target


def _load_refused(w: World, target: Path, monkeypatch_convert) -> None:
    with _warnings_of("attndrift.models.embedded") as warned:

        def convert(target=None):
            raise CacheRejected(warned[-1] if warned else "converted without a warning")

        monkeypatch_convert(convert)
        embedded.load_embedded_model("cpu", torch.float32)


def cache_corrupt_header(w: World, mp) -> None:
    target = _fake_model_cache(w)
    weights = target / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[:8] = (len(raw) * 3).to_bytes(8, "little")  # same size, a header length that lies
    weights.write_bytes(bytes(raw))
    _load_refused(w, target, lambda f: mp.setattr(embedded, "convert_embedded", f))


def cache_corrupt_weights(w: World, mp) -> None:
    target = _fake_model_cache(w)
    weights = target / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte of one weight, same size
    weights.write_bytes(bytes(raw))
    _load_refused(w, target, lambda f: mp.setattr(embedded, "convert_embedded", f))


def cache_edited_config(w: World, mp) -> None:
    target = _fake_model_cache(w)
    meta = json.loads((target / "attndrift.json").read_text())
    meta["config"]["n_layers"] = 2
    (target / "attndrift.json").write_text(json.dumps(meta))
    _load_refused(w, target, lambda f: mp.setattr(embedded, "convert_embedded", f))


def gguf_mismatch(w: World, mp) -> None:
    mp.setattr(embedded, "EMBEDDED_GGUF_SHA256", "0" * 64)
    embedded.convert_embedded(w.cache / "models" / "never")


def short_corpus(w: World, mp) -> None:
    cfg = CovarianceConfig(corpus=("Paris is in France.",), n_tokens=2000)
    try:
        covariance.layer_covariance(w.llama, 1, cfg, progress=False)
    finally:
        assert not list((w.cache / "covariance").glob("*")), "a short corpus was cached"


def _hooked_failure(w: World, mp) -> None:
    """An exception inside a block that holds hooks and an applied edit."""
    e = edits.Edit.load(w.dir / "done" / "edit.safetensors")
    hooks = e.hooks(w.llama)
    with edits.applied(w.llama, e), models.hooked(w.llama, hooks):
        raise ValueError("a failure inside applied() and hooked()")


API_CASES = [
    # value optimisation
    ("value-steps-zero", lambda w, mp: ValueConfig(steps=0), r"steps must be an integer >= 1"),
    ("value-lr-nan", lambda w, mp: ValueConfig(lr=NAN), r"lr must be a finite number > 0"),
    ("value-lr-negative", lambda w, mp: ValueConfig(lr=-1.0), r"lr must be .*> 0, got -1"),
    ("value-wd-inf", lambda w, mp: ValueConfig(weight_decay=INF), r"weight_decay .*got inf"),
    ("value-clamp-zero", lambda w, mp: ValueConfig(clamp_norm_factor=0.0), r"clamp_norm_factor"),
    ("value-kl-negative", lambda w, mp: ValueConfig(kl_factor=-1.0), r"kl_factor must be"),
    ("value-early-inf", lambda w, mp: ValueConfig(early_stop_loss=INF), r"early_stop_loss must"),
    ("value-early-nan", lambda w, mp: ValueConfig(early_stop_loss=NAN), r"early_stop_loss must"),
    ("value-early-on", lambda w, mp: ValueConfig(early_stop_on="both"), r"early_stop_on must"),
    ("value-essence", lambda w, mp: ValueConfig(essence_prompt="is a"), r"essence_prompt needs"),
    # SADR, covariance, templates
    ("sadr-gamma-nan", lambda w, mp: SadrConfig(gamma=NAN), r"gamma must be a finite number"),
    ("sadr-gamma-inf", lambda w, mp: SadrConfig(gamma=INF), r"gamma must be .*got inf"),
    ("sadr-gamma-negative", lambda w, mp: SadrConfig(gamma=-0.1), r"gamma must be .*>= 0"),
    ("cov-n-tokens", lambda w, mp: CovarianceConfig(n_tokens=0), r"n_tokens must be an int"),
    ("cov-text-tokens", lambda w, mp: CovarianceConfig(text_tokens=0), r"text_tokens must be"),
    ("cov-batch-tokens", lambda w, mp: CovarianceConfig(batch_tokens=-5), r"batch_tokens must"),
    ("template-length", lambda w, mp: TemplateConfig(lengths=((0, 2),)), r"length .*>= 1"),
    ("template-count", lambda w, mp: TemplateConfig(lengths=((3, 0),)), r"count must be"),
    ("template-top-k", lambda w, mp: TemplateConfig(top_k=0), r"top_k must be an int.* >= 1"),
    # editors' configs
    ("rome-layer", lambda w, mp: rome.RomeConfig(layer=-1), r"layer must be an int.* >= 0"),
    ("rome-denominator", lambda w, mp: rome.RomeConfig(layer=1, denominator="k1"), r"denomin"),
    ("rome-sadr-steps", lambda w, mp: rome.RomeConfig(layer=1, sadr_steps=0), r"sadr_steps"),
    ("memit-descending", lambda w, mp: memit.MemitConfig(layers=(2, 1)), r"ascending"),
    ("memit-repeated", lambda w, mp: memit.MemitConfig(layers=(1, 1)), r"ascending"),
    ("memit-no-layers", lambda w, mp: memit.MemitConfig(layers=()), r"non-empty"),
    ("memit-negative", lambda w, mp: memit.MemitConfig(layers=(-1, 0)), r"layer must be .*>= 0"),
    (
        "memit-lambda-zero",
        lambda w, mp: memit.MemitConfig(layers=(0,), mom2_update_weight=0.0),
        r"mom2_update_weight must be a finite number > 0",
    ),
    (
        "memit-lambda-nan",
        lambda w, mp: memit.MemitConfig(layers=(0,), mom2_update_weight=NAN),
        r"mom2_update_weight must be a finite number > 0, got nan",
    ),
    ("demo-gamma", lambda w, mp: DemoConfig(sadr_gamma=NAN), r"sadr_gamma must be a finite"),
    ("demo-window", lambda w, mp: DemoConfig(window=0), r"window must be an integer >= 1"),
    ("demo-sweep-ids", lambda w, mp: DemoConfig(sweep_records=(1, 1)), r"repeats a record"),
    ("demo-steps", lambda w, mp: DemoConfig(steps=0), r"steps must be an integer >= 1"),
    ("setting-editor", lambda w, mp: setting.Setting(editor="grace"), r"editor must be one of"),
    ("setting-gamma-inf", lambda w, mp: setting.Setting(sadr_gamma=INF), r"sadr_gamma .*inf"),
    ("setting-steps", lambda w, mp: setting.Setting(steps=0), r"steps must be an integer >= 1"),
    (
        "setting-memit-desc",
        lambda w, mp: setting.Setting("memit", layers=(2, 1)).config(w.llama),
        r"ascending",
    ),
    # models
    ("load-cuda", lambda w, mp: loading.load_model("tiny-llama", device="cuda"), r"CUDA is not"),
    ("load-unknown", lambda w, mp: loading.load_model("no-such/model"), r"unknown model"),
    ("load-n-devices", lambda w, mp: loading.load_model("tiny-llama", n_devices=2), r"n_devices"),
    ("cache-corrupt-header", cache_corrupt_header, r"model\.safetensors does not match its sha"),
    ("cache-corrupt-weights", cache_corrupt_weights, r"model\.safetensors does not match its sha"),
    ("cache-edited-config", cache_edited_config, r"the config does not match its sha256"),
    ("gguf-sha-mismatch", gguf_mismatch, r"has sha256 [0-9a-f]{64}, expected 0{64}"),
    # saved edits
    (
        "edit-truncated",
        lambda w, mp: edits.Edit.load(w.dir / "truncated.safetensors"),
        r"truncated\.safetensors is not an attndrift edit file",
    ),
    (
        "edit-random",
        lambda w, mp: edits.Edit.load(w.dir / "random.safetensors"),
        r"random\.safetensors is not an attndrift edit file",
    ),
    ("edit-dir", lambda w, mp: edits.Edit.load(w.dir / "adir"), r"is a directory, not an edit"),
    ("edit-missing", lambda w, mp: edits.Edit.load(w.dir / "nope"), r"edit file not found"),
    ("edit-other-arch-applied", _apply_other_arch, r"(does not fit|made on 'tiny-gpt2)"),
    (
        "edit-other-arch-hooks",
        lambda w, mp: edits.Edit.load(w.dir / "gpt2_edit.safetensors").hooks(w.llama),
        r"(does not fit|made on 'tiny-gpt2)",
    ),
    (
        "edit-other-weights",
        lambda w, mp: edits.Edit.load(w.dir / "done" / "edit.safetensors").hooks(
            models.tiny_model("llama", seed=1)
        ),
        r"this edit was made on 'tiny-llama-s0' with weights [0-9a-f]+; the model is "
        r"'tiny-llama-s1'",
    ),
    ("edit-not-finite", _non_finite_edit, r"layer 1: the edit's factors are not finite"),
    ("failure-inside-applied", _hooked_failure, r"a failure inside applied"),
    # data
    ("data-dir", lambda w, mp: data.load_dataset(w.dir / "adir"), r"is a directory"),
    ("data-not-utf8", lambda w, mp: data.load_dataset(w.dir / "latin1.json"), r"not UTF-8"),
    ("data-bad-json", lambda w, mp: data.load_dataset(w.dir / "bad.json"), r"not valid JSON"),
    ("data-missing", lambda w, mp: data.load_dataset(w.dir / "nope.json"), r"data file not"),
    ("data-malformed", lambda w, mp: data.load_dataset(w.dir / "malformed.json"), r"record 7"),
    ("select-repeated", lambda w, mp: w.dataset.select(ids=[0, 0]), r"selected more than once"),
    ("select-limit", lambda w, mp: w.dataset.select(limit=-1), r"limit must be an integer >= 0"),
    ("select-unknown", lambda w, mp: w.dataset.select(ids=[123456]), r"no record with id 123456"),
    (
        "setting-identity-and-tokens",
        lambda w, mp: setting.Setting(identity_cov=True, cov_tokens=5),
        r"identity_cov and cov_tokens exclude each other",
    ),
    (
        "subject-missing",
        lambda w, mp: data.EditRequest(
            subject="Louvre", prompt="Paris is", target_true="France", target_new="Italy"
        ),
        r"must contain the subject",
    ),
    ("target-empty", lambda w, mp: dataclasses.replace(REQ, target_new=" "), r"target_new must"),
    ("target-same", lambda w, mp: dataclasses.replace(REQ, target_new="Paris"), r"equals target"),
    # editing
    (
        "rome-layer-beyond",
        lambda w, mp: rome.edit(w.llama, REQ, _quick_rome(layer=9), templates=TEMPLATES),
        r"layer 9",
    ),
    (
        "rome-long-prompt",
        lambda w, mp: rome.edit(
            w.llama,
            dataclasses.replace(REQ, prompt=LONG_PROMPT, subject="Paris"),
            _quick_rome(),
            templates=TEMPLATES,
        ),
        r"longer than the model's context",
    ),
    (
        "rome-templates",
        lambda w, mp: rome.edit(w.llama, REQ, _quick_rome(), templates=("A {}", "{}")),
        r"templates\[0\] must be",
    ),
    (
        "rome-lr-overflow",
        lambda w, mp: rome.edit(
            w.llama,
            REQ,
            dataclasses.replace(_quick_rome(), value=ValueConfig(steps=3, lr=1e30)),
            templates=TEMPLATES,
        ),
        r"ROME L1: δ is not finite .* after the update of step 0",
    ),
    (
        "memit-no-requests",
        lambda w, mp: memit.edit(
            w.llama, [], memit.MemitConfig(layers=(0, 1), covariance=None), templates=TEMPLATES
        ),
        r"at least one request",
    ),
    (
        "memit-layer-beyond",
        lambda w, mp: memit.edit(
            w.llama, [REQ], memit.MemitConfig(layers=(3, 9), covariance=None), templates=TEMPLATES
        ),
        r"layer 9",
    ),
    (
        "covariance-short-corpus",
        short_corpus,
        r"corpus \(1 texts given in the config\) has \d "
        r"tokens, fewer than the 2000 of n_tokens",
    ),
    # sweeps
    (
        "sweep-no-setting",
        lambda w, mp: sweep.run(w.llama, _dataset(w), [], w.dir / "r.jsonl"),
        r"at least one setting",
    ),
    (
        "sweep-notes",
        lambda w, mp: sweep.run(w.llama, _dataset(w), [setting.Setting()], w.dir / "notes.txt"),
        r"notes\.txt: line 1 is not a results line",
    ),
    (
        "sweep-duplicates",
        lambda w, mp: sweep.run(w.llama, _dataset(w), [setting.Setting()] * 2, w.dir / "r.jsonl"),
        r"duplicate settings",
    ),
    (
        "sweep-rank",
        lambda w, mp: sweep.run(
            w.llama, _dataset(w), [setting.Setting()], w.dir / "r.jsonl", rank=2, world=2
        ),
        r"rank 2 is not in 0\.\.1",
    ),
    (
        "sweep-repeated-ids",
        lambda w, mp: sweep.run(
            w.llama, [w.dataset[0]] * 2, [setting.Setting()], w.dir / "r.jsonl"
        ),
        r"repeat an id",
    ),
    # analyses
    ("patch-window", lambda w, mp: _patch(w, window=-1), r"window must be an integer >= 1"),
    ("patch-direction", lambda w, mp: _patch(w, direction="up"), r"unknown direction 'up'"),
    ("patch-component", lambda w, mp: _patch(w, components=["mlpp"]), r"unknown component"),
    ("patch-position", lambda w, mp: _patch(w, positions=[999]), r"position out of range"),
    ("patch-position-neg", lambda w, mp: _patch(w, positions=[-1]), r"position out of range"),
    ("patch-mismatched", lambda w, mp: _patch(w, edited=w.gpt2), r"mismatched models: "),
    (
        "drift-mismatched",
        lambda w, mp: drift.measure(w.llama, w.gpt2, [REQ.prompt], [REQ.subject]),
        r"mismatched models: ",
    ),
    (
        "drift-counts",
        lambda w, mp: drift.measure(w.llama, w.llama, [REQ.prompt] * 2, [REQ.subject]),
        r"2 prompts but 1 subjects",
    ),
    (
        "drift-subject",
        lambda w, mp: drift.measure(w.llama, w.llama, [REQ.prompt], ["Louvre"]),
        r"subject 'Louvre' not found in prompt",
    ),
    (
        "nll-batch",
        lambda w, mp: scoring.answer_nll(w.llama, [("a", "b")], max_batch_tokens=0),
        r"max_batch_tokens must be positive",
    ),
    (
        "nll-long-prompt",
        lambda w, mp: scoring.answer_nll(w.llama, [(LONG_PROMPT, "France")]),
        r"longer than the model's context \(256 tokens\)",
    ),
    (
        "nll-empty-answer",
        lambda w, mp: scoring.answer_nll(w.llama, [("Paris is in", " ")]),
        r"empty answer",
    ),
]


def _load_edit(name: str):
    return lambda w, mp: edits.Edit.load(w.dir / name)


def _hand_edit(w: World, **changes) -> edits.Edit:
    d_mlp, d_model = w.llama.cfg.d_mlp, w.llama.cfg.d_model
    fields = {"layers": (1,), "left": (torch.ones(d_mlp, 1),), "right": (torch.ones(1, d_model),),
              "requests": (REQ,), "editor": "by hand"} | changes  # fmt: skip
    return edits.Edit(**fields)


def _sweep_onto_held(w: World, mp) -> None:
    """A sweep onto a file another writer holds (the lock: a second open file of this
    process is another writer, as flock counts)."""
    with results.locked(w.dir / "held.jsonl"):
        sweep.run(w.llama, _dataset(w), [setting.Setting()], w.dir / "held.jsonl")


def _cache_not_writable(w: World, mp) -> None:
    """The cache folder refuses the temporary file: the error names the cache file."""

    def refuse(*args, dir=None, prefix="", **kwargs):
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}x1y2.tmp")

    mp.setattr(_io.tempfile, "mkstemp", refuse)
    loading.atomic_write(w.cache / "corpora" / "c.json", lambda tmp: tmp.write_text("[]"))


def _cache_not_readable(w: World, mp) -> None:
    """A cache file of another user: the error names the file (no conversion is tried)."""
    target = _fake_model_cache(w)
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "model.safetensors":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    mp.setattr(Path, "read_bytes", read_bytes)
    _load_refused(w, target, lambda f: mp.setattr(embedded, "convert_embedded", f))


PART_TWO_CASES = [
    # config invariants at construction
    ("value-essence-two", lambda w, mp: ValueConfig(essence_prompt="{} {} is"), r"exactly one"),
    ("value-essence-field", lambda w, mp: ValueConfig(essence_prompt="{x} is"), r"exactly one"),
    # requests, records, datasets
    (
        "target-zero-width",
        lambda w, mp: dataclasses.replace(REQ, target_new="\u200b\ufeff "),
        r"target_new must be a non-empty string \(whitespace and format characters",
    ),
    (
        "subject-zero-width",
        lambda w, mp: data.EditRequest(
            subject="\u2060", prompt="\u2060 is in", target_true="Paris", target_new="Rome"
        ),
        r"subject must be a non-empty string",
    ),
    (
        "targets-differ-invisibly",
        lambda w, mp: dataclasses.replace(REQ, target_new="Paris\u200b"),
        r"target_new equals target_true \('Paris\\u200b'\): nothing to edit",
    ),
    (  # (Record(None, …) itself: refused by the run-time type checks of the tests first)
        "record-null-id",
        lambda w, mp: data.parse_record(_merged_record(case_id=None), 4),
        r"record #4: field 'case_id': a record id is null",
    ),
    (
        "record-str-id",
        lambda w, mp: data.parse_record(_merged_record(case_id="7"), 4),
        r"record id '7' is a str",
    ),
    ("record-bool-id", lambda w, mp: data.Record(True, REQ), r"record id True is a bool"),
    (
        "record-degenerate-probe",
        lambda w, mp: data.Record(0, REQ, neighborhood=(("The Louvre is in", "Rome"),)),
        r"record 0: the neighborhood answer 0 \('Rome'\) equals target_new",
    ),
    (
        "dataset-repeated-ids",
        lambda w, mp: data.Dataset((data.Record(3, REQ), data.Record(3, REQ))),
        r"the records repeat an id \(3\)",
    ),
    (
        "load-repeated-ids",
        lambda w, mp: data.load_dataset(w.dir / "dup-ids.json"),
        r"repeat an id \(0 in .*dup-ids\.json\)",
    ),
    (
        "load-mixed-ids",
        lambda w, mp: data.load_dataset(w.dir / "mixed-ids.json"),
        r"record #1: field 'case_id': record id '7' is a str",
    ),
    (
        "load-null-id",
        lambda w, mp: data.load_dataset(w.dir / "null-id.json"),
        r"record #0: field 'case_id': a record id is null",
    ),
    (
        "load-zero-width-target",
        lambda w, mp: data.load_dataset(w.dir / "zwsp.json"),
        r"record 0: field 'requested_rewrite\.target_new': empty",
    ),
    (
        "load-rome-field",
        lambda w, mp: data.load_dataset(w.dir / "rome-field.json"),
        r"record 7: field 'requested_rewrite\.prompt': has the field \{city\}",
    ),
    (
        "load-empty-neighbor",
        lambda w, mp: data.load_dataset(w.dir / "empty-neighbor.json"),
        r"field 'l-neighbor\.prompts\[0\]': empty prompt",
    ),
    ("load-device", lambda w, mp: data.load_dataset("/dev/zero"), r"/dev/zero is a device"),
    # edit files: one tampering per check
    ("edit-file-bit-flipped", _load_edit("edit_bitflip.safetensors"), r"tensors do not match"),
    ("edit-file-metadata", _load_edit("edit_meta.safetensors"), r"metadata does not match"),
    (
        "edit-file-fingerprint",
        _load_edit("gpt2_blank.safetensors"),
        r"model fingerprint '' is not one \(blank or altered\)",
    ),
    ("edit-file-layers-twice", _load_edit("edit_twice.safetensors"), r"layer 1 is listed twice"),
    ("edit-file-no-layers", _load_edit("edit_nolayers.safetensors"), r"at least one layer"),
    ("edit-file-layer-text", _load_edit("edit_layertext.safetensors"), r"integers >= 0, got '1'"),
    ("edit-file-int64", _load_edit("edit_int64.safetensors"), r"torch\.int64, not floating"),
    ("edit-file-extra", _load_edit("edit_extra.safetensors"), r"\['layer2\.left'\] are not in"),
    (
        "edit-file-layer-beyond",
        lambda w, mp: edits.Edit.load(w.dir / "edit_layer9.safetensors").hooks(w.llama),
        r"layer 9 is out of range",
    ),
    (
        "edit-file-shape",
        lambda w, mp: edits.Edit.load(w.dir / "edit_wide.safetensors").hooks(w.llama),
        r"edit for d_mlp=\d+, d_model=\d+ does not fit model",
    ),
    (
        "edit-layers-twice",
        lambda w, mp: _hand_edit(
            w,
            layers=(1, 1),
            left=(torch.ones(w.llama.cfg.d_mlp, 1),) * 2,
            right=(torch.ones(1, w.llama.cfg.d_model),) * 2,
        ),
        r"layer 1 is listed twice",
    ),
    (
        "edit-no-layers",
        lambda w, mp: _hand_edit(w, layers=(), left=(), right=()),
        r"an edit needs at least one layer",
    ),
    (
        "edit-named-for-another-model",
        lambda w, mp: _hand_edit(w, model_name="tiny-gpt2-s0").hooks(w.llama),
        r"this edit was made on 'tiny-gpt2-s0'; the model is 'tiny-llama-s0'",
    ),
    (
        "edit-saved-without-fingerprint",
        lambda w, mp: _hand_edit(w).save(w.dir / "hand.safetensors"),
        r"an edit without the fingerprint of its model cannot be saved",
    ),
    # the results store
    (
        "sweep-gz",
        lambda w, mp: sweep.run(w.llama, _dataset(w), [setting.Setting()], w.dir / "r.jsonl.gz"),
        r"sweeps append plain JSON lines; pass --out .*r\.jsonl ",
    ),
    (
        "sweep-held",
        _sweep_onto_held,
        r"held\.jsonl is being written by another sweep \(this process \(pid \d+\)\)",
    ),
    (
        "sweep-no-records",
        lambda w, mp: sweep.run(w.llama, data.Dataset(()), [setting.Setting()], w.dir / "r.jsonl"),
        r"no records to sweep",
    ),
    (
        "results-mixed",
        lambda w, mp: results.load([w.dir / "prov_a.jsonl", w.dir / "prov_b.jsonl"]),
        r"the results mix 2 provenances",
    ),
    (
        "results-disagree",
        lambda w, mp: results.load_by_provenance(
            [w.dir / "prov_a.jsonl", w.dir / "prov_a_other.jsonl"]
        ),
        r"has other numbers than its line in",
    ),
    # caches
    ("cache-not-writable", _cache_not_writable, r"Permission denied \(a cache of another user"),
    ("cache-not-readable", _cache_not_readable, r"Permission denied .*model\.safetensors"),
]

API_CASES += PART_TWO_CASES

API_ERRORS = {  # the exception type of each case (ValueError unless listed)
    "load-cuda": ValueError,
    "cache-corrupt-header": CacheRejected,
    "cache-corrupt-weights": CacheRejected,
    "cache-edited-config": CacheRejected,
    "gguf-sha-mismatch": RuntimeError,
    "edit-missing": FileNotFoundError,
    "data-missing": FileNotFoundError,
    "select-unknown": KeyError,
    "rome-lr-overflow": FloatingPointError,
    "cache-not-writable": PermissionError,
    "cache-not-readable": PermissionError,
}


@pytest.mark.parametrize("call", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses(call, request, guarded, monkeypatch):
    fn, message = call
    name = request.node.callspec.id
    skip_if_cuda_here(name)
    error = API_ERRORS.get(name, ValueError)
    with pytest.raises(error) as caught:
        fn(guarded, monkeypatch)
    text = str(caught.value.args[0]) if isinstance(caught.value, KeyError) else str(caught.value)
    assert "\n" not in text, text
    assert re.search(message, text), text


def test_case_count():
    assert len(API_CASES) >= 25 and len({c[0] for c in API_CASES}) == len(API_CASES)
    assert len(CLI_CASES) + len(API_CASES) >= 60


# --------------------------------------------------------------------------------------------
# What the tables cannot show
# --------------------------------------------------------------------------------------------


def test_huge_legal_values_say_what_will_happen(guarded, capsys, caplog):
    """A legal but huge --steps or --cov-tokens is taken, with a log line that says what it
    costs (here before the sweep stops for want of records)."""
    argv = ["sweep", *TINY, "--steps", "100000", "--cov-tokens", "2000000000", "--limit", "0",
            "--out", str(guarded.dir / "r.jsonl")]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="attndrift.cli"):
        assert cli.main(argv) == 2
    assert "--steps 100000: every edit runs up to 100000 optimisation steps" in caplog.text
    assert "--cov-tokens 2000000000: the covariance of each edited layer averages" in caplog.text
    assert "no records selected: --limit 0" in capsys.readouterr().err


def test_non_finite_loss_stops_the_edit(world, monkeypatch):
    """A NaN loss term stops the optimisation naming the term and the step; the model keeps
    its weights and requires_grad flags, and no edit comes back."""
    from attndrift.editing import value

    model = world.llama
    state = _model_state(model)
    real = value.ValueObjective.__call__
    calls = []

    def poisoned(self, delta, **kwargs):
        terms = real(self, delta, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second step's KL term
            return dataclasses.replace(terms, kl=terms.kl * NAN)
        return terms

    monkeypatch.setattr(value.ValueObjective, "__call__", poisoned)
    cfg = dataclasses.replace(_quick_rome(), value=ValueConfig(steps=5, early_stop_loss=0.0))
    with pytest.raises(FloatingPointError, match=r"loss term kl is nan at step 1"):
        rome.edit(model, REQ, cfg, templates=TEMPLATES)
    _assert_model_unchanged(model, state)


def test_short_corpus_refused_but_sampled_corpus_kept(world, monkeypatch):
    """The covariance cache is keyed on what was computed: a corpus with fewer tokens than
    asked is refused (nothing cached); a corpus with enough is cached under its key."""
    model = world.llama
    cfg = CovarianceConfig(corpus=("The Eiffel Tower is in Paris. " * 20,), n_tokens=100)
    stats = covariance.layer_covariance(model, 1, cfg, progress=False)
    files = list((world.cache / "covariance").glob("*"))
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temporary left behind
    assert torch.isfinite(stats).all()
    for f in files:
        f.unlink()
    with pytest.raises(ValueError, match=r"has \d+ tokens, fewer than the 5000"):
        covariance.layer_covariance(model, 1, dataclasses.replace(cfg, n_tokens=5000))
    assert not list((world.cache / "covariance").glob("*"))


def test_model_cache_is_verified_and_swapped_atomically(world, monkeypatch):
    """The converted-model cache: a link to a complete folder whose files match the recorded
    sha256; a new conversion swaps the link and removes the old folder, leaving no temporary
    folder behind; a damaged or edited cache is not used."""
    target = _fake_model_cache(world)
    first = target.resolve()
    assert target.is_symlink() and first.parent == target.parent.resolve()
    found = embedded._verified(target)
    assert found is not None and found[0] == first
    meta = json.loads((first / "attndrift.json").read_text())
    assert meta["conversion_version"] == embedded._CONVERSION_VERSION >= 2
    assert set(meta["sha256"]) >= {"model.safetensors", "tokenizer.json"}
    _fake_model_cache(world)  # converting again: a new folder, the old one removed
    second = target.resolve()
    assert second != first and not first.exists()
    leftovers = [p.name for p in target.parent.iterdir() if p.resolve() != second]
    assert leftovers == [], leftovers
    (second / "tokenizer.json").write_text("{}")  # an edited tokenizer is a damaged cache
    with _warnings_of("attndrift.models.embedded") as warned:
        assert not embedded._cache_complete(target)
    assert "tokenizer.json does not match its sha256" in warned[-1]
    (target.parent / second.name).rename(target.parent / "gone")  # a dangling link: no cache
    with _warnings_of("attndrift.models.embedded") as warned:
        assert embedded._verified(target) is None
    assert warned == []


def test_cache_writes_are_atomic_under_concurrent_writers(tmp_path):
    """Writers (threads standing in for torchrun ranks) never collide and a reader never
    sees a partial file."""
    path = tmp_path / "c.json"
    stop, seen, errors = threading.Event(), [], []

    def writer(k: int) -> None:
        for i in range(40):
            text = json.dumps({"writer": k, "i": i, "pad": "x" * 20_000})
            loading.atomic_write(path, lambda tmp, text=text: tmp.write_text(text))

    def reader() -> None:
        while not stop.is_set():
            if path.exists():
                try:
                    seen.append(json.loads(path.read_text())["i"])
                except (json.JSONDecodeError, FileNotFoundError) as e:
                    errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()
    assert not errors and seen
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary left behind
