"""The value-side variants of the specificity study: the off-target hinge, the margin stop,
SADR on distractor prompts, and the distractor pool they draw from. Each term is checked
against a hand computation (every prompt run on its own with δ added by a hook) and its
gradient against finite differences."""

import dataclasses
import json

import pytest
import torch

from attndrift import distractors, encoding, models
from attndrift.editing import sadr, setting, value
from attndrift.experiments import summary
from tests.helpers import TEMPLATES, make_line, request

REQ = request(target_new="New York City")
QUERIES = ("The Louvre is located in the city of", "Big Ben is in the city of")
HOOK = models.mlp_out_hook(1)


def _objective(model, sadr_cfg=None, prefix_cache=True, queries=QUERIES, **cfg):
    vcfg = value.ValueConfig(prefix_cache=prefix_cache, **cfg)
    return value.ValueObjective(model, REQ, HOOK, 1, TEMPLATES, vcfg, sadr_cfg, queries=queries)


def _answer_logp(model, prompt: str, answer: str, delta) -> torch.Tensor:
    """Mean log P(answer's tokens) after ``prompt``, δ added to layer 1's MLP output at the
    subject's last token; the prompt run alone (float64 log-softmax)."""
    enc = encoding.encode_prompt(model, prompt, REQ.subject)
    ans = encoding.encode_answer(model, answer)
    tokens = torch.tensor([enc.ids + ans[:-1]])

    def add(x, hook):
        x = x.clone()
        x[0, enc.subject_last] += delta
        return x

    with torch.no_grad(), models.hooked(model, [(HOOK, add)]):
        logp = torch.log_softmax(model(tokens)[0].double(), -1)
    at = torch.arange(len(ans)) + enc.last
    return logp[at, torch.tensor(ans)].mean()


def _offtarget_prompts(queries=QUERIES) -> list[str]:
    relations = [t.replace("{}", REQ.subject) for t in sadr.RELATION_TEMPLATES]
    return relations + [REQ.distraction + q for q in queries]


def _hinge_by_hand(model, delta) -> torch.Tensor:
    rises = [
        _answer_logp(model, p, REQ.target_new, delta)
        - _answer_logp(model, p, REQ.target_new, torch.zeros_like(delta))
        for p in _offtarget_prompts()
    ]
    return torch.relu(torch.stack(rises)).mean()


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_offtarget_hinge_matches_hand_computation(tiny_llama, prefix_cache):
    obj = _objective(tiny_llama, prefix_cache=prefix_cache, offtarget=2.0)
    assert len(obj.rows.offtarget_rows) == len(sadr.RELATION_TEMPLATES) + len(QUERIES)
    zero = torch.zeros(tiny_llama.cfg.d_model)
    assert obj(zero).offtarget.item() == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(3)
    found = []
    for _ in range(4):  # some δ raise log P(o_new) on some off-target prompts
        delta = torch.randn(tiny_llama.cfg.d_model, generator=g) * 5
        expected = _hinge_by_hand(tiny_llama, delta)
        terms = obj(delta)
        assert terms.offtarget.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
        plain = _objective(tiny_llama, prefix_cache=prefix_cache)(delta)
        assert terms.total.item() == pytest.approx(
            plain.total.item() + 2.0 * expected.item(), rel=1e-4, abs=1e-6
        )
        found.append(expected.item())
    assert max(found) > 1e-3  # the hinge was active at least once


def test_offtarget_gradient_matches_finite_differences():
    model = models.tiny_model("llama", seed=0, dtype=torch.float64)
    obj = _objective(model, offtarget=1.0)
    g = torch.Generator().manual_seed(5)
    for _ in range(8):  # a δ where the hinge is active (a relu's flat side has no gradient)
        delta = torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64) * 3
        if obj(delta).offtarget.item() > 1e-3:
            break
    delta.requires_grad_()
    with value.frozen(model):
        (grad,) = torch.autograd.grad(obj(delta).offtarget, delta)
        assert grad.abs().max() > 0
        direction = torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64)
        eps = 1e-6
        with torch.no_grad():
            up = obj(delta + eps * direction).offtarget
            down = obj(delta - eps * direction).offtarget
    numeric = (up - down) / (2 * eps)
    assert numeric.item() == pytest.approx((grad @ direction).item(), rel=1e-4, abs=1e-8)


def test_offtarget_zero_is_plain_rome_and_positive_holds_the_offtarget_answers(tiny_llama):
    plain = value.optimise_value(_objective(tiny_llama, queries=()))
    off = value.optimise_value(_objective(tiny_llama, offtarget=0.0))  # queries, but no term
    assert torch.equal(plain.delta, off.delta)
    assert all(s.offtarget is None for s in off.trace)
    on = value.optimise_value(_objective(tiny_llama, offtarget=50.0))
    assert not torch.equal(plain.delta, on.delta)
    assert _hinge_by_hand(tiny_llama, on.delta) < _hinge_by_hand(tiny_llama, plain.delta)


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_margin_matches_hand_computation(tiny_llama, prefix_cache):
    obj = _objective(tiny_llama, prefix_cache=prefix_cache, stop_margin=1.0)
    delta = torch.randn(tiny_llama.cfg.d_model, generator=torch.Generator().manual_seed(2)) * 4
    expected = _answer_logp(tiny_llama, REQ.prompt, REQ.target_new, delta) - _answer_logp(
        tiny_llama, REQ.prompt, REQ.target_true, delta
    )
    assert obj(delta).margin.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    assert _objective(tiny_llama)(delta).margin is None  # no margin row without a margin stop


def test_margin_stop_stops_when_both_conditions_hold(tiny_llama):
    free = value.optimise_value(_objective(tiny_llama, steps=12, early_stop_loss=0.0,
                                           stop_margin=-1e9)).trace  # fmt: skip
    assert len(free) == 12
    margins = [s.margin for s in free]
    m = (margins[0] + max(margins)) / 2  # reached after some steps
    first = next(i for i, x in enumerate(margins) if x >= m)
    assert first > 0
    only = _objective(tiny_llama, steps=12, stop_margin=m, early_stop_on="margin")
    assert len(value.optimise_value(only).trace) == first + 1
    # NLL below τ *and* margin at least m: the later of the two
    nll = [s.nll for s in free]
    tau = nll[first + 1] + 1e-9 if first + 1 < len(nll) else nll[-1] + 1e-9
    both = _objective(tiny_llama, steps=12, stop_margin=m, early_stop_loss=tau,
                      early_stop_on="nll")  # fmt: skip
    stop = next(i for i in range(12) if nll[i] < tau and margins[i] >= m)
    assert len(value.optimise_value(both).trace) == stop + 1


def test_stop_reason_says_why():
    cfg = value.ValueConfig(early_stop_on="nll", early_stop_loss=0.1, stop_margin=2.0)
    step = value.StepLog(3, 1.0, 0.05, 0.0, 0.0, 0.0, 0.9, 1.0, (), margin=1.0)
    assert value.stop_reason(cfg, step) is None  # NLL low, margin short
    assert value.stop_reason(cfg, dataclasses.replace(step, margin=2.5)) == (
        "NLL 0.050 < 0.1, margin 2.50 >= 2"
    )
    assert value.stop_reason(cfg, dataclasses.replace(step, nll=0.2, margin=2.5)) is None
    only = dataclasses.replace(cfg, early_stop_on="margin")
    assert value.stop_reason(only, dataclasses.replace(step, nll=9.0, margin=2.5)) == (
        "margin 2.50 >= 2"
    )
    plain = value.ValueConfig(early_stop_on="loss", early_stop_loss=2.0)
    assert value.stop_reason(plain, step) == "loss 1.000 < 2"
    with pytest.raises(ValueError, match="stop_margin"):
        value.ValueConfig(early_stop_on="margin")
    with pytest.raises(ValueError, match="offtarget"):
        value.ValueConfig(offtarget=-1.0)


def _attention_by_hand(model, prompt, delta, layers):
    """Each layer's pattern rows of the last prompt token, δ added at the subject's last
    token: ``[layer, head, key]`` and the subject-last key's index."""
    enc = encoding.encode_prompt(model, prompt, REQ.subject)
    tokens = torch.tensor([enc.ids])
    kept = {}

    def add(x, hook):
        x = x.clone()
        x[0, enc.subject_last] += delta
        return x

    def keep(x, hook):
        kept[hook.name] = x[0, :, enc.last].double()

    hooks = [(HOOK, add)] + [(models.pattern_hook(layer), keep) for layer in layers]
    with torch.no_grad(), models.hooked(model, hooks):
        model(tokens)
    return torch.stack([kept[models.pattern_hook(layer)] for layer in layers]), enc.subject_last


def _sadr_by_hand(model, delta, prompts):
    """The paper's SADR loss on ``prompts``: per layer, the heads whose attention from the last
    token to the subject's last token beats every vanilla head's; KL(vanilla ‖ now) summed over
    them, averaged over prompts, summed over layers."""
    layers = list(range(2, model.cfg.n_layers))
    per_prompt = []
    for prompt in prompts:
        before, s = _attention_by_hand(model, prompt, torch.zeros_like(delta), layers)
        now, _ = _attention_by_hand(model, prompt, delta, layers)
        mask = now[:, :, s] > before[:, :, s].amax(1, keepdim=True)
        kl = (before * (before.clamp_min(1e-12).log() - now.clamp_min(1e-12).log())).sum(-1)
        per_prompt.append((kl * mask).sum())
    return torch.stack(per_prompt).mean()


@pytest.mark.parametrize("prompts", ["distractors", "both"])
def test_sadr_on_distractors_matches_hand_computation(tiny_llama, prompts):
    cfg = sadr.SadrConfig(gamma=1.0, prompts=prompts)
    obj = _objective(tiny_llama, cfg)
    distracting = [REQ.distraction + q for q in QUERIES]
    rewriting = [t.replace("{}", REQ.prompt) for t in TEMPLATES]
    n_rows = len(rewriting) + 1 + len(distracting)  # and the essence row
    assert obj.step_shape[0] == n_rows
    expected_rows = list(range(len(rewriting))) if prompts == "both" else []
    expected_rows += list(range(len(rewriting) + 1, n_rows))
    assert obj.rows.sadr_rows == expected_rows
    g = torch.Generator().manual_seed(7)
    active = 0.0
    for _ in range(3):
        delta = torch.randn(tiny_llama.cfg.d_model, generator=g) * 8
        # both: the mean over rewriting and distractor prompts together
        restrained = distracting if prompts == "distractors" else rewriting + distracting
        expected = _sadr_by_hand(tiny_llama, delta, restrained)
        assert obj(delta).sadr.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
        active = max(active, expected.item())
    assert active > 1e-4


def test_sadr_on_distractors_gradient_matches_finite_differences():
    model = models.tiny_model("llama", seed=0, dtype=torch.float64)
    obj = _objective(model, sadr.SadrConfig(gamma=1.0, prompts="distractors"))
    g = torch.Generator().manual_seed(4)
    delta = (torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64) * 8).requires_grad_()
    with value.frozen(model):
        terms = obj(delta)
        assert terms.sadr.item() > 0
        (grad,) = torch.autograd.grad(terms.sadr, delta)
        direction = torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64)
        eps = 1e-6
        with torch.no_grad():
            up, down = obj(delta + eps * direction).sadr, obj(delta - eps * direction).sadr
    numeric = (up - down) / (2 * eps)
    assert numeric.item() == pytest.approx((grad @ direction).item(), rel=1e-4, abs=1e-8)


def test_sadr_on_distractors_needs_distractors(tiny_llama):
    with pytest.raises(ValueError, match="distractor"):
        _objective(tiny_llama, sadr.SadrConfig(gamma=1.0, prompts="distractors"), queries=())
    with pytest.raises(ValueError, match="SADR prompts"):
        sadr.SadrConfig(gamma=1.0, prompts="relations")


POOL = distractors.Pool(
    queries={
        "P131": (
            "The Louvre is located in the city of",
            "Big Ben is in the city of",
            "The Eiffel Tower stands in",
            "Alcatraz is in the city of",
        ),
        "P17": ("Krishna district, which is located in", "Bose Institute, in"),
    },
    source="test",
)


def test_distractor_queries_are_deterministic_same_relation_first_and_never_the_subject():
    req = dataclasses.replace(REQ, relation_id="P131")
    picked = distractors.queries(req, 3, POOL)
    assert len(picked) == 3 and picked == distractors.queries(req, 3, POOL)
    assert set(picked) <= set(POOL.queries["P131"])  # its own relation first
    assert all(REQ.subject not in q for q in picked)  # "The Eiffel Tower stands in" left out
    more = distractors.queries(req, 5, POOL)  # three of its relation, then the others'
    assert more[:3] == picked and set(more[3:]) <= set(POOL.queries["P17"])
    assert distractors.queries(req, 0, POOL) == ()
    other = dataclasses.replace(req, subject="Tower", prompt="The Tower is located in the city of")
    assert distractors.queries(other, 3, POOL) != picked  # the order is seeded by the request
    no_id = dataclasses.replace(REQ, relation_id=None)  # keyed by its template instead
    assert distractors.relation_key(no_id) == "The {} is located in the city of"
    assert distractors.prompts(req, 1, POOL) == (REQ.distraction + picked[0],)


def test_distractor_pool_file_is_checked(tmp_path):
    good = tmp_path / "pool.json"
    good.write_text(json.dumps({"source": "s", "queries": {"P1": ["A is in"]}}))
    assert distractors.load_pool(good).queries == {"P1": ("A is in",)}
    for bad in ({"queries": {"P1": ["{} is in"]}}, {"source": "s"}, ["x"]):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="distractor pool"):
            distractors.load_pool(path)
    packaged = distractors.load_pool()  # the packaged pool: many relations, no brace
    assert len(packaged.queries) >= 20 and "MIT" in packaged.source


def test_variant_settings_and_their_same_budget_baselines():
    s = setting.Setting(steps=80, early_stop_on="margin", stop_margin=4.0)
    assert s.key == "rome|g=0|steps=80|early_stop_on=margin|stop_margin=4"
    assert s.config("smollm2-135m").value.stop_margin == 4.0
    with pytest.raises(ValueError, match="stop_margin"):
        setting.Setting(early_stop_on="margin")
    with pytest.raises(ValueError, match="SADR options"):
        setting.Setting(sadr_prompts="distractors")  # a SADR option needs γ > 0
    variants = [
        s,
        setting.Setting(steps=80, early_stop=0.5, stop_margin=3.0),
        setting.Setting(steps=80, offtarget=1.0),
        setting.Setting(steps=80, sadr_gamma=0.2, sadr_prompts="distractors"),
        setting.Setting(steps=80, sadr_gamma=0.05, offtarget=1.0),
        setting.Setting(steps=80, sadr_gamma=0.05, relation_kl=5.0),
        setting.Setting(steps=80, sadr_gamma=0.05, sadr_relations=True, all_heads=True),
    ]
    base = setting.Setting(steps=80)
    lines = [make_line(r, [("ES", 1), ("PS", 1), ("RS", 1), ("DNS", 1)], steps=80)
             for r in range(3)]  # fmt: skip
    for v in variants:
        assert summary.baseline_key(v) == base.key, v.key
        lines += [
            make_line(r, [("ES", 1), ("PS", 1), ("RS", r % 2), ("DNS", 1)], **_fields(v))
            for r in range(3)
        ]
    assert summary.baseline_key(base) == base.key
    frame = summary.choose(lines, "sadr")
    assert (frame["base"] == base.key).all()
    rows = frame.set_index("setting")
    assert not rows.loc[base.key, "eligible"]  # the baseline is no candidate of its own
    assert rows.drop(index=base.key)["eligible"].all()  # every variant found its baseline
    chosen = summary.choose(lines, "specific")
    assert chosen["chosen"].sum() == 1 and not chosen.set_index("setting").loc[base.key, "chosen"]


def _fields(s: setting.Setting) -> dict:
    return {k: v for k, v in dataclasses.asdict(s).items() if v not in (None, False)}


def test_support_counts_records_and_probes_and_the_edit_strength():
    lines = [make_line(0, [("ES", 1), ("PS", 1), ("PS", 0), ("RS", 1)]),
             make_line(1, [("ES", 0), ("DNS", 1), ("DNS", 1), ("DNS", 0)])]  # fmt: skip
    t = summary.support(lines)
    assert list(t.index) == ["none", "rome|g=0"]
    assert t.loc["none", "records"] == 2
    assert t.loc["rome|g=0", "PS"] == "1 / 2" and t.loc["rome|g=0", "DNS"] == "1 / 3"
    assert t.loc["rome|g=0", "ES"] == "2 / 2" and t.loc["rome|g=0", "RS"] == "1 / 1"
    # make_line: success 0.6 vs 0.5, failure 0.4 vs 0.5 -> the median of log(1.2), log(0.8)
    import math

    assert float(t.loc["rome|g=0", "ES margin"]) == pytest.approx(
        (math.log(1.2) + math.log(0.8)) / 2, abs=0.006
    )


def test_pearson_interval_resamples_records():
    import numpy as np

    x = np.arange(40.0)
    records = np.repeat(np.arange(10), 4)
    low, high = summary.pearson_interval(records, x, 2 * x + 1)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=40)
    low, high = summary.pearson_interval(records, x, noise)
    assert low < 0 < high  # no correlation: the interval covers 0
    # clustered: each record's probes are copies, so the records decide the width
    y = np.repeat(rng.normal(size=10), 4)
    xs = np.repeat(rng.normal(size=10), 4)
    lo_c, hi_c = summary.pearson_interval(records, xs, y)
    lo_i, hi_i = summary.pearson_interval(np.arange(40), xs, y)  # as if independent
    assert hi_c - lo_c > hi_i - lo_i


def test_strength_places_each_row_on_or_off_the_margin_curve():
    probes = [("ES", 1), ("PS", 1), ("RS", 0), ("DNS", 1)]
    lines = []
    for r in range(2):
        lines += [
            make_line(r, probes, steps=80),
            make_line(r, probes, steps=80, early_stop_on="margin", stop_margin=2.0),
            make_line(r, probes, steps=80, early_stop=0.5, stop_margin=2.0),
            make_line(r, probes, steps=80, offtarget=2.0),
            make_line(r, probes, steps=80, sadr_gamma=0.05),
        ]
    frame = summary.strength(lines).set_index("setting")
    assert frame.loc["rome|g=0|steps=80", "family"] == "baseline"
    assert frame.loc["rome|g=0|steps=80|early_stop_on=margin|stop_margin=2", "family"] == (
        "margin stop"
    )
    assert frame.loc["rome|g=0|steps=80|early_stop=0.5|stop_margin=2", "family"] == (
        "NLL < 0.5 and margin stop"
    )
    assert frame.loc["rome|g=0|steps=80|offtarget=2", "family"] == "off-target hinge (w 2)"
    assert frame.loc["rome|g=0.05|steps=80", "family"] == "SADR γ 0.05"
    import math

    assert frame["ES_margin"].map(lambda x: x == pytest.approx(math.log(1.2))).all()


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"steps": 80}, "ROME, 80 steps"),
        ({"sadr_gamma": 0.05, "steps": 80}, "ROME + SADR (γ 0.05), 80 steps"),
        ({"steps": 80, "early_stop_on": "margin", "stop_margin": 1.0}, "ROME stopped at margin 1"),
        ({"steps": 80, "early_stop": 0.5, "stop_margin": 2.0},
         "ROME stopped at NLL < 0.5 and margin 2"),
        ({"steps": 80, "offtarget": 2.0}, "ROME + off-target hinge (w 2), 80 steps"),
        ({"editor": "pmet", "sadr_gamma": 0.4}, "PMET + SADR (γ 0.4)"),
        ({"editor": "memit", "batch": 10}, "MEMIT, batches of 10"),
        ({"sadr_gamma": 0.05, "all_heads": True}, "ROME + SADR (γ 0.05), all heads"),
        ({"lr": 0.5}, "ROME, lr=0.5"),
    ],
)  # fmt: skip
def test_label_names_a_setting_in_words(fields, words):
    assert summary.label(setting.Setting(**fields)) == words


def test_glance_is_the_compact_table_of_the_same_numbers():
    lines = [make_line(r, [("ES", 1), ("PS", r % 2), ("RS", 0), ("DNS", 1)]) for r in range(4)]
    lines += [
        make_line(r, [("ES", 1), ("PS", 1), ("RS", 1), ("DNS", 0)], steps=80) for r in range(2)
    ]
    g = summary.glance(lines)
    assert list(g.index) == ["unedited", "ROME", "ROME, 80 steps"]
    assert g.loc["ROME", "PS"] == "50.0" and g.loc["ROME", "RS"] == "0.0"
    assert g.loc["ROME, 80 steps", "RS"] == "100.0" and g.loc["ROME, 80 steps", "records"] == 2
    assert g.loc["unedited", "records"] == 4 and g.loc["unedited", "ES margin"] == ""
