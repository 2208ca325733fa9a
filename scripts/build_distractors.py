"""Build the distractor pool (``assets/distractors.json``) from a merged CounterFact file.

The pool holds, per relation, queries about subjects of *other* records: each pool record's
edit prompt (its subject, its relation) and its neighbourhood prompts (other subjects, same
relation). Records named by ``--exclude`` (the selection and evaluation slices) give nothing,
and every pool prompt that is also one of their probe prompts (any kind) is dropped, so that
training on the pool never trains on an evaluation prompt. The key of a relation is the
record's relation id where it has one, else its prompt template (``attndrift.distractors``).

    python scripts/build_distractors.py DATA [--records 1000-1099,1180-1199]
        [--exclude 0-239,1100-1179] [--out assets/distractors.json]
"""

import argparse
import json
from pathlib import Path

from attndrift import data, distractors


def _ids(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        out += range(int(first), int(last or first) + 1)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="merged CounterFact file (the development file)")
    p.add_argument("--records", default="1000-1099,1180-1199", help="pool records (ids)")
    p.add_argument(
        "--exclude", default="0-239,1100-1179", help="records whose prompts are kept out"
    )
    p.add_argument("--out", type=Path, default=Path("assets") / distractors.POOL_FILE)
    a = p.parse_args()
    dataset = data.load_dataset(a.data)
    excluded = {pr.prompt.strip() for pr in data.probes_of(dataset.select(_ids(a.exclude)))}
    for r in dataset.select(_ids(a.exclude)):
        excluded |= {q.strip() for q, _ in r.neighborhood or ()}
    pool: dict[str, list[str]] = {}
    dropped = 0
    for r in dataset.select(_ids(a.records)):
        key = distractors.relation_key(r.request)
        for q in (r.request.prompt, *(q for q, _ in r.neighborhood or ())):
            q = q.strip()
            if q in excluded or "{" in q or "}" in q:
                dropped += 1
                continue
            pool.setdefault(key, [])
            if q not in pool[key]:
                pool[key].append(q)
    source = (
        f"edit and neighbourhood prompts of records {a.records} of {a.data.name} (merged "
        "CounterFact development file of Wang et al., ICLR 2025; CounterFact: Meng et al., "
        "NeurIPS 2022; MIT licence, assets/LICENSE-merged_counterfact.txt), without the prompts "
        f"of records {a.exclude}"
    )
    out = {"source": source, "queries": {k: pool[k] for k in sorted(pool)}}
    a.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    n = sum(len(v) for v in pool.values())
    print(f"{a.out}: {n} queries under {len(pool)} relation keys ({dropped} dropped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
