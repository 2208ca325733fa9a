"""Check the embedded dataset ``assets/known_facts.json`` against the embedded model.

Every record of the embedded dataset must be a fact that the *unedited* SmolLM2-135M knows:

* its ES probe fails (the model prefers ``target_true`` over ``target_new`` on the edit prompt),
* the model's greedy next token after the edit prompt is the first token of ``target_true``,
* more than half of its NS probes and more than half of its RS probes succeed,

and it must be well-formed (subject in the edit prompt, no trailing space on prompts, no
leading space on answers, ``case_id`` numbered ``0..N-1``, 2 paraphrase, 3-5 neighbourhood,
0-3 relation and 2-3 generation prompts). Relation prompts ask for facts that the edit does not
entail: editing the Eiffel Tower's city to Rome changes its country, so "located in the country
of" is not a relation probe of that record (it would count a correct generalisation as a
specificity failure); such prompts were removed by hand.

The script prints the number of records, the unedited metrics table (METHOD §5) and one line per
record that breaks a rule. Usage::

    python scripts/check_assets.py [--strict] [--path FILE] [--show-failures]

``--strict`` exits with status 1 if any record breaks a rule; ``--show-failures`` also lists
every failing probe (kind, prompt, right vs wrong probabilities).
"""

import argparse
import sys
from pathlib import Path

import torch

from attndrift import data, encoding, evaluation, metrics, models

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "known_facts.json"
#: A record keeps its NS and RS probes "mostly" right: strictly more than this fraction.
MIN_FRACTION = 0.5
#: Allowed numbers of prompts per block (inclusive ranges).
COUNTS = {
    "paraphrase": (2, 2),
    "neighborhood": (3, 5),
    "relation": (0, 3),
    "generation": (2, 3),
}


def format_problems(record: data.Record, position: int) -> list[str]:
    """Problems with the record's shape that the loader accepts but the asset must not have."""
    out: list[str] = []
    r = record.request
    if record.id != position:
        out.append(f"case_id {record.id} at position {position}")
    blocks = {
        "paraphrase": record.paraphrase_prompts,
        "neighborhood": record.neighborhood,
        "relation": record.relation,
        "generation": record.generation_prompts,
    }
    for name, block in blocks.items():
        low, high = COUNTS[name]
        n = 0 if block is None else len(block)
        if not low <= n <= high:
            out.append(f"{n} {name} prompts (expected {low}-{high})")
    prompts = [r.prompt, *(record.paraphrase_prompts or ()), *(record.generation_prompts or ())]
    answers = [r.target_new, r.target_true]
    for prompt, answer in (*(record.neighborhood or ()), *(record.relation or ())):
        prompts.append(prompt)
        answers.append(answer)
    out += [f"prompt ends with whitespace: {p!r}" for p in prompts if p != p.rstrip()]
    out += [f"answer has surrounding whitespace: {a!r}" for a in answers if a != a.strip()]
    for prompt in record.paraphrase_prompts or ():
        if r.subject not in prompt:
            out.append(f"paraphrase lacks the subject: {prompt!r}")
    for prompt, _ in record.relation or ():
        if r.subject not in prompt:
            out.append(f"relation prompt lacks the subject: {prompt!r}")
    for prompt, answer in record.neighborhood or ():
        if answer != r.target_true:
            out.append(f"neighbour answer {answer!r} is not target_true: {prompt!r}")
    return out


@torch.no_grad()
def greedy_token(model, prompt: str) -> int:
    """The model's most likely next token after ``prompt``."""
    ids = torch.tensor([encoding.encode_prompt(model, prompt).ids])
    return int(model(ids)[0, -1].argmax())


def fraction(probes, record_id: int, kind: str) -> tuple[int, int]:
    rows = probes[(probes["record"] == record_id) & (probes["kind"] == kind)]
    return int(rows["success"].sum()), len(rows)


def knowledge_problems(model, record: data.Record, probes) -> list[str]:
    """Violations of the keep rule on the unedited model."""
    out: list[str] = []
    r = record.request
    es = probes[(probes["record"] == record.id) & (probes["kind"] == "ES")]
    if bool(es["success"].any()):
        row = es.iloc[0]
        out.append(
            f"ES: prefers target_new {r.target_new!r} (P={row.p_right:.3g}) "
            f"over target_true {r.target_true!r} (P={row.p_wrong:.3g})"
        )
    top = greedy_token(model, r.prompt)
    first = encoding.encode_answer(model, r.target_true)[0]
    if top != first:
        out.append(
            f"greedy next token {model.tokenizer.decode([top])!r} is not the start of "
            f"{r.target_true!r} ({model.tokenizer.decode([first])!r})"
        )
    for kind in ("NS", "RS"):
        ok, n = fraction(probes, record.id, kind)
        if n and ok <= MIN_FRACTION * n:
            out.append(f"{kind}: only {ok}/{n} probes succeed")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH, help="dataset JSON file")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any record is flagged")
    parser.add_argument(
        "--show-failures", action="store_true", help="list every failing probe as well"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    args = parser.parse_args(argv)

    dataset = data.load_dataset(args.path)
    model = models.load_model("smollm2-135m", device=args.device)
    ev = evaluation.evaluate(model, dataset.records)
    probes = ev.probes

    print(f"{args.path}: {len(dataset)} records, {len(probes)} probes")
    print()
    table = metrics.table({"unedited": ev.summary})
    table.index.name = None  # no empty index-name row under the header
    print(table.to_string())
    print()

    flagged = 0
    for position, record in enumerate(dataset.records):
        problems = format_problems(record, position) + knowledge_problems(model, record, probes)
        if problems:
            flagged += 1
            print(f"record {record.id} ({record.request.subject} -> {record.request.target_true}):")
            for problem in problems:
                print(f"    {problem}")
    print(
        f"{flagged} of {len(dataset)} records break the keep rule"
        if flagged
        else f"all {len(dataset)} records pass the keep rule"
    )

    if args.show_failures:
        failed = probes[~probes["success"]]
        print()
        print(f"failing probes ({len(failed)}):")
        for row in failed.itertuples():
            print(
                f"  {row.record:3d} {row.kind:5s} {row.prompt!r}: "
                f"{row.right!r} {row.p_right:.3g} <= {row.wrong!r} {row.p_wrong:.3g}"
            )

    return 1 if args.strict and flagged else 0


if __name__ == "__main__":
    sys.exit(main())
