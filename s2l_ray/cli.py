"""The jobs' command-line layer: run a job body, turn the project's errors into one ``error:`` line and exit status 2."""
from __future__ import annotations

import sys


def user_error(exc: BaseException) -> BaseException | None:
    """The project's own error behind ``exc``: ``exc`` itself or what it was raised from (``__cause__``, or Ray's
    ``cause`` for errors raised in tasks and actors); never an error that was merely being handled."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__module__.startswith("s2l_ray"):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def main(fn, verbose: bool = False) -> int:
    """Run a job body; the project's errors become one clear line and exit status 2. ``verbose``: Ray's own
    output (worker logs, progress bars, its warnings) shown too."""
    from . import progress

    progress.VERBOSE = verbose
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - anything not ours is re-raised with its traceback
        err = user_error(e)
        if err is None:
            raise
        return fail(str(err))
    finally:
        progress.stop_console()
    return 0
