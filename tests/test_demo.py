"""The main job (`attndrift demo`), end to end on the embedded model with quick edits."""

import html
import json

import pandas as pd
import pytest

from attndrift import cli, data, plotting
from attndrift.editing import sadr
from attndrift.experiments import demo


@pytest.mark.slow
def test_demo_writes_report_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    other = 19 if demo.RECORD != 19 else 49  # a sweep record besides the demo's own
    args = ["demo", "--device", "cpu", "--steps", "3", "--identity-cov"]
    args += ["--sweep-records", str(other)]
    assert cli.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = data.load_embedded().by_id(demo.RECORD)
    assert record.request.subject in printed and "report:" in printed
    info = json.loads((out / "summary.json").read_text())
    sentences = info["sentences"]
    assert len(sentences) == 4 and all(s in printed for s in sentences)
    assert sentences[0].startswith(f"ROME rewrites {record.request.subject!r}")

    page = (out / "report.html").read_text(encoding="utf-8")
    assert len(page) > 3_000_000 and "<script src=" not in page  # plotly.js inlined: offline
    # it opens with what happened, in sentences computed from the run, then the headline
    assert page.index("<h2>What happened</h2>") < page.index(html.escape(sentences[0]))
    assert page.index(html.escape(sentences[3])) < page.index("<b>Figure 1.</b> P(right answer")
    assert page.index("<b>Figure 1.</b>") < page.index("<h2>1. The fact, the probe and the edits")
    # the probe: chosen by the written rule, marked in its table, patched
    probe = info["probe"]
    assert probe["kind"] in ("DNS", "RS") and probe["record"] == demo.RECORD
    assert f"P({probe['right']!r}) falls from" in sentences[1]  # the probe's own right answer
    assert "chosen by a written rule" in page
    assert f"<td class='wrap'>{html.escape(probe['prompt'])}</td>" in page
    # the patching figure: a normalised recovery with its baselines, the component named right
    assert "(P − P_edited) / (P_vanilla − P_edited)" in page and "P_vanilla = " in page
    assert "attention pattern rows of all heads" in page and "attention output" not in page
    # the attention viewer: a layer slider and a head menu, offline in the page
    assert '"sliders"' in page and '"updatemenus"' in page
    # read like a figure from a paper: full prompts, failed probes marked, no raw booleans,
    # Wilson intervals with a small-n warning
    assert "<td class='txt failed'>" in page  # the unedited model fails ES by design
    assert ">True<" not in page and ">False<" not in page
    assert "Wilson score interval" in page and "Too few probes to read" in page
    assert "<span class='mark'>†</span>" in page

    assert info["record"] == demo.RECORD
    assert set(info["edits"]) == {"ROME", "ROME+SADR"}
    gamma = sadr.preset("smollm2-135m").gamma
    assert info["edits"]["ROME+SADR"]["editor"] == "rome+sadr"
    assert info["edits"]["ROME+SADR"]["sadr_gamma"] == gamma  # the model's preset
    assert all(e["steps_run"] <= 3 for e in info["edits"].values())
    assert {row["kind"] for row in info["probes"]} >= {"ES", "NS", "RS", "DNS"}
    assert set(info["sweep"]) == {
        "none",
        "rome|g=0|steps=3|identity_cov",
        f"rome|g={gamma:g}|steps=3|identity_cov",
    }

    (sweep_file,) = out.glob("sweep-*.jsonl")
    lines = [json.loads(x) for x in sweep_file.read_text().splitlines()]
    assert sorted(line["record"] for line in lines) == [other, other]

    # rerunning resumes the sweep (nothing is added to its results file) and says the same
    assert cli.main([*args, "--out", str(out)]) == 0
    assert len(sweep_file.read_text().splitlines()) == 2
    again = json.loads((out / "summary.json").read_text())
    assert again["sentences"] == sentences and again["probe"] == probe

    if plotting.chromium() is not None:  # every figure of the report draws cleanly
        checked = page.replace("</head>", f"<script>{plotting.export._CHECK}</script></head>", 1)
        done = plotting.export._browse(checked, "--window-size=1200,4000", "--dump-dom")
        found = done.stdout.split('<pre id="attndrift-problems">', 1)
        assert len(found) == 2, done.stderr[-2000:]
        problems = json.loads(html.unescape(found[1].split("</pre>", 1)[0]))
        # the report is interactive: its modebar is wanted (the static exports hide it)
        assert [p for p in problems if not p.endswith("the modebar is shown")] == []


def _table(rows):
    columns = ["kind", "prompt", "P(right) unedited", "P(wrong) unedited", "P(right) ROME",
               "P(wrong) ROME"]  # fmt: skip
    table = pd.DataFrame(rows, columns=columns).assign(record=7, right="China", wrong="Japan")
    for m in ("unedited", "ROME"):
        table[f"ok {m}"] = table[f"P(right) {m}"] > table[f"P(wrong) {m}"]
    return table


def test_the_rule_takes_the_largest_rise_the_edit_causes_in_context():
    table = _table(
        [
            ("NS", "B is in", 0.9, 0.0, 0.0, 0.9),  # ROME already changed this neighbour
            ("NS", "C is in", 0.9, 0.0, 0.8, 0.1),
            ("DNS", "A is in Japan. B is in", 0.95, 0.0, 0.0, 0.95),  # rise 1.9: its NS fails
            ("DNS", "A is in Japan. C is in", 0.9, 0.1, 0.2, 0.6),  # rise 1.2
            ("RS", "A is on", 0.2, 0.3, 0.0, 0.9),  # rise 0.8, but wrong before the edit
            ("RS", "A lies by", 0.6, 0.0, 0.3, 0.2),  # rise 0.5
        ]
    )
    rises = demo.probe_rises(table)
    assert list(rises["kind"]) == ["DNS", "DNS", "RS", "RS"]  # NS only decides eligibility
    assert rises["rise"].round(6).tolist() == [1.9, 1.2, 0.8, 0.5]
    assert rises["eligible"].tolist() == [False, True, False, True]
    assert demo.choose_probe(rises)["prompt"] == "A is in Japan. C is in"
    with pytest.raises(ValueError, match="no distracting-neighbour or relation probe"):
        demo.choose_probe(rises.assign(eligible=False))
    with pytest.raises(ValueError, match="no NS probe in the table"):
        demo.probe_rises(table[table["kind"] != "NS"])
