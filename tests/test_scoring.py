import math

import numpy as np
import pytest
import torch

from attndrift import data, encoding, evaluation, metrics, models, scoring

PAIRS = [
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("The Eiffel Tower is located in the city of", "Rome"),
    ("The Eiffel Tower is located in the city of", "Paris France"),
    ("Rome", "is the capital of Italy"),
    ("Toko Yasuda plays the", "guitar"),
    ("The capital of France is", "Paris"),
    ("The capital of France is ", "Paris"),  # trailing space is dropped
]


def _reference_nll(model, prompt, answer):
    """Straight from the definition: one forward over prompt + answer, full logits."""
    p = encoding.encode_prompt(model, prompt).ids
    a = encoding.encode_answer(model, answer)
    tokens = torch.tensor([p + a])
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens)[0].float(), -1)
    return -float(np.mean([logp[len(p) + j - 1, t].item() for j, t in enumerate(a)]))


def test_batched_equals_definition(tiny):
    batched = scoring.answer_nll(tiny, PAIRS)
    ref = torch.tensor([_reference_nll(tiny, p, a) for p, a in PAIRS])
    torch.testing.assert_close(batched, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overhead", [0, 96, 10**9])  # no padding ... the most padding
def test_batched_equals_one_at_a_time_under_every_padding(tiny, monkeypatch, overhead):
    monkeypatch.setattr(scoring, "PASS_OVERHEAD_TOKENS", overhead)
    one = scoring.answer_nll(tiny, PAIRS, max_batch_size=1)
    for budget in (8, 40, 10_000):  # many small batches ... one big batch
        torch.testing.assert_close(scoring.answer_nll(tiny, PAIRS, max_batch_tokens=budget), one)


def _partitions(n):
    """Every split of range(n) into consecutive runs."""
    if n == 0:
        yield []
        return
    for k in range(1, n + 1):
        for rest in _partitions(n - k):
            yield [k, *rest]


@pytest.mark.parametrize("seed", range(30))
def test_batches_are_the_cheapest_valid_split(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, size=int(rng.integers(1, 9))).tolist()
    budget, size = int(rng.integers(20, 120)), int(rng.integers(1, 5))
    overhead = int(rng.integers(0, 60))
    groups = scoring._batches(lengths, budget, size, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))

    def cost(gs):
        return sum(overhead + len(g) * max(lengths[i] for i in g) for g in gs)

    for g in groups:  # within the budget (a row longer than it runs alone) and the size cap
        assert len(g) <= size
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= budget
    # no split of the longest-first order into valid runs is cheaper
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = math.inf
    for runs in _partitions(len(order)):
        gs, at = [], 0
        for k in runs:
            gs.append(order[at : at + k])
            at += k
        if all(len(g) <= size and (len(g) == 1 or len(g) * lengths[g[0]] <= budget) for g in gs):
            best = min(best, cost(gs))
    assert cost(groups) == best


def test_batches_cut_padding_when_passes_are_cheap():
    lengths = [40] * 4 + [5] * 60
    one_pass = scoring._batches(lengths, 10_000, overhead=10**6)
    split = scoring._batches(lengths, 10_000, overhead=50)
    assert len(one_pass) == 1 and sorted(map(len, split)) == [4, 60]


def test_answer_span_is_exactly_the_answer(tiny):
    plan = scoring.plan(tiny, PAIRS)
    for i, (prompt, answer) in enumerate(PAIRS):
        p = encoding.encode_prompt(tiny, prompt).ids
        a = encoding.encode_answer(tiny, answer)
        assert plan.prompts[plan.pair_prompt[i]] == p and plan.answer[i] == a
        if len(a) > 1:
            # teacher-forced inputs after the prompt are the answer's tokens but its last
            owner, inputs = plan.continuations[plan.pair_cont[i]]
            assert owner == plan.pair_prompt[i] and inputs[: len(a) - 1] == a[:-1]
        else:
            assert plan.pair_cont[i] == -1
        assert tiny.tokenizer.decode(list(a)) == " " + answer
    # one prompt is run once for all its answers
    assert plan.pair_prompt[0] == plan.pair_prompt[1] == plan.pair_prompt[2]
    assert len(plan.prompts) == len({p for p, _ in PAIRS}) - 1  # trailing space: same prompt


def test_continuations_share_only_true_prefixes(tiny):
    pairs = [
        ("The capital of France is", "Paris France"),
        ("The capital of France is", "Rome Italy"),
        ("The capital of France is", "Paris France Europe"),
    ]
    plan = scoring.plan(tiny, pairs)
    assert plan.pair_cont[0] != plan.pair_cont[1]
    if (
        encoding.encode_answer(tiny, "Paris France")[:-1]
        == encoding.encode_answer(tiny, "Paris France Europe")[
            : len(encoding.encode_answer(tiny, "Paris France")) - 1
        ]
    ):
        assert plan.pair_cont[0] == plan.pair_cont[2]


def test_hooks_change_scores(tiny):
    def zero_mlp(x, hook):
        return torch.zeros_like(x)

    plain = scoring.answer_nll(tiny, PAIRS[:2])
    hooked = scoring.answer_nll(tiny, PAIRS[:2], fwd_hooks=[("blocks.0.hook_mlp_out", zero_mlp)])
    assert not torch.allclose(plain, hooked)
    assert not tiny.hook_dict["blocks.0.hook_mlp_out"].fwd_hooks  # removed afterwards


def test_empty_and_bad_budget(tiny):
    assert scoring.answer_nll(tiny, []).shape == (0,)
    with pytest.raises(ValueError, match="max_batch_tokens must be positive"):
        scoring.answer_nll(tiny, PAIRS, max_batch_tokens=0)


def test_score_probes_table(tiny):
    rec = data.Record(
        0,
        data.EditRequest(
            subject="Eiffel Tower",
            prompt="The Eiffel Tower is in",
            target_true="Paris",
            target_new="Rome",
        ),
        neighborhood=(("The Louvre is in", "Paris"),),
    )
    table = scoring.score_probes(tiny, rec.probes())
    assert list(table["kind"]) == ["ES", "NS", "DNS"]
    np.testing.assert_allclose(table["p_right"], np.exp(-table["nll_right"]), rtol=1e-6)
    assert (table["success"] == (table["p_right"] > table["p_wrong"])).all()


def test_metrics_aggregation_by_hand():
    import pandas as pd

    table = pd.DataFrame(
        {
            "kind": ["ES", "ES", "ES", "ES", "PS", "NS", "NS", "RS", "DNS"],
            "success": [True, True, True, False, True, True, False, False, True],
        }
    )
    s = metrics.aggregate(table)
    es = s.metrics["ES"]
    assert es.mean == 0.75 and es.n == 4
    sem = np.std([1, 1, 1, 0], ddof=1) / 2
    assert math.isclose(es.high - es.mean, 1.96 * sem)
    assert s.metrics["RS"].mean == 0.0 and s.score == 0.0  # harmonic mean with a zero
    assert s.metrics["AS"].n == 0 and math.isnan(s.metrics["AS"].mean)
    assert metrics.harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3)
    table2 = table[table["kind"] != "RS"]
    s2 = metrics.aggregate(table2)
    assert s2.score_kinds == ("ES", "PS", "NS", "DNS")
    assert s2.score == pytest.approx(4 / (1 / 0.75 + 1 / 1 + 1 / 0.5 + 1 / 1))


def test_ngram_entropy():
    assert metrics.ngram_entropy("a a a a a a") == 0.0
    # 4 distinct bigrams (2 bits) and 3 distinct trigrams (log2 3 bits)
    value = metrics.ngram_entropy("a b c d e")
    assert value == pytest.approx(np.mean([2 / 3 * 2.0, 4 / 3 * math.log2(3)]))
    assert metrics.fluency(["a b c d e", "a a a a"]) == pytest.approx(100 * value / 2)


@pytest.mark.slow
def test_smollm_batched_equals_one_at_a_time(smollm, sample_data_path):
    ds = data.load_dataset(sample_data_path).select(limit=4)
    probes = data.probes_of(ds.records)
    pairs = [(p.prompt, p.right) for p in probes] + [(p.prompt, p.wrong) for p in probes]
    batched = scoring.answer_nll(smollm, pairs)
    one = scoring.answer_nll(smollm, pairs, max_batch_size=1)
    # probabilities to 1e-5; NLLs of improbable answers amplify float32 noise, so 1e-4
    torch.testing.assert_close(torch.exp(-batched), torch.exp(-one), atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, one, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_smollm_evaluation_on_sample_records(smollm, sample_data_path):
    ds = data.load_dataset(sample_data_path).select(limit=6)
    ev = evaluation.evaluate(smollm, ds.records)
    s = ev.summary
    assert s.metrics["ES"].n == 6
    assert 0 <= s.metrics["NS"].mean <= 1 and s.metrics["NS"].n > 0
    assert set(ev.probes["record"]) == {r.id for r in ds.records}


def test_sampling_is_seeded_and_greedy_matches_argmax(tiny):
    from attndrift import generation

    prompts = ["The Eiffel Tower is", "Rome", "The Eiffel Tower is"]
    a = generation.sample(tiny, prompts, max_new_tokens=6, seed=3)
    assert a == generation.sample(tiny, prompts, max_new_tokens=6, seed=3)
    assert all(t.startswith(p) for t, p in zip(a, prompts, strict=True))
    greedy = generation.sample(tiny, prompts[:2], max_new_tokens=5, top_k=1)
    for prompt, text in zip(prompts[:2], greedy, strict=True):  # recompute without the cache
        ids = list(encoding.encode_prompt(tiny, prompt).ids)
        for _ in range(5):
            with torch.no_grad():
                ids.append(int(tiny(torch.tensor([ids]))[0, -1].argmax()))
        assert text == tiny.tokenizer.decode(ids[len(models.bos_prefix(tiny)) :])


def test_shared_prefixes_of_token_runs():
    a = (1, 2, 3, 4, 5, 6, 7)
    prompts = [
        (*a, 10, 11),
        (*a, 12),
        a,  # the common prefix itself: leaves the run, whose prefix then grows
        (1, 2, 3, 9),  # shares too little
        (*a, 10, 13),
        (8,),
    ]
    prefixes, of = scoring.shared_prefixes(prompts, min_shared=5)
    assert prefixes == [a]
    assert of == [0, 0, -1, -1, 0, -1]
    # a longer common prefix within the run is not split off: the run shares what all share
    prefixes, of = scoring.shared_prefixes([(*a, 10, 11), (*a, 10, 12), (*a, 9)], 5)
    assert prefixes == [a] and of == [0, 0, 0]
    # every prompt keeps at least its last token out of the prefix
    prefixes, of = scoring.shared_prefixes([a, (*a, 1)], 5)
    assert prefixes == [] and of == [-1, -1]
    assert scoring.shared_prefixes([a, (*a, 1), (*a, 2)], 5) == ([a], [-1, 0, 0])
    # at 8 tokens, only the two that go on with 10 share (a and 10)
    assert scoring.shared_prefixes(prompts, 8) == ([(*a, 10)], [0, -1, -1, -1, 0, -1])
    assert scoring.shared_prefixes(prompts, 9) == ([], [-1] * 6)


def _distracted_pairs(model):
    """Answers of records whose DNS and RS_D probes begin with the sentence of the edit."""
    from tests.helpers import two_records

    probes = data.probes_of(two_records())
    pairs = [(p.prompt, p.right) for p in probes] + [(p.prompt, p.wrong) for p in probes]
    return probes, pairs


def test_plan_shares_the_sentence_of_the_edit(tiny):
    probes, pairs = _distracted_pairs(tiny)
    the_plan = scoring.plan(tiny, pairs)
    for probe in probes:
        if probe.kind not in ("DNS", "RS_D"):
            continue
        p = the_plan.pair_prompt[pairs.index((probe.prompt, probe.right))]
        sentence = probe.prompt[: probe.prompt.index(". ") + 1]  # "{prompt} {o_new}."
        assert the_plan.shared(p) >= len(encoding.encode_prompt(tiny, sentence).ids)
        assert the_plan.shared(p) < len(the_plan.prompts[p])
    plain = scoring.plan(tiny, pairs, share_prefixes=False)
    assert plain.prefixes == [] and all(plain.shared(p) == 0 for p in range(len(plain.prompts)))


@pytest.mark.parametrize("budget", [8, 40, 10_000])
def test_shared_prefixes_give_the_same_scores(tiny, budget):
    _, pairs = _distracted_pairs(tiny)
    one = scoring.answer_nll(tiny, pairs, max_batch_size=1)
    torch.testing.assert_close(scoring.answer_nll(tiny, pairs, max_batch_tokens=budget), one)
    torch.testing.assert_close(
        scoring.answer_nll(tiny, pairs, max_batch_tokens=budget, share_prefixes=False), one
    )


def test_rounds_keep_each_prefix_with_its_prompts(tiny):
    _, pairs = _distracted_pairs(tiny)
    the_plan = scoring.plan(tiny, pairs)
    assert len(the_plan.prefixes) >= 2
    for budget in (1, 30, 10_000):
        rounds = scoring.rounds(the_plan, budget)
        assert sorted(p for r in rounds for p in r) == list(range(len(the_plan.prompts)))
        seen = set()
        for members in rounds:
            ids = {the_plan.prompt_prefix[p] for p in members if the_plan.shared(p)}
            assert not ids & seen  # each prefix in one round, with all of its prompts
            seen |= ids
            widths = [len(the_plan.prefixes[i]) for i in ids]
            assert len(widths) <= 1 or len(widths) * max(widths) <= budget
        if budget == 1:  # a prefix per round
            assert len(rounds) >= len(the_plan.prefixes)
        if budget == 10_000:
            assert len(rounds) == 1


@pytest.mark.parametrize("where", ["prefix_pass", "hidden_states"])
def test_out_of_memory_halves_the_budget_and_changes_nothing(tiny, monkeypatch, where):
    _, pairs = _distracted_pairs(tiny)
    want = scoring.answer_nll(tiny, pairs)
    real, calls = getattr(scoring, where), []

    def once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, where, once)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    torch.testing.assert_close(scoring.answer_nll(tiny, pairs), want)
    assert len(calls) > 1
