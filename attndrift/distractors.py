"""Distractors: queries about other subjects that follow the sentence stating an edit.

A distracting-neighbourhood probe asks about another subject of the edited relation after the
sentence ``"{edit prompt} {o_new}. "``; an edited model that answers o_new there has carried
the edit into a context where the subject is only mentioned. The value optimisation's
off-target term and SADR's distractor variant (:mod:`attndrift.editing.value`,
:mod:`attndrift.editing.sadr`) train on such prompts, so they must never be the evaluation's own.
This module keeps a *pool* of queries taken from other records and picks a request's queries from
it:

* the packaged pool (``assets/distractors.json``) holds the edit and neighbourhood prompts of
  CounterFact development records that no selection or evaluation of this project's studies
  uses, with every prompt that is also one of those slices' probes removed
  (``scripts/build_distractors.py`` rebuilds it and says which records);
* the pool is keyed by relation: the record's Wikidata relation id where it has one, else its
  prompt template (``"The name of the country of citizenship of {} is"``);
* a request's queries: first those of its own relation, then the others, each group in a fixed
  pseudo-random order seeded by the request (sha256), leaving out every query that mentions the
  request's subject. The same request always gets the same queries.
"""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from attndrift.data import EditRequest

#: the packaged pool's file name (in the repository's ``assets/``, or ``attndrift.assets``)
POOL_FILE = "distractors.json"


@dataclass(frozen=True)
class Pool:
    """Queries per relation key, and where they come from."""

    queries: Mapping[str, tuple[str, ...]]  # relation key -> queries (no trailing space)
    source: str  # the records the queries come from, in words

    def __post_init__(self) -> None:
        for key, qs in self.queries.items():
            for q in qs:
                if not isinstance(q, str) or not q.strip() or "{" in q or "}" in q:
                    raise ValueError(f"distractor pool: bad query {q!r} under {key!r}")


def pool_path() -> Path:
    """The packaged pool: the repository's ``assets/distractors.json`` in a checkout, else the
    ``attndrift.assets`` resource of an installed wheel."""
    repo = Path(__file__).resolve().parent.parent / "assets" / POOL_FILE
    if repo.exists():
        return repo
    from importlib.resources import files

    return Path(str(files("attndrift.assets") / POOL_FILE))


def load_pool(path: str | Path | None = None) -> Pool:
    """A pool file (default: the packaged one): ``{"source": ..., "queries": {key: [...]}}``."""
    path = Path(path) if path is not None else pool_path()
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        queries = {str(k): tuple(v) for k, v in obj["queries"].items()}
        return Pool(queries=queries, source=str(obj.get("source", "")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a distractor pool ({e})") from None


def relation_key(request: EditRequest) -> str:
    """The pool key of a request's relation: its relation id, else its prompt template."""
    return request.relation_id or request.template


def _order(request: EditRequest, query: str) -> str:
    return hashlib.sha256(f"{request.subject}\x00{request.prompt}\x00{query}".encode()).hexdigest()


def queries(request: EditRequest, n: int, pool: Pool | None = None) -> tuple[str, ...]:
    """``n`` queries for ``request`` (fewer only if the whole pool has fewer): its relation's
    first, then other relations', none mentioning its subject; deterministic."""
    if n <= 0:
        return ()
    pool = pool if pool is not None else load_pool()
    key = relation_key(request)
    own = [q for q in pool.queries.get(key, ()) if request.subject not in q]
    others = [
        q
        for k, qs in sorted(pool.queries.items())
        if k != key
        for q in qs
        if request.subject not in q
    ]
    picked = sorted(own, key=lambda q: _order(request, q))
    picked += sorted(dict.fromkeys(others), key=lambda q: _order(request, q))
    return tuple(dict.fromkeys(picked))[:n]


def prompts(request: EditRequest, n: int, pool: Pool | None = None) -> tuple[str, ...]:
    """The distractor prompts themselves: the sentence stating the edit, then each query."""
    return tuple(request.distraction + q for q in queries(request, n, pool))
