"""Summaries of sweep lines: paired tests, the selection rules, the drift split by kind."""

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats

from attndrift.experiments import results, summary
from tests.helpers import make_line


def _lines(successes_a, successes_b, kind="DNS", a=None, b=None):
    """Two settings' lines over records whose probes succeed as given (lists per record)."""
    a = a or {}
    b = b or {"sadr_gamma": 0.1}
    lines = []
    for record, (sa, sb) in enumerate(zip(successes_a, successes_b, strict=True)):
        lines.append(make_line(record, [(kind, x) for x in sa], **a))
        lines.append(make_line(record, [(kind, x) for x in sb], **b))
    return lines


def test_mcnemar_and_bootstrap_follow_their_definitions():
    a = [[1, 0, 0], [1, 1, 0], [0, 0], [1, 0, 1]]
    b = [[1, 1, 0], [1, 1, 1], [1, 0], [1, 0, 1]]
    lines = _lines(a, b)
    (t,) = summary.paired_tests(lines, "rome|g=0", "rome|g=0.1", kinds=["DNS"], n_boot=4000)
    flat_a = [x for r in a for x in r]
    flat_b = [x for r in b for x in r]
    assert (t.n_probes, t.n_records) == (len(flat_a), 4)
    assert t.mean_a == pytest.approx(np.mean(flat_a)) and t.mean_b == pytest.approx(np.mean(flat_b))
    assert (t.only_a, t.only_b) == (0, 3)
    assert t.p_mcnemar == pytest.approx(stats.binomtest(3, 3, 0.5).pvalue)  # 0.25
    assert t.diff == pytest.approx(3 / 11)
    assert t.diff_low >= 0 and t.diff_high <= 1 and t.diff_low <= t.diff <= t.diff_high
    # every resample has b >= a here: the bootstrap puts no mass below 0
    assert t.p_bootstrap < 0.2
    same = summary.paired_tests(_lines(a, a), "rome|g=0", "rome|g=0.1", kinds=["DNS"])[0]
    assert same.diff == 0 and same.p_mcnemar == 1.0 and same.p_bootstrap == 1.0


def test_paired_tests_need_shared_probes():
    lines = [make_line(0, [("ES", 1)]), make_line(1, [("ES", 0)], sadr_gamma=0.1)]
    with pytest.raises(ValueError, match="share no scored probe"):
        summary.paired_tests(lines, "rome|g=0", "rome|g=0.1")


def _with_drift(line, kinds, factors):
    return dataclasses.replace(line, drift=results.DriftScores(
        tuple(kinds), tuple(factors), (0,) * len(kinds), (0,), tuple((f,) for f in factors),
        (0.1,) * len(kinds)))  # fmt: skip


def test_paired_drift_pairs_the_same_probes():
    kinds = ["RS", "DNS", "DNS"]
    fa = {0: [1.0, 2.0, 3.0], 1: [2.0, 2.0, 4.0], 2: [0.5, 1.5, 2.5]}
    fb = {0: [0.5, 2.0, 2.0], 1: [1.0, 1.0, 4.5], 2: [0.5, 1.0, 2.0]}
    lines = []
    for r in fa:
        lines.append(_with_drift(make_line(r, [("ES", 1)]), kinds, fa[r]))
        lines.append(_with_drift(make_line(r, [("ES", 1)], sadr_gamma=0.1), kinds, fb[r]))
    lines.append(_with_drift(make_line(3, [("ES", 1)]), kinds, [9.0, 9.0, 9.0]))  # a only
    rs, dns, both = summary.paired_drift(lines, "rome|g=0", "rome|g=0.1", n_boot=2000)
    assert (rs.kind, dns.kind, both.kind) == ("RS", "DNS", "all")
    assert (rs.n_probes, dns.n_probes, both.n_probes, both.n_records) == (3, 6, 9, 3)
    flat_a = [x for r in fa.values() for x in r]
    flat_b = [x for r in fb.values() for x in r]
    assert both.mean_a == pytest.approx(np.mean(flat_a))
    assert both.diff == pytest.approx(np.mean(flat_b) - np.mean(flat_a))
    assert rs.diff == pytest.approx(np.mean([-0.5, -1.0, 0.0]))
    assert both.p_wilcoxon == pytest.approx(stats.wilcoxon(flat_b, flat_a).pvalue)
    assert both.diff_low <= both.diff <= both.diff_high
    with pytest.raises(ValueError, match="no probe with a drift"):
        summary.paired_drift(lines[:1], "rome|g=0", "rome|g=0.1")


def test_sadr_rule_picks_the_best_eligible_harmonic_mean():
    lines = []
    # (γ, steps): per record probes ES, PS, RS, DNS successes
    table = {
        (0.0, 80): (1, 1, 0, 0),  # the same-budget baseline: PS 100 %
        (0.1, 80): (1, 1, 1, 0),  # RS up, DNS not: harmonic mean 0
        (0.2, 80): (1, 1, 1, 1),  # the best: everything right
        (0.5, 80): (1, 0, 1, 1),  # PS falls below baseline − 3 points: not eligible
        (0.0, 20): (1, 1, 0, 0),
    }
    for (gamma, steps), (es, ps, rs, dns) in table.items():
        for record in range(3):
            probes = [("ES", es), ("PS", ps), ("RS", rs), ("DNS", dns)]
            lines.append(make_line(record, probes, sadr_gamma=gamma, steps=steps))
    frame = summary.choose(lines, "sadr")
    chosen = frame[frame["chosen"]]
    assert list(chosen["setting"]) == ["rome|g=0.2|steps=80"]
    eligible = set(frame[frame["eligible"]]["setting"])
    assert eligible == {"rome|g=0.1|steps=80", "rome|g=0.2|steps=80"}
    with pytest.raises(ValueError, match="unknown rule"):
        summary.choose(lines, "best")


def test_rome_rule_breaks_ties_by_fewer_steps():
    lines = []
    for steps, steps_run in ((20, 20), (25, 7)):
        for record in range(2):
            probes = [("ES", 1), ("PS", 1), ("NS", 1), ("RS", 1), ("DNS", 1)]
            lines.append(make_line(record, probes, steps=steps, steps_run=steps_run))
    frame = summary.choose(lines, "rome")
    assert list(frame[frame["chosen"]]["setting"]) == ["rome|g=0|steps=25"]
    assert frame["mean_steps"].tolist() == [20.0, 7.0]
    assert not math.isnan(frame["objective"].iloc[0])


def test_pmet_rule_breaks_ties_by_the_larger_lambda_then_the_smaller_clamp():
    lines = []
    table = {  # (λ, clamp): ES, and whether RS succeeds (the Score's tie-breaking field)
        (100.0, 0.75): (0, 1),  # the best Score but ES < 95 %: not eligible
        (10.0, 4.0): (1, 1),
        (10.0, 0.75): (1, 1),  # tied with the row above: the smaller clamp wins
        (1.0, 0.75): (1, 1),  # tied too, but a smaller λ
        (50.0, 0.75): (1, 0),  # the larger λ, but a Score 0
    }
    for (lam, clamp), (es, rs) in table.items():
        for record in range(2):
            probes = [("ES", es), ("PS", 1), ("NS", 1), ("RS", rs), ("DNS", 1)]
            lines.append(make_line(record, probes, editor="pmet", mom2_weight=lam, clamp=clamp))
    frame = summary.choose(lines, "pmet")
    assert frame["clamp"].tolist() == [0.75, 4.0, 0.75, 0.75, 0.75]
    (chosen,) = frame[frame["chosen"]]["setting"]
    assert "mom2_weight=10|" in chosen + "|" and "clamp=0.75" in chosen
    assert frame[frame["eligible"]]["mom2_weight"].tolist() == [10.0, 10.0, 1.0, 50.0]


def test_pmet_wide_rule_breaks_ties_by_fewer_steps_then_smaller_lr_and_falls_back_to_es():
    def lines_of(table):
        out = []
        for (lr, steps), (es, rs) in table.items():
            for record in range(2):
                probes = [("ES", es[record]), ("PS", 1), ("NS", 1), ("RS", rs), ("DNS", 1)]
                out.append(make_line(record, probes, editor="pmet", mom2_weight=30.0,
                                     clamp=4.0, lr=lr, steps=steps))  # fmt: skip
        return out

    tied = {  # (lr, steps): ES per record, RS; all three eligible with the same Score
        (0.2, 60): ((1, 1), 1),
        (0.5, 30): ((1, 1), 1),  # fewer steps than the first: wins over it
        (0.9, 30): ((1, 1), 1),  # as few steps, but the larger lr
    }
    frame = summary.choose(lines_of(tied), "pmet-wide")
    assert frame["lr"].tolist() == [0.2, 0.5, 0.9]
    (chosen,) = frame[frame["chosen"]]["setting"]
    assert "lr=0.5" in chosen and not frame.attrs["fallback"]
    none = {  # nobody reaches ES 95 %: the highest ES, then the highest Score
        (0.2, 60): ((1, 0), 1),
        (0.5, 30): ((1, 0), 0),
        (0.9, 30): ((0, 0), 1),
    }
    frame = summary.choose(lines_of(none), "pmet-wide")
    assert not frame["eligible"].any() and frame.attrs["fallback"]
    (chosen,) = frame[frame["chosen"]]["setting"]
    assert "lr=0.2" in chosen and "steps=60" in chosen
    frame = summary.choose(lines_of(none), "pmet")  # no fallback: nothing chosen
    assert not frame["chosen"].any() and not frame.attrs["fallback"]
