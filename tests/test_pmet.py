"""PMET: the two deltas (prefix cache against the full forward, weight decay, clamps, the NLL
schedule), the layer loop against a by-hand solve, SADR at γ = 0, exact restore, and a real
edit of the embedded SmolLM2."""

import dataclasses
import math

import pytest
import torch

from attndrift import data, encoding, models
from attndrift.editing import edits, kit, pmet, sadr, setting, value
from tests.helpers import BATCH_REQUESTS as REQS
from tests.helpers import PADDED_TEMPLATES, assert_same_run, hook_free

TEMPLATES = PADDED_TEMPLATES


def _cfg(model, **changes) -> pmet.PmetConfig:
    return dataclasses.replace(pmet.preset(model), covariance=None, **changes)


def _objective(model, vcfg, sadr_cfg=None, layer=1, request=REQS[0], cls=value.ValueObjective):
    return cls(model, request, pmet.delta_hooks(layer), layer, TEMPLATES, vcfg, sadr_cfg)


@pytest.mark.parametrize("restrain", ["none", "selective"])
def test_two_deltas_follow_the_full_forward(tiny, restrain):
    # the prefix-cached steps start at block L (the attention delta feeds block L's MLP in
    # sequential blocks) and must give the full forward's losses, deltas and SADR heads
    s = sadr.SadrConfig(gamma=1.0) if restrain == "selective" else None
    vcfg = value.ValueConfig(steps=8, clamp_norm_factor=4.0)
    cfg = pmet.PmetConfig(layers=(0, 1), value=vcfg)
    full = _objective(tiny, dataclasses.replace(vcfg, prefix_cache=False), s)
    cached = _objective(tiny, vcfg, s)
    assert cached.step_shape[1] < full.step_shape[1]  # fewer positions run per step
    assert cached.init.shape == (2, tiny.cfg.d_model)  # [attention, MLP]
    ref, new = pmet.optimise_deltas(full, cfg), pmet.optimise_deltas(cached, cfg)
    for a, b in zip(ref, new, strict=True):
        assert_same_run(a, b)
    if s is not None:
        assert any(sum(x.heads) > 0 for x in ref[0].trace)  # the selection was exercised
    # v_0 of each hook is the vanilla activation at the bare prompt's subject token
    names = list(pmet.delta_hooks(1))
    kept = kit.keys_at_subject(tiny, [REQS[0].prompt], REQS[0].subject, names, 2)
    torch.testing.assert_close(cached.init, torch.stack([kept[n][0] for n in names]))


def test_one_hook_as_a_sequence_matches_the_single_hook_objective(tiny_llama):
    # the several-hook path with one hook (steps from block L) against today's path (L + 1)
    vcfg = value.ValueConfig(steps=6)
    hook = models.mlp_out_hook(1)
    one = value.ValueObjective(tiny_llama, REQS[0], hook, 1, TEMPLATES, vcfg)
    seq = value.ValueObjective(tiny_llama, REQS[0], [hook], 1, TEMPLATES, vcfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        delta = torch.randn(tiny_llama.cfg.d_model, generator=g) * 5
        with torch.no_grad():
            a, b = one(delta), seq(delta[None])
        for name in ("total", "nll", "kl", "weight_decay", "p_new"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not in block 1"):
        value.ValueObjective(
            tiny_llama, REQS[0], [hook, models.mlp_out_hook(2)], 1, TEMPLATES, vcfg
        )


def test_weight_decay_and_clamp_are_per_delta(tiny_llama):
    vcfg = value.ValueConfig(steps=6, clamp_norm_factor=0.05, weight_decay=0.7)
    obj = _objective(tiny_llama, vcfg)
    delta = torch.randn(2, tiny_llama.cfg.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        wd = obj(delta).weight_decay
    by_hand = 0.7 * sum(delta[h].norm() / obj.init[h].norm() ** 2 for h in range(2))
    torch.testing.assert_close(wd, by_hand)
    attn, mlp = pmet.optimise_deltas(obj, pmet.PmetConfig(layers=(1,), value=vcfg))
    assert len(attn.trace) == 6 and [s.step for s in mlp.trace] == list(range(6))
    for result, h in ((attn, 0), (mlp, 1)):
        bound = 0.05 * obj.init[h].norm().item()  # each delta within its own ball
        assert all(s.delta_norm <= bound * (1 + 1e-5) for s in result.trace)
        assert result.trace[-1].delta_norm == pytest.approx(bound, rel=1e-4)
        assert result.delta.norm().item() == pytest.approx(bound, rel=1e-4)
        torch.testing.assert_close(result.init, obj.init[h])
    assert [s.loss for s in attn.trace] == [s.loss for s in mlp.trace]  # one optimisation


class _Recording(value.ValueObjective):
    """The objective, recording whether o_new led (``greedy``) at each evaluation."""

    def __call__(self, delta, **kwargs):
        terms = super().__call__(delta, **kwargs)
        self.flags = [*getattr(self, "flags", []), bool(terms.greedy)]
        return terms


def test_nll_weight_drops_once_the_target_is_the_argmax():
    # a one-token target that a large delta makes the argmax everywhere (tiny GPT-J)
    model = models.tiny_model("gptj", seed=0)
    req = dataclasses.replace(REQS[0], target_new="the")
    vcfg = value.ValueConfig(
        steps=16, lr=2.0, clamp_norm_factor=100.0, weight_decay=0.0, early_stop_loss=0.0
    )
    cfg = pmet.PmetConfig(layers=(1,), value=vcfg, greedy_kl_stop=0.0)  # never stops early
    obj = _objective(model, vcfg, request=req, cls=_Recording)
    trace = pmet.optimise_deltas(obj, cfg)[1].trace
    flags = obj.flags
    assert len(trace) == 16 and any(flags[:-1]) and not flags[0]
    for k in range(1, len(trace)):  # PMET: NLL weight 0.1 after a step where o_new led
        factor = 0.1 if flags[k - 1] else 1.0
        s = trace[k]
        assert s.loss == pytest.approx(factor * s.nll + s.kl + s.weight_decay, rel=1e-6)
    # with the essence KL below greedy_kl_stop, the first step where o_new leads is the last
    stop = dataclasses.replace(cfg, value=dataclasses.replace(vcfg, kl_factor=0.0))
    obj = _objective(model, stop.value, request=req, cls=_Recording)
    assert len(pmet.optimise_deltas(obj, stop)[1].trace) == flags.index(True) + 1


@pytest.mark.parametrize("spread", ["sqrt", "layers_left"])
def test_pmet_solves_its_normal_equations(tiny, spread):
    cfg = _cfg(tiny, mom2_update_weight=3.0, spread=spread)
    e = pmet.edit(tiny, REQS, cfg, templates=TEMPLATES)
    assert e.layers == (0, 1) and e.editor == "pmet"
    m_star = torch.stack(e.run.targets)  # [n, d_model]: the MLP targets m*_i
    m_name = models.mlp_out_hook(1)
    prompts, subjects = [r.prompt for r in REQS], [r.subject for r in REQS]
    # replay the layer loop: K and the MLP-output residuals at each layer, by hand
    with edits.restored(tiny, e.layers):
        for i, layer in enumerate(e.layers):
            keys = kit.mean_keys(tiny, REQS, layer, TEMPLATES).double().T
            lhs = 3.0 * torch.eye(tiny.cfg.d_mlp, dtype=torch.float64) + keys @ keys.T
            torch.testing.assert_close(lhs @ e.left[i].double(), keys, atol=1e-4, rtol=1e-4)
            now = kit.keys_at_subject(tiny, prompts, subjects, [m_name], 2)[m_name]
            left = len(e.layers) - i
            share = math.sqrt(left) if spread == "sqrt" else left
            torch.testing.assert_close(e.right[i], (m_star - now) / share, rtol=1e-4, atol=1e-5)
            w = models.mlp_out_weight(tiny, layer)
            with torch.no_grad():
                w.add_(e.delta(i))
    # the run records the MLP delta: ‖m* − m_0‖ is the trace's last delta_norm
    before = kit.keys_at_subject(tiny, prompts[:1], subjects[:1], [m_name], 2)[m_name][0]
    assert (m_star[0] - before).norm().item() == pytest.approx(
        e.run.traces[0][-1].delta_norm, rel=1e-4
    )


def test_gamma_zero_is_plain_pmet(tiny):
    cfg = _cfg(tiny, mom2_update_weight=1.0)
    plain = pmet.edit(tiny, REQS[:1], cfg, templates=TEMPLATES)
    zero = pmet.edit(tiny, REQS[:1], cfg, templates=TEMPLATES, sadr=sadr.SadrConfig(gamma=0.0))
    for a, b in zip(plain.left + plain.right, zero.left + zero.right, strict=True):
        assert torch.equal(a, b)
    assert any(s.sadr > 0 for s in zero.run.traces[0])  # measured, not added
    assert zero.editor == "pmet" and plain.run.sadr is None
    on = pmet.edit(tiny, REQS[:1], cfg, templates=TEMPLATES, sadr=sadr.SadrConfig(gamma=10.0))
    assert on.editor == "pmet+sadr" and not torch.equal(plain.right[-1], on.right[-1])


def test_a_lambda_grid_optimises_each_pair_of_deltas_once(tiny, monkeypatch):
    calls, real = [], pmet.optimise_deltas
    monkeypatch.setattr(
        pmet, "optimise_deltas", lambda obj, *a, **kw: calls.append(obj) or real(obj, *a, **kw)
    )
    editor = setting.Editor(tiny)
    quick = dict(editor="pmet", layers=(0, 1), identity_cov=True, steps=4)
    editor(setting.Setting(mom2_weight=1.0, **quick), REQS)
    second = editor(setting.Setting(mom2_weight=5.0, **quick), REQS)
    assert len(calls) == len(REQS)  # the deltas come before λ: optimised once per request
    assert "value_steps_reused" in dict(second.run.timings)
    cfg = setting.Setting(mom2_weight=5.0, **quick).config(tiny)
    fresh = pmet.edit(tiny, REQS, cfg, templates=editor.templates(cfg))  # no memo
    for a, b in zip((*second.left, *second.right), (*fresh.left, *fresh.right), strict=True):
        assert torch.equal(a, b)  # the shared edit is the fresh one, bit for bit
    assert second.run.traces == fresh.run.traces
    n = len(calls)
    # PMET's NLL schedule is part of the optimisation, so it is part of the key; so is MEMIT's
    # z (another hook): neither reuses these deltas
    pmet.edit(tiny, REQS[:1], dataclasses.replace(cfg, greedy_kl_stop=0.5), templates=TEMPLATES,
              memo=editor.memo)  # fmt: skip
    pmet.edit(tiny, REQS[:1], dataclasses.replace(cfg, greedy_nll_factor=0.5),
              templates=TEMPLATES, memo=editor.memo)  # fmt: skip
    assert len(calls) == n + 2
    editor(setting.Setting(**{**quick, "editor": "memit"}, mom2_weight=5.0), REQS)
    assert len(calls) == n + 2 and editor.memo.hits == len(REQS)


def _snapshot(model) -> dict:
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def _assert_restored(model, snap) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n][0]) and p.requires_grad == snap[n][1], n
    assert hook_free(model)


def test_model_restored_and_hook_free_also_after_an_error(tiny, monkeypatch):
    snap = _snapshot(tiny)
    cfg = _cfg(tiny, mom2_update_weight=1.0)
    e = pmet.edit(tiny, REQS, cfg, templates=TEMPLATES, sadr=sadr.SadrConfig(gamma=0.5))
    _assert_restored(tiny, snap)
    assert not torch.equal(e.delta(0), torch.zeros_like(e.delta(0)))

    def failing_after(n, fn):
        calls = []

        def wrapped(*args, **kwargs):
            calls.append(1)
            if len(calls) > n:
                raise RuntimeError("injected")
            return fn(*args, **kwargs)

        return wrapped

    # midway through the layer loop (layer 0's update is in the weights) ...
    monkeypatch.setattr(kit.MeanKeys, "__call__", failing_after(1, kit.MeanKeys.__call__))
    with pytest.raises(RuntimeError, match="injected"):
        pmet.edit(tiny, REQS, cfg, templates=TEMPLATES)
    _assert_restored(tiny, snap)
    monkeypatch.undo()
    # ... and midway through the optimisation (parameters frozen, SADR's hooks on)
    call = value.ValueObjective.__call__
    monkeypatch.setattr(value.ValueObjective, "__call__", failing_after(3, call))
    with pytest.raises(RuntimeError, match="injected"):
        pmet.edit(tiny, REQS, cfg, templates=TEMPLATES, sadr=sadr.SadrConfig(gamma=0.5))
    _assert_restored(tiny, snap)


def test_saved_edit_loads_and_setting_dispatches(tiny, tmp_path):
    s = setting.Setting(editor="pmet", layers=(0, 1), mom2_weight=1.0, identity_cov=True, steps=3)
    cfg = s.config(tiny)
    assert isinstance(cfg, pmet.PmetConfig) and cfg.layers == (0, 1) and cfg.sadr_steps is None
    e = setting.Editor(tiny)(s, REQS[:1])
    assert e.editor == "pmet" and e.run.steps_run <= 3
    back = edits.Edit.load(e.save(tmp_path / "pmet.safetensors"))
    assert back.run.config == e.run.config and back.editor == "pmet"
    for a, b in zip(back.right, e.right, strict=True):
        assert torch.equal(a, b)


def test_bad_configs():
    with pytest.raises(ValueError, match="ascending"):
        pmet.PmetConfig(layers=(3, 2))
    with pytest.raises(ValueError, match="non-empty"):
        pmet.PmetConfig(layers=())
    with pytest.raises(ValueError, match="spread must be one of"):
        pmet.PmetConfig(layers=(1,), spread="cubic")
    with pytest.raises(ValueError, match="no PMET preset"):
        pmet.preset("gpt2-xl")
    with pytest.raises(ValueError, match="at least one request"):
        pmet.edit(models.tiny_model("llama", seed=0), [], _cfg("tiny"), templates=TEMPLATES)
    gptj = pmet.preset("EleutherAI/gpt-j-6B")
    assert gptj.layers == (3, 4, 5, 6, 7, 8) and gptj.mom2_update_weight == 15000.0
    assert (gptj.value.steps, gptj.value.lr, gptj.value.clamp_norm_factor) == (30, 0.2, 0.75)
    assert gptj.value.kl_factor == 1.0 and gptj.sadr_steps == 40 and pmet.SADR_GAMMA == 0.08
    with pytest.raises(ValueError, match="mom2_weight applies"):
        setting.Setting(editor="rome", mom2_weight=1.0)


@pytest.mark.slow
def test_smollm_pmet_teaches_an_embedded_fact(smollm):
    record = data.load_embedded()[0]  # The Eiffel Tower is located in the city of: Paris -> Rome
    req = record.request
    # the preset's C (cached by `attndrift prepare`) and 15 of its 30 steps (about a minute)
    cfg = pmet.preset(smollm)
    cfg = dataclasses.replace(cfg, value=dataclasses.replace(cfg.value, steps=15))
    templates = kit.context_templates(smollm, cfg.templates)
    ids = torch.tensor([encoding.encode_prompt(smollm, req.prompt).ids])
    first_new = encoding.encode_answer(smollm, req.target_new)[0]
    with torch.no_grad():
        assert smollm(ids)[0, -1].argmax().item() != first_new
    e = pmet.edit(smollm, [req], cfg, templates=templates)
    with edits.applied(smollm, e), torch.no_grad():
        assert smollm(ids)[0, -1].argmax().item() == first_new
