"""Start a real `bigasp` process that stops at a named point (`BIGASP_HOLD`, see
bigasp.holdpoint) and return once it says it is there: a signal sent then lands at a known
place, however loaded the machine is."""

from __future__ import annotations

import os
import signal
import subprocess

from bigasp.holdpoint import ENV, MESSAGE


def ctrl_c_as_in_a_terminal() -> None:
    """Popen `preexec_fn`: SIGINT back to its default in the child. A suite started as a
    background job (`make test &` in a script) runs with SIGINT ignored, every child inherits
    that, and Python then installs no KeyboardInterrupt handler: a Ctrl-C test would hang."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_held(cmd: list[str], point: str, *, env: dict | None = None, **kw) -> tuple[subprocess.Popen, str]:
    """-> (the process, now waiting at `point`; the stderr it wrote before). Fails if it ends first."""
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1", ENV: point}
    kw.setdefault("preexec_fn", ctrl_c_as_in_a_terminal)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)
    seen: list[str] = []
    name = point.partition(":")[0]
    for line in proc.stderr:  # ends at EOF if the process exits without reaching the point
        seen.append(line)
        if line.startswith(f"{MESSAGE} {name} "):
            return proc, "".join(seen)
    _, err = proc.communicate()
    raise AssertionError(
        f"the process ended (exit {proc.returncode}) before reaching {point}: {''.join(seen)}{err}"
    )
