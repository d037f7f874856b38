"""Thread and loader-worker defaults: a pure rule of (device, cores, model size), announced in one line."""

from __future__ import annotations

import logging

import pytest
import torch

from bigasp.threads import SMALL_MODEL_PARAMS, choose, estimate_params


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores", [1, 2, 4, 16, 128])
def test_small_model_on_cpu_runs_one_thread(cores):
    plan = choose("cpu", cores, 2_000_000)
    assert plan.threads == 1
    assert plan.workers == (0 if cores < 4 else 1)


@pytest.mark.parametrize(("cores", "threads", "workers"), [(1, 1, 0), (2, 2, 0), (4, 3, 1), (32, 31, 1)])
def test_large_model_on_cpu_uses_the_cores(cores, threads, workers):
    plan = choose("cpu", cores, 3_500_000_000)
    assert (plan.threads, plan.workers) == (threads, workers)


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 0), (4, 2), (8, 4), (96, 4)])
def test_gpu_keeps_torch_threads_and_feeds_it_with_workers(cores, workers):
    plan = choose("cuda", cores, 3_500_000_000)
    assert plan.threads is None and plan.workers == workers


def test_threshold_is_by_model_size():
    assert choose("cpu", 8, SMALL_MODEL_PARAMS - 1).threads == 1
    assert choose("cpu", 8, SMALL_MODEL_PARAMS).threads == 7


def test_model_size_estimate(tmp_path, tiny_model):
    from bigasp.models.io import save_diffusers_folder

    assert estimate_params("tiny") < SMALL_MODEL_PARAMS <= estimate_params("sdxl-base")
    folder = save_diffusers_folder(tiny_model, tmp_path / "m")
    n = sum(p.numel() for m in tiny_model.modules().values() for p in m.parameters())
    assert n // 2 <= estimate_params(folder) <= 2 * n + 2**20  # fp32 files at 2 bytes/param (+ headers)


def test_generate_announces_and_applies_its_choice(tmp_path, caplog, monkeypatch):
    from bigasp.cli import main

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    with caplog.at_level(logging.INFO, logger="bigasp.threads"):
        main(["generate", "a cat", "--model", "tiny", "--size", "64x64", "--steps", "1",
              "--out", str(tmp_path), "--device", "cpu"])  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.name == "bigasp.threads"]
    assert len(lines) == 1 and lines[0].startswith("cpu: 1 intra-op thread(s) (small model")
    assert "--threads" in lines[0] and torch.get_num_threads() == 1


def test_flag_overrides(tmp_path, caplog):
    from bigasp.cli import main

    with caplog.at_level(logging.INFO, logger="bigasp.threads"):
        main(["generate", "a cat", "--model", "tiny", "--size", "64x64", "--steps", "1",
              "--out", str(tmp_path), "--device", "cpu", "--threads", "2"])  # fmt: skip
    assert torch.get_num_threads() == 2 and "--threads 2" in caplog.text


def test_train_announces_threads_and_workers(tmp_path, caplog, monkeypatch):
    from bigasp.cli import main
    from bigasp.config import dump_toml
    from bigasp.train.synthetic import write_synthetic_latent_dataset

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("bigasp.threads.machine_cores", lambda: 2)
    ds = write_synthetic_latent_dataset(tmp_path / "ds", n=8, seed=0)
    cfg = tmp_path / "run.toml"
    cfg.write_text(dump_toml({
        "run_dir": str(tmp_path / "run"),
        "model": {"source": "tiny", "save_vae": False},
        "data": {"dataset": str(ds), "device_batch_size": 2, "validation_size": 0, "stable_size": 0},
        "train": {"device": "cpu", "batch_size": 2, "max_samples": 2, "warmup_samples": 0, "precision": "fp32"},
        "validation": {"every": 0}, "checkpoint": {"every": 0}, "logging": {"flops": False},
    }))  # fmt: skip
    with caplog.at_level(logging.INFO, logger="bigasp.threads"):
        main(["train", str(cfg)])
    lines = [r.getMessage() for r in caplog.records if r.name == "bigasp.threads"]
    assert len(lines) == 1
    assert lines[0].startswith("cpu: 1 intra-op thread(s), 0 loader worker(s) (small model"), lines
    assert "data.num_workers" in lines[0]
