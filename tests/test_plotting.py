import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from attndrift import capture, drift, encoding, patching, plotting
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
    assert hm.type == "heatmap" and hm.zmid == 0 and hm.colorscale[0][1] != hm.colorscale[-1][1]
    np.testing.assert_allclose(np.asarray(hm.z), d.delta.mean(0).numpy(), rtol=1e-6)
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    assert list(hm.y) == list(d.layers)
    one = plotting.drift_heatmap(d, "kl", prompt=2)
    assert one.data[0].zmid is None  # sequential scale for KL
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
    assert fig.layout.coloraxis.cmid == 0
    assert fig.layout.xaxis.title.text == "token"
    assert fig.layout.yaxis.title.text == "layer (window start)"
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:2] == ["restore · attn (window 1)", "restore · mlp (window 1)"]
    assert plotting.patching_heatmap(restore, "p_true").layout.coloraxis.cmid is None
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
    assert f"ρ = {a.overall.pearson:.2f}" in fig.layout.title.text
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


def test_save_png_without_kaleido_is_a_clear_error(tmp_path, monkeypatch, d):
    fig = plotting.drift_heatmap(d)
    monkeypatch.setattr(plotting, "_kaleido_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs the optional package kaleido"):
        plotting.save_png(fig, tmp_path / "x.png")

    def no_chrome(self, *args, **kwargs):
        raise OSError("no Chrome found")

    monkeypatch.setattr(plotting, "_kaleido_available", lambda: True)
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
    assert list(es.error_y.array) == pytest.approx([5.0, 5.0])
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
    assert plotting._short_keys(keys) == ["g=0", "g=0.2", "g=0.2|sadr_relations"]
