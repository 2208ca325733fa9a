"""Evaluation: score every METHOD §5 probe of a set of records on one model state."""

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from transformer_lens import HookedTransformer

from attndrift import generation, metrics, scoring
from attndrift.data import PROBE_KINDS, ProbeKind, Record, probes_of
from attndrift.models import Variant, as_variant

#: ROME's fluency setting: continuations of 100 tokens after each generation prompt.
FLUENCY_TOKENS = 100


@dataclass(frozen=True)
class Evaluation:
    """Per-probe results (tidy table) and their aggregate."""

    probes: pd.DataFrame
    summary: metrics.Summary


def evaluate(
    model: HookedTransformer | Variant,
    records: Sequence[Record],
    *,
    kinds: Sequence[ProbeKind] = PROBE_KINDS,
    fluency: bool = False,
    seed: int = 0,
    max_batch_tokens: int = scoring.DEFAULT_BATCH_TOKENS,
    progress: bool = False,
) -> Evaluation:
    """Score all probes of ``records`` (all kinds they have) in batched forward passes.

    Args:
        model: a model, or a :class:`Variant` (model + hooks, e.g. an edit as a hook).
        records: the records.
        kinds: probe kinds to score.
        fluency: also sample the generation prompts (seeded) and report FL.
        seed: sampling seed for fluency.
    """
    v = as_variant(model)
    table = scoring.score_probes(
        v.model,
        probes_of(records, kinds),
        max_batch_tokens=max_batch_tokens,
        fwd_hooks=v.hooks,
        progress=progress,
    )
    fl = None
    if fluency:
        prompts = [p for r in records for p in (r.generation_prompts or ())]
        if prompts:
            texts = generation.sample(
                v.model, prompts, max_new_tokens=FLUENCY_TOKENS, seed=seed, fwd_hooks=v.hooks
            )
            fl = metrics.fluency(texts)
    return Evaluation(table, metrics.aggregate(table, fluency=fl))
