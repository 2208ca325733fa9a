import dataclasses
import re

import pandas as pd
import pytest
import torch

from attndrift import cli, data, encoding, models, plotting
from attndrift.analysis import drift, knockout
from attndrift.editing import rome

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT, TRUE, NEW = "Eiffel Tower", "Paris", "Rome"


def edited_variant(model):
    """A stand-in edit: a larger MLP output in layer 1 (vanilla and edited differ)."""
    return models.Variant(model, ((models.mlp_out_hook(1), lambda x, hook: 3 * x),))


def reference(variant, window, queries, keys):
    """One forward per window start: scores of (query, key) pairs set to -inf in
    layers [l, l + window), every head."""
    variant = models.as_variant(variant)
    model = variant.model
    tokens = torch.tensor([encoding.encode_prompt(model, PROMPT).ids])
    ids = [encoding.encode_answer(model, a)[0] for a in (TRUE, NEW)]
    q, k = torch.tensor(queries)[:, None], torch.tensor(keys)

    def block(x, hook):
        x[:, :, q, k] = float("-inf")
        return x

    def probs(hooks):
        with torch.no_grad(), model.hooks(fwd_hooks=[*variant.hooks, *hooks]):
            logits = model(tokens)
        return logits[0, -1].float().softmax(-1)[ids]

    n = model.cfg.n_layers
    base = probs([])
    blocked = torch.stack(
        [
            probs([(models.attn_scores_hook(lay), block) for lay in range(s, min(s + window, n))])
            for s in range(n)
        ]
    )
    return base, blocked


def test_matches_one_forward_per_window(tiny):
    edited = edited_variant(tiny)
    enc = encoding.encode_prompt(tiny, PROMPT, SUBJECT)
    keys = list(range(enc.subject_first, enc.subject_last + 1))
    # a budget of 2 rows per pass: the windows are cut into several passes
    k = knockout.run(tiny, edited, PROMPT, SUBJECT, TRUE, NEW, window=2,
                     max_batch_tokens=2 * (enc.last + 1))  # fmt: skip
    assert k.queries == (enc.last,) and k.keys == tuple(keys) and k.models == ("vanilla", "edited")
    for i, variant in enumerate((tiny, edited)):
        base, blocked = reference(variant, 2, [enc.last], keys)
        torch.testing.assert_close(k.base_true[i], base[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(k.base_new[i], base[1], atol=1e-6, rtol=0)
        torch.testing.assert_close(k.p_true[i], blocked[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(k.p_new[i], blocked[:, 1], atol=1e-5, rtol=0)
    assert k.base_new[0] != k.base_new[1]  # the stand-in edit changed the model
    assert k.delta_new.abs().max() > 1e-4  # blocking the subject matters somewhere
    torch.testing.assert_close(k.delta_true, k.p_true - k.base_true[:, None])


def test_other_queries_and_keys(tiny_llama):
    """Any query and key sets (here: two queries, keys before the subject), window 3."""
    enc = encoding.encode_prompt(tiny_llama, PROMPT, SUBJECT)
    queries, keys = [enc.last - 1, enc.last], [0, 1, enc.subject_last]
    k = knockout.run(tiny_llama, tiny_llama, PROMPT, None, TRUE, NEW, window=3, queries=queries,
                     keys=keys)  # fmt: skip
    _, blocked = reference(tiny_llama, 3, queries, keys)
    torch.testing.assert_close(k.p_true[1], blocked[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(k.p_true[0], k.p_true[1], atol=0, rtol=0)  # same model twice


def test_knocking_out_nothing_changes_nothing(tiny):
    k = knockout.run(tiny, edited_variant(tiny), PROMPT, SUBJECT, TRUE, NEW, keys=[])
    assert k.keys == ()
    torch.testing.assert_close(k.delta_true, torch.zeros_like(k.p_true), atol=1e-6, rtol=0)
    torch.testing.assert_close(k.delta_new, torch.zeros_like(k.p_new), atol=1e-6, rtol=0)


def test_knocking_out_an_ignored_key_changes_nothing(tiny):
    """A query never attends to later keys (the causal mask): blocking them changes nothing."""
    enc = encoding.encode_prompt(tiny, PROMPT, SUBJECT)
    later = list(range(enc.subject_last + 1, enc.last + 1))
    k = knockout.run(tiny, edited_variant(tiny), PROMPT, SUBJECT, TRUE, NEW, window=4,
                     queries=[enc.subject_last], keys=later)  # fmt: skip
    torch.testing.assert_close(k.delta_true, torch.zeros_like(k.p_true), atol=1e-6, rtol=0)
    torch.testing.assert_close(k.delta_new, torch.zeros_like(k.p_new), atol=1e-6, rtol=0)


def test_blocking_every_key_in_every_layer_isolates_the_last_token(tiny_llama):
    """With the last token blind to every earlier token in all layers, the prediction is that
    of the last token alone."""
    enc = encoding.encode_prompt(tiny_llama, PROMPT, SUBJECT)
    k = knockout.run(tiny_llama, tiny_llama, PROMPT, SUBJECT, TRUE, NEW, window=4,
                     keys=range(enc.last))  # fmt: skip
    alone = knockout.run(tiny_llama, tiny_llama, tiny_llama.tokenizer.decode(enc.ids[-1:]),
                         None, TRUE, NEW, keys=[])  # fmt: skip
    # the rotary position differs, but a token alone attends only to itself: same output
    torch.testing.assert_close(k.p_true[0, 0], alone.base_true[0], atol=1e-5, rtol=0)


def test_frame_removed_and_figure(tiny):
    k = knockout.run(tiny, edited_variant(tiny), PROMPT, SUBJECT, TRUE, NEW, window=2)
    table = k.frame()
    n = tiny.cfg.n_layers
    assert len(table) == 2 * n and list(table.model.unique()) == ["vanilla", "edited"]
    assert table.last_layer.tolist()[:n] == [1, 2, 3, 3]
    edited = table[table.model == "edited"]
    assert edited.delta_new.tolist() == pytest.approx(k.delta_new[1].tolist())
    assert edited.relative_new_pct.tolist() == pytest.approx(
        (100 * k.delta_new[1] / k.base_new[1]).tolist(), rel=1e-5
    )
    torch.testing.assert_close(k.removed("edited"), -k.delta_new[1] / k.base_new[1])
    with pytest.raises(ValueError, match="unknown model"):
        k.removed("other")
    fig = plotting.knockout_figure(k)
    assert len(fig.data) == 4 and {d.line.dash for d in fig.data} == {"dot", "solid"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 0}, "window"),
        ({"keys": [99]}, "key positions out of range"),
        ({"queries": [-1]}, "query positions out of range"),
    ],
)
def test_bad_arguments(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        knockout.run(tiny_llama, tiny_llama, PROMPT, SUBJECT, TRUE, NEW, **kwargs)


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["knockout", "--help"])
    out = capsys.readouterr().out
    for flag in ("--window", "--kind", "--probe", "--edit", "--identity-cov", "--out"):
        assert flag in out
    args = ["knockout", "--model", "tiny-llama", "--device", "cpu", "--records", "0"]
    args += ["--identity-cov", "--steps", "2", "--window", "2", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "removes most of the edited P(o_new)" in printed
    assert len(re.findall(r"layers \d-\d: edited P\(o_new\)", printed)) == 3  # --top 3
    table = pd.read_csv(tmp_path / "knockout.csv")
    assert len(table) == 2 * 4 and set(table.model) == {"vanilla", "edited"}
    assert "plotly" in (tmp_path / "knockout.html").read_text()[:5_000_000].lower()


@pytest.mark.slow
def test_smollm_knockout_of_a_rome_edit(smollm, tmp_path):
    """A quick ROME edit of SmolLM2, knocked out on a distracting-neighbour prompt."""
    record = data.load_embedded()[0]
    cfg = rome.preset(smollm)
    cfg = dataclasses.replace(cfg, covariance=None, value=dataclasses.replace(cfg.value, steps=5))
    e = rome.edit(smollm, record.request, cfg)
    edited = models.Variant(smollm, e.hooks(smollm))
    probe = record.probes(["DNS"])[0]
    true, new = drift.answers(probe)
    k = knockout.run(smollm, edited, probe.prompt, probe.subject, true, new, window=6)
    n = smollm.cfg.n_layers
    assert k.p_new.shape == (2, n) and len(k.keys) >= 2
    assert torch.isfinite(k.p_new).all() and ((k.p_new >= 0) & (k.p_new <= 1)).all()
    assert k.base_new[1] > k.base_new[0]  # the edit raises P(o_new) on the neighbour prompt
    # cutting the last token off the subject removes part of the edited P(o_new) somewhere
    assert float(k.removed("edited").max()) > 0
    table = k.frame()
    assert isinstance(table, pd.DataFrame) and len(table) == 2 * n
