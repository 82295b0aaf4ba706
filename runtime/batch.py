"""Several conversations decoded together: continuous batching on one llama.cpp context (issue 11).

One thread owns the engine. Each step it builds one llama_batch holding, for every busy slot, the
next token of its answer and, within a token budget, the next chunk of a newcomer's prompt; one
llama_decode computes them all (matrix-matrix work instead of one matrix-vector pass per
conversation), then every slot whose logits came back samples with its own sampler chain, checks
its own stop strings, limits and cancellation, and streams its text. New requests join between
steps; a finished or cancelled one frees its slot at once. Each slot has a KV cache of its own
(see Engine: a shared one changed greedy answers with the load); a slot's cache is kept after its
answer, so the next turn of the same conversation reuses it.

llama.cpp splits a batch over per-sequence caches into micro-batches of consecutive sequence ids
(llama_kv_cache::init_batch: split_equal, sequential): busy slots 0, 2, 5, 7 cost four graph
computations a step where 0, 1, 2, 3 cost one. So a newcomer takes the free slot that keeps the
busy ones in one run (or the fewest), unless another free slot holds a long prefix of its prompt
(LONG_PREFIX: the next turn of a conversation) or the waiting requests fill every slot anyway
(then the longest cached prefix wins), and a step's tokens go into the batch in slot order.

Requests are admitted in arrival order (FIFO) and wait while every slot is busy; a prompt that
can never fit is refused before it gets here (Engine.check_fits). Prompts are decoded in chunks
interleaved with the other slots' tokens, so a newcomer's long prompt stalls nobody for long.
Other work (embeddings) runs between two steps.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from .engine import Result, Sampling, TextOut, TokenLogprob, token_logprobs
from .errors import RuntimeFailure

# A cached prefix this long is worth more than a contiguous run of busy slots: decoding it again
# would cost more than the extra micro-batch each step of one answer costs (measured on the demo
# model: a step's extra graph computation ~ 10 ms; 256 prompt tokens ~ 0.2 s).
LONG_PREFIX = 256


def runs(seqs) -> int:
    """The number of runs of consecutive ids in seqs (micro-batches llama.cpp makes of them)."""
    ordered = sorted(seqs)
    return sum(1 for i, s in enumerate(ordered) if i == 0 or s != ordered[i - 1] + 1)


def choose_slot(free: list, busy: list[int], tokens: list[int], fills: bool = False):
    """(slot, cached tokens it keeps) for a prompt: a free slot holding a long prefix of it (the
    next turn of a conversation) first; else the one keeping the busy slots in fewest runs; then
    the longest cached prefix, then the lowest id. fills: the requests waiting (this one
    included) will take every free slot, so every slot ends up busy whichever each takes: the
    longest cached prefix first."""
    best, best_score, keep = None, None, 0
    for s in free:
        k, limit = 0, min(len(s.cached), len(tokens) - 1)
        while k < limit and s.cached[k] == tokens[k]:
            k += 1
        score = (fills or k >= LONG_PREFIX, k if fills else 0, -runs(busy + [s.seq]), k, -s.seq)
        if best_score is None or score > best_score:
            best, best_score, keep = s, score, k
    return best, keep


@dataclass
class GenRequest:
    tokens: list[int]
    sampling: Sampling
    on_text: Callable[[str], None] | None
    cancel: object  # CancelFlag
    on_logprobs: Callable[[list], None] | None = None  # TokenLogprobs of the text just passed on
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.perf_counter)


class _Slot:
    def __init__(self, seq: int):
        self.seq = seq
        self.cached: list[int] = []  # what the KV cache holds for this sequence
        self.req: GenRequest | None = None
        self.todo: list[int] = []  # prompt tokens not yet decoded
        self.sampler = None
        self.text: TextOut | None = None
        self.result: Result | None = None
        self.next_token: int | None = None  # sampled, to be decoded in the next step
        self.started = 0.0
        self.decode_started = 0.0


@dataclass
class Counters:
    """For /health and /metrics."""

    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    skipped: int = 0  # cancelled while still waiting
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    max_tokens_after_cancel: int = 0


class Scheduler:
    """The engine's owner: generation requests batched, other jobs run between steps."""

    def __init__(self, engine, n_parallel: int, prefill_chunk: int = 256):
        C = engine.C
        self.engine, self.C = engine, C
        self.n_parallel = max(1, min(n_parallel, engine.n_seq))
        self.prefill_chunk = max(16, min(prefill_chunk, engine.n_batch))
        self.slots = [_Slot(i) for i in range(self.n_parallel)]
        self.batch = C.llama_batch_init(engine.n_batch, 0, 1)
        self.waiting: collections.deque[GenRequest] = collections.deque()
        self.jobs: collections.deque = collections.deque()
        self.stats = Counters()
        self.lock = threading.Condition()
        self.engine.reset()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # -- what the server and the chat call -----------------------------------------------------
    def generate(self, tokens: list[int], sampling: Sampling, on_text=None, cancel=None,
                 on_logprobs=None) -> Future:
        from .worker import CancelFlag

        req = GenRequest(list(tokens), sampling, on_text, cancel or CancelFlag(), on_logprobs=on_logprobs)
        with self.lock:
            self.stats.requests += 1
            self.waiting.append(req)
            self.lock.notify()
        return req.future

    def submit_job(self, fn) -> Future:
        """fn(engine) run on the engine's thread between two steps (embeddings)."""
        future: Future = Future()
        with self.lock:
            self.jobs.append((fn, future))
            self.lock.notify()
        return future

    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.req is not None)

    def queued(self) -> int:
        return len(self.waiting)

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.jobs and not self.busy_slots():
                    self.lock.wait()
                jobs = list(self.jobs)
                self.jobs.clear()
            for fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.engine))
                    except BaseException as exc:  # handed to the caller
                        future.set_exception(exc)
            try:
                self._admit()
                if self.busy_slots():
                    self._step()
            except BaseException as exc:  # a failed decode: every running request hears of it
                for slot in self.slots:
                    if slot.req is not None:
                        self._fail(slot, exc)

    def _admit(self) -> None:
        """Waiting requests take free slots in arrival order; each slot has a KV cache of its
        own (Engine), so a prompt that fits the context (checked before it was queued) fits its
        slot. The slot chosen is the free one whose cache shares the longest prefix with the
        prompt: the next turn of a conversation reuses what its last turn left there."""
        while True:
            with self.lock:
                if not self.waiting:
                    return
                req = self.waiting[0]
                if req.cancel.is_set():
                    self.waiting.popleft()
                    self.stats.skipped += 1
                    req.future.cancel()
                    continue
                free = [s for s in self.slots if s.req is None]
                if not free:
                    return
                fills = len(self.waiting) >= len(free)
                self.waiting.popleft()
            best, keep = choose_slot(free, [s.seq for s in self.slots if s.req is not None], req.tokens, fills)
            self._forget(best, keep)
            self._start(best, req)

    def _forget(self, slot: _Slot, keep: int) -> None:
        if len(slot.cached) > keep:
            self.C.llama_memory_seq_rm(self.engine.memory, slot.seq, keep, -1)
            del slot.cached[keep:]

    def _start(self, slot: _Slot, req: GenRequest) -> None:
        slot.req = req
        slot.todo = req.tokens[len(slot.cached):]
        slot.sampler = self.engine._sampler(req.sampling, req.tokens)
        slot.result = Result(prompt_tokens=len(req.tokens))
        on_text = req.on_text
        if req.sampling.logprobs is not None:
            slot.result.logprobs = []
            on_text = self._with_logprobs(slot, req)
        slot.text = TextOut(req.sampling.stop, on_text)
        slot.next_token = None
        slot.started = time.perf_counter()
        slot.decode_started = 0.0
        self.stats.prompt_tokens += len(slot.todo)

    def _step(self) -> None:
        C, eng, b = self.C, self.engine, self.batch
        n = 0
        sample_at: list[tuple[_Slot, int]] = []
        # cancellations first: they free their slot before this step's work
        for slot in self.slots:
            if slot.req is not None and slot.req.cancel.is_set():
                slot.result.finish_reason = "cancelled"
                self._finish(slot, forget=True)
        # one token for every answer being written; then prompt chunks, in arrival order, within
        # the budget; into the batch in slot order (llama.cpp's micro-batches follow seq ids)
        work: dict[int, list] = {}
        for slot in self.slots:
            if slot.req is not None and slot.next_token is not None:
                work[slot.seq] = [slot, [slot.next_token], True]
                slot.next_token = None
        n = len(work)
        budget = max(self.prefill_chunk, n)
        for slot in sorted((s for s in self.slots if s.req is not None and s.todo), key=lambda s: s.req.arrived):
            room = min(budget - n, eng.n_batch - n)
            if room <= 0:
                break
            chunk = slot.todo[:room]
            del slot.todo[: len(chunk)]
            work[slot.seq] = [slot, chunk, not slot.todo]
            n += len(chunk)
        n = 0
        for seq in sorted(work):
            slot, tokens, wants_logits = work[seq]
            for i, tok in enumerate(tokens):
                self._put(b, n, tok, len(slot.cached) + i, seq, wants_logits and i == len(tokens) - 1)
                n += 1
            slot.cached.extend(tokens)
            if wants_logits:
                sample_at.append((slot, n - 1))
        if n == 0:
            return
        b.n_tokens = n
        t0 = time.perf_counter()
        rc = C.llama_decode(eng.ctx, b)
        dt = time.perf_counter() - t0
        self.stats.steps += 1
        if rc != 0:
            raise RuntimeFailure(f"llama_decode failed ({rc}) on a batch of {n} tokens")
        decoding = sum(1 for s, _ in sample_at if s.decode_started)
        if decoding:
            self.stats.decode_seconds += dt * decoding / max(1, len(sample_at))
        if n > decoding:
            self.stats.prompt_seconds += dt * (n - decoding) / n
        now = time.perf_counter()
        for slot, idx in sample_at:
            self._sample(slot, idx, now)

    def _put(self, b, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = 1 if logits else 0

    @staticmethod
    def _with_logprobs(slot: _Slot, req: GenRequest):
        """on_text for a request that wants log-probabilities: after the text, the entries of
        the tokens whose text has now begun to be passed on (a token held back as the start of
        a possible stop string goes out with the text that follows it)."""
        state = {"emitted": 0, "sent": 0}
        entries = slot.result.logprobs

        def on_text(text):
            if req.on_text:
                req.on_text(text)
            state["emitted"] += len(text)
            n = state["sent"]
            while n < len(entries) and entries[n].start < state["emitted"]:
                n += 1
            if n > state["sent"] and req.on_logprobs:
                req.on_logprobs(entries[state["sent"]:n])
            state["sent"] = n

        return on_text

    def _sample(self, slot: _Slot, idx: int, now: float) -> None:
        C, eng, r, s = self.C, self.engine, slot.result, slot.req.sampling
        if not slot.decode_started:
            slot.decode_started = now
            r.prompt_seconds = now - slot.started
        tok = slot.sampler.sample(eng.ctx, idx)
        if C.llama_vocab_is_eog(eng.vocab, tok) and not s.ignore_eog:
            self._finish(slot)
            return
        r.completion_tokens += 1
        self.stats.generated_tokens += 1
        if r.completion_tokens == 1:
            r.first_token_seconds = now - slot.started
        if slot.req.cancel.is_set():
            self.stats.max_tokens_after_cancel = max(self.stats.max_tokens_after_cancel, 1)
        piece = eng.piece(tok)
        if r.logprobs is not None:
            lp, top = token_logprobs(C, eng.ctx, idx, eng.n_vocab, tok, s.logprobs)
            start = r.logprobs[-1].end if r.logprobs else 0
            r.logprobs.append(TokenLogprob(tok, piece, lp, [(t, eng.piece(t), v) for t, v in top], start, start))
        stopped = slot.text.add(piece)
        if r.logprobs is not None:
            r.logprobs[-1].end = slot.text.decoded
        if stopped:
            self._finish(slot)
            return
        max_tokens = s.max_tokens if s.max_tokens > 0 else 1 << 30
        if r.completion_tokens >= max_tokens or len(slot.cached) >= eng.n_ctx:
            r.finish_reason = "length"
            self._finish(slot)
            return
        slot.next_token = tok

    def _finish(self, slot: _Slot, forget: bool = False) -> None:
        r, req = slot.result, slot.req
        r.text = slot.text.finish()
        if r.logprobs is not None:  # tokens of a stop string (cut from the text) are not part of it
            r.logprobs = [e for e in r.logprobs if e.start < len(r.text)]
        r.decode_seconds = time.perf_counter() - (slot.decode_started or slot.started)
        slot.sampler.free()
        slot.sampler = slot.req = slot.text = None
        if slot.todo:  # cancelled mid-prompt: what was decoded stays consistent with cached
            slot.todo = []
        if forget or r.finish_reason == "cancelled":
            self._forget(slot, 0)
        if r.finish_reason == "cancelled":
            self.stats.cancelled += 1
        self.stats.finished += 1
        if not req.future.cancelled():
            req.future.set_result(r)

    def _fail(self, slot: _Slot, exc: BaseException) -> None:
        req = slot.req
        if slot.sampler is not None:
            slot.sampler.free()
        slot.sampler = slot.req = slot.text = None
        slot.todo = []
        self._forget(slot, 0)
        if not req.future.done():
            req.future.set_exception(exc)
