"""SIGINT/SIGTERM become a stop request: work that can be dropped (a step's rollouts and rewards) is dropped at
once, anything else finishes; then the run saves a checkpoint of the last finished step and stops. A repeated
signal only repeats the request, so the checkpoint is always written (and the CLI then ignores further ones
until it has exited). Also: :func:`time_limit`, which cuts off
code on the main thread that overruns, even while it sleeps or waits."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any


class StopRequested(RuntimeError):
    """The run was asked to stop and has saved its state; ``--resume`` continues it."""


class StepDropped(BaseException):
    """A stop request reached :meth:`GracefulStop.droppable` work. A BaseException, so that code which catches
    Exception (a reward's own error handling) cannot swallow it."""


class GracefulStop:
    """Context manager that turns SIGINT/SIGTERM into ``requested``, checked by the run between steps, and
    into StepDropped inside :meth:`droppable` work."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        self._droppable = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            print(f"\n[incentive] {name} again: already stopping; saving the checkpoint first", flush=True)
        else:
            self.requested = name
            print(f"\n[incentive] {name} received: saving the last finished step, then stopping", flush=True)
        if self._droppable:
            raise StepDropped(name)

    @contextmanager
    def droppable(self) -> Iterator[None]:
        """Run work that a stop request cuts short with StepDropped (at once if one is pending): work whose
        effects the caller can undo, such as rollouts and their rewards."""
        if self.requested:
            raise StepDropped(self.requested)
        self._droppable = True
        try:
            yield
        finally:
            self._droppable = False

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exiting_on_stop and exc_type is StopRequested:
            ignore_stop_signals()  # no window with the default action between here and the process's exit
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


exiting_on_stop = False
"""Set by a process that exits once a run stops on request (the CLI): leaving :class:`GracefulStop` with
StopRequested then ignores further signals instead of putting the default action back, which a repeated
signal could otherwise hit before the process reports and exits."""


def ignore_stop_signals() -> None:
    """For a process on its way out after a stop request (the CLI, exit code 130): ignore repeats, which would
    otherwise kill it with the default action before it reports, also while the interpreter shuts down (which
    puts Python's own handlers back to the default action, but leaves an ignored signal ignored). Not for a
    process that goes on: children it starts later would inherit the ignored signals."""
    if threading.current_thread() is threading.main_thread():
        for sig in GracefulStop.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


class TimeLimitExceeded(BaseException):
    """Raised in the main thread when a :func:`time_limit` block overruns; a BaseException, so that code under
    the limit which catches Exception cannot swallow it."""


@dataclass
class Deadline:
    """A time limit for :func:`time_limit`: ``expired`` once its time is up, even where the block swallowed the
    exception and finished anyway."""

    seconds: float
    expired: bool = False


_LIMIT_SIGNAL: int | None = getattr(signal, "SIGRTMIN", None)
"""A real-time signal of its own (so SIGALRM stays free for code under the limit, such as the verifier's)."""
_current: Deadline | None = None


def _on_limit_signal(signum: int, frame: FrameType | None) -> None:
    if _current is not None and _current.expired:
        raise TimeLimitExceeded(f"no result within {_current.seconds:g} s")


@contextmanager
def time_limit(deadline: Deadline) -> Iterator[None]:
    """Raise TimeLimitExceeded in the block once it has run ``deadline.seconds``: a watchdog thread signals the
    main thread, which wakes even from a sleep or a blocking wait. Enforced on the main thread of Linux processes
    only (elsewhere the block runs unlimited); blocks do not nest."""
    global _current
    if _LIMIT_SIGNAL is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(_LIMIT_SIGNAL) is not _on_limit_signal:
        signal.signal(_LIMIT_SIGNAL, _on_limit_signal)  # kept installed: a late signal then finds no deadline
    done = threading.Event()
    main = threading.get_ident()
    limit_signal = _LIMIT_SIGNAL

    def watch() -> None:
        if not done.wait(deadline.seconds):
            deadline.expired = True
            signal.pthread_kill(main, limit_signal)

    _current = deadline
    watchdog = threading.Thread(target=watch, name="incentive-time-limit", daemon=True)
    try:
        watchdog.start()
        yield
    finally:
        done.set()
        _current = None
        if watchdog.is_alive():
            watchdog.join()
