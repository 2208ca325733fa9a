"""The lean forward of the value steps (models/lean.py) against TransformerLens' hooked
forward: the same hidden states, attention rows, losses and δ on tiny models of three
architectures, the same edits on SmolLM2; what it does not cover falls back to the hooked
forward; its FLOP count is what torch counts."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attndrift import data, models
from attndrift.editing import rome, sadr, setting, value
from tests.helpers import assert_same_run
from tests.test_value import HOOKS, REQ, TEMPLATES

SADR = {
    "none": None,
    "selective": sadr.SadrConfig(gamma=1.0),
    "variants": sadr.SadrConfig(
        gamma=1.0, queries="after_subject", keys="subject", relation_prompts=True
    ),
    "distractors": sadr.SadrConfig(gamma=1.0, prompts="both"),
}
#: the value-side variants that read more rows: the relation KL, the off-target hinge, the
#: margin (the edit prompt followed by o_true)
CONFIGS = {
    "none": {},
    "selective": {},
    "variants": {"relation_kl": 0.5},
    "distractors": {"offtarget": 1.0, "stop_margin": 50.0},
}


def _pair(model, hook, cfg, sadr_cfg, layer=1, request=REQ, templates=TEMPLATES):
    """(hooked, lean) objectives of the same edit."""
    with value.hooked_forward():
        hooked = value.ValueObjective(model, request, hook(layer), layer, templates, cfg, sadr_cfg)
    lean = value.ValueObjective(model, request, hook(layer), layer, templates, cfg, sadr_cfg)
    return hooked, lean


@pytest.mark.parametrize("editor", sorted(HOOKS))
@pytest.mark.parametrize("restrain", sorted(SADR))
def test_lean_follows_the_hooked_forward(tiny, editor, restrain):
    cfg = value.ValueConfig(steps=8, **CONFIGS[restrain])
    hooked, lean = _pair(tiny, HOOKS[editor], cfg, SADR[restrain])
    assert hooked._lean_forward() is None and lean._lean_forward() is not None
    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(tiny.cfg.d_model, generator=g) * 3).to(lean.init.device)
    with torch.no_grad():
        (h_ref, rows_ref), (h_new, rows_new) = hooked._forward(delta), lean._forward(delta)
    read = lean._read_positions()
    torch.testing.assert_close(h_new[read], h_ref[read], rtol=1e-5, atol=1e-5)
    if rows_ref is not None:
        torch.testing.assert_close(rows_new, rows_ref, rtol=1e-5, atol=1e-6)
    assert_same_run(value.optimise_value(hooked), value.optimise_value(lean))


def test_positions_no_loss_reads_are_nan(tiny_llama):
    _, lean = _pair(tiny_llama, models.mlp_out_hook, value.ValueConfig(), None)
    delta = torch.zeros(tiny_llama.cfg.d_model, device=lean.init.device)
    with torch.no_grad():
        hidden, _ = lean._forward(delta)
    read = torch.zeros(lean.step_shape, dtype=torch.bool, device=hidden.device)
    read[lean._read_positions()] = True
    assert torch.isfinite(hidden[read]).all()
    assert torch.isnan(hidden[~read]).all()  # a term reading one would fail at once
    assert (~read).any()


def test_what_it_does_not_cover_runs_the_hooked_forward(tiny_llama):
    assert models.lean.unsupported(tiny_llama) is None
    seen = []

    def watch(x, hook):
        seen.append(hook.name)

    with models.hooked(tiny_llama, [(models.pattern_hook(3), watch)]):
        assert models.lean.unsupported(tiny_llama) == "forward hooks on the model"
        objective = value.ValueObjective(
            tiny_llama, REQ, models.mlp_out_hook(1), 1, TEMPLATES, value.ValueConfig()
        )
        assert objective._lean_forward() is None
        objective(torch.zeros(tiny_llama.cfg.d_model, device=objective.init.device))
    assert seen  # the model's own hook ran inside the steps
    other = models.tiny_model("llama", seed=0)
    other.cfg.use_attn_result = True  # the same numbers, through per-head results
    assert models.lean.unsupported(other) == "config use_attn_result=True"
    mask = torch.ones(1, 3, dtype=torch.long)
    assert models.suffix_forward(other, None, mask, 2) is None
    with pytest.raises(ValueError, match=r"does not cover .*use_attn_result"):
        models.SuffixForward(other, None, mask, 2)


def test_hooked_forward_is_kept_by_the_objectives_built_inside(tiny_llama):
    cfg = value.ValueConfig()
    with value.hooked_forward():
        inside = value.ValueObjective(tiny_llama, REQ, models.mlp_out_hook(1), 1, TEMPLATES, cfg)
    outside = value.ValueObjective(tiny_llama, REQ, models.mlp_out_hook(1), 1, TEMPLATES, cfg)
    assert inside._lean_forward() is None and outside._lean_forward() is not None


def test_editing_the_last_layer_runs_no_block(tiny):
    last = tiny.cfg.n_layers - 1
    cfg = value.ValueConfig()
    hooked, lean = _pair(tiny, models.mlp_out_hook, cfg, sadr.SadrConfig(gamma=1.0), last)
    assert lean._lean_forward() is not None and not lean.sadr_layers
    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(tiny.cfg.d_model, generator=g) * 3).to(lean.init.device)
    grads = []
    for objective in (hooked, lean):  # (Adam turns gradients near its eps into full steps)
        d = delta.clone().requires_grad_(True)
        with value.frozen(tiny):
            terms = objective(d)
            terms.total.backward()
        grads.append((terms.total.detach(), d.grad))
    (loss_ref, grad_ref), (loss_new, grad_new) = grads
    torch.testing.assert_close(loss_new, loss_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_new, grad_ref, rtol=1e-5, atol=1e-6 * grad_ref.abs().max())


@pytest.mark.parametrize("restrain", ["none", "selective"])
def test_step_flops_are_what_torch_counts(tiny, restrain):
    objective = value.ValueObjective(
        tiny, REQ, models.mlp_out_hook(1), 1, TEMPLATES, value.ValueConfig(), SADR[restrain]
    )
    delta = torch.randn(tiny.cfg.d_model, device=objective.init.device, requires_grad=True)
    _ = objective.references  # (at δ = 0: a forward of their own, not the step's)
    with value.frozen(tiny), FlopCounterMode(display=False) as counter:
        objective(delta).total.backward()
    flops = objective.step_flops()
    assert flops["total"] == counter.get_total_flops()
    assert flops["forward"] + flops["backward"] == flops["total"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [0.0, 0.05])
def test_smollm_lean_edits_match_the_hooked_ones(smollm, gamma):
    record = data.load_embedded().by_id(1)
    cfg = rome.preset(smollm)
    editor = setting.Editor(smollm)
    templates, cov = editor.templates(cfg), editor.covariance(cfg, cfg.layer)
    cfg = dataclasses.replace(cfg, sadr_steps=12, value=dataclasses.replace(cfg.value, steps=12))
    s = sadr.SadrConfig(gamma) if gamma else None
    with value.hooked_forward():
        old = rome.edit(smollm, record.request, cfg, sadr=s, cov=cov, templates=templates)
    new = rome.edit(smollm, record.request, cfg, sadr=s, cov=cov, templates=templates)
    assert old.run.steps_run == new.run.steps_run
    for a, b in [*zip(old.left, new.left, strict=True), *zip(old.right, new.right, strict=True)]:
        assert (a - b).norm() <= 1e-4 * a.norm()
