import dataclasses

import pytest
import torch

from attndrift import data, models, scoring
from attndrift.editing import covariance, edits, kit, memit, sadr, value
from tests.helpers import BATCH_REQUESTS as REQS
from tests.helpers import BATCH_TEMPLATES as TEMPLATES


def _cfg(model, **changes):
    return dataclasses.replace(memit.preset(model), covariance=None, **changes)


def test_memit_solves_its_normal_equations(tiny):
    cfg = _cfg(tiny, mom2_update_weight=3.0)
    e = memit.edit(tiny, REQS, cfg, templates=TEMPLATES)
    assert e.layers == (0, 1) and e.editor == "memit"
    # replay the layer loop: K and the residual targets at each layer, then check each factor
    with edits.restored(tiny, e.layers):
        for i, layer in enumerate(e.layers):
            keys = kit.mean_keys(tiny, REQS, layer, TEMPLATES).double().T
            lhs = 3.0 * torch.eye(tiny.cfg.d_mlp, dtype=torch.float64) + keys @ keys.T
            torch.testing.assert_close(lhs @ e.left[i].double(), keys, atol=1e-4, rtol=1e-4)
            assert e.right[i].shape == (2, tiny.cfg.d_model)
            w = models.mlp_out_weight(tiny, layer)
            with torch.no_grad():
                w.add_(e.delta(i))
    assert all(len(t) > 0 for t in e.run.traces)


def test_mean_keys_read_upwards_equal_the_full_forwards_keys(tiny):
    # MEMIT's loop: read a layer's keys, then change that layer's MLP; the reader resumes from
    # the kept residual and must give, bit for bit, what a forward from the embedding gives
    reader, g = kit.MeanKeys(tiny, REQS, TEMPLATES), torch.Generator().manual_seed(0)
    prompts = [p for r in REQS for p in kit.filled(TEMPLATES, r.prompt)]
    subjects = [r.subject for r in REQS for _ in TEMPLATES]
    layers = (0, 2, 3, 3)  # a gap, and the same layer twice
    keys_2 = kit.mean_keys(tiny, REQS, 2, TEMPLATES)
    with edits.restored(tiny, layers):
        for layer in layers:
            name = models.mlp_key_hook(layer)
            full = kit.keys_at_subject(tiny, prompts, subjects, [name], layer + 1)[name]
            got = reader(layer)
            assert torch.equal(got, full.view(len(REQS), len(TEMPLATES), -1).mean(1))
            w = models.mlp_out_weight(tiny, layer)
            with torch.no_grad():
                w.add_(torch.randn(w.shape, generator=g) * w.std())
            if layer == 0:  # the change reaches the next layer's keys
                assert not torch.equal(kit.mean_keys(tiny, REQS, 2, TEMPLATES), keys_2)
        with pytest.raises(ValueError, match="ascending layers: 1 after 3"):
            reader(1)


def test_memit_moves_residuals_towards_z_and_restores(tiny):
    snap = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    cfg = _cfg(tiny, mom2_update_weight=1.0)  # identity C: a small λ lets the update act
    e = memit.edit(tiny, REQS, cfg, templates=TEMPLATES, sadr=sadr.SadrConfig(0.005))
    assert e.editor == "memit+sadr"
    for n, p in tiny.named_parameters():
        assert torch.equal(p, snap[n]), n
    z_name = models.resid_post_hook(1)
    targets = []
    for r in REQS:  # the same (deterministic) z optimisation as inside memit.edit
        obj = value.ValueObjective(tiny, r, z_name, 1, TEMPLATES, cfg.value, sadr.SadrConfig(0.005))
        targets.append(value.optimise_value(obj).target)
    z = torch.stack(targets)
    prompts, subjects = [r.prompt for r in REQS], [r.subject for r in REQS]
    before = kit.keys_at_subject(tiny, prompts, subjects, [z_name], 2)[z_name]
    after = kit.keys_at_subject(
        models.Variant(tiny, e.hooks(tiny)), prompts, subjects, [z_name], 2
    )[z_name]
    assert ((after - z).norm(dim=1) < (before - z).norm(dim=1)).all()


def test_z_is_optimised_after_the_last_layer(tiny_llama):
    cfg = _cfg(tiny_llama, layers=(0, 2))
    obj = value.ValueObjective(
        tiny_llama,
        REQS[0],
        models.resid_post_hook(2),
        2,
        TEMPLATES,
        cfg.value,
        sadr.SadrConfig(gamma=0.005),
    )
    assert obj.sadr_layers == [3]


def test_bad_configs():
    with pytest.raises(ValueError, match="ascending"):
        memit.MemitConfig(layers=(3, 2))
    with pytest.raises(ValueError, match="ascending"):
        memit.MemitConfig(layers=())
    with pytest.raises(ValueError, match="no MEMIT preset"):
        memit.preset("opt")
    assert memit.preset("EleutherAI/gpt-j-6B").layers == (3, 4, 5, 6, 7, 8)


def test_memit_needs_requests(tiny):
    with pytest.raises(ValueError, match="at least one request"):
        memit.edit(tiny, [], _cfg(tiny), templates=TEMPLATES)


@pytest.mark.slow
def test_smollm_memit_edits_two_facts(smollm):
    ds = data.load_embedded()
    reqs = [ds[0].request, ds[5].request]
    # the preset's C (its corpus is cached by `attndrift prepare`; each layer's E[kk^T] takes
    # seconds), not the identity: C's eigenvalues average about 0.03 on SmolLM2, so λ I would
    # damp the update some 30 times more than λ C
    cfg = memit.preset(smollm)
    templates = kit.context_templates(smollm, cfg.templates)
    e = memit.edit(smollm, reqs, cfg, templates=templates)
    table = scoring.score_probes(
        smollm, [p for r in (ds[0], ds[5]) for p in r.probes(["ES"])], fwd_hooks=e.hooks(smollm)
    )
    assert table["success"].all(), table


def test_memit_takes_every_covariance_from_the_unedited_weights(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNDRIFT_CACHE", str(tmp_path))
    cfg = dataclasses.replace(memit.preset(tiny), mom2_update_weight=1.0)
    covs = {layer: covariance.layer_covariance(tiny, layer, cfg.covariance) for layer in cfg.layers}
    from_cfg = memit.edit(tiny, REQS, cfg, templates=TEMPLATES)
    given = memit.edit(tiny, REQS, cfg, templates=TEMPLATES, covs=covs)
    for a, b in zip(from_cfg.left, given.left, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # one cache file per layer: no layer's C was keyed to (or computed on) edited weights
    assert len(list((tmp_path / "covariance").glob("*.safetensors"))) == len(cfg.layers)


def _counting(monkeypatch) -> list:
    """Patch the value optimisation to record each objective it optimises."""
    calls, real = [], value.optimise_value
    monkeypatch.setattr(
        value, "optimise_value", lambda obj, **kw: calls.append(obj) or real(obj, **kw)
    )
    return calls


def test_a_lambda_grid_optimises_each_target_once(tiny, monkeypatch):
    from attndrift.editing import setting

    calls = _counting(monkeypatch)
    editor = setting.Editor(tiny)
    quick = dict(editor="memit", identity_cov=True, steps=4)
    first = editor(setting.Setting(mom2_weight=1.0, **quick), REQS)
    assert len(calls) == len(REQS) and dict(first.run.timings).keys() >= {"value_steps"}
    second = editor(setting.Setting(mom2_weight=5.0, **quick), REQS)
    assert len(calls) == len(REQS)  # z reused: λ comes after the optimisation
    assert "value_steps_reused" in dict(second.run.timings)
    # and the edit is the one a fresh MEMIT computes, bit for bit
    cfg = setting.Setting(mom2_weight=5.0, **quick).config(tiny)
    fresh = memit.edit(tiny, REQS, cfg, templates=editor.templates(cfg))
    for a, b in zip((*second.left, *second.right), (*fresh.left, *fresh.right), strict=True):
        assert torch.equal(a, b)
    assert second.run.traces == fresh.run.traces


def test_the_target_memo_misses_on_anything_the_optimisation_reads(tiny, monkeypatch):
    from attndrift.editing import setting

    calls = _counting(monkeypatch)
    editor = setting.Editor(tiny)
    base = dict(editor="memit", identity_cov=True, mom2_weight=1.0)
    editor(setting.Setting(steps=3, **base), REQS[:1])
    editor(setting.Setting(steps=4, **base), REQS[:1])  # another value config
    editor(setting.Setting(steps=4, sadr_gamma=0.1, **base), REQS[:1])  # SADR
    editor(setting.Setting(steps=4, layers=(0,), **base), REQS[:1])  # another z layer
    editor(setting.Setting(steps=4, **base), REQS[1:])  # another request
    assert len(calls) == 5
    # other weights: a sequence computes its second edit on the first's weights
    with edits.restored(tiny, (0, 1)):
        editor.sequence(setting.Setting(steps=4, sequential=2, **base), [REQS[0], REQS[0]])
    assert len(calls) == 6  # the first edit of the sequence was memoised, the second was not
    assert editor.memo.hits == 1


def test_woodbury_solves_equal_the_dense_ones():
    from attndrift.editing import alphaedit

    g = torch.Generator().manual_seed(0)
    d, n, m = 48, 3, 5
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T / d + 1e-3 * torch.eye(d, dtype=torch.float64)  # PD, condition ~1e4
    keys = torch.randn(d, n, generator=g, dtype=torch.float64)
    for lam in (1e4, 1.0, 1e-3):
        dense = torch.linalg.solve(lam * cov + keys @ keys.T, keys)
        torch.testing.assert_close(memit.least_squares(cov, keys, lam), dense, rtol=1e-6, atol=0)
    ident = torch.linalg.solve(2.0 * torch.eye(d, dtype=torch.float64) + keys @ keys.T, keys)
    torch.testing.assert_close(memit.least_squares(None, keys, 2.0), ident, rtol=1e-10, atol=0)
    # a C that is not positive definite (here singular): the dense solve of the whole system
    singular = torch.diag(torch.linspace(-1, 1, d + 1, dtype=torch.float64)[1:])
    dense = torch.linalg.solve(3.0 * singular + keys @ keys.T, keys)
    torch.testing.assert_close(memit.least_squares(singular, keys, 3.0), dense, rtol=1e-6, atol=0)
    # AlphaEdit's (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K, with and without earlier keys
    p = alphaedit.null_space_projection(cov, threshold=0.5).double()
    for previous in (keys[:, :0], torch.randn(d, m, generator=g, dtype=torch.float64)):
        lhs = p @ (keys @ keys.T + previous @ previous.T) + 10.0 * torch.eye(d, dtype=torch.float64)
        dense = torch.linalg.solve(lhs, p @ keys)
        got = alphaedit.solve(keys, p, previous, 10.0)
        torch.testing.assert_close(got, dense, rtol=1e-6, atol=1e-12)


def test_c_is_factored_once_and_again_when_it_changes(monkeypatch):
    from attndrift.editing import covariance

    calls, real = [], torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda c: calls.append(1) or real(c))
    cov = torch.eye(6) * 2
    x = torch.ones(6, 2)
    assert torch.allclose(covariance.solve(cov, x), torch.full((6, 2), 0.5, dtype=torch.float64))
    covariance.solve(cov, x)
    assert len(calls) == 1
    cov.mul_(2)  # changed in place: factored again
    assert torch.allclose(covariance.solve(cov, x), torch.full((6, 2), 0.25, dtype=torch.float64))
    assert len(calls) == 2
