"""The one decode loop: every answer, whatever asked for it (-p, -f, the terminal chat, the
server, --bench), is generated here, so stop strings, length, KV reuse, grammar, logit bias and
cancellation have one place each. Several conversations are decoded together: continuous
batching on one llama.cpp context (issue 11).

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
import itertools
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import RuntimeFailure
from .promptcache import SAVE_MIN, PromptCache, common_prefix, read_state, worth_restoring, write_state
from .sampling import Result, Sampling, TextOut, TokenLogprob, token_logprobs

# A cached prefix this long is worth more than a contiguous run of busy slots: decoding it again
# would cost more than the extra micro-batch each step of one answer costs (measured on the demo
# model: a step's extra graph computation ~ 10 ms; 256 prompt tokens ~ 0.2 s).
LONG_PREFIX = 256
# A free slot whose cache holds all of a prompt but its last COVER_GAP tokens (and three quarters
# of it at least: the same request again, a short next turn) is taken, the one holding most of it
# first, when it keeps the busy slots in as few runs as any other: its first token then comes
# after one step instead of a whole prompt's computation, as llama-server's slot choice by
# similarity gives it. Not at the cost of a micro-batch (an extra graph computation at every
# step of the answer, and of every answer decoded beside it): then the slot beside the busy ones
# is taken, and the covering slot's cells copied into it (Scheduler._copy) rather than computed
# again. Requests that come back together settle into one run: the first takes its slot, the
# others the slots beside it (expected_slots: those the others waiting will take count as busy),
# where they are found the next time.
COVER_GAP = 16
BURST_SECONDS = 0.002  # what the engine waits, woken from idle, for the rest of a burst of requests
BURST_MOST_SECONDS = 0.012  # ... at most, while they keep coming


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
    """Other work on the engine's thread (embeddings): run(engine, cancelled) -> result."""

    run: Callable[[Any, Callable[[], bool]], Any]
    cancel: CancelFlag = field(default_factory=CancelFlag)
    future: Future = field(default_factory=Future)


def runs(seqs) -> int:
    """The number of runs of consecutive ids in seqs (micro-batches llama.cpp makes of them)."""
    ordered = sorted(seqs)
    return sum(1 for i, s in enumerate(ordered) if i == 0 or s != ordered[i - 1] + 1)


SHIFT_MIN = 32  # a run of cached tokens this long, found later in a new prompt, is moved rather than recomputed
_PROBE = 8


def kept_after_gap(cached: list[int], tokens: list[int], keep: int) -> tuple[int, int]:
    """(b, m): where the new prompt's tokens after the common prefix (tokens[keep:]) continue the
    cache further on — cached[b:b + m] == tokens[keep:keep + m], b > keep, the longest such run — or
    (0, 0) when no run of SHIFT_MIN tokens does. A conversation whose oldest turns were left out
    to fit the context has this shape: its system prompt, then turns the cache holds further on."""
    probe = tokens[keep:keep + _PROBE]
    if len(probe) < _PROBE:
        return 0, 0
    best_b, best_m = 0, 0
    first = probe[0]
    for b in range(keep + 1, len(cached) - SHIFT_MIN + 1):
        if cached[b] != first or cached[b:b + _PROBE] != probe:
            continue
        m = _PROBE
        limit = min(len(cached) - b, len(tokens) - 1 - keep)  # the prompt's last token is always decoded
        while m < limit and cached[b + m] == tokens[keep + m]:
            m += 1
        if m > best_m:
            best_b, best_m = b, m
    return (best_b, best_m) if best_m >= SHIFT_MIN else (0, 0)


def cached_prefix(slot, tokens: list[int], lora: tuple = ()) -> int:
    """The tokens of a prompt slot's cache keeps (none computed under other LoRA scales)."""
    return common_prefix(slot.cached, tokens, len(tokens) - 1) if getattr(slot, "lora", ()) == lora else 0


def nearly_all(k: int, tokens: list[int]) -> bool:
    """k cached tokens are all of the prompt but its last few (COVER_GAP)."""
    return k > 0 and len(tokens) - k <= min(COVER_GAP, len(tokens) // 4)


def covers(slot, tokens: list[int], lora: tuple = ()) -> int:
    """The cached tokens slot keeps of a prompt when it holds nearly all of it, else 0."""
    k = cached_prefix(slot, tokens, lora)
    return k if nearly_all(k, tokens) else 0


def expected_slots(free: list, others: list) -> list[int]:
    """The free slots that requests waiting beside this one will take because they hold their
    prompts (a burst of questions asked before): counted as busy when this one chooses, so that
    a burst settles where it was last time whatever order its requests came in."""
    taken: list[int] = []
    for tokens, lora in others:
        best = max(((covers(s, tokens, lora), s.seq) for s in free if s.seq not in taken), default=(0, 0))
        if best[0]:
            taken.append(best[1])
    return taken


def choose_slot(free: list, busy: list[int], tokens: list[int], fills: bool = False, lora: tuple = (),
                expected: list[int] = ()):
    """(slot, cached tokens it keeps) for a prompt: a free slot holding a long prefix of it (the
    next turn of a conversation) first, or nearly all of it (COVER_GAP) where that adds no run;
    else the one keeping the busy slots in fewest runs (with those the other waiting requests are
    expected to take: expected_slots); then
    the longest cached prefix, then the lowest id. fills: the requests waiting (this one
    included) will take every free slot, so every slot ends up busy whichever each takes: the
    longest cached prefix first. A cache computed with other LoRA scales than lora keeps nothing
    (an adapter changes the keys and values themselves)."""
    best, best_score, keep = None, None, 0
    after = [x for x in expected if x not in busy]
    fewest = min((runs(busy + after + [s.seq]) for s in free if s.seq not in after), default=0)
    for s in free:
        k = cached_prefix(s, tokens, lora)
        n_runs = runs(busy + [x for x in after if x != s.seq] + [s.seq])
        near_all = nearly_all(k, tokens) and n_runs <= fewest
        score = (fills or k >= LONG_PREFIX or near_all, k if fills or near_all else 0, s.seq not in after, -n_runs,
                 k, -s.seq)
        if best_score is None or score > best_score:
            best, best_score, keep = s, score, k
    return best, keep


@dataclass
class GenRequest:
    tokens: list[int]
    sampling: Sampling
    on_text: Callable[[str], None] | None
    cancel: CancelFlag
    on_logprobs: Callable[[list], None] | None = None  # TokenLogprobs of the text just passed on
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.perf_counter)
    lora: tuple = ()  # the adapters' scales it is decoded with (fixed when it arrives)


class _Slot:
    def __init__(self, seq: int):
        self.seq = seq
        self.cached: list[int] = []  # what the KV cache holds for this sequence
        self.lora: tuple = ()  # the adapter scales that cache was computed with
        self.req: GenRequest | None = None
        self.todo: list[int] = []  # prompt tokens not yet decoded
        self.sampler = None
        self.text: TextOut | None = None
        self.result: Result | None = None
        self.next_token: int | None = None  # sampled, to be decoded in the next step
        self.started = 0.0
        self.decode_started = 0.0
        self.after_cancel = 0  # tokens sampled after the request was cancelled (the next step frees it)


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
    max_tokens_after_cancel: int = 0  # the most tokens any request got after its cancellation
    shifted_tokens: int = 0  # cached prompt tokens moved down (context shift) instead of decoded again
    reused_tokens: int = 0  # prompt tokens found in a slot's cache or the prompt cache, not decoded


class Scheduler:
    """The engine's owner: generation requests batched, other jobs run between steps."""

    def __init__(self, engine, n_parallel: int | None = None, prefill_chunk: int = 256,
                 cache: PromptCache | None = None):
        """cache: computed prompts kept in host memory across slots (None: none kept)."""
        C = engine.C
        self.cache = cache
        self.engine, self.C = engine, C
        self.n_parallel = max(1, min(n_parallel or engine.n_seq, engine.n_seq))
        self.prefill_chunk = max(16, min(prefill_chunk, engine.n_batch))
        self.slots = [_Slot(i) for i in range(self.n_parallel)]
        self.batch = C.llama_batch_init(engine.n_batch, 0, 1)
        self.waiting: collections.deque[GenRequest] = collections.deque()
        self.jobs: collections.deque = collections.deque()
        self.stats = Counters()
        self.lock = threading.Condition()
        self.lora = tuple(getattr(engine, "lora", ()))  # the adapters' scales of requests that name none
        self.broken: BaseException | None = None  # break_down's reason: nothing more can run
        self.engine.clear()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # -- what the modes and the server call ---------------------------------------------------------
    @property
    def parallel(self) -> int:
        return self.n_parallel

    def generate(self, tokens: list[int], sampling: Sampling, on_text=None, cancel: CancelFlag | None = None,
                 on_logprobs=None) -> Future:
        """Queue a generation; the Future gives its Result. A prompt that can never fit the
        context is refused here (ContextOverflowError), before it waits for a slot."""
        if self.broken is not None:  # ended like a running request would be (break_down)
            future: Future = Future()
            future.set_exception(self.broken)
            return future
        self.engine.check_fits(len(tokens))
        req = GenRequest(list(tokens), sampling, on_text, cancel or CancelFlag(), on_logprobs=on_logprobs)
        with self.lock:
            req.lora = tuple(sampling.lora) if sampling.lora is not None else self.lora
            self.stats.requests += 1
            self.waiting.append(req)
            self.lock.notify()
        return req.future

    def set_lora(self, scales) -> None:
        """The adapters' scales of the requests that name none, from now on (POST /lora-adapters):
        requests already queued or running keep theirs."""
        with self.lock:
            self.lora = tuple(float(x) for x in scales)

    def submit(self, run, cancel: CancelFlag | None = None) -> Job:
        """run(engine, cancelled) on the engine's thread, between two decoding steps."""
        job = Job(run, cancel or CancelFlag())
        job.future = self._submit_job(lambda engine: run(engine, job.cancel.is_set))
        return job

    def _submit_job(self, fn) -> Future:
        future: Future = Future()
        if self.broken is not None:
            future.set_exception(self.broken)
            return future
        with self.lock:
            self.jobs.append((fn, future))
            self.lock.notify()
        return future

    def forget_all(self) -> None:
        """Empty every slot's cache (on the engine's thread; only while no answer is running)."""

        def clear(engine):
            if self.busy_slots():
                raise RuntimeFailure("the caches cannot be cleared while answers are being generated")
            engine.clear()
            for slot in self.slots:
                slot.cached = []

        self._submit_job(clear).result()

    def break_down(self, exc: BaseException) -> None:
        """The engine can compute nothing more (--rpc: a worker was lost, and the engine's thread
        waits inside ggml for it): every request, queued or running, and every later one ends
        with exc. Called from another thread; the engine itself is not touched."""
        with self.lock:
            self.broken = exc
            waiting, jobs = list(self.waiting), list(self.jobs)
            self.waiting.clear()
            self.jobs.clear()
            running = [s.req for s in self.slots if s.req is not None]
        for req in waiting + running:
            if not req.future.done():
                req.future.set_exception(exc)
        for _, future in jobs:
            if not future.done():
                future.set_exception(exc)

    def pending(self) -> int:
        return len(self.waiting)

    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.req is not None)

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.lock:
                idle = False
                while not self.waiting and not self.jobs and not self.busy_slots():
                    idle = True
                    self.lock.wait()
                if idle and self.waiting and len(self.slots) > 1:
                    # Woken from idle by a request: the others of a burst (clients started
                    # together) arrive within milliseconds of each other; admitted now, they
                    # would wait for the first one's whole step. A short pause lets them share
                    # it, renewed while they keep coming (up to BURST_MOST_SECONDS in all).
                    end, seen = time.perf_counter() + BURST_MOST_SECONDS, len(self.waiting)
                    while seen < len(self.slots):
                        left = min(BURST_SECONDS, end - time.perf_counter())
                        if left <= 0:
                            break
                        self.lock.wait(left)  # woken by the next request, or BURST_SECONDS of quiet
                        if len(self.waiting) == seen:
                            break
                        seen = len(self.waiting)
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
                others = [(r.tokens, r.lora) for r in itertools.islice(self.waiting, len(free) - 1)
                          if not r.cancel.is_set()]
            best, keep = choose_slot(free, [s.seq for s in self.slots if s.req is not None], req.tokens, fills,
                                     req.lora, expected_slots(free, others) if others and not fills else [])
            donor = max(free, key=lambda s: (covers(s, req.tokens, req.lora), -abs(s.seq - best.seq)))
            moved = covers(donor, req.tokens, req.lora) if donor is not best else 0
            entry, k = self.cache.best(req.tokens, req.lora) if self.cache is not None else (None, 0)
            if moved > keep and self._copy(donor, best):
                # Another free slot holds nearly all of it, but away from the busy ones: its
                # cells are copied here rather than computed again, and the run stays whole.
                keep = moved
            elif entry is not None and worth_restoring(k, keep):
                self._save(best, 0)
                if self._restore(best, entry):
                    self.cache.use(entry, k)
                    keep = k
                else:
                    keep = 0
            else:
                self._save(best, keep if best.lora == req.lora else 0)
                if best.lora == req.lora and keep < len(best.cached):
                    keep = self._shift(best, req.tokens, keep)
            self._forget(best, keep)
            best.lora = req.lora
            self._start(best, req)

    def _save(self, slot: _Slot, keep: int) -> None:
        """Copy the slot's state into the prompt cache before all but keep of its tokens are
        lost, when that is worth it (SAVE_MIN) and no entry holds them already."""
        cache = self.cache
        if cache is None or len(slot.cached) - keep < SAVE_MIN or cache.covers(slot.cached, slot.lora):
            return
        data, size = read_state(self.C, self.engine.ctx, slot.seq)
        if size:
            cache.add(slot.cached, slot.lora, data, size)

    def _copy(self, donor: _Slot, slot: _Slot) -> bool:
        """Put what donor's cache holds into slot (what slot held is saved first, as for any
        newcomer). A copy of the cells in use (llama_state_seq_get/set_data: a prompt and its
        answer, ~2 MB on the demo model, ~1 ms) rather than llama_memory_seq_cp, which between
        two slots' caches copies the whole buffer of the context's size (~16 ms on the demo model
        with -c 4096)."""
        self._save(slot, 0)
        data, size = read_state(self.C, self.engine.ctx, donor.seq)
        if size and write_state(self.C, self.engine.ctx, slot.seq, data, size):
            slot.cached, slot.lora = list(donor.cached), donor.lora
            return True
        self.C.llama_memory_seq_rm(self.engine.memory, slot.seq, -1, -1)
        slot.cached = []
        return False

    def _restore(self, slot: _Slot, entry) -> bool:
        """Put a cached state into the slot (what it held is replaced)."""
        if write_state(self.C, self.engine.ctx, slot.seq, entry.data, entry.size):
            slot.cached = list(entry.tokens)
            slot.lora = entry.lora
            return True
        self.cache.stats.restore_failures += 1  # the slot was emptied by llama.cpp
        self.C.llama_memory_seq_rm(self.engine.memory, slot.seq, -1, -1)
        slot.cached = []
        return False

    def warm(self, tokens: list[int], store=None) -> Future:
        """Put the state after tokens (the system prompt, as every conversation begins) into the
        first slot and the prompt cache before any request: read from store (the disk) when it
        was saved there, else decoded and saved there. The Future gives what happened:
        {"tokens", "restored" (from disk), "saved", "seconds"}."""
        def run(engine):
            t0 = time.perf_counter()
            C, slot = self.C, self.slots[0]
            out = {"tokens": len(tokens), "restored": False, "saved": False}
            if slot.req is not None or not tokens:
                return {**out, "seconds": 0.0}
            state = store.load(tokens) if store is not None else None
            if state is not None and write_state(C, engine.ctx, slot.seq, *state):
                slot.cached, slot.lora = list(tokens), self.lora
                out["restored"] = True
            else:
                self._forget(slot, 0)
                engine.set_lora(self.lora)
                slot.lora = self.lora
                for i in range(0, len(tokens), engine.n_batch):
                    chunk = tokens[i:i + engine.n_batch]
                    for j, tok in enumerate(chunk):
                        self._put(self.batch, j, tok, i + j, slot.seq, False)
                    self.batch.n_tokens = len(chunk)
                    if C.llama_decode(engine.ctx, self.batch) != 0:
                        self._forget(slot, 0)
                        raise RuntimeFailure(f"llama_decode failed on the system prompt ({len(tokens)} tokens)")
                    slot.cached.extend(chunk)
                self.stats.prompt_tokens += len(tokens)
                state = read_state(C, engine.ctx, slot.seq)
                if store is not None:
                    out["saved"] = store.save(tokens, *state)
            if self.cache is not None:
                self.cache.add(tokens, self.lora, *state)
            return {**out, "seconds": time.perf_counter() - t0}

        return self._submit_job(run)

    def _shift(self, slot: _Slot, tokens: list[int], keep: int) -> int:
        """Context shift: when the prompt continues the slot's cache further on (kept_after_gap),
        the tokens between are removed and the run after them moved down in position (llama.cpp
        shifts the keys' rotary positions), so only what is new is decoded. Where llama.cpp cannot
        shift this model's cache, nothing is done. Returns the cached tokens the prompt keeps."""
        b, m = kept_after_gap(slot.cached, tokens, keep)
        if not m or not self.C.llama_memory_can_shift(self.engine.memory):
            return keep
        mem, seq = self.engine.memory, slot.seq
        self.C.llama_memory_seq_rm(mem, seq, b + m, -1)
        self.C.llama_memory_seq_rm(mem, seq, keep, b)
        self.C.llama_memory_seq_add(mem, seq, b, b + m, keep - b)
        slot.cached = slot.cached[:keep] + slot.cached[b:b + m]
        self.stats.shifted_tokens += m
        return len(slot.cached)

    def _forget(self, slot: _Slot, keep: int) -> None:
        if len(slot.cached) > keep:
            self.C.llama_memory_seq_rm(self.engine.memory, slot.seq, keep, -1)
            del slot.cached[keep:]

    def _start(self, slot: _Slot, req: GenRequest) -> None:
        slot.req = req
        slot.todo = req.tokens[len(slot.cached):]
        slot.sampler = self.engine.sampler_for(req.sampling, req.tokens)
        slot.result = Result(prompt_tokens=len(req.tokens), cached_tokens=len(slot.cached))
        on_text = req.on_text
        if req.sampling.logprobs is not None:
            slot.result.logprobs = []
            on_text = self._with_logprobs(slot, req)
        slot.text = TextOut(req.sampling.stop, on_text)
        slot.next_token = None
        slot.started = time.perf_counter()
        slot.decode_started = 0.0
        slot.after_cancel = 0
        self.stats.prompt_tokens += len(slot.todo)
        self.stats.reused_tokens += len(slot.cached)

    def _step(self) -> None:
        eng = self.engine
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
        # Answers with different LoRA scales never share a decode: llama.cpp applies one set of
        # adapters to a whole batch. One decode per set (usually there is one).
        groups: dict[tuple, list[int]] = {}
        for seq in sorted(work):
            groups.setdefault(work[seq][0].req.lora, []).append(seq)
        for lora, seqs in groups.items():
            eng.set_lora(lora)
            self._decode([work[seq] for seq in seqs])

    def _decode(self, items: list) -> None:
        """One llama_decode of items ([slot, tokens, wants_logits], in seq order), then sampling."""
        C, eng, b = self.C, self.engine, self.batch
        sample_at: list[tuple[_Slot, int]] = []
        n = 0
        for slot, tokens, wants_logits in items:
            for i, tok in enumerate(tokens):
                self._put(b, n, tok, len(slot.cached) + i, slot.seq, wants_logits and i == len(tokens) - 1)
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
            slot.after_cancel += 1
            self.stats.max_tokens_after_cancel = max(self.stats.max_tokens_after_cancel, slot.after_cancel)
        piece = eng.piece(tok)
        if r.logprobs is not None:
            lp, top = token_logprobs(C, eng.ctx, idx, eng.n_vocab, tok, s.logprobs)
            start = r.logprobs[-1].end if r.logprobs else 0
            r.logprobs.append(TokenLogprob(tok, piece, lp, [(t, eng.piece(t), v) for t, v in top], start, start))
        stopped = slot.text.add(piece)
        if r.logprobs is not None:
            r.logprobs[-1].end = slot.text.decoded
        if stopped:
            r.stop_string = slot.text.stopped_by
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
        if not req.future.done():  # cancelled, or ended by break_down
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


def benchmark(scheduler: Scheduler, n_prompt: int = 512, n_gen: int = 128, reps: int = 3) -> dict:
    """llama-bench's two tests through the runtime's own paths: a prompt of n_prompt random
    tokens decoded from an empty cache (pp), and n_gen tokens generated by this scheduler (tg;
    its rate counts the decodes between the first and the last token, as llama-bench's does)."""
    engine = scheduler.engine
    rng = random.Random(1234)
    n_prompt = min(n_prompt, engine.n_ctx - 1)
    n_gen = min(n_gen, engine.n_ctx - 2)
    tokens = [rng.randrange(100, max(101, engine.n_vocab - 100)) for _ in range(n_prompt)]
    bos = engine.C.llama_vocab_bos(engine.vocab)
    start = [bos if bos >= 0 else tokens[0]]
    greedy = Sampling(temp=0, repeat_penalty=1.0, max_tokens=n_gen + 1, ignore_eog=True)

    def prompt_rate(engine, cancelled, tokens=tokens):
        engine.clear()
        t0 = time.perf_counter()
        engine.decode_prompt(tokens)
        return len(tokens) / (time.perf_counter() - t0)

    scheduler.forget_all()
    scheduler.submit(lambda engine, cancelled: engine.decode_prompt(tokens[:16])).future.result()  # warm-up
    pp, tg = [], []
    for _ in range(reps):
        scheduler.forget_all()
        pp.append(scheduler.submit(prompt_rate).future.result())
        scheduler.forget_all()
        r = scheduler.generate(start, greedy).result()
        tg.append((r.completion_tokens - 1) / r.decode_seconds)
    scheduler.forget_all()
    pp.sort()
    tg.sort()
    return {"n_prompt": n_prompt, "n_gen": n_gen, "reps": reps, "threads": engine.threads,
            "prompt_tps": pp[len(pp) // 2], "decode_tps": tg[len(tg) // 2],
            "prompt_tps_all": pp, "decode_tps_all": tg}
