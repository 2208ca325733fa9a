"""Editors: what every locate-then-edit editor shares (ROME, MEMIT, and the ones to come).

A locate-then-edit editor works in three parts (ROME's split):

1. **keys**: MLP keys at the subject's last token of the edit prompt, filled into context
   templates (:func:`context_templates`, :func:`keys_at_subject`);
2. **values**: a target activation per request, v* = v_0 + δ, with δ optimised by
   :mod:`attndrift.editing.value` (and SADR's term, :mod:`attndrift.editing.sadr`), under the
   editor's step budget (:func:`value_config`: SADR may run more steps than the plain editor);
3. **update**: the editor's own closed-form solve for ``ΔW_out`` of its layer(s).

This module holds parts 1 and 2, the config fields every editor has (:class:`EditorConfig`),
the assembly of the result (:func:`finish`: an :class:`attndrift.editing.edits.Edit` with its
:class:`~attndrift.editing.edits.EditRun`), and the sequence every batch editor follows
(:func:`batch_edit`: requests, templates, targets, covariances, layer loop, result). Each
editor module (:mod:`attndrift.editing.rome`, :mod:`attndrift.editing.memit`, …) adds its own config
fields and its solve, nothing else, and registers itself (:mod:`attndrift.editing.registry`).
"""

import dataclasses
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from attndrift import capture, checks, encoding, generation, models
from attndrift.data import EditRequest
from attndrift.editing import value
from attndrift.editing.covariance import CovarianceConfig
from attndrift.editing.edits import Edit, EditRun
from attndrift.editing.registry import PRESET_KEYS, preset_for  # noqa: F401 (editors' former names)
from attndrift.editing.sadr import SadrConfig
from attndrift.editing.value import ValueConfig

#: MEMIT's openings for sampling context templates.
TEMPLATE_OPENINGS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class TemplateConfig:
    """Context templates: ``count`` samples of ``length`` tokens for each (length, count)."""

    lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))  # (tokens, how many)
    seed: int = 0  # sampling seed
    top_k: int = 5  # sample among the top-k tokens (ROME: 5)

    def __post_init__(self) -> None:
        if not isinstance(self.lengths, tuple | list):
            raise ValueError(f"lengths must be (tokens, count) pairs, got {self.lengths!r}")
        for pair in self.lengths:
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ValueError(f"lengths must be (tokens, count) pairs, got {pair!r}")
            checks.number("template length (tokens)", pair[0], low=1, integer=True)
            checks.number("template count", pair[1], low=1, integer=True)
        checks.number("seed", self.seed, low=0, integer=True)
        checks.number("top_k", self.top_k, low=1, integer=True)


@dataclass(frozen=True, kw_only=True)
class EditorConfig:
    """The fields every editor's config has (each editor adds its own)."""

    value: ValueConfig = field(default_factory=ValueConfig)  # the δ / z optimisation
    templates: TemplateConfig = field(default_factory=TemplateConfig)  # context templates
    covariance: CovarianceConfig | None = field(default_factory=CovarianceConfig)  # None: C = I
    sadr_steps: int | None = None  # steps when SADR is on (γ > 0); None: value.steps


def context_templates(model: HookedTransformer, cfg: TemplateConfig) -> tuple[str, ...]:
    """``"{}"`` plus ``"<sampled text>. {}"`` for each configured (length, count); seeded."""
    texts = []
    for i, (length, count) in enumerate(cfg.lengths):
        openings = [TEMPLATE_OPENINGS[j % len(TEMPLATE_OPENINGS)] for j in range(count)]
        texts += generation.sample(
            model, openings, max_new_tokens=length, seed=cfg.seed + i, top_k=cfg.top_k
        )
    # braces would clash with the placeholder; newlines make odd prefixes
    clean = [re.sub(r"\s+", " ", t.replace("{", " ").replace("}", " ")).strip() for t in texts]
    return ("{}", *(f"{t}. {{}}" for t in clean))


def keys_at_subject(
    model: HookedTransformer | models.Variant,
    prompts: Sequence[str],
    subject: str | Sequence[str],
    hook_names: Sequence[str],
    stop_at_layer: int | None = None,
) -> dict[str, Tensor]:
    """Activations ``[n_prompts, d]`` of ``hook_names`` at the subject's last token.

    ``subject`` is one subject for all prompts or one per prompt; ``model`` may be a variant
    (e.g. a model with edits as hooks).
    """
    subjects = [subject] * len(prompts) if isinstance(subject, str) else list(subject)
    batch = encoding.encode_batch(models.as_variant(model).model, prompts, subjects)
    at = capture.Select(1, batch.subject_last[:, None])
    kept = capture.record(
        model, batch.tokens, {n: at for n in hook_names}, stop_at_layer=stop_at_layer
    )
    return {n: kept[n][:, 0] for n in hook_names}  # [n_prompts, d]


def mean_keys(
    model: HookedTransformer,
    requests: Sequence[EditRequest],
    layer: int,
    templates: Sequence[str],
) -> Tensor:
    """``[n_requests, d_mlp]``: each request's key at s_last averaged over the templates (the
    keys of MEMIT-style editors)."""
    return MeanKeys(model, requests, templates)(layer)


class MeanKeys:
    """:func:`mean_keys` read at ascending layers while only the blocks from the last layer
    read on change (MEMIT's loop updates each layer after reading its keys). The input
    residual of the last layer read is kept, so a read runs only the blocks from there
    instead of all from the embedding: at MEMIT's five consecutive layers, 13 block passes
    instead of 35."""

    def __init__(
        self, model: HookedTransformer, requests: Sequence[EditRequest], templates: Sequence[str]
    ) -> None:
        prompts, subjects = [], []
        for r in requests:
            prompts += filled(templates, r.prompt)
            subjects += [r.subject] * len(templates)
        self.model, self.n, self.n_templates = model, len(requests), len(templates)
        batch = encoding.encode_batch(model, prompts, subjects)
        self.tokens, self.at = batch.tokens, capture.Select(1, batch.subject_last[:, None])
        self.resid: Tensor | None = None  # the input residual of block ``self.layer``
        self.layer: int | None = None

    def __call__(self, layer: int) -> Tensor:
        """``[n_requests, d_mlp]`` at ``layer`` (no lower than the previous read's)."""
        if self.layer is not None and layer < self.layer:
            raise ValueError(f"MeanKeys reads ascending layers: {layer} after {self.layer}")
        key, pre = models.mlp_key_hook(layer), models.resid_pre_hook(layer)
        kept = capture.record(
            self.model,
            self.tokens if self.resid is None else self.resid,
            {key: self.at, pre: None},
            start_at_layer=self.layer,
            stop_at_layer=layer + 1,
        )
        self.resid, self.layer = kept[pre], layer
        return kept[key][:, 0].view(self.n, self.n_templates, -1).mean(1)


def filled(templates: Sequence[str], prompt: str) -> list[str]:
    """Every template with the prompt in its ``{}``."""
    return [value.fill(t, prompt) for t in templates]


def value_config(cfg: EditorConfig, sadr: SadrConfig | None) -> ValueConfig:
    """The optimisation's config: SADR's step budget when SADR is on, else the editor's."""
    if sadr is not None and sadr.gamma > 0 and cfg.sadr_steps is not None:
        return dataclasses.replace(cfg.value, steps=cfg.sadr_steps)
    return cfg.value


def editor_name(base: str, sadr: SadrConfig | None) -> str:
    """``"rome"`` / ``"rome+sadr"``, …: the name an edit records."""
    return base + ("+sadr" if sadr is not None and sadr.gamma > 0 else "")


class Clock:
    """Wall time of an edit's phases (``laps``: phase -> seconds)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start


def finish(
    model: HookedTransformer,
    *,
    name: str,
    cfg: EditorConfig,
    sadr: SadrConfig | None,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    factors: Sequence[tuple[Tensor, Tensor]],
    results: Sequence[value.ValueResult],
    clock: Clock,
    n_templates: int,
) -> Edit:
    """The :class:`~attndrift.editing.edits.Edit` of an editor's factors ``(left, right)`` per layer
    (``name``: the editor's, ``"+sadr"`` added with SADR; ``results``: each request's target
    optimisation)."""
    run = EditRun(
        config=cfg,
        sadr=sadr,
        traces=tuple(r.trace for r in results),
        targets=tuple(r.target.detach().cpu() for r in results),
        seconds=clock.total(),
        timings=tuple(clock.laps.items()),
        n_templates=n_templates,
    )
    return Edit(
        layers=tuple(layers),
        left=tuple(a for a, _ in factors),
        right=tuple(b for _, b in factors),
        requests=tuple(requests),
        editor=editor_name(name, sadr),
        run=run,
        model_name=model.cfg.model_name,
        model_fingerprint=models.fingerprint(model),
    )


C = TypeVar("C")


def begin(
    model: HookedTransformer,
    layers: Sequence[int],
    cfg: EditorConfig,
    templates: Sequence[str] | None,
) -> tuple["Clock", tuple[str, ...]]:
    """What every editor does first: check its layers, start the clock, and take the context
    templates given (or sample them per ``cfg.templates``); the clock's first lap is
    ``templates``."""
    for layer in layers:
        models.check_layer(model, layer)
    clock = Clock()
    if templates is None:
        templates = context_templates(model, cfg.templates)
    clock.lap("templates")
    return clock, tuple(templates)


def requests_of(requests: Sequence[EditRequest], editor: str) -> list[EditRequest]:
    """The requests of a batch editor as a list; a ValueError if there is none."""
    out = list(requests)
    if not out:
        raise ValueError(f"{editor} needs at least one request")
    return out


class TargetMemo:
    """Optimised targets already computed, keyed by everything the optimisation reads: the
    weights (:func:`attndrift.models.fingerprint`), the request, the hook and layer, the
    context templates, the value config and SADR. The optimisation is deterministic, so a
    grid that varies only what comes after it (MEMIT's and PMET's λ and layers below the
    last, AlphaEdit's threshold) computes each target once. Keeps the ``size`` most recent."""

    def __init__(self, size: int = 1024) -> None:
        self.size, self.hits = size, 0
        self._results: OrderedDict[tuple, value.ValueResult] = OrderedDict()

    def get(self, key: tuple) -> value.ValueResult | None:
        found = self._results.get(key)
        if found is not None:
            self._results.move_to_end(key)
            self.hits += 1
        return found

    def put(self, key: tuple, result: value.ValueResult) -> None:
        self._results[key] = result
        while len(self._results) > self.size:
            self._results.popitem(last=False)


def optimise_targets(
    model: HookedTransformer,
    requests: Sequence[EditRequest],
    hook: str | tuple[str, ...],
    layer: int,
    templates: Sequence[str],
    *,
    cfg: ValueConfig,
    sadr: SadrConfig | None,
    progress: bool,
    desc: str,
    memo: TargetMemo | None = None,
    optimise: Callable[..., value.ValueResult] | None = None,
    reads: tuple = (),
) -> tuple[list[value.ValueResult], bool]:
    """The optimised value of each request at ``hook`` (MEMIT's z_i: METHOD §3.3), one
    optimisation per request, and whether every one came from ``memo`` (then the edit's
    clock names the lap ``value_steps_reused``). ``optimise(objective, progress=, desc=)``
    replaces :func:`attndrift.editing.value.optimise_value` (PMET's two deltas), and ``reads`` is
    what else it reads, for the memo's key."""
    out, reused = [], True
    optimise = optimise or value.optimise_value
    weights = models.fingerprint(model) if memo is not None else None
    for i, r in enumerate(requests):
        key = (weights, r, hook, layer, tuple(templates), cfg, sadr, *reads)
        found = memo.get(key) if memo is not None else None
        if found is None:
            reused = False
            found = optimise(
                value.ValueObjective(model, r, hook, layer, templates, cfg, sadr),
                progress=progress,
                desc=f"{desc} {i}",
            )
            if memo is not None:
                memo.put(key, found)
        out.append(found)
    return out, reused


def batch_edit(
    model: HookedTransformer,
    requests: Sequence[EditRequest],
    cfg: EditorConfig,
    *,
    name: str,
    title: str,
    hooks: str | tuple[str, ...],
    desc: str,
    sadr: SadrConfig | None,
    templates: Sequence[str] | None,
    progress: bool,
    memo: TargetMemo | None,
    covariances: Callable[[], C],
    spread: Callable[[list[EditRequest], Tensor, tuple[str, ...], C], list[tuple[Tensor, Tensor]]],
    optimise: Callable[..., value.ValueResult] | None = None,
    reads: tuple = (),
) -> Edit:
    """The sequence of a batch editor (MEMIT, PMET, AlphaEdit) over ``cfg.layers``:

    1. the requests (at least one) and the context templates (:func:`begin`);
    2. each request's target at ``hooks`` of the last layer, under the editor's step budget
       (:func:`value_config`, :func:`optimise_targets` with ``optimise`` and ``reads``;
       progress bars ``desc``), stacked ``[n, d_model]``;
    3. ``covariances()``: what the solve needs of the unedited weights (C per layer, or
       AlphaEdit's projections);
    4. ``spread(requests, targets, templates, that)``: the factors per layer (the layer loop,
       :func:`attndrift.editing.layer_loop.spread`, with the editor's solve);
    5. the :class:`~attndrift.editing.edits.Edit` (:func:`finish`, editor ``name``).

    The clock's laps: ``templates``, ``value_steps`` (``value_steps_reused`` when every
    target came from ``memo``), ``covariance``, ``keys_and_solve``. ``title`` names the
    editor in messages.
    """
    requests = requests_of(requests, title)
    clock, templates = begin(model, cfg.layers, cfg, templates)
    value_cfg = value_config(cfg, sadr)
    results, reused = optimise_targets(
        model, requests, hooks, cfg.layers[-1], templates, cfg=value_cfg, sadr=sadr,
        progress=progress, desc=desc, memo=memo, optimise=optimise, reads=reads,
    )  # fmt: skip
    targets = torch.stack([x.target for x in results])  # [n, d_model]
    clock.lap("value_steps_reused" if reused else "value_steps")
    solve_with = covariances()
    clock.lap("covariance")
    factors = spread(requests, targets, templates, solve_with)
    clock.lap("keys_and_solve")
    return finish(
        model, name=name, cfg=cfg, sadr=sadr, requests=requests, layers=cfg.layers,
        factors=factors, results=results, clock=clock, n_templates=len(templates),
    )  # fmt: skip
