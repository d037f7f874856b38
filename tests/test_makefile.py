"""`make install` on a CUDA machine: a torch already in the venv is kept; the CPU pin is only a default.

Runs the real Makefile against a stand-in venv whose `python` records how it is called, so the test
installs nothing and needs no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
if [ "$1" = "-c" ]; then
  case "$2" in
    *print*) echo "2.99.0+cu128" ;;
    *) [ "$FAKE_HAS_TORCH" = 1 ] || exit 1 ;;
  esac
fi
exit 0
"""


def _make_install(tmp_path: Path, has_torch: bool, *args: str) -> tuple[str, list[str]]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "FAKE_LOG": str(log), "FAKE_HAS_TORCH": "1" if has_torch else "0"}
    res = subprocess.run(
        ["make", "-C", str(REPO), "install", f"VENV={venv}", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert (venv / ".installed").exists()
    return res.stdout, log.read_text().splitlines()


pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def test_fresh_venv_gets_the_pinned_cpu_torch_first(tmp_path):
    _, calls = _make_install(tmp_path, has_torch=False)
    installs = [c for c in calls if c.startswith("-m pip install")]
    assert installs == [
        "-m pip install -q --upgrade pip",
        "-m pip install -q torch==2.13.0",
        "-m pip install -q -e .[dev]",
    ]


def test_a_torch_already_installed_is_kept(tmp_path):
    out, calls = _make_install(tmp_path, has_torch=True)
    assert not [c for c in calls if "torch" in c and c.startswith("-m pip")]
    assert "keeping the torch already in" in out and "2.99.0+cu128" in out
    assert calls[-1] == "-m pip install -q -e .[dev]"


def test_the_torch_spec_and_index_can_be_chosen(tmp_path):
    _, calls = _make_install(
        tmp_path,
        False,
        "TORCH_SPEC=torch",
        "TORCH_PIP_ARGS=--index-url https://download.pytorch.org/whl/cu128",
    )
    assert "-m pip install -q torch --index-url https://download.pytorch.org/whl/cu128" in calls
    assert not [c for c in calls if "torch==" in c]
