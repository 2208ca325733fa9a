"""Fault injection: Ctrl-C at any moment of an edit leaves the model exactly as it was.

A KeyboardInterrupt is raised at the N-th traced line event (``sys.settrace``: every Python
line of the call and of everything it calls, attndrift, TransformerLens and PyTorch alike) of
``rome.edit``, ``memit.edit`` and a forward pass under ``edits.applied``, N drawn uniformly
within the call's length (its line events, counted once without interruption) from a fixed
seed. After every draw: every parameter is bit-exact (values and strides), ``requires_grad``
flags are as before, no hook point holds a hook (TransformerLens' lists and torch's own
tables) and ``model.context_level`` is back to 0; torch's grad mode and the thread's signal
mask are as before.
"""

import random
import signal
import sys
from collections import Counter

import pytest
import torch

from attndrift import data, edits, memit, models, rome
from attndrift.sadr import SadrConfig
from attndrift.value import ValueConfig

TEMPLATES = ("{}", "Once upon a time. {}", "I think so. {}")
REQ = data.EditRequest(
    subject="Eiffel Tower",
    prompt="The Eiffel Tower is located in",
    target_true="Paris",
    target_new="Rome",
)
OTHER = data.EditRequest(
    subject="Louvre", prompt="The Louvre is in", target_true="Paris", target_new="Berlin"
)
DRAWS = {"rome": 80, "rome+sadr": 20, "memit": 50, "applied": 70}  # 220 draws in all


#: the test run's runtime type checks (not there outside the tests): their own lines untraced
_CHECKERS = ("<@beartype", "/beartype/", "/jaxtyping/")
#: weak reference callbacks: called from C, like ``__del__``
_FINALIZERS = ("/weakref.py", "/_weakrefset.py")


def _untraced(frame, depth: int = 8) -> bool:
    """Type-check wrappers; finalizers (``__del__``, weak reference callbacks) and what they
    call: Python ignores an exception raised there, so it would not interrupt the call."""
    if any(s in frame.f_code.co_filename for s in _CHECKERS):
        return True
    f = frame
    for _ in range(depth):
        if f is None:
            return False
        if f.f_code.co_name == "__del__" or any(s in f.f_code.co_filename for s in _FINALIZERS):
            return True
        f = f.f_back
    return False


class _Tracer:
    """A trace function counting line events; raises KeyboardInterrupt at event ``at``."""

    def __init__(self, at: int | None = None):
        self.at, self.count = at, 0

    def __call__(self, frame, event, arg):
        if event == "call" and _untraced(frame):
            return None
        if event == "line":
            self.count += 1
            if self.count == self.at:
                raise KeyboardInterrupt(f"injected at line event {self.at}")
        return self


def _traced(fn, tracer: _Tracer):
    sys.settrace(tracer)
    try:
        return fn()
    finally:
        sys.settrace(None)


def _state(model) -> dict:
    return {
        n: (p.detach().clone(), p.stride(), p.requires_grad) for n, p in model.named_parameters()
    }


def _assert_intact(model, state: dict, where: str) -> None:
    for n, p in model.named_parameters():
        saved, stride, grad = state[n]
        assert torch.equal(p, saved), f"{where}: {n} changed"
        assert p.stride() == stride, f"{where}: {n}: strides changed"
        assert p.requires_grad == grad, f"{where}: {n}: requires_grad changed"
    hooked = [k for k, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
    assert not hooked, f"{where}: hooks left on {hooked[:3]}"
    hooked = [k for k, hp in model.hook_dict.items() if hp._forward_hooks or hp._backward_hooks]
    assert not hooked, f"{where}: torch hooks left on {hooked[:3]}"
    assert model.context_level == 0, f"{where}: context_level {model.context_level}"
    assert torch.is_grad_enabled(), f"{where}: grad mode left off"
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set(), f"{where}: signals blocked"


@pytest.fixture(scope="module")
def calls():
    """name -> (model, the call): each a small, complete use of the library."""
    llama, gpt2, gptj = (models.tiny_model(a, seed=0) for a in ("llama", "gpt2", "gptj"))
    # mixed requires_grad flags: the optimisation freezes them and must put them back
    gpt2.blocks[0].attn.W_Q.requires_grad_(False)
    value = ValueConfig(steps=2)
    rome_cfg = rome.RomeConfig(layer=1, covariance=None, value=value)
    sadr_cfg = rome.RomeConfig(layer=2, covariance=None, value=value)  # SADR reads layer 3
    memit_cfg = memit.MemitConfig(layers=(1, 2), covariance=None, value=value)
    saved = rome.edit(gptj, REQ, rome_cfg, templates=TEMPLATES)
    tokens = torch.tensor([[1, 5, 9, 13, 17, 21]])

    def forward_under_edit():
        with edits.applied(gptj, saved):
            return gptj(tokens)

    return {
        "rome": (llama, lambda: rome.edit(llama, REQ, rome_cfg, templates=TEMPLATES)),
        "rome+sadr": (
            gpt2,
            lambda: rome.edit(gpt2, REQ, sadr_cfg, sadr=SadrConfig(gamma=0.5), templates=TEMPLATES),
        ),
        "memit": (
            gptj,
            lambda: memit.edit(gptj, [REQ, OTHER], memit_cfg, templates=TEMPLATES),
        ),
        "applied": (gptj, forward_under_edit),
    }


@pytest.mark.parametrize("name", list(DRAWS))
def test_interrupt_anywhere_restores_everything(name, calls):
    model, call = calls[name]
    state = _state(model)
    call()  # warm caches (fingerprint, imports) so that the count below is what draws see
    counter = _Tracer()
    _traced(call, counter)
    length = counter.count
    assert length > 100, length
    print(f"{name}: {length} line events")
    _assert_intact(model, state, f"{name} uninterrupted")
    rng = random.Random(f"{name}-0")
    outcomes: Counter = Counter()
    for _ in range(DRAWS[name]):
        at = rng.randint(1, length)
        try:
            _traced(call, _Tracer(at))
            outcomes["completed"] += 1
        except KeyboardInterrupt:
            outcomes["interrupted"] += 1
        _assert_intact(model, state, f"{name}, interrupt at line event {at} of {length}")
    assert outcomes["interrupted"] >= 0.9 * DRAWS[name], outcomes
    # the model still works: an uninterrupted call after all the faults gives the same edit
    if name != "applied":
        again = call()
        _assert_intact(model, state, f"{name} after the draws")
        assert again.layers


def test_draw_count():
    assert sum(DRAWS.values()) >= 200
