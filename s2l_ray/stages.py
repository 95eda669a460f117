"""The one stage runner. A stage of a run directory records in its manifest ``stages.<name>``: the key of what it was
made from (``layout.stage_key`` of its configs, fingerprints and upstream keys), its seconds and any facts it adds;
its result is the manifest's section ``<name>``. A stage finished with the same key is reused, else run and recorded
(result and record in one write)."""
from __future__ import annotations

import time
from typing import Any, Callable

from .layout import RunDir


def key_of(run: RunDir, name: str) -> str | None:
    """The key stage ``name`` of ``run`` finished with, or None."""
    return run.read_manifest().get("stages", {}).get(name, {}).get("key")


def record(run: RunDir, name: str, key: str, started: float, result: dict | None = None, **facts: Any) -> None:
    """Record stage ``name`` finished with ``key`` (seconds since ``started``, ``facts``), and its ``result`` as the
    manifest's section ``name`` when given."""
    stages = run.read_manifest().get("stages", {})
    stage = {"key": key, "seconds": round(time.time() - started, 2), **facts}
    run.update_manifest(stages={**stages, name: stage}, **({} if result is None else {name: result}), merge=False)


def run_stage(run: RunDir, name: str, key: str, work: Callable[[], dict], *, reuse: bool = True,
              **facts: Any) -> tuple[dict, bool]:
    """``(result, reused)``: the stored result of stage ``name`` when it finished with ``key`` (and ``reuse``), else
    ``work()``'s, recorded."""
    if reuse and key_of(run, name) == key:
        return run.read_manifest()[name], True
    started = time.time()
    result = work()
    record(run, name, key, started, result, **facts)
    return result, False
