"""Settings: stable keys, the options each editor takes (from the registry), grids, and the
preset overrides of every field."""

import dataclasses
import re

import pytest

from attndrift.editing import memit, registry, setting
from attndrift.editing.alphaedit import AlphaEditConfig
from attndrift.editing.memit import MemitConfig
from attndrift.editing.pmet import PmetConfig
from attndrift.editing.rome import RomeConfig

#: (setting, its key): results files name their settings by these strings
KEYS = [
    ({}, "rome|g=0"),
    ({"sadr_gamma": 0.2, "all_heads": True, "steps": 80}, "rome|g=0.2|all|steps=80"),
    ({"r_rome": True, "layer": 3}, "rome|g=0|layer=3|r-rome"),
    (
        {"editor": "memit", "sadr_gamma": 0.005, "layers": (1, 2), "mom2_weight": 2000.0},
        "memit|g=0.005|layers=1,2|mom2_weight=2000",
    ),
    ({"editor": "pmet", "batch": 4, "cov_tokens": 4096}, "pmet|g=0|cov_tokens=4096|batch=4"),
    (
        {"editor": "alphaedit", "null_threshold": 0.01, "sequential": 10},
        "alphaedit|g=0|null_threshold=0.01|sequential=10",
    ),
    ({"editor": "memit", "batch": 1}, "memit|g=0"),  # a group of one is the plain edit
    (
        {
            "sadr_gamma": 0.1,
            "sadr_queries": "after_subject",
            "sadr_keys": "subject",
            "sadr_threshold": "own",
            "sadr_relations": True,
            "sadr_prompts": "both",
        },
        "rome|g=0.1|sadr_queries=after_subject|sadr_keys=subject|sadr_threshold=own|"
        "sadr_relations|sadr_prompts=both",
    ),
    (
        {
            "lr": 0.1,
            "weight_decay": 0.001,
            "clamp": 2.0,
            "kl_factor": 0.5,
            "early_stop": 0.01,
            "early_stop_on": "margin",
            "stop_margin": 1.5,
            "relation_kl": 0.3,
            "offtarget": 2.0,
        },
        "rome|g=0|lr=0.1|weight_decay=0.001|clamp=2|kl_factor=0.5|early_stop=0.01|"
        "early_stop_on=margin|relation_kl=0.3|stop_margin=1.5|offtarget=2",
    ),
    ({"identity_cov": True, "editor": "memit"}, "memit|g=0|identity_cov"),
]


@pytest.mark.parametrize(("fields", "key"), KEYS, ids=[k for _, k in KEYS])
def test_keys_are_stable_and_round_trip(fields, key):
    s = setting.Setting(**fields)
    assert s.key == key
    assert setting.Setting.from_dict(dataclasses.asdict(s)) == s


def test_from_dict_refuses_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown setting fields \['nope'\]"):
        setting.Setting.from_dict({"editor": "rome", "nope": 1})


#: every editor option given to every editor: the editors that take it, and otherwise the
#: one-line error
OPTIONS = {
    "layer": (2, {"rome"}, "layer applies to the rome editor only"),
    "layers": (
        (0, 1),
        {"memit", "pmet", "alphaedit"},
        "layers applies to the memit, pmet and alphaedit editors only",
    ),
    "r_rome": (True, {"rome"}, "r_rome applies to the rome editor only"),
    "mom2_weight": (10.0, {"memit", "pmet"}, "mom2_weight applies to the memit and pmet editors"),
    "null_threshold": (0.1, {"alphaedit"}, "null_threshold applies to the alphaedit editor only"),
    "identity_cov": (
        True,
        {"rome", "memit", "pmet"},
        "identity_cov does not apply to alphaedit (it projects onto C's null space)",
    ),
    "batch": (
        3,
        {"memit", "pmet", "alphaedit"},
        "batch editing needs a batch editor (memit, pmet, alphaedit)",
    ),
    "cov_tokens": (100, {"rome", "memit", "pmet", "alphaedit"}, ""),
}


@pytest.mark.parametrize("editor", registry.BUILTIN)
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_each_option_applies_to_the_editors_that_take_it(editor, option):
    value, takers, message = OPTIONS[option]
    if editor in takers:
        s = setting.Setting(editor=editor, **{option: value})
        assert getattr(s, option) == value
        assert setting.applies(registry.get(editor), option)
    else:
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            setting.Setting(editor=editor, **{option: value})


def test_refusals_name_the_counterpart_option():
    with pytest.raises(ValueError, match=r"^layer applies to the rome editor only \(memit takes "):
        setting.Setting(editor="memit", layer=1)
    with pytest.raises(ValueError, match=r"editors only \(rome takes layer\)$"):
        setting.Setting(layers=(1,))
    with pytest.raises(ValueError, match="editor must be one of 'rome', 'memit', 'pmet', 'alph"):
        setting.Setting(editor="nope")


def test_grid_leaves_each_option_to_the_editors_that_take_it():
    grid = setting.grid(
        editor=list(registry.BUILTIN),
        layer=[3],
        layers=[(1, 2)],
        r_rome=[True],
        mom2_weight=[5.0],
        null_threshold=[0.5],
        identity_cov=[True],
        sadr_gamma=[0.0, 0.1],
        all_heads=[True],
    )
    assert [s.key for s in grid] == [
        "rome|g=0|layer=3|identity_cov|r-rome",
        "rome|g=0.1|all|layer=3|identity_cov|r-rome",
        "memit|g=0|layers=1,2|mom2_weight=5|identity_cov",
        "memit|g=0.1|all|layers=1,2|mom2_weight=5|identity_cov",
        "pmet|g=0|layers=1,2|mom2_weight=5|identity_cov",
        "pmet|g=0.1|all|layers=1,2|mom2_weight=5|identity_cov",
        "alphaedit|g=0|layers=1,2|null_threshold=0.5",
        "alphaedit|g=0.1|all|layers=1,2|null_threshold=0.5",
    ]
    with pytest.raises(ValueError, match="editor must be one of"):
        setting.grid(editor=["nope"])


#: (setting fields, {config attribute path: value}): each override lands in the preset (of
#: GPT-J, whose presets differ from every value below) and changes nothing else
OVERRIDES = [
    ({"steps": 7}, {"value.steps": 7, "sadr_steps": None}),  # with or without SADR
    ({"lr": 0.3}, {"value.lr": 0.3}),
    ({"weight_decay": 0.2}, {"value.weight_decay": 0.2}),
    ({"clamp": 1.5}, {"value.clamp_norm_factor": 1.5}),
    ({"kl_factor": 0.4}, {"value.kl_factor": 0.4}),
    ({"early_stop": 0.02}, {"value.early_stop_loss": 0.02}),
    ({"early_stop_on": "nll"}, {"value.early_stop_on": "nll"}),
    ({"relation_kl": 0.5}, {"value.relation_kl": 0.5}),
    ({"stop_margin": 2.0}, {"value.stop_margin": 2.0}),
    ({"offtarget": 3.0}, {"value.offtarget": 3.0}),
    ({"layer": 0}, {"layer": 0}),
    ({"r_rome": True}, {"denominator": "mean_key"}),
    ({"identity_cov": True}, {"covariance": None}),
    ({"cov_tokens": 123}, {"covariance.n_tokens": 123}),
    ({"editor": "memit", "layers": (1,)}, {"layers": (1,)}),
    ({"editor": "memit", "mom2_weight": 9.0}, {"mom2_update_weight": 9.0}),
    ({"editor": "pmet", "mom2_weight": 9.0}, {"mom2_update_weight": 9.0}),
    ({"editor": "alphaedit", "null_threshold": 0.3}, {"null_threshold": 0.3}),
    ({"editor": "alphaedit", "steps": 3}, {"value.steps": 3}),
]


def _at(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(("fields", "changes"), OVERRIDES, ids=[str(f) for f, _ in OVERRIDES])
def test_each_field_overrides_the_preset(fields, changes):
    cfg = setting.Setting(**fields).config("gpt-j")
    preset = setting.Setting(editor=fields.get("editor", "rome")).config("gpt-j")
    for path, value in changes.items():
        assert _at(cfg, path) == value
        if not (path == "sadr_steps" and preset.sadr_steps is None):
            assert _at(preset, path) != value  # the preset had another value
    tops = {path.split(".")[0] for path in changes}
    assert dataclasses.replace(cfg, **{t: getattr(preset, t) for t in tops}) == preset


def test_config_is_the_registered_class_of_each_editor():
    classes = {"rome": RomeConfig, "memit": MemitConfig, "pmet": PmetConfig,
               "alphaedit": AlphaEditConfig}  # fmt: skip
    for name, cls in classes.items():
        cfg = setting.Setting(editor=name).config("tiny-gpt2")
        assert type(cfg) is cls and cfg == registry.get(name).preset("tiny-gpt2")
    with pytest.raises(ValueError, match="no MEMIT preset for 'some-unknown-model'"):
        setting.Setting(editor="memit").config("some-unknown-model")


def test_help_lists_the_registered_editors():
    (f,) = [f for f in dataclasses.fields(setting.Setting) if f.name == "editor"]
    assert f.metadata["help"] == "editor: rome, memit, pmet, alphaedit"


def test_the_former_editor_constants_read_the_registry():
    assert setting.EDITORS == ("rome", "memit", "pmet", "alphaedit")
    assert setting.RANGE_EDITORS == ("memit", "pmet", "alphaedit")
    assert setting.MOM2_EDITORS == ("memit", "pmet")
    assert setting.PRESET_OF["memit"] is memit.preset
    with pytest.raises(AttributeError):
        setting.NO_SUCH_NAME  # noqa: B018
