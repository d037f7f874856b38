"""Named points where a run can be told to wait: `BIGASP_HOLD=<point>[:<n>]`.

A test that interrupts a real process (Ctrl-C, SIGTERM, SIGKILL) must send the signal at a known
place, never "after a while": on a loaded machine the work may already be done, or not begun.
With the variable set, the n-th (default first) time the process passes `point` it prints
`holding at <point>` on stderr and sleeps until a signal ends it (Ctrl-C raises
KeyboardInterrupt there, as it would anywhere in the loop). Unset, `hold` costs one dict lookup.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "BIGASP_HOLD"
MESSAGE = "holding at"
_passes: dict[str, int] = {}


def hold(point: str) -> None:
    """Wait here forever if `BIGASP_HOLD` names `point` and this is its n-th pass."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _passes[point] = _passes.get(point, 0) + 1
    if _passes[point] != (int(nth) if nth else 1):
        return
    sys.stderr.write(f"{MESSAGE} {point} ({ENV})\n")
    sys.stderr.flush()
    while True:
        time.sleep(3600)
