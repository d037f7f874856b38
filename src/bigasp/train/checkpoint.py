"""Checkpoints: atomic directories, retention, discovery, and pickle-free training state.

Layout (CONTRACT): `RUN/checkpoints/step-<samples:012d>/{model/, state/, config.toml, checkpoint.json}`.
A checkpoint is written into `RUN/checkpoints/.tmp-...`, every file and folder fsynced, then
renamed into place; `checkpoint.json` (with `complete: true`) is written last inside the temp
dir. A kill at any moment therefore leaves either no new `step-*` directory or a complete one,
and the previous checkpoints untouched. Readers ignore anything starting with ".".

Training state is safetensors + JSON only: optimizer tensors flattened into
`state/optimizer.safetensors` with the non-tensor structure in `state/optimizer.json`; nothing is
ever unpickled, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bigasp.errors import BigaspError
from bigasp.fsutil import fsync_dir, fsync_tree

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{12})$")


def checkpoint_name(samples_seen: int) -> str:
    return f"step-{samples_seen:012d}"


def is_complete(path: Path) -> bool:
    """The CONTRACT rule: named `step-*`, not hidden, and `checkpoint.json` says complete."""
    if not _NAME.match(path.name) or not path.is_dir():
        return False
    meta = path / "checkpoint.json"
    try:
        return bool(json.loads(meta.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def list_complete_checkpoints(run_or_ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under a run dir (or its `checkpoints/` dir), oldest (fewest samples) first."""
    root = Path(run_or_ckpt_dir)
    if (root / CHECKPOINT_DIR).is_dir():
        root = root / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def read_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "checkpoint.json").read_text())


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`None` -> fresh run; `auto` -> newest complete checkpoint of `run_dir` or fresh; else a path."""
    if resume is None or resume == "":
        return None
    if resume == "auto":
        found = list_complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir() and not _NAME.match(path.name):
        found = list_complete_checkpoints(path)
        if found:
            return found[-1]
    if not is_complete(path):
        raise BigaspError(
            f"--resume {resume}: not a complete checkpoint (expected a step-<samples> folder with "
            "checkpoint.json marked complete, or a run dir holding some). Use --resume auto to pick the "
            "newest complete one."
        )
    return path


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# optimizer / scaler / RNG state <-> safetensors + JSON


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors by 'state.<param id or FQN>.<key>', JSON-able structure)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        pid, key = name.removeprefix("state.").rsplit(".", 1)  # pid: an int id or a dotted FQN
        state.setdefault(_param_key(pid), {})[key] = t
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(_param_key(pid), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def _param_key(pid: str) -> int | str:
    """Optimizer state keys are parameter ids (plain torch layout) or FQNs (the trainer's layout,
    shared by DDP and FSDP2 so a run resumes under either); optimizer keys like `exp_avg` have no dot."""
    return int(pid) if pid.isdigit() else pid


def scaler_to_json(scaler: torch.amp.GradScaler) -> dict[str, Any]:
    sd = scaler.state_dict()
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}


def rng_tensors(prefix: str = "") -> dict[str, torch.Tensor]:
    out = {f"{prefix}torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out[f"{prefix}torch_cuda"] = torch.cuda.get_rng_state()
    return out


# ---------------------------------------------------------------------------------------------
# saving


def save_checkpoint(
    run_dir: Path,
    *,
    samples_seen: int,
    step: int,
    write_model: Callable[[Path], None],
    optimizer_state: dict[str, Any],
    scaler_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    rng_states: list[dict[str, torch.Tensor]],
    config_toml: str,
    extra_meta: dict[str, Any] | None = None,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete checkpoint atomically and return its final path (rank 0 only).

    `write_model(folder)` writes the diffusers folder (`save_diffusers_folder`). `before_commit`
    runs after everything is written but before the rename (used to simulate crashes in tests).
    """
    ckpt_root = run_dir / CHECKPOINT_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / checkpoint_name(samples_seen)
    if final.exists():
        if is_complete(final):
            log.info("checkpoint %s already exists; not rewriting it", final)
            return final
        _remove(final)
    tmp = ckpt_root / f".tmp-{checkpoint_name(samples_seen)}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        write_model(tmp / "model")
        state_dir = tmp / "state"
        state_dir.mkdir()
        tensors, opt_meta = flatten_optimizer(optimizer_state)
        save_file(tensors, str(state_dir / "optimizer.safetensors"))
        write_json(state_dir / "optimizer.json", opt_meta)
        rng_flat = {f"rank{r}.{k}": v for r, d in enumerate(rng_states) for k, v in d.items()}
        save_file(rng_flat, str(state_dir / "rng.safetensors"))
        write_json(state_dir / "trainer.json", {**trainer_state, "scaler": scaler_state})
        (tmp / "config.toml").write_text(config_toml)
        meta = {
            "format_version": FORMAT_VERSION,
            "samples_seen": samples_seen,
            "step": step,
            "complete": True,
            "created_unix": time.time(),
            **(extra_meta or {}),
        }
        write_json(tmp / "checkpoint.json", meta)
        fsync_tree(tmp)
        if before_commit is not None:
            before_commit(tmp)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_state(ckpt: Path) -> dict[str, Any]:
    """Everything except the model: optimizer (as a torch state_dict), trainer JSON, RNG tensors."""
    state_dir = ckpt / "state"
    opt = unflatten_optimizer(
        load_file(str(state_dir / "optimizer.safetensors")),
        json.loads((state_dir / "optimizer.json").read_text()),
    )
    trainer = json.loads((state_dir / "trainer.json").read_text())
    rng = load_file(str(state_dir / "rng.safetensors"))
    return {"optimizer": opt, "trainer": trainer, "rng": rng, "meta": read_meta(ckpt)}


def _remove(path: Path) -> None:
    """Delete a checkpoint so a half-deleted one never looks complete: hide it by rename first."""
    hidden = path.with_name(f".del-{path.name}-{time.time_ns()}")
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def apply_retention(run_dir: Path, *, keep_last: int, keep_every: int | None) -> list[Path]:
    """Delete old checkpoints: keep the newest `keep_last`, plus the first checkpoint at or after
    every multiple of `keep_every` samples (a permanent thinned history). Returns what was removed."""
    found = list_complete_checkpoints(run_dir)
    keep: set[Path] = set(found[-keep_last:]) if keep_last > 0 else set()
    if keep_every:
        seen_bins: set[int] = set()
        for p in found:
            bin_ = read_meta(p)["samples_seen"] // keep_every
            if bin_ not in seen_bins:
                seen_bins.add(bin_)
                keep.add(p)
    removed = [p for p in found if p not in keep]
    for p in removed:
        _remove(p)
    return removed


def clean_stale_temps(run_dir: Path) -> None:
    """Remove leftovers of interrupted saves/deletes (never visible to readers anyway)."""
    root = run_dir / CHECKPOINT_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".del-")):
                shutil.rmtree(p, ignore_errors=True)
