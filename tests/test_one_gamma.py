"""One γ: SmolLM2's SADR setting is written once, in its preset (``attndrift.editing.sadr``); the
README, the demo and the notebooks take it from there, and any other γ they write is one of the
embedded model's presets (a results table names the setting it shows), explained where it stands
(the paper's GPT-J setting) or is 0 (no SADR)."""

import json
import re
from pathlib import Path

import pytest

from attndrift import models
from attndrift.editing import sadr
from attndrift.experiments import demo

ROOT = Path(__file__).resolve().parents[1]
#: a γ written as a number: ``γ = 0.2``, ``gamma=0.2``, ``sadr_gamma=0.2``, ``--sadr-gamma 0,0.2``,
#: ``SadrConfig(0.2)``, a setting key's ``g=0.2``
LITERAL = re.compile(
    r"(?:γ\*?|\bgamma|sadr_gamma|--sadr-gamma|SadrConfig\(|\|g)\s*(?:=|:|\s)?\s*"
    r"(\d+(?:\.\d+)?(?:\s*,\s*\d+(?:\.\d+)?)*)"
)
#: what explains a γ other than the preset's where it is written
EXPLAINED = re.compile(r"paper|gpt-j", re.IGNORECASE)


def blocks() -> list[tuple[str, str]]:
    """``(where, text)`` of every paragraph of the README, the demo's source and every notebook
    cell: the context a γ must be explained in."""
    out = []
    for path in (ROOT / "README.md", ROOT / "attndrift" / "experiments" / "demo.py"):
        text = path.read_text(encoding="utf-8")
        out += [(path.name, b) for b in re.split(r"\n\s*\n", text)]
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
            out.append((f"{path.name} cell {i}", "".join(cell["source"])))
    return out


#: the embedded model's SADR presets, one per editor
PRESET_GAMMAS = {sadr.preset(models.EMBEDDED_MODEL, e).gamma for e in sadr.PRESETS}


def unexplained(text: str) -> list[str]:
    """The γ literals of a block that are neither 0, an embedded preset nor explained there."""
    found = [
        v.strip()
        for m in LITERAL.finditer(text)
        for v in m.group(1).split(",")
        if float(v) != 0 and float(v) not in PRESET_GAMMAS
    ]
    return [] if EXPLAINED.search(text) else found


def test_the_checker_finds_what_it_should():
    assert unexplained("edit = ad.rome.edit(model, r, sadr=ad.SadrConfig(gamma=0.2))") == ["0.2"]
    assert unexplained("ROME+SADR (γ = 0.2) at 80 steps") == ["0.2"]
    assert unexplained("ROME+SADR (γ = 0.05) at 80 steps") == []  # the embedded preset
    assert unexplained("attndrift sweep --sadr-gamma 0,0.2 --out x") == ["0.2"]
    assert unexplained("settings: rome|g=0.2|steps=80") == ["0.2"]
    assert unexplained("SadrConfig(0.5)") == ["0.5"]
    assert unexplained("γ = 0 is the plain editor; sadr_gamma=0") == []
    assert unexplained("γ = 0.01 is the paper's setting for GPT-J") == []
    assert unexplained("γ = {gamma:g}, Setting('rome', sadr_gamma=gamma)") == []


@pytest.mark.parametrize(("where", "text"), blocks(), ids=lambda x: x if len(x) < 40 else "")
def test_no_other_gamma_is_written(where, text):
    assert unexplained(text) == [], f"{where}: a γ that is not the model's preset"


def test_the_demo_and_its_help_take_the_preset():
    assert demo.DemoConfig().sadr_gamma is None  # run() asks the model's preset
    preset = sadr.preset(models.EMBEDDED_MODEL).gamma
    assert preset == sadr.SMOLLM2_ROME_GAMMA
    import contextlib
    import io

    from attndrift import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(out.getvalue().split())
    assert "--sadr-gamma SADR_GAMMA SADR's weight γ for the ROME+SADR edit (default: the " in (text)
    assert f"{preset:g} for {models.EMBEDDED_MODEL})" in text
    for flag in ("--record", "--sweep-records", "--window", "--steps", "--out", "--model"):
        line = text.split(flag, 2)[-1].split(" --", 1)[0]
        assert "default" in line, f"demo --help shows no default for {flag}"
