import pandas as pd
import pytest
import torch

from attndrift import cli, data, encoding, models, plotting
from attndrift.analysis import tracing

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT, TRUE = "Eiffel Tower", "Paris"
CORPUS = ["Eiffel Tower", "Colosseum", "Danielle Darrieux", "Toko Yasuda", "Apple"]
HOOK = {
    "hidden": models.resid_post_hook,
    "mlp": models.mlp_out_hook,
    "attn_out": models.attn_out_hook,
}


def reference(variant, windows, sigma, noise, samples, seed=0):
    """One full forward per cell (every noise draw a row): noise on the subject's token
    embeddings, the clean value put back in ROME's centred window of layers."""
    variant = models.as_variant(variant)
    model = variant.model
    enc = encoding.encode_prompt(model, PROMPT, SUBJECT)
    tokens = torch.tensor([enc.ids])
    first, last = enc.subject_first, enc.subject_last
    z = tracing.subject_noise(
        model, last - first + 1, std=noise * sigma, samples=samples, seed=seed
    )
    t = encoding.encode_answer(model, TRUE)[0]

    def corrupt(x, hook):
        x = x.clone()
        x[:, first : last + 1] += z
        return x

    clean = {}

    def keep(x, hook):
        clean[hook.name] = x.clone()

    names = [HOOK[c](layer) for c in windows for layer in range(model.cfg.n_layers)]

    def prob(hooks, rows):
        with torch.no_grad(), model.hooks(fwd_hooks=[*variant.hooks, *hooks]):
            logits = model(tokens.repeat(rows, 1))
        return logits[:, -1].float().softmax(-1)[:, t].mean().item()

    p_clean = prob([(n, keep) for n in names], 1)
    p_corrupted = prob([(models.embed_hook(), corrupt)], samples)
    n = model.cfg.n_layers
    out = torch.zeros(len(windows), n, enc.last + 1)
    for c, (component, w) in enumerate(windows.items()):
        for layer in range(n):
            # ROME's window: range(max(0, l - w // 2), min(n, l - (-w // 2)))
            layers = range(max(0, layer - w // 2), min(n, layer - (-w // 2)))
            for pos in range(enc.last + 1):

                def restore(x, hook, pos=pos):
                    x[:, pos] = clean[hook.name][0, pos]
                    return x

                hooks = [(HOOK[component](lay), restore) for lay in layers]
                out[c, layer, pos] = prob([(models.embed_hook(), corrupt), *hooks], samples)
    return p_clean, p_corrupted, out


def test_matches_one_forward_per_cell(tiny):
    windows = {"hidden": 1, "mlp": 2, "attn_out": 3}
    sigma = tracing.embedding_scale(tiny, CORPUS)
    # a small token budget: many passes, several tiles and chunks
    r = tracing.trace(tiny, PROMPT, SUBJECT, TRUE, sigma=sigma, samples=3, windows=windows,
                      max_batch_tokens=40)  # fmt: skip
    p_clean, p_corrupted, ref = reference(tiny, windows, sigma, 3.0, 3)
    assert r.p_clean == pytest.approx(p_clean, abs=1e-6)
    assert r.p_corrupted == pytest.approx(p_corrupted, abs=1e-6)
    assert r.p_corrupted != r.p_clean  # the noise did something
    torch.testing.assert_close(r.p_restored, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.indirect, ref - p_corrupted, atol=1e-5, rtol=0)
    enc = encoding.encode_prompt(tiny, PROMPT, SUBJECT)
    assert r.subject_positions == tuple(range(enc.subject_first, enc.subject_last + 1))
    # positions before the subject see no noise: never run, exactly p_corrupted
    before = list(range(enc.subject_first))
    assert r.skipped >= 3 * tiny.cfg.n_layers * len(before)
    assert (r.indirect[:, :, before] == 0).all()
    # restoring the residual stream at the last token after the last layer gives the clean run
    torch.testing.assert_close(r.p_restored[0, -1, enc.last], torch.tensor(r.p_clean))


def test_variant_and_default_windows(tiny_llama):
    """An edited model (a Variant) is traced under its hooks; ROME windows by default."""
    edited = models.Variant(tiny_llama, ((models.mlp_out_hook(1), lambda x, hook: 3 * x),))
    sigma = tracing.embedding_scale(tiny_llama, CORPUS)
    r = tracing.trace(edited, PROMPT, SUBJECT, TRUE, sigma=sigma, samples=2, components=["mlp"],
                      max_batch_tokens=64)  # fmt: skip
    assert r.windows == (10,)
    p_clean, p_corrupted, ref = reference(edited, {"mlp": 10}, sigma, 3.0, 2)
    assert r.p_clean == pytest.approx(p_clean, abs=1e-6)
    assert r.p_corrupted == pytest.approx(p_corrupted, abs=1e-6)
    torch.testing.assert_close(r.p_restored, ref, atol=1e-5, rtol=0)
    plain = tracing.trace(tiny_llama, PROMPT, SUBJECT, TRUE, sigma=sigma, samples=2,
                          components=["mlp"])  # fmt: skip
    assert plain.p_clean != r.p_clean


def test_noise_is_seeded_and_private():
    model = models.tiny_model("gpt2")
    state = torch.random.get_rng_state()
    a = tracing.subject_noise(model, 2, std=0.5, samples=4, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.shape == (4, 2, model.cfg.d_model)
    assert torch.equal(a, tracing.subject_noise(model, 2, std=0.5, samples=4, seed=7))
    assert not torch.equal(a, tracing.subject_noise(model, 2, std=0.5, samples=4, seed=8))
    assert float(a.std()) == pytest.approx(0.5, rel=0.2)
    r1 = tracing.trace(model, PROMPT, SUBJECT, TRUE, sigma=0.2, samples=2, seed=3)
    r2 = tracing.trace(model, PROMPT, SUBJECT, TRUE, sigma=0.2, samples=2, seed=3)
    assert torch.equal(r1.p_restored, r2.p_restored)


def test_no_noise_changes_nothing(tiny):
    r = tracing.trace(tiny, PROMPT, SUBJECT, TRUE, sigma=1.0, noise=0, samples=2)
    assert r.p_corrupted == r.p_clean
    assert (r.indirect == 0).all() and r.skipped == r.indirect.numel()


def test_embedding_scale_is_the_std_of_token_embeddings():
    model = models.tiny_model("gpt2")  # learned positions: hook_embed excludes them
    ids = [i for text in CORPUS for i in models.encode_text(model, text)]
    expected = model.W_E[ids].detach().double().std()
    assert tracing.embedding_scale(model, CORPUS) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        tracing.embedding_scale(model, [])


def test_frame_best_and_heatmap(tiny_llama):
    last = encoding.encode_prompt(tiny_llama, PROMPT).last
    r = tracing.trace(tiny_llama, PROMPT, SUBJECT, TRUE, sigma=0.3, samples=2,
                      windows={"mlp": 3}, positions=[1, 2, 3, last])  # fmt: skip
    table = tracing.frame(r)
    n = 3 * tiny_llama.cfg.n_layers * 4
    assert len(table) == n and set(table.component) == {"hidden", "mlp", "attn_out"}
    mlp = table[table.component == "mlp"]
    assert set(mlp.window) == {3} and mlp.first_layer.min() == 0 and mlp.last_layer.max() == 3
    assert table.subject.sum() == 3 * 4 * sum(p in r.subject_positions for p in r.positions)
    assert (table.indirect == table.p_restored - r.p_corrupted).all()
    layer, pos, value = r.best("mlp")
    assert value == pytest.approx(float(r.indirect[1].max()))
    assert value == float(r.indirect[1, layer, r.positions.index(pos)])
    assert r.best("hidden", position=last)[1] == last
    fig = plotting.tracing_heatmap(r)
    assert len(fig.data) == 3
    assert any(label.endswith("*") for label in fig.data[0].y)
    assert fig.data[0].z.shape == (4, tiny_llama.cfg.n_layers)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"components": ["attn"]}, "unknown component"),
        ({"components": ["mlp", "mlp"]}, "distinct"),
        ({"windows": 0}, "window"),
        ({"windows": {"mlp": 2, "bogus": 1}}, "not traced"),
        ({"samples": 0}, "noise sample"),
        ({"noise": -1}, "noise must"),
        ({"positions": [99]}, "positions"),
    ],
)
def test_bad_arguments(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tracing.trace(tiny_llama, PROMPT, SUBJECT, TRUE, sigma=1.0, **kwargs)


def test_cli(tmp_path, capsys):
    out = tmp_path / "trace"
    args = ["trace", "--model", "tiny-llama", "--device", "cpu", "--records", "0", "--samples"]
    args += ["2", "--window", "mlp=3,attn_out=3", "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "largest indirect effect" in printed and "σ" in printed
    table = pd.read_csv(out / "tracing.csv")
    assert set(table.component) == {"hidden", "mlp", "attn_out"}
    assert "plotly" in (out / "tracing.html").read_text()[:5_000_000].lower()


@pytest.mark.slow
def test_smollm_traces_a_known_fact(smollm):
    """SmolLM2 knows that the Eiffel Tower is in Paris; corrupting the subject breaks it, and
    restoring the MLP or the hidden state at the subject's last token brings some of it back
    (little: in this small model the fact needs the whole subject, ' E' 'iffel' ' Tower'),
    most through the MLPs of the lower-middle layers."""
    ds = data.load_embedded()
    record = ds[0]
    r = record.request
    assert (r.subject, r.target_true) == (SUBJECT, TRUE)
    sigma = tracing.embedding_scale(smollm, [x.request.subject for x in ds.records])
    enc = encoding.encode_prompt(smollm, r.prompt, r.subject)
    t = tracing.trace(smollm, r.prompt, r.subject, r.target_true, sigma=sigma,
                      samples=3, components=["hidden", "mlp"],
                      positions=[enc.subject_last])  # fmt: skip
    assert t.p_clean > 0.2 and t.p_corrupted < 0.5 * t.p_clean
    assert float(t.indirect.max()) > 0.01  # from ~0.04 corrupted (3 samples)
    layer, _, effect = t.best("mlp")
    assert effect > 0.01 and 4 <= layer <= 20
    assert t.indirect.shape == (2, smollm.cfg.n_layers, 1)
