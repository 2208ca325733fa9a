import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from attndrift import capture, encoding, plotting
from attndrift.analysis import drift, patching
from tests.helpers import NEW, PROMPT, PROMPTS, SUBJECTS, TRUE, edited, two_records


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def d(model):
    return drift.measure(model, edited(model), PROMPTS, SUBJECTS)


@pytest.fixture(scope="module")
def sweep(model):
    e = edited(model)
    return [patching.patch(model, e, PROMPT, TRUE, NEW, direction=d) for d in patching.DIRECTIONS]


def test_unique_labels():
    labels = plotting.unique_labels(["The", " Paris", " is", " Paris", "\n", " "])
    assert labels == ["The", " Paris·1", " is", " Paris·3", "↵", "' '"]
    assert len(set(labels)) == len(labels)


def test_drift_heatmap_layer_by_head(d):
    fig = plotting.drift_heatmap(d, "delta")
    assert isinstance(fig, go.Figure)
    (hm,) = fig.data
    # a change of attention: a diverging scale on its natural range, centred at 0
    assert hm.type == "heatmap" and (hm.zmin, hm.zmax) == (-1, 1)
    assert hm.colorscale[0][1] != hm.colorscale[-1][1]
    np.testing.assert_allclose(np.asarray(hm.z), d.delta.mean(0).numpy(), rtol=1e-6)
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    assert list(hm.y) == list(d.layers)
    assert "(edited −" in hm.colorbar.title.text  # words, not a column name
    assert d.model in fig.layout.title.text  # the title names the model
    one = plotting.drift_heatmap(d, "kl", prompt=2)
    assert one.data[0].zmid is None and one.data[0].zmin == 0  # KL: sequential, from 0
    assert "nats" in one.data[0].colorbar.title.text
    np.testing.assert_allclose(np.asarray(one.data[0].z), d.kl[2].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown drift metric"):
        plotting.drift_heatmap(d, "p_true")
    with pytest.raises(ValueError, match="out of range"):
        plotting.drift_heatmap(d, prompt=len(PROMPTS))


def test_compared_drift_heatmaps_share_one_scale(d):
    import dataclasses

    half = dataclasses.replace(d, delta=d.delta / 2)  # an edit that drifts half as much
    zmax = plotting.common_zmax([d, half])
    assert zmax == pytest.approx(float(d.delta.mean(0).abs().max()))
    ranges = {
        (hm.zmin, hm.zmax)
        for hm in (plotting.drift_heatmap(x, "delta", zmax=zmax).data[0] for x in (d, half))
    }
    assert ranges == {(-zmax, zmax)}
    fig = plotting.drift_heatmaps({"full": d, "half": half})
    assert [t.coloraxis for t in fig.data] == ["coloraxis", "coloraxis"]
    assert fig.layout.coloraxis.cmax == pytest.approx(zmax) == -fig.layout.coloraxis.cmin
    np.testing.assert_allclose(np.asarray(fig.data[1].z), half.delta.mean(0).numpy(), rtol=1e-6)
    assert list(fig.data[0].y) == list(d.layers)


def test_patching_heatmap_layer_by_token(sweep, model):
    fig = plotting.patching_heatmap(sweep, "recovery")
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == len(sweep) * len(sweep[0].components) == 4
    restore = sweep[0]
    n_layers, n_pos = model.cfg.n_layers, len(restore.positions)
    for k, hm in enumerate(heatmaps):
        r, c = divmod(k, 2)
        assert np.asarray(hm.z).shape == (n_layers, n_pos)
        np.testing.assert_allclose(np.asarray(hm.z), sweep[r].recovery[c].numpy(), rtol=1e-6)
        assert list(hm.x) == plotting.unique_labels(sweep[r].tokens)
    # recovery: diverging, centred at 0, at least [-1, 1]; the baselines in the title
    axis = fig.layout.coloraxis
    assert axis.cmin == -axis.cmax and axis.cmax >= 1
    assert f"vanilla {restore.source.p_true:.4f}, edited {restore.target.p_true:.4f}" in (
        fig.layout.title.text
    )
    # one x title per column, under the bottom row (none to overlap the lower panels' titles)
    assert fig.layout.xaxis.title.text is None and fig.layout.xaxis3.title.text == "token"
    assert fig.layout.yaxis.title.text == "layer (window start)"
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:2] == [
        "restore: attention pattern rows (all heads)",
        "restore: MLP output",
    ]
    p_true = plotting.patching_heatmap(restore, "p_true").layout.coloraxis
    assert p_true.cmid is None and (p_true.cmin, p_true.cmax) == (0, 1)
    with pytest.raises(ValueError, match="unknown metric"):
        plotting.patching_heatmap(sweep, "nll")


def test_attention_rows_vanilla_vs_edited(model):
    batch = encoding.encode_batch(model, PROMPTS, SUBJECTS)
    pair = capture.pair(model, edited(model), batch, layers=(2, 3))
    n = int(batch.lengths[1])
    tokens = encoding.token_strings(model, batch.tokens[1, :n].tolist())
    fig = plotting.attention_rows(pair, tokens, [(3, 0), (2, 1)], prompt=1)
    bars = [t for t in fig.data if t.type == "bar"]
    assert [b.name for b in bars] == ["vanilla", "edited"] * 2
    assert bars[0].marker.color == plotting.VANILLA != plotting.O_TRUE
    assert list(bars[0].x) == plotting.unique_labels(tokens)
    np.testing.assert_allclose(bars[1].y, pair.edited.pattern[1, 1, 0, 0, :n].numpy())
    np.testing.assert_allclose(bars[3].y, pair.edited.pattern[1, 0, 1, 0, :n].numpy())
    assert fig.layout.xaxis2.title.text == "key token"
    with pytest.raises(ValueError, match="was not captured"):
        plotting.attention_rows(pair, tokens, [(0, 0)])


def test_drift_scatter_has_fit_and_rho(model):
    groups = [(edited(model), r.probes(["RS", "DNS"])) for r in two_records()]
    a = drift.versus_failure(model, groups)
    fig = plotting.drift_scatter(a)
    points = [t for t in fig.data if t.mode == "markers"]
    (line,) = [t for t in fig.data if t.mode == "lines"]
    assert sum(len(t.x) for t in points) == len(a.probes)
    slope, intercept = np.polyfit(a.probes.factor, a.probes.p_new, 1)
    np.testing.assert_allclose(line.y, slope * np.asarray(line.x) + intercept)
    assert f"Pearson r = {a.overall.pearson:.2f}" in fig.layout.title.text
    assert f"Spearman ρ = {a.overall.spearman:.2f}" in fig.layout.title.text
    assert f"n = {len(a.probes)}" in fig.layout.title.text
    assert fig.layout.yaxis.title.text == "P(o_new) under the edited model"


def test_save_html_is_standalone(tmp_path, d, sweep):
    figs = [plotting.drift_heatmap(d), plotting.patching_heatmap(sweep)]
    path = plotting.save_html(figs, tmp_path / "sub" / "out.html")
    text = path.read_text()
    assert text.count("<div id=") >= 2 and "plotly.js" in text.lower()
    assert '<script src="http' not in text  # plotly.js embedded, not fetched
    assert len(text) > 1_000_000  # the library itself is inside
    with pytest.raises(ValueError, match="no figures"):
        plotting.save_html([], tmp_path / "x.html")


def test_save_png_without_a_browser_is_a_clear_error(tmp_path, monkeypatch, d):
    fig = plotting.drift_heatmap(d)
    monkeypatch.setattr(plotting.export, "chromium", lambda: None)
    monkeypatch.setattr(plotting.export, "_kaleido_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"needs a Chrome/Chromium browser .* or the optional"):
        plotting.save_png(fig, tmp_path / "x.png")

    def no_chrome(self, *args, **kwargs):
        raise OSError("no Chrome found")

    monkeypatch.setattr(plotting.export, "_kaleido_available", lambda: True)
    monkeypatch.setattr(go.Figure, "write_image", no_chrome)
    with pytest.raises(RuntimeError, match="needs a Chrome/Chromium"):
        plotting.save_png(fig, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plotting_never_changes_its_inputs(d):
    before = d.delta.clone()
    plotting.drift_heatmap(d)
    assert torch.equal(before, d.delta)


def test_tradeoff_plot():
    import pandas as pd

    from attndrift import plotting

    rows = []
    for gamma, selection, es, rs in [
        (0.0, True, 1.0, 0.2),
        (0.01, True, 0.9, 0.5),
        (0.01, False, 0.8, 0.6),
    ]:
        row = {"editor": "rome", "gamma": gamma, "selection": selection}
        for k, v in {"ES": es, "PS": es, "NS": 0.9, "RS": rs, "DNS": rs}.items():
            row |= {k: v, f"{k}_low": v - 0.05, f"{k}_high": v + 0.05}
        rows.append(row)
    fig = plotting.tradeoff(pd.DataFrame(rows))
    names = [t.name for t in fig.data]
    assert "ES (rome, selected heads)" in names and "RS (rome, all heads)" in names
    es = next(t for t in fig.data if t.name == "ES (rome, selected heads)")
    assert list(es.x) == ["0", "0.01"] and list(es.y) == [100.0, 90.0]
    assert list(es.error_y.array) == pytest.approx([0.0, 5.0])  # clipped at 100 %
    assert list(es.error_y.arrayminus) == pytest.approx([5.0, 5.0])
    # the legend: each metric's colour and each curve's line style, once
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert legend == ["rome, all heads", "rome, selected heads", "ES", "PS", "NS", "RS", "DNS"]
    low, high = fig.layout.yaxis.range
    assert low + 1.5 >= 0 and high - 1.5 <= 100  # fitted inside [0, 100]
    rs_all = next(t for t in fig.data if t.name == "RS (rome, all heads)")
    assert list(rs_all.y) == pytest.approx([20.0, 60.0])  # from the γ = 0 baseline
    assert rs_all.line.dash != es.line.dash and rs_all.line.color != es.line.color
    assert fig.layout.xaxis.title.text == "SADR γ"
    with pytest.raises(ValueError, match="no settings"):
        plotting.tradeoff(pd.DataFrame(rows), editor="memit")
    # a variant is its own curve; two settings of one curve at one γ are refused
    variant = dict(rows[1], variant="relation_kl=5", ES=0.7)
    frame = pd.DataFrame([dict(r, variant="") for r in rows] + [variant])
    names = [t.name for t in plotting.tradeoff(frame).data]
    assert "ES (rome, selected heads, relation_kl=5)" in names
    with pytest.raises(ValueError, match="at one γ"):
        plotting.tradeoff(pd.DataFrame([*rows, rows[1]]))


def test_tradeoff_map_places_each_setting():
    import pandas as pd

    from attndrift import plotting

    rows = [
        {"setting": "a", "ES": 1.0, "PS": 0.9, "RS_DNS": 0.3},
        {"setting": "b", "ES": 1.0, "PS": 0.5, "RS_DNS": 0.0},
    ]
    fig = plotting.tradeoff_map(pd.DataFrame(rows))
    (points,) = fig.data
    assert list(points.text) == ["a", "b"] and list(points.customdata) == ["a", "b"]
    assert list(points.x) == pytest.approx([30.0, 0.0])
    assert list(points.y) == pytest.approx([90.0, 50.0])
    with pytest.raises(ValueError, match="no settings"):
        plotting.tradeoff_map(pd.DataFrame(rows).iloc[:0])
    # labels leave out what every setting shares
    keys = ["rome|g=0|steps=80", "rome|g=0.2|steps=80", "rome|g=0.2|sadr_relations|steps=80"]
    assert plotting.tradeoffs._short_keys(keys) == ["g=0", "g=0.2", "g=0.2|sadr_relations"]


def test_attention_viewer_slides_over_layers_and_picks_heads(model):
    e = edited(model)
    batch = encoding.encode_batch(model, PROMPTS[:2], SUBJECTS[:2])
    caps = {"vanilla": capture.run(model, batch), "ROME": capture.run(e, batch)}
    n = int(batch.lengths[1])
    tokens = encoding.token_strings(model, batch.tokens[1, :n].tolist())
    fig = plotting.attention_viewer(caps, tokens, prompt=1, start=(2, 1), title="t")
    layers, n_heads = caps["vanilla"].layers, model.cfg.n_heads
    assert len(fig.data) == 2 * len(layers)  # a vanilla and an edited bar series per layer
    assert [t.name for t in fig.data[:2]] == ["vanilla", "ROME"]
    assert fig.data[0].marker.color == plotting.VANILLA and fig.data[1].marker.color in (
        plotting.EDITED
    )
    # the start: layer 2 visible, head 1's rows
    shown = [i for i, t in enumerate(fig.data) if t.visible]
    assert shown == [2 * layers.index(2), 2 * layers.index(2) + 1]
    want = caps["ROME"].pattern[1, layers.index(2), 1, 0, :n].numpy()
    np.testing.assert_allclose(fig.data[shown[1]].y, want, atol=1e-4)
    # the slider shows one layer at a time; the dropdown restyles every layer to one head
    (slider,) = fig.layout.sliders
    assert [s.label for s in slider.steps] == [str(x) for x in layers]
    assert slider.active == layers.index(2)
    visible = slider.steps[0].args[0]["visible"]
    assert visible == [True, True] + [False] * (2 * len(layers) - 2)
    (menu,) = fig.layout.updatemenus
    assert [b.label for b in menu.buttons] == [f"head {h}" for h in range(n_heads)]
    assert menu.active == 1
    ys = menu.buttons[3].args[0]["y"]
    want = caps["vanilla"].pattern[1, layers.index(3), 3, 0, :n].numpy()
    np.testing.assert_allclose(ys[2 * layers.index(3)], want, atol=1e-4)
    # the subject's tokens are shaded and bold
    first, last = int(batch.subject_first[1]), int(batch.subject_last[1])
    (shade,) = fig.layout.shapes
    assert (shade.x0, shade.x1) == (first - 0.5, last + 0.5)
    bold = [i for i, t in enumerate(fig.layout.xaxis.ticktext) if t.startswith("<b>")]
    assert bold == list(range(first, last + 1))
    # by default it opens where the edited attention to the subject's last token grew most
    auto = plotting.attention_viewer(caps, tokens, prompt=1)
    growth = (caps["ROME"].pattern - caps["vanilla"].pattern)[1, :, :, 0, last]
    li, head = divmod(int(growth.argmax()), n_heads)
    assert auto.layout.sliders[0].active == li and auto.layout.updatemenus[0].active == head
    with pytest.raises(ValueError, match="at least two models"):
        plotting.attention_viewer({"vanilla": caps["vanilla"]}, tokens)
    with pytest.raises(ValueError, match="not a captured"):
        plotting.attention_viewer(caps, tokens, prompt=1, start=(99, 0))


needs_chromium = pytest.mark.skipif(
    plotting.chromium() is None,
    reason="no chromium on the PATH (Debian/Ubuntu: apt-get install chromium); static exports "
    "are checked in a real headless browser only where one is installed",
)


def _png_size(path) -> tuple[int, int]:
    import struct

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@needs_chromium
def test_static_png_has_the_figures_size_and_no_modebar(tmp_path, d, sweep):
    figs = [plotting.drift_heatmap(d), plotting.patching_heatmap(sweep, "recovery")]
    path = plotting.save_png(figs, tmp_path / "figs.png")
    heights = plotting.STATIC_HEIGHT + figs[1].layout.height
    assert _png_size(path) == (plotting.STATIC_WIDTH, heights)
    assert plotting.layout_problems(figs) == []


@needs_chromium
def test_layout_problems_finds_what_is_cut_off_or_covered(tmp_path, d):
    fig = plotting.drift_heatmap(d)
    cut = go.Figure(fig).update_layout(margin={"l": 0, "t": 0}, width=300)
    cut.update_yaxes(automargin=False)
    problems = plotting.layout_problems(cut)
    assert any("lies outside the figure" in p for p in problems), problems
    on_plot = plotting.layout_problems(_over_title(fig))
    assert on_plot == ['figure 1: "the token axis title" lies on the plot of x2y2']
    # a colour bar title on top of its own tick labels (the old default of drift_heatmap)
    title = {"text": "Δ attention<br>(edited −<br>vanilla)", "side": "top"}
    on_ticks = go.Figure(fig).update_traces(colorbar={"title": title})
    assert any("overlaps" in p for p in plotting.layout_problems(on_ticks))
    scrolled = go.Figure()
    for i in range(40):
        scrolled.add_trace(go.Scatter(x=[0, 1], y=[i, i], name=f"a long legend entry {i}"))
    scrolled.update_layout(height=300)
    assert any("legend scrolls" in p for p in plotting.layout_problems(scrolled))
    with pytest.raises(ValueError, match="draws badly"):
        plotting.save_png(scrolled, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def _over_title(fig: go.Figure) -> go.Figure:
    """The old patching layout: the upper panel's x title on the lower panel's title."""
    from plotly.subplots import make_subplots

    out = make_subplots(rows=2, cols=1, subplot_titles=["upper panel", "lower panel"],
                        vertical_spacing=0.06)  # fmt: skip
    for row in (1, 2):
        out.add_trace(go.Heatmap(z=[[0, 1], [1, 0]], x=["a", "b"]), row=row, col=1)
        out.update_xaxes(title_text="the token axis title", row=row, col=1)
    return out.update_layout(height=500)
