"""Timing, peak memory and result records shared by every bench.

GPU work is timed with CUDA events recorded around each iteration and read only after one
final synchronise, so the timer itself never stalls the stream (a host sync per step would
hide launch overhead the trainer also pays). CPU work is timed with `perf_counter`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULT_VERSION = 1
DATE_FORMAT = "%Y-%m-%d"

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_res(res: str) -> tuple[int, int]:
    """`"1024x768"` -> (height 1024, width 768): height first, as SDXL's time_ids are."""
    from bigasp.errors import ConfigError

    try:
        h, w = (int(v) for v in res.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--res must look like HEIGHTxWIDTH (e.g. 1024x1024), got {res!r}") from None
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise ConfigError(f"--res {res!r}: height and width must be positive multiples of 8")
    return h, w


def precision_dtype(precision: str) -> torch.dtype:
    from bigasp.errors import ConfigError

    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when present; a device this machine lacks is a user error (`bigasp.devices`)."""
    from bigasp.devices import resolve

    return resolve(device, setting="--device")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(fn: Callable[[], Any], device: torch.device, *, warmup: int, iters: int) -> list[float]:
    """Seconds per call of `fn`, `iters` samples after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends, strict=True):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1000.0 for s, e in zip(starts, ends, strict=True)]
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median is the headline (robust to a noisy shared box); min/max show the spread."""
    return {
        "median_s": statistics.median(seconds),
        "mean_s": statistics.fmean(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "iters": len(seconds),
    }


class PeakMemory:
    """Peak memory over a region: CUDA allocator peak on GPU, process peak RSS on CPU.

    On Linux the RSS high-water mark is reset by writing 5 to /proc/self/clear_refs, so the
    CPU figure is the region's peak rather than the whole process's (when the kernel allows).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.rss_reset = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.rss_reset = True
            except OSError:
                self.rss_reset = False
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def result(self) -> dict[str, Any]:
        gib = 1024**3
        if self.device.type == "cuda":
            return {
                "peak_allocated_gib": torch.cuda.max_memory_allocated(self.device) / gib,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / gib,
            }
        from bigasp.memstat import rss_peak_bytes

        rss = rss_peak_bytes()
        return {"peak_rss_gib": rss / gib, "rss_peak_is_region": self.rss_reset}


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device.type,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = props.total_memory / 1024**3
        info["cuda"] = torch.version.cuda
        info["summary"] = f"{props.name}, torch {torch.__version__}"
    else:
        info["summary"] = (
            f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU, {torch.get_num_threads()} threads"
        )
    return info


# Flags whose False value has its own spelling; other boolean flags are simply left out when off.
FALSE_FLAGS = {
    "train_te1": "--frozen-te1",
    "channels_last": "--no-channels-last",
    "baseline": "--no-baseline",
    "ngrams": "--no-ngrams",
}


def command_line(bench: str, params: dict[str, Any]) -> str:
    """The canonical command that reproduces a run: every option spelled out, in a fixed order."""
    parts = ["bigasp", "bench", bench]
    for key, value in params.items():
        if key == "json_out" or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                parts.append(flag)
            elif key in FALSE_FLAGS:
                parts.append(FALSE_FLAGS[key])
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


@dataclass
class BenchResult:
    """One bench run: what was run (`config`, `command`), where, and what it measured.

    `headline` names the metrics shown in the pasteable row, in order, with their units.
    """

    bench: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    headline: list[tuple[str, str]]
    command: str
    machine: dict[str, Any] = field(default_factory=dict)
    date: str = field(default_factory=lambda: time.strftime(DATE_FORMAT, time.gmtime()))
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format_version"] = RESULT_VERSION
        d["headline"] = [list(h) for h in self.headline]
        return d

    def table_row(self) -> str:
        """`| bench | result | command | machine | date |`, ready to paste into PERFORMANCE.md."""
        cells = []
        for key, unit in self.headline:
            v = self.metrics.get(key)
            cells.append(f"{_fmt(v)} {unit}".strip() if v is not None else f"n/a {unit}".strip())
        machine = self.machine.get("summary", "")
        return f"| {self.bench} | {', '.join(cells)} | `{self.command}` | {machine} | {self.date} |"

    def write_json(self, path: str | Path) -> None:
        """Atomic write (temp + rename) so a killed bench never leaves half a record."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        tmp.replace(path)


TABLE_HEADER = "| Bench | Result | Command | Machine | Date |\n|---|---|---|---|---|"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-4 <= abs(v) < 1e15:
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def emit(result: BenchResult, json_out: str | None, echo: Callable[[str], Any] = print) -> None:
    """Print the table row (and the JSON path); write JSON when asked."""
    if json_out:
        if json_out == "-":
            echo(json.dumps(result.to_json(), indent=2, default=str))
        else:
            result.write_json(json_out)
            echo(f"wrote {json_out}")
    for note in result.notes:
        echo(f"note: {note}")
    echo(TABLE_HEADER)
    echo(result.table_row())
