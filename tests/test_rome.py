import dataclasses

import pytest
import torch

from attndrift import data, encoding, models, scoring
from attndrift.editing import covariance, edits, kit, rome, sadr, value
from tests.helpers import REQUEST, TEMPLATES

REQ = REQUEST


def _cfg(model, **changes):
    return dataclasses.replace(rome.preset(model), covariance=None, **changes)


def test_templates_are_seeded_and_well_formed(tiny):
    cfg = kit.TemplateConfig(lengths=((3, 2), (4, 3)), seed=5)
    a = kit.context_templates(tiny, cfg)
    assert a == kit.context_templates(tiny, cfg)
    assert a[0] == "{}" and len(a) == 6
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in a[1:])
    assert a != kit.context_templates(tiny, dataclasses.replace(cfg, seed=6))


def test_update_is_rank_one_and_maps_k0_to_v_star(tiny):
    cov = covariance.second_moment(
        tiny, 1, ["The Eiffel Tower", "Rome is a city in Italy"] * 40, n_tokens=10_000
    )[0] + 0.1 * torch.eye(tiny.cfg.d_mlp)
    e = rome.edit(tiny, REQ, _cfg(tiny), cov=cov, templates=TEMPLATES)
    delta = e.delta(0)
    s = torch.linalg.svdvals(delta)
    assert s[1] < 1e-6 * s[0]
    key, out = models.mlp_key_hook(1), models.mlp_out_hook(1)
    before = kit.keys_at_subject(tiny, [REQ.prompt], REQ.subject, [key, out], 2)
    with edits.applied(tiny, e):
        after = kit.keys_at_subject(tiny, [REQ.prompt], REQ.subject, [key, out], 2)
    torch.testing.assert_close(after[key], before[key])  # the key is upstream of W_out
    # the edited MLP maps k0 to v* = v_0 + δ, the target the value optimisation found
    v_star = e.run.targets[0]
    assert not torch.allclose(before[out][0], v_star, atol=1e-3)  # the edit moved it
    torch.testing.assert_close(after[out][0], v_star, atol=1e-4, rtol=1e-4)
    # v_0 is the bare prompt's MLP output: v* - v_0 is the optimised δ (its norm in the trace)
    assert (v_star - before[out][0]).norm().item() == pytest.approx(
        e.run.final.delta_norm, rel=1e-4
    )
    # left is C^-1 u (up to scale)
    filled = [value.fill(t, REQ.prompt) for t in TEMPLATES]
    u = kit.keys_at_subject(tiny, filled, REQ.subject, [key], 2)[key].mean(0)
    direction = torch.linalg.solve(cov.double(), u.double()).float()
    cos = torch.nn.functional.cosine_similarity(e.left[0][:, 0], direction, dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-5)


def test_edit_raises_p_new_on_every_architecture(tiny):
    # tiny random models cannot be taught a fact (P stays small), but the machinery must move
    # P(o_new) the right way on GPT-2, GPT-J (parallel attention) and Llama (GQA) layouts
    e = rome.edit(tiny, REQ, _cfg(tiny), templates=TEMPLATES)
    trace = [dataclasses.asdict(x) for x in e.run.traces[0]]
    assert trace[-1]["nll"] < trace[0]["nll"] and trace[-1]["p_new"] > trace[0]["p_new"]
    pairs = [(REQ.prompt, REQ.target_new)]
    before = scoring.answer_nll(tiny, pairs)
    with edits.applied(tiny, e):
        after = scoring.answer_nll(tiny, pairs)
    assert after.item() < before.item()


def test_r_rome_denominator(tiny):
    a = rome.edit(tiny, REQ, _cfg(tiny), templates=TEMPLATES)
    b = rome.edit(tiny, REQ, _cfg(tiny, denominator="mean_key"), templates=TEMPLATES)
    assert a.editor == "rome" and b.editor == "r-rome"
    torch.testing.assert_close(a.left[0], b.left[0])
    assert not torch.allclose(a.right[0], b.right[0])
    with pytest.raises(ValueError, match="denominator must be"):
        _cfg(tiny, denominator="other")


def test_model_unchanged_and_hook_free_after_edit(tiny):
    snap = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    e = rome.edit(tiny, REQ, _cfg(tiny), templates=TEMPLATES, sadr=sadr.SadrConfig(gamma=0.01))
    for n, p in tiny.named_parameters():
        assert torch.equal(p, snap[n]) and p.requires_grad, n
    assert not any(hp.fwd_hooks for hp in tiny.hook_dict.values())
    assert e.editor == "rome+sadr" and e.run.sadr == sadr.SadrConfig(gamma=0.01, all_heads=False)


def test_value_loop_follows_rome(tiny_llama):
    cfg = _cfg(tiny_llama, value=value.ValueConfig(steps=6, clamp_norm_factor=0.05))
    e = rome.edit(tiny_llama, REQ, cfg, templates=TEMPLATES)
    trace = [dataclasses.asdict(x) for x in e.run.traces[0]]
    assert len(trace) == 6 and [s["step"] for s in trace] == list(range(6))
    obj = value.ValueObjective(tiny_llama, REQ, models.mlp_out_hook(1), 1, ("{}",), cfg.value)
    bound = 0.05 * obj.init.norm().item()
    assert all(s["delta_norm"] <= bound * (1 + 1e-5) for s in trace)  # norm clamp
    assert trace[-1]["delta_norm"] == pytest.approx(bound, rel=1e-4)
    stop = _cfg(tiny_llama, value=value.ValueConfig(steps=30, early_stop_loss=1e9))
    assert rome.edit(tiny_llama, REQ, stop, templates=TEMPLATES).run.steps_run == 1


def test_bad_requests_and_templates(tiny):
    with pytest.raises(ValueError, match='templates\\[0\\] must be "\\{\\}"'):
        rome.edit(tiny, REQ, _cfg(tiny), templates=("x. {}",))
    with pytest.raises(ValueError, match="out of range"):
        rome.edit(tiny, REQ, _cfg(tiny, layer=7), templates=TEMPLATES)
    with pytest.raises(ValueError, match="no ROME preset"):
        rome.preset("opt-125m")
    assert rome.preset("EleutherAI/gpt-j-6B").layer == 5
    assert rome.preset("gpt2-xl").layer == 17
    assert rome.preset("meta-llama/Meta-Llama-3-8B").value.weight_decay == 1e-3


@pytest.mark.slow
def test_smollm_rome_edit_with_and_without_sadr(smollm, sample_data_path):
    ds = data.load_dataset(sample_data_path)
    record = next(r for r in ds.records if r.neighborhood)  # a CounterFact record
    req = record.request
    # the preset's step budget with and without SADR
    cfg = dataclasses.replace(rome.preset(smollm), covariance=None, sadr_steps=None)
    templates = kit.context_templates(smollm, cfg.templates)
    ids = torch.tensor([encoding.encode_prompt(smollm, req.prompt).ids])
    first_new = encoding.encode_answer(smollm, req.target_new)[0]
    with torch.no_grad():
        assert smollm(ids)[0, -1].argmax().item() != first_new
    for s in (None, sadr.SadrConfig(gamma=0.01)):
        e = rome.edit(smollm, req, cfg, templates=templates, sadr=s)
        with edits.applied(smollm, e), torch.no_grad():
            assert smollm(ids)[0, -1].argmax().item() == first_new
        hooked = smollm.run_with_hooks(ids, fwd_hooks=list(e.hooks(smollm)))
        assert hooked[0, -1].argmax().item() == first_new
