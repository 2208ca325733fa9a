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

from attndrift import plotting, results, summary

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

#: the PNGs of docs/figures and how each is drawn
FIGURES: dict[str, Callable[[], list]] = {
    "sadr_selection.png": tradeoff(
        SELECTION, "ROME+SADR on SmolLM2-135M, dev records 1100-1119: trade-off across γ"
    ),
    "sadr_heads.png": tradeoff(
        HEADS, "ROME+SADR on SmolLM2-135M, dev records 1100-1109: selected heads vs all heads"
    ),
    "mechanism.png": mechanism,
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
