"""The local web chat and OpenAI-compatible API: Starlette + uvicorn, built by create_app().

One model, up to --parallel generations decoded together (EngineWorker and runtime.batch,
admitted first come first served); a client that goes away stops its generation at the next step. Loopback by default, Host header checked
(DNS rebinding), no CORS headers at all (the page is same-origin), request bodies capped.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import base64
import errno
import json
import logging
import os
import queue
import re
import socket
import struct
import sys
import threading
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from . import api, reasoning, tools
from .api import ApiError
from .engine import Engine, Sampling, last_error
from .errors import ContextOverflowError, RuntimeFailure, TemplateError
from .worker import CancelFlag, EngineWorker

WEB = Path(__file__).resolve().parent / "web"
MAX_BODY = 8 * 1024 * 1024
KEEPALIVE_SECONDS = 1.0
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


# Connections (issue 8.9): at most MAX_CONNECTIONS open at once (more are closed at once, with
# one log line a minute); a connection must deliver a complete request head within
# REQUEST_HEAD_SECONDS of opening (or of its previous response); idle keep-alive ones close after
# KEEPALIVE_IDLE_SECONDS.
MAX_CONNECTIONS = 512
REQUEST_HEAD_SECONDS = 10.0
KEEPALIVE_IDLE_SECONDS = 5
# Host header: a name or address and an optional port, nothing else (127.0.0.1:PORT@evil.example
# is refused, not read as 127.0.0.1).
_HOST = re.compile(r"(?P<name>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?\Z")
JSON_TYPE = re.compile(r"application/(?:[\w.+-]+\+)?json\s*(?:;.*)?\Z", re.IGNORECASE)
log = logging.getLogger("bundle.server")


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def parse_host(value: str) -> tuple[str, int | None] | None:
    m = _HOST.match(value or "")
    if not m:
        return None
    port = int(m.group("port")) if m.group("port") else None
    return m.group("name").lower(), port


class Guard:
    """ASGI middleware, before any handler runs: the Host header (DNS rebinding), the Origin of
    browser requests (no other web page may drive the model), JSON content types, the API key,
    the body size cap, and one error boundary that turns any failure into an API-shaped 500."""

    def __init__(self, app, allowed_hosts: set[str] | None, api_key: str | None,
                 allowed_origins: set[str] | None = None):
        self.app, self.allowed_hosts, self.api_key = app, allowed_hosts, api_key
        self.allowed_origins = {o.rstrip("/").lower() for o in (allowed_origins or ())}

    def _host_ok(self, host: str) -> bool:
        if self.allowed_hosts is None:
            return True
        parsed = parse_host(host)
        if parsed is None:
            return False
        name, port = parsed
        return (name if port is None else f"{name}:{port}") in self.allowed_hosts

    def _origin_ok(self, origin: str | None, host: str, fetch_site: str | None) -> bool:
        """A browser names the page that sent a request in Origin; only this server's own page
        (same scheme, host and port) or an origin allowed with --allow-origin may."""
        if origin is None:
            # Browsers send Origin with every POST; without it, a cross-site request shows in
            # Sec-Fetch-Site. Non-browser clients (the openai SDK, curl) send neither.
            return fetch_site in (None, "same-origin", "none")
        origin = origin.strip().lower().rstrip("/")
        if origin in self.allowed_origins:
            return True
        return origin == f"http://{host.lower()}" and self._host_ok(host)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            await self._guarded(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - the boundary: a one-line log, an API-shaped 500
            log.error("error: unexpected %s in %s %s: %s", type(exc).__name__, scope.get("method"),
                      scope.get("path"), exc)
            try:
                await error_response(ApiError(500, "the server failed on this request", None, "internal_error",
                                              "server_error"))(scope, receive, send)
            except Exception:  # noqa: BLE001 - the response had begun: nothing more to send
                pass

    async def _guarded(self, scope, receive, send):
        headers = {}
        for k, v in scope["headers"]:
            key = k.decode("latin-1").lower()
            if key in headers and key in ("host", "origin", "content-type", "authorization"):
                return await self._refuse(scope, receive, send, 400, f"the {key} header is given twice",
                                          "invalid_header")
            headers[key] = v.decode("latin-1")
        host = headers.get("host", "")
        if not self._host_ok(host):
            return await self._refuse(
                scope, receive, send, 403,
                f"Host '{host[:100]}' is not served here (DNS rebinding protection); use the URL the server printed",
                "invalid_host", "permission_error")
        origin = headers.get("origin")
        if not self._origin_ok(origin, host, headers.get("sec-fetch-site")):
            return await self._refuse(
                scope, receive, send, 403,
                f"requests from the web page at {(origin or 'another site')[:100]} are refused: only this "
                "server's own page may use it (start it with --allow-origin ORIGIN to allow one)",
                "invalid_origin", "permission_error")
        if scope["method"] == "OPTIONS":
            return await self._preflight(scope, receive, send, origin)
        path = scope["path"]
        if scope["method"] == "POST" and path.startswith("/v1/"):
            if not JSON_TYPE.match(headers.get("content-type", "")):
                return await self._refuse(
                    scope, receive, send, 415,
                    "the request body must be JSON, sent with 'Content-Type: application/json'",
                    "unsupported_media_type")
        if self.api_key and (path.startswith("/v1/") or path == "/info"):
            auth = headers.get("authorization", "")
            if auth != f"Bearer {self.api_key}":
                msg = "missing API key: send 'Authorization: Bearer KEY'" if not auth else "incorrect API key"
                return await error_response(ApiError(401, msg, None, "invalid_api_key", "authentication_error"))(
                    scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return await error_response(ApiError(413, f"the request body is larger than {MAX_BODY} bytes", None,
                                                 "request_too_large"))(scope, receive, send)
        if origin is not None and origin.strip().lower().rstrip("/") in self.allowed_origins:
            send = _with_cors(send, origin.strip())
        await self.app(scope, receive, send)

    async def _refuse(self, scope, receive, send, status, message, code, type_="invalid_request_error"):
        return await error_response(ApiError(status, message, None, code, type_))(scope, receive, send)

    async def _preflight(self, scope, receive, send, origin):
        """CORS preflight: answered only for an origin allowed with --allow-origin."""
        if origin is None or origin.strip().lower().rstrip("/") not in self.allowed_origins:
            return await self._refuse(scope, receive, send, 405, "OPTIONS is not allowed here", "method_not_allowed")
        response = JSONResponse({}, status_code=204, headers={
            "Access-Control-Allow-Origin": origin.strip(), "Vary": "Origin",
            "Access-Control-Allow-Methods": "GET, POST", "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600"})
        await response(scope, receive, send)


def _with_cors(send, origin: str):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = list(message.get("headers", [])) + [
                (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        await send(message)
    return wrapped


class PrepPool:
    """Daemon threads for the work a request needs before it can queue for the model: parsing
    its JSON, rendering the chat template, tokenizing (issue 8.7). None of it runs on the event
    loop, so no request can stall other routes; daemon threads, so none delays shutdown."""

    def __init__(self, threads: int = 2):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(threads):
            threading.Thread(target=self._loop, name=f"prep-{i}", daemon=True).start()

    def _loop(self):
        while True:
            fn, future, loop = self.jobs.get()
            try:
                result = fn()
            except BaseException as exc:  # handed to the request
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

    async def run(self, fn):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs.put((fn, future, loop))
        return await future


def _settle(future, result, exc):
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


async def read_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes", None, "request_too_large")
    return bytes(body)


def parse_json(body: bytes) -> dict:
    """The body as a JSON object (run in the prep pool: an 8 MiB body takes a while)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {str(exc)[:200]}", None, "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_type")
    return data


def create_app(settings, engine, *, template=None, info: dict | None = None, api_key: str | None = None,
               allowed_hosts: set[str] | None = None, allowed_origins: set[str] | None = None) -> Starlette:
    """settings: runtime Settings (defaults for requests); engine: an Engine or an EngineWorker
    that owns one; template: the ChatTemplate; info: what /info and the page show."""
    worker = engine if isinstance(engine, EngineWorker) else EngineWorker(engine)
    eng: Engine = worker.engine
    prep = PrepPool()
    info = dict(info or {})
    model_id = info.get("name") or "model"
    # What the chat template can do, read once: how it has the model call tools, whether it
    # takes enable_thinking, whether its answers start with <think> (reasoning models).
    source = getattr(template, "source", None) or ""
    tool_style = tools.style_of(source)
    takes_enable_thinking = "enable_thinking" in source
    thinks = reasoning.is_thinking_template(source)

    def sampling_for(p: api.GenParams, stops) -> Sampling:
        return Sampling(
            temp=settings.temp if p.temperature is None else p.temperature,
            top_p=settings.top_p if p.top_p is None else p.top_p,
            top_k=settings.top_k,
            repeat_penalty=settings.repeat_penalty,
            seed=settings.seed if p.seed is None else p.seed,
            max_tokens=p.max_tokens or settings.max_tokens,
            stop=list(stops) + p.stop,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            grammar=p.grammar,
            logit_bias=p.logit_bias or {},
            logprobs=p.logprobs,
        )

    def check_sampling(params: api.GenParams) -> None:
        """What only the model can tell: token ids in range, a grammar llama.cpp parses."""
        try:
            eng.checked_tokens(list(params.logit_bias or {}))
        except ValueError as exc:
            raise ApiError(400, f"logit_bias: {exc}", "logit_bias", "invalid_value") from None
        if params.grammar and not eng.check_grammar(params.grammar):
            raise ApiError(400, "the grammar does not parse as GBNF (llama.cpp: " + (last_error() or "no detail")
                           + ")", "grammar", "invalid_value")

    def tokens_for(text: str, raw: bool) -> list[int]:
        param = "messages" if not raw else "prompt"
        try:
            if isinstance(text, list):  # token ids (completions)
                try:
                    tokens = eng.checked_tokens(text)
                except ValueError as exc:
                    raise ApiError(400, str(exc), param, "invalid_value") from None
            elif raw:
                tokens = eng.tokenize_bounded(text, add_special=True, parse_special=False)
            else:
                tokens = eng.tokenize_prompt(text)
            eng.check_fits(len(tokens))
        except ContextOverflowError as exc:
            raise ApiError(400, str(exc), param, "context_length_exceeded") from None
        if not tokens:
            raise ApiError(400, "the prompt is empty", "prompt", "invalid_value")
        return tokens

    async def generate_choices(request: Request, tokens, sampling, shape, cancel):
        samplings = [dataclasses.replace(sampling, seed=sampling.seed + i if sampling.seed >= 0 else -1)
                     for i in range(shape.n)]
        futures = [worker.generate(tokens, s, on_text=lambda text: None, cancel=cancel) for s in samplings]
        watch = asyncio.ensure_future(_watch_disconnect(request, cancel))
        try:
            results = [await asyncio.wrap_future(f) for f in futures]
        except RuntimeFailure as exc:
            cancel.set()  # the other choices stop too
            raise ApiError(500, str(exc), None, "generation_failed", "server_error") from None
        finally:
            watch.cancel()
        body = shape.final(results[0])
        body["choices"] = [dict(shape.final(r)["choices"][0], index=i) for i, r in enumerate(results)]
        completion = sum(r.completion_tokens for r in results)
        body["usage"] = api.usage(results[0].prompt_tokens, completion)
        return JSONResponse(body)

    def stream_choices(tokens, sampling, shape, cancel):
        """n > 1, streamed: the choices are generated side by side (seeds seed+i) and their
        chunks interleave as they come, each with its index; one usage chunk at the end."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        shapes = []
        for _ in range(shape.n):
            s = copy.copy(shape)
            if s.splitter is not None:
                s.splitter = reasoning.Splitter(s.think)
            shapes.append(s)

        def post(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:
                cancel.set()

        def start(i):
            s = dataclasses.replace(sampling, seed=sampling.seed + i if sampling.seed >= 0 else -1)
            future = worker.generate(tokens, s, on_text=lambda text: post(("text", i, text)), cancel=cancel,
                                     on_logprobs=(lambda e: post(("logprobs", i, e))) if s.logprobs is not None else None)
            future.add_done_callback(lambda f: None if f.cancelled() else post(
                ("error", i, f.exception()) if f.exception() else ("done", i, f.result())))

        for i in range(shape.n):
            start(i)

        def indexed(body, i):
            if body is not None and body.get("choices"):
                body["choices"][0]["index"] = i
            return body

        async def stream():
            try:
                yield "".join(_sse(indexed(s.first(), i)) for i, s in enumerate(shapes))
                left, prompt, completion = set(range(shape.n)), 0, 0
                while left:
                    try:
                        kind, i, value = await asyncio.wait_for(events.get(), KEEPALIVE_SECONDS)
                    except asyncio.TimeoutError:
                        yield ": waiting for the model\n\n"
                        continue
                    if kind == "text":
                        body = shapes[i].delta(value)
                    elif kind == "logprobs":
                        body = shapes[i].delta("", value)
                    elif kind == "error":
                        yield _sse(ApiError(500, str(value), None, "generation_failed", "server_error").body())
                        break
                    else:
                        left.discard(i)
                        prompt, completion = value.prompt_tokens, completion + value.completion_tokens
                        ends = [b for b in shapes[i].last(value) if b.get("choices")]
                        for b in ends:
                            b.pop("usage", None)  # one usage chunk for all the choices, at the end
                        yield "".join(_sse(indexed(b, i)) for b in ends)
                        continue
                    if body is not None:
                        yield _sse(indexed(body, i))
                if shape.include_usage and not left:
                    kind = "text_completion" if isinstance(shape, _CompletionShape) else "chat.completion.chunk"
                    yield _sse({"id": shape.id, "object": kind, "created": shape.created,
                                "model": shape.model, "choices": [], "usage": api.usage(prompt, completion)})
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def generate(request: Request, tokens, sampling, shape):
        """Run one generation; stream it (SSE) or answer once. shape(kind, ...) builds bodies."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = CancelFlag()
        after_cancel = [0]

        def post(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the server is shutting down: nobody is listening
                cancel.set()

        def on_text(text):
            if cancel.is_set():
                after_cancel[0] += 1
            post(("text", text))

        def on_logprobs(entries):
            post(("logprobs", entries))

        def finished(f):
            stats = worker.stats
            stats.max_tokens_after_cancel = max(stats.max_tokens_after_cancel, after_cancel[0])
            if not f.cancelled():
                exc = f.exception()
                post(("error", exc) if exc else ("done", f.result()))

        if shape.n > 1 and shape.stream:
            return stream_choices(tokens, sampling, shape, cancel)
        if shape.n > 1:  # several choices: each its own generation, seeds seed+i
            return await generate_choices(request, tokens, sampling, shape, cancel)
        future = worker.generate(tokens, sampling, on_text=on_text, cancel=cancel,
                                 on_logprobs=on_logprobs if shape.stream and sampling.logprobs is not None else None)
        future.add_done_callback(finished)
        if not shape.stream:
            watch = asyncio.ensure_future(_watch_disconnect(request, cancel))
            try:
                result = await asyncio.wrap_future(future)
            except RuntimeFailure as exc:
                raise ApiError(500, str(exc), None, "generation_failed", "server_error") from None
            finally:
                watch.cancel()
            return JSONResponse(shape.final(result))

        async def stream():
            """Under load several tokens wait in the queue at once: they go out as one delta in
            one write, and the timer for the keep-alive comment is set only when the queue is
            empty (a task and a timer per token cost more than the token, with 8 streams)."""
            sse = getattr(shape, "sse", _sse)
            try:
                first = shape.first()
                yield "".join(sse(b) for b in (first if isinstance(first, list) else [first]))
                done = False
                while not done:
                    if events.empty():
                        try:
                            items = [await asyncio.wait_for(events.get(), KEEPALIVE_SECONDS)]
                        except asyncio.TimeoutError:
                            yield ": waiting for the model\n\n"  # also notices a client that left the queue
                            continue
                    else:
                        items = []
                    while not events.empty():
                        items.append(events.get_nowait())
                    out, text, logprobs = [], [], []
                    for kind, value in items:
                        if kind == "text":
                            text.append(value)
                            continue
                        if kind == "logprobs":
                            logprobs += value
                            continue
                        if text or logprobs:
                            out += [sse(d) for d in [shape.delta("".join(text), logprobs)] if d is not None]
                            text, logprobs = [], []
                        if kind == "error":
                            error = ApiError(500, str(value), None, "generation_failed", "server_error")
                            out.append(sse(shape.error(error) if hasattr(shape, "error") else error.body()))
                        else:
                            out.extend(sse(body) for body in shape.last(value))
                        done = True
                        break
                    if text or logprobs:
                        out += [sse(d) for d in [shape.delta("".join(text), logprobs)] if d is not None]
                    if out:
                        yield "".join(out)
                yield getattr(shape, "end_of_stream", "data: [DONE]\n\n")
            finally:
                cancel.set()  # a client that disconnected stops its generation at the next token

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def prepare_chat(raw: bytes):
        return prepare_chat_body(parse_json(raw))

    def prepare_responses(raw: bytes):
        body = parse_json(raw)
        params, tokens = prepare_chat_body(api.responses_to_chat(body))
        return params, tokens, body

    def prepare_chat_body(body: dict):
        params = api.parse_common(body)
        params.logprobs = api.parse_logprobs(body, chat=True)
        try:
            spec = tools.parse(body)
            if spec is not None:
                spec.style = tool_style
                if spec.active and params.grammar:
                    raise ApiError(400, "give either tools or a JSON response_format/grammar, not both", "tools",
                                   "invalid_value")
                params.grammar = tools.grammar(spec) if spec.active else params.grammar
        except tools.ToolError as exc:
            raise ApiError(400, str(exc), exc.param, "invalid_value") from None
        params.tools = spec
        check_sampling(params)
        messages = api.parse_messages(body)
        if settings.system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": settings.system})
        # The rendered prompt holds every message: when their text alone cannot fit the context,
        # say so before the template renders 40,000 turns (issue 8.7).
        try:
            eng.check_text_fits(sum(len(m["content"].encode("utf-8")) for m in messages))
        except ContextOverflowError as exc:
            raise ApiError(400, str(exc), "messages", "context_length_exceeded") from None
        messages = tools.for_template(messages, spec)
        native = spec is not None and spec.active and spec.style != "generic"
        try:
            thinking = reasoning.thinking_wanted(body)
        except reasoning.ReasoningError as exc:
            raise ApiError(400, str(exc), exc.param, "invalid_value") from None
        variables = {}
        if takes_enable_thinking:
            variables["enable_thinking"] = True if thinking is None else thinking
        try:
            text = template.render(messages, tools=spec.wanted() if native else None, **variables)
        except TemplateError as exc:
            raise ApiError(400, str(exc), "messages", "template_error") from None
        if thinks:
            params.think = reasoning.starts_inside(text)
        return params, tokens_for(text, raw=False)

    def prepare_completion(raw: bytes):
        body = parse_json(raw)
        params = api.parse_common(body)
        params.logprobs = api.parse_logprobs(body, chat=False)
        check_sampling(params)
        return params, tokens_for(api.parse_prompt(body), raw=True)

    async def chat_completions(request: Request):
        raw = await read_body(request)
        params, tokens = await prep.run(lambda: prepare_chat(raw))
        return await generate(request, tokens, sampling_for(params, template.stop),
                              _ChatShape(model_id, params, len(tokens)))

    async def responses(request: Request):
        raw = await read_body(request)
        params, tokens, body = await prep.run(lambda: prepare_responses(raw))
        return await generate(request, tokens, sampling_for(params, template.stop),
                              _ResponsesShape(model_id, params, len(tokens), body))

    async def completions(request: Request):
        raw = await read_body(request)
        params, tokens = await prep.run(lambda: prepare_completion(raw))
        return await generate(request, tokens, sampling_for(params, []), _CompletionShape(model_id, params, len(tokens)))

    async def embeddings(request: Request):
        raw = await read_body(request)
        inputs, fmt = await prep.run(lambda: api.parse_embedding_input(parse_json(raw)))
        for v in inputs:
            if isinstance(v, list):
                try:
                    eng.checked_tokens(v)
                except ValueError as exc:
                    raise ApiError(400, str(exc), "input", "invalid_value") from None

        # One job per input: each runs between two decoding steps, so a long list of inputs
        # never holds up the conversations being generated for more than one embedding.
        jobs = [worker.submit(lambda engine, cancelled, text=text: engine.embed(text)).future for text in inputs]
        try:
            results = [await asyncio.wrap_future(job) for job in jobs]
        except ContextOverflowError as exc:
            raise ApiError(400, str(exc), "input", "context_length_exceeded") from None
        except RuntimeFailure as exc:
            raise ApiError(500, str(exc), None, "embedding_failed", "server_error") from None
        data = []
        for i, (vec, _) in enumerate(results):
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if fmt == "base64" else vec
            data.append({"object": "embedding", "index": i, "embedding": value})
        n = sum(t for _, t in results)
        return JSONResponse({"object": "list", "data": data, "model": model_id,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": info.get("created", 0), "owned_by": "bundle",
             "meta": {"backend": info.get("backend"), "context": eng.n_ctx}}]})

    async def info_route(request: Request):
        return JSONResponse({**info, "context": eng.n_ctx,
                             "defaults": {"temperature": settings.temp, "system": settings.system or ""}})

    async def health(request: Request):
        s = worker.stats
        busy = worker.scheduler.busy_slots()
        return JSONResponse({"status": "ok", "queued": worker.pending(),
                             "slots": {"total": worker.parallel, "busy": busy},
                             "stats": {"jobs": s.finished + busy, "cancelled": s.cancelled, "skipped": s.skipped,
                                       "max_tokens_after_cancel": s.max_tokens_after_cancel}})

    async def metrics(request: Request):
        return PlainTextResponse(prometheus_text(worker), media_type="text/plain; version=0.0.4")

    async def page(request: Request):
        return FileResponse(WEB / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                          "X-Content-Type-Options": "nosniff",
                                                          "Referrer-Policy": "no-referrer"})

    async def static(request: Request):
        name = request.path_params["name"]
        missing = error_response(ApiError(404, f"no such file: /static/{name[:100]}", None, "not_found"))
        if len(name) > 255 or "\0" in name:
            return missing
        try:
            path = (WEB / name).resolve()
            if WEB.resolve() not in path.parents or not path.is_file():
                return missing
        except (OSError, ValueError):
            return missing
        return FileResponse(path, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    def wrap(handler):
        async def endpoint(request: Request):
            try:
                return await handler(request)
            except ApiError as exc:
                return error_response(exc)
        return endpoint

    async def not_found(request, exc):
        return error_response(ApiError(404, f"no route {request.method} {request.url.path}", None, "not_found"))

    async def bad_method(request, exc):
        return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}", None,
                                       "method_not_allowed"))

    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/metrics", wrap(metrics)),
        Route("/info", wrap(info_route)),
        Route("/v1/models", wrap(models)),
        Route("/v1/chat/completions", wrap(chat_completions), methods=["POST"]),
        Route("/v1/completions", wrap(completions), methods=["POST"]),
        Route("/v1/responses", wrap(responses), methods=["POST"]),
        Route("/v1/embeddings", wrap(embeddings), methods=["POST"]),
        Route("/static/{name:path}", static),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})
    app.state.worker = worker
    return Guard(app, allowed_hosts, api_key, allowed_origins)


async def _watch_disconnect(request: Request, cancel: CancelFlag) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


def prometheus_text(worker) -> str:
    """/metrics in Prometheus' text format: what someone running this on a LAN wants to graph."""
    s, sched = worker.stats, worker.scheduler
    rows = [
        ("bundle_requests_total", "counter", "generation requests received", s.requests),
        ("bundle_requests_finished_total", "counter", "generations finished (any reason)", s.finished),
        ("bundle_requests_cancelled_total", "counter", "generations stopped by their client", s.cancelled),
        ("bundle_prompt_tokens_total", "counter", "prompt tokens decoded (after prefix reuse)", s.prompt_tokens),
        ("bundle_generated_tokens_total", "counter", "tokens generated", s.generated_tokens),
        ("bundle_prompt_seconds_total", "counter", "seconds spent decoding prompts", s.prompt_seconds),
        ("bundle_decode_seconds_total", "counter", "seconds spent generating", s.decode_seconds),
        ("bundle_queue_length", "gauge", "requests waiting for a slot", sched.queued()),
        ("bundle_slots_busy", "gauge", "slots generating now", sched.busy_slots()),
        ("bundle_slots_total", "gauge", "slots (--parallel)", sched.n_parallel),
        ("bundle_prompt_tokens_per_second", "gauge", "prompt tokens per second of prompt work",
         s.prompt_tokens / s.prompt_seconds if s.prompt_seconds else 0.0),
        ("bundle_generated_tokens_per_second", "gauge", "generated tokens per second of generation work",
         s.generated_tokens / s.decode_seconds if s.decode_seconds else 0.0),
    ]
    out = []
    for name, kind, help_, value in rows:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(out) + "\n"


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", "replace")


def _chat_logprob(e) -> dict:
    """One token as OpenAI's chat API gives it (ChatCompletionTokenLogprob)."""
    return {"token": _text(e.piece), "logprob": e.logprob, "bytes": list(e.piece),
            "top_logprobs": [{"token": _text(p), "logprob": v, "bytes": list(p)} for _, p, v in e.top]}


def _completion_logprobs(entries, top: int | None) -> dict | None:
    """Tokens as the legacy completions API gives them (offsets within the generated text)."""
    if entries is None or top is None:
        return None
    return {"tokens": [_text(e.piece) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_text(p): v for _, p, v in e.top} for e in entries] if top else None,
            "text_offset": [e.start for e in entries]}


class _ChatShape:
    def __init__(self, model, params, n_prompt):
        self.id, self.model, self.created = api.new_id("chatcmpl"), model, api.now()
        self.stream, self.include_usage, self.n_prompt = params.stream, params.include_usage, n_prompt
        self.n = params.n
        self.logprobs = params.logprobs
        spec = getattr(params, "tools", None)
        self.tools = spec if spec is not None and spec.active else None  # answers parsed for calls
        think = getattr(params, "think", None)
        self.splitter = reasoning.Splitter(think) if think is not None else None  # <think> … </think>
        self.think = think

    def _chunk(self, delta, finish=None, logprobs=None):
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = {"content": [_chat_logprob(e) for e in logprobs], "refusal": None}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    def first(self):
        return self._chunk({"role": "assistant", "content": ""})

    def delta(self, text, logprobs=None):
        if self.tools:  # the answer is parsed for calls once it is whole: nothing goes out before
            return None
        lp = logprobs if self.logprobs is not None else None
        if self.splitter is None:
            return self._chunk({"content": text}, logprobs=lp)
        return self._split_chunk(self.splitter.feed(text), lp)

    def _split_chunk(self, parts, lp=None):
        delta = {}
        for kind, piece in parts:
            key = "reasoning_content" if kind == "reasoning" else "content"
            delta[key] = delta.get(key, "") + piece
        return self._chunk(delta, logprobs=lp) if delta or lp else None

    def _answer(self, result) -> tuple[dict, str]:
        """The assistant message and finish reason of a finished generation: the thinking apart
        (reasoning templates), tool calls parsed (requests with tools)."""
        thought, text = (None, result.text) if self.think is None else reasoning.split(result.text, self.think)
        content, calls = tools.parse_answer(text, self.tools)
        message = {"role": "assistant", "content": content}
        if thought:
            message["reasoning_content"] = thought
        if calls:
            message["tool_calls"] = calls
        return message, "tool_calls" if calls else api.finish_reason(result)

    def last(self, result):
        out, finish = [], api.finish_reason(result)
        if self.splitter is not None and not self.tools:
            rest = self._split_chunk(self.splitter.finish())
            if rest is not None:
                out.append(rest)
        if self.tools:
            message, finish = self._answer(result)
            if message.get("reasoning_content"):
                out.append(self._chunk({"reasoning_content": message["reasoning_content"]}))
            if message.get("tool_calls"):
                out.append(self._chunk({"content": None, "tool_calls": [
                    dict(c, index=i) for i, c in enumerate(message["tool_calls"])]}))
            elif message["content"]:
                out.append(self._chunk({"content": message["content"]}))
        end = self._chunk({}, finish)
        end["timings"] = api.timings(result)
        out.append(end)
        if self.include_usage:
            out.append({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [],
                        "usage": api.usage(result.prompt_tokens, result.completion_tokens)})
        return out

    def final(self, result):
        message, finish = self._answer(result) if self.tools or self.think is not None else (
            {"role": "assistant", "content": result.text}, api.finish_reason(result))
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message,
                             "logprobs": None if result.logprobs is None else {
                                 "content": [_chat_logprob(e) for e in result.logprobs], "refusal": None},
                             "finish_reason": finish}],
                "usage": api.usage(result.prompt_tokens, result.completion_tokens),
                "timings": api.timings(result)}


class _CompletionShape(_ChatShape):
    def __init__(self, model, params, n_prompt):
        super().__init__(model, params, n_prompt)
        self.id = api.new_id("cmpl")

    def _chunk(self, text, finish=None, logprobs=None):
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    def first(self):
        return self._chunk("")

    def delta(self, text, logprobs=None):
        return self._chunk(text, logprobs=_completion_logprobs(logprobs, self.logprobs)
                           if self.logprobs is not None else None)

    def last(self, result):
        end = self._chunk("", api.finish_reason(result))
        end["timings"] = api.timings(result)
        if self.include_usage:
            end["usage"] = api.usage(result.prompt_tokens, result.completion_tokens)
        return [end]

    def final(self, result):
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": result.text,
                             "logprobs": _completion_logprobs(result.logprobs, self.logprobs),
                             "finish_reason": api.finish_reason(result)}],
                "usage": api.usage(result.prompt_tokens, result.completion_tokens)}


class _ResponsesShape:
    """POST /v1/responses: one message of output text; streamed as OpenAI's typed events
    (`event:` lines, a sequence number each, no [DONE])."""

    end_of_stream = ""

    def __init__(self, model, params, n_prompt, body):
        self.id, self.model, self.created = api.new_id("resp"), model, api.now()
        self.item = api.new_id("msg")
        self.stream, self.include_usage, self.n_prompt, self.n, self.logprobs = params.stream, False, n_prompt, 1, None
        self.body, self.seq, self.text = body, 0, []

    def sse(self, event: dict) -> str:
        event = dict(event, sequence_number=self.seq)
        self.seq += 1
        return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    def _message(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [self._part(text)]
        return {"type": "message", "id": self.item, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def _part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _response(self, status: str, result=None) -> dict:
        b = self.body
        fmt = (b.get("text") or {}).get("format") or {"type": "text"}
        out = {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
               "incomplete_details": None, "instructions": b.get("instructions"),
               "max_output_tokens": b.get("max_output_tokens"), "model": self.model, "output": [],
               "parallel_tool_calls": b.get("parallel_tool_calls", True), "previous_response_id": None,
               "reasoning": None, "store": False, "temperature": b.get("temperature"), "text": {"format": fmt},
               "tool_choice": b.get("tool_choice", "auto"), "tools": [], "top_p": b.get("top_p"),
               "truncation": b.get("truncation", "disabled"), "usage": None, "metadata": b.get("metadata") or {}}
        if result is not None:
            out["output"] = [self._message(result.text, "completed" if status == "completed" else "incomplete")]
            out["usage"] = {"input_tokens": result.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                            "output_tokens": result.completion_tokens,
                            "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": result.prompt_tokens + result.completion_tokens}
            if status == "incomplete":
                out["incomplete_details"] = {"reason": "max_output_tokens"}
        return out

    @staticmethod
    def _status(result) -> str:
        return "incomplete" if result.finish_reason == "length" else "completed"

    def first(self) -> list:
        pending = self._response("in_progress")
        return [{"type": "response.created", "response": pending},
                {"type": "response.in_progress", "response": pending},
                {"type": "response.output_item.added", "output_index": 0, "item": self._message(None, "in_progress")},
                {"type": "response.content_part.added", "item_id": self.item, "output_index": 0,
                 "content_index": 0, "part": self._part("")}]

    def delta(self, text, logprobs=None) -> dict:
        self.text.append(text)
        return {"type": "response.output_text.delta", "item_id": self.item, "output_index": 0, "content_index": 0,
                "delta": text, "logprobs": []}

    def last(self, result) -> list:
        status = self._status(result)
        item = self._message(result.text, "completed" if status == "completed" else "incomplete")
        return [{"type": "response.output_text.done", "item_id": self.item, "output_index": 0, "content_index": 0,
                 "text": result.text, "logprobs": []},
                {"type": "response.content_part.done", "item_id": self.item, "output_index": 0, "content_index": 0,
                 "part": self._part(result.text)},
                {"type": "response.output_item.done", "output_index": 0, "item": item},
                {"type": f"response.{status}", "response": self._response(status, result)}]

    def error(self, exc: ApiError) -> dict:
        return {"type": "error", "code": exc.code, "message": exc.message, "param": None}

    def final(self, result) -> dict:
        return self._response(self._status(result), result)


def allowed_hosts_for(host: str, port: int) -> set[str] | None:
    """Host header values a request may carry. None (no check) when bound to every interface:
    then the machine's own addresses are legitimate names and cannot all be known."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = {host, f"{host}:{port}"}
    if host in LOOPBACK_NAMES:
        for n in LOOPBACK_NAMES:
            names |= {n, f"{n}:{port}"}
    return names


class PortInUseError(RuntimeFailure):
    pass


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(f"port {port} on {host} is already in use; pass --port N to use another "
                                 "(--port 0 picks a free one)") from None
        raise RuntimeFailure(f"cannot listen on {host}:{port}: {exc.strerror}; check --host and --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _OncePerMinute(logging.Filter):
    """asyncio logs a traceback for every accept() that fails for lack of file descriptors
    (1.3 MB/s under a flood of connections): keep one line a minute instead."""

    def __init__(self):
        super().__init__()
        self.last = 0.0

    def filter(self, record):
        if "out of system resource" not in str(record.msg):
            return True
        now = time.monotonic()
        if now - self.last > 60:
            self.last = now
            _say("note: too many connections at once; new ones are refused until some close")
        return False


def _say(msg: str) -> None:
    try:
        print(msg, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def raise_fd_limit(want: int = 8192) -> int:
    """The usual soft limit is 1024 file descriptors; the hard one is often far higher."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        return soft
    except (ImportError, ValueError, OSError):
        return 1024


def _protocol_class(max_connections: int):
    """uvicorn's h11 protocol with the connection rules above."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    refused = {"last": 0.0}
    # Connections waiting for a request head, oldest first: when the limit is reached, the
    # oldest of them makes room for the newcomer (a flood of slow connections cannot lock real
    # clients out); only when every connection is busy with a request is the newcomer refused.
    waiting: dict = {}

    class GuardedH11Protocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                victim = next((c for c in waiting if c is not self), None)
                now = time.monotonic()
                if now - refused["last"] > 60:
                    refused["last"] = now
                    _say(f"note: more than {max_connections} connections at once; closing the idlest "
                         "(one line a minute)")
                if victim is None:
                    transport.abort()
                    return
                waiting.pop(victim, None)
                victim.transport.abort()
            self._arm_head_timer()

        def _arm_head_timer(self):
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(REQUEST_HEAD_SECONDS, self._head_timeout)
                waiting[self] = None

        def _disarm_head_timer(self):
            waiting.pop(self, None)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self):
            self._head_timer = None
            waiting.pop(self, None)
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()  # a request head that never came (slowloris)

        def data_received(self, data):
            if self.cycle is None or self.cycle.response_complete:
                self._arm_head_timer()
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm_head_timer()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_head_timer()  # idle between requests: the next head is due in time too

        def connection_lost(self, exc):
            self._disarm_head_timer()
            super().connection_lost(exc)

    return GuardedH11Protocol


class ServerThread:
    """uvicorn on an already-bound socket, in a thread (the chat may own the foreground)."""

    def __init__(self, app, sock: socket.socket):
        import uvicorn

        fds = raise_fd_limit()
        logging.getLogger("asyncio").addFilter(_OncePerMinute())
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1, timeout_keep_alive=KEEPALIVE_IDLE_SECONDS,
                                http=_protocol_class(min(MAX_CONNECTIONS, max(16, fds - 64))))
        self.server = _Server(config)
        self.sock = sock
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)

    def _run(self):
        self.server.run(sockets=[self.sock])

    def start(self):
        self.thread.start()

    def serve_forever(self):
        """In the main thread: uvicorn handles Ctrl-C/SIGTERM and shuts down cleanly."""
        self.server.run(sockets=[self.sock])

    def stop(self):
        self.server.should_exit = True


EXIT_GRACE_SECONDS = 1.8


class _Server:
    """uvicorn.Server whose exit on Ctrl-C/SIGTERM is bounded: if a clean shutdown has not
    finished within EXIT_GRACE_SECONDS (a request stuck in C code), the process leaves anyway."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                super().handle_exit(sig, frame)
                if not getattr(self, "_watchdog", None):
                    self._watchdog = threading.Timer(EXIT_GRACE_SECONDS, os._exit, args=(0,))
                    self._watchdog.daemon = True
                    self._watchdog.start()

        return Server(config)
