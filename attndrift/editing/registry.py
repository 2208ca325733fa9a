"""The editor registry: everything the rest of attndrift needs to know about an editor.

Each editor module ends with one line, ``registry.register(EditorSpec(...))``: its name, its
config class, its presets, how to call it, and which of the editor options of
:class:`attndrift.editing.setting.Setting` it takes. Everything else reads the registry:

* :class:`attndrift.editing.setting.Setting` checks a setting's editor and options against it, takes
  the model's preset from it, and :func:`attndrift.editing.setting.grid` leaves each option to the
  editors that take it;
* :class:`attndrift.editing.setting.Editor` calls the editor through it (one edit, or a sequence);
* the command line's ``--editor`` and the sweeps accept every registered name;
* :meth:`attndrift.editing.edits.Edit.load` maps a saved ``config_type`` back to its class.

So a new editor is one module plus one line here (:data:`BUILTIN`, for an editor shipped with
attndrift), or, for one's own editor, the module alone: importing it registers it.

This module imports no other part of attndrift (the editors import it), so nothing here can
close an import circle.
"""

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, TypeVar

from transformer_lens import HookedTransformer

#: the editors shipped with attndrift (modules of attndrift.editing), in the order the command line
#: and messages list them; each registers itself when imported, which :func:`specs` makes sure of
BUILTIN = ("rome", "memit", "pmet", "alphaedit")


C = TypeVar("C")

#: model-name patterns and the preset each selects, tried in order (tiny test models first)
PRESET_KEYS = (("smollm2", "smollm2-135m"), ("gpt2-xl", "gpt2-xl"), ("gpt-j", "gpt-j"),
               ("llama", "llama"))  # fmt: skip


def preset_for(presets: Mapping[str, C], model: HookedTransformer | str, editor: str) -> C:
    """The documented default config of ``editor`` for a model (by name) from its ``presets``;
    a ValueError naming the presets there are otherwise."""
    name = model if isinstance(model, str) else model.cfg.model_name
    key = name.lower()
    found = "tiny" if key.startswith("tiny") else next((k for p, k in PRESET_KEYS if p in key), "")
    if found not in presets:
        raise ValueError(
            f"no {editor} preset for {name!r}: pass a config (presets: {sorted(presets)})"
        )
    return presets[found]


def _range_layers(cfg: Any) -> tuple[int, ...]:
    return tuple(cfg.layers)


@dataclass(frozen=True)
class EditorSpec:
    """What attndrift knows about one editor.

    Attributes:
        name: the editor's name in a :class:`~attndrift.editing.setting.Setting` (``--editor``).
        config: its config class (a frozen dataclass with the fields of
            :class:`attndrift.editing.kit.EditorConfig`); an edit file saves its class name.
        presets: the documented default configs, by model family (``"gpt-j"``, ``"tiny"``…).
        preset: ``preset(model or model name) -> config``: the default config of a model.
        edit: ``edit(model, requests, cfg, *, sadr, covs, templates, progress, memo) -> Edit``:
            one edit of the requests (``covs``: C per edited layer, where not the identity;
            ``memo``: an :class:`attndrift.editing.kit.TargetMemo` it may reuse targets from).
        edit_in_sequence: for an editor that carries state from one edit of a sequence to the
            next (AlphaEdit's projections and earlier keys), ``edit_in_sequence(model,
            requests, cfg, *, state, sadr, covs, templates, progress, memo) -> (Edit, state)``
            (``state=None`` on the first edit); None: a sequence is repeated :attr:`edit`.
        takes: the options of :data:`attndrift.editing.setting.EDITOR_OPTIONS` that this editor
            takes (e.g. ``{"layers", "mom2_weight"}``); the others are refused.
        refuses: options every editor takes unless refused here, each with the reason (e.g.
            ``{"identity_cov": "it projects onto C's null space"}``).
        batch: whether it edits several requests at once (``--batch``).
        layers: ``layers(cfg)``: the layers a config edits (default: ``cfg.layers``), whose
            covariances :class:`attndrift.editing.setting.Editor` computes and shares.
    """

    name: str
    config: type
    presets: Mapping[str, Any]
    preset: Callable[..., Any]
    edit: Callable[..., Any]
    edit_in_sequence: Callable[..., tuple[Any, Any]] | None = None
    takes: AbstractSet[str] = frozenset()  # kept as a frozenset
    refuses: Mapping[str, str] = field(default_factory=dict)
    batch: bool = True
    layers: Callable[[Any], tuple[int, ...]] = _range_layers

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"an editor's name must be an identifier, got {self.name!r}")
        if not (isinstance(self.config, type) and dataclasses.is_dataclass(self.config)):
            raise ValueError(
                f"editor {self.name!r}: config must be a dataclass, got {self.config!r}"
            )
        object.__setattr__(self, "takes", frozenset(self.takes))


_SPECS: dict[str, EditorSpec] = {}


def register(spec: EditorSpec) -> EditorSpec:
    """Add an editor (its module's last line). Registering the same name again replaces the
    entry only with an equal spec's config class (a module imported twice, e.g. reloaded);
    another editor of that name, or another editor saving the same config class name, is a
    ValueError."""
    old = _SPECS.get(spec.name)
    if old is not None and old.config.__qualname__ != spec.config.__qualname__:
        raise ValueError(f"an editor named {spec.name!r} is already registered")
    clash = [
        s.name
        for s in _SPECS.values()
        if s.name != spec.name and s.config.__name__ == spec.config.__name__
    ]
    if clash:
        raise ValueError(
            f"editor {spec.name!r}: config class name {spec.config.__name__!r} is taken by "
            f"{clash[0]!r} (edit files save it)"
        )
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove an editor registered by :func:`register` (not a built-in one)."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in editor")
    if _SPECS.pop(name, None) is None:
        raise ValueError(f"no editor named {name!r} is registered")


def _load_builtin() -> None:
    for name in BUILTIN:
        if name not in _SPECS:
            importlib.import_module(f"attndrift.editing.{name}")  # registers itself


def specs() -> tuple[EditorSpec, ...]:
    """Every registered editor: the built-in ones in :data:`BUILTIN` order, then the others in
    the order they were registered."""
    _load_builtin()
    order = [*BUILTIN, *(n for n in _SPECS if n not in BUILTIN)]
    return tuple(_SPECS[n] for n in order)


def names() -> tuple[str, ...]:
    """The names of every registered editor (:func:`specs` order)."""
    return tuple(s.name for s in specs())


def get(name: str) -> EditorSpec:
    """The editor named ``name``; a ValueError naming the registered ones otherwise."""
    _load_builtin()
    if name not in _SPECS:
        raise ValueError(f"unknown editor {name!r}: expected one of {', '.join(names())}")
    return _SPECS[name]


def config_class(type_name: str) -> type:
    """The config class saved as ``type_name`` (e.g. ``"MemitConfig"``) in an edit file."""
    for spec in specs():
        if spec.config.__name__ == type_name:
            return spec.config
    known = ", ".join(s.config.__name__ for s in specs())
    raise ValueError(f"unknown editor config {type_name!r} (known: {known})")
