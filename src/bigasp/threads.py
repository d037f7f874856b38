"""CPU thread and DataLoader worker counts that suit the machine, chosen at start-up.

PyTorch starts one intra-op thread per core. For a small model on a CPU that is the slow
choice: each operator is too small to split, so the threads spend their time synchronising,
and on a shared or 2-core machine they stall behind other processes (the tiny preset trains
and samples ~5x faster with one thread). A full-size SDXL on CPU is the opposite: its
matrix products are large enough to use every core. On a GPU the CPU only feeds it, so
torch's default is left alone and the cores go to DataLoader workers.

`choose` is a pure function of (device, cores, model size) so the rule is testable;
`apply` reads the machine, sets torch and returns the one line the commands print.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SMALL_MODEL_PARAMS = 100_000_000  # below this, intra-op parallelism costs more than it saves on CPU
# Parameters of the presets without building them (sdxl-base: UNet + both text encoders + VAE).
PRESET_PARAMS = {"tiny": 6_000_000, "demo": 5_000_000, "sdxl-base": 3_500_000_000}


@dataclass(frozen=True)
class ThreadPlan:
    """`threads` None = leave torch's own default (one per core)."""

    threads: int | None
    workers: int
    reason: str


def choose(device: str, cores: int, params: int) -> ThreadPlan:
    """Intra-op threads and loader workers for a model of `params` parameters on `device`."""
    cores = max(1, cores)
    if device != "cpu":
        workers = min(4, max(0, cores - 2))  # two cores stay with the main process feeding the GPU
        return ThreadPlan(None, workers, f"GPU run on {cores} core(s)")
    workers = 0 if cores < 4 else 1  # on CPU the model, not the loader, is the bottleneck
    if params < SMALL_MODEL_PARAMS:
        return ThreadPlan(1, workers, f"small model ({params / 1e6:.0f}M parameters) on CPU")
    return ThreadPlan(
        max(1, cores - workers), workers, f"large model ({params / 1e9:.1f}B parameters) on CPU"
    )


def machine_cores() -> int:
    """Cores this process may run on (taskset/cgroup affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return os.cpu_count() or 1


def estimate_params(source: str | os.PathLike) -> int:
    """Parameter count of a model spec from its preset name or the size of its weight files
    (at 2 bytes per parameter, the fp16 of shared files), without loading it."""
    name = str(source)
    if name in PRESET_PARAMS:
        return PRESET_PARAMS[name]
    path = Path(name).expanduser()
    files = [path] if path.is_file() else list(path.rglob("*.safetensors")) if path.is_dir() else []
    total = sum(f.stat().st_size for f in files if f.is_file())
    return total // 2 if total else PRESET_PARAMS["sdxl-base"]


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(device).startswith("cuda") else "cpu"


def apply(
    device: str | None,
    source: str | os.PathLike,
    *,
    threads: int | None = None,
    workers: int | None = None,
    override_hint: str = "--threads",
    with_workers: bool = False,
) -> ThreadPlan:
    """Set torch's intra-op threads for this run and log the choice in one line.

    An explicit `threads` (a flag) or OMP_NUM_THREADS wins; an explicit `workers` (a config
    key the user set) is kept. Returns the plan actually used.
    """
    import torch

    dev = resolve_device(device)
    # torchrun starts one process per device on this machine: they share its cores.
    cores = max(1, machine_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    plan = choose(dev, cores, estimate_params(source))
    reason = plan.reason
    if threads is not None:
        plan_threads: int | None = threads
        reason = f"{override_hint} {threads}"
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        plan_threads = int(os.environ["OMP_NUM_THREADS"])
        reason = "OMP_NUM_THREADS"
    else:
        plan_threads = plan.threads
    if plan_threads is not None:
        torch.set_num_threads(max(1, plan_threads))
    used = ThreadPlan(torch.get_num_threads(), plan.workers if workers is None else workers, reason)
    loader = f", {used.workers} loader worker(s)" if with_workers else ""
    log.info(
        "%s: %d intra-op thread(s)%s (%s; %d core(s) available; override with %s)",
        dev,
        used.threads,
        loader,
        reason,
        cores,
        override_hint,
    )
    return used
