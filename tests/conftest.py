"""Shared test setup: CPU-only by default, GPU tests skipped without CUDA, no network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from postgres_server import postgres_server, postgres_url  # noqa: F401  (fixtures)

# One thread: the tests run tiny models, where thread hand-off costs more than it saves
# (measured 5-10x slower with 2 threads on the 2-core CI box).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Back to one thread after every test: commands run in-process (train, generate) pick their own
    thread count for the machine, which must not leak into the tests that follow."""
    yield
    if torch.get_num_threads() != 1:
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


class HostSyncTrap(torch.Tensor):
    """A tensor that fails on anything that would make the host wait for the device.

    CPU twin of CUDA sync-debug mode: a hot loop run on these tensors proves it never reads
    device values back (no `.item()`, no `if tensor:`), which on a GPU would stall the stream.
    """

    BANNED = frozenset(
        {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
         torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}
    )  # fmt: skip

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.BANNED:
            raise AssertionError(f"host sync in the sampling loop: {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.fixture
def host_sync_trap() -> type[torch.Tensor]:
    return HostSyncTrap


CHROMIUM = os.environ.get("BIGASP_TEST_CHROMIUM", "/usr/bin/chromium")
# Flags for headless Chromium on a machine with no network: no sandbox (CI runs as root), no
# background connections (they would be refused many at a time), a fresh profile per launch.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    """A real headless Chromium (Debian's, installed by .ci/run) driven through Playwright.

    Browser tests are the only check that a page works for a person, so a missing browser
    fails the run rather than skipping it; set BIGASP_TEST_CHROMIUM to use another binary.
    """
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"browser tests need Chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run does)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh browser page (own context: no cookies or storage shared between tests)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        yield context.new_page()
    finally:
        context.close()
