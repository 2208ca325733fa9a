"""The kit every editor shares (attndrift.editing.kit) and the presets' model-name matching
(attndrift.editing.registry.preset_for): pure pieces, checked without a model."""

import dataclasses

import pytest

from attndrift.editing import kit, memit, registry, rome
from attndrift.editing.sadr import SadrConfig
from tests.helpers import BATCH_REQUESTS, TEMPLATES


def test_filled_puts_the_prompt_in_every_template():
    assert kit.filled(TEMPLATES, "The Louvre is in") == [
        "The Louvre is in",
        "Once upon a time. The Louvre is in",
        "I think so. The Louvre is in",
    ]


@pytest.mark.parametrize(
    "sadr, name",
    [(None, "rome"), (SadrConfig(gamma=0.0), "rome"), (SadrConfig(gamma=0.1), "rome+sadr")],
)
def test_editor_name_marks_sadr_only_when_it_acts(sadr, name):
    assert kit.editor_name("rome", sadr) == name


def test_value_config_takes_the_sadr_step_budget_only_with_sadr():
    cfg = dataclasses.replace(rome.PRESETS["tiny"], sadr_steps=7)
    assert kit.value_config(cfg, None) is cfg.value
    assert kit.value_config(cfg, SadrConfig(gamma=0.0)) is cfg.value
    assert kit.value_config(cfg, SadrConfig(gamma=0.1)).steps == 7
    assert (
        kit.value_config(dataclasses.replace(cfg, sadr_steps=None), SadrConfig(gamma=0.1))
        is cfg.value
    )


def test_requests_of_needs_one():
    assert kit.requests_of(tuple(BATCH_REQUESTS), "MEMIT") == BATCH_REQUESTS
    with pytest.raises(ValueError, match="MEMIT needs at least one request"):
        kit.requests_of([], "MEMIT")


@pytest.mark.parametrize(
    "name, key",
    [
        ("tiny-llama", "tiny"),
        ("SmolLM2-135M", "smollm2-135m"),
        ("gpt2-xl", "gpt2-xl"),
        ("EleutherAI/gpt-j-6B", "gpt-j"),
        ("meta-llama/Meta-Llama-3-8B", "llama"),
    ],
)
def test_presets_are_matched_by_model_name(name, key):
    assert registry.preset_for(memit.PRESETS, name, "MEMIT") is memit.PRESETS[key]
    assert kit.preset_for is registry.preset_for  # the former name


def test_a_model_without_a_preset_is_refused_with_the_presets_there_are():
    with pytest.raises(ValueError, match=r"no ROME preset for 'gpt2'.*presets: \["):
        registry.preset_for(rome.PRESETS, "gpt2", "ROME")
