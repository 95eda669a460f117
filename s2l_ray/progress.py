"""Progress lines, one shape for every stage: ``[<stage> HH:MM:SS] message``, each printed once, by the driver.

Lines written inside Ray workers and actors (proxy training, scoring, fine-tuning) go to a named
actor, the ``Board``, which the driver drains from a background thread while it waits; so a run
reads the same in a terminal, in a log file and under ``ray job logs``, in order, with no
duplicates and no progress-bar debris. ``quiet_ray`` keeps Ray's own output (worker logs, Ray
Data's progress bars, internal warnings) out of the way unless ``--verbose`` asks for it back.
``Rate`` turns counts into a rate and an estimate of the time left.
"""
from __future__ import annotations

import atexit
import os
import threading
import time

BOARD = "s2l-progress"
VERBOSE = False  # set by the jobs' --verbose
_console: Console | None = None


def _line(msg: str, stage: str) -> str:
    return f"[{stage} {time.strftime('%H:%M:%S')}] {msg}"


def _board():
    """The driver's board, when called inside a Ray worker of a driver that runs one; else None."""
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
            return None
        return ray.get_actor(BOARD, namespace=ray.get_runtime_context().namespace)
    except (ImportError, ValueError):
        return None


def log(msg: str, stage: str = "s2l") -> None:
    """A progress line: printed here in the driver, handed to the driver's board in a Ray worker (waiting until the
    board holds it: a worker killed right after its last line, like the scoring coordinator, does not lose it)."""
    line = _line(msg, stage)
    board = _board()
    if board is None:
        print(line, flush=True)
    else:
        import ray

        ray.get(board.post.remote(line))


def _board_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class Board:
        """Holds the lines workers post until the driver takes them."""

        def __init__(self):
            self.lines: list[str] = []

        def post(self, line: str) -> None:
            self.lines.append(line)

        def take(self) -> list[str]:
            out, self.lines = self.lines, []
            return out

    return Board


class Console:
    """The driver's side: starts the board (on the node of the driver: nothing to lose with a worker node) and
    prints what it holds every ``interval`` seconds until stopped. Stop it before ``ray.shutdown()``."""

    def __init__(self, interval: float = 1.0):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.job = ray.get_runtime_context().get_job_id()  # a later ray.init is another session: another board
        here = ray.get_runtime_context().get_node_id()
        self.board = _board_class().options(name=BOARD, get_if_exists=True, scheduling_strategy=
                                            NodeAffinitySchedulingStrategy(here, soft=True)).remote()
        self.interval, self.stopped = interval, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        import ray

        for line in ray.get(self.board.take.remote()):
            print(line, flush=True)

    def _run(self) -> None:
        import ray

        while not self.stopped.wait(self.interval):
            if not ray.is_initialized():  # a call into a Ray that shut down would wait for it, then end the process
                return
            try:
                self._drain()
            except Exception:  # noqa: BLE001 - Ray shutting down: the last lines are drained by stop()
                return

    def stop(self) -> None:
        import ray

        self.stopped.set()
        self.thread.join()
        if ray.is_initialized():
            try:
                self._drain()
            except Exception:  # noqa: BLE001 - Ray going away
                pass


def quiet_ray(verbose: bool) -> dict:
    """Settings that keep Ray's own output out of the project's console (unless ``verbose``): the keyword
    arguments for ``ray.init``; also sets Ray Data's progress options and the C++ core's log level (which
    must be set before Ray starts)."""
    import ray

    if verbose:
        return {"log_to_driver": True}
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # internal notices printed as errors by the core
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    import logging

    for name in ("ray", "ray.data", "ray.train", "ray.tune", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars when a model is loaded here
    return {"log_to_driver": False, "logging_config": ray.LoggingConfig(log_level="ERROR")}


class Rate:
    """A count of ``total`` items done over time: its rate and the time left, as one phrase."""

    def __init__(self, total: int, unit: str):
        self.total, self.unit, self.start = total, unit, time.time()

    def phrase(self, done: int) -> str:
        seconds = time.time() - self.start
        rate = done / seconds if seconds > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else float("nan")
        eta = "" if done >= self.total or rate == 0 else f", about {_duration(left)} left"
        return f"{done:,}/{self.total:,} {self.unit} ({rate:,.1f} {self.unit}/s{eta})"


class Progress:
    """Called with the results so far (a list, in order), logs ``done/total unit`` with its rate and the time left
    every ``every`` seconds, and at the end of a stage that logged before (a short stage logs nothing);
    ``detail(results)`` adds a phrase (rows read so far)."""

    def __init__(self, total: int, unit: str, stage: str, detail=None, every: float = 10.0):
        self.rate, self.stage, self.detail, self.every = Rate(total, unit), stage, detail, every
        self.last, self.logged = time.time(), False

    def __call__(self, results: list) -> None:
        done = len(results)
        if time.time() - self.last < self.every and not (done == self.rate.total and self.logged):
            return
        self.last, self.logged = time.time(), True
        extra = f", {self.detail(results)}" if self.detail else ""
        log(f"{self.rate.phrase(done)}{extra}", self.stage)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def start_console() -> None:
    """Start the driver's console once per Ray session (the board and its drain thread)."""
    import ray

    global _console
    if _console is not None and _console.job != ray.get_runtime_context().get_job_id():
        _console.stop()
        _console = None
    if _console is None:
        _console = Console()
        atexit.unregister(stop_console)  # once, and after Ray's own exit handler so that it runs before it
        atexit.register(stop_console)


def stop_console() -> None:
    """Print what the board still holds and stop draining it."""
    global _console
    if _console is not None:
        _console.stop()
        _console = None
