"""The trainer against bad input and careless use: a data error in a loader worker ends the run
promptly with every worker reaped; run folders are locked and never silently reused; damaged
checkpoints name the file and `--resume auto` falls back; a dataset's VAE must match the model's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from bigasp.config import dump_toml
from bigasp.errors import BigaspError, DataError
from bigasp.store import LatentDataset, layout
from bigasp.train import checkpoint as ck
from bigasp.train.synthetic import write_synthetic_latent_dataset
from bigasp.train.trainer import train
from train_helpers import make_cfg

REPO = Path(__file__).resolve().parents[1]
BIGASP = Path(sys.executable).with_name("bigasp")  # the installed console script of this venv


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_latent_dataset(tmp_path_factory.mktemp("data") / "ds", n=12, seed=0)


def _corrupt_every_record(ds: Path) -> Path:
    """Flip one byte inside every stored record (the checksums then fail); returns the shard."""
    (index,) = (ds / layout.INDEX_DIR).glob("*.parquet")
    rows = pq.read_table(index).to_pylist()
    shard = ds / rows[0]["shard"]
    raw = bytearray(shard.read_bytes())
    for r in rows:
        raw[r["offset"] + r["length"] // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    return shard


def _session_processes(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `sid`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(d.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find leftover processes")
def test_corrupt_shard_with_loader_workers_exits_promptly_and_reaps_them(tmp_path):
    """The installed `bigasp train` with 2 loader workers on a corrupt shard: a one-line error naming
    the shard, non-zero exit, within the time limit, and no worker process left behind."""
    ds = write_synthetic_latent_dataset(tmp_path / "ds", n=12, seed=0)
    shard = _corrupt_every_record(ds)
    cfg = make_cfg(tmp_path / "run", ds, data={"num_workers": 2})
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(dump_toml(cfg.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(BIGASP), "train", str(cfg_path)], cwd=tmp_path, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail("bigasp train hung after a data error in a loader worker")
    assert time.monotonic() - t0 < 150
    assert proc.returncode == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: checksum mismatch") and str(shard) in last, err[-2000:]
    assert "Traceback" not in err
    deadline = time.monotonic() + 10
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _session_processes(proc.pid) == [], "loader workers outlived the run"


class _FailingRead:
    """A LatentDataset whose `fail_at`-th latent read raises the store's DataError."""

    def __init__(self, ds: LatentDataset, fail_at: int):
        self.ds, self.table, self.fail_at, self.reads = ds, ds.table, fail_at, 0

    def __len__(self) -> int:
        return len(self.ds)

    def read_latent(self, i: int) -> torch.Tensor:
        self.reads += 1
        if self.reads == self.fail_at:
            raise DataError(f"shard {self.ds.root}/x.bls record {i}: checksum mismatch")
        return self.ds.read_latent(i)


def test_data_error_saves_the_finished_steps_before_stopping(tmp_path, data):
    """A data error at a step boundary (one process) checkpoints the steps done, then stops with
    the error; `--resume auto` continues from there."""
    cfg = make_cfg(tmp_path / "run", data, data={"device_batch_size": 4})  # 1 batch = 1 step
    wrapped = _FailingRead(LatentDataset(str(data)), fail_at=3 * 4 + 1)  # first read of step 4
    with pytest.raises(DataError, match="checksum mismatch"):
        train(cfg, dataset=wrapped)
    (saved,) = ck.list_complete_checkpoints(cfg.run_dir)
    assert ck.read_meta(saved)["samples_seen"] == 12 and ck.read_meta(saved)["reason"] == "data_error"
    # An optimizer state holding nonsense is rejected when loaded, before any step runs.
    opt_file = saved / "state" / "optimizer.safetensors"
    good = opt_file.read_bytes()
    tensors = load_file(str(opt_file))
    key = next(k for k in tensors if k.endswith(".exp_avg"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(opt_file))
    with pytest.raises(
        ck.CheckpointError, match=r"optimizer.safetensors: optimizer state 'exp_avg' .* holds NaN"
    ):
        train(cfg, resume="auto")
    opt_file.write_bytes(good)
    assert ck.resolve_resume("auto", Path(cfg.run_dir)) == saved  # intact again: resumable


def _fake_checkpoint(run: Path, samples: int) -> Path:
    return ck.save_checkpoint(
        run, samples_seen=samples, step=1, write_model=lambda f: f.mkdir(),
        optimizer_state={"state": {}, "param_groups": []}, scaler_state=None,
        trainer_state={"samples_seen": samples}, rng_states=[ck.rng_tensors()], config_toml="",
    )  # fmt: skip


def test_fresh_run_refuses_a_run_folder_with_checkpoints_and_a_locked_one(tmp_path, data):
    from bigasp.locks import folder_lock

    cfg = make_cfg(tmp_path / "run", data, train={"max_samples": 4})
    old = _fake_checkpoint(Path(cfg.run_dir), 8)
    with pytest.raises(BigaspError, match=r"holds 1 checkpoint.*--resume auto.*--overwrite"):
        train(cfg)
    assert ck.is_complete(old)  # nothing touched
    # A second training while one holds the folder: refused at once, naming the holder.
    with (
        folder_lock(Path(cfg.run_dir) / ck.RUN_LOCK, "held by test"),
        pytest.raises(
            BigaspError, match=rf"another `bigasp train` is using the run folder.*pid {os.getpid()}"
        ),
    ):
        train(cfg, overwrite=True)
    assert ck.is_complete(old)
    # --overwrite: the earlier run's checkpoints go before the new run starts (here it then stops
    # at once on a missing dataset, which keeps the test short).
    gone = make_cfg(tmp_path / "run", tmp_path / "no-dataset", train={"max_samples": 4})
    with pytest.raises(DataError, match="not a bigasp dataset"):
        train(gone, overwrite=True)
    assert ck.list_complete_checkpoints(cfg.run_dir) == []
    assert not (Path(cfg.run_dir) / "checkpoints" / old.name).exists()


def _ckpt_with_files(run: Path, samples: int) -> Path:
    """A checkpoint with every file a resume reads (a real optimizer state, model weights)."""
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()

    def write_model(folder: Path) -> None:
        (folder / "unet").mkdir(parents=True)
        save_file({"w": torch.ones(64)}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))

    return ck.save_checkpoint(
        run, samples_seen=samples, step=samples // 4, write_model=write_model,
        optimizer_state=opt.state_dict(), scaler_state=None,
        trainer_state={"samples_seen": samples, "step": samples // 4, "skipped_steps": 0, "consecutive_skips": 0,
                       "loader": []},
        rng_states=[ck.rng_tensors()], config_toml="",
    )  # fmt: skip


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-10])


def _garbage(p: Path) -> None:
    p.write_bytes(b"\xff" * 64)


def _json(text: str):
    return lambda p: p.write_text(text)


def _group(**values):
    """Set values in the first saved param group (a hand-edited or damaged optimizer.json)."""

    def edit(p: Path) -> None:
        opt = json.loads(p.read_text())
        opt["param_groups"][0].update(values)
        p.write_text(json.dumps(opt))

    return edit


def _header_shape(p: Path) -> None:
    """Edit one tensor's shape in the safetensors header, keeping the header's length."""
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].replace(b'"shape":[64]', b'"shape":[65]')
    assert header != raw[8 : 8 + n]
    p.write_bytes(raw[:8] + header + raw[8 + n :])


DAMAGE = [
    ("model/unet/diffusion_pytorch_model.safetensors", _truncate, "truncated or padded"),
    ("state/optimizer.safetensors", _garbage, "truncated or not safetensors"),
    ("state/optimizer.json", _json('{"param_groups": '), "is not valid JSON"),
    ("state/trainer.json", _json('{"samples_seen": -3}'), "'samples_seen' is -3"),
    ("state/rng.safetensors", lambda p: p.unlink(), "is missing"),
    ("model", lambda p: shutil.rmtree(p), "is missing: the checkpoint .* is incomplete"),
    ("state/optimizer.json", _group(lr="0.001"), r"param group 0 'lr' is '0.001', expected a finite number"),
    ("state/optimizer.json", _group(betas=[5, 5]), r"'betas' is \[5, 5\], expected two numbers in \[0, 1\)"),
    ("state/optimizer.json", _group(eps=-1e-8), r"'eps' is -1e-08, expected a finite number >= 0"),
    ("state/optimizer.json", _group(amsgrad="no"), r"'amsgrad' is 'no', expected true or false"),
    ("model/unet/diffusion_pytorch_model.safetensors", _header_shape,
     r"tensor 'w' is F32 \(65,\) \(260 bytes\) but its data holds 256 bytes"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("file", "damage", "message"), DAMAGE, ids=[f"{d[0]}-{k}" for k, d in enumerate(DAMAGE)]
)
def test_damaged_checkpoint_names_the_file_and_auto_resume_falls_back(
    tmp_path, caplog, file, damage, message
):
    run = tmp_path / "run"
    older = _ckpt_with_files(run, 8)
    newest = _ckpt_with_files(run, 12)
    damage(newest / file)
    with pytest.raises(ck.CheckpointError, match=f"{newest / file}.*{message}"):
        ck.resolve_resume(str(newest), run)
    with pytest.raises(ck.CheckpointError, match=message):
        ck.load_state(newest)
    with caplog.at_level("WARNING"):
        assert ck.resolve_resume("auto", run) == older
    assert f"skipping damaged checkpoint: {newest / file}" in caplog.text
    assert "resuming from" in caplog.text and newest.name in caplog.text
    damage(older / file)
    with pytest.raises(ck.CheckpointError, match=r"every checkpoint in .* is damaged"):
        ck.resolve_resume("auto", run)


def test_rng_state_of_the_wrong_kind_is_named(tmp_path):
    ckpt = _ckpt_with_files(tmp_path / "run", 8)
    save_file({"rank0.torch_cpu": torch.zeros(7)}, str(ckpt / "state" / "rng.safetensors"))
    with pytest.raises(
        ck.CheckpointError, match=r"rng.safetensors: RNG state 'rank0.torch_cpu' is torch.float32"
    ):
        ck.load_state(ckpt)


def test_optimizer_state_of_the_wrong_shape_or_sign_is_rejected(tmp_path):
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    ck.check_optimizer_state(opt, tmp_path / "x")  # a real state passes
    state = opt.state[lin.weight]
    state["exp_avg"] = torch.zeros(5)
    with pytest.raises(
        ck.CheckpointError, match=r"'exp_avg' of parameter 0 .* has shape \(5,\), the parameter \(2, 3\)"
    ):
        ck.check_optimizer_state(opt, tmp_path / "x")
    state["exp_avg"] = torch.zeros(2, 3)
    state["exp_avg_sq"] = -torch.ones(2, 3)
    with pytest.raises(ck.CheckpointError, match=r"'exp_avg_sq' .* is negative"):
        ck.check_optimizer_state(opt, tmp_path / "x")


def test_ctrl_c_checkpoints_then_exits_130(tmp_path):
    """Ctrl-C (SIGINT) to the installed `bigasp train`: the step in progress finishes, a checkpoint
    is saved and named, and the exit status is 130 (interrupted), not 0 (finished)."""
    import signal

    ds = write_synthetic_latent_dataset(tmp_path / "ds", n=12, seed=0)
    cfg = make_cfg(tmp_path / "run", ds, train={"max_samples": 100_000}, logging={"every": 4})
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(dump_toml(cfg.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [str(BIGASP), "train", str(cfg_path)], cwd=tmp_path, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300  # a condition, not a time: only a hung start reaches this
    while not (metrics.is_file() and metrics.read_text().count("train/loss")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail("bigasp train did not stop after Ctrl-C")
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by signal" in out and "last checkpoint" in out and "--resume auto" in err
    assert any((tmp_path / "run" / "checkpoints").glob("step-*/checkpoint.json"))


@pytest.mark.slow
def test_nonsense_optimizer_values_fall_back_to_the_previous_checkpoint_through_the_cli(tmp_path):
    """The installed `bigasp train --resume auto` on a run whose newest checkpoint holds `lr` as a
    string and betas [5, 5]: the checkpoint is skipped as damaged (named, with the reason), the run
    resumes from the one before and finishes."""
    ds = write_synthetic_latent_dataset(tmp_path / "ds", n=12, seed=0)
    cfg = make_cfg(tmp_path / "run", ds, train={"max_samples": 8, "warmup_samples": 0},
                   checkpoint={"every": 4, "keep_last": 5}, model={"train_text_encoder": False})  # fmt: skip
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(dump_toml(cfg.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def bigasp(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIGASP), "train", str(cfg_path), *args], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)  # fmt: skip

    first = bigasp()
    assert first.returncode == 0, first.stderr[-2000:]
    older, newest = ck.list_complete_checkpoints(cfg.run_dir)
    _group(lr="0.001", betas=[5, 5])(newest / "state" / "optimizer.json")
    again = bigasp("--resume", "auto", "--set", "train.max_samples=12")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"skipping damaged checkpoint: {newest / 'state' / 'optimizer.json'}: param group" in again.stderr
    assert f"resuming from {older}" in again.stderr and "Traceback" not in again.stderr
    assert ck.read_meta(ck.list_complete_checkpoints(cfg.run_dir)[-1])["samples_seen"] == 12
    # the damaged checkpoint at 8 samples was trained over again: rewritten sound, the damaged one kept aside
    ck.check_files(newest)
    assert ck.resolve_resume("auto", cfg.run_dir) == ck.list_complete_checkpoints(cfg.run_dir)[-1]
    aside = newest.with_name(newest.name + ".damaged")
    assert json.loads((aside / "state" / "optimizer.json").read_text())["param_groups"][0]["lr"] == "0.001"
    assert f"checkpoint {newest} is damaged" in again.stderr and str(aside) in again.stderr
