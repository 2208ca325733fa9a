"""Helpers shared by several test modules."""

import dataclasses
import json
import os

import pytest
import torch

from attndrift import data, models
from attndrift.editing import edits, rome, setting, value
from attndrift.experiments import results

#: the device of the tiny-model tests (``ATTNDRIFT_TEST_DEVICE``, see conftest.py)
DEVICE = os.environ.get("ATTNDRIFT_TEST_DEVICE", "cpu")


def needs_cpu(reason: str):
    """Mark a test that cannot run with the tiny models on another device, saying why."""
    return pytest.mark.skipif(DEVICE != "cpu", reason=f"runs on the CPU only: {reason}")


def skip_if_cuda_here(case: str) -> None:
    """Skip a case that shows the error for a missing CUDA, on a machine that has one."""
    if "cuda" in case and torch.cuda.is_available():
        pytest.skip("CUDA is available here: the error for a missing CUDA cannot happen")


#: the request most tests edit (:func:`request` builds its variants)
REQUEST = data.EditRequest(
    subject="Eiffel Tower",
    prompt="The Eiffel Tower is located in the city of",
    target_true="Paris",
    target_new="Rome",
)
#: the context templates of the editor tests: the bare prompt and two prefixes
TEMPLATES = ("{}", "Once upon a time. {}", "I think so. {}")
#: prefixes of different lengths, so that the cached prefixes need padding
PADDED_TEMPLATES = (*TEMPLATES, "The the the the the the. {}")


def request(**changes) -> data.EditRequest:
    """:data:`REQUEST` with some fields changed, e.g. ``request(target_new="Tokyo")``."""
    return dataclasses.replace(REQUEST, **changes)


#: two requests edited together by the batch editors' tests (MEMIT, PMET, AlphaEdit)
BATCH_REQUESTS = [
    data.EditRequest(
        subject="Eiffel Tower",
        prompt="The Eiffel Tower is located in the city of",
        target_true="Paris",
        target_new="Rome",
    ),
    data.EditRequest(
        subject="Louvre",
        prompt="The Louvre is located in the city of",
        target_true="Paris",
        target_new="London",
    ),
]
BATCH_TEMPLATES = TEMPLATES


def make_line(
    record: int, probes: list[tuple[str, int]], steps_run: int | None = None, **fields
) -> results.Line:
    """A sweep line of the tiny model's preset under ``Setting(**fields)`` whose edited
    probes succeed as given: ``[(kind, 1 or 0), ...]`` (the unedited ones all fail)."""
    s = setting.Setting(**fields)
    config = json.loads(json.dumps(dataclasses.asdict(s.config("tiny-llama"))))
    post = tuple(results.ProbeScore(k, 0.6 if ok else 0.4, 0.5) for k, ok in probes)
    pre = tuple(results.ProbeScore(k, 0.4, 0.5) for k, _ in probes)
    return results.Line(
        record=record,
        setting=s,
        editor=s.editor,
        layers=(1,),
        request=REQUEST,
        pre=pre,
        post=post,
        fluency_pre=None,
        fluency_post=None,
        drift=results.DriftScores((), (), (), (), (), ()),
        steps_run=steps_run if steps_run is not None else config["value"]["steps"],
        final={},
        config=config,
        seconds={},
        provenance=None,
    )


# subject at the start (no leading space), in the middle, at the end, and twice
PROMPTS = [
    "Eiffel Tower is located in the city of",
    "The capital of France is the city of",
    "The tower in Paris is the Eiffel Tower",
    "Paris is in France. Paris is",
]


SUBJECTS = ["Eiffel Tower", "France", "Eiffel Tower", "Paris"]


def random_edit(model, layer: int = 1, seed: int = 0) -> edits.Edit:
    """A rank-one edit with random factors (no optimisation): something to measure."""
    g = torch.Generator().manual_seed(seed)
    req = data.EditRequest(
        subject="Eiffel Tower",
        prompt="The Eiffel Tower is in",
        target_true="Paris",
        target_new="Rome",
    )
    return edits.Edit(
        layers=(layer,),
        left=(torch.randn(model.cfg.d_mlp, 1, generator=g),),
        right=(torch.randn(1, model.cfg.d_model, generator=g),),
        requests=(req,),
        editor="random",
    )


def edited(model) -> models.Variant:
    return models.Variant(model, random_edit(model).hooks(model))


def hook_free(model) -> bool:
    """No forward hook left anywhere on the model."""
    return all(not hp.fwd_hooks for hp in model.hook_dict.values())


def two_records() -> list[data.Record]:
    """Two facts with RS and DNS probes that mention their subject."""
    facts = [
        ("Eiffel Tower", "The Eiffel Tower is located in the city of", "Rome", "Paris"),
        ("Colosseum", "The Colosseum is located in the city of", "Paris", "Rome"),
    ]
    out = []
    for i, (subject, prompt, new, true) in enumerate(facts):
        out.append(
            data.Record(
                id=i,
                request=data.EditRequest(
                    subject=subject, prompt=prompt, target_true=true, target_new=new
                ),
                neighborhood=(("The Louvre museum is in", true), ("Big Ben is in", "London")),
                relation=(
                    (f"The {subject} is a", "tower"),
                    (f"Apple was founded near the {subject} by", "Steve Jobs"),
                ),
            )
        )
    return out


def quick_rome(model, record) -> models.Variant:
    """ROME at the preset with 10 steps, no covariance, one template: a fast real edit."""
    cfg = rome.preset(model)
    cfg = dataclasses.replace(cfg, covariance=None, value=dataclasses.replace(cfg.value, steps=10))
    e = rome.edit(model, record.request, cfg, templates=("{}",))
    return models.Variant(model, e.hooks(model), name="rome")


PROMPT = "The Eiffel Tower is located in the city of"


TRUE, NEW = "Paris", "Rome"


def assert_same_run(ref: value.ValueResult, new: value.ValueResult, rel=1e-5):
    assert len(ref.trace) == len(new.trace)
    for a, b in zip(ref.trace, new.trace, strict=True):
        for name in ("loss", "nll", "weight_decay", "p_new"):
            x, y = getattr(a, name), getattr(b, name)
            assert y == pytest.approx(x, rel=rel, abs=1e-7), (a.step, name, x, y)
        # the two KL terms are small differences of large sums: compared against the loss
        for name in ("kl", "sadr"):
            x, y = getattr(a, name), getattr(b, name)
            assert y == pytest.approx(x, abs=rel * a.loss), (a.step, name, x, y)
        assert a.heads == b.heads, a.step  # the same heads restrained at every step
    # (float32 activations of two computation orders: seen 6e-6 on SmolLM2's values of ~1)
    torch.testing.assert_close(new.init, ref.init, rtol=1e-5, atol=1e-5 * ref.init.abs().max())
    scale = ref.delta.norm()
    assert (new.delta - ref.delta).norm() <= 1e-4 * scale
    torch.testing.assert_close(new.target, ref.target, rtol=1e-4, atol=1e-5 * scale)
