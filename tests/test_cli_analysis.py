import pandas as pd
import pytest

from attndrift import cli


@pytest.mark.parametrize("command", ["drift", "patch"])
def test_help(command, capsys):
    assert command in cli.COMMANDS
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--edit", "--layer", "--steps", "--identity-cov", "--record"):
        assert flag in out


def test_saved_edit_excludes_on_the_fly_options(tmp_path, capsys):
    args = [
        "patch",
        "--edit",
        str(tmp_path / "e.safetensors"),
        "--steps",
        "3",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(args) == 2
    assert "--steps: editor options apply to on-the-fly edits" in capsys.readouterr().err
    assert (
        cli.main(["drift", "--edit", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)])
        == 2
    )
    assert "edit file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_drift_then_patch_with_the_saved_edit(tmp_path, capsys):
    out = tmp_path / "drift"
    args = ["drift", "--device", "cpu", "--records", "0", "--identity-cov", "--steps", "3"]
    assert cli.main([*args, "--kinds", "DNS", "--heads", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "identity covariance" in printed and "drift factor" in printed
    table = pd.read_csv(out / "drift.csv")
    assert {"prompt", "layer", "head", "kl", "delta", "mass_delta"} <= set(table.columns)
    assert table.layer.nunique() == 30 and table["head"].nunique() == 9
    assert len(pd.read_csv(out / "probes.csv")) == table.prompt.nunique()
    assert "plotly" in (out / "drift.html").read_text()[:5_000_000].lower()

    patch_out = tmp_path / "patch"
    args = ["patch", "--device", "cpu", "--records", "0", "--edit", str(out / "edit.safetensors")]
    args += ["--components", "attn", "--positions", "0,5", "--window", "5", "--out", str(patch_out)]
    assert cli.main(args) == 0
    cells = pd.read_csv(patch_out / "patching.csv")
    assert len(cells) == 2 * 30 * 2  # directions x layers x positions
    assert set(cells.direction) == {"restore", "contaminate"} and set(cells.position) == {0, 5}
    assert (patch_out / "patching.html").stat().st_size > 1_000_000
