"""The demo's record and probe, by its written rule, on the embedded SmolLM2 and dataset.

Rule (:func:`attndrift.experiments.demo.choose_probe`): ROME at the model's preset edits every
record of the embedded dataset; among the distracting-neighbour (DNS) and relation (RS) probes that
the unedited model answers right — a DNS probe only where ROME still answers its neighbour's own
prompt right — the demo patches the one whose P(o_new) − P(o_true) rises most under ROME (P:
the answer's probability, exp of its mean token log-probability). The demo's ``RECORD`` is that
probe's record; within it, the demo applies the same rule to choose the probe. Usage::

    python scripts/demo_record.py [--top 10] [--csv rises.csv]

Prints the top probes and the record; about ten minutes on one CPU thread.
"""

import argparse
from pathlib import Path

import pandas as pd

import attndrift as ad
from attndrift import cli
from attndrift.experiments import demo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=10, help="probes to print (default: %(default)s)")
    p.add_argument("--csv", type=Path, default=None, help="write every probe's rise here")
    p.add_argument("--device", default="cpu", help="(default: %(default)s)")
    p.add_argument(
        "--records",
        default=None,
        help="only these record ids, e.g. 0,19-34 (default: every record; the rule's choice "
        "is the choice over all of them)",
    )
    a = p.parse_args()
    model = ad.load_model(ad.EMBEDDED_MODEL, device=a.device)
    dataset = ad.load_embedded()
    if a.records is not None:
        dataset = dataset.select(ids=cli.common._ids(a.records))
    rises = demo.survey(model, dataset.records, progress=True)
    if a.csv is not None:
        rises.to_csv(a.csv, index=False)
    shown = rises.sort_values("rise", ascending=False).head(a.top)
    with pd.option_context("display.width", 200, "display.max_colwidth", 90):
        print(shown[["record", "kind", "prompt", "right", "wrong", "rise", "eligible"]])
    chosen = demo.choose_probe(rises)
    print(f"\nchosen: record {chosen['record']}, {chosen['kind']} probe {chosen['prompt']!r}")
    print(f"demo.RECORD is {demo.RECORD}")


if __name__ == "__main__":
    main()
