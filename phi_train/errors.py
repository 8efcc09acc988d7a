"""The one base class of every user-facing error in phi-train and its tools.

A `PhiTrainError` is a user mistake or bad input (a missing file, an unknown key, a corrupt shard): each entry point
catches it once, prints `error: <message>` on one line (rank 0 only under a launcher) and exits 2. Anything else is a
bug and keeps its traceback. Subclasses exist so that callers and tests can tell the stages apart; they add no
behaviour. `ValueError` stays a base so that code written against the older per-module errors keeps catching them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

CONF_ROOT = Path(__file__).resolve().parent.parent / "conf"
"""The shipped Hydra config groups (`conf/<group>/<name>.yaml`), beside the package in a source checkout."""


class PhiTrainError(ValueError):
    """A user mistake or bad input, reported on one line with no traceback."""


class ReconcileError(PhiTrainError):
    """A job's counts do not add up (in != kept + dropped): data was lost or counted twice."""


def require(ok: bool, msg: str, error: type[PhiTrainError] = PhiTrainError) -> None:
    """Raise `error(msg)` unless `ok`: the one-line check behind every config's `__post_init__`."""
    if not ok:
        raise error(msg)


def report(exc: BaseException) -> int:
    """Print a user error on one line (on rank 0 only, when a launcher set RANK) and return exit status 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {exc}", file=sys.stderr, flush=True)
    return 2


def run_main(main: Callable[[], int | None]) -> int:
    """Run an entry point's `main`, turning a `PhiTrainError` into one line and exit status 2."""
    try:
        return main() or 0
    except PhiTrainError as exc:
        return report(exc)
