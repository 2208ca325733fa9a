"""The prefix-cached value optimisation against the full-forward reference (same losses,
same δ, same SADR heads), on tiny models of three architectures and on SmolLM2."""

import dataclasses

import pytest
import torch

from attndrift import data, encoding, metrics, models
from attndrift.editing import kit, memit, rome, sadr, value
from tests.helpers import PADDED_TEMPLATES, assert_same_run, request

REQ = request(target_new="New York City")
TEMPLATES = PADDED_TEMPLATES
HOOKS = {"rome": models.mlp_out_hook, "memit": models.resid_post_hook}
SADR = {
    "none": None,
    "selective": sadr.SadrConfig(gamma=1.0),
    "all heads": sadr.SadrConfig(gamma=1.0, all_heads=True),
}


def _pair(model, hook, cfg, sadr_cfg, layer=1, request=REQ, templates=TEMPLATES):
    return tuple(
        value.ValueObjective(
            model,
            request,
            hook(layer),
            layer,
            templates,
            dataclasses.replace(cfg, prefix_cache=p),
            sadr_cfg,
        )
        for p in (False, True)
    )


@pytest.mark.parametrize("editor", sorted(HOOKS))
@pytest.mark.parametrize("restrain", sorted(SADR))
def test_prefix_cache_follows_the_full_forward(tiny, editor, restrain):
    cfg = value.ValueConfig(steps=8, clamp_norm_factor=4.0)
    full, cached = _pair(tiny, HOOKS[editor], cfg, SADR[restrain])
    assert cached.step_shape[1] < full.step_shape[1]  # fewer positions run per step
    ref, new = value.optimise_value(full), value.optimise_value(cached)
    assert_same_run(ref, new)
    if restrain != "none":
        assert any(sum(s.heads) > 0 for s in ref.trace)  # the selection was exercised


def test_sadr_rows_see_every_key_and_select_the_same_heads(tiny):
    cfg = value.ValueConfig()
    full, cached = _pair(tiny, models.mlp_out_hook, cfg, sadr.SadrConfig(gamma=1.0))
    g = torch.Generator().manual_seed(3)
    for scale in (3.0, 30.0):
        delta = torch.randn(tiny.cfg.d_model, generator=g) * scale
        with torch.no_grad():
            _, rows_full = full._forward(delta)
            _, rows_cached = cached._forward(delta)
        # each query row is a distribution over all of its prompt's keys, cached ones included
        torch.testing.assert_close(rows_cached.sum(-1), torch.ones_like(rows_cached.sum(-1)))
        pairs = ((full, rows_full), (cached, rows_cached))
        masks = [sadr.head_mask(o.vanilla_rows, r, o.sadr.subject) for o, r in pairs]
        assert torch.equal(masks[0], masks[1])
        kls = [metrics.kl(o.vanilla_rows, r, floor=sadr.EPS) for o, r in pairs]
        torch.testing.assert_close(kls[1], kls[0], rtol=1e-4, atol=1e-6)
        # attention to the subject's last token, read at each layout's own key index
        at = [sadr.attention_to_subject(r, o.sadr.subject) for o, r in pairs]
        torch.testing.assert_close(at[1], at[0], rtol=1e-5, atol=1e-6)


def test_subject_at_the_first_position_needs_no_prefix(tiny_llama):
    # SmolLM2-style model (no BOS): a one-token subject opening the prompt leaves an empty prefix
    req = data.EditRequest(
        subject="Apple",
        prompt="Apple was founded by",
        target_true="Steve Jobs",
        target_new="Bill Gates",
    )
    cfg = value.ValueConfig(steps=4)
    full, cached = _pair(
        tiny_llama, models.mlp_out_hook, cfg, sadr.SadrConfig(1.0), 1, req, ("{}",)
    )
    assert cached.start.cache[0].past_keys.shape[1] == 0
    assert_same_run(value.optimise_value(full), value.optimise_value(cached))


def test_rome_and_memit_edits_match_the_reference(tiny):
    cfg = dataclasses.replace(rome.preset(tiny), covariance=None)
    ref_cfg = dataclasses.replace(cfg, value=dataclasses.replace(cfg.value, prefix_cache=False))
    for s in (None, sadr.SadrConfig(gamma=1.0)):
        a = rome.edit(tiny, REQ, ref_cfg, templates=TEMPLATES, sadr=s)
        b = rome.edit(tiny, REQ, cfg, templates=TEMPLATES, sadr=s)
        torch.testing.assert_close(b.left[0], a.left[0])
        torch.testing.assert_close(b.right[0], a.right[0], rtol=1e-4, atol=1e-5)
    mcfg = dataclasses.replace(memit.preset(tiny), covariance=None, mom2_update_weight=1.0)
    mref = dataclasses.replace(mcfg, value=dataclasses.replace(mcfg.value, prefix_cache=False))
    reqs = [
        REQ,
        data.EditRequest(
            subject="Louvre", prompt="The Louvre is in", target_true="Paris", target_new="London"
        ),
    ]
    a = memit.edit(tiny, reqs, mref, templates=TEMPLATES, sadr=sadr.SadrConfig(1.0))
    b = memit.edit(tiny, reqs, mcfg, templates=TEMPLATES, sadr=sadr.SadrConfig(1.0))
    for x, y in zip(a.right, b.right, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


def test_early_stop_on_the_nll_term(tiny_llama):
    def run(**changes):
        cfg = value.ValueConfig(steps=6, weight_decay=50.0, early_stop_loss=0.0)
        cfg = dataclasses.replace(cfg, **changes)
        hook = models.mlp_out_hook(1)
        return value.optimise_value(value.ValueObjective(tiny_llama, REQ, hook, 1, TEMPLATES, cfg))

    free = run().trace
    assert len(free) == 6
    nll = [s.nll for s in free]
    threshold = (nll[0] + min(nll[1:])) / 2  # the NLL passes it after some steps...
    first = next(i for i, x in enumerate(nll) if x < threshold)
    assert first > 0 and min(s.loss for s in free) > threshold  # ...the whole loss never does
    assert len(run(early_stop_loss=threshold, early_stop_on="nll").trace) == first + 1
    assert len(run(early_stop_loss=threshold, early_stop_on="loss").trace) == 6
    with pytest.raises(ValueError, match="early_stop_on"):
        value.ValueConfig(early_stop_on="p_new")


@pytest.mark.slow
@pytest.mark.parametrize("restrain", ["none", "selective"])
def test_smollm_prefix_cache_follows_the_full_forward(smollm, restrain):
    ds = data.load_embedded()
    cfg = rome.preset(smollm)
    templates = kit.context_templates(smollm, cfg.templates)
    value_cfg = dataclasses.replace(cfg.value, steps=6)
    for record, hook, layer in (
        (ds[0], models.mlp_out_hook, cfg.layer),
        (ds[5], models.resid_post_hook, 8),
    ):
        full, cached = _pair(
            smollm, hook, value_cfg, SADR[restrain], layer, record.request, templates
        )
        assert_same_run(value.optimise_value(full), value.optimise_value(cached))


def _relation_objective(model, relation_kl, prefix_cache=True, kl_factor=0.0):
    cfg = value.ValueConfig(relation_kl=relation_kl, kl_factor=kl_factor, prefix_cache=prefix_cache)
    return value.ValueObjective(model, REQ, models.mlp_out_hook(1), 1, TEMPLATES, cfg)


def _relation_kl_by_hand(model, delta, weight):
    """weight · mean over the relation prompts of KL(p_δ ‖ p_0) at their last token, each
    prompt run on its own with δ added to layer 1's MLP output at the subject's last token."""
    kls = []
    for t in sadr.RELATION_TEMPLATES:
        enc = encoding.encode_prompt(model, t.format(REQ.subject), REQ.subject)
        tokens = torch.tensor([enc.ids])

        def add(x, hook, at=enc.subject_last):
            x = x.clone()
            x[0, at] += delta
            return x

        with torch.no_grad():
            p0 = torch.log_softmax(model(tokens)[0, -1].double(), -1)
            with models.hooked(model, [(models.mlp_out_hook(1), add)]):
                p = torch.log_softmax(model(tokens)[0, -1].double(), -1)
        kls.append((p.exp() * (p - p0)).sum())
    return weight * torch.stack(kls).mean()


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_relation_kl_matches_hand_computation(tiny_llama, prefix_cache):
    obj = _relation_objective(tiny_llama, 2.0, prefix_cache)
    assert len(obj.rows.relation_rows) == len(sadr.RELATION_TEMPLATES)
    zero = torch.zeros(tiny_llama.cfg.d_model)
    assert obj(zero).kl.item() == pytest.approx(0.0, abs=1e-6)
    delta = torch.randn(tiny_llama.cfg.d_model, generator=torch.Generator().manual_seed(3)) * 5
    expected = _relation_kl_by_hand(tiny_llama, delta, 2.0)
    assert expected.item() > 1e-3
    assert obj(delta).kl.item() == pytest.approx(expected.item(), rel=1e-4)


def test_relation_kl_gradient_matches_finite_differences():
    model = models.tiny_model("llama", seed=0, dtype=torch.float64)
    obj = _relation_objective(model, 1.0)
    g = torch.Generator().manual_seed(4)
    delta = (torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64) * 3).requires_grad_()
    with value.frozen(model):
        (grad,) = torch.autograd.grad(obj(delta).kl, delta)
        assert grad.abs().max() > 0
        direction = torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64)
        eps = 1e-5
        with torch.no_grad():
            up, down = obj(delta + eps * direction).kl, obj(delta - eps * direction).kl
    numeric = (up - down) / (2 * eps)
    assert numeric.item() == pytest.approx((grad @ direction).item(), rel=1e-5, abs=1e-9)


def test_relation_kl_zero_is_plain_rome_and_positive_holds_the_relations(tiny_llama):
    cfg = value.ValueConfig()  # kl_factor 0.0625, as below
    plain = value.optimise_value(
        value.ValueObjective(tiny_llama, REQ, models.mlp_out_hook(1), 1, TEMPLATES, cfg)
    )
    off = value.optimise_value(_relation_objective(tiny_llama, 0.0, kl_factor=0.0625))
    assert torch.equal(plain.delta, off.delta)  # no relation rows, the same steps
    on = value.optimise_value(_relation_objective(tiny_llama, 50.0, kl_factor=0.0625))
    assert not torch.equal(plain.delta, on.delta)
    weight = 1.0  # measured the same way for both: the relations drift less under the term
    assert _relation_kl_by_hand(tiny_llama, on.delta, weight) < _relation_kl_by_hand(
        tiny_llama, plain.delta, weight
    )


def test_relation_kl_is_a_setting_and_rejects_negative_weights():
    from attndrift.editing import setting

    s = setting.Setting(sadr_gamma=0.2, relation_kl=1.0)
    assert "relation_kl=1" in s.key
    assert s.config("smollm2-135m").value.relation_kl == 1.0
    with pytest.raises(ValueError, match="relation_kl"):
        value.ValueConfig(relation_kl=-1.0)
