import math

import numpy as np
import pytest
import torch
from scipy import stats

from attndrift import capture, data, encoding, models, scoring
from attndrift.analysis import drift
from tests.helpers import PROMPTS, SUBJECTS, edited, quick_rome, random_edit, two_records


def test_drift_of_a_model_against_itself_is_exactly_zero(tiny):
    for model in (tiny, edited(tiny)):
        d = drift.measure(model, model, PROMPTS, SUBJECTS, all_rows=True)
        assert (d.kl == 0).all() and (d.delta == 0).all() and (d.mass_delta == 0).all()
        assert (d.kl_rows == 0).all()
        assert (d.factor() == 0).all()


def test_kl_is_finite_and_non_negative_with_zero_probability_keys():
    p = torch.tensor(
        [
            [0.5, 0.5, 0.0, 0.0],  # q = 0 where p > 0
            [0.0, 1.0, 0.0, 0.0],  # one-hot
            [0.25, 0.25, 0.25, 0.25],
            [0.0, 0.0, 0.0, 1.0],  # identical rows with zeros
        ]
    )
    q = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0],
            [0.7, 0.1, 0.1, 0.1],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    k = drift.kl(p, q)
    assert torch.isfinite(k).all() and (k >= 0).all()
    assert k[3] == 0
    assert k[0] > 30  # log(0.5 / tiny): large but finite
    # where q > 0 wherever p > 0: the textbook formula (float64)
    for i in (1, 2):
        pi, qi = p[i].double(), q[i].double()
        m = pi > 0
        assert float(k[i]) == pytest.approx(float((pi[m] * (pi[m] / qi[m]).log()).sum()), rel=1e-5)


def test_kl_on_real_rows_is_finite_everywhere(tiny):
    # causal rows have exact zeros for future keys; padded rows are zeroed
    d = drift.measure(tiny, edited(tiny), PROMPTS, SUBJECTS, all_rows=True)
    assert torch.isfinite(d.kl_rows).all() and (d.kl_rows >= 0).all()
    assert torch.isfinite(d.kl).all() and (d.kl >= 0).all() and (d.kl > 0).any()
    for b in range(len(PROMPTS)):
        n = int(d.lengths[b])
        assert (d.kl_rows[b, :, :, n:] == 0).all()
        torch.testing.assert_close(d.kl_rows[b, :, :, n - 1], d.kl[b])


def test_drift_follows_its_definition_on_a_full_cache(tiny):
    edit = edited(tiny)
    d = drift.measure(tiny, edit, PROMPTS, SUBJECTS)
    for b, (prompt, subject) in enumerate(zip(PROMPTS, SUBJECTS, strict=True)):
        enc = encoding.encode_prompt(tiny, prompt, subject)
        tokens = torch.tensor([enc.ids])
        van, edi = capture.full(tiny, tokens), capture.full(edit, tokens)
        for layer in range(tiny.cfg.n_layers):
            p = van[models.pattern_hook(layer)][0, :, enc.last].double()  # [head, key_pos]
            q = edi[models.pattern_hook(layer)][0, :, enc.last].double()
            span = slice(enc.subject_first, enc.subject_last + 1)
            want_kl = torch.where(p > 0, p * (p / q).log(), torch.zeros_like(p)).sum(-1)
            torch.testing.assert_close(d.kl[b, layer].double(), want_kl, atol=1e-5, rtol=1e-4)
            # float32 rows of a padded batch vs one unpadded prompt: rounding differs with
            # the batch shape and the thread count (seen: 1.2e-6 on an attention of 0.14)
            torch.testing.assert_close(
                d.a_vanilla[b, layer].double(), p[:, enc.subject_last], atol=1e-6, rtol=1e-5
            )
            torch.testing.assert_close(
                d.a_edited[b, layer].double(), q[:, enc.subject_last], atol=1e-6, rtol=1e-5
            )
            torch.testing.assert_close(
                d.mass_edited[b, layer].double(), q[:, span].sum(-1), atol=1e-6, rtol=1e-5
            )
            torch.testing.assert_close(
                d.mass_vanilla[b, layer].double(), p[:, span].sum(-1), atol=1e-6, rtol=1e-5
            )
    torch.testing.assert_close(d.delta, d.a_edited - d.a_vanilla)
    torch.testing.assert_close(d.factor_per_layer(), d.delta.amax(-1))
    torch.testing.assert_close(d.factor(), d.delta.amax(-1).amax(-1))


def test_batched_equals_one_prompt_at_a_time(tiny):
    edit = edited(tiny)
    batched = drift.measure(tiny, edit, PROMPTS, SUBJECTS, all_rows=True)
    single = drift.measure(tiny, edit, PROMPTS, SUBJECTS, all_rows=True, batch_size=1)
    for name in ("kl", "a_vanilla", "a_edited", "delta", "mass_vanilla", "mass_edited", "kl_rows"):
        torch.testing.assert_close(getattr(batched, name), getattr(single, name), atol=1e-5, rtol=0)


def test_gqa_models_report_every_query_head(tiny_llama):
    d = drift.measure(tiny_llama, edited(tiny_llama), PROMPTS, SUBJECTS)
    assert d.kl.shape == (len(PROMPTS), tiny_llama.cfg.n_layers, tiny_llama.cfg.n_heads)
    assert tiny_llama.cfg.n_heads > tiny_llama.cfg.n_key_value_heads


def test_frame_is_tidy(tiny):
    d = drift.measure(tiny, edited(tiny), PROMPTS, SUBJECTS, layers=(1, 3))
    table = d.frame()
    n_heads = tiny.cfg.n_heads
    assert len(table) == len(PROMPTS) * 2 * n_heads
    for col in (
        "prompt",
        "layer",
        "head",
        "kl",
        "a_vanilla",
        "a_edited",
        "delta",
        "mass_vanilla",
        "mass_edited",
    ):
        assert col in table.columns
    assert sorted(table.layer.unique()) == [1, 3]
    row = table[(table.prompt == 2) & (table.layer == 3) & (table["head"] == 1)].iloc[0]
    assert row.delta == pytest.approx(float(d.delta[2, 1, 1]))
    assert row.text == PROMPTS[2]


def test_bad_input_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="2 prompts but 1 subjects"):
        drift.measure(tiny, tiny, PROMPTS[:2], SUBJECTS[:1])
    with pytest.raises(ValueError, match="not found in prompt"):
        drift.measure(tiny, tiny, ["The Louvre is in"], ["Eiffel Tower"])
    with pytest.raises(ValueError, match="no prompts"):
        drift.measure(tiny, tiny, [], [])
    with pytest.raises(ValueError, match="mismatched models"):
        drift.measure(models.tiny_model("gpt2"), models.tiny_model("llama"), PROMPTS, SUBJECTS)
    batch = encoding.encode_batch(tiny, PROMPTS, SUBJECTS)
    mlp_only = capture.pair(tiny, tiny, batch, queries=None, mlp_positions="last")
    with pytest.raises(ValueError, match="needs captured attention"):
        drift.compare(mlp_only)


def test_correlate_matches_scipy_and_is_nan_when_undefined():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    c = drift.correlate(x, y)
    assert c.n == 40
    assert c.pearson == pytest.approx(stats.pearsonr(x, y).statistic)
    assert c.spearman_p == pytest.approx(stats.spearmanr(x, y).pvalue)
    assert 0 < c.pearson < 1 and c.pearson_p < 1e-3
    flat = drift.correlate(x, np.ones(40))  # no warning (warnings are errors here)
    assert math.isnan(flat.pearson) and flat.n == 40
    assert math.isnan(drift.correlate([1.0, 2.0], [2.0, 1.0]).spearman)


def test_versus_failure_correlates_drift_with_p_new(tiny):
    groups = []
    for seed, record in enumerate(two_records()):
        e = random_edit(tiny, seed=seed)
        groups.append((models.Variant(tiny, e.hooks(tiny)), record.probes(["RS", "DNS"])))
    a = drift.versus_failure(tiny, groups, range_size=2)
    n = sum(len(p) for _, p in groups)
    assert len(a.probes) == n == a.overall.n and a.skipped == 0
    assert set(a.probes.kind) == {"RS", "DNS"}
    assert a.factor_per_layer.shape == (n, tiny.cfg.n_layers)
    # P(o_new) is the edited model's (its hooks), o_new the probe's wrong answer
    variant, probes = groups[1]
    pairs = [(p.prompt, p.wrong) for p in probes]
    want = torch.exp(-scoring.answer_nll(tiny, pairs, fwd_hooks=variant.hooks)).numpy()
    got = a.probes[a.probes.group == 1].p_new.to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (a.probes.o_new == [drift.answers(p)[1] for _, ps in groups for p in ps]).all()
    # the factor is the drift of the probe under its own edit
    d = drift.measure(tiny, variant, [p.prompt for p in probes], [p.subject for p in probes])
    np.testing.assert_allclose(
        a.probes[a.probes.group == 1].factor.to_numpy(), d.factor().numpy(), atol=1e-6
    )
    want_r = stats.pearsonr(a.probes.factor, a.probes.p_new).statistic
    assert a.overall.pearson == pytest.approx(want_r)
    assert list(a.by_range[["first", "last"]].itertuples(index=False, name=None)) == [
        (0, 1),
        (2, 3),
    ]
    top = a.factor_per_layer[:, 2:].amax(-1).numpy()
    assert a.by_range.iloc[1].spearman == pytest.approx(
        stats.spearmanr(top, a.probes.p_new).statistic
    )


def test_versus_failure_skips_probes_without_their_subject(tiny):
    record = two_records()[0]
    probes = [
        *record.probes(["RS"]),
        data.Probe("RS", "Big Ben is in", "London", "Rome", "Eiffel Tower"),
    ]
    a = drift.versus_failure(tiny, [(edited(tiny), probes)])
    assert a.skipped == 1 and len(a.probes) == len(probes) - 1


def test_answers_of_probes():
    es = data.Probe("ES", "p", "Rome", "Paris", "s")
    dns = data.Probe("DNS", "p", "Paris", "Rome", "s")
    assert drift.answers(es) == drift.answers(dns) == ("Paris", "Rome")


# --------------------------------------------------------------------------------------------
# The embedded SmolLM2 with a quick real ROME edit (identity covariance, one template)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm_drift_of_a_rome_edit(smollm):
    record = data.load_embedded()[0]
    edit = quick_rome(smollm, record)
    probes = record.probes(["RS", "DNS"])
    prompts, subjects = [p.prompt for p in probes], [p.subject for p in probes]
    d = drift.measure(smollm, edit, prompts, subjects, batch_size=4)
    assert d.kl.shape == (len(probes), smollm.cfg.n_layers, 9)  # 9 query heads, 3 KV heads
    assert smollm.cfg.n_key_value_heads == 3
    assert torch.isfinite(d.kl).all() and (d.kl >= 0).all()
    # the edit at layer 4 cannot move attention before it; it moves some head after it
    assert (d.kl[:, :5] == 0).all() and (d.delta[:, :5] == 0).all()
    assert (d.factor() > 0.05).all()
    single = drift.measure(smollm, edit, prompts[:3], subjects[:3], batch_size=1)
    torch.testing.assert_close(d.kl[:3], single.kl, atol=1e-5, rtol=0)
    torch.testing.assert_close(d.delta[:3], single.delta, atol=1e-5, rtol=0)
    same = drift.measure(edit, edit, prompts[:2], subjects[:2])
    assert (same.kl == 0).all() and (same.delta == 0).all()


@pytest.mark.slow
def test_smollm_drift_versus_failure(smollm):
    records = data.load_embedded().records[:3]
    groups = [(quick_rome(smollm, r), r.probes(["RS", "DNS"])) for r in records]
    a = drift.versus_failure(smollm, groups)
    n = sum(len(p) for _, p in groups)
    assert a.overall.n == len(a.probes) == n and a.skipped == 0
    assert ((a.probes.p_new > 0) & (a.probes.p_new < 1)).all()
    assert len(a.by_range) == 6 and a.by_range["n"].eq(n).all()  # 30 layers in ranges of 5
    assert -1 <= a.overall.pearson <= 1 and 0 <= a.overall.spearman_p <= 1
