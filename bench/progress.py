"""Progress lines for the benchmark scripts: which run of how many is starting, how many remain, and an ETA
from the mean duration of the runs done so far."""

from __future__ import annotations

import time


class Progress:
    """Call :meth:`start` before each of ``total`` runs; it prints ``[tag] run i/total: what (… left, ETA …)``."""

    def __init__(self, tag: str, total: int) -> None:
        self.tag = tag
        self.total = total
        self.done = -1
        self.t0 = time.perf_counter()

    def start(self, what: str) -> None:
        self.done += 1
        left = self.total - self.done - 1
        if self.done == 0:
            eta = "ETA after the first run"
        else:
            per_run = (time.perf_counter() - self.t0) / self.done
            eta = f"ETA ~{_duration(per_run * (self.total - self.done))}"
        run = f"run {self.done + 1}/{self.total}"
        print(f"[{self.tag}] {run}: {what} ({left} left after it, {eta})", flush=True)


def _duration(seconds: float) -> str:
    """Seconds as a rough human duration (s, min or h)."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
