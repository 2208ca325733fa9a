"""Settings: one editor configuration, as a model's preset plus explicit overrides.

A :class:`Setting` names an editor and overrides any of its hyper-parameters; every field left
at ``None`` (or ``False``) keeps the model's documented preset (each editor's ``PRESETS``, e.g.
:data:`attndrift.editing.rome.PRESETS`). It is the one source of the editing options: the command
line derives ``edit``/``drift``/``patch``/``sweep``'s flags from its fields, a sweep stores it
with every result line, and its :attr:`Setting.key` names the line's setting (defaults left
out, e.g. ``rome|g=0.2|steps=80``).

What an editor is and which options it takes come from :mod:`attndrift.editing.registry`: the
options of :data:`EDITOR_OPTIONS` apply to the editors whose spec lists them, the others to every
editor but those whose spec refuses them.

:class:`Editor` makes edits for settings on one model, reusing context templates and
covariance statistics across records.
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformer_lens import HookedTransformer

from attndrift import checks
from attndrift.data import EditRequest
from attndrift.editing import covariance, kit, registry
from attndrift.editing.edits import Edit, add_to_weights
from attndrift.editing.sadr import SadrConfig
from attndrift.editing.value import StopOn

#: the options only some editors take: each editor's spec lists those it takes
#: (:attr:`attndrift.editing.registry.EditorSpec.takes`); the other options apply to every editor
#: but those whose spec refuses them (:attr:`attndrift.editing.registry.EditorSpec.refuses`)
EDITOR_OPTIONS = ("layer", "layers", "r_rome", "mom2_weight", "null_threshold")
#: an option an editor refuses may have a counterpart it takes (named in the error)
_COUNTERPART = {"layer": "layers", "layers": "layer"}
#: the SADR options (a γ = 0 setting takes none)
SADR_OPTIONS = ("all_heads", "sadr_queries", "sadr_keys", "sadr_threshold", "sadr_relations",
                "sadr_prompts")  # fmt: skip


def _opt(help: str, **kwargs):
    return field(default=kwargs.pop("default", None), metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class Setting:
    """An editor and its overrides of the model's preset (``None`` / ``False``: the preset's)."""

    editor: str = field(default="rome", metadata={"help": f"editor: {', '.join(registry.names())}"})
    sadr_gamma: float = field(default=0.0, metadata={"help": "SADR weight γ (0 = no SADR)"})
    all_heads: bool = field(default=False, metadata={"help": "SADR restrains every head"})
    sadr_queries: str | None = _opt("SADR variant: query rows restrained: last, after_subject")
    sadr_keys: str | None = _opt("SADR variant: attention measured to: subject_last, subject")
    sadr_threshold: str | None = _opt("SADR variant: a head is restrained above: layer_max, own")
    sadr_relations: bool = field(
        default=False, metadata={"help": "SADR variant: also restrain generic relation prompts"}
    )
    layer: int | None = _opt("ROME layer")
    layers: tuple[int, ...] | None = _opt("MEMIT / PMET / AlphaEdit layers, e.g. 4,5,6,7,8")
    steps: int | None = _opt("optimisation steps, with or without SADR (preset: its own budget)")
    lr: float | None = _opt("Adam learning rate of δ")
    weight_decay: float | None = _opt("weight of ‖δ‖ / ‖v_0‖² in the loss")
    clamp: float | None = _opt("‖δ‖ ≤ clamp · ‖v_0‖ (clamp_norm_factor)")
    kl_factor: float | None = _opt("weight of the essence KL term")
    early_stop: float | None = _opt("stop once the watched loss is below this")
    early_stop_on: str | None = _opt(
        "what early stopping watches: loss, nll, or margin (--stop-margin)"
    )
    mom2_weight: float | None = _opt("MEMIT / PMET λ in (λ C + K Kᵀ)")
    null_threshold: float | None = _opt(
        "AlphaEdit: eigenvalues of C below this span the null space the update is projected onto"
    )
    cov_tokens: int | None = _opt("tokens of the covariance corpus")
    identity_cov: bool = field(default=False, metadata={"help": "no C⁻¹ (quick and crude)"})
    r_rome: bool = field(default=False, metadata={"help": "r-ROME denominator (the mean key)"})
    batch: int | None = _opt("edit this many records at once (MEMIT, PMET, AlphaEdit)")
    sequential: int | None = _opt("edit this many records one after another, each edit on the "
                                  "weights the previous ones left")  # fmt: skip
    relation_kl: float | None = _opt(
        "variant: weight of a KL term keeping the next token after generic relation prompts of "
        "the subject (its other facts) at the unedited model's"
    )
    stop_margin: float | None = _opt(
        "variant (margin stop): stopping also needs the edit prompt's margin log P(o_new) − "
        "log P(o_true) to reach this (with --early-stop-on margin: the margin alone)"
    )
    offtarget: float | None = _opt(
        "variant: weight of a hinge on any rise of log P(o_new) after off-target prompts (the "
        "subject's other relations, and the edit sentence followed by other subjects' queries)"
    )
    sadr_prompts: str | None = _opt(
        "SADR variant: whose attention is restrained: rewrite (the paper), distractors (the edit "
        "sentence followed by other subjects' queries), both"
    )

    def __post_init__(self) -> None:
        checks.choice("editor", self.editor, registry.names())
        checks.number("sadr_gamma", self.sadr_gamma, low=0)
        variant = (self.sadr_queries, self.sadr_keys, self.sadr_threshold, self.sadr_prompts)
        if (self.all_heads or self.sadr_relations or any(variant)) and self.sadr_gamma == 0:
            raise ValueError("SADR options (all_heads, sadr_*) need sadr_gamma > 0")
        self.sadr()  # validates the SADR variant's names
        spec = registry.get(self.editor)
        for name in (*EDITOR_OPTIONS, *spec.refuses):
            if _given(getattr(self, name)) and not applies(spec, name):
                raise ValueError(_refusal(spec, name))
        bounds = {
            "layer": {"low": 0, "integer": True},
            "steps": {"low": 1, "integer": True},
            "lr": {"low": 0, "above": True},
            "weight_decay": {"low": 0},
            "clamp": {"low": 0, "above": True},
            "kl_factor": {"low": 0},
            "relation_kl": {"low": 0},
            "stop_margin": {},
            "offtarget": {"low": 0},
            "early_stop": {"low": 0},
            "mom2_weight": {"low": 0, "above": True},
            "null_threshold": {"low": 0, "above": True},
            "cov_tokens": {"low": 1, "integer": True},
            "batch": {"low": 1, "integer": True},
            "sequential": {"low": 1, "integer": True},
        }
        for name, kwargs in bounds.items():
            if getattr(self, name) is not None:
                checks.number(name, getattr(self, name), **kwargs)
        if self.layers is not None:
            for layer in self.layers:
                checks.number("layers", layer, low=0, integer=True)
        if self.early_stop_on is not None:
            checks.option("early_stop_on", self.early_stop_on, StopOn)
        if self.early_stop_on == "margin" and self.stop_margin is None:
            raise ValueError("early_stop_on margin needs stop_margin (the margin to reach)")
        if self.identity_cov and self.cov_tokens is not None:
            raise ValueError("identity_cov and cov_tokens exclude each other")
        if self.batch is not None and self.sequential is not None:
            raise ValueError("batch and sequential exclude each other")
        if self.batch is not None and self.batch > 1 and not spec.batch:
            batch_editors = ", ".join(s.name for s in registry.specs() if s.batch)
            raise ValueError(f"batch editing needs a batch editor ({batch_editors})")
        for name in ("batch", "sequential"):  # a group of one is the plain edit: one key
            if getattr(self, name) == 1:
                object.__setattr__(self, name, None)

    @property
    def group(self) -> int:
        """Records edited together (a batch) or in sequence (1: each on its own)."""
        return self.batch or self.sequential or 1

    @property
    def key(self) -> str:
        """Stable identifier, e.g. ``rome|g=0.01|all|steps=80`` (defaults left out)."""
        parts = [self.editor, f"g={self.sadr_gamma:g}"]
        if self.all_heads:
            parts.append("all")
        for f in dataclasses.fields(self):
            if f.name in ("editor", "sadr_gamma", "all_heads"):
                continue
            v = getattr(self, f.name)
            if v is None or v is False:
                continue
            if v is True:
                parts.append(f.name if f.name != "r_rome" else "r-rome")
            elif isinstance(v, tuple):
                parts.append(f"{f.name}={','.join(map(str, v))}")
            elif isinstance(v, float):
                parts.append(f"{f.name}={v:g}")
            else:
                parts.append(f"{f.name}={v}")
        return "|".join(parts)

    def sadr(self) -> SadrConfig | None:
        """SADR's config, or None when γ = 0."""
        if self.sadr_gamma == 0:
            return None
        variant = {
            "queries": self.sadr_queries,
            "keys": self.sadr_keys,
            "threshold": self.sadr_threshold,
            "prompts": self.sadr_prompts,
        }
        return SadrConfig(
            gamma=self.sadr_gamma,
            all_heads=self.all_heads,
            relation_prompts=self.sadr_relations,
            **{k: v for k, v in variant.items() if v is not None},
        )

    def config(self, model: HookedTransformer | str) -> kit.EditorConfig:
        """The editor's config (its registered class): the model's preset with this setting's
        overrides."""
        base = registry.get(self.editor).preset(model)
        value_changes = {
            name: getattr(self, attr)
            for name, attr in (
                ("lr", "lr"),
                ("weight_decay", "weight_decay"),
                ("clamp_norm_factor", "clamp"),
                ("kl_factor", "kl_factor"),
                ("relation_kl", "relation_kl"),
                ("stop_margin", "stop_margin"),
                ("offtarget", "offtarget"),
                ("early_stop_loss", "early_stop"),
                ("early_stop_on", "early_stop_on"),
            )
            if getattr(self, attr) is not None
        }
        changes: dict = {}
        if self.steps is not None:  # whichever of value.steps / sadr_steps applies
            value_changes["steps"] = self.steps
            changes["sadr_steps"] = None
        if value_changes:
            changes["value"] = dataclasses.replace(base.value, **value_changes)
        if self.layer is not None:
            changes["layer"] = self.layer
        if self.layers is not None:
            changes["layers"] = self.layers
        if self.r_rome:
            changes["denominator"] = "mean_key"
        if self.mom2_weight is not None:
            changes["mom2_update_weight"] = self.mom2_weight
        if self.null_threshold is not None:
            changes["null_threshold"] = self.null_threshold
        if self.identity_cov:
            changes["covariance"] = None
        elif self.cov_tokens is not None and base.covariance is not None:
            changes["covariance"] = dataclasses.replace(base.covariance, n_tokens=self.cov_tokens)
        return dataclasses.replace(base, **changes)

    @classmethod
    def from_dict(cls, values: dict) -> "Setting":
        """The setting stored in a results line (``dataclasses.asdict`` of one)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown setting fields {sorted(unknown)}")
        v = dict(values)
        if v.get("layers") is not None:
            v["layers"] = tuple(v["layers"])
        return cls(**v)


def grid(**options: Sequence) -> list[Setting]:
    """Every combination of the given field values, e.g. ``grid(sadr_gamma=[0, 0.2],
    steps=[20, 80])``; a field given one value applies to all. Settings that are invalid for
    their editor (e.g. ``layer`` with MEMIT) leave that field to the editor that takes it, and
    the γ = 0 settings (the baselines) drop the SADR-only fields."""
    names = list(options)
    combos: list[dict] = [{}]
    for name in names:
        combos = [c | {name: v} for c in combos for v in options[name]]
    out: list[Setting] = []
    for c in combos:
        spec = _spec_or_none(c.get("editor", "rome"))
        if spec is not None:  # each option left to the editors that take it
            c = {k: v for k, v in c.items() if applies(spec, k)}
        if not c.get("sadr_gamma"):  # the γ = 0 baseline: no SADR-only field
            c = {k: v for k, v in c.items() if k not in SADR_OPTIONS}
        s = Setting(**c)
        if s not in out:
            out.append(s)
    return out


def applies(spec: registry.EditorSpec, option: str) -> bool:
    """Whether the editor of ``spec`` takes the setting ``option`` (a field name)."""
    if option in EDITOR_OPTIONS:
        return option in spec.takes
    return option not in spec.refuses


def _given(value) -> bool:
    return value is not None and value is not False


def _refusal(spec: registry.EditorSpec, option: str) -> str:
    """The error of a setting that gives ``option`` to an editor that does not take it."""
    if option in spec.refuses:
        return f"{option} does not apply to {spec.name} ({spec.refuses[option]})"
    takers = [s.name for s in registry.specs() if option in s.takes]
    if not takers:
        which = "no registered editor"
    elif len(takers) == 1:
        which = f"the {takers[0]} editor"
    else:
        which = f"the {', '.join(takers[:-1])} and {takers[-1]} editors"
    other = _COUNTERPART.get(option)
    instead = f" ({spec.name} takes {other})" if other is not None and other in spec.takes else ""
    return f"{option} applies to {which} only{instead}"


def _spec_or_none(name: str) -> registry.EditorSpec | None:
    try:
        return registry.get(name)
    except ValueError:  # Setting's own check names the problem
        return None


class Editor:
    """Makes edits for settings on one model, reusing context templates, covariances and the
    optimised targets of MEMIT, PMET and AlphaEdit (:class:`attndrift.editing.kit.TargetMemo`)."""

    def __init__(self, model: HookedTransformer, progress: bool = False):
        self.model, self.progress = model, progress
        self._templates: dict = {}
        self._covs: dict = {}
        self.memo = kit.TargetMemo()

    def templates(self, cfg) -> tuple[str, ...]:
        if cfg.templates not in self._templates:
            self._templates[cfg.templates] = kit.context_templates(self.model, cfg.templates)
        return self._templates[cfg.templates]

    def covariance(self, cfg, layer: int):
        """C of ``layer`` under ``cfg.covariance`` (None: the identity), cached."""
        if cfg.covariance is None:
            return None
        key = (layer, cfg.covariance)
        if key not in self._covs:
            self._covs[key] = covariance.layer_covariance(
                self.model, layer, cfg.covariance, progress=self.progress
            )
        return self._covs[key]

    def _covariances(self, spec: registry.EditorSpec, cfg) -> dict:
        """C of every layer ``cfg`` edits (the identity's left out)."""
        covs = {layer: self.covariance(cfg, layer) for layer in spec.layers(cfg)}
        return {k: v for k, v in covs.items() if v is not None}

    def sequence(self, setting: Setting, requests: Sequence[EditRequest]) -> list[Edit]:
        """Edits of ``requests`` one after another, each computed on the weights the previous
        ones left and added to them (the caller restores the weights: ``edits.restored``).
        An editor with state (AlphaEdit: the previous edits' keys) carries it from one edit
        to the next (:attr:`attndrift.editing.registry.EditorSpec.edit_in_sequence`)."""
        out, state = [], None
        spec, cfg = registry.get(setting.editor), setting.config(self.model)
        for request in requests:
            if spec.edit_in_sequence is not None:
                covs = self._covariances(spec, cfg)
                e, state = spec.edit_in_sequence(
                    self.model, [request], cfg, state=state, sadr=setting.sadr(), covs=covs,
                    templates=self.templates(cfg), progress=self.progress, memo=self.memo,
                )  # fmt: skip
            else:
                e = self(setting, [request])
            add_to_weights(self.model, e)
            out.append(e)
        return out

    def __call__(self, setting: Setting, requests: Sequence[EditRequest]) -> Edit:
        spec, cfg = registry.get(setting.editor), setting.config(self.model)
        templates = self.templates(cfg)
        return spec.edit(
            self.model,
            requests,
            cfg,
            sadr=setting.sadr(),
            covs=self._covariances(spec, cfg),
            templates=templates,
            progress=self.progress,
            memo=self.memo,
        )


def __getattr__(name: str):
    """The former editor constants, now read from the registry: ``EDITORS`` (every registered
    editor), ``RANGE_EDITORS`` (those editing a range of layers), ``MOM2_EDITORS`` (those
    taking MEMIT's λ), ``PRESET_OF`` (editor -> its preset function)."""
    specs = registry.specs()
    if name == "EDITORS":
        return tuple(s.name for s in specs)
    if name == "RANGE_EDITORS":
        return tuple(s.name for s in specs if "layers" in s.takes)
    if name == "MOM2_EDITORS":
        return tuple(s.name for s in specs if "mom2_weight" in s.takes)
    if name == "PRESET_OF":
        return {s.name: s.preset for s in specs}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
