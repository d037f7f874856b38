"""Published files get the usual permissions (0666 minus the umask), not a library's private 0600.

safetensors writes through a private temp file (mode 0600); exports and checkpoints are meant to be
shared, served and read by other users of a cluster, so bigasp widens them to what `open()` gives.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bigasp.fsutil import atomic_path, current_umask
from bigasp.train import checkpoint as ck


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_safetensors_alone_writes_private_files(tmp_path, umask_022):
    """The reason for the fix: without it, these files would be 0600."""
    save_file({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    assert _mode(tmp_path / "x.safetensors") == 0o600


def test_current_umask_reads_without_changing_it(umask_022):
    assert current_umask() == 0o022
    os.umask(0o027)
    assert current_umask() == 0o027
    assert os.umask(0o022) == 0o027  # still what was set: reading did not change it


def test_atomic_path_publishes_with_the_umask_mode(tmp_path, umask_022):
    with atomic_path(tmp_path / "a.safetensors") as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp))
    assert _mode(tmp_path / "a.safetensors") == 0o644
    os.umask(0o077)  # a user who asks for private files gets them
    with atomic_path(tmp_path / "b.safetensors") as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp))
    assert _mode(tmp_path / "b.safetensors") == 0o600


def test_checkpoint_files_get_the_umask_mode(tmp_path, umask_022):
    def write_model(folder: Path) -> None:
        folder.mkdir()
        save_file({"w": torch.ones(3)}, str(folder / "diffusion_pytorch_model.safetensors"))

    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(2)
    opt.step()
    path = ck.save_checkpoint(
        tmp_path,
        samples_seen=8,
        step=2,
        write_model=write_model,
        optimizer_state=opt.state_dict(),
        scaler_state=None,
        trainer_state={"samples_seen": 8},
        rng_states=[ck.rng_tensors()],
        config_toml="x = 1\n",
    )
    files = [f for f in path.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {
        "diffusion_pytorch_model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "checkpoint.json",
    }
    assert {f.name: _mode(f) for f in files} == {f.name: 0o644 for f in files}


def test_model_save_folder_files_get_the_umask_mode(tmp_path, umask_022):
    from typer.testing import CliRunner

    from bigasp.cli import app

    res = CliRunner().invoke(app, ["model", "save", "tiny", str(tmp_path / "folder")])
    assert res.exit_code == 0, res.output
    files = [f for f in (tmp_path / "folder").rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert {str(f): _mode(f) for f in files} == {str(f): 0o644 for f in files}
