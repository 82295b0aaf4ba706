"""The one owner of the model: the web server and the terminal chat both go through here.

Generations are batched by runtime.batch.Scheduler (up to --parallel conversations decoded
together, admitted first come first served); other work (embeddings) runs on the same thread
between two decoding steps, so nothing else ever touches the llama.cpp context.
"""

from __future__ import annotations

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


class EngineWorker:
    def __init__(self, engine, parallel: int | None = None):
        from .batch import Scheduler

        self.engine = engine
        self.scheduler = Scheduler(engine, parallel or getattr(engine, "n_seq", 1))

    @property
    def parallel(self) -> int:
        return self.scheduler.n_parallel

    def generate(self, tokens, sampling, on_text=None, cancel: CancelFlag | None = None,
                 on_logprobs=None) -> Future:
        """Queue a generation; the Future gives its Result."""
        return self.scheduler.generate(tokens, sampling, on_text, cancel, on_logprobs)

    def submit(self, run, cancel: CancelFlag | None = None) -> Job:
        """run(engine, cancelled) on the engine's thread, between two decoding steps."""
        job = Job(run, cancel or CancelFlag())
        job.future = self.scheduler.submit_job(lambda engine: run(engine, job.cancel.is_set))
        return job

    def pending(self) -> int:
        return self.scheduler.queued()

    @property
    def stats(self):
        return self.scheduler.stats
