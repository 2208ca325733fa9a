"""Shared fixtures: tiny random models of three architectures, and the embedded SmolLM2."""

import os

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


@pytest.fixture(scope="session")
def dev_data_path():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "merged_counterfact_dev.json"
    path = Path(os.environ.get("ATTNDRIFT_DEV_DATA", path))
    if not path.exists():
        pytest.fail(f"dev data not found at {path} (set ATTNDRIFT_DEV_DATA)")
    return path
