"""Summaries of sweep results: Table-3 metrics per setting, trade-offs, drift versus failure.

Everything here reads :class:`attndrift.results.Line` records (``results.load``) and
computes; the CLI prints and plots.

* :func:`by_setting`: SPEC §5 metrics per setting, plus the pre-edit row ``"none"``;
* :func:`paired`: only the records that have a line under every setting;
* :func:`tradeoff`: one row per setting (γ, head selection, every metric with its interval);
* :func:`drift_vs_failure`: paper Fig. 4 over a sweep's RS/DNS probes.
"""

from collections.abc import Sequence

import pandas as pd
import torch

from attndrift import drift, metrics
from attndrift.data import PROBE_KINDS
from attndrift.results import Line, ProbeScore


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


def tradeoff(lines: Sequence[Line]) -> pd.DataFrame:
    """One row per setting: ``setting, editor, gamma, selection, steps``, each metric with
    ``_low``/``_high`` interval bounds (fractions in [0, 1]), and ``Score``."""
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
            "steps": line.config.get("value", {}).get("steps"),
        }
        for k in PROBE_KINDS:
            m = s.metrics[k]
            row |= {k: m.mean, f"{k}_low": m.low, f"{k}_high": m.high}
        row["Score"] = s.score
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values(["editor", "selection", "gamma"]).reset_index(drop=True)


def drift_vs_failure(lines: Sequence[Line], setting: str) -> drift.FailureAnalysis:
    """Paper Fig. 4 over a sweep: each RS/DNS probe's drift factor vs its P(o_new) under the
    edit of ``setting`` (a key), pooled over records (Pearson, Spearman, per layer range)."""
    rows, per_layer, layers = [], [], None
    for line in lines:
        if line.setting.key != setting or not line.drift.kinds:
            continue
        d = line.drift
        layers = d.layers
        for i, kind in enumerate(d.kinds):
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
        raise ValueError(f"no drift measurements for setting {setting!r}")
    return drift.failure_analysis(pd.DataFrame(rows), torch.tensor(per_layer), layers)
