"""The figures of docs/: each one drawn from the committed results and saved as a static PNG.

Each entry of :data:`FIGURES` names a PNG under ``docs/figures/``, the results it is drawn from
and how (the ``attndrift summarize --plot`` figures of a selection of lines, or the figures of
``scripts/relation_mechanism.py``). :func:`attndrift.plotting.save_png` renders them through
headless Chromium without the modebar, and refuses a figure that draws badly (a label cut off
or over a title, a legend that scrolls). ``tests/test_docs_figures.py`` checks that every
entry draws cleanly and that its committed PNG has the size it renders at. Usage::

    python scripts/docs_figures.py            # every figure
    python scripts/docs_figures.py sadr_heads  # one (its name without .png)
"""

import argparse
import gzip
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attndrift import plotting
from attndrift.experiments import results, summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS, OUT = ROOT / "results", ROOT / "docs" / "figures"


@dataclass(frozen=True)
class Lines:
    """Sweep lines as ``attndrift summarize FILES --records R --settings S --paired`` selects."""

    files: tuple[str, ...]  # under results/ (rank shards and .gz copies merged)
    records: tuple[int, int]  # first and last record id
    settings: tuple[str, ...]  # setting keys, in this order
    paired: bool = True

    def load(self) -> list[results.Line]:
        lines = results.load([RESULTS / f for f in self.files])
        first, last = self.records
        keys = list(self.settings)
        lines = [x for x in lines if first <= x.record <= last and x.setting.key in keys]
        missing = set(keys) - {x.setting.key for x in lines}
        if missing:
            raise ValueError(f"no lines for {sorted(missing)}")
        lines.sort(key=lambda x: keys.index(x.setting.key))
        return summary.paired(lines) if self.paired else lines


def tradeoff(lines: Lines, title: str) -> Callable[[], list]:
    """``summarize --plot``'s figures: the γ curves, then the map of PS against RS/DNS."""

    def draw() -> list:
        frame = summary.tradeoff(lines.load())
        return [plotting.tradeoff(frame, title=title), plotting.tradeoff_map(frame)]

    return draw


def mechanism() -> list:
    """``scripts/relation_mechanism.py``'s figures of its committed lines."""
    path = ROOT / "scripts" / "relation_mechanism.py"
    spec = importlib.util.spec_from_file_location("relation_mechanism", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with gzip.open(RESULTS / "mechanism_1100-1119.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = [json.loads(x) for x in f if x.strip()]
    return module.figures(lines)


SELECTION = Lines(
    ("sadr_selection.jsonl",),
    (1100, 1119),
    ("rome|g=0|steps=80", "rome|g=0.05|steps=80", "rome|g=0.2|steps=80", "rome|g=0.5|steps=80",
     "rome|g=0.2|sadr_relations|steps=80", "rome|g=0.05|steps=80|relation_kl=5",
     "rome|g=0.05|steps=80|relation_kl=25"),
)  # fmt: skip
HEADS = Lines(
    ("sadr_selection.jsonl", "sadr_tradeoff.a.jsonl", "sadr_tradeoff.b.jsonl"),
    (1100, 1109),
    ("rome|g=0|steps=80", "rome|g=0.05|steps=80", "rome|g=0.2|steps=80", "rome|g=0.5|steps=80",
     "rome|g=0.05|all|steps=80", "rome|g=0.2|all|steps=80"),
)  # fmt: skip

SPECIFIC = Lines(
    ("specificity_selection.a.jsonl", "specificity_selection.b.jsonl"),
    (1100, 1139),
    ("rome|g=0|steps=80", "rome|g=0|steps=80|early_stop_on=margin|stop_margin=1",
     "rome|g=0|steps=80|early_stop_on=margin|stop_margin=2",
     "rome|g=0|steps=80|early_stop_on=margin|stop_margin=4",
     "rome|g=0|steps=80|early_stop=0.5|stop_margin=2", "rome|g=0|steps=80|offtarget=2"),
)  # fmt: skip


def strength(lines: Lines, title: str) -> Callable[[], list]:
    """Specificity against edit strength (:func:`attndrift.experiments.summary.strength`)."""

    def draw() -> list:
        return [plotting.strength(summary.strength(lines.load()), title=title)]

    return draw


EVALUATION = Lines(
    ("sadr_evaluation.a.jsonl", "sadr_evaluation.b.jsonl"), (0, 119), ("rome|g=0|steps=80",)
)


def drift(lines: Lines, setting: str, title: str) -> Callable[[], list]:
    """Drift factor against P(o_new) of each RS and DNS probe under one setting's edits, with
    the Pearson correlation and its interval from the bootstrap over records."""

    def draw() -> list:
        loaded = lines.load()
        analysis = summary.drift_vs_failure(loaded, setting)
        table = analysis.probes
        low, high = summary.pearson_interval(
            table["record"].to_numpy(), table["factor"].to_numpy(), table["p_new"].to_numpy()
        )
        r = analysis.overall.pearson
        fig = plotting.drift_scatter(analysis)
        fig.update_layout(
            title=f"{title}<br><sup>Pearson r = {r:.2f}, 95 % interval [{low:.2f}, {high:.2f}] "
            f"(bootstrap over {table['record'].nunique()} records), {len(table)} probes</sup>"
        )
        return [fig]

    return draw


EDITORS = Lines(
    ("sadr_evaluation.a.jsonl", "sadr_evaluation.b.jsonl", "memit_evaluation.a.jsonl",
     "memit_evaluation.b.jsonl", "group_batch.jsonl", "pmet_evaluation.a.jsonl",
     "pmet_evaluation.b.jsonl", "pmet_evaluation.c.jsonl", "pmet_evaluation.d.jsonl"),
    (0, 119),
    ("rome|g=0|steps=80", "rome|g=0.05|steps=80", "memit|g=0", "memit|g=0.025", "alphaedit|g=0",
     "alphaedit|g=0.025", "pmet|g=0", "pmet|g=0.4"),
)  # fmt: skip


def editors(lines: Lines, title: str) -> Callable[[], list]:
    """Every editor as one point: PS against the harmonic mean of RS and DNS."""

    def draw() -> list:
        loaded = lines.load()
        settings = {line.setting.key: line.setting for line in loaded}
        frame = summary.tradeoff(loaded)
        frame["setting"] = [summary.label(settings[k]) for k in frame["setting"]]
        fig = plotting.tradeoff_map(frame, title=title)
        return [fig.update_layout(width=1000, height=650)]

    return draw


#: the PNGs of docs/figures and how each is drawn
FIGURES: dict[str, Callable[[], list]] = {
    "sadr_selection.png": tradeoff(
        SELECTION, "ROME+SADR on SmolLM2-135M, dev records 1100-1119: trade-off across γ"
    ),
    "sadr_heads.png": tradeoff(
        HEADS, "ROME+SADR on SmolLM2-135M, dev records 1100-1109: selected heads vs all heads"
    ),
    "mechanism.png": mechanism,
    "drift.png": drift(
        EVALUATION,
        "rome|g=0|steps=80",
        "ROME on SmolLM2-135M, dev records 0-119: drift factor against P(o_new)",
    ),
    "editors.png": editors(
        EDITORS,
        "Four editors on SmolLM2-135M, dev records 0-119: generalisation against specificity",
    ),
    "strength_selection.png": strength(
        SPECIFIC, "ROME on SmolLM2-135M, dev records 1100-1139: specificity against edit strength"
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="figures to draw (default: all), e.g. sadr_heads")
    p.add_argument("--out", type=Path, default=OUT, help="(default: %(default)s)")
    a = p.parse_args()
    names = [n if n.endswith(".png") else f"{n}.png" for n in a.names] or list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        sys.exit(f"unknown figures {unknown}: expected some of {list(FIGURES)}")
    for name in names:
        path = plotting.save_png(FIGURES[name](), a.out / name)
        print(f"{path}")


if __name__ == "__main__":
    main()
