"""progress: lines from Ray workers reach the driver's console once each; rates and the time left."""
from __future__ import annotations

import re

from s2l_ray import progress


def test_lines_written_in_ray_workers_are_printed_once_by_the_driver(ray_local, capsys):
    import ray

    @ray.remote(num_cpus=0.1)
    def work(i: int) -> int:
        progress.log(f"item {i} done", "test")
        return i

    progress.start_console()
    try:
        assert ray.get([work.remote(i) for i in range(5)]) == list(range(5))
    finally:
        progress.stop_console()  # prints what the board still holds
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[test ")]
    assert sorted(re.sub(r"^\[test \d\d:\d\d:\d\d\] ", "", line) for line in lines) == [f"item {i} done"
                                                                                      for i in range(5)]


def test_a_long_stage_reports_its_rate_and_the_time_left_and_a_short_one_nothing(capsys):
    step = progress.Progress(4, "pieces", "corpus", lambda done: f"{sum(done):,} rows", every=0.0)
    for n in range(1, 5):
        step(list(range(1000, 1000 + n)))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(re.match(r"\[corpus \d\d:\d\d:\d\d\] \d/4 pieces \([\d,.]+ pieces/s", x)
                                   for x in lines)
    assert "left), 1,000 rows" in lines[0] and lines[-1].endswith("pieces/s), 4,006 rows")  # done: no time left
    quiet = progress.Progress(3, "pieces", "corpus", every=3600.0)
    for n in range(1, 4):
        quiet(list(range(n)))
    assert capsys.readouterr().out == ""
