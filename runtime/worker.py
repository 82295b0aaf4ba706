"""One model, one generation at a time: a single thread owns the engine and runs jobs in the
order they arrive. The web server and the terminal chat both submit here, so they can share a
model without stepping on each other's KV cache.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable


class CancelFlag:
    """A cancel request: set from a signal handler or another thread, read between tokens.

    Not a threading.Event: Event.set takes a lock, and a second Ctrl-C arriving while the first
    handler holds it (PyInstaller's bootloader forwards the terminal's SIGINT, so two arrive)
    deadlocks the process. A plain attribute is atomic under the GIL."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = False

    def set(self) -> None:
        self.value = True

    def is_set(self) -> bool:
        return self.value


@dataclass
class Job:
    run: Callable[[Any, Callable[[], bool]], Any]  # run(engine, cancelled) -> result
    cancel: CancelFlag = field(default_factory=CancelFlag)
    future: Future = field(default_factory=Future)


@dataclass
class Stats:
    jobs: int = 0
    cancelled: int = 0
    skipped: int = 0  # cancelled while still waiting in the queue
    # Tokens a generation produced after its client had gone: the cost of a disconnect.
    max_tokens_after_cancel: int = 0


class EngineWorker:
    def __init__(self, engine):
        self.engine = engine
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.stats = Stats()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def submit(self, run, cancel: CancelFlag | None = None) -> Job:
        job = Job(run, cancel or CancelFlag())
        self.queue.put(job)
        return job

    def pending(self) -> int:
        return self.queue.qsize()

    def note_token_after_cancel(self, count: int) -> None:
        self.stats.max_tokens_after_cancel = max(self.stats.max_tokens_after_cancel, count)

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.cancel.is_set():
                self.stats.skipped += 1
                job.future.cancel()
                continue
            if not job.future.set_running_or_notify_cancel():
                continue
            self.stats.jobs += 1
            try:
                result = job.run(self.engine, job.cancel.is_set)
            except BaseException as exc:  # handed to the waiting request, never kills the worker
                job.future.set_exception(exc)
                continue
            # Counted from the result, not the flag: a stream that finished sets its flag too.
            if getattr(result, "finish_reason", None) == "cancelled":
                self.stats.cancelled += 1
            job.future.set_result(result)

    def stop(self) -> None:
        self.queue.put(None)
