"""Preemption as clusters and Ctrl-C deliver it: SIGTERM to the whole process group of a real
`bigasp train` with DataLoader workers. The workers must survive it (they ignore the signal) so
the trainer finishes its step, writes a checkpoint with reason "signal", and `--resume auto`
continues from it. Also covers `bigasp train --set key=value` (the other commands' override form)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bigasp.config import dump_toml
from bigasp.train import checkpoint as ck
from bigasp.train.synthetic import write_synthetic_latent_dataset
from train_helpers import make_cfg

REPO = Path(__file__).resolve().parents[1]


def _bigasp(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "bigasp.cli", "train", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )  # fmt: skip


def test_sigterm_to_process_group_with_workers_saves_and_resumes(tmp_path):
    data = write_synthetic_latent_dataset(tmp_path / "ds", n=24, seed=2)
    cfg = make_cfg(tmp_path / "run", data, train={"max_samples": 100_000, "warmup_samples": 8})
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(dump_toml(cfg.model_dump(mode="json")))
    batch_log = Path(cfg.run_dir) / "batches.rank0.jsonl"

    # Its own session = its own process group, like a SLURM job step or a terminal's foreground job.
    proc = _bigasp(str(cfg_path), "--set", "data.num_workers=2", "--set", "data.prefetch_factor=1",
                   start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300  # a condition, not a time: only a hung start reaches this
    while not (batch_log.exists() and batch_log.read_text().count("\n") >= 4):  # 2 steps trained
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer AND its DataLoader workers get it
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by signal" in out
    (ckpt,) = ck.list_complete_checkpoints(cfg.run_dir)
    meta = ck.read_meta(ckpt)
    assert meta["reason"] == "signal" and meta["samples_seen"] >= 8
    n = meta["samples_seen"]

    resumed = _bigasp(str(cfg_path), "--resume", "auto", "--stop-at", str(n + 4), "data.num_workers=2")
    out, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, err[-3000:]
    last = ck.list_complete_checkpoints(cfg.run_dir)[-1]
    assert ck.read_meta(last)["samples_seen"] == n + 4 and ck.read_meta(last)["reason"] == "stop_at"
    records = [json.loads(x) for x in batch_log.read_text().splitlines()]
    assert records[-1]["samples"] == n  # the resumed step continued right after the checkpoint
