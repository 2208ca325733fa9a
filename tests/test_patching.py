import math

import pandas as pd
import pytest
import torch
from transformer_lens.patching import generic_activation_patch

from attndrift import capture, data, encoding, models, scoring
from attndrift.analysis import drift, patching
from attndrift.editing import rome
from tests.helpers import NEW, PROMPT, TRUE, edited, hook_free, quick_rome

# TransformerLens' short activation names of the two components (for its reference engine)
TL_NAME = {"attn": "pattern", "mlp": "mlp_out"}
HOOK = {"attn": models.pattern_hook, "mlp": models.mlp_out_hook}


def _set(component, act, pos, value):
    if component == "attn":
        act[:, :, pos, :] = value[:, :, pos, :]
    else:
        act[:, pos] = value[:, pos]
    return act


def _first_token_metrics(model, logits, last):
    t = encoding.encode_answer(model, TRUE)[0]
    n = encoding.encode_answer(model, NEW)[0]
    lp = logits[0, last].float().log_softmax(-1)
    diff = logits[0, last, n] - logits[0, last, t]
    return [lp[t].exp().item(), lp[n].exp().item(), diff.item()]


def tl_reference(model, target, source, component):
    """TransformerLens' generic_activation_patch, one forward per (layer, pos) cell."""
    tokens = encoding.encode_batch(model, [PROMPT]).tokens
    last = tokens.shape[1] - 1
    cache = capture.full(source, tokens)
    seen = []

    def metric(logits):
        seen.append(_first_token_metrics(model, logits, last))
        return torch.tensor(seen[-1][0])

    def setter(act, index, clean):
        return _set(component, act, index[1], clean)

    target = models.as_variant(target)
    with torch.no_grad(), model.hooks(fwd_hooks=list(target.hooks)):
        out = generic_activation_patch(
            model,
            tokens,
            cache,
            metric,
            setter,
            TL_NAME[component],
            index_axis_names=("layer", "pos"),
        )
    return torch.tensor(seen).reshape(*out.shape, 3)


def manual_reference(model, target, source, component, window):
    """One forward per cell with model.hooks: layers [l, l + window) patched at pos."""
    tokens = encoding.encode_batch(model, [PROMPT]).tokens
    last = tokens.shape[1] - 1
    cache = capture.full(source, tokens)
    target = models.as_variant(target)
    n_layers = model.cfg.n_layers
    out = torch.zeros(n_layers, last + 1, 3)
    for layer in range(n_layers):
        for pos in range(last + 1):
            hooks = [
                (
                    HOOK[component](lay),
                    lambda x, hook, pos=pos: _set(component, x, pos, cache[hook.name]),
                )
                for lay in range(layer, min(layer + window, n_layers))
            ]
            with torch.no_grad(), model.hooks(fwd_hooks=[*target.hooks, *hooks]):
                logits = model(tokens)
            out[layer, pos] = torch.tensor(_first_token_metrics(model, logits, last))
    return out


def _engine(result, c):
    return torch.stack([result.p_true[c], result.p_new[c], result.logit_diff[c]], dim=-1)


@pytest.mark.parametrize("direction", patching.DIRECTIONS)
def test_single_layer_cells_equal_transformer_lens(tiny, direction):
    vanilla, edit = tiny, edited(tiny)
    target, source = (edit, vanilla) if direction == "restore" else (vanilla, edit)
    # small budget: several chunks of cells per direction
    result = patching.patch(
        vanilla, edit, PROMPT, TRUE, NEW, direction=direction, max_batch_tokens=100
    )
    for c, component in enumerate(result.components):
        want = tl_reference(tiny, target, source, component)
        torch.testing.assert_close(_engine(result, c), want, atol=1e-5, rtol=1e-5)
    assert hook_free(tiny)


@pytest.mark.parametrize("direction", patching.DIRECTIONS)
def test_windows_equal_a_manual_loop(tiny, direction):
    vanilla, edit = tiny, edited(tiny)
    target, source = (edit, vanilla) if direction == "restore" else (vanilla, edit)
    result = patching.patch(vanilla, edit, PROMPT, TRUE, NEW, direction=direction, window=3)
    for c, component in enumerate(result.components):
        want = manual_reference(tiny, target, source, component, 3)
        torch.testing.assert_close(_engine(result, c), want, atol=1e-5, rtol=1e-5)


def test_patching_changes_what_the_edit_changed(tiny_llama):
    # the edit is at layer 1: attention of layers 0-1 and the MLP of layer 0 do not see it
    r = patching.patch(tiny_llama, edited(tiny_llama), PROMPT, TRUE, NEW, direction="restore")
    attn, mlp = r.components.index("attn"), r.components.index("mlp")
    torch.testing.assert_close(
        r.p_true[attn, :2], torch.full_like(r.p_true[attn, :2], r.target.p_true)
    )
    torch.testing.assert_close(r.p_true[mlp, 0], torch.full_like(r.p_true[mlp, 0], r.target.p_true))
    assert r.recovery[attn, :2].abs().max() < 1e-4
    # restoring the edited MLP output at the last token moves P(o_true) towards vanilla
    assert (r.p_true[mlp, 1] - r.target.p_true).abs().max() > 1e-6


def test_own_cache_changes_nothing(tiny):
    for model in (tiny, edited(tiny)):
        for r in [
            patching.patch(model, model, PROMPT, TRUE, NEW, direction=d, window=2)
            for d in patching.DIRECTIONS
        ]:
            assert r.target.p_true == r.source.p_true and r.target.p_new == r.source.p_new
            for name in ("p_true", "p_new", "logit_diff"):
                want = getattr(r.target, name)
                torch.testing.assert_close(
                    getattr(r, name), torch.full_like(r.p_true, want), atol=1e-6, rtol=1e-5
                )
            assert r.gain_pct.abs().max() < 1e-3
            assert torch.isnan(r.recovery).all()  # undefined: the two runs agree


def test_recovery_and_gain_follow_their_definitions(tiny):
    r = patching.patch(tiny, edited(tiny), PROMPT, TRUE, NEW, direction="restore")
    t, s = r.target.p_true, r.source.p_true
    torch.testing.assert_close(r.recovery, (r.p_true - t) / (s - t))
    torch.testing.assert_close(r.gain_pct, 100 * (r.p_true - t) / t)
    table = patching.frame(r)
    assert len(table) == r.p_true.numel()
    assert list(table.columns[:6]) == [
        "component",
        "direction",
        "window",
        "layer",
        "position",
        "token",
    ]
    row = table[(table.component == "mlp") & (table.layer == 2) & (table.position == 3)].iloc[0]
    assert row.p_true == pytest.approx(float(r.p_true[1, 2, 3]))
    assert row.token == r.tokens[3]


def test_full_answer_matches_the_scorer_and_a_manual_patch(tiny):
    answer_true, answer_new = "Paris France", "Rome Italy"  # several tokens each
    edit = edited(tiny)
    r = patching.patch(
        tiny, edit, PROMPT, answer_true, answer_new, direction="contaminate", full_answer=True
    )
    nll = scoring.answer_nll(tiny, [(PROMPT, answer_true), (PROMPT, answer_new)])
    assert r.target.p_true_full == pytest.approx(math.exp(-nll[0]), abs=1e-6)
    assert r.target.p_new_full == pytest.approx(math.exp(-nll[1]), abs=1e-6)
    # one cell by hand: the edited MLP output of layer 1 at the last prompt token
    prompt_ids = encoding.encode_prompt(tiny, PROMPT).ids
    ids = encoding.encode_answer(tiny, answer_true)
    tokens = torch.tensor([prompt_ids + ids[:-1]])
    cache = capture.full(edit, tokens)
    last = len(prompt_ids) - 1
    name = models.mlp_out_hook(1)

    def put(x, hook):
        x[:, last] = cache[name][:, last]
        return x

    with torch.no_grad(), tiny.hooks(fwd_hooks=[(name, put)]):
        lp = tiny(tokens)[0].log_softmax(-1)
    want = math.exp(float(torch.stack([lp[last + j, t] for j, t in enumerate(ids)]).mean()))
    assert float(r.p_true_full[r.components.index("mlp"), 1, last]) == pytest.approx(want, abs=1e-6)
    # the first-token metrics do not depend on the full-answer rows
    plain = patching.patch(tiny, edit, PROMPT, answer_true, answer_new, direction="contaminate")
    torch.testing.assert_close(plain.p_true, r.p_true, atol=1e-6, rtol=1e-5)
    assert torch.isnan(plain.p_true_full).all()


def test_chunking_does_not_change_results(tiny):
    edit = edited(tiny)
    one = patching.patch(tiny, edit, PROMPT, TRUE, NEW, direction="contaminate", max_cells=1)
    many = patching.patch(tiny, edit, PROMPT, TRUE, NEW, direction="contaminate", max_cells=7)
    for name in ("p_true", "p_new", "logit_diff"):
        torch.testing.assert_close(getattr(one, name), getattr(many, name), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must be positive"):
        patching.patch(tiny, edit, PROMPT, TRUE, NEW, direction="restore", max_cells=0)


def test_positions_subset(tiny):
    edit = edited(tiny)
    full = patching.patch(tiny, edit, PROMPT, TRUE, NEW, direction="restore")
    some = patching.patch(
        tiny, edit, PROMPT, TRUE, NEW, direction="restore", positions=[0, 4], components=["mlp"]
    )
    assert some.p_true.shape == (1, tiny.cfg.n_layers, 2) and some.positions == (0, 4)
    torch.testing.assert_close(some.p_true[0], full.p_true[1][:, [0, 4]])


def test_hooks_are_removed_also_after_an_exception(tiny):
    def boom(x, hook):
        if x.shape[0] > 1:  # only in the batched, patched passes
            raise RuntimeError("boom")
        return x

    bad = models.Variant(tiny, (*edited(tiny).hooks, (models.mlp_out_hook(3), boom)))
    with pytest.raises(RuntimeError, match="boom"):
        patching.patch(tiny, bad, PROMPT, TRUE, NEW, direction="restore")
    assert hook_free(tiny)


def test_bad_input_is_a_clear_error(tiny):
    edit = edited(tiny)
    with pytest.raises(ValueError, match="unknown component"):
        patching.patch(tiny, edit, PROMPT, TRUE, NEW, direction="restore", components=["mixer"])
    with pytest.raises(ValueError, match="unknown direction"):
        patching.patch(tiny, edit, PROMPT, TRUE, NEW, direction="sideways")
    with pytest.raises(ValueError, match="window must be"):
        patching.patch(tiny, edit, PROMPT, TRUE, NEW, direction="restore", window=0)
    with pytest.raises(ValueError, match="position out of range"):
        patching.patch(tiny, edit, PROMPT, TRUE, NEW, direction="restore", positions=[99])
    with pytest.raises(ValueError, match="unknown metric"):
        patching.patch(tiny, edit, PROMPT, TRUE, NEW, direction="restore", positions=[0]).metric(
            "loss"
        )
    with pytest.raises(ValueError, match="mismatched models"):
        patching.restore(models.tiny_model("gpt2"), models.tiny_model("llama"), PROMPT, TRUE, NEW)


@pytest.mark.slow
def test_smollm_cells_equal_transformer_lens(smollm):
    record = data.load_embedded()[0]
    edit = quick_rome(smollm, record)
    probe = record.probes(["DNS"])[0]
    true, new = drift.answers(probe)
    enc = encoding.encode_prompt(smollm, probe.prompt, probe.subject)
    positions = [enc.subject_last, enc.last]
    edited_layer = rome.preset(smollm).layer  # quick_rome edits the preset layer
    layers = [0, edited_layer - 1, edited_layer, 22, 29]
    results = [
        patching.patch(smollm, edit, probe.prompt, true, new, direction=d, positions=positions)
        for d in patching.DIRECTIONS
    ]
    tokens = torch.tensor([enc.ids])
    t_id = encoding.encode_answer(smollm, true)[0]
    cells = pd.DataFrame(
        [(layer, pos) for layer in layers for pos in positions], columns=["layer", "pos"]
    )
    for r in results:
        target, source = (edit, smollm) if r.direction == "restore" else (smollm, edit)
        cache = capture.full(source, tokens)
        for c, component in enumerate(r.components):

            def setter(act, index, clean, component=component):
                return _set(component, act, index[1], clean)

            with torch.no_grad(), smollm.hooks(fwd_hooks=list(models.as_variant(target).hooks)):
                want = generic_activation_patch(
                    smollm,
                    tokens,
                    cache,
                    lambda logits: logits[0, enc.last].float().softmax(-1)[t_id],
                    setter,
                    TL_NAME[component],
                    index_df=cells,
                )
            got = r.p_true[c][layers][:, [0, 1]].flatten()
            torch.testing.assert_close(got, want.cpu(), atol=1e-5, rtol=0)
    restore = results[0]
    # restoring the vanilla MLP output at the edited layer and the subject's last token
    mlp = restore.components.index("mlp")
    assert restore.p_true[mlp, edited_layer, 0] > restore.target.p_true
