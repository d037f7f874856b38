"""Metrics sinks: JSON lines always; Weights & Biases and TensorBoard when configured.

`metrics.jsonl` in the run dir is the source of truth (one object per line, always with
`samples` and `step`); W&B and TensorBoard are optional imports, so a missing package is a clear
error only when the user asked for it. W&B "offline" mode needs no network (sync later with
`wandb sync`). Only rank 0 tracks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from bigasp.errors import ConfigError
from bigasp.fsutil import atomic_write_text

log = logging.getLogger(__name__)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


def truncate_jsonl(path: Path, max_samples: int, *, inclusive: bool = True) -> None:
    """On resume, drop records written after the checkpoint we resume from (atomic rewrite).

    Metrics carry the sample count *after* their step (keep `<=`); batch records carry the count
    *before* their step (`inclusive=False`: a record at exactly `max_samples` is from a step the
    checkpoint does not contain)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line from a kill
        n = int(rec.get("samples", 0))
        if n < max_samples or (inclusive and n == max_samples):
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class Tracker:
    """Writes metric dicts to every configured sink. A disabled tracker (other ranks) does nothing."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        config: dict[str, Any],
        wandb_project: str | None = None,
        wandb_mode: str = "offline",
        wandb_name: str | None = None,
        tensorboard: bool = False,
        resume_samples: int | None = None,
    ):
        self.enabled = enabled
        self._wandb = None
        self._tb = None
        self._file = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        if resume_samples is not None:
            truncate_jsonl(self.path, resume_samples)
        elif self.path.exists():
            self.path.replace(run_dir / f"metrics.{int(time.time())}.jsonl")  # fresh run: keep the old log
        self._file = self.path.open("a", encoding="utf-8")
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "logging.wandb_project is set but wandb is not installed; `pip install wandb` "
                    "or remove the key"
                ) from None
            self._wandb = wandb.init(
                project=wandb_project,
                name=wandb_name,
                mode=wandb_mode,
                dir=str(run_dir),
                config=config,
                resume="allow",
                id=wandb_name or run_dir.name,
            )
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "logging.tensorboard = true but tensorboard is not installed; `pip install tensorboard`"
                ) from None
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, metrics: dict[str, Any], *, samples: int, step: int) -> None:
        if not self.enabled:
            return
        rec = {"samples": samples, "step": step, "time": time.time(), **metrics}
        assert self._file is not None
        self._file.write(json.dumps({k: _clean(v) for k, v in rec.items()}) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self._wandb is not None:
            self._wandb.log(numeric, step=samples)
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, global_step=samples)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
