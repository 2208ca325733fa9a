import dataclasses

import pytest
import torch

from attndrift import metrics, models
from attndrift.editing import rome, sadr, value
from tests.helpers import REQUEST, TEMPLATES

REQ = REQUEST


def _objective(model, sadr_cfg, layer=1, prefix_cache=True):
    cfg = value.ValueConfig(prefix_cache=prefix_cache)
    return value.ValueObjective(
        model, REQ, models.mlp_out_hook(layer), layer, TEMPLATES, cfg, sadr_cfg
    )


def _onehot_keys(subject, n_keys):
    mask = torch.zeros(len(subject), n_keys, dtype=torch.bool)
    mask[torch.arange(len(subject)), subject] = True
    return mask


def test_kl_is_safe_and_nonnegative():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.25, 0.75, 0.0], [0.0, 1.0, 0.0]])  # q = 0 where p > 0
    kl = metrics.kl(p, q, floor=sadr.EPS)
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    torch.testing.assert_close(kl[0], expected)
    # the clamp: a key q dropped to 0 costs p log(p / EPS), finite
    torch.testing.assert_close(kl[1], torch.log(torch.tensor(1.0 / sadr.EPS)))
    assert metrics.kl(p, p).abs().max() == 0


def test_head_mask_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    # prompt layer head query key (one query row: the paper's t_j)
    van = torch.softmax(torch.randn(3, 2, 4, 1, 6, generator=g), -1)
    cur = torch.softmax(torch.randn(3, 2, 4, 1, 6, generator=g) * 3, -1)
    subject = torch.tensor([1, 4, 2])
    keys = _onehot_keys(subject, 6)
    mask = sadr.head_mask(van, cur, keys)[..., 0]
    for j in range(3):
        for layer in range(2):
            best = max(van[j, layer, h, 0, subject[j]].item() for h in range(4))
            for h in range(4):
                assert bool(mask[j, layer, h]) == (cur[j, layer, h, 0, subject[j]].item() > best)
    weight = torch.ones(3, 1)
    loss, heads = sadr.sadr_loss(van, cur, keys, weight, sadr.SadrConfig(gamma=1.0))
    kl = metrics.kl(van, cur, floor=sadr.EPS)[..., 0]
    by_hand = sum(
        sum(kl[j, layer, h].item() for h in range(4) if mask[j, layer, h]) / 3
        for layer in range(2)
        for j in range(3)
    )
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    torch.testing.assert_close(heads, mask.float().sum(-1).mean(0))
    every = sadr.SadrConfig(1.0, all_heads=True)
    loss_all, heads_all = sadr.sadr_loss(van, cur, keys, weight, every)
    assert loss_all.item() == pytest.approx(kl.sum(-1).mean(0).sum().item(), rel=1e-6)
    assert (heads_all == 4).all()


def test_variants_match_hand_computations():
    g = torch.Generator().manual_seed(4)
    # 2 prompts, 1 layer, 3 heads, 3 query rows (the second prompt has 2: one padded), 5 keys
    van = torch.softmax(torch.randn(2, 1, 3, 3, 5, generator=g), -1)
    cur = torch.softmax(torch.randn(2, 1, 3, 3, 5, generator=g) * 2, -1)
    weight = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    subject = torch.tensor([[False, True, True, False, False], [True, True, False, False, False]])
    kl = metrics.kl(van, cur, floor=sadr.EPS)  # [prompt, layer, head, query]
    mass = lambda rows: (rows * subject[:, None, None, None, :]).sum(-1)
    for threshold in ("layer_max", "own"):
        cfg = sadr.SadrConfig(1.0, keys="subject", queries="after_subject", threshold=threshold)
        loss, heads = sadr.sadr_loss(van, cur, subject, weight, cfg)
        want, want_heads = 0.0, 0.0
        for j in range(2):
            for q in range(3):
                for h in range(3):
                    before = mass(van)[j, 0, :, q].max() if threshold == "layer_max" else (
                        mass(van)[j, 0, h, q]
                    )  # fmt: skip
                    if mass(cur)[j, 0, h, q] > before:
                        want += weight[j, q].item() * kl[j, 0, h, q].item() / 2
                        want_heads += weight[j, q].item() / 2
        assert loss.item() == pytest.approx(want, rel=1e-6)
        assert heads.item() == pytest.approx(want_heads, rel=1e-6)
    assert sadr.SadrConfig(1.0, threshold="own", relation_prompts=True).variant == (
        "threshold=own,relation_prompts"
    )
    with pytest.raises(ValueError, match="SADR queries must be one of"):
        sadr.SadrConfig(1.0, queries="all")


def test_mask_on_tiny_model_matches_hand_computation(tiny_llama):
    # the full-forward layout: rows and keys at their prompt positions
    obj = _objective(tiny_llama, sadr.SadrConfig(gamma=1.0), prefix_cache=False)
    delta = torch.randn(tiny_llama.cfg.d_model, generator=torch.Generator().manual_seed(1)) * 30
    with torch.no_grad():
        _, rows = obj._forward(delta)
        terms = obj(delta)
    rows = rows[:, :, :, 0]  # one query row per prompt: t_j
    subject = obj.sadr.subject.int().argmax(-1)  # s_j (one subject key per prompt)

    # the rows SADR reads equal those of an independent full cached run with the same delta
    def add(x, hook):
        return x + obj.layout.onehot[:, :, None] * delta

    with torch.no_grad(), tiny_llama.hooks(fwd_hooks=[(models.mlp_out_hook(1), add)]):
        _, cache = tiny_llama.run_with_cache(obj.start.tokens)
    for li, layer in enumerate(obj.sadr_layers):
        pattern = cache[models.pattern_hook(layer)]
        for j in range(obj.n_rewrite):
            full_row = pattern[j, :, obj.layout.query[j]]
            torch.testing.assert_close(rows[j, li], full_row, atol=1e-6, rtol=1e-5)
    n_heads = tiny_llama.cfg.n_heads
    vanilla = obj.vanilla_rows[:, :, :, 0]
    expected = 0.0
    for j in range(obj.n_rewrite):
        s, t = subject[j].item(), obj.layout.query[j].item()
        assert s == obj.rows.subject_last[j]
        for li in range(len(obj.sadr_layers)):
            best = max(vanilla[j, li, h, s].item() for h in range(n_heads))
            for h in range(n_heads):
                assert rows[j, li, h].sum().item() == pytest.approx(1.0, abs=1e-5)
                if rows[j, li, h, s].item() > best:
                    p, q = vanilla[j, li, h], rows[j, li, h]
                    expected += metrics.kl(p, q, floor=sadr.EPS).item() / obj.n_rewrite
        assert t > s
    assert terms.sadr.item() == pytest.approx(expected, rel=1e-5)
    assert obj.sadr_layers == list(range(2, tiny_llama.cfg.n_layers))


def test_variant_rows_cover_what_they_name(tiny_llama):
    plain = _objective(tiny_llama, sadr.SadrConfig(gamma=1.0), prefix_cache=False)
    cfg = sadr.SadrConfig(gamma=1.0, queries="after_subject", keys="subject", relation_prompts=True)
    obj = _objective(tiny_llama, cfg, prefix_cache=False)
    n_rel = len(sadr.RELATION_TEMPLATES)
    assert obj.vanilla_rows.shape[0] == obj.n_rewrite + n_rel  # the relation prompts too
    for i, j in enumerate(obj.rows.sadr_rows):
        first, last = obj.rows.subject_first[j], obj.rows.subject_last[j]
        t = obj.rows.prompt_last[j]
        valid = obj.sadr.weight[i] > 0
        # every query after the subject's last token, up to t_j, each weighing the same
        assert obj.sadr.query[i][valid].tolist() == list(range(last + 1, t + 1))
        assert obj.sadr.weight[i].sum().item() == pytest.approx(1.0)
        assert obj.sadr.subject[i].nonzero()[:, 0].tolist() == list(range(first, last + 1))
    # the relation rows add no NLL: the loss terms at delta = 0 equal the plain objective's
    zero = torch.zeros(tiny_llama.cfg.d_model)
    a, b = plain(zero), obj(zero)
    assert a.nll.item() == pytest.approx(b.nll.item(), rel=1e-6)
    assert b.sadr.item() == 0.0


def test_variants_follow_the_full_forward_with_the_prefix_cache(tiny_llama):
    cfg = sadr.SadrConfig(gamma=1.0, queries="after_subject", keys="subject", threshold="own",
                          relation_prompts=True)  # fmt: skip
    delta = torch.randn(tiny_llama.cfg.d_model, generator=torch.Generator().manual_seed(5)) * 20
    full = _objective(tiny_llama, cfg, prefix_cache=False)(delta)
    cached = _objective(tiny_llama, cfg, prefix_cache=True)(delta)
    assert cached.sadr.item() == pytest.approx(full.sadr.item(), rel=1e-4, abs=1e-7)
    torch.testing.assert_close(cached.heads, full.heads)
    assert full.sadr.item() > 0


def test_sadr_is_zero_at_delta_zero(tiny):
    obj = _objective(tiny, sadr.SadrConfig(gamma=1.0))
    terms = obj(torch.zeros(tiny.cfg.d_model))
    assert terms.sadr.item() == 0.0 and (terms.heads == 0).all()
    assert terms.kl.item() == pytest.approx(0.0, abs=1e-7)
    all_heads = _objective(tiny, sadr.SadrConfig(gamma=1.0, all_heads=True))
    assert all_heads(torch.zeros(tiny.cfg.d_model)).sadr.item() == pytest.approx(0.0, abs=1e-7)


def test_sadr_gradient_matches_finite_differences():
    model = models.tiny_model("llama", seed=0, dtype=torch.float64)
    obj = _objective(model, sadr.SadrConfig(gamma=1.0, all_heads=True))
    g = torch.Generator().manual_seed(2)
    delta = (torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64) * 3).requires_grad_()
    with value.frozen(model):
        term = obj(delta).sadr
        (grad,) = torch.autograd.grad(term, delta)
        assert grad.abs().max() > 0
        direction = torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64)
        eps = 1e-5
        with torch.no_grad():
            up = obj(delta + eps * direction).sadr
            down = obj(delta - eps * direction).sadr
    numeric = (up - down) / (2 * eps)
    assert numeric.item() == pytest.approx((grad @ direction).item(), rel=1e-5, abs=1e-9)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_gamma_zero_reproduces_plain_rome_exactly(tiny):
    cfg = dataclasses.replace(rome.preset(tiny), covariance=None)
    plain = rome.edit(tiny, REQ, cfg, templates=TEMPLATES)
    zero = rome.edit(tiny, REQ, cfg, templates=TEMPLATES, sadr=sadr.SadrConfig(gamma=0.0))
    assert torch.equal(plain.left[0], zero.left[0]) and torch.equal(plain.right[0], zero.right[0])
    # but the drift is still measured and logged
    assert any(s.sadr > 0 for s in zero.run.traces[0])
    assert all(s.sadr == 0 for s in plain.run.traces[0])
    on = rome.edit(tiny, REQ, cfg, templates=TEMPLATES, sadr=sadr.SadrConfig(gamma=10.0))
    assert not torch.equal(plain.right[0], on.right[0])


def test_sadr_restrains_drift_in_the_trace(tiny_llama):
    cfg = dataclasses.replace(rome.preset(tiny_llama), covariance=None)
    free = rome.edit(tiny_llama, REQ, cfg, templates=TEMPLATES, sadr=sadr.SadrConfig(gamma=0.0))
    held = rome.edit(tiny_llama, REQ, cfg, templates=TEMPLATES, sadr=sadr.SadrConfig(gamma=5.0))
    assert held.run.final.sadr < free.run.final.sadr
    assert len(free.run.traces[0][0].heads) == tiny_llama.cfg.n_layers - 2


def test_negative_gamma_is_rejected():
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        sadr.SadrConfig(gamma=-1.0)


def test_the_preset_is_the_one_gamma_of_a_model():
    # SmolLM2's ROME γ is one constant; the setting of the paper's GPT-J stays apart
    smol = sadr.preset("smollm2-135m")
    assert smol == sadr.SadrConfig(gamma=sadr.SMOLLM2_ROME_GAMMA)
    assert sadr.preset("SmolLM2-135M-Instruct-Q4_1", "rome") == smol  # matched by name
    assert sadr.preset("smollm2-135m", "memit").gamma == sadr.SMOLLM2_ROME_GAMMA / 2
    assert sadr.preset("EleutherAI/gpt-j-6B").gamma == 0.01
    assert sadr.preset("EleutherAI/gpt-j-6B", "memit").gamma == 0.005
    # the γ was chosen under ROME's SADR budget: the ROME preset carries it
    assert rome.preset("smollm2-135m").sadr_steps == 80
    with pytest.raises(ValueError, match="no ROME\\+SADR preset for 'gpt2'"):
        sadr.preset("gpt2")
    with pytest.raises(ValueError, match="editor must be one of"):
        sadr.preset("smollm2-135m", "alphaedit")
    with pytest.raises(TypeError, match="gamma"):
        sadr.SadrConfig()  # no hidden default γ


def test_watched_layers_follow_the_step_logs(tiny_llama):
    cfg = dataclasses.replace(rome.preset(tiny_llama), covariance=None)
    e = rome.edit(tiny_llama, REQ, cfg, templates=TEMPLATES, sadr=sadr.SadrConfig(gamma=1.0))
    watched = sadr.watched_layers(tiny_llama, e.layers)
    assert list(watched) == list(range(e.layers[0] + 1, tiny_llama.cfg.n_layers))
    assert len(watched) == len(e.run.final.heads)
