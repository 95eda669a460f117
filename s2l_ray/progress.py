"""Progress lines on stdout, one shape for every stage: ``[<stage> HH:MM:SS] message``."""
from __future__ import annotations

import time


def log(msg: str, stage: str = "s2l") -> None:
    print(f"[{stage} {time.strftime('%H:%M:%S')}] {msg}", flush=True)
