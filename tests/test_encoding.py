import pytest
import torch

from attndrift import encoding, models


@pytest.mark.parametrize(
    ("prompt", "subject"),
    [
        ("Eiffel Tower is located in the city of", "Eiffel Tower"),  # start
        ("The Eiffel Tower is located in the city of", "Eiffel Tower"),  # middle
        ("The tower in Paris is the Eiffel Tower", "Eiffel Tower"),  # end
        ("Paris is the capital of France", "Paris"),  # no leading space
        ("The capital of France is Paris", "Paris"),  # leading space: different token
    ],
)
def test_subject_span_decodes_to_subject(tiny, prompt, subject):
    enc = encoding.encode_prompt(tiny, prompt, subject)
    span = enc.ids[enc.subject_first : enc.subject_last + 1]
    text = tiny.tokenizer.decode(list(span))
    assert text.strip() == subject
    bos = len(models.bos_prefix(tiny))
    assert list(enc.ids[:bos]) == models.bos_prefix(tiny)
    # the tokens before the span do not contain the subject
    assert subject not in tiny.tokenizer.decode(list(enc.ids[bos : enc.subject_first]))


def test_leading_space_subject_tokenises_differently(tiny):
    start = encoding.encode_prompt(tiny, "Paris is big", "Paris")
    end = encoding.encode_prompt(tiny, "I love Paris", "Paris")
    a = start.ids[start.subject_first : start.subject_last + 1]
    b = end.ids[end.subject_first : end.subject_last + 1]
    assert a != b  # "Paris" vs " Paris"


def test_last_occurrence_of_subject_is_used(tiny):
    enc = encoding.encode_prompt(tiny, "Paris is in France. Paris is", "Paris")
    bos = len(models.bos_prefix(tiny))
    assert enc.subject_first > bos + 2


def test_missing_subject_and_empty_prompt(tiny):
    with pytest.raises(ValueError, match="not found in prompt"):
        encoding.encode_prompt(tiny, "The Louvre", "Paris")
    with pytest.raises(ValueError, match="empty prompt"):
        encoding.encode_prompt(tiny, "  ")
    with pytest.raises(ValueError, match="empty answer"):
        encoding.encode_answer(tiny, " ")


def test_batch_positions_under_right_padding(tiny):
    prompts = ["The Eiffel Tower is in", "Rome", "The capital of Italy is the city of"]
    subjects = ["Eiffel Tower", "Rome", "Italy"]
    batch = encoding.encode_batch(tiny, prompts, subjects)
    for i, (p, s) in enumerate(zip(prompts, subjects, strict=True)):
        one = encoding.encode_prompt(tiny, p, s)
        n = len(one.ids)
        assert batch.tokens[i, :n].tolist() == list(one.ids)
        assert (batch.tokens[i, n:] == models.pad_id(tiny)).all()
        assert batch.last[i] == n - 1 == batch.lengths[i] - 1
        assert (batch.subject_first[i], batch.subject_last[i]) == (
            one.subject_first,
            one.subject_last,
        )


def test_padding_does_not_change_real_positions(tiny):
    batch = encoding.encode_batch(tiny, ["Rome", "The Eiffel Tower is located in the city of"])
    with torch.no_grad():
        padded = tiny(batch.tokens)[0, : batch.lengths[0]]
        alone = tiny(batch.tokens[:1, : batch.lengths[0]])[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_mismatched_subjects(tiny):
    with pytest.raises(ValueError, match="2 prompts but 1 subjects"):
        encoding.encode_batch(tiny, ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty batch"):
        encoding.pad(tiny, [])
