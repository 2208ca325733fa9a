"""The main job (`attndrift demo`), end to end on the embedded model with quick edits."""

import html
import json

import pytest

from attndrift import cli, data


@pytest.mark.slow
def test_demo_writes_report_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--device", "cpu", "--steps", "3", "--identity-cov", "--sweep-records", "19"]
    assert cli.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = data.load_embedded().by_id(0)
    assert record.request.subject in printed and "report:" in printed

    page = (out / "report.html").read_text(encoding="utf-8")
    assert len(page) > 3_000_000 and "<script src=" not in page  # plotly.js inlined: offline
    assert record.request.subject in page
    # read like a figure from a paper: a captioned headline figure first, full prompts,
    # failed probes marked, no raw booleans, Wilson intervals with a small-n warning
    assert page.index("<b>Figure 1.</b> P(o_true") < page.index("<h2>1. The edit</h2>")
    (dns, *_) = record.probes(["DNS"])
    assert f"<td class='wrap'>{html.escape(dns.prompt)}</td>" in page
    assert "<td class='txt failed'>" in page  # the unedited model fails ES by design
    assert ">True<" not in page and ">False<" not in page
    assert "Wilson score interval" in page and "Too few probes to read" in page
    assert "(n = 1) <span class='mark'>†</span>" in page

    info = json.loads((out / "summary.json").read_text())
    assert info["record"] == 0
    assert set(info["edits"]) == {"ROME", "ROME+SADR"}
    assert info["edits"]["ROME+SADR"]["editor"] == "rome+sadr"
    assert all(e["steps_run"] <= 3 for e in info["edits"].values())
    assert {row["kind"] for row in info["probes"]} >= {"ES", "NS", "RS", "DNS"}
    assert set(info["sweep"]) == {
        "none",
        "rome|g=0|steps=3|identity_cov",
        "rome|g=0.2|steps=3|identity_cov",
    }

    (sweep_file,) = out.glob("sweep-*.jsonl")
    lines = [json.loads(x) for x in sweep_file.read_text().splitlines()]
    assert sorted(line["record"] for line in lines) == [19, 19]

    # rerunning resumes the sweep: nothing is added to its results file
    assert cli.main([*args, "--out", str(out)]) == 0
    assert len(sweep_file.read_text().splitlines()) == 2
