"""Metrics: CounterFact-style aggregation of probe results (METHOD §5).

* A probe succeeds when ``P(right) > P(wrong)``.
* Each metric (ES, PS, NS, RS, DNS, RS_D, AS) is the fraction of successful probes of its
  kind over *all* probes of that kind (micro-average), with a 95 % normal interval
  ``mean ± 1.96 · SEM`` (SEM = sample standard deviation / √n).
  For small samples, :func:`wilson` gives the Wilson score interval instead (never outside
  [0, 1], not degenerate at 0 % or 100 %): :meth:`MetricValue.wilson`, ``table(...,
  interval="wilson")``. The normal interval stays the default of every table.
* :func:`frame` gives a table's numbers (%, interval bounds, probe counts) to compute with;
  :func:`formatted` (and :func:`table`) the text view to read.
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
import torch
from jaxtyping import Float
from torch import Tensor

from attndrift.data import PROBE_KINDS, SCORE_KINDS

#: the intervals :meth:`MetricValue.format` and :func:`table` can show
INTERVALS = ("normal", "wilson")


def wilson(successes: int | float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``.

    ``(c ± h) / (1 + z²/n)`` with ``c = p + z²/(2n)`` and ``h = z √(p(1 − p)/n + z²/(4n²))``;
    it stays inside [0, 1] and is not degenerate at 0 or n successes (0 of 2 gives
    (0, 0.658)), unlike the normal interval.

    Args:
        successes: the number of successes (0 ≤ successes ≤ n).
        n: the number of trials.
        z: the standard normal quantile (1.96: 95 %).

    Returns:
        ``(low, high)``, as fractions; ``(nan, nan)`` when ``n == 0``.
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # exact at the ends (no rounding slightly inside or outside [0, 1])
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def kl(
    p: Float[Tensor, "*rows key_pos"], q: Float[Tensor, "*rows key_pos"], floor: float | None = None
) -> Float[Tensor, "*rows"]:
    """KL(p ‖ q) = Σ_k p log(p / q) of each row (the last axis): the one KL of attndrift.

    Safe on attention rows with zero-probability keys: ``0 log 0 = 0``; ``q`` is clamped at
    ``floor`` inside the log (default: the dtype's smallest normal number; SADR's loss uses
    1e-12, which also stops gradients through keys ``q`` has all but dropped); terms with
    ``p == q`` are exactly 0, so KL(p ‖ p) == 0 bit-exactly. Never NaN or inf. Rounding can
    leave sums of about −1e-9 where p ≈ q: a reported KL is clamped at 0 by the caller.
    """
    floor = torch.finfo(q.dtype).tiny if floor is None else floor
    terms = torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(floor))
    return torch.where(p == q, torch.zeros_like(terms), terms).sum(-1)


@dataclass(frozen=True)
class MetricValue:
    """A proportion with its 95 % normal interval (``low``, ``high``); :meth:`wilson` gives
    its Wilson score interval and :meth:`format` prints either."""

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

    @property
    def successes(self) -> int:
        """The number of successful probes (``mean · n``; 0 when there are none)."""
        return 0 if self.n == 0 else round(self.mean * self.n)

    def wilson(self, z: float = 1.96) -> tuple[float, float]:
        """The Wilson score interval of this proportion (see :func:`wilson`)."""
        return wilson(self.successes, self.n, z)

    def format(self, interval: str = "normal") -> str:
        """In %: ``"50.0 ± 4.9"`` (normal, as ``str``) or ``"50.0 [9.5, 90.5] (n = 2)"``
        (Wilson, with the number of probes); ``"—"`` when there are none."""
        if interval not in INTERVALS:
            raise ValueError(f"unknown interval {interval!r}: expected one of {INTERVALS}")
        if interval == "normal" or self.n == 0:
            return str(self)
        low, high = self.wilson()
        return f"{100 * self.mean:.1f} [{100 * low:.1f}, {100 * high:.1f}] (n = {self.n})"


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
    """Aggregate a :func:`attndrift.scoring.score_probes` table into METHOD §5 metrics."""
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


def frame(
    rows: dict[str, Summary],
    kinds: Sequence[str] = (*SCORE_KINDS, "RS_D"),
    interval: str = "wilson",
) -> pd.DataFrame:
    """The numbers of a paper-style table, to compute with: one row per setting; for each
    metric its value in % (``ES``), its 95 % interval in % (``ES_low``, ``ES_high``: Wilson by
    default) and its number of probes (``ES_n``); then ``Score`` (%) and ``FL`` (when any row
    has fluency). NaN where a metric has no probes. :func:`formatted` is the view to read.

    Args:
        rows: the summaries, by setting name (the row labels).
        kinds: the metrics.
        interval: ``"wilson"`` (:func:`wilson`) or ``"normal"`` (``mean ± 1.96 · SEM``).
    """
    if interval not in INTERVALS:
        raise ValueError(f"unknown interval {interval!r}: expected one of {INTERVALS}")
    out = []
    for name, s in rows.items():
        row: dict[str, object] = {"": name}
        for k in kinds:
            m = s.metrics[k]
            low, high = m.wilson() if interval == "wilson" else (m.low, m.high)
            row |= {k: 100 * m.mean, f"{k}_low": 100 * low, f"{k}_high": 100 * high}
            row[f"{k}_n"] = m.n
        row["Score"] = 100 * s.score
        if any(r.fluency is not None for r in rows.values()):
            row["FL"] = math.nan if s.fluency is None else s.fluency
        out.append(row)
    table = pd.DataFrame(out).set_index("")
    table.attrs["interval"] = interval
    table.attrs["kinds"] = tuple(kinds)
    return table


def formatted(numbers: pd.DataFrame) -> pd.DataFrame:
    """The view of a :func:`frame` to read: one text cell per metric, ``"50.0 [9.5, 90.5]
    (n = 2)"`` (Wilson) or ``"50.0 ± 4.9"`` (normal), ``"—"`` without probes; Score and FL
    with one decimal."""
    interval = numbers.attrs.get("interval", "wilson")
    kinds = numbers.attrs.get("kinds") or [
        c for c in numbers.columns if f"{c}_n" in numbers.columns
    ]
    out = pd.DataFrame(index=numbers.index)
    for k in kinds:
        cells = []
        for mean, low, high, n in numbers[[k, f"{k}_low", f"{k}_high", f"{k}_n"]].itertuples(
            index=False
        ):
            if n == 0:
                cells.append("—")
            elif interval == "wilson":
                cells.append(f"{mean:.1f} [{low:.1f}, {high:.1f}] (n = {n})")
            else:
                cells.append(f"{mean:.1f} ± {(high - low) / 2:.1f}")
        out[k] = cells
    for k in ("Score", "FL"):
        if k in numbers.columns:
            out[k] = ["—" if math.isnan(v) else f"{v:.1f}" for v in numbers[k]]
    return out


def table(
    rows: dict[str, Summary],
    kinds: Sequence[str] = (*SCORE_KINDS, "RS_D"),
    interval: str = "normal",
) -> pd.DataFrame:
    """Paper-style table as text: one row per setting, each metric in % with its interval, plus
    Score and FL (:func:`formatted` of :func:`frame`; the numbers are in :func:`frame`).

    Args:
        rows: the summaries, by setting name (the table's row labels).
        kinds: the metric columns.
        interval: ``"normal"`` (``mean ± half-width``) or ``"wilson"`` (``mean [low, high]
            (n = probes)``); see :meth:`MetricValue.format`.
    """
    return formatted(frame(rows, kinds, interval))


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
