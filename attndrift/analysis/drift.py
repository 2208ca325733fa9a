"""Attention drift between a vanilla and an edited model (METHOD §1), and its link to failure.

For a prompt with subject span ``[s_first, s_last]`` and last prompt token ``last``, and for
every layer l and query head h, with ``P`` the vanilla and ``P*`` the edited attention:

* ``a = P[last, s_last]`` and ``a* = P*[last, s_last]``; ``delta = a* − a``;
* ``mass = Σ_{k=s_first}^{s_last} P[last, k]`` (and ``mass*``, ``mass_delta``);
* ``kl = KL(P[last, :] ‖ P*[last, :]) = Σ_k P log(P / P*)``, computed safely: ``0 log 0 = 0``,
  ``P*`` clamped at the smallest normal float inside the log, terms with ``P = P*`` exactly 0,
  and the sum clamped at 0 against rounding; never NaN or inf. With ``all_rows`` the KL of
  every query row is kept too (padded query rows are 0);
* the per-prompt *drift factor* ``max_h delta`` per layer, and its maximum over layers.

All of it comes from one capture of each model per batch (:mod:`attndrift.capture`): the
attention rows of the last token only, unless every row is asked for.

:func:`versus_failure` is the paper's Fig. 4 analysis: over many failure-prone probes
(relation RS and distracting-neighbour DNS prompts of many edits, each under its own edited
model) it correlates the drift factor with the edited model's probability of ``o_new``
(:func:`attndrift.scoring.answer_nll`, P = exp(−mean NLL)), overall and per layer range.

Axes: ``batch`` prompts, ``layer`` the analysed layers (:attr:`Drift.layers` order),
``head_index`` query heads (all of them, GQA included), ``query_pos`` query rows,
``key_pos`` keys.
"""

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import capture, encoding, metrics, models, scoring
from attndrift.data import Probe

log = logging.getLogger(__name__)

#: Per prompt x layer x head quantities of a :class:`Drift` (its tensor fields, frame columns).
METRICS = ("kl", "a_vanilla", "a_edited", "delta", "mass_vanilla", "mass_edited", "mass_delta")
#: Probe kinds whose ``right`` answer is o_new (for the others, ``wrong`` is o_new).
NEW_IS_RIGHT = frozenset({"ES", "PS", "AS"})


def answers(probe: Probe) -> tuple[str, str]:
    """``(o_true, o_new)`` of a probe: the answer the edit should not / should produce."""
    if probe.kind in NEW_IS_RIGHT:
        return probe.wrong, probe.right
    return probe.right, probe.wrong


def kl(
    p: Float[Tensor, "*rows key_pos"], q: Float[Tensor, "*rows key_pos"]
) -> Float[Tensor, "*rows"]:
    """KL(p ‖ q) per row (:func:`attndrift.metrics.kl`), clamped at 0 against rounding:
    finite and ≥ 0 even where q has zero-probability keys; KL(p ‖ p) == 0 bit-exactly."""
    return metrics.kl(p, q).clamp_min(0.0)


@dataclass(frozen=True)
class Drift:
    """Per prompt x layer x head drift of the last token's attention row.

    Attributes:
        prompts, subjects: the analysed prompts and their subjects.
        layers: the analysed layers (axis ``layer``).
        kl: KL(vanilla ‖ edited) of the last-token row.
        a_vanilla, a_edited, delta: attention from the last token to ``s_last``.
        mass_vanilla, mass_edited, mass_delta: attention mass on all subject tokens.
        kl_rows: KL of every query row (0 on padded rows), if asked for.
        lengths: prompt lengths in tokens (valid query rows of ``kl_rows``).
        model, edit: names of the model and of the edit (figure titles; "" when unknown).
    """

    prompts: tuple[str, ...]
    subjects: tuple[str, ...]
    layers: tuple[int, ...]
    kl: Float[Tensor, "batch layer head_index"]
    a_vanilla: Float[Tensor, "batch layer head_index"]
    a_edited: Float[Tensor, "batch layer head_index"]
    delta: Float[Tensor, "batch layer head_index"]
    mass_vanilla: Float[Tensor, "batch layer head_index"]
    mass_edited: Float[Tensor, "batch layer head_index"]
    mass_delta: Float[Tensor, "batch layer head_index"]
    lengths: Int[Tensor, " batch"]
    kl_rows: Float[Tensor, "batch layer head_index query_pos"] | None = None
    model: str = ""
    edit: str = ""

    def __repr__(self) -> str:
        b, n_layers, n_heads = self.kl.shape
        factor = self.factor()
        worst = int(factor.argmax()) if b else 0
        name = " ".join(x for x in (self.edit, "on" if self.edit and self.model else "",
                                    self.model) if x)  # fmt: skip
        top = f"; largest drift factor {float(factor[worst]):.3f} on {self.prompts[worst]!r}"
        return (
            f"Drift({name + ': ' if name else ''}{b} prompts × {n_layers} layers × {n_heads} "
            f"heads; mean drift factor {float(factor.mean()):.3f}{top if b else ''})"
        )

    def factor_per_layer(self) -> Float[Tensor, "batch layer"]:
        """Drift factor per layer: the largest increase of attention to ``s_last`` over heads."""
        return self.delta.amax(-1)

    def factor(self) -> Float[Tensor, " batch"]:
        """Drift factor of each prompt: :meth:`factor_per_layer`, maximised over layers."""
        return self.delta.amax((-1, -2))

    def frame(self) -> pd.DataFrame:
        """Tidy table: one row per (prompt, layer, head)."""
        b, n_layers, n_heads = self.kl.shape
        prompt = np.repeat(np.arange(b), n_layers * n_heads)
        columns = {
            "prompt": prompt,
            "text": np.asarray(self.prompts, dtype=object)[prompt],
            "layer": np.tile(np.repeat(np.asarray(self.layers), n_heads), b),
            "head": np.tile(np.arange(n_heads), b * n_layers),
        }
        for name in METRICS:
            columns[name] = getattr(self, name).detach().float().cpu().flatten().numpy()
        return pd.DataFrame(columns)


def compare(
    pair: capture.Pair,
    prompts: Sequence[str] | None = None,
    subjects: Sequence[str] | None = None,
    all_rows: bool = False,
) -> Drift:
    """The drift of one captured pair (needs the last-token rows, or every row for ``all_rows``).

    ``prompts`` and ``subjects`` only label the result (default: empty strings).
    """
    van, edi = pair.vanilla, pair.edited
    if van.pattern is None or edi.pattern is None:
        raise ValueError("drift needs captured attention patterns")
    if van.layers != edi.layers or not torch.equal(van.queries, edi.queries):
        raise ValueError("the two captures have different layers or query rows")
    batch = van.batch
    n = len(batch)
    if (batch.subject_last < 0).any():
        raise ValueError("drift needs the subject of every prompt")
    p, q = van.pattern, edi.pattern  # [batch, layer, head, query_pos, key_pos]
    if all_rows:
        if van.queries.shape[1] != batch.tokens.shape[1]:
            raise ValueError("all_rows needs a capture of every query row (queries='all')")
        rows = batch.last[:, None, None, None, None].expand(*p.shape[:3], 1, p.shape[-1])
        p_last, q_last = p.gather(3, rows)[:, :, :, 0], q.gather(3, rows)[:, :, :, 0]
    else:
        if van.queries.shape[1] != 1 or not torch.equal(van.queries[:, 0], batch.last):
            raise ValueError("drift needs the last-token rows (queries='last')")
        p_last, q_last = p[:, :, :, 0], q[:, :, :, 0]  # [batch, layer, head, key_pos]

    def at(rows: Tensor, pos: Tensor) -> Tensor:
        return rows.gather(-1, pos[:, None, None, None].expand(*rows.shape[:3], 1))[..., 0]

    keys = torch.arange(p.shape[-1], device=p.device)
    in_subject = (keys >= batch.subject_first[:, None]) & (keys <= batch.subject_last[:, None])
    subject = in_subject[:, None, None, :].to(p.dtype)  # [batch, 1, 1, key_pos]
    a_vanilla, a_edited = at(p_last, batch.subject_last), at(q_last, batch.subject_last)
    mass_vanilla, mass_edited = (p_last * subject).sum(-1), (q_last * subject).sum(-1)
    kl_rows = None
    if all_rows:
        valid = keys[None, :] < batch.lengths[:, None]  # [batch, query_pos]
        kl_rows = kl(p, q) * valid[:, None, None, :]
    return Drift(
        prompts=tuple(prompts) if prompts is not None else ("",) * n,
        subjects=tuple(subjects) if subjects is not None else ("",) * n,
        layers=van.layers,
        kl=kl(p_last, q_last),
        a_vanilla=a_vanilla,
        a_edited=a_edited,
        delta=a_edited - a_vanilla,
        mass_vanilla=mass_vanilla,
        mass_edited=mass_edited,
        mass_delta=mass_edited - mass_vanilla,
        lengths=batch.lengths,
        kl_rows=kl_rows,
    )


def concat(parts: Sequence[Drift]) -> Drift:
    """Drifts of several batches (same layers) as one; ``kl_rows`` padded with zeros."""
    if not parts:
        raise ValueError("nothing to concatenate")
    if len({d.layers for d in parts}) != 1:
        raise ValueError("drifts of different layers cannot be concatenated")
    tensors = {
        f.name: torch.cat([getattr(d, f.name) for d in parts])
        for f in dataclasses.fields(Drift)
        if f.name not in ("prompts", "subjects", "layers", "kl_rows", "model", "edit")
    }
    kl_rows = None
    if all(d.kl_rows is not None for d in parts):
        width = max(d.kl_rows.shape[-1] for d in parts)
        kl_rows = torch.cat(
            [torch.nn.functional.pad(d.kl_rows, (0, width - d.kl_rows.shape[-1])) for d in parts]
        )
    return Drift(
        prompts=tuple(t for d in parts for t in d.prompts),
        subjects=tuple(t for d in parts for t in d.subjects),
        layers=parts[0].layers,
        kl_rows=kl_rows,
        model=parts[0].model,
        edit=parts[0].edit,
        **tensors,
    )


def reference(
    vanilla: HookedTransformer | models.Variant,
    prompts: Sequence[str],
    subjects: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    all_rows: bool = False,
    batch_size: int = 16,
) -> list[capture.Capture]:
    """The vanilla captures :func:`measure` compares against, batch by batch.

    Compute them once and pass them as ``vanilla_captures`` to measure many edits of the same model
    on the same prompts (a sweep edits one record under several settings).
    """
    if len(prompts) != len(subjects):
        raise ValueError(f"{len(prompts)} prompts but {len(subjects)} subjects")
    if not prompts:
        raise ValueError("no prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    model = models.as_variant(vanilla).model
    queries = "all" if all_rows else "last"
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = encoding.encode_batch(
            model, prompts[i : i + batch_size], subjects[i : i + batch_size]
        )
        out.append(capture.run(vanilla, batch, layers=layers, queries=queries))
    return out


def measure(
    vanilla: HookedTransformer | models.Variant,
    edited: HookedTransformer | models.Variant,
    prompts: Sequence[str],
    subjects: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    all_rows: bool = False,
    batch_size: int = 16,
    vanilla_captures: Sequence[capture.Capture] | None = None,
) -> Drift:
    """Attention drift of ``edited`` against ``vanilla`` on prompts, in batches.

    Args:
        vanilla, edited: models, or :class:`~attndrift.models.Variant` (e.g. an edit as hooks).
        prompts: the prompts (each containing its subject).
        subjects: the subject of each prompt (its last occurrence is used).
        layers: layers to analyse (default: all).
        all_rows: also keep the KL of every query row (captures every row: more memory).
        batch_size: prompts per forward pass.
        vanilla_captures: the vanilla captures of these prompts from :func:`reference` (same
            layers, rows and batch size), to skip the vanilla runs.
    """
    if vanilla_captures is None:
        vanilla_captures = reference(
            vanilla, prompts, subjects, layers=layers, all_rows=all_rows, batch_size=batch_size
        )
    v, e = models.as_variant(vanilla), models.as_variant(edited)
    capture.check_compatible(v.model, e.model)
    queries = "all" if all_rows else "last"
    parts = []
    for i, van in enumerate(vanilla_captures):
        chunk = prompts[i * batch_size : (i + 1) * batch_size]
        chunk_subjects = subjects[i * batch_size : (i + 1) * batch_size]
        edi = capture.run(e, van.batch, layers=van.layers, queries=queries)
        parts.append(compare(capture.Pair(van, edi), chunk, chunk_subjects, all_rows))
    if sum(len(p.prompts) for p in parts) != len(prompts):
        raise ValueError("the reference captures do not cover these prompts")
    names = {"model": v.model.cfg.model_name, "edit": e.name}
    return dataclasses.replace(concat(parts), **names)


def top_heads(d: Drift, prompt: int, n: int, metric: str = "delta") -> list[tuple[int, int]]:
    """The ``n`` (layer, head) pairs with the largest ``metric`` for one prompt, largest first."""
    values = getattr(d, metric)[prompt]  # [layer, head]
    top = values.flatten().topk(min(n, values.numel())).indices.tolist()
    n_heads = values.shape[-1]
    return [(d.layers[i // n_heads], i % n_heads) for i in top]


# --------------------------------------------------------------------------------------------
# Drift versus failure (paper Fig. 4)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Correlation:
    """Pearson and Spearman correlation with two-sided p-values (NaN when undefined)."""

    pearson: float
    pearson_p: float
    spearman: float
    spearman_p: float
    n: int


def correlate(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Correlation:
    """Pearson and Spearman of ``x`` and ``y`` (NaN for fewer than 3 points or constant input)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"correlate needs two 1-D arrays of one length, got {x.shape}, {y.shape}")
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(math.nan, math.nan, math.nan, math.nan, n)
    pr, sr = stats.pearsonr(x, y), stats.spearmanr(x, y)
    return Correlation(
        float(pr.statistic), float(pr.pvalue), float(sr.statistic), float(sr.pvalue), n
    )


@dataclass(frozen=True)
class FailureAnalysis:
    """Drift factor against the edited model's P(o_new), over many probes.

    Attributes:
        probes: one row per probe: ``group, record, kind, prompt, subject, o_new, p_new,
            factor, factor_layer`` (the layer where the factor is reached).
        layers: the analysed layers (columns of ``factor_per_layer``).
        factor_per_layer: drift factor per probe and layer (CPU).
        overall: correlation of ``factor`` with ``p_new``.
        by_range: one row per layer range ``[first, last]``: the correlation of the range's
            drift factor (max over its layers) with ``p_new``.
        skipped: probes left out because their prompt does not contain the subject.
    """

    probes: pd.DataFrame
    layers: tuple[int, ...]
    factor_per_layer: Float[Tensor, "probe layer"]
    overall: Correlation
    by_range: pd.DataFrame
    skipped: int = 0


def layer_ranges(layers: Sequence[int], size: int) -> list[tuple[int, int]]:
    """Consecutive ``(first, last)`` ranges of ``size`` analysed layers (the last may be short)."""
    if size < 1:
        raise ValueError(f"range size must be positive, got {size}")
    layers = list(layers)
    starts = range(0, len(layers), size)
    return [(layers[i], layers[min(i + size, len(layers)) - 1]) for i in starts]


def versus_failure(
    vanilla: HookedTransformer | models.Variant,
    groups: Sequence[tuple[HookedTransformer | models.Variant, Sequence[Probe]]],
    *,
    layers: Sequence[int] | None = None,
    range_size: int | None = None,
    batch_size: int = 16,
    max_batch_tokens: int = scoring.DEFAULT_BATCH_TOKENS,
) -> FailureAnalysis:
    """Correlate each probe's drift factor with the edited model's P(o_new) (paper Fig. 4).

    Args:
        vanilla: the unedited model.
        groups: ``(edited model, its probes)`` per edit, e.g. ``(Variant(m, e.hooks(m)),
            record.probes(["RS", "DNS"]))``. The probe's ``subject`` is the edited subject;
            o_new is its ``wrong`` answer (``right`` for ES/PS/AS, see :func:`answers`).
        layers: layers to analyse (default: all).
        range_size: layers per range of ``by_range`` (default: about a sixth of the layers).
        batch_size: prompts per drift forward pass.
        max_batch_tokens: token budget of the scoring passes.
    """
    rows, per_layer = [], []
    used_layers: tuple[int, ...] = ()
    skipped = 0
    v = models.as_variant(vanilla)
    for g, (edited, probes) in enumerate(groups):
        e = models.as_variant(edited)
        kept = []
        for probe in probes:
            try:
                encoding.encode_prompt(v.model, probe.prompt, probe.subject)
            except ValueError as err:
                log.warning("skipping probe: %s", err)
                skipped += 1
                continue
            kept.append(probe)
        if not kept:
            continue
        d = measure(
            v,
            e,
            [p.prompt for p in kept],
            [p.subject for p in kept],
            layers=layers,
            batch_size=batch_size,
        )
        used_layers = d.layers
        new = [answers(p)[1] for p in kept]
        nll = scoring.answer_nll(
            e.model,
            [(p.prompt, o) for p, o in zip(kept, new, strict=True)],
            fwd_hooks=e.hooks,
            max_batch_tokens=max_batch_tokens,
        )
        fl = d.factor_per_layer().float().cpu()
        per_layer.append(fl)
        best = fl.argmax(-1)
        for i, p in enumerate(kept):
            rows.append(
                {
                    "group": g,
                    "record": p.record,
                    "kind": p.kind,
                    "prompt": p.prompt,
                    "subject": p.subject,
                    "o_new": new[i],
                    "p_new": math.exp(-float(nll[i])),
                    "factor": float(fl[i].max()),
                    "factor_layer": d.layers[int(best[i])],
                }
            )
    if not rows:
        raise ValueError("no probes to analyse")
    return failure_analysis(
        pd.DataFrame(rows), torch.cat(per_layer), used_layers, range_size, skipped
    )


def failure_analysis(
    probes: pd.DataFrame,
    factor_per_layer: Float[Tensor, "probe layer"],
    layers: Sequence[int],
    range_size: int | None = None,
    skipped: int = 0,
) -> FailureAnalysis:
    """Correlations of collected drift factors with P(o_new), overall and per layer range.

    Args:
        probes: one row per probe with at least ``factor`` and ``p_new`` columns.
        factor_per_layer: the drift factor of each probe at each of ``layers``.
        layers: the analysed layers.
        range_size: layers per range (default: about a sixth of the layers).
        skipped: probes left out upstream (reported).
    """
    if len(probes) != factor_per_layer.shape[0] or factor_per_layer.shape[1] != len(layers):
        raise ValueError("factor_per_layer must be [probes, layers]")
    layers = tuple(layers)
    size = range_size or max(1, math.ceil(len(layers) / 6))
    p_new = probes["p_new"].to_numpy()
    ranges = []
    for first, last in layer_ranges(layers, size):
        cols = [i for i, layer in enumerate(layers) if first <= layer <= last]
        c = correlate(factor_per_layer[:, cols].amax(-1).numpy(), p_new)
        ranges.append({"first": first, "last": last, **dataclasses.asdict(c)})
    return FailureAnalysis(
        probes=probes,
        layers=layers,
        factor_per_layer=factor_per_layer,
        overall=correlate(probes["factor"].to_numpy(), p_new),
        by_range=pd.DataFrame(ranges),
        skipped=skipped,
    )
