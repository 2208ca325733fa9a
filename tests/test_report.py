"""The report: Wilson intervals, shared colour scales, styled tables, the headline figure, and
the rendered page in a real headless browser (skipped where no chromium is installed)."""

import math
import os
import re
import shutil
import struct
import subprocess

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from scipy import stats

from attndrift import metrics, plotting
from attndrift.analysis import drift
from attndrift.experiments import demo, report

# ------------------------------------------------------------------------------------------
# metrics: the Wilson score interval next to the normal one
# ------------------------------------------------------------------------------------------


def test_wilson_by_hand():
    # 0 of 2: z² = 3.8416, centre = (0 + 0.9604) / 2.9208, half = 1.96 · √(0.2401) / 2.9208
    low, high = metrics.wilson(0, 2)
    assert low == 0.0 and high == pytest.approx(2 * 0.9604 / 2.9208, abs=1e-12)
    assert high == pytest.approx(0.658, abs=5e-4)
    low, high = metrics.wilson(2, 2)
    assert low == pytest.approx(0.342, abs=5e-4) and high == 1.0
    low, high = metrics.wilson(1, 2)
    assert (low, high) == pytest.approx((0.0945, 0.9055), abs=5e-5)
    assert all(math.isnan(x) for x in metrics.wilson(0, 0))
    with pytest.raises(ValueError, match="successes <= n"):
        metrics.wilson(3, 2)
    with pytest.raises(ValueError, match="successes <= n"):
        metrics.wilson(-1, 2)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 3), (7, 10), (19, 20), (40, 100), (3, 250)])
def test_wilson_matches_scipy(k, n):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert metrics.wilson(k, n, z=float(stats.norm.ppf(0.975))) == pytest.approx(
        (ci.low, ci.high), abs=1e-9
    )
    low, high = metrics.wilson(k, n)
    assert 0 <= low <= k / n <= high <= 1


def test_metric_value_wilson_keeps_the_normal_interval():
    m = metrics.proportion("ES", [True, True])
    assert str(m) == "100.0 ± 0.0" == m.format() == m.format("normal")  # unchanged
    assert (m.low, m.high) == (1.0, 1.0)
    assert m.successes == 2 and m.wilson() == metrics.wilson(2, 2)
    assert m.format("wilson") == "100.0 [34.2, 100.0] (n = 2)"
    mixed = metrics.proportion("NS", [True, False, False, False])
    assert mixed.successes == 1 and mixed.format("wilson").endswith("(n = 4)")
    assert metrics.proportion("RS", []).format("wilson") == "—"
    with pytest.raises(ValueError, match="unknown interval"):
        m.format("exact")


def test_table_default_stays_normal_and_wilson_is_an_option():
    probes = pd.DataFrame(
        {"kind": ["ES", "PS", "PS", "NS", "NS", "RS", "DNS"], "success": [1, 1, 0, 1, 1, 0, 1]}
    )
    s = metrics.aggregate(probes.astype({"success": bool}))
    normal = metrics.table({"ROME": s})
    assert normal.loc["ROME", "PS"] == str(s.metrics["PS"]) == "50.0 ± 98.0"
    assert normal.equals(metrics.table({"ROME": s}, interval="normal"))
    wilson = metrics.table({"ROME": s}, interval="wilson")
    assert list(wilson.columns) == list(normal.columns)
    assert wilson.loc["ROME", "PS"] == "50.0 [9.5, 90.5] (n = 2)"
    assert wilson.loc["ROME", "RS_D"] == "—"
    assert wilson.loc["ROME", "Score"] == normal.loc["ROME", "Score"]
    with pytest.raises(ValueError, match="unknown interval"):
        metrics.table({"ROME": s}, interval="exact")


def test_frame_holds_numbers_and_formatted_is_its_view():
    probes = pd.DataFrame(
        {"kind": ["ES", "PS", "PS", "NS", "NS", "RS", "DNS"], "success": [1, 1, 0, 1, 1, 0, 1]}
    )
    s = metrics.aggregate(probes.astype({"success": bool}))
    numbers = metrics.frame({"ROME": s})
    assert numbers.loc["ROME", "PS"] == 50.0 and numbers.loc["ROME", "PS_n"] == 2
    low, high = metrics.wilson(1, 2)
    assert numbers.loc["ROME", ["PS_low", "PS_high"]].tolist() == pytest.approx(
        [100 * low, 100 * high]
    )
    assert numbers.loc["ROME", "Score"] == pytest.approx(100 * s.score)
    assert math.isnan(numbers.loc["ROME", "RS_D"]) and numbers.loc["ROME", "RS_D_n"] == 0
    # numbers to compute with: every column but the counts is a float, none all-NaN but RS_D's
    assert all(numbers[c].dtype.kind in "fi" for c in numbers.columns)
    shown = metrics.formatted(numbers)
    assert shown.equals(metrics.table({"ROME": s}, interval="wilson"))
    assert list(shown.columns) == ["ES", "PS", "NS", "RS", "DNS", "RS_D", "Score"]
    # a normal interval can pass 100 %; Wilson bounds never leave [0, 100]
    normal = metrics.frame({"ROME": s}, interval="normal")
    assert normal.loc["ROME", "PS_high"] > 100
    assert numbers.filter(like="_high").max().max() <= 100
    assert numbers.filter(like="_low").min().min() >= 0


# ------------------------------------------------------------------------------------------
# plotting: one colour scale for compared heatmaps; the headline figure
# ------------------------------------------------------------------------------------------


def _drift(scale: float, seed: int) -> drift.Drift:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, 4)  # prompts x layers x heads
    a = torch.rand(shape, generator=g)
    delta = scale * (2 * torch.rand(shape, generator=g) - 1)
    return drift.Drift(
        prompts=("p0", "p1"),
        subjects=("s", "s"),
        layers=(0, 2, 4),
        kl=torch.rand(shape, generator=g),
        a_vanilla=a,
        a_edited=a + delta,
        delta=delta,
        mass_vanilla=a,
        mass_edited=a + delta,
        mass_delta=delta,
        lengths=torch.tensor([5, 6]),
    )


def test_common_zmax_and_fixed_range():
    big, small = _drift(0.25, 0), _drift(0.07, 1)
    zmax = plotting.common_zmax([big, small])
    assert zmax == pytest.approx(float(big.delta.mean(0).abs().max()))
    assert zmax > float(small.delta.mean(0).abs().max())
    assert plotting.common_zmax([big], prompt=1) == pytest.approx(float(big.delta[1].abs().max()))
    one = plotting.drift_heatmap(small, "delta", zmax=zmax)
    (hm,) = one.data
    assert (hm.zmin, hm.zmax) == (-zmax, zmax)  # symmetric for a difference
    assert hm.zmid is None  # the fixed range replaces the autoscale around 0
    kl = plotting.drift_heatmap(small, "kl", zmax=0.5).data[0]
    assert (kl.zmin, kl.zmax) == (0.0, 0.5)  # from 0 for a non-negative metric
    # by default two heatmaps drawn apart share the natural scale of attention changes
    apart = [plotting.drift_heatmap(x, "delta").data[0] for x in (big, small)]
    assert {(hm.zmin, hm.zmax) for hm in apart} == {(-1.0, 1.0)}
    kl_auto = plotting.drift_heatmap(small, "kl").data[0]
    assert kl_auto.zmin == 0 and kl_auto.zmax is None  # KL: from 0 to its largest value
    with pytest.raises(ValueError, match="zmax must be positive"):
        plotting.drift_heatmap(small, zmax=0)
    with pytest.raises(ValueError, match="no drifts"):
        plotting.common_zmax([])


def test_drift_heatmaps_share_one_coloraxis():
    big, small = _drift(0.25, 0), _drift(0.07, 1)
    fig = plotting.drift_heatmaps({"ROME": big, "ROME+SADR": small})
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    assert {t.coloraxis for t in fig.data} == {"coloraxis"}
    zmax = plotting.common_zmax([big, small])
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == pytest.approx((-zmax, zmax))
    np.testing.assert_allclose(np.asarray(fig.data[1].z), small.delta.mean(0).numpy(), rtol=1e-6)
    assert [a.text for a in fig.layout.annotations] == ["ROME", "ROME+SADR"]
    assert "one colour scale" in fig.layout.title.text
    fixed = plotting.drift_heatmaps({"a": small}, "kl", zmax=2)
    assert (fixed.layout.coloraxis.cmin, fixed.layout.coloraxis.cmax) == (0.0, 2)
    with pytest.raises(ValueError, match="no drifts"):
        plotting.drift_heatmaps({})


def test_headline_dashes_are_means_and_dots_are_prompts():
    p_true = {"unedited": [0.8, 0.6], "ROME": [0.3, 0.1], "ROME+SADR": [0.7, 0.5]}
    p_new = {"unedited": [0.01, 0.03], "ROME": [0.5, 0.7], "ROME+SADR": [0.1, 0.2]}
    fig = plotting.headline(p_true, p_new, prompts=["a <b>", "c"])
    names = [t.name for t in fig.data]
    assert names == [
        *("P(o_true), each prompt", "P(o_true), mean"),
        *("P(o_new), each prompt", "P(o_new), mean"),
    ]
    dots_true, mean_true, dots_new, mean_new = fig.data
    assert list(mean_true.y) == pytest.approx([0.7, 0.2, 0.6])
    assert list(mean_new.y) == pytest.approx([0.02, 0.6, 0.15])
    assert list(mean_new.text) == ["0.020", "0.600", "0.150"]
    assert list(dots_new.y) == pytest.approx([0.01, 0.03, 0.5, 0.7, 0.1, 0.2])
    # each prompt's dot lies near its model's mean, P(o_true) left of P(o_new)
    assert all(
        abs(x - m) <= 0.08 for x, m in zip(dots_new.x, np.repeat(mean_new.x, 2), strict=True)
    )
    assert all(t < n for t, n in zip(mean_true.x, mean_new.x, strict=True))
    assert list(fig.layout.xaxis.ticktext) == ["<b>unedited</b>", "<b>ROME</b>", "<b>ROME+SADR</b>"]
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.range[0] == -2  # 0.01 shown
    assert "a &lt;b&gt;" in dots_true.text  # prompts are escaped in the hover labels
    tiny = plotting.headline({"a": [0.5]}, {"a": [0.0]})
    assert tiny.data[2].y[0] == plotting.P_FLOOR  # 0 cannot sit on a log axis
    linear = plotting.headline(p_true, p_new, log=False)
    assert linear.layout.yaxis.type is None and list(linear.data[3].y) == list(mean_new.y)
    with pytest.raises(ValueError, match="same models"):
        plotting.headline(p_true, {"ROME": [0.1, 0.2]})
    with pytest.raises(ValueError, match="of 2 prompts"):
        plotting.headline(p_true, p_new | {"ROME": [0.5]})


# ------------------------------------------------------------------------------------------
# report: styled tables, sections, the page
# ------------------------------------------------------------------------------------------

LONG = (
    "The Eiffel Tower is located in the city of Rome. " * 3 + "The Louvre is located in the city of"
)


def _probes() -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = pd.DataFrame(
        {
            ("", "probe"): ["ES", "NS", "DNS"],
            ("", "prompt"): ["Where is <it>?", "The Louvre is in", LONG],
            ("P", "ROME"): ["0.073 / 0.208", "0.798 / 0.001", "0.453 / 0.047"],
            ("P", "SADR"): ["0.074 / 0.209", "0.798 / 0.001", "0.454 / 0.047"],
        }
    )
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    failed = pd.DataFrame({("P", "ROME"): [True, False, False], ("P", "SADR"): [True, False, True]})
    failed.columns = pd.MultiIndex.from_tuples(failed.columns)
    return frame, failed


def _cells(page: str) -> list[tuple[str, str]]:
    return re.findall(r"<td class='([^']*)'>(.*?)</td>", page)


def test_table_marks_failed_cells_and_wraps_full_prompts():
    frame, failed = _probes()
    text = report.table(frame, failed, wrap=[("", "prompt")], group=("", "probe")).text
    cells = _cells(text)
    failing = [c for c in cells if "failed" in c[0].split()]
    assert [c[1].split("</span> ")[1] for c in failing] == [
        "0.073 / 0.208",
        "0.074 / 0.209",
        "0.454 / 0.047",
    ]
    assert all(report.FAILED_MARK in c[1] for c in failing)
    assert sum(report.FAILED_MARK in c[1] for c in cells) == 3  # only the failed cells
    assert ("wrap", LONG) in cells  # the full prompt, in a wrapping cell
    assert ("wrap", "Where is &lt;it&gt;?") in cells  # escaped
    assert "True" not in text and "False" not in text
    assert text.count("class='group-start'") == 2  # a rule above each new kind of probe
    assert "<th colspan='2' class='group'>P</th>" in text  # grouped header
    assert "<th>0</th>" not in text  # no RangeIndex column


def test_table_formats_numbers_and_marks_uncertain_cells():
    frame = pd.DataFrame(
        {"ES": ["100.0 [34.2, 100.0] (n = 2)", "—"], "x": [0.12345, math.nan], "n": [3, 4]},
        index=pd.Index(["ROME", "SADR"], name="edit"),
    )
    small = pd.DataFrame({"ES": [True, False]}, index=frame.index)
    text = report.table(frame, uncertain=small, digits=2).text
    cells = _cells(text)
    assert cells[0] == ("txt uncertain", "100.0 [34.2, 100.0] (n = 2) <span class='mark'>†</span>")
    assert ("num", "0.12") in cells and ("num", "—") in cells and ("num", "3") in cells
    assert "<th>ROME</th>" in text and ">edit</th>" in text  # the index is shown
    assert report.UNCERTAIN_MARK not in text.split("SADR")[1]
    assert _cells(report.table(pd.DataFrame({"ok": [True, False]})).text) == [
        ("txt", "✓"),
        ("txt", "✗"),
    ]
    with pytest.raises(ValueError, match="lacks"):
        report.table(frame, failed=pd.DataFrame({"y": [True, True]}, index=frame.index))
    with pytest.raises(ValueError, match="no such columns"):
        report.table(frame, wrap=["prompt"])


def _figure() -> go.Figure:
    return plotting.drift_heatmaps({"ROME": _drift(0.25, 0), "ROME+SADR": _drift(0.07, 1)})


def _page() -> str:
    frame, failed = _probes()
    p_true = {"unedited": [0.8, 0.6], "ROME": [0.3, 0.1]}
    p_new = {"unedited": [0.01, 0.03], "ROME": [0.5, 0.7]}
    sections = [
        report.Section(
            "At a glance",
            figures=[report.Figure(plotting.headline(p_true, p_new), "What the headline shows.")],
        ),
        report.Section(
            "Probes <&>",
            ["A paragraph."],
            tables=[report.table(frame, failed, wrap=[("", "prompt")])],
            notes=["✗: fails."],
        ),
        report.Section(
            "Drift",
            tables=[pd.DataFrame({"a": [0.5]}, index=pd.Index(["x"], name="edit"))],
            figures=[report.Figure(_figure(), "Both edits on one colour scale."), _figure()],
        ),
    ]
    return report.render("Test report", sections, footer="footer text")


def test_render_numbers_captions_above_figures():
    page = _page()
    assert page.count("<figure>") == 3 and page.count("<figcaption>") == 2
    first = page.index("<figcaption><b>Figure 1.</b> What the headline shows.</figcaption>")
    assert first < page.index('class="plotly-graph-div"')  # the caption is above its figure
    assert "<b>Figure 2.</b> Both edits on one colour scale." in page
    assert "<h2>Probes &lt;&amp;&gt;</h2>" in page and "<section id='probes'>" in page
    assert "class='num'>0.500</td>" in page  # a plain DataFrame gets the same styling
    assert page.count("<script type='text/javascript'>") == 1  # plotly.js once
    assert '<script src="http' not in page
    assert "td.failed" in page and "footer text" in page


def test_demo_sweep_labels_and_probe_table():
    # the demo's pure helpers on synthetic inputs (the real run is tests/test_demo.py)
    probes = pd.DataFrame(
        {
            "kind": ["ES", "DNS"],
            "prompt": ["Where is it?", LONG],
            "right": ["Rome", "Paris"],
            "wrong": ["Paris", "Rome"],
        }
    )
    for m, (pr, pw) in {
        "unedited": ([0.1, 0.8], [0.7, 0.01]),
        "ROME": ([0.6, 0.3], [0.2, 0.5]),
    }.items():
        probes[f"P(right) {m}"], probes[f"P(wrong) {m}"] = pr, pw
        probes[f"ok {m}"] = np.asarray(pr) > np.asarray(pw)
    shown, failed = demo._probe_table(probes)
    assert list(shown.columns.get_level_values(1)) == [
        *("probe", "prompt", "right", "wrong"),
        *("unedited", "ROME"),
    ]
    assert shown.iloc[1, 1] == LONG  # full prompt, not cut
    assert shown[("P(right) / P(wrong)", "ROME")].tolist() == ["0.600 / 0.200", "0.300 / 0.500"]
    assert failed.to_numpy().tolist() == [[True, False], [False, True]]
    text = report.table(shown, failed, wrap=[("", "prompt")]).text
    assert [c[1].split("</span> ")[1] for c in _cells(text) if "failed" in c[0]] == [
        "0.100 / 0.700",
        "0.300 / 0.500",
    ]


# ------------------------------------------------------------------------------------------
# the rendered page in a real headless browser
# ------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary on PATH (Debian/Ubuntu: apt-get install chromium); the rendered "
    "report is checked in a real headless browser only where one is installed",
)


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    profile.mkdir()
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    env = {**os.environ, "HOME": str(tmp_path)}  # nothing is written to the real home
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def _png_size(path) -> tuple[int, int]:
    """Width and height of a PNG (from its IHDR chunk)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _colourful_pixels(path) -> int | None:
    """Pixels far from grey (red cells, heatmap and bar colours): none on a blank or text-only
    page. None without PIL (not a dependency of attndrift)."""
    try:
        from PIL import Image
    except ImportError:
        return None
    px = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((px.max(2) - px.min(2)) > 60).sum())


@needs_chromium
def test_rendered_page_in_headless_chromium(tmp_path):
    html_path = tmp_path / "report.html"
    html_path.write_text(_page(), encoding="utf-8")
    url = html_path.as_uri()

    dom = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # plotly creates its svg only when its JavaScript ran: 3 figures drawn
    assert dom.stdout.count('class="main-svg"') >= 3, dom.stdout[-2000:]
    assert "Figure 2." in dom.stdout and 'td class="wrap"' in dom.stdout

    png = tmp_path / "report.png"
    shot = _chromium(
        tmp_path,
        "--virtual-time-budget=5000",
        f"--screenshot={png}",
        "--window-size=1200,2000",
        url,
    )
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    assert _png_size(png) == (1200, 2000)
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>", encoding="utf-8")
    blank_png = tmp_path / "blank.png"
    _chromium(tmp_path, f"--screenshot={blank_png}", "--window-size=1200,2000", blank.as_uri())
    assert _png_size(blank_png) == (1200, 2000)
    assert png.stat().st_size > 10 * blank_png.stat().st_size  # not a blank page
    colourful = _colourful_pixels(png)
    assert colourful is None or colourful > 5000  # heatmaps, bars and red cells were painted
