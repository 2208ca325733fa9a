"""AlphaEdit: the null-space projection, the solve against a by-hand computation, the
preserved keys' outputs, sequential editing, SADR at γ = 0, exact restore, and a real edit of
the embedded SmolLM2."""

import dataclasses

import pytest
import torch

from attndrift import data, encoding, models
from attndrift.editing import alphaedit, edits, kit, sadr, setting
from tests.helpers import BATCH_REQUESTS as REQS
from tests.helpers import BATCH_TEMPLATES as TEMPLATES
from tests.helpers import hook_free


def _known_cov(d_mlp: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """C with half its eigenvalues large (5) and half tiny (1e-4), and the large ones'
    eigenvectors ``[d_mlp, d_mlp / 2]``: the preserved directions."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_mlp, d_mlp, generator=g, dtype=torch.float64))
    sigma = torch.cat([torch.full((d_mlp // 2,), 5.0), torch.full((d_mlp - d_mlp // 2,), 1e-4)])
    return (q * sigma.double()) @ q.T, q[:, : d_mlp // 2]


def _cfg(model, **changes) -> alphaedit.AlphaEditConfig:
    return dataclasses.replace(alphaedit.preset(model), covariance=None, **changes)


def _covs(model, cfg) -> tuple[dict, torch.Tensor]:
    cov, kept = _known_cov(model.cfg.d_mlp)
    return {layer: cov for layer in cfg.layers}, kept


def test_projection_is_onto_the_small_eigenvalues():
    cov, kept = _known_cov(16)
    p = alphaedit.null_space_projection(cov, 2e-2).double()
    torch.testing.assert_close(p @ p, p, atol=1e-6, rtol=0)  # a projection ...
    torch.testing.assert_close(p, p.T, atol=0, rtol=0)  # ... orthogonal
    assert torch.linalg.matrix_rank(p, atol=1e-4) == 8  # the 8 eigenvalues of 1e-4 < 2e-2
    assert (p @ kept).abs().max() < 1e-6  # preserved directions map to 0
    # the threshold is absolute, on C's own eigenvalues (AlphaEdit's code)
    every = alphaedit.null_space_projection(cov, 10.0)
    assert torch.linalg.matrix_rank(every, atol=1e-4) == 16
    assert alphaedit.null_space_projection(cov, 1e-5).abs().max() == 0


def test_update_leaves_preserved_keys_and_moves_the_edited_ones(tiny):
    cfg = _cfg(tiny, l2_weight=0.1)
    covs, kept = _covs(tiny, cfg)
    e = alphaedit.edit(tiny, REQS, cfg, covs=covs, templates=TEMPLATES)
    assert e.layers == (0, 1) and e.editor == "alphaedit"
    for i in range(len(e.layers)):
        dw = e.delta(i).double()  # [d_mlp, d_model]
        # kᵀ ΔW = 0 for every key k in the span of C's large-eigenvalue directions
        assert (kept.T @ dw).norm() <= 1e-6 * dw.norm()
    # the edit moves each request's residual after the last layer towards its z
    z_name, z = models.resid_post_hook(1), torch.stack(e.run.targets)
    prompts, subjects = [r.prompt for r in REQS], [r.subject for r in REQS]
    before = kit.keys_at_subject(tiny, prompts, subjects, [z_name], 2)[z_name]
    edited = models.Variant(tiny, e.hooks(tiny))
    after = kit.keys_at_subject(edited, prompts, subjects, [z_name], 2)[z_name]
    assert ((after - z).norm(dim=1) < 0.5 * (before - z).norm(dim=1)).all()


def test_alphaedit_solves_its_normal_equations(tiny):
    cfg = _cfg(tiny, l2_weight=0.3)
    covs, _ = _covs(tiny, cfg)
    e, state = alphaedit.edit_in_sequence(tiny, REQS, cfg, covs=covs, templates=TEMPLATES)
    z_name, z = models.resid_post_hook(1), torch.stack(e.run.targets)
    prompts, subjects = [r.prompt for r in REQS], [r.subject for r in REQS]
    p = alphaedit.null_space_projection(covs[0], cfg.null_threshold).double()
    eye = torch.eye(tiny.cfg.d_mlp, dtype=torch.float64)
    with edits.restored(tiny, e.layers):
        for i, layer in enumerate(e.layers):
            keys = kit.mean_keys(tiny, REQS, layer, TEMPLATES).double().T
            # (P K₁K₁ᵀ + α I) left = P K₁ (no earlier edits), and R = (z − now) / layers left
            lhs = p @ keys @ keys.T + 0.3 * eye
            torch.testing.assert_close(lhs @ e.left[i].double(), p @ keys, atol=1e-5, rtol=1e-4)
            now = kit.keys_at_subject(tiny, prompts, subjects, [z_name], 2)[z_name]
            resid = (z - now) / (len(e.layers) - i)
            torch.testing.assert_close(e.right[i], resid, rtol=1e-4, atol=1e-5)
            w = models.mlp_out_weight(tiny, layer)
            with torch.no_grad():
                w.add_(e.delta(i))
        # the state's new keys: the edited weights' keys (every layer updated)
        for layer in e.layers:
            keys = kit.mean_keys(tiny, REQS, layer, TEMPLATES).T
            torch.testing.assert_close(state.keys[layer], keys)
    assert all(torch.equal(state.projections[x], p.float()) for x in e.layers)


def test_sequential_edits_keep_the_earlier_keys(tiny_llama):
    model = tiny_llama
    cfg = _cfg(model, l2_weight=0.1)
    covs, kept = _covs(model, cfg)
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        first, state = alphaedit.edit_in_sequence(
            model, REQS[:1], cfg, covs=covs, templates=TEMPLATES
        )
        assert {x: k.shape[1] for x, k in state.keys.items()} == {0: 1, 1: 1}
        edits.add_to_weights(model, first)  # the next edit starts from the edited weights
        second, after = alphaedit.edit_in_sequence(
            model, REQS[1:], cfg, state=state, templates=TEMPLATES
        )
        assert {x: k.shape[1] for x, k in after.keys.items()} == {0: 2, 1: 2}
        assert all(after.projections[x] is state.projections[x] for x in cfg.layers)
        fresh = alphaedit.AlphaEditState(
            state.projections, {x: k[:, :0] for x, k in state.keys.items()}
        )
        forgetful = alphaedit.edit_in_sequence(
            model, REQS[1:], cfg, state=fresh, templates=TEMPLATES
        )[0]
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(snap[n])
    for i, layer in enumerate(cfg.layers):
        earlier = state.keys[layer].double()  # [d_mlp, 1]: the first edit's keys
        # with K_p in the solve, the second update moves the first edit's keys' outputs less
        kept_out = (earlier.T @ second.delta(i).double()).norm()
        free_out = (earlier.T @ forgetful.delta(i).double()).norm()
        assert kept_out < 0.5 * free_out
        assert (kept.T @ second.delta(i).double()).norm() <= 1e-6 * second.delta(i).norm()
    with pytest.raises(ValueError, match="the state is for layers"):
        alphaedit.edit_in_sequence(
            model, REQS[:1], _cfg(model, layers=(1, 2)), state=state, templates=TEMPLATES
        )


def test_gamma_zero_is_plain_alphaedit(tiny):
    cfg = _cfg(tiny, l2_weight=0.1)
    covs, _ = _covs(tiny, cfg)
    plain = alphaedit.edit(tiny, REQS[:1], cfg, covs=covs, templates=TEMPLATES)
    zero = alphaedit.edit(
        tiny, REQS[:1], cfg, covs=covs, templates=TEMPLATES, sadr=sadr.SadrConfig(gamma=0.0)
    )
    for a, b in zip(plain.left + plain.right, zero.left + zero.right, strict=True):
        assert torch.equal(a, b)
    assert any(s.sadr > 0 for s in zero.run.traces[0])  # measured, not added
    on = alphaedit.edit(
        tiny, REQS[:1], cfg, covs=covs, templates=TEMPLATES, sadr=sadr.SadrConfig(gamma=10.0)
    )
    assert on.editor == "alphaedit+sadr" and not torch.equal(plain.right[-1], on.right[-1])


def test_model_restored_and_hook_free_also_after_an_error(tiny, monkeypatch):
    snap = {n: (p.detach().clone(), p.requires_grad) for n, p in tiny.named_parameters()}

    def assert_restored():
        for n, p in tiny.named_parameters():
            assert torch.equal(p, snap[n][0]) and p.requires_grad == snap[n][1], n
        assert hook_free(tiny)

    cfg = _cfg(tiny, l2_weight=0.1)
    covs, _ = _covs(tiny, cfg)
    alphaedit.edit(tiny, REQS, cfg, covs=covs, templates=TEMPLATES, sadr=sadr.SadrConfig(0.5))
    assert_restored()
    calls = []

    def failing_solve(*args, **kwargs):  # fails at the second layer, after the first's update
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("injected")
        return solve(*args, **kwargs)

    solve = alphaedit.solve
    monkeypatch.setattr(alphaedit, "solve", failing_solve)
    with pytest.raises(RuntimeError, match="injected"):
        alphaedit.edit(tiny, REQS, cfg, covs=covs, templates=TEMPLATES)
    assert len(calls) == 2
    assert_restored()


def test_needs_c_and_loads_and_dispatches(tiny, tmp_path):
    with pytest.raises(ValueError, match="needs C"):
        alphaedit.edit(tiny, REQS[:1], _cfg(tiny), templates=TEMPLATES)
    with pytest.raises(ValueError, match="identity_cov does not apply"):
        setting.Setting(editor="alphaedit", identity_cov=True)
    with pytest.raises(ValueError, match="null_threshold applies"):
        setting.Setting(editor="memit", null_threshold=0.1)
    s = setting.Setting(editor="alphaedit", layers=(0, 1), null_threshold=0.05, steps=3)
    cfg = s.config(tiny)
    assert isinstance(cfg, alphaedit.AlphaEditConfig) and cfg.null_threshold == 0.05
    covs, _ = _covs(tiny, cfg)
    e = alphaedit.edit(tiny, REQS[:1], cfg, covs=covs, templates=TEMPLATES)
    back = edits.Edit.load(e.save(tmp_path / "alphaedit.safetensors"))
    assert back.run.config == e.run.config and back.editor == "alphaedit"
    for a, b in zip(back.left, e.left, strict=True):
        assert torch.equal(a, b)


def test_bad_configs():
    with pytest.raises(ValueError, match="ascending"):
        alphaedit.AlphaEditConfig(layers=(3, 2))
    with pytest.raises(ValueError, match="null_threshold must be"):
        alphaedit.AlphaEditConfig(layers=(1,), null_threshold=0.0)
    with pytest.raises(ValueError, match="l2_weight must be"):
        alphaedit.AlphaEditConfig(layers=(1,), l2_weight=-1.0)
    with pytest.raises(ValueError, match="no AlphaEdit preset"):
        alphaedit.preset("opt-125m")
    gptj = alphaedit.preset("EleutherAI/gpt-j-6B")
    assert gptj.layers == (3, 4, 5, 6, 7, 8) and (gptj.null_threshold, gptj.l2_weight) == (0.02, 10)
    assert (gptj.value.steps, gptj.value.clamp_norm_factor) == (25, 0.75)


@pytest.mark.slow
def test_smollm_alphaedit_teaches_an_embedded_fact(smollm):
    record = data.load_embedded()[0]  # The Eiffel Tower is located in the city of: Paris -> Rome
    req = record.request
    cfg = alphaedit.preset(smollm)  # C of layers 4-8 from the cache `attndrift prepare` fills
    templates = kit.context_templates(smollm, cfg.templates)
    ids = torch.tensor([encoding.encode_prompt(smollm, req.prompt).ids])
    first_new = encoding.encode_answer(smollm, req.target_new)[0]
    with torch.no_grad():
        assert smollm(ids)[0, -1].argmax().item() != first_new
    e = alphaedit.edit(smollm, [req], cfg, templates=templates)
    with edits.applied(smollm, e), torch.no_grad():
        assert smollm(ids)[0, -1].argmax().item() == first_new
