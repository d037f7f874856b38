"""One way every command turns a device setting into a `torch.device`, with one set of errors.

`auto` (or unset) is CUDA when torch sees a GPU, else the CPU. Under torchrun or SLURM every
rank has a LOCAL_RANK, and `auto` or a bare `cuda` means *that rank's* GPU, `cuda:LOCAL_RANK`:
with a bare `torch.device("cuda")` eight ranks of one node would all land on GPU 0. A device the
machine does not have is refused before any model loads, naming the setting that asked for it.
"""

from __future__ import annotations

from bigasp.errors import ConfigError


def resolve(name: str | None, *, local_rank: int = 0, setting: str = "--device"):
    """The `torch.device` for `name` (`auto`, `cpu`, `cuda`, `cuda:N`) on this rank."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{setting} {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"{setting} {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"{setting} {name!r}: no CUDA GPU is available here; use cpu (or auto)")
    index = local_rank if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"{setting} {name!r}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0..); pick one of them"
        )
    return torch.device("cuda", index)
