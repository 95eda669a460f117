"""Running a step's Ray tasks: a bounded window in flight, results in input order."""
from __future__ import annotations

import collections

def map_in_order(task, calls, on_result=None) -> list:
    """``task.remote(*args)`` for each ``args`` in ``calls``, at most two per cluster CPU (as it is now) in flight; the results
    in order, so the first failing call in input order is the one raised (``on_result`` sees them as they come). On a failure nothing more is
    submitted and the calls in flight are waited for, so that none still writes when the caller cleans up.
    They are not cancelled: ``ray.cancel`` racing a task's completion aborts the owner process in Ray 2.x
    ("Tried to complete task that was not pending", ray-project/ray#54846)."""
    import ray

    results, flight = [], collections.deque()
    try:
        def take() -> None:
            results.append(ray.get(flight.popleft()))
            if on_result is not None:
                on_result(results)

        for args in calls:
            flight.append(task.remote(*args))
            if len(flight) >= max(2, 2 * int(ray.cluster_resources().get("CPU", 0))):  # nodes may join meanwhile
                take()
        while flight:
            take()
    except BaseException:
        if flight:  # ray.wait refuses num_returns=0, which would hide the error
            ray.wait(list(flight), num_returns=len(flight))
        raise
    return results
