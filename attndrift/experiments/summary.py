"""Summaries of sweep results: Table-3 metrics per setting, trade-offs, drift versus failure.

Everything here reads :class:`attndrift.experiments.results.Line` records (``results.load``) and
computes; the CLI prints and plots.

* :func:`by_setting`: METHOD §5 metrics per setting, plus the pre-edit row ``"none"``;
* :func:`paired`: only the records that have a line under every setting;
* :func:`tradeoff`: one row per setting (γ, head selection, every metric with its interval);
* :func:`drift_vs_failure`: paper Fig. 4 over a sweep's RS/DNS probes (or one kind of them);
* :func:`support`: what each row rests on: records and probes per metric, and the edit
  strength (median log-odds margin of the ES and PS probes, mean steps run);
* :func:`paired_tests`: two settings on the same probes, per metric: a paired bootstrap over
  records (a record's probes are not independent: this is the test to read) and McNemar's exact
  test on the probes (probe-level); :func:`paired_drift`: their drift factors;
* :func:`choose`: the selection rules of the SmolLM2 studies (:data:`RULES`), applied to a sweep.

Probes of one record share its edit, so they are not independent draws: every interval and
p-value a claim rests on resamples records (:func:`paired_tests`, the correlations'
intervals in :func:`drift_table`); probe-level tests are labelled as such.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats

from attndrift import metrics
from attndrift.analysis import drift
from attndrift.data import PROBE_KINDS, SCORE_KINDS
from attndrift.editing.setting import Setting
from attndrift.experiments.results import Line, ProbeScore, probes_frame


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


def margins(lines: Sequence[Line], kind: str) -> dict[str, float]:
    """Median log-odds margin ``log P(right) − log P(wrong)`` of the edited model's ``kind``
    probes (ES, PS: the edit's strength) per setting key; NaN where a setting has none."""
    out: dict[str, list[float]] = {}
    for line in lines:
        vals = out.setdefault(line.setting.key, [])
        vals += [_log_odds(p) for p in line.post if p.kind == kind]
    return {k: float(np.median(v)) if v else math.nan for k, v in out.items()}


def _log_odds(p: ProbeScore) -> float:
    tiny = 1e-300  # P = 0 (underflow) would be -inf
    return math.log(max(p.p_right, tiny)) - math.log(max(p.p_wrong, tiny))


def support(lines: Sequence[Line], kinds: Sequence[str] = SCORE_KINDS) -> pd.DataFrame:
    """What each row of the Table-3 layout rests on, one row per setting (``"none"`` first):
    ``records`` (edits), then per metric ``"<records> / <probes>"`` (records that carry the
    kind, and its probes), the median ``ES margin`` and ``PS margin`` (log-odds of the
    edited model: how strong the edit is) and ``mean steps`` run."""
    frame = probes_frame(lines)
    pre = frame[frame["phase"] == "pre"].drop_duplicates(["record", "index"])
    pre = pre.assign(setting="none")
    parts = [pre, frame[frame["phase"] == "post"]]
    steps: dict[str, list[int]] = {}
    for line in lines:
        steps.setdefault(line.setting.key, []).append(line.steps_run or 0)
    es, ps = margins(lines, "ES"), margins(lines, "PS")
    rows = []
    for key, part in pd.concat(parts).groupby("setting", sort=False):
        row: dict = {"setting": key, "records": int(part["record"].nunique())}
        for kind in kinds:
            k = part[part["kind"] == kind]
            row[kind] = f"{k['record'].nunique()} / {len(k)}"
        row["ES margin"] = "" if key == "none" else f"{es[key]:.2f}"
        row["PS margin"] = "" if key == "none" or math.isnan(ps[key]) else f"{ps[key]:.2f}"
        row["mean steps"] = "" if key == "none" else f"{np.mean(steps[key]):.1f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("setting")


#: editors' names as printed
EDITOR_NAMES = {"rome": "ROME", "memit": "MEMIT", "pmet": "PMET", "alphaedit": "AlphaEdit"}


def label(s: Setting) -> str:
    """A setting in words, e.g. ``"ROME + SADR (γ 0.05), 80 steps"`` or ``"ROME stopped at
    margin 1"``; fields without words of their own follow as ``name=value``."""
    text = EDITOR_NAMES.get(s.editor, s.editor)
    if s.sadr_gamma:
        text += f" + SADR (γ {s.sadr_gamma:g})"
    if s.relation_kl is not None:
        text += f" + relation-KL (w {s.relation_kl:g})"
    if s.offtarget is not None:
        text += f" + off-target hinge (w {s.offtarget:g})"
    words = {"editor", "sadr_gamma", "relation_kl", "offtarget", "steps", "stop_margin",
             "early_stop", "early_stop_on", "batch", "sequential"}  # fmt: skip
    stop = ""
    if s.stop_margin is not None and s.early_stop_on == "margin":
        stop = f" stopped at margin {s.stop_margin:g}"
    elif s.stop_margin is not None:
        stop = f" stopped at NLL < {s.early_stop:g} and margin {s.stop_margin:g}"
    elif s.early_stop is not None or s.early_stop_on is not None:
        words -= {"early_stop", "early_stop_on"}
    text += stop
    extra = [
        "all heads" if p == "all" else p
        for p in s.key.split("|")[1:]
        if p.split("=")[0] not in words and p[:2] != "g="
    ]
    if s.steps is not None and not stop:
        extra.insert(0, f"{s.steps} steps")
    if s.batch is not None:
        extra.append(f"batches of {s.batch}")
    if s.sequential is not None:
        extra.append(f"sequences of {s.sequential}")
    return ", ".join([text, *extra])


def glance(lines: Sequence[Line], kinds: Sequence[str] = ("ES", "PS", "RS", "DNS")) -> pd.DataFrame:
    """The compact table of a results page: per setting, in words (:func:`label`; the unedited
    model first)
    the % of probes right of each kind in ``kinds``, the records, and the median ES margin."""
    summaries = by_setting(lines)
    counts = records_per_setting(lines)
    es = margins(lines, "ES")
    settings = {line.setting.key: line.setting for line in lines}
    rows = []
    for key, s in summaries.items():
        row: dict = {"setting": "unedited" if key == "none" else label(settings[key])}
        row |= {k: f"{100 * s.metrics[k].mean:.1f}" for k in kinds}
        row["records"] = len({line.record for line in lines}) if key == "none" else counts[key]
        row["ES margin"] = "" if key == "none" else f"{es[key]:.2f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("setting")


#: the setting fields that make a variant of an editor: SADR's (with γ) and the value-side
#: terms and stopping rules; a row without any of them is a baseline
SADR_FIELDS = ("sadr_gamma", "all_heads", "sadr_queries", "sadr_keys", "sadr_threshold",
               "sadr_relations", "sadr_prompts")  # fmt: skip
VARIANT_FIELDS = ("sadr_queries", "sadr_keys", "sadr_threshold", "sadr_relations", "sadr_prompts",
                  "relation_kl", "offtarget", "stop_margin")  # fmt: skip


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


def strength(lines: Sequence[Line]) -> pd.DataFrame:
    """Specificity against edit strength: :func:`tradeoff`'s rows with the median ES and PS
    log-odds margins (``ES_margin``, ``PS_margin``) and a ``family``: ``"margin stop"`` for
    plain ROME stopped on the edit prompt's margin and ``"baseline"`` for its same-budget
    baseline (together, the curve a weaker plain edit traces), else the variant's name. A
    variant that keeps more RS or DNS than the curve at its own ES margin does more than edit
    less."""
    frame = tradeoff(lines)
    es, ps = margins(lines, "ES"), margins(lines, "PS")
    frame["ES_margin"] = [es[k] for k in frame["setting"]]
    frame["PS_margin"] = [ps[k] for k in frame["setting"]]
    settings = {line.setting.key: line.setting for line in lines}

    def family(key: str) -> str:
        s = settings[key]
        if key == baseline_key(s):
            return "baseline"
        plain = s.sadr_gamma == 0 and s.offtarget is None and s.relation_kl is None
        if plain and s.stop_margin is not None and s.early_stop_on == "margin":
            return "margin stop"
        if plain and s.stop_margin is not None:
            return f"NLL < {s.early_stop:g} and margin stop"
        if s.sadr_gamma == 0 and s.relation_kl is None and s.offtarget is not None:
            return f"off-target hinge (w {s.offtarget:g})"
        return variant_of(s) or f"SADR γ {s.sadr_gamma:g}"

    frame["family"] = [family(k) for k in frame["setting"]]
    return frame.sort_values(["family", "ES_margin"]).reset_index(drop=True)


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


def pearson_interval(
    records: np.ndarray, x, y, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of Pearson's r of ``x`` and ``y`` over probes, resampling *records* (a
    record's probes move together, so probe-level p-values overstate the evidence)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ids, index = np.unique(records, return_inverse=True)
    draws = np.random.default_rng(seed).multinomial(
        len(ids), np.full(len(ids), 1 / len(ids)), size=n_boot
    )
    w = draws[:, index].astype(float)  # [resample, probe]: how often each probe is drawn
    n = w.sum(1, keepdims=True)
    mx, my = (w @ x)[:, None] / n, (w @ y)[:, None] / n
    dx, dy = x[None] - mx, y[None] - my
    cov = (w * dx * dy).sum(1)
    var = (w * dx**2).sum(1) * (w * dy**2).sum(1)
    r = cov[var > 0] / np.sqrt(var[var > 0])
    if not len(r):
        return math.nan, math.nan
    low, high = np.quantile(r, [0.025, 0.975])
    return float(low), float(high)


def drift_table(lines: Sequence[Line], kinds: Sequence[str] = ("RS", "DNS")) -> pd.DataFrame:
    """Drift versus failure for every edited setting, one row per (setting, probe kind): the
    edits and probes measured, the mean drift factor and P(o_new), and the Pearson correlation
    of the two over the probes with its 95 % interval over records (:func:`pearson_interval`),
    and Spearman's (:func:`drift_vs_failure`)."""
    rows = []
    for key in dict.fromkeys(line.setting.key for line in lines):
        for kind in kinds:
            try:
                fa = drift_vs_failure(lines, key, [kind])
            except ValueError:  # no drift measured for this kind
                continue
            c = fa.overall
            low, high = pearson_interval(
                fa.probes["record"].to_numpy(), fa.probes["factor"], fa.probes["p_new"]
            )
            rows.append(
                {
                    "setting": key,
                    "kind": kind,
                    "edits": int(fa.probes["record"].nunique()),
                    "probes": c.n,
                    "drift factor": f"{fa.probes['factor'].mean():.2f}",
                    "P(o_new)": f"{fa.probes['p_new'].mean():.3f}",
                    "Pearson [95 % interval, records]": f"{c.pearson:.2f} [{low:.2f}, {high:.2f}]",
                    "Spearman": f"{c.spearman:.2f}",
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
    """Does ``b`` drift less than ``a``? The drift factor (:class:`~attndrift.experiments.results.
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
    """The same-budget baseline row of a variant row: the row whose setting is the variant's
    without its SADR and variant fields (:func:`baseline_key`)."""
    candidates = frame[frame["setting"] == row["base"]]
    return None if candidates.empty else candidates.iloc[0]


def _is_variant(row: pd.Series) -> bool:
    return row["setting"] != row["base"]


def _sadr_eligible(row: pd.Series, frame: pd.DataFrame) -> bool:
    base = _baseline_of(row, frame)
    ok = _is_variant(row) and base is not None and row["ES"] >= 0.99
    return bool(ok and row["PS"] >= base["PS"] - 0.03)


def _specific_eligible(row: pd.Series, frame: pd.DataFrame) -> bool:
    return bool(_is_variant(row) and row["ES"] >= 0.99 and row["PS"] >= 0.96)


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
        "a SADR or value-side variant, ES >= 99 % and PS >= the same-budget baseline's PS − 3 "
        "points; the highest harmonic mean of RS and DNS; within 0.5 points, the smaller γ",
        _sadr_eligible,
        lambda r: metrics.harmonic_mean([r["RS"], r["DNS"]]),
        lambda r: -r["gamma"],
    ),
    "specific": Rule(
        "specific",
        "a SADR or value-side variant with ES >= 99 % and PS >= 96 %; the highest harmonic mean "
        "of RS and DNS; within 0.5 points, fewer mean steps, then the smaller γ",
        _specific_eligible,
        lambda r: metrics.harmonic_mean([r["RS"], r["DNS"]]),
        lambda r: (-r["mean_steps"], -r["gamma"]),
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
    frame["base"] = [baseline_key(by_key[k].setting) for k in frame["setting"]]
    return frame


def baseline_key(setting: Setting) -> str:
    """The key of a setting's same-budget baseline: the same editor, layers and step budget
    without SADR and without any value-side variant (a margin stop's ``early_stop`` and
    ``early_stop_on`` go with it). A baseline is its own."""
    fields = {f: False if isinstance(getattr(setting, f), bool) else None
              for f in (*SADR_FIELDS, *VARIANT_FIELDS)}  # fmt: skip
    fields["sadr_gamma"] = 0.0
    if setting.stop_margin is not None:
        fields |= {"early_stop": None, "early_stop_on": None}
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


def markdown(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (index first), for docs/RESULTS.md; ``|`` inside a cell
    (setting keys) is escaped, so it does not split the cell."""

    def cell(x) -> str:
        return str(x).replace("|", "\\|")

    cols = [cell(frame.index.name or ""), *map(cell, frame.columns)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join([cell(idx), *map(cell, row.tolist())]) + " |")
    return "\n".join(lines)
