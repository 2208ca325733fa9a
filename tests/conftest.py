"""Shared fixtures: tiny random models of three architectures, and the embedded SmolLM2."""

import os
from pathlib import Path

import pytest

from attndrift import models


@pytest.fixture(scope="session", params=models.TINY_ARCHS)
def tiny(request):
    """A tiny random model of each architecture (GPT-2, GPT-J, Llama/GQA)."""
    return models.tiny_model(request.param, seed=0)


@pytest.fixture(scope="session")
def tiny_llama():
    return models.tiny_model("llama", seed=0)


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
