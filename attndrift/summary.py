"""Summaries of sweep results: Table-3 metrics per setting, trade-offs, drift versus failure.

Everything here reads :class:`attndrift.results.Line` records (``results.load``) and
computes; the CLI prints and plots.

* :func:`by_setting`: METHOD §5 metrics per setting, plus the pre-edit row ``"none"``;
* :func:`paired`: only the records that have a line under every setting;
* :func:`tradeoff`: one row per setting (γ, head selection, every metric with its interval);
* :func:`drift_vs_failure`: paper Fig. 4 over a sweep's RS/DNS probes (or one kind of them);
* :func:`paired_tests`: two settings on the same probes, per metric: McNemar's exact test and a
  paired bootstrap over records (METHOD §5); :func:`paired_drift`: their drift factors;
* :func:`choose`: the selection rules of the SmolLM2 study (:data:`RULES`), applied to a sweep.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats

from attndrift import drift, metrics
from attndrift.data import PROBE_KINDS, SCORE_KINDS
from attndrift.results import Line, ProbeScore, probes_frame
from attndrift.setting import Setting


def _summary_of(probes: Sequence[ProbeScore], fluency: list[float]) -> metrics.Summary:
    table = pd.DataFrame(
        {
            "kind": [p.kind for p in probes],
            "success": [p.success for p in probes],
        }
    )
    return metrics.aggregate(table, fluency=sum(fluency) / len(fluency) if fluency else None)


def by_setting(lines: Sequence[Line]) -> dict[str, metrics.Summary]:
    """Micro-averaged metrics per setting key, plus the pre-edit row ``"none"`` (first).

    The pre-edit row uses each record once (records appear under several settings).
    """
    if not lines:
        raise ValueError("no results to summarize")
    pre: dict[int, Line] = {}
    post: dict[str, list[Line]] = {}
    for line in lines:
        pre.setdefault(line.record, line)
        post.setdefault(line.setting.key, []).append(line)
    out = {
        "none": _summary_of(
            [p for x in pre.values() for p in x.pre],
            [x.fluency_pre for x in pre.values() if x.fluency_pre is not None],
        )
    }
    for key, group in post.items():
        out[key] = _summary_of(
            [p for x in group for p in x.post],
            [x.fluency_post for x in group if x.fluency_post is not None],
        )
    return out


def paired(lines: Sequence[Line]) -> list[Line]:
    """The lines of the records that have a line under every setting (for a like-for-like
    comparison of settings while a sweep is unfinished)."""
    settings = {line.setting.key for line in lines}
    have: dict[int, set[str]] = {}
    for line in lines:
        have.setdefault(line.record, set()).add(line.setting.key)
    return [line for line in lines if have[line.record] == settings]


def records_per_setting(lines: Sequence[Line]) -> dict[str, int]:
    """How many records each setting has a line for."""
    counts: dict[str, int] = {}
    for line in lines:
        counts[line.setting.key] = counts.get(line.setting.key, 0) + 1
    return counts


#: the setting fields that make a SADR variant (or the relation KL term of the value loss)
VARIANT_FIELDS = ("sadr_queries", "sadr_keys", "sadr_threshold", "sadr_relations", "relation_kl")


def variant_of(s: Setting) -> str:
    """The variant a setting runs, e.g. ``"relation_kl=5"`` (``""``: the paper's SADR)."""
    parts = []
    for name in VARIANT_FIELDS:
        v = getattr(s, name)
        if v is None or v is False:
            continue
        parts.append(
            name if v is True else f"{name}={v:g}" if isinstance(v, float) else f"{name}={v}"
        )
    return ",".join(parts)


def tradeoff(lines: Sequence[Line]) -> pd.DataFrame:
    """One row per setting: ``setting, editor, gamma, selection, variant, steps``, each metric
    with ``_low``/``_high`` interval bounds (fractions in [0, 1]), ``RS_DNS`` (their harmonic
    mean, what the SADR rule maximises) and ``Score``."""
    summaries = by_setting(lines)
    settings = {line.setting.key: line for line in lines}
    rows = []
    for key, s in summaries.items():
        if key == "none":
            continue
        line = settings[key]
        row = {
            "setting": key,
            "editor": line.setting.editor,
            "gamma": line.setting.sadr_gamma,
            "selection": not line.setting.all_heads,
            "variant": variant_of(line.setting),
            "steps": line.config.get("value", {}).get("steps"),
        }
        for k in PROBE_KINDS:
            m = s.metrics[k]
            row |= {k: m.mean, f"{k}_low": m.low, f"{k}_high": m.high}
        row["RS_DNS"] = metrics.harmonic_mean([row["RS"], row["DNS"]])  # the SADR rule's aim
        row["Score"] = s.score
        rows.append(row)
    frame = pd.DataFrame(rows)
    order = ["editor", "selection", "variant", "gamma"]
    return frame.sort_values(order).reset_index(drop=True)


def drift_vs_failure(
    lines: Sequence[Line], setting: str, kinds: Sequence[str] | None = None
) -> drift.FailureAnalysis:
    """Paper Fig. 4 over a sweep: each RS/DNS probe's drift factor vs its P(o_new) under the
    edit of ``setting`` (a key), pooled over records (Pearson, Spearman, per layer range);
    ``kinds`` keeps only some probe kinds (e.g. ``["RS"]``)."""
    rows, per_layer, layers = [], [], None
    for line in lines:
        if line.setting.key != setting or not line.drift.kinds:
            continue
        d = line.drift
        layers = d.layers
        for i, kind in enumerate(d.kinds):
            if kinds is not None and kind not in kinds:
                continue
            rows.append(
                {
                    "record": line.record,
                    "kind": kind,
                    "prompt": "",
                    "p_new": d.p_new[i],
                    "factor": d.factor[i],
                    "factor_layer": d.factor_layer[i],
                }
            )
            per_layer.append(d.per_layer[i])
    if not rows:
        which = "" if kinds is None else f" of kinds {list(kinds)}"
        raise ValueError(f"no drift measurements{which} for setting {setting!r}")
    return drift.failure_analysis(pd.DataFrame(rows), torch.tensor(per_layer), layers)


def drift_table(lines: Sequence[Line], kinds: Sequence[str] = ("RS", "DNS")) -> pd.DataFrame:
    """Drift versus failure for every edited setting, one row per (setting, probe kind): the
    edits and probes measured, the mean drift factor and P(o_new), and the Pearson and
    Spearman correlation of the two over the probes (:func:`drift_vs_failure`)."""
    rows = []
    for key in dict.fromkeys(line.setting.key for line in lines):
        for kind in kinds:
            try:
                fa = drift_vs_failure(lines, key, [kind])
            except ValueError:  # no drift measured for this kind
                continue
            c = fa.overall
            rows.append(
                {
                    "setting": key,
                    "kind": kind,
                    "edits": int(fa.probes["record"].nunique()),
                    "probes": c.n,
                    "drift factor": f"{fa.probes['factor'].mean():.2f}",
                    "P(o_new)": f"{fa.probes['p_new'].mean():.3f}",
                    "Pearson (p)": f"{c.pearson:.2f} ({c.pearson_p:.1e})",
                    "Spearman (p)": f"{c.spearman:.2f} ({c.spearman_p:.1e})",
                }
            )
    if not rows:
        raise ValueError("no drift measurements in these lines")
    return pd.DataFrame(rows).set_index("setting")


# --------------------------------------------------------------------------------------------
# Paired comparisons
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedTest:
    """Setting ``b`` against setting ``a`` on the same probes of one metric (fractions)."""

    metric: str
    a: str
    b: str
    n_probes: int  # probes scored under both settings
    n_records: int
    mean_a: float
    mean_b: float
    diff: float  # mean_b − mean_a
    diff_low: float  # 95 % paired-bootstrap interval of diff (records resampled)
    diff_high: float
    p_bootstrap: float  # two-sided
    only_a: int  # probes right under a, wrong under b
    only_b: int  # probes right under b, wrong under a
    p_mcnemar: float  # exact (binomial) McNemar test on the discordant probes


def _paired_frame(lines: Sequence[Line], a: str, b: str) -> pd.DataFrame:
    post = probes_frame(lines)
    post = post[post["phase"] == "post"]
    keys = ["record", "index", "kind"]
    left = post[post["setting"] == a][[*keys, "success"]]
    right = post[post["setting"] == b][[*keys, "success"]]
    both = left.merge(right, on=keys, suffixes=("_a", "_b"))
    if both.empty:
        raise ValueError(f"settings {a!r} and {b!r} share no scored probe")
    return both


#: resamples of the paired bootstraps (a bootstrap p of 0 means below 1 / N_BOOT)
N_BOOT = 10_000


def paired_tests(
    lines: Sequence[Line],
    a: str,
    b: str,
    kinds: Sequence[str] = SCORE_KINDS,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> list[PairedTest]:
    """Per metric: ``b`` vs ``a`` on the probes both scored (METHOD §5).

    McNemar's exact test asks whether the probes that flip do so equally often both ways; the
    paired bootstrap resamples records (a record's probes move together) ``n_boot`` times with
    a seeded generator and gives the 95 % interval of the difference and a two-sided p-value.
    """
    both = _paired_frame(lines, a, b)
    rng = np.random.default_rng(seed)
    out = []
    for kind in kinds:
        part = both[both["kind"] == kind]
        if part.empty:
            continue
        sa = part["success_a"].to_numpy(float)
        sb = part["success_b"].to_numpy(float)
        n_records, low, high, p_boot = _bootstrap(part["record"].to_numpy(), sa, sb, rng, n_boot)
        only_a = int(((sa == 1) & (sb == 0)).sum())
        only_b = int(((sa == 0) & (sb == 1)).sum())
        flips = only_a + only_b
        p_mcnemar = 1.0 if flips == 0 else stats.binomtest(only_b, flips, 0.5).pvalue
        out.append(
            PairedTest(
                metric=kind,
                a=a,
                b=b,
                n_probes=len(part),
                n_records=n_records,
                mean_a=float(sa.mean()),
                mean_b=float(sb.mean()),
                diff=float(sb.mean() - sa.mean()),
                diff_low=low,
                diff_high=high,
                p_bootstrap=p_boot,
                only_a=only_a,
                only_b=only_b,
                p_mcnemar=float(p_mcnemar),
            )
        )
    return out


def _bootstrap(records: np.ndarray, xa: np.ndarray, xb: np.ndarray, rng, n_boot: int):
    """Paired bootstrap of mean(xb) − mean(xa) over probes, resampling records (a record's
    probes move together): (records, 2.5 % and 97.5 % quantiles, two-sided p)."""
    ids, index = np.unique(records, return_inverse=True)
    # per record sums, so that a resample of records is a weighted sum
    n_r = np.bincount(index, minlength=len(ids)).astype(float)
    a_r = np.bincount(index, weights=xa, minlength=len(ids))
    b_r = np.bincount(index, weights=xb, minlength=len(ids))
    draws = rng.multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=n_boot)
    diffs = (draws @ b_r - draws @ a_r) / np.maximum(draws @ n_r, 1)
    p = min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean()))
    low, high = np.quantile(diffs, [0.025, 0.975])
    return len(ids), float(low), float(high), float(p)


@dataclass(frozen=True)
class PairedDrift:
    """The drift factor of the same RS/DNS probes under setting ``b`` against ``a``."""

    kind: str  # "RS", "DNS" or "all"
    a: str
    b: str
    n_probes: int
    n_records: int
    mean_a: float
    mean_b: float
    diff: float  # mean_b − mean_a
    diff_low: float  # 95 % paired-bootstrap interval (records resampled)
    diff_high: float
    p_bootstrap: float
    p_wilcoxon: float  # signed-rank test of the per-probe differences


def _drift_frame(lines: Sequence[Line], key: str) -> pd.DataFrame:
    rows = []
    for line in lines:
        if line.setting.key != key:
            continue
        seen: dict[str, int] = {}
        for kind, factor in zip(line.drift.kinds, line.drift.factor, strict=True):
            seen[kind] = seen.get(kind, -1) + 1  # the probe's place among its kind
            rows.append({"record": line.record, "kind": kind, "n": seen[kind], "factor": factor})
    return pd.DataFrame(rows, columns=["record", "kind", "n", "factor"])


def paired_drift(
    lines: Sequence[Line], a: str, b: str, n_boot: int = N_BOOT, seed: int = 0
) -> list[PairedDrift]:
    """Does ``b`` drift less than ``a``? The drift factor (:class:`~attndrift.results.
    DriftScores`) of each RS/DNS probe measured under both, per kind and over both: the mean
    difference with a paired bootstrap over records, and Wilcoxon's signed-rank test."""
    both = _drift_frame(lines, a).merge(
        _drift_frame(lines, b), on=["record", "kind", "n"], suffixes=("_a", "_b")
    )
    if both.empty:
        raise ValueError(f"settings {a!r} and {b!r} share no probe with a drift measurement")
    rng = np.random.default_rng(seed)
    out = []
    for kind in (*dict.fromkeys(both["kind"]), "all"):
        part = both if kind == "all" else both[both["kind"] == kind]
        fa, fb = part["factor_a"].to_numpy(float), part["factor_b"].to_numpy(float)
        n_records, low, high, p_boot = _bootstrap(part["record"].to_numpy(), fa, fb, rng, n_boot)
        p_w = 1.0 if np.all(fa == fb) else float(stats.wilcoxon(fb, fa).pvalue)
        out.append(
            PairedDrift(kind, a, b, len(part), n_records, float(fa.mean()), float(fb.mean()),
                        float(fb.mean() - fa.mean()), low, high, p_boot, p_w)
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# Selection rules (fixed before the runs they select from: docs/RESULTS.md)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A selection rule: the eligible settings, the objective to maximise, the tie-break."""

    name: str
    text: str  # the rule in words, as written before the runs
    eligible: Callable[[pd.Series, pd.DataFrame], bool]  # (candidate row, all rows)
    objective: Callable[[pd.Series], float]
    tie_break: Callable[[pd.Series], float | tuple]  # larger wins among near-ties
    tie: float = 0.005  # objectives within this count as tied
    fallback: Callable[[pd.Series], float | tuple] | None = None  # maximised if none eligible


def _baseline_of(row: pd.Series, frame: pd.DataFrame) -> pd.Series | None:
    """The same-budget γ = 0 row of a SADR row (same fields but the SADR ones)."""
    candidates = frame[(frame["gamma"] == 0) & (frame["base"] == row["base"])]
    return None if candidates.empty else candidates.iloc[0]


def _sadr_eligible(row: pd.Series, frame: pd.DataFrame) -> bool:
    base = _baseline_of(row, frame)
    ok = row["gamma"] > 0 and base is not None and row["ES"] >= 0.99
    return bool(ok and row["PS"] >= base["PS"] - 0.03)


#: the study's rules (docs/RESULTS.md): ROME, MEMIT and PMET preset calibration, SADR's γ /
#: variant
RULES: dict[str, Rule] = {
    "rome": Rule(
        "rome",
        "ES >= 99 % and PS >= 90 %; the highest Score; within 0.5 points, fewer mean steps",
        lambda r, f: r["ES"] >= 0.99 and r["PS"] >= 0.90,
        lambda r: r["Score"],
        lambda r: -r["mean_steps"],
    ),
    "memit": Rule(
        "memit",
        "ES >= 95 %; the highest Score; within 0.5 points, the larger λ",
        lambda r, f: r["ES"] >= 0.95,
        lambda r: r["Score"],
        lambda r: r["mom2_weight"],
    ),
    "pmet": Rule(
        "pmet",
        "ES >= 95 %; the highest Score; within 0.5 points, the larger λ, then the smaller clamp",
        lambda r, f: r["ES"] >= 0.95,
        lambda r: r["Score"],
        lambda r: (r["mom2_weight"], -r["clamp"]),
    ),
    "pmet-wide": Rule(
        "pmet-wide",
        "ES >= 95 %; the highest Score; within 0.5 points, the larger λ, then fewer mean steps, "
        "then the smaller lr, then the smaller clamp; if none is eligible, the highest ES, then "
        "the highest Score",
        lambda r, f: r["ES"] >= 0.95,
        lambda r: r["Score"],
        lambda r: (r["mom2_weight"], -r["mean_steps"], -r["lr"], -r["clamp"]),
        fallback=lambda r: (r["ES"], r["Score"]),
    ),
    "sadr": Rule(
        "sadr",
        "γ > 0, ES >= 99 % and PS >= the same-budget baseline's PS − 3 points; the highest "
        "harmonic mean of RS and DNS; within 0.5 points, the smaller γ",
        _sadr_eligible,
        lambda r: metrics.harmonic_mean([r["RS"], r["DNS"]]),
        lambda r: -r["gamma"],
    ),
}


def candidates(lines: Sequence[Line]) -> pd.DataFrame:
    """:func:`tradeoff` plus what the rules read: mean steps run, λ, clamp, lr, the setting
    without its SADR fields (``base``: a SADR row's same-budget baseline has the same
    ``base``)."""
    frame = tradeoff(lines)
    steps: dict[str, list[int]] = {}
    by_key = {}
    for line in lines:
        steps.setdefault(line.setting.key, []).append(line.steps_run or 0)
        by_key[line.setting.key] = line
    frame["mean_steps"] = [float(np.mean(steps[k])) for k in frame["setting"]]
    frame["mom2_weight"] = [
        by_key[k].config.get("mom2_update_weight", math.nan) for k in frame["setting"]
    ]
    for column, name in (("clamp", "clamp_norm_factor"), ("lr", "lr")):
        frame[column] = [by_key[k].config.get("value", {}).get(name, math.nan)
                         for k in frame["setting"]]  # fmt: skip
    frame["base"] = [_without_sadr(by_key[k].setting) for k in frame["setting"]]
    return frame


def _without_sadr(setting: Setting) -> str:
    fields = {"sadr_gamma": 0.0, "all_heads": False, "sadr_queries": None, "sadr_keys": None,
              "sadr_threshold": None, "sadr_relations": False}  # fmt: skip
    return dataclasses.replace(setting, **fields).key


def choose(lines: Sequence[Line], rule: str) -> pd.DataFrame:
    """Every candidate setting with ``eligible``, ``objective`` and the ``chosen`` one; where
    none is eligible, the rule's ``fallback`` chooses (``frame.attrs["fallback"]`` is then
    true) or, without one, nothing is chosen."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}: expected one of {sorted(RULES)}")
    r = RULES[rule]
    frame = candidates(lines)
    frame["eligible"] = [bool(r.eligible(row, frame)) for _, row in frame.iterrows()]
    frame["objective"] = [float(r.objective(row)) for _, row in frame.iterrows()]
    frame["chosen"] = False
    frame.attrs["fallback"] = False
    pool = frame[frame["eligible"]]
    if pool.empty:
        if r.fallback is not None:
            frame.loc[max(frame.index, key=lambda i: r.fallback(frame.loc[i])), "chosen"] = True
            frame.attrs["fallback"] = True
        return frame
    best = pool["objective"].max()
    near = pool[pool["objective"] >= best - r.tie]
    winner = max(near.index, key=lambda i: r.tie_break(near.loc[i]))
    frame.loc[winner, "chosen"] = True
    return frame
