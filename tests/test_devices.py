"""Every command resolves its device the same way (`bigasp.devices.resolve`) and refuses one the
machine lacks before any model loads, naming the setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigasp.devices import resolve
from bigasp.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_auto_and_cpu():
    want = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve("auto") == resolve(None) == want
    assert resolve("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tpu9", r"encode\.device 'tpu9' is not a device; use auto, cpu, cuda or cuda:N"),
        ("meta", r"encode\.device 'meta' is not supported"),
    ],
)
def test_bad_names_are_refused_naming_the_setting(name, message):
    with pytest.raises(ConfigError, match=message):
        resolve(name, setting="encode.device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.device 'cuda': no CUDA GPU is available here"):
        resolve("cuda", setting="train.device")
    # through the CLI: encode stops with one line, before reading images or loading a VAE
    from bigasp.train.synthetic import write_synthetic_latent_dataset

    root = write_synthetic_latent_dataset(tmp_path / "ds", n=2, seed=0)
    out = subprocess.run(
        [sys.executable, "-m", "bigasp.cli", "encode", str(root), "--vae", "/nonexistent/vae", "--device", "cuda"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    assert "encode.device 'cuda': no CUDA GPU is available here" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr


@pytest.mark.gpu
def test_a_bare_cuda_means_this_ranks_gpu():
    last = torch.cuda.device_count() - 1
    assert resolve("cuda", local_rank=last) == torch.device("cuda", last)
    assert resolve("auto", local_rank=last) == torch.device("cuda", last)
    assert resolve("cuda:0", local_rank=last) == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="GPU"):
        resolve(f"cuda:{last + 1}")
