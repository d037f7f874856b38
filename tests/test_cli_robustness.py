"""The installed `bigasp` entry point: honest exit statuses, one-line user errors (tracebacks only
with --debug), Ctrl-C = 130 after saying what was kept; messages that blame the right thing; the
demo and `model save` never replace what the user did not ask for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bigasp.cli import main
from bigasp.errors import ConfigError, ModelLoadError
from hold_helpers import start_held

BIGASP = Path(sys.executable).with_name("bigasp")  # the console script a fresh install creates


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIGASP), *args], capture_output=True, text=True, timeout=120, env=env, **kw)


def _one_line_error(res: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert res.returncode == code, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_typer_and_click_versions_a_fresh_install_resolves_are_handled():
    """Usage errors come from typer's vendored click (typer >= 0.24) or from click itself (older
    typer): the entry point handles the classes of whichever typer is installed."""
    import typer

    from bigasp.cli import _usage_error_types

    types = _usage_error_types()
    with pytest.raises(types):
        typer.main.get_command(__import__("bigasp.cli").cli.app).main(["frobnicate"], standalone_mode=False)


def test_mistyped_command_or_flag_is_a_one_line_usage_error():
    _one_line_error(_cli("frobnicate"), 2, "No such command 'frobnicate'", "bigasp --help")
    _one_line_error(_cli("train", "--bogus-flag"), 2, "No such option: --bogus-flag", "bigasp train --help")


def test_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    _one_line_error(_cli("dataset", "verify", str(tmp_path)), 2, "not a bigasp dataset")
    res = _cli("--debug", "dataset", "verify", str(tmp_path))
    assert res.returncode == 2 and "Traceback" in res.stderr and "DataError" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="POSIX signals")
def test_ctrl_c_during_encode_exits_130_and_says_what_was_committed(tmp_path):
    from bigasp.buckets import BucketConfig
    from bigasp.prep.config import IngestConfig
    from bigasp.prep.ingest import ingest
    from bigasp.store import LatentDataset

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(240):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / f"{k:03d}.png")
    buckets = BucketConfig(step=16, min_area=48 * 64, max_area=64 * 64)
    ds = tmp_path / "ds"
    ingest([src], ds, IngestConfig(buckets=buckets, progress=False))
    cmd = [str(BIGASP), "encode", str(ds), "--vae", "tiny", "--num-workers", "0", "--batch-size", "1",
           "--shard-size", "1", "--no-progress"]  # fmt: skip
    # Held after its 5th batch: 5 latents handed to the shard writer, 235 not yet read.
    proc, _ = start_held(cmd, "encode.batch:5")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: encode stopped by Ctrl-C:") and "committed" in last, err[-2000:]
    assert "Traceback" not in err
    assert len(LatentDataset(str(ds))) == 5 and "5 latent(s) committed" in last
    again = _cli("encode", str(ds), "--vae", "tiny", "--num-workers", "0", "--no-progress")
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(LatentDataset(str(ds))) == 240


def test_config_error_names_the_override_not_the_file(tmp_path, capsys):
    from bigasp.config import load_config
    from bigasp.train.config import RunConfig

    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\nlr = 1e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, cfg, ["train.lr=-1"])
    msg = str(err.value)
    assert msg.startswith("invalid command-line override: train.lr:") and "from --set train.lr=-1" in msg
    assert "\n" not in msg and str(cfg) not in msg
    cfg.write_text("[train]\nlr = -1\n")
    with pytest.raises(ConfigError, match=rf"^invalid config in {cfg}: train\.lr:"):
        load_config(RunConfig, cfg, ["train.batch_size=64"])
    # The same for a stage's own flags: the flag is named.
    with pytest.raises(SystemExit) as code:
        main(["encode", str(tmp_path), "--batch-size", "0", "--vae", "tiny"])
    assert code.value.code == 2
    err_line = capsys.readouterr().err.strip()
    assert "invalid command-line override: batch_size" in err_line and "from --batch-size 0" in err_line


def test_config_that_is_not_utf8_is_a_clear_error(tmp_path):
    from bigasp.config import read_toml

    bad = tmp_path / "latin1.toml"
    bad.write_bytes("[train]\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.toml is not UTF-8 text \(byte 0xe9 on line 2\)"):
        read_toml(bad)


def test_object_storage_without_its_package_says_what_to_install(tmp_path):
    """A machine without s3fs (it is an optional extra): the installed `bigasp` says what to install.
    The dev environment has s3fs, so a module that fails to import shadows it, as a missing one would."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "s3fs.py").write_text("raise ImportError(\"No module named 's3fs'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([str(BIGASP), "dataset", "info", "s3://bucket/ds"], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "s3://bucket/ds" in proc.stderr and "pip install s3fs" in proc.stderr, proc.stderr[-2000:]


def test_incomplete_checkpoint_is_not_a_model_to_download(tmp_path):
    from bigasp.models.io import load_model

    ckpts = tmp_path / "run" / "checkpoints"
    good = ckpts / "step-000000000004"
    (good / "model").mkdir(parents=True)
    (good / "checkpoint.json").write_text(json.dumps({"complete": True}))
    half = ckpts / "step-000000000008"
    half.mkdir()
    with pytest.raises(ModelLoadError) as err:
        load_model(half / "model")
    msg = str(err.value)
    assert "incomplete" in msg and str(good / "model") in msg
    assert "download" not in msg and "hub" not in msg


# ---- never replace what the user did not ask to replace ---------------------------------------------


def test_demo_refuses_a_foreign_folder_and_keeps_its_files(tmp_path, capsys):
    from bigasp.demo.run import check_out_folder

    out = tmp_path / "mine"
    (out / "run").mkdir(parents=True)
    (out / "run" / "keep.txt").write_text("precious")
    (out / "photos").mkdir()
    with pytest.raises(SystemExit) as code:
        main(["demo", "--quick", "--out", str(out)])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert "not empty and was not made by `bigasp demo`" in err and "--force" in err
    assert (out / "run" / "keep.txt").read_text() == "precious" and not (out / ".demo").exists()
    check_out_folder(out, force=True)  # --force: the user said so
    (out / ".demo").mkdir()
    check_out_folder(out, force=False)  # the demo's own folder: re-runs reuse it
    check_out_folder(tmp_path / "new", force=False)


def test_model_save_never_overwrites_without_force(tmp_path, capsys):
    from bigasp.models.commands import _replace_folder

    out = tmp_path / "model"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    for argv in (["model", "save", "tiny", str(out)], ["model", "export", "tiny", str(out / "mine.txt")]):
        with pytest.raises(SystemExit) as code:
            main(argv)
        assert code.value.code == 2 and "already exists" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "precious"

    # --force replaces the folder whole (no stale file of the old model), via a swap.
    def write(folder: Path) -> None:
        folder.mkdir()
        (folder / "model_index.json").write_text("{}")

    _replace_folder(str(out), write)
    assert (out / "model_index.json").is_file() and not (out / "mine.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
