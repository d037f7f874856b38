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
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    """`None` -> fresh run; `auto` -> newest complete, undamaged checkpoint of `run_dir` (a damaged
    newer one is skipped with a warning) or fresh; else a path, which must be undamaged."""
    if resume is None or resume == "":
        return None
    if resume == "auto":
        return _newest_intact(list_complete_checkpoints(run_dir), run_dir)
    path = Path(resume)
    if path.is_dir() and not _NAME.match(path.name):
        found = list_complete_checkpoints(path)
        if found:
            return _newest_intact(found, path)
    if not is_complete(path):
        raise BigaspError(
            f"--resume {resume}: not a complete checkpoint (expected a step-<samples> folder with "
            "checkpoint.json marked complete, or a run dir holding some). Use --resume auto to pick the "
            "newest complete one."
        )
    check_files(path)
    return path


def _newest_intact(found: list[Path], where: Path) -> Path | None:
    damaged = []
    for ckpt in reversed(found):
        try:
            check_files(ckpt)
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint: %s", err)
            damaged.append(ckpt.name)
            continue
        if damaged:
            log.warning(
                "resuming from %s, the newest undamaged checkpoint (damaged: %s)", ckpt, ", ".join(damaged)
            )
        return ckpt
    if damaged:
        raise CheckpointError(
            f"every checkpoint in {where} is damaged ({', '.join(damaged)}; reasons above); start a new run "
            "with --overwrite, or set model.source to a model folder to begin from"
        )
    return None


class CheckpointError(BigaspError):
    """A checkpoint file is missing, truncated or holds values that cannot be right."""


def check_safetensors(path: Path) -> None:
    """Cheap structural check of a .safetensors file: readable header whose tensors end exactly
    at the end of the file (catches truncation, partial copies, garbage headers)."""
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes; not even a safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{path} is truncated or not safetensors (header claims {n} bytes, file has {size})"
                )
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({err})") from None
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{path} has a corrupt safetensors header (bad tensor entries)") from None
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path} is truncated or padded: its header describes {8 + n + end} bytes, the file has {size}"
        )
    check_tensor_entries(header, path)


_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def check_tensor_entries(header: dict[str, Any], path: Path) -> None:
    """Each tensor's dtype and shape account for exactly its bytes: an edited shape (or dtype) in
    the header would otherwise load as a tensor of another size, or fail deep inside the model load."""
    for name, v in header.items():
        if name == "__metadata__":
            continue
        shape, dtype = v.get("shape"), v.get("dtype")
        begin, end = (int(x) for x in v["data_offsets"])
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):  # fmt: skip
            raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}; the file is damaged")
        if dtype not in _DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}; the file is damaged")
        if end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise CheckpointError(
                f"{path}: tensor {name!r} is {dtype} {tuple(shape)} ({math.prod(shape) * _DTYPE_BYTES[dtype]} "
                f"bytes) but its data holds {end - begin} bytes; the file is damaged"
            )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err})") from None


TRAINER_KEYS = {
    "samples_seen": int,
    "step": int,
    "skipped_steps": int,
    "consecutive_skips": int,
    "loader": list,
}


def check_files(ckpt: Path) -> None:
    """Every file a resume reads is present and structurally sound; raises `CheckpointError`
    naming the first damaged file. Reads headers and small JSON only (not the tensors)."""
    model = ckpt / "model"
    if not model.is_dir():
        raise CheckpointError(f"{model} is missing: the checkpoint {ckpt} is incomplete")
    for f in sorted(model.rglob("*.safetensors")):
        check_safetensors(f)
    state = ckpt / "state"
    for name in ("optimizer.safetensors", "rng.safetensors"):
        check_safetensors(state / name)
    opt = _read_json(state / "optimizer.json")
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list):
        raise CheckpointError(f"{state / 'optimizer.json'} has no param_groups list: the file is damaged")
    check_param_groups(opt["param_groups"], state / "optimizer.json")
    check_trainer_state(_read_json(state / "trainer.json"), state / "trainer.json")


def _real(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# What each optimizer hyperparameter the trainer's optimizers save may hold: a value outside it is
# a damaged (or hand-edited) file, refused at load instead of failing at the first step.
_GROUP_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "lr": ("a finite number >= 0", lambda v: v is None or (_real(v) and v >= 0)),
    "initial_lr": ("a finite number >= 0", lambda v: v is None or (_real(v) and v >= 0)),
    "betas": (
        "two numbers in [0, 1)",
        lambda v: isinstance(v, list | tuple) and len(v) == 2 and all(_real(b) and 0 <= b < 1 for b in v),
    ),
    "beta1": ("a number in [0, 1) or null", lambda v: v is None or (_real(v) and 0 <= v < 1)),
    "eps": (
        "a finite number >= 0 (or a list of them)",
        lambda v: (
            v is None
            or (_real(v) and v >= 0)
            or (isinstance(v, list | tuple) and all(x is None or (_real(x) and x >= 0) for x in v))
        ),
    ),
    "weight_decay": ("a finite number >= 0", lambda v: _real(v) and v >= 0),
    "momentum": ("a finite number >= 0", lambda v: _real(v) and v >= 0),
    "clip_threshold": ("a finite number > 0", lambda v: _real(v) and v > 0),
}
_GROUP_FLAGS = (
    "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "nesterov",
    "scale_parameter", "relative_step", "warmup_init", "decoupled_weight_decay",
)  # fmt: skip


def check_param_groups(groups: list[Any], where: Path) -> None:
    """Types and ranges of the saved optimizer hyperparameters (lr, betas, eps, weight decay, flags);
    any other number must be finite. Raises `CheckpointError` naming the group and key."""
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            raise CheckpointError(
                f"{where}: param_groups[{i}] is not a group with a params list; the file is damaged"
            )
        name = g.get("name", i)
        for key, value in g.items():
            what = f"{where}: param group {name!r} '{key}' is {value!r}"
            if key in _GROUP_RULES:
                expected, ok = _GROUP_RULES[key]
                if not ok(value):
                    raise CheckpointError(f"{what}, expected {expected}; the checkpoint is damaged")
            elif key in _GROUP_FLAGS:
                if value is not None and not isinstance(value, bool):
                    raise CheckpointError(f"{what}, expected true or false; the checkpoint is damaged")
            elif isinstance(value, float) and not math.isfinite(value):
                raise CheckpointError(f"{what}, expected a finite number; the checkpoint is damaged")


def check_trainer_state(st: Any, where: Path) -> None:
    """`samples_seen` must be there; every other counter the trainer reads must have its type."""
    if not isinstance(st, dict):
        raise CheckpointError(f"{where} is not a JSON object: the file is damaged")
    for key, typ in TRAINER_KEYS.items():
        if key not in st and key != "samples_seen":
            continue
        value = st.get(key)
        if not isinstance(value, typ) or isinstance(value, bool) or (typ is int and value < 0):
            expected = "a non-negative integer" if typ is int else "a list"
            raise CheckpointError(f"{where}: '{key}' is {value!r}, expected {expected}; the file is damaged")


def check_rng_state(rng: dict[str, torch.Tensor], where: Path) -> None:
    cpu_size = torch.get_rng_state().numel()
    for name, t in rng.items():
        if t.dtype != torch.uint8 or t.dim() != 1 or (name.endswith("torch_cpu") and t.numel() != cpu_size):
            raise CheckpointError(
                f"{where}: RNG state '{name}' is {t.dtype} {tuple(t.shape)}, expected uint8 of "
                f"{cpu_size if name.endswith('torch_cpu') else 'a CUDA generator'} bytes; the file is damaged"
            )


# Optimizer state keys with the parameter's shape (AdamW, SGD, bitsandbytes' 8-bit codes), and
# Adafactor's factored second moment: row means (shape[:-1]) and column means (shape[:-2] + shape[-1:]).
PARAM_SHAPED = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "state1", "state2"}
NON_NEGATIVE = {"exp_avg_sq", "step", "exp_avg_sq_row", "exp_avg_sq_col"}


def expected_state_shape(key: str, shape: torch.Size) -> torch.Size | None:
    """The shape optimizer state `key` must have for a parameter of `shape`; None = not shape-bound
    (step counts, bitsandbytes' quantization maps and block maxima, Adafactor's RMS)."""
    if key in PARAM_SHAPED:
        return shape
    if key == "exp_avg_sq_row":
        return shape[:-1]
    if key == "exp_avg_sq_col":
        return shape[:-2] + shape[-1:]
    return None


def check_optimizer_state(optimizer: torch.optim.Optimizer, where: Path) -> None:
    """Reject a loaded optimizer state that cannot be right (wrong shapes, NaN/inf moments,
    negative second moments or step counts) now, at load, rather than as a NaN many steps later."""
    names = {id(p): g.get("name", "?") for g in optimizer.param_groups for p in g["params"]}
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            for key, v in optimizer.state.get(p, {}).items():
                what = f"{where}: optimizer state '{key}' of parameter {i} in group {names[id(p)]}"
                if isinstance(v, torch.Tensor):
                    v = v.to_local() if hasattr(v, "to_local") else v
                    shape = (p.to_local() if hasattr(p, "to_local") else p).shape
                    want = expected_state_shape(key, shape)
                    if v.dim() > 0 and want is not None and v.shape != want:
                        raise CheckpointError(
                            f"{what} has shape {tuple(v.shape)}, the parameter {tuple(p.shape)}; the checkpoint "
                            "is damaged or from another model"
                        )
                    if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                        raise CheckpointError(f"{what} holds NaN or inf; the checkpoint is damaged")
                    if key in NON_NEGATIVE and v.numel() and bool((v < 0).any()):
                        raise CheckpointError(f"{what} is negative; the checkpoint is damaged")
                elif isinstance(v, int | float) and not (math.isfinite(v) and v >= 0):
                    raise CheckpointError(f"{what} is {v!r}; the checkpoint is damaged")


RUN_LOCK = ".train.lock"


@contextmanager
def run_folder_guard(run_dir: Path, *, resume: str | None, overwrite: bool, main: bool) -> Iterator[None]:
    """Refuse to start a fresh run over an existing one, and lock the run folder while training.

    A fresh run (no `resume`) in a folder that holds checkpoints would keep the old ones next to
    its own and mix two runs' histories; it needs `--resume` to continue or `overwrite` to delete
    them. Rank 0 (`main`) holds `RUN/.train.lock` for the whole run, so a second training in the
    same folder stops at once instead of overwriting the first one's checkpoints."""
    from bigasp.locks import folder_lock

    fresh = resume is None or resume == ""
    found = list_complete_checkpoints(run_dir) if fresh else []
    if found and not overwrite:
        raise BigaspError(
            f"{run_dir} already holds {len(found)} checkpoint(s) (newest {found[-1].name}) from an earlier "
            "run; continue it with --resume auto, start over with --overwrite (deletes them), or set "
            "another run_dir"
        )
    if not main:
        yield
        return
    busy = f"another `bigasp train` is using the run folder {run_dir}; wait for it or set another run_dir"
    with folder_lock(run_dir / RUN_LOCK, busy):
        if found:
            for p in (run_dir / CHECKPOINT_DIR).iterdir():
                if _NAME.match(p.name):
                    _remove(p)
            log.warning("--overwrite: deleted %d checkpoint(s) of the earlier run in %s", len(found), run_dir)
        yield


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# optimizer / scaler / RNG state <-> safetensors + JSON


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors by 'state.<param id or FQN>.<key>', JSON-able structure)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()  # safetensors refuses shared storage (bitsandbytes shares its quantization maps)
    for pid, pstate in state["state"].items():
        for k, v in _nested_items(pstate):
            if isinstance(v, torch.Tensor):
                t = v.detach().cpu().contiguous()
                if t.numel() and t.untyped_storage().data_ptr() in seen:
                    t = t.clone()
                seen.add(t.untyped_storage().data_ptr())
                tensors[f"state.{pid}.{k}"] = t
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _nested_items(pstate: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """A parameter's state with nested dicts (bitsandbytes' quantization state) as 'outer/inner' keys."""
    for k, v in pstate.items():
        if isinstance(v, dict):
            yield from _nested_items(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _set_nested(pstate: dict[str, Any], key: str, value: Any) -> None:
    *outer, leaf = key.split("/")
    for k in outer:
        pstate = pstate.setdefault(k, {})
    pstate[leaf] = value


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        pid, key = name.removeprefix("state.").rsplit(".", 1)  # pid: an int id or a dotted FQN
        _set_nested(state.setdefault(_param_key(pid), {}), key, t)
    for pid, extra in meta.get("scalars", {}).items():
        for key, v in extra.items():
            _set_nested(state.setdefault(_param_key(pid), {}), key, v)
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
            try:
                check_files(final)
            except (
                CheckpointError
            ) as err:  # the damaged one a `--resume auto` skipped: kept aside, never deleted
                aside = _damaged_name(final)
                os.replace(final, aside)
                log.warning(
                    "checkpoint %s is damaged (%s); moved it to %s and writing it anew", final, err, aside
                )
            else:
                log.info("checkpoint %s already exists; not rewriting it", final)
                return final
        else:
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
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = save_failure(err, final)
        if failure is not None:
            raise failure from None
        raise
    return final


def _damaged_name(final: Path) -> Path:
    """A free `step-N.damaged[-K]` name beside `final`: not a checkpoint name, so no resume or
    retention ever picks it up, and the user decides when to delete it."""
    aside = final.with_name(f"{final.name}.damaged")
    k = 1
    while aside.exists():
        k += 1
        aside = final.with_name(f"{final.name}.damaged-{k}")
    return aside


def write_failure_reason(err: BaseException) -> str | None:
    """The operating system's reason when a checkpoint write failed on the machine's side (a full
    disk, a quota, a read-only or lost mount), from an OSError or safetensors' own error; None
    for anything else (a bug, an interrupt), which keeps its traceback."""
    if isinstance(err, OSError):
        return f"{err.strerror or err} (errno {err.errno})" if err.errno else str(err)
    if type(err).__name__ == "SafetensorError" and "I/O error" in str(err):
        return str(err).split("I/O error: ", 1)[-1].split(" at path ", 1)[0]  # the path: a temp name
    return None


def save_failure(err: BaseException, final: Path) -> CheckpointError | None:
    """One line for a failed checkpoint write: which checkpoint, why, what was kept, the fix."""
    reason = write_failure_reason(err)
    if reason is None:
        return None
    kept = list_complete_checkpoints(final.parent)
    previous = f"the previous checkpoint {kept[-1]} is kept" if kept else "there is no earlier checkpoint"
    return CheckpointError(
        f"saving checkpoint {final} failed ({reason}); no partial checkpoint is left and {previous}: free space "
        f"on {final.parent} (or lower checkpoint.keep_last), then continue with --resume auto"
    )


def link_components(src: Path, dst: Path, components: list[str]) -> None:
    """Give model folder `dst` the `components` of model folder `src` as hard links (a copy where
    the filesystem has none), and `src`'s model_index.json: no second copy of unchanged weights."""
    for comp in components:
        for f in sorted((src / comp).rglob("*")):
            if not f.is_file():
                continue
            target = dst / comp / f.relative_to(src / comp)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
    shutil.copy2(src / "model_index.json", dst / "model_index.json")


def load_state(ckpt: Path) -> dict[str, Any]:
    """Everything except the model: optimizer (as a torch state_dict), trainer JSON, RNG tensors.

    A damaged file raises `CheckpointError` naming it and what is wrong."""
    state_dir = ckpt / "state"
    check_files(ckpt)
    try:
        opt = unflatten_optimizer(
            _load_tensors(state_dir / "optimizer.safetensors"), _read_json(state_dir / "optimizer.json")
        )
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"{state_dir / 'optimizer.json'} does not match optimizer.safetensors ({err})"
        ) from None
    trainer = _read_json(state_dir / "trainer.json")
    rng = _load_tensors(state_dir / "rng.safetensors")
    check_rng_state(rng, state_dir / "rng.safetensors")
    return {"optimizer": opt, "trainer": trainer, "rng": rng, "meta": read_meta(ckpt)}


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError (not an OSError)
        raise CheckpointError(f"{path} cannot be read as safetensors ({err})") from None


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
