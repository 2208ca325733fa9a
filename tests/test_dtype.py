"""Half-precision weights (``--dtype``): edits, drift and patching tables against float32.

Stated tolerances (tiny random models of three architectures, measured at most 0.072 / 0.004
relative for the edits, 0.009 absolute for the drift factors, 0.033 for the recoveries):

* a ROME+SADR edit: the rank-one weight change ``left @ right`` within 10 % (bfloat16) and 1 %
  (float16) of float32's, relative Frobenius norm; δ and v* are float32 in every case;
* the drift table: every per-layer drift factor ranks the (prompt, layer) cells as in
  float32 (Spearman >= 0.99), the factors agree to 0.02;
* the patching table: the cells whose float32 recovery is at least 5 % of the largest rank
  alike (Spearman >= 0.9), the five best cells are the same, recoveries agree to 0.05.
"""

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats

from attndrift import cli, models
from attndrift.analysis import drift, patching
from attndrift.editing import edits, rome, sadr
from tests.helpers import DEVICE, NEW, PROMPT, PROMPTS, REQUEST, SUBJECTS, TRUE, random_edit

HALF = {"bfloat16": (torch.bfloat16, 0.1), "float16": (torch.float16, 0.01)}


def _pair(arch: str, dtype: torch.dtype):
    return models.tiny_model(arch, device=DEVICE), models.tiny_model(
        arch, device=DEVICE, dtype=dtype
    )


@pytest.mark.parametrize("half", sorted(HALF))
@pytest.mark.parametrize("arch", models.TINY_ARCHS)
def test_half_precision_edits_agree_with_float32(arch, half):
    dtype, tolerance = HALF[half]
    full, low = _pair(arch, dtype)
    assert low.W_E.dtype == dtype and models.fingerprint(low) != models.fingerprint(full)
    cfg = rome.preset(full)
    cfg = dataclasses.replace(cfg, covariance=None, value=dataclasses.replace(cfg.value, steps=10))
    made = {}
    for name, model in (("full", full), ("low", low)):
        e = rome.edit(model, REQUEST, cfg, templates=("{}", "A. {}"), sadr=sadr.SadrConfig(0.1))
        assert e.run.steps_run == 10
        made[name] = (e.left[0].float() @ e.right[0].float(), e)
    (w32, _), (w16, e16) = made["full"], made["low"]
    assert e16.left[0].dtype == dtype  # applied to the model's weights in their dtype
    assert ((w16 - w32).norm() / w32.norm()).item() <= tolerance
    with edits.applied(low, e16):
        assert models.mlp_out_weight(low, e16.layers[0]).dtype == dtype


def test_delta_and_its_optimiser_stay_float32():
    from attndrift.editing import value

    low = models.tiny_model("llama", device=DEVICE, dtype=torch.bfloat16)
    objective = value.ValueObjective(
        low, REQUEST, models.mlp_out_hook(1), 1, ("{}", "A. {}"), value.ValueConfig(steps=3),
        sadr.SadrConfig(1.0),
    )  # fmt: skip
    result = value.optimise_value(objective)
    assert objective.init.dtype == result.delta.dtype == torch.float32
    assert objective.vanilla_rows.dtype == torch.float32
    double = models.tiny_model("llama", device=DEVICE, dtype=torch.float64)
    objective = value.ValueObjective(
        double, REQUEST, models.mlp_out_hook(1), 1, ("{}",), value.ValueConfig(steps=2)
    )
    assert objective.init.dtype == torch.float64  # never lowered


@pytest.mark.parametrize("half", sorted(HALF))
@pytest.mark.parametrize("arch", models.TINY_ARCHS)
def test_drift_and_patching_tables_rank_alike(arch, half):
    dtype, _ = HALF[half]
    tables = []
    for model in _pair(arch, dtype):
        variant = models.Variant(model, random_edit(model).hooks(model))
        d = drift.measure(model, variant, PROMPTS, SUBJECTS)
        p = patching.patch(model, variant, PROMPT, TRUE, NEW, direction="restore")
        tables.append((d, p.recovery.float().cpu().flatten().numpy()))
    (d32, r32), (d16, r16) = tables
    f32 = d32.factor_per_layer().float().cpu().flatten().numpy()
    f16 = d16.factor_per_layer().float().cpu().flatten().numpy()
    assert stats.spearmanr(f32, f16).statistic >= 0.99
    np.testing.assert_allclose(f16, f32, atol=0.02)
    big = np.abs(r32) >= 0.05 * np.nanmax(np.abs(r32))
    assert big.sum() >= 5
    assert stats.spearmanr(r32[big], r16[big]).statistic >= 0.9
    assert set(np.argsort(-r32)[:5]) == set(np.argsort(-r16)[:5])
    np.testing.assert_allclose(r16, r32, atol=0.05)


def test_command_line_dtype(tmp_path, capsys):
    out = tmp_path / "edit.safetensors"
    args = ["edit", "--model", "tiny-llama", "--device", DEVICE, "--dtype", "bfloat16",
            "--record", "0", "--identity-cov", "--steps", "3", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    assert edits.Edit.load(out).left[0].dtype == torch.bfloat16
    with pytest.raises(SystemExit):
        cli.main([*args[:5], "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err
