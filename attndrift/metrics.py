"""Metrics: CounterFact-style aggregation of probe results (SPEC §5).

* A probe succeeds when ``P(right) > P(wrong)``.
* Each metric (ES, PS, NS, RS, DNS, RS_D, AS) is the fraction of successful probes of its
  kind over *all* probes of that kind (micro-average), with a 95 % normal interval
  ``mean ± 1.96 · SEM`` (SEM = sample standard deviation / √n).
* Score = harmonic mean of ES, PS, NS, RS and DNS (those that have probes; the table says
  which were missing).
* Fluency (FL): bi- and tri-gram entropy of generated text, weights 2/3 and 4/3, averaged
  over texts, ×100 (ROME's definition; words are split by a regex, not nltk).
"""

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from attndrift.data import PROBE_KINDS, SCORE_KINDS


@dataclass(frozen=True)
class MetricValue:
    """A proportion with its 95 % normal interval."""

    name: str
    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        if self.n == 0:
            return "—"
        return f"{100 * self.mean:.1f} ± {100 * self.half_width:.1f}"


def proportion(name: str, successes: Sequence[bool] | np.ndarray) -> MetricValue:
    """Mean of 0/1 outcomes with a ``± 1.96 · SEM`` interval (NaN when there are none)."""
    x = np.asarray(successes, dtype=float)
    n = len(x)
    if n == 0:
        return MetricValue(name, math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    sem = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return MetricValue(name, mean, mean - 1.96 * sem, mean + 1.96 * sem, n)


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean; 0 if any value is 0; NaN if there are none."""
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return math.nan
    if min(v) <= 0:
        return 0.0
    return len(v) / sum(1 / x for x in v)


@dataclass(frozen=True)
class Summary:
    """The metrics of one evaluation (one model state over a set of records)."""

    metrics: dict[str, MetricValue]
    score: float
    score_kinds: tuple[str, ...]  # kinds that entered the Score
    fluency: float | None = None

    def row(self) -> dict[str, float]:
        """Flat mapping ``{ES: mean, ES_low: ..., ..., Score: ...}`` for tables and JSON."""
        out: dict[str, float] = {}
        for k, m in self.metrics.items():
            out[k] = m.mean
            out[f"{k}_low"] = m.low
            out[f"{k}_high"] = m.high
            out[f"{k}_n"] = m.n
        out["Score"] = self.score
        if self.fluency is not None:
            out["FL"] = self.fluency
        return out


def aggregate(probe_table: pd.DataFrame, fluency: float | None = None) -> Summary:
    """Aggregate a :func:`attndrift.scoring.score_probes` table into SPEC §5 metrics."""
    missing = {"kind", "success"} - set(probe_table.columns)
    if missing:
        raise ValueError(f"probe table lacks columns {sorted(missing)}")
    metrics = {
        k: proportion(k, probe_table.loc[probe_table["kind"] == k, "success"].to_numpy())
        for k in PROBE_KINDS
    }
    kinds = tuple(k for k in SCORE_KINDS if metrics[k].n > 0)
    score = harmonic_mean(metrics[k].mean for k in kinds)
    return Summary(metrics, score, kinds, fluency)


def table(rows: dict[str, Summary], kinds: Sequence[str] = (*SCORE_KINDS, "RS_D")) -> pd.DataFrame:
    """Paper-style table: one row per setting, ``mean ± half-width`` in %, plus Score and FL."""
    out = []
    for name, s in rows.items():
        row: dict[str, str] = {"": name}
        for k in kinds:
            row[k] = str(s.metrics[k])
        row["Score"] = "—" if math.isnan(s.score) else f"{100 * s.score:.1f}"
        if any(r.fluency is not None for r in rows.values()):
            row["FL"] = "—" if s.fluency is None else f"{s.fluency:.1f}"
        out.append(row)
    return pd.DataFrame(out).set_index("")


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """Weighted mean of the n-gram entropies (bits) of one text (ROME's fluency measure)."""
    words = _WORD.findall(text.lower())
    values = []
    for n in ns:
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        if not counts:
            values.append(0.0)
            continue
        f = np.array(list(counts.values()), dtype=float)
        f /= f.sum()
        values.append(float(-(f * np.log2(f)).sum()))
    return float(np.mean(np.array(values) * np.array(weights)))


def fluency(texts: Sequence[str]) -> float:
    """FL: mean n-gram entropy over texts, ×100 (as in ROME/MEMIT tables)."""
    if not texts:
        raise ValueError("fluency needs at least one generated text")
    return 100.0 * float(np.mean([ngram_entropy(t) for t in texts]))
