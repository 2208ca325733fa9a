"""The editor registry: a new editor is one module plus one registry line.

A toy editor, defined and registered here and nowhere else (minimum-norm least squares on
the batch editors' spine and layer loop), gets the command line's flags, sweep settings,
save/load of its edits and the applicability checks of every option, without any other
module knowing it; it is unregistered afterwards.
"""

import dataclasses
import json
from dataclasses import dataclass, field

import pytest
import torch

from attndrift import cli, data, models
from attndrift.editing import edits, kit, layer_loop, registry, setting
from attndrift.editing.kit import EditorConfig, TemplateConfig
from attndrift.editing.value import ValueConfig
from attndrift.experiments import results, sweep
from tests.helpers import BATCH_REQUESTS as REQS

# ------------------------------------------------------------------------ the toy editor module


@dataclass(frozen=True, kw_only=True)
class ToyConfig(EditorConfig):
    """The toy's config: its layers and the common fields (no covariance: C = I)."""

    layers: tuple[int, ...]
    value: ValueConfig = field(default_factory=lambda: ValueConfig(steps=3))
    covariance: None = None


TOY_PRESETS = {
    "tiny": ToyConfig(layers=(0, 1), templates=TemplateConfig(lengths=((3, 1),))),
}


def toy_preset(model):
    return kit.preset_for(TOY_PRESETS, model, "Toy")


def toy_edit(model, requests, cfg=None, *, sadr=None, covs=None, templates=None, progress=False,
             memo=None):  # fmt: skip
    """MEMIT's z and layer loop with the minimum-norm solve ``K (KᵀK)⁻¹`` (λ → 0)."""
    cfg = cfg or toy_preset(model)
    z_name = models.resid_post_hook(cfg.layers[-1])

    def min_norm(layer, keys):
        return torch.linalg.solve(keys.T @ keys, keys.T).T

    def spread(requests, z, templates, _):
        return layer_loop.spread(model, requests, z, hook=z_name, layers=cfg.layers,
                                 templates=templates, solve=min_norm)[0]  # fmt: skip

    return kit.batch_edit(
        model, requests, cfg, name="toy", title="Toy", hooks=z_name, desc="toy z", sadr=sadr,
        templates=templates, progress=progress, memo=memo, covariances=lambda: None,
        spread=spread,
    )  # fmt: skip


TOY = registry.EditorSpec(
    name="toy",
    config=ToyConfig,
    presets=TOY_PRESETS,
    preset=toy_preset,
    edit=toy_edit,
    takes={"layers"},
    refuses={"cov_tokens": "the toy reads no covariance"},
)

# ----------------------------------------------------------------------------------- the tests


@pytest.fixture
def toy():
    """The toy editor, registered for one test (the one registry line), then removed."""
    registry.register(TOY)
    try:
        yield TOY
    finally:
        registry.unregister("toy")
    assert "toy" not in registry.names()


def test_builtin_editors_are_registered_in_order():
    assert registry.names() == ("rome", "memit", "pmet", "alphaedit")
    assert registry.names() == registry.BUILTIN
    for spec in registry.specs():
        assert registry.get(spec.name) is spec
        assert registry.config_class(spec.config.__name__) is spec.config
        assert spec.takes <= set(setting.EDITOR_OPTIONS)  # the options it names exist
    assert {s.name for s in registry.specs() if s.edit_in_sequence} == {"alphaedit"}
    assert [s.name for s in registry.specs() if not s.batch] == ["rome"]


def test_registry_refuses_clashes_and_unknown_names(toy):
    with pytest.raises(ValueError, match="unknown editor 'nope': expected one of rome, "):
        registry.get("nope")
    with pytest.raises(ValueError, match="unknown editor config 'NopeConfig'"):
        registry.config_class("NopeConfig")
    with pytest.raises(ValueError, match="'rome' is already registered"):
        registry.register(dataclasses.replace(TOY, name="rome"))
    with pytest.raises(ValueError, match="'RomeConfig' is taken by 'rome'"):
        from attndrift.editing.rome import RomeConfig

        registry.register(dataclasses.replace(TOY, name="toy2", config=RomeConfig))
    with pytest.raises(ValueError, match="must be an identifier"):
        dataclasses.replace(TOY, name="toy editor")
    with pytest.raises(ValueError, match="built-in"):
        registry.unregister("rome")
    with pytest.raises(ValueError, match="no editor named 'toy2'"):
        registry.unregister("toy2")


def test_toy_settings_and_applicability(toy, tiny_llama):
    assert registry.names()[-1] == "toy"
    s = setting.Setting(editor="toy", layers=(1,), steps=2)
    assert s.key == "toy|g=0|layers=1|steps=2"
    cfg = s.config(tiny_llama)
    assert isinstance(cfg, ToyConfig) and cfg.layers == (1,) and cfg.value.steps == 2
    assert setting.Setting.from_dict(dataclasses.asdict(s)) == s
    refused = [
        ({"layer": 1}, r"^layer applies to the rome editor only \(toy takes layers\)$"),
        ({"mom2_weight": 1.0}, r"^mom2_weight applies to the memit and pmet editors only$"),
        ({"r_rome": True}, r"^r_rome applies to the rome editor only$"),
        ({"cov_tokens": 10}, r"^cov_tokens does not apply to toy \(the toy reads no covar"),
    ]
    for given, message in refused:
        with pytest.raises(ValueError, match=message):
            setting.Setting(editor="toy", **given)
    # the toy's options reach the other editors' messages too
    with pytest.raises(ValueError, match="memit, pmet, alphaedit and toy editors only"):
        setting.Setting(editor="rome", layers=(1,))
    assert setting.Setting(editor="toy", batch=2).group == 2  # a batch editor
    # a grid leaves each option to the editors that take it
    grid = setting.grid(editor=["rome", "toy"], layer=[1], layers=[(0, 1)], cov_tokens=[99])
    assert [x.key for x in grid] == ["rome|g=0|layer=1|cov_tokens=99", "toy|g=0|layers=0,1"]


def test_toy_edits_through_the_editor_and_save_and_load(toy, tiny_llama, tmp_path):
    editor = setting.Editor(tiny_llama)
    s = setting.Setting(editor="toy", steps=3)
    e = editor(s, REQS)
    assert e.editor == "toy" and e.layers == (0, 1) and e.left[0].shape[1] == len(REQS)
    assert [k for k, _ in e.run.timings] == [
        "templates",
        "value_steps",
        "covariance",
        "keys_and_solve",
    ]
    # with the bare prompt as the only template, the minimum-norm solve moves the last
    # layer's residual at the subjects to z exactly
    exact = toy_edit(tiny_llama, REQS, s.config(tiny_llama), templates=("{}",))
    z_name = models.resid_post_hook(1)
    prompts, subjects = [r.prompt for r in REQS], [r.subject for r in REQS]
    with edits.applied(tiny_llama, exact):
        now = kit.keys_at_subject(tiny_llama, prompts, subjects, [z_name], 2)[z_name]
    torch.testing.assert_close(now, torch.stack(exact.run.targets), rtol=1e-4, atol=1e-4)
    # saved with its config class name, loaded back through the registry
    path = e.save(tmp_path / "toy.safetensors")
    back = edits.Edit.load(path)
    assert back.run.config == e.run.config and isinstance(back.run.config, ToyConfig)
    for a, b in zip((*e.left, *e.right), (*back.left, *back.right), strict=True):
        assert torch.equal(a, b)
    # a sequence is the edit repeated (no state to carry)
    with edits.restored(tiny_llama, e.layers):
        seq = editor.sequence(setting.Setting(editor="toy", steps=3, sequential=2), REQS)
    assert [x.requests for x in seq] == [(REQS[0],), (REQS[1],)]


def test_toy_on_the_command_line_and_in_a_sweep(toy, tiny_llama, tmp_path, capsys):
    out = tmp_path / "edit.safetensors"
    r = REQS[0]
    status = cli.main(
        ["edit", "--model", "tiny-llama", "--device", "cpu", "--editor", "toy", "--layers", "1",
         "--steps", "2", "--subject", r.subject, "--prompt", r.prompt, "--true", r.target_true,
         "--new", r.target_new, "--out", str(out)]
    )  # fmt: skip
    assert status == 0 and "with toy (layers [1]" in capsys.readouterr().out
    assert edits.Edit.load(out).run.config.layers == (1,)
    # a setting the toy refuses is a one-line error of the command line
    bad = ["edit", "--model", "tiny-llama", "--editor", "toy", "--cov-tokens", "5", "--record", "0"]
    assert cli.main(bad) == 2
    assert "cov_tokens does not apply to toy" in capsys.readouterr().err
    # a sweep stores the toy's setting with its lines and reads it back
    records = data.load_embedded().select(limit=2)
    settings = [setting.Setting(editor="toy", steps=2), setting.Setting(editor="toy", steps=2,
                                                                        batch=2)]  # fmt: skip
    path = sweep.run(tiny_llama, records, settings, tmp_path / "r.jsonl", progress=False)
    lines = results.read(path)
    assert {(x.setting.key, x.editor) for x in lines} == {
        ("toy|g=0|steps=2", "toy"),
        ("toy|g=0|steps=2|batch=2", "toy"),
    }
    first = json.loads(path.read_text().splitlines()[0])
    assert first["settings"]["editor"] == "toy" and first["setting"].startswith("toy|")


def _imports(module) -> set[str]:
    """The attndrift modules a module's source imports (anywhere in it, functions too)."""
    import ast
    import inspect

    found = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attndrift"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("attndrift")}
    return found


def test_no_import_circle_through_the_registry():
    # the registry imports no part of attndrift, and edits (which every editor imports) reads
    # saved config classes from the registry instead of importing the editors
    assert _imports(registry) == set()
    editor_modules = {f"attndrift.editing.{name}" for name in registry.BUILTIN}
    assert not _imports(edits) & editor_modules
    assert "attndrift.editing.registry" in _imports(edits)
