"""Answering a generation request: one choice or n, streamed (SSE) or answered once. The
scheduler runs the generations; their text comes back through one event queue (Events), and a
client that goes away stops them at the next step."""

from __future__ import annotations

import asyncio
import copy
import dataclasses

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from ..errors import RuntimeFailure
from ..inference.sampling import Sampling
from ..inference.scheduler import CancelFlag
from ..prompts import reasoning
from . import shapes
from .errors import api_error
from .state import state_of

# A stream with nothing to say for this long sends an SSE comment: proxies and clients keep it open.
KEEPALIVE_SECONDS = 1.0


class Events:
    """What the scheduler's thread says about a request's generations, handed to the event loop:
    ("text", choice, str), ("logprobs", choice, entries), ("done", choice, Result) and
    ("error", choice, exception). Under load several wait at once: batch() takes them together,
    so they go out in one write, and the keep-alive timer is set only when the queue is empty (a
    task and a timer per token cost more than the token, with 8 streams)."""

    def __init__(self, cancel: CancelFlag):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = cancel

    def post(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the server is shutting down: nobody is listening
            self.cancel.set()

    def generate(self, scheduler, tokens, sampling: Sampling, choice: int, logprobs: bool):
        """Queue one generation whose text and end come back as events of `choice`."""

        def finished(f):
            if not f.cancelled():
                exc = f.exception()
                self.post(("error", choice, exc) if exc else ("done", choice, f.result()))

        future = scheduler.generate(tokens, sampling, on_text=lambda text: self.post(("text", choice, text)),
                                    cancel=self.cancel,
                                    on_logprobs=(lambda e: self.post(("logprobs", choice, e))) if logprobs else None)
        future.add_done_callback(finished)
        return future

    async def batch(self) -> list:
        """The events waiting now, or the next one; [] after KEEPALIVE_SECONDS of silence."""
        items = []
        if self.queue.empty():
            try:
                items.append(await asyncio.wait_for(self.queue.get(), KEEPALIVE_SECONDS))
            except asyncio.TimeoutError:
                return []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items


def _streaming(body, headers: dict) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})


TURNS_LEFT_OUT = "X-Turns-Left-Out"  # how many of a conversation's oldest turns were left out to fit (truncation)


def _seeded(sampling: Sampling, i: int) -> Sampling:
    return dataclasses.replace(sampling, seed=sampling.seed + i if sampling.seed >= 0 else -1)


async def answer(request: Request, tokens, sampling: Sampling, shape: shapes.Shape, turns_left_out: int = 0):
    """Run the request's generations (n choices, seeds seed+i); stream them (SSE) or answer once.
    The shape (shapes.Shape: chat, completion, responses) builds the bodies. turns_left_out: said
    in a header (TURNS_LEFT_OUT) when a conversation was cut to fit."""
    scheduler = state_of(request).scheduler
    headers = {TURNS_LEFT_OUT: str(turns_left_out)} if turns_left_out else {}
    cancel = CancelFlag()
    if shape.stream:
        events = Events(cancel)
        logprobs = sampling.logprobs is not None
        if shape.n == 1:
            events.generate(scheduler, tokens, sampling, 0, logprobs)
            return _streaming(_stream_one(shape, events), headers)
        per_choice = []
        for i in range(shape.n):
            s = copy.copy(shape)
            if s.splitter is not None:
                s.splitter = reasoning.Splitter(s.think)
            per_choice.append(s)
            events.generate(scheduler, tokens, _seeded(sampling, i), i, logprobs)
        return _streaming(_stream_choices(shape, per_choice, events), headers)
    futures = [scheduler.generate(tokens, _seeded(sampling, i) if shape.n > 1 else sampling, cancel=cancel)
               for i in range(shape.n)]
    watch = asyncio.ensure_future(_watch_disconnect(request, cancel))
    try:
        results = [await asyncio.wrap_future(f) for f in futures]
    except RuntimeFailure as exc:
        cancel.set()  # the other choices stop too
        raise api_error(exc) from None
    finally:
        watch.cancel()
    body = shape.final(results[0])
    if shape.n > 1:
        body["choices"] = [dict(shape.final(r)["choices"][0], index=i) for i, r in enumerate(results)]
        body["usage"] = shapes.usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results),
                                     results[0].cached_tokens)
    return JSONResponse(body, headers=headers)


def _listed(events) -> list:
    """A shape's events: none, one, or a list of them."""
    return [] if events is None else events if isinstance(events, list) else [events]


async def _stream_one(shape: shapes.Shape, events: Events):
    """One choice: text waiting together goes out as one delta."""
    sse = shape.sse
    try:
        first = shape.first()
        yield "".join(sse(b) for b in (first if isinstance(first, list) else [first]))
        done = False
        while not done:
            items = await events.batch()
            if not items:
                yield ": waiting for the model\n\n"  # also notices a client that left the queue
                continue
            out, text, logprobs = [], [], []
            for kind, _, value in items:
                if kind == "text":
                    text.append(value)
                    continue
                if kind == "logprobs":
                    logprobs += value
                    continue
                if text or logprobs:
                    out += [sse(d) for d in _listed(shape.delta("".join(text), logprobs))]
                    text, logprobs = [], []
                if kind == "error":
                    out.append(sse(shape.error(api_error(value))))
                else:
                    out.extend(sse(body) for body in shape.last(value))
                done = True
                break
            if text or logprobs:
                out += [sse(d) for d in _listed(shape.delta("".join(text), logprobs))]
            if out:
                yield "".join(out)
        yield shape.end_of_stream
    finally:
        events.cancel.set()  # a client that disconnected stops its generation at the next token


async def _stream_choices(shape: shapes.Shape, per_choice: list, events: Events):
    """n choices side by side: their chunks interleave as they come, each with its index; one
    usage chunk at the end."""

    def indexed(body, i):
        if body is not None and body.get("choices"):
            body["choices"][0]["index"] = i
        return body

    try:
        yield "".join(shape.sse(indexed(s.first(), i)) for i, s in enumerate(per_choice))
        left, prompt, completion, cached = set(range(shape.n)), 0, 0, 0
        while left:
            items = await events.batch()
            if not items:
                yield ": waiting for the model\n\n"
                continue
            out = []
            for kind, i, value in items:
                if kind == "error":
                    out.append(shape.sse(shape.error(api_error(value))))
                    left.clear()
                    break
                if kind == "done":
                    left.discard(i)
                    prompt, completion = value.prompt_tokens, completion + value.completion_tokens
                    cached = value.cached_tokens
                    for b in per_choice[i].last(value):
                        if b.get("choices"):
                            b.pop("usage", None)  # one usage chunk for all the choices, at the end
                            out.append(shape.sse(indexed(b, i)))
                    continue
                body = per_choice[i].delta(value) if kind == "text" else per_choice[i].delta("", value)
                if body is not None:
                    out.append(shape.sse(indexed(body, i)))
            yield "".join(out)
            if not left and "error" not in (k for k, _, _ in items):
                if shape.include_usage:
                    yield shape.sse({"id": shape.id, "object": shape.chunk_object, "created": shape.created,
                                     "model": shape.model, "choices": [], "usage": shapes.usage(prompt, completion, cached)})
        yield shape.end_of_stream
    finally:
        events.cancel.set()


async def _watch_disconnect(request: Request, cancel: CancelFlag) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return
