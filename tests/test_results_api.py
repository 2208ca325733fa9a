"""Results to compute with: concise reprs, named cells, and tables without all-NaN columns."""

import dataclasses

import numpy as np
import pytest

from attndrift.analysis import drift, patching, tracing
from attndrift.editing import rome, sadr
from tests.helpers import NEW, PROMPT, PROMPTS, REQUEST, SUBJECTS, TRUE, edited

REQ = REQUEST


@pytest.fixture(scope="module")
def edit(tiny_llama):
    cfg = dataclasses.replace(rome.preset(tiny_llama), covariance=None)
    return rome.edit(tiny_llama, REQ, cfg, templates=("{}",), sadr=sadr.SadrConfig(gamma=0.5))


def test_edit_and_its_run_print_in_one_line(edit, tiny_llama):
    text = repr(edit)
    assert "\n" not in text and len(text) < 200 and "tensor" not in text
    assert text.startswith("Edit(rome+sadr on tiny")
    assert "layer 1" in text and "'Eiffel Tower': 'Paris' → 'Rome'" in text
    assert f"{edit.run.steps_run} steps" in text
    run = repr(edit.run)
    assert "tensor" not in run and run.startswith("EditRun(RomeConfig, SADR γ=0.5, steps run")


def test_step_log_prints_its_terms(edit):
    step = edit.run.final
    text = repr(step)
    assert text.startswith(f"StepLog(step {step.step}: loss {step.loss:.4g}")
    assert f"P(o_new) {step.p_new:.3f}" in text and "heads restrained" in text
    assert "\n" not in text and len(text) < 200


def test_drift_knows_its_edit_and_model_and_prints_briefly(tiny_llama):
    d = drift.measure(tiny_llama, edited(tiny_llama), PROMPTS, SUBJECTS)
    assert d.model == tiny_llama.cfg.model_name and d.edit == ""
    named = dataclasses.replace(edited(tiny_llama), name="ROME")
    d = drift.measure(tiny_llama, named, PROMPTS, SUBJECTS)
    assert d.edit == "ROME"
    text = repr(d)
    assert text.startswith(f"Drift(ROME on {tiny_llama.cfg.model_name}: {len(PROMPTS)} prompts")
    assert f"mean drift factor {float(d.factor().mean()):.3f}" in text
    assert "tensor" not in text and "\n" not in text


def test_patching_best_is_a_named_cell_and_frame_has_no_empty_columns(tiny_llama):
    r = patching.restore(tiny_llama, edited(tiny_llama), PROMPT, TRUE, NEW)
    best = r.best("mlp")
    assert isinstance(best, patching.Cell)
    layer, position, value = best  # still unpacks as before
    assert (best.layer, best.position, best.value) == (layer, position, value)
    assert value == pytest.approx(float(r.p_true[1].max()))
    table = r.frame()
    assert not {"p_true_full", "p_new_full", "custom"} & set(table.columns)
    assert not table.isna().all().any()
    e = edited(tiny_llama)
    full = patching.restore(
        tiny_llama, e, PROMPT, TRUE, NEW, full_answer=True, metric=lambda x: x[:, 0]
    )
    assert {"p_true_full", "p_new_full", "custom"} <= set(full.frame().columns)
    text = repr(r)
    assert "tensor" not in text and text.startswith("Patching(restore, attn/mlp")


def test_tracing_best_is_a_named_cell(tiny_llama):
    t = tracing.trace(tiny_llama, PROMPT, "Eiffel Tower", TRUE, samples=2)
    best = t.best("mlp")
    assert isinstance(best, patching.Cell)
    assert best.value == pytest.approx(float(np.nanmax(t.indirect[t.components.index("mlp")])))
    assert "tensor" not in repr(t)
