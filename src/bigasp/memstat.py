"""The process's peak resident memory, for benches and for workers that report their own."""

from __future__ import annotations

from pathlib import Path


def rss_peak_bytes() -> int:
    """This process's RSS high-water mark in bytes: /proc's VmHWM (which a bench may reset), else
    getrusage's ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
