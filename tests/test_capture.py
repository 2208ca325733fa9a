import pytest
import torch

from attndrift import capture, encoding, models
from tests.helpers import PROMPTS, SUBJECTS, edited, hook_free


def test_subject_spans_and_last_token_come_from_the_encoding(tiny):
    batch = encoding.encode_batch(tiny, PROMPTS, SUBJECTS)
    for i, subject in enumerate(SUBJECTS):
        span = batch.tokens[i, batch.subject_first[i] : batch.subject_last[i] + 1]
        assert tiny.tokenizer.decode(span.tolist()).strip() == subject
        assert batch.last[i] == batch.lengths[i] - 1
    # "Eiffel Tower" at the start and at the end of a prompt tokenises differently
    first = batch.tokens[0, batch.subject_first[0] : batch.subject_last[0] + 1].tolist()
    end = batch.tokens[2, batch.subject_first[2] : batch.subject_last[2] + 1].tolist()
    assert first != end


@pytest.mark.parametrize("variant", ["vanilla", "edited"])
def test_capture_equals_full_cache_rows(tiny, variant):
    model = tiny if variant == "vanilla" else edited(tiny)
    batch = encoding.encode_batch(tiny, PROMPTS, SUBJECTS)
    cap = capture.run(model, batch, queries="last", mlp_positions="subject_last")
    rows = torch.arange(len(PROMPTS))
    for i, layer in enumerate(cap.layers):
        # one prompt at a time, unpadded: the definition
        for b, prompt in enumerate(PROMPTS):
            one = encoding.encode_batch(tiny, [prompt], [SUBJECTS[b]])
            cache = capture.full(model, one.tokens)
            n = int(one.lengths[0])
            want_row = cache[models.pattern_hook(layer)][0, :, one.last[0], :n]
            got_row = cap.pattern[b, i, :, 0]
            torch.testing.assert_close(got_row[:, :n], want_row, atol=1e-5, rtol=0)
            assert (got_row[:, n:] == 0).all()  # causal: padding gets no attention
            want_mlp = cache[models.mlp_out_hook(layer)][0, one.subject_last[0]]
            # float32 sums in another (batched) order: the error scales with the vector's size
            # (the random edit makes it ~30), so the tolerance does too; a wrong row is O(scale)
            tol = 1e-5 * max(1.0, want_mlp.abs().max().item())
            torch.testing.assert_close(cap.mlp_out[b, i, 0], want_mlp, atol=tol, rtol=1e-5)
    assert cap.pattern.shape == (
        len(PROMPTS),
        tiny.cfg.n_layers,
        tiny.cfg.n_heads,
        1,
        batch.tokens.shape[1],
    )
    assert torch.equal(cap.queries[:, 0], batch.last)
    assert torch.equal(cap.positions[rows, 0], batch.subject_last)
    assert hook_free(tiny)


def test_edit_changes_the_captured_mlp_output_of_its_layer(tiny):
    batch = encoding.encode_batch(tiny, PROMPTS, SUBJECTS)
    pair = capture.pair(tiny, edited(tiny), batch, queries=None, mlp_positions="last")
    same = pair.vanilla.mlp_out == pair.edited.mlp_out  # [batch, layer, 1, d_model]
    assert same[:, 0].all()  # before the edited layer: identical
    assert not same[:, 1].any()  # the edited layer: changed everywhere


def test_every_query_row_and_chosen_layers(tiny):
    batch = encoding.encode_batch(tiny, PROMPTS, SUBJECTS)
    cap = capture.run(tiny, batch, layers=(2, 0), queries="all")
    assert cap.layers == (2, 0) and cap.mlp_out is None
    cache = capture.full(tiny, batch.tokens)
    for i, layer in enumerate((2, 0)):
        torch.testing.assert_close(cap.pattern[:, i], cache[models.pattern_hook(layer)])


def test_explicit_positions_per_row(tiny):
    batch = encoding.encode_batch(tiny, PROMPTS, SUBJECTS)
    pos = torch.stack([batch.subject_first, batch.subject_last, batch.last], dim=1)
    cap = capture.run(tiny, batch, layers=(1,), queries=pos, mlp_positions=pos[:, :1])
    cache = capture.full(tiny, batch.tokens)
    pattern = cache[models.pattern_hook(1)]
    for b in range(len(PROMPTS)):
        for j in range(3):
            assert torch.equal(cap.pattern[b, 0, :, j], pattern[b, :, pos[b, j]])
        assert torch.equal(cap.mlp_out[b, 0, 0], cache[models.mlp_out_hook(1)][b, pos[b, 0]])


def test_gqa_models_report_every_query_head(tiny_llama):
    assert tiny_llama.cfg.n_key_value_heads < tiny_llama.cfg.n_heads
    batch = encoding.encode_batch(tiny_llama, PROMPTS, SUBJECTS)
    cap = capture.run(tiny_llama, batch)
    assert cap.pattern.shape[2] == tiny_llama.cfg.n_heads


def test_tensors_stay_on_the_model_device(tiny):
    batch = encoding.encode_batch(tiny, PROMPTS, SUBJECTS)
    cap = capture.run(tiny, batch, mlp_positions="last")
    device = models.model_device(tiny)
    assert cap.pattern.device == cap.mlp_out.device == cap.queries.device == device


def test_hooks_are_removed_also_after_an_exception(tiny):
    batch = encoding.encode_batch(tiny, PROMPTS, SUBJECTS)

    def boom(x, hook):
        raise RuntimeError("boom")

    bad = models.Variant(tiny, ((models.mlp_out_hook(2), boom),))
    with pytest.raises(RuntimeError, match="boom"):
        capture.run(bad, batch, mlp_positions="last")
    assert hook_free(tiny)


def test_bad_input_is_a_clear_error(tiny):
    batch = encoding.encode_batch(tiny, PROMPTS, SUBJECTS)
    no_subject = encoding.encode_batch(tiny, PROMPTS)
    with pytest.raises(ValueError, match="unknown positions"):
        capture.run(tiny, batch, queries="first")
    with pytest.raises(ValueError, match="position out of range"):
        capture.run(tiny, batch, queries=batch.lengths[:, None])
    with pytest.raises(ValueError, match="rows but the batch has"):
        capture.run(tiny, batch, queries=batch.last[:2, None])
    with pytest.raises(ValueError, match="needs a subject"):
        capture.run(tiny, no_subject, queries="subject_last")
    with pytest.raises(ValueError, match="out of range"):
        capture.run(tiny, batch, layers=(tiny.cfg.n_layers,))
    with pytest.raises(ValueError, match="repeated layers"):
        capture.run(tiny, batch, layers=(1, 1))
    with pytest.raises(ValueError, match="nothing to capture"):
        capture.run(tiny, batch, queries=None)


def test_mismatched_models_are_refused():
    gpt2, llama = models.tiny_model("gpt2"), models.tiny_model("llama")
    batch = encoding.encode_batch(gpt2, PROMPTS, SUBJECTS)
    with pytest.raises(ValueError, match="mismatched models"):
        capture.pair(gpt2, llama, batch)
