"""Shared fixtures: tiny random models of three architectures, and the embedded SmolLM2.

``ATTNDRIFT_TEST_DEVICE`` (default ``cpu``) is the device of the tiny models: the
``tiny`` / ``tiny_llama`` fixtures and every ``models.tiny_model(...)`` a test builds without
naming a device. ``ATTNDRIFT_TEST_DEVICE=cuda pytest -m "not slow"`` runs the tiny-model tests
on the GPU; ``torch.testing.assert_close`` then compares values wherever they live, and a test
that cannot run there skips, saying why (``tests.helpers.needs_cpu``). Tests that name
``--device cpu`` and the SmolLM2 tests stay on the CPU.
"""

import functools
import os
from pathlib import Path

import pytest
import torch

from attndrift import models
from tests.helpers import DEVICE


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"ATTNDRIFT_TEST_DEVICE={name!r} is not a device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"ATTNDRIFT_TEST_DEVICE={name}: CUDA is not available here")


def pytest_configure(config) -> None:
    _check_device(DEVICE)
    if DEVICE == "cpu":
        return
    # tiny models built without a device go to DEVICE (load_model passes its own device)
    plain = models.tiny.tiny_model

    @functools.wraps(plain)
    def on_device(arch="llama", seed=0, device=None, dtype=torch.float32, **sizes):
        return plain(arch, seed, DEVICE if device is None else device, dtype, **sizes)

    models.tiny_model = models.tiny.tiny_model = on_device
    # compare values wherever they live (a result on the GPU against one computed on the CPU)
    torch.testing.assert_close = functools.partial(torch.testing.assert_close, check_device=False)


@pytest.fixture(scope="session", params=models.TINY_ARCHS)
def tiny(request):
    """A tiny random model of each architecture (GPT-2, GPT-J, Llama/GQA), on DEVICE."""
    return models.tiny_model(request.param, seed=0, device=DEVICE)


@pytest.fixture(scope="session")
def tiny_llama():
    return models.tiny_model("llama", seed=0, device=DEVICE)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M (converted once per cache directory)."""
    return models.load_model(models.EMBEDDED_MODEL, device="cpu")


#: 40 merged-format records shipped with the tests (MIT, see tests/fixtures/README.md)
SAMPLE_DATA = Path(__file__).resolve().parent / "fixtures" / "merged_counterfact_sample.json"


@pytest.fixture(scope="session")
def sample_data_path() -> Path:
    """The CounterFact-format sample in tests/fixtures (always there: a bare clone runs it)."""
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def dev_data_path() -> Path:
    """The full 1,200-record development file ``merged_counterfact_dev.json``, named by
    ``$ATTNDRIFT_DEV_DATA``; tests that need it skip with a reason when it is not given."""
    given = os.environ.get("ATTNDRIFT_DEV_DATA")
    if not given:
        pytest.skip("the full dev data is not given (set ATTNDRIFT_DEV_DATA to its path)")
    path = Path(given)
    if not path.exists():
        pytest.skip(f"the full dev data is not at {path} (ATTNDRIFT_DEV_DATA)")
    return path
