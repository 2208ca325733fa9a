import dataclasses
from pathlib import Path

import jaxtyping
import pytest
import torch

from attndrift import encoding, models
from attndrift.editing.edits import Edit, add_to_weights, applied, restored
from tests.helpers import REQUEST

REQ = REQUEST


def random_edit(model, layers=(1, 2), rank=2, seed=0, scale=0.5) -> Edit:
    g = torch.Generator().manual_seed(seed)
    d_mlp, d_model = model.cfg.d_mlp, model.cfg.d_model
    return Edit(
        layers=tuple(layers),
        left=tuple(torch.randn(d_mlp, rank, generator=g) * scale for _ in layers),
        right=tuple(torch.randn(rank, d_model, generator=g) * scale for _ in layers),
        requests=(REQ,),
        editor="random",
        model_name=model.cfg.model_name,
        model_fingerprint=models.fingerprint(model),
    )


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]), n
        assert p.stride() == snap[n].stride(), n  # fast layout kept
    assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())


def test_weights_and_hooks_give_the_same_logits(tiny):
    e = random_edit(tiny)
    tokens = encoding.encode_batch(tiny, [REQ.prompt, "The Louvre is in"]).tokens
    snap = _snapshot(tiny)
    with torch.no_grad():
        before = tiny(tokens)
        with applied(tiny, e):
            by_weights = tiny(tokens)
        _assert_same(tiny, snap)
        by_hooks = tiny.run_with_hooks(tokens, fwd_hooks=list(e.hooks(tiny)))
        _assert_same(tiny, snap)
    assert (by_weights - before).abs().max() > 1e-2  # the edit does something
    torch.testing.assert_close(by_hooks, by_weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e.delta(0), e.left[0] @ e.right[0])


def test_restored_even_when_the_body_raises(tiny):
    e = random_edit(tiny)
    snap = _snapshot(tiny)
    with pytest.raises(RuntimeError, match="boom"), applied(tiny, e):
        assert not torch.equal(models.mlp_out_weight(tiny, 1), snap["blocks.1.mlp.W_out"])
        raise RuntimeError("boom")
    _assert_same(tiny, snap)
    with pytest.raises(KeyError), restored(tiny, e.layers):
        add_to_weights(tiny, e)
        raise KeyError("x")
    _assert_same(tiny, snap)


def test_hook_edit_inside_model_hooks_context(tiny):
    from attndrift import scoring

    e = random_edit(tiny)
    pairs = [(REQ.prompt, "Rome")]
    via_param = scoring.answer_nll(tiny, pairs, fwd_hooks=e.hooks(tiny))
    with tiny.hooks(fwd_hooks=list(e.hooks(tiny))):
        via_context = scoring.answer_nll(tiny, pairs)
    torch.testing.assert_close(via_param, via_context)
    assert not any(hp.fwd_hooks for hp in tiny.hook_dict.values())


def test_save_load_round_trip(tiny, tmp_path):
    e = random_edit(tiny)
    path = e.save(tmp_path / "e.safetensors")
    back = Edit.load(path)
    assert back.layers == e.layers and back.requests == e.requests and back.editor == "random"
    assert back.run == e.run and back.version == e.version
    for a, b in zip(e.left + e.right, back.left + back.right, strict=True):
        assert torch.equal(a, b)
    assert b"pickle" not in path.read_bytes()[:8]


def test_bad_edits_are_rejected(tiny, tmp_path):
    with pytest.raises(ValueError, match="one \\(left, right\\) pair per layer"):
        Edit((1,), (), (), (REQ,), "x")
    # rejected by our check, or first by jaxtyping's shape check when it is active (tests)
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)):
        Edit((1,), (torch.zeros(3, 2),), (torch.zeros(3, 4),), (REQ,), "x")
    wrong = Edit((1,), (torch.zeros(7, 1),), (torch.zeros(1, 5),), (REQ,), "x")
    with pytest.raises(ValueError, match="does not fit model"):
        wrong.hooks(tiny)
    with pytest.raises(ValueError, match="out of range"):
        random_edit(tiny, layers=(9,)).hooks(tiny)
    with pytest.raises(FileNotFoundError, match="edit file not found"):
        Edit.load(tmp_path / "none.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not an attndrift edit file"):
        Edit.load(tmp_path / "plain.safetensors")


def test_save_load_keeps_how_the_edit_was_made(tiny, tmp_path):
    from attndrift.editing import rome, sadr

    cfg = dataclasses.replace(rome.preset(tiny), covariance=None)
    e = rome.edit(tiny, REQ, cfg, templates=("{}", "I think so. {}"), sadr=sadr.SadrConfig(0.5))
    back = Edit.load(e.save(tmp_path / "rome.safetensors"))
    assert back.run.config == e.run.config and back.run.sadr == e.run.sadr
    assert back.run.traces == e.run.traces and back.run.timings == e.run.timings
    assert all(torch.equal(a, b) for a, b in zip(back.run.targets, e.run.targets, strict=True))
    assert back.model_fingerprint == e.model_fingerprint == models.fingerprint(tiny)


def test_files_without_checksums_load_with_a_warning(tiny, tmp_path, caplog):
    """A file saved before checksums were stored (no ``attndrift.sha256`` entry) is read, with
    a warning that names it as unverified; its other checks still apply."""
    import json
    import logging

    from safetensors import safe_open
    from safetensors.torch import save_file

    from attndrift.editing import edits

    path = random_edit(tiny).save(tmp_path / "e.safetensors")
    with safe_open(path, "pt") as f:
        stored = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    assert set(stored) == {edits.META_KEY, edits.SHA_KEY}
    del stored[edits.SHA_KEY]
    old = tmp_path / "old.safetensors"
    save_file(tensors, old, metadata=stored)
    with caplog.at_level(logging.WARNING, logger="attndrift.editing.edits"):
        back = Edit.load(old)
    assert f"{old} has no checksums (saved before they were stored): loaded unverified" in (
        caplog.text
    )
    assert all(torch.equal(a, b) for a, b in zip(back.left, random_edit(tiny).left, strict=True))
    meta = json.loads(stored[edits.META_KEY])
    meta["layers"] = [1, 1]
    save_file(tensors, old, metadata={edits.META_KEY: json.dumps(meta)})
    with pytest.raises(ValueError, match="layer 1 is listed twice"):
        Edit.load(old)


FLAT_LAYOUT_EDITS = Path(__file__).parent / "fixtures" / "flat_layout_edits"


@pytest.mark.parametrize("editor", ["rome", "memit", "pmet", "alphaedit"])
def test_edit_files_of_the_flat_layout_load(editor, tiny_llama):
    # files written before the editors moved into attndrift.editing: a file names its config
    # class by its bare name (config_type), which the registry maps to the class where it lives
    from attndrift.editing import registry

    e = Edit.load(FLAT_LAYOUT_EDITS / f"{editor}.safetensors")
    spec = registry.get(editor)
    assert type(e.run.config) is spec.config and e.run.config.__module__.startswith(
        "attndrift.editing."
    )
    assert e.editor == (f"{editor}+sadr" if editor == "rome" else editor)
    assert e.requests[0] == REQ and (e.run.sadr is not None) == (editor == "rome")
    assert len(e.run.traces) == len(e.requests) == len(e.run.targets)
    assert e.run.config == dataclasses.replace(spec.preset(tiny_llama), **_changed(e.run.config))
    e.check(tiny_llama)  # made on this very model: its fingerprint matches
    tokens = encoding.encode_batch(tiny_llama, [REQ.prompt]).tokens
    with torch.no_grad():
        before = tiny_llama(tokens)
        with applied(tiny_llama, e):
            after = tiny_llama(tokens)
        with models.hooked(tiny_llama, e.hooks(tiny_llama)):
            hooked = tiny_llama(tokens)
    # (the tiny model's C leaves AlphaEdit no null space: its update is zero)
    assert torch.equal(after, before) == (editor == "alphaedit")
    torch.testing.assert_close(hooked, after, rtol=1e-4, atol=1e-4)


def _changed(config) -> dict:
    """The fields the fixtures' settings changed from the preset (steps, identity covariance,
    PMET's layers)."""
    changed = {"value": config.value}
    if config.covariance is None:
        changed["covariance"] = None
    if hasattr(config, "layers"):
        changed["layers"] = config.layers
    return changed
