"""Progress bars for the long user-facing steps (sampling, model loading, export).

One switch for the whole process: `enabled` is None by default, which lets tqdm decide (a
bar on a terminal, nothing when stderr is a pipe or a log file); commands set it from
`--progress/--no-progress`. Bars go to stderr so stdout stays a clean list of written paths.

The field's libraries draw their own loading bars and chatter (diffusers' "Loading pipeline
components", transformers' weight-loading bars); `quiet_libraries` turns those off so only
bigasp's own bars and messages reach the user.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

enabled: bool | None = None


def configure(on: bool | None) -> None:
    """Set the process-wide switch: True forces bars, False hides them, None = tqdm decides."""
    global enabled
    enabled = on


def bar(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None, unit: str = "it"):
    """A tqdm bar on stderr with rate (it/s) and ETA; disabled per `enabled`."""
    from tqdm import tqdm

    disable = None if enabled is None else not enabled
    return tqdm(
        iterable, desc=desc, total=total, unit=unit, file=sys.stderr, disable=disable, dynamic_ncols=True
    )


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' progress bars and info/warning chatter."""
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
