"""Shared test setup: CPU-only by default, GPU tests skipped without CUDA, no network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# One thread: the tests run tiny models, where thread hand-off costs more than it saves
# (measured 5-10x slower with 2 threads on the 2-core CI box).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny preset with fixed random weights, built once per test session (read-only use)."""
    from bigasp.models import build_preset

    return build_preset("tiny", seed=0)
