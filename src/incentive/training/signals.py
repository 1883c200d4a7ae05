"""SIGINT/SIGTERM become a flag checked between steps, so a run saves a checkpoint and stops cleanly;
a second signal stops at once."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any


class StopRequested(RuntimeError):
    """The run was asked to stop and has saved its state; ``--resume`` continues it."""


class GracefulStop:
    """Context manager that defers SIGINT/SIGTERM to the next step boundary."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without saving")
        self.requested = signal.Signals(signum).name
        print(f"\n[incentive] {self.requested} received: finishing this step, saving, then stopping")

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
