"""Checkpoints: atomic under a crash (exception and a killed process), retention, discovery, resume rules,
pickle-free optimizer round trip; run-config errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bigasp.config import load_config
from bigasp.errors import BigaspError, ConfigError
from bigasp.text.aliases import AliasTable
from bigasp.train import checkpoint as ck
from bigasp.train.config import RunConfig, resolve_accumulation

REPO = Path(__file__).resolve().parents[1]


def _save(run: Path, samples: int, before_commit=None, payload: str = "w") -> Path:
    def write_model(folder: Path) -> None:
        folder.mkdir()
        (folder / "weights.bin").write_text(payload)

    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    return ck.save_checkpoint(
        run,
        samples_seen=samples,
        step=samples // 4,
        write_model=write_model,
        optimizer_state=opt.state_dict(),
        scaler_state={"scale": 1024.0},
        trainer_state={"samples_seen": samples},
        rng_states=[ck.rng_tensors()],
        config_toml="x = 1\n",
        before_commit=before_commit,
    )


def test_checkpoint_layout_and_optimizer_round_trip(tmp_path):
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(3):
        lin(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    path = ck.save_checkpoint(
        tmp_path,
        samples_seen=12,
        step=3,
        write_model=lambda f: f.mkdir(),
        optimizer_state=opt.state_dict(),
        scaler_state=None,
        trainer_state={"samples_seen": 12, "loader": [{"epoch": 0, "position": 3}]},
        rng_states=[ck.rng_tensors()],
        config_toml="run_dir = 'x'\n",
    )
    assert path.name == "step-000000000012"
    meta = json.loads((path / "checkpoint.json").read_text())
    assert meta["complete"] is True and meta["samples_seen"] == 12 and meta["format_version"] == 1
    state = ck.load_state(path)
    lin2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(lin2.parameters(), lr=1e-3, weight_decay=0.1)
    opt2.load_state_dict(state["optimizer"])
    a, b = opt.state_dict(), opt2.state_dict()
    for pid in a["state"]:
        for k in a["state"][pid]:
            assert torch.equal(a["state"][pid][k], b["state"][pid][k])
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"]
    assert state["trainer"]["loader"] == [{"epoch": 0, "position": 3}]
    # nothing in state/ is a pickle
    assert sorted(p.name for p in (path / "state").iterdir()) == [
        "optimizer.json",
        "optimizer.safetensors",
        "rng.safetensors",
        "trainer.json",
    ]


def test_exception_mid_save_leaves_previous_checkpoint_intact(tmp_path):
    first = _save(tmp_path, 100, payload="first")

    def crash(_tmp: Path) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _save(tmp_path, 200, before_commit=crash)
    assert ck.list_complete_checkpoints(tmp_path) == [first]
    assert (first / "model" / "weights.bin").read_text() == "first"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]  # temp removed


@pytest.mark.skipif(
    not Path("/dev/full").exists(), reason="needs /dev/full (a device whose writes fail ENOSPC)"
)
def test_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A real ENOSPC from the kernel (writes to /dev/full fail with it) in the middle of a save:
    one line naming the checkpoint, the reason, the checkpoint kept and the fix; no temp left."""
    first = _save(tmp_path, 100, payload="first")
    lin = torch.nn.Linear(3, 2)

    def write_model_then_fill_the_disk(folder: Path) -> None:
        folder.mkdir()
        (folder / "weights.bin").write_text("second")
        (folder.parent / "config.toml").symlink_to("/dev/full")  # the save writes config.toml next

    with pytest.raises(ck.CheckpointError) as err:
        ck.save_checkpoint(
            tmp_path, samples_seen=200, step=50, write_model=write_model_then_fill_the_disk,
            optimizer_state=torch.optim.AdamW(lin.parameters()).state_dict(), scaler_state=None,
            trainer_state={"samples_seen": 200}, rng_states=[ck.rng_tensors()], config_toml="x = 1\n",
        )  # fmt: skip
    msg = str(err.value)
    final = tmp_path / "checkpoints" / ck.checkpoint_name(200)
    assert msg.startswith(f"saving checkpoint {final} failed (No space left on device (errno 28))"), msg
    assert f"the previous checkpoint {first} is kept" in msg and "--resume auto" in msg and "\n" not in msg
    assert ck.list_complete_checkpoints(tmp_path) == [first]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]


def test_safetensors_write_errors_are_recognised_and_others_are_not(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(Exception) as real:  # safetensors' own error type for an OS failure
        save_file({"w": torch.ones(2)}, str(tmp_path / "missing-folder" / "x.safetensors"))
    assert ck.write_failure_reason(real.value) == "No such file or directory (os error 2)"
    assert ck.write_failure_reason(RuntimeError("a bug")) is None
    assert ck.save_failure(KeyboardInterrupt(), tmp_path / "checkpoints" / "step-4") is None


@pytest.mark.slow
def test_full_disk_during_training_on_a_real_small_filesystem(tmp_path):
    """The installed `bigasp train` with its run folder on a tmpfs with room for one checkpoint:
    the second save fails with one line, the first checkpoint stays complete and no temp is left.
    Needs mount rights (root); skipped where mounting is not permitted."""
    import shutil

    from bigasp.config import dump_toml
    from bigasp.train.synthetic import write_synthetic_latent_dataset
    from train_helpers import make_cfg

    ds = write_synthetic_latent_dataset(tmp_path / "ds", n=12, seed=0)
    exe = Path(sys.executable).with_name("bigasp")

    def train(run: Path, **ckpt) -> subprocess.CompletedProcess:
        cfg = make_cfg(run, ds, train={"max_samples": 8, "warmup_samples": 0}, checkpoint=ckpt,
                       model={"train_text_encoder": False})  # fmt: skip
        path = tmp_path / f"{run.name}.toml"
        path.write_text(dump_toml(cfg.model_dump(mode="json")))
        return subprocess.run([str(exe), "train", str(path)], capture_output=True, text=True, timeout=300)

    probe = train(tmp_path / "probe")  # how big one checkpoint is
    assert probe.returncode == 0, probe.stderr[-2000:]
    (one,) = ck.list_complete_checkpoints(tmp_path / "probe")
    size = sum(f.stat().st_size for f in one.rglob("*") if f.is_file())
    shutil.rmtree(tmp_path / "probe")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    kb = size * 3 // 2 // 1024 + 64  # one checkpoint and logs fit, a second does not
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()})")
    try:
        run = mnt / "run"
        res = train(run, every=4, keep_last=2)
        assert res.returncode == 2, res.stderr[-2000:]
        last = res.stderr.strip().splitlines()[-1]
        kept = run / "checkpoints" / ck.checkpoint_name(4)
        assert last.startswith(
            f"error: saving checkpoint {run / 'checkpoints' / ck.checkpoint_name(8)} failed ("
        ), last
        assert "No space left on device" in last and f"the previous checkpoint {kept} is kept" in last
        assert "Traceback" not in res.stderr
        assert ck.list_complete_checkpoints(run) == [kept]
        ck.check_files(kept)
        assert [p.name for p in (run / "checkpoints").iterdir()] == [kept.name]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_killed_process_mid_save_leaves_no_visible_partial(tmp_path):
    first = _save(tmp_path, 100, payload="first")
    code = textwrap.dedent(
        f"""
        import os, signal, torch
        from pathlib import Path
        from bigasp.train import checkpoint as ck
        def write_model(folder):
            folder.mkdir(); (folder / "weights.bin").write_text("second")
        ck.save_checkpoint(Path({str(tmp_path)!r}), samples_seen=200, step=50, write_model=write_model,
            optimizer_state={{"state": {{}}, "param_groups": []}}, scaler_state=None, trainer_state={{}},
            rng_states=[], config_toml="",
            before_commit=lambda tmp: os.kill(os.getpid(), signal.SIGKILL))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[0].startswith(".tmp-step-000000000200") and names[1] == first.name  # partial is hidden
    assert ck.list_complete_checkpoints(tmp_path) == [first]
    assert ck.resolve_resume("auto", tmp_path) == first
    ck.clean_stale_temps(tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]


def test_incomplete_or_hidden_dirs_are_ignored_and_resume_rules(tmp_path):
    assert ck.resolve_resume("auto", tmp_path) is None
    assert ck.resolve_resume(None, tmp_path) is None
    good = _save(tmp_path, 8)
    bad = tmp_path / "checkpoints" / "step-000000000016"
    bad.mkdir()
    (bad / "checkpoint.json").write_text('{"complete": false}')
    (tmp_path / "checkpoints" / ".tmp-step-000000000024-1-2").mkdir()
    assert ck.list_complete_checkpoints(tmp_path) == [good]
    assert ck.list_complete_checkpoints(tmp_path / "checkpoints") == [good]
    assert ck.resolve_resume(str(good), tmp_path) == good
    assert ck.resolve_resume(str(tmp_path), tmp_path / "elsewhere") == good
    with pytest.raises(BigaspError, match="not a complete checkpoint"):
        ck.resolve_resume(str(bad), tmp_path)


def test_retention_keeps_last_k_and_every_mth(tmp_path):
    for s in range(1, 11):  # checkpoints at 100..1000 samples
        _save(tmp_path, s * 100)
    removed = ck.apply_retention(tmp_path, keep_last=2, keep_every=300)
    kept = [ck.read_meta(p)["samples_seen"] for p in ck.list_complete_checkpoints(tmp_path)]
    # first at/after each multiple of 300: 100 (bin 0), 300, 600, 900; plus the last two 900, 1000
    assert kept == [100, 300, 600, 900, 1000]
    assert len(removed) == 5
    assert not any(p.name.startswith(".del-") for p in (tmp_path / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------
# Run config


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "run.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_recipes_load_and_say_what_the_cards_say():
    v2 = load_config(RunConfig, REPO / "configs" / "bigasp-v2.toml")
    assert (v2.train.objective, v2.train.precision, v2.train.min_snr_gamma) == ("eps", "fp16", 5.0)
    assert (v2.train.batch_size, v2.train.lr, v2.train.weight_decay) == (2048, 1e-4, 0.1)
    assert (v2.train.warmup_samples, v2.train.max_samples) == (100_000, 40_000_000)
    assert (v2.validation.every, v2.checkpoint.every, v2.train.grad_scaler_init) == (50_000, 500_000, 65536.0)
    assert v2.model.train_text_encoder and not v2.model.train_text_encoder_2
    assert v2.data.prompt.ucg_rate == pytest.approx(0.05)  # v2's data.py (the card's 10% was v1's)
    assert v2.train.growth_interval() == 244  # train.py: set_growth_interval(500000 // batch_size)
    assert v2.validation.stable_loss == "weighted"  # train.py: stable loss with the loss weighting
    v25 = load_config(RunConfig, REPO / "configs" / "bigasp-v2.5.toml")
    assert (v25.train.objective, v25.train.precision, v25.train.max_samples) == ("flow", "bf16", 150_000_000)
    assert v25.train.batch_size == 4096
    assert not v25.model.train_text_encoder and not v25.model.train_text_encoder_2
    assert resolve_accumulation(v25, 32) * v25.data.device_batch_size * 32 == 4096
    assert resolve_accumulation(v2, 8) * v2.data.device_batch_size * 8 == 2048
    for recipe in (v2, v25):
        assert recipe.data.prompt.aliases_path == "builtin:danbooru" and recipe.data.prompt.alias_prob == 0.2
        assert len(AliasTable.load(recipe.data.prompt.aliases_path)) > 20_000
    # every "(card...)" mark names a section that exists in its legend
    for path in ("bigasp-v2.toml", "bigasp-v2.5.toml"):
        text = (REPO / "configs" / path).read_text()
        marks = set(re.findall(r"\((card[^)]*)\)", text))
        legend = {m for m in marks if re.search(r"^#\s+\(" + re.escape(m) + r"\)\s+\S", text, re.M)}
        assert marks and all(m.startswith("card: ") for m in marks), marks
        assert legend == marks, marks - legend
    tiny = load_config(RunConfig, REPO / "configs" / "tiny.toml")
    assert tiny.model.source == "tiny" and tiny.train.device == "cpu"


def test_unknown_key_and_bad_value_name_the_key(tmp_path):
    p = _write(tmp_path, "[train]\nlearning_rate = 1e-4\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_config(RunConfig, p)
    p = _write(tmp_path, '[train]\nprecision = "fp8"\n')
    with pytest.raises(ConfigError, match=r"train\.precision.*'fp32', 'fp16' or 'bf16'"):
        load_config(RunConfig, p)
    with pytest.raises(ConfigError, match=r"train\.objective.*'eps' or 'flow'"):
        load_config(RunConfig, None, ['train.objective="v"'])
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(RunConfig, None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"data\.device_batch_size"):
        load_config(RunConfig, None, ["data.device_batch_size=0"])


def test_batch_arithmetic_errors_are_clear():
    cfg = load_config(RunConfig, None, ["train.batch_size=2048", "data.device_batch_size=6"])
    with pytest.raises(
        ConfigError, match=r"not a multiple of data\.device_batch_size \(6\) x world size \(8\)"
    ):
        resolve_accumulation(cfg, 8)
    cfg = load_config(
        RunConfig, None, ["train.batch_size=64", "data.device_batch_size=4", "train.gradient_accumulation=4"]
    )
    assert resolve_accumulation(cfg, 4) == 4
    with pytest.raises(ConfigError, match=r"= 32; make them agree"):
        resolve_accumulation(cfg, 2)


# ---------------------------------------------------------------------------------------------
# Resume bookkeeping and launch environment


def test_resume_truncates_logs_written_after_the_checkpoint(tmp_path):
    from bigasp.train.tracking import truncate_jsonl

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"samples": s}) + "\n" for s in (4, 8, 12)) + '{"samples": 1')
    truncate_jsonl(path, 8)  # metrics: sample count after the step; a torn last line is dropped
    assert [json.loads(x)["samples"] for x in path.read_text().splitlines()] == [4, 8]
    truncate_jsonl(path, 8, inclusive=False)  # batch records: count before the step
    assert [json.loads(x)["samples"] for x in path.read_text().splitlines()] == [4]


def test_slurm_environment_maps_to_torchrun_names(monkeypatch):
    from bigasp.train.distributed import read_env

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # records the original state, so read_env's writes are undone
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_NTASKS", "32")
    monkeypatch.setenv("SLURM_PROCID", "13")
    monkeypatch.setenv("SLURM_LOCALID", "5")
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
        read_env()
    monkeypatch.setenv("MASTER_ADDR", "node001")
    assert read_env() == (13, 32, 5)
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == ("13", "32", "29500")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's variables win over SLURM's
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert read_env() == (1, 2, 1)


def test_tracker_jsonl_and_optional_sinks(tmp_path):
    import importlib.util

    from bigasp.train.tracking import Tracker, read_metrics

    t = Tracker(tmp_path, enabled=True, config={})
    t.log({"train/loss": 0.5, "train/grad_norm": float("nan")}, samples=8, step=2)
    t.close()
    rec = read_metrics(tmp_path)[0]
    assert (rec["samples"], rec["step"], rec["train/loss"], rec["train/grad_norm"]) == (8, 2, 0.5, "nan")
    Tracker(tmp_path / "other", enabled=False, config={}).log({"x": 1}, samples=1, step=1)
    assert not (tmp_path / "other").exists()  # non-zero ranks write nothing
    for key, pkg in (("tensorboard", "tensorboard"), ("wandb_project", "wandb")):
        if importlib.util.find_spec(pkg) is None:  # optional dependency absent: a clear error, not a crash
            with pytest.raises(ConfigError, match=f"pip install {pkg}"):
                Tracker(
                    tmp_path / key, enabled=True, config={}, **{key: True if key == "tensorboard" else "p"}
                )
