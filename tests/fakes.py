"""A stand-in for the engine and its worker, for in-process tests of the server's request and
response shapes (tests/test_api_shapes.py): the real app, routes, parsing, templates, tool and
reasoning handling run; only the model is replaced by a script of answers. End-to-end behaviour
is tested against the real bundle elsewhere."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from runtime.inference.scheduler import Counters
from runtime.inference.sampling import Result, TokenLogprob
from runtime.errors import ContextOverflowError, RuntimeFailure


class FakeEngine:
    """Tokens are the prompt's bytes; the vocabulary has 256 of them."""

    n_ctx = 512
    n_vocab = 256
    bos_text = "<s>"
    add_bos = False

    def tokenize_prompt(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_bounded(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def check_fits(self, n: int) -> None:
        if n >= self.n_ctx:
            raise ContextOverflowError(f"the prompt is {n} tokens, longer than the context ({self.n_ctx} tokens)")

    def text_limit(self) -> int:
        return self.n_ctx

    def check_text_fits(self, n_bytes: int) -> None:
        self.check_fits(n_bytes)

    def checked_tokens(self, tokens):
        bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is not in the vocabulary (0 to {self.n_vocab - 1})")
        return list(tokens)

    def check_grammar(self, gbnf: str) -> bool:
        return "::=" in gbnf

    def embed(self, text):
        n = len(text) if isinstance(text, list) else len(text.encode())
        return [0.6, 0.8], n


@dataclass
class Call:
    tokens: list
    sampling: object


@dataclass
class FakeScheduler:
    """answer: the text every generation produces, in pieces of `piece` characters (or a
    callable of the call); fail: a RuntimeFailure message to raise instead; finish: its reason."""

    answer: object = "Paris."
    piece: int = 2
    finish: str = "stop"
    fail: str | None = None
    calls: list = field(default_factory=list)
    engine: FakeEngine = field(default_factory=FakeEngine)
    stats: Counters = field(default_factory=Counters)
    parallel: int = 2
    n_parallel: int = 2

    def pending(self) -> int:
        return 0

    def busy_slots(self) -> int:
        return 0

    def generate(self, tokens, sampling, on_text=None, cancel=None, on_logprobs=None) -> Future:
        call = Call(list(tokens), sampling)
        self.calls.append(call)
        future: Future = Future()
        text = self.answer(call) if callable(self.answer) else self.answer
        stopped_by = None
        hits = [(text.find(st), st) for st in sampling.stop if st and st in text]
        if hits:  # as the real decode loop: the answer ends before the first stop string it reaches
            at, stopped_by = min(hits)
            text = text[:at]

        def run():
            if self.fail:
                future.set_exception(RuntimeFailure(self.fail))
                return
            pieces = [text[i:i + self.piece] for i in range(0, len(text), self.piece)]
            entries, at = [], 0
            for p in pieces:
                e = TokenLogprob(ord(p[0]) % 256, p.encode(), -0.5, [(ord(p[0]) % 256, p.encode(), -0.5)], at,
                                 at + len(p))
                at += len(p)
                entries.append(e)
                if on_text:
                    on_text(p)
                if on_logprobs:
                    on_logprobs([e])
            future.set_result(Result(text=text, finish_reason=self.finish, prompt_tokens=len(tokens),
                                     completion_tokens=len(pieces),
                                     logprobs=entries if sampling.logprobs is not None else None,
                                     stop_string=stopped_by))

        threading.Thread(target=run, daemon=True).start()
        return future

    def submit(self, run, cancel=None):
        job = type("Job", (), {})()
        job.future = Future()
        try:
            job.future.set_result(run(self.engine, lambda: False))
        except Exception as exc:  # handed to the request, as the real scheduler does
            job.future.set_exception(exc)
        return job
