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
import hmac
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
from starlette.requests import ClientDisconnect, Request
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
# A request body must keep coming (issue 22.6): after REQUEST_HEAD_SECONDS of grace it must
# have arrived at MIN_BODY_RATE bytes a second on average, else the connection is closed (a body
# trickled at 1 byte a second would otherwise hold a connection and a handler for ever).
MIN_BODY_RATE = 1024
# Host header: a name or address and an optional port, nothing else (127.0.0.1:PORT@evil.example
# is refused, not read as 127.0.0.1).
_HOST = re.compile(r"(?P<name>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?\Z")
JSON_TYPE = re.compile(r"application/(?:[\w.+-]+\+)?json\s*(?:;.*)?\Z", re.IGNORECASE)
log = logging.getLogger("bundle.server")


def error_response(exc: ApiError, close: bool = False) -> JSONResponse:
    """close: end the connection after this answer (a refused request whose body was not read:
    what follows it on the connection is not a request to serve, RFC 9112 §6.1, §9.6)."""
    return JSONResponse(exc.body(), status_code=exc.status, headers={"Connection": "close"} if close else None)


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
        if "transfer-encoding" in headers and "content-length" in headers:
            return await self._refuse(scope, receive, send, 400, "the request has both Content-Length and "
                                      "Transfer-Encoding; send one of them", "invalid_framing", close=True)
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
        # With --api-key, everything but the page, its files and the liveness check (/health: slot
        # counts, what a load balancer polls, open on llama-server too) needs the key: the API,
        # /info, /metrics and /apply-template (which shows the bundle's system prompt).
        if self.api_key and path not in ("/", "/health") and not path.startswith("/static/"):
            auth = headers.get("authorization", "")
            if not hmac.compare_digest(auth.encode("latin-1"), f"Bearer {self.api_key}".encode("utf-8")):
                msg = "missing API key: send 'Authorization: Bearer KEY'" if not auth else "incorrect API key"
                return await self._refuse(scope, receive, send, 401, msg, "invalid_api_key", "authentication_error")
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return await self._refuse(scope, receive, send, 400, "the Content-Length header is not a number",
                                      "invalid_framing", close=True)
        if length is not None and int(length) > MAX_BODY:
            return await self._refuse(scope, receive, send, 413, f"the request body is larger than {MAX_BODY} bytes",
                                      "request_too_large")
        if origin is not None and origin.strip().lower().rstrip("/") in self.allowed_origins:
            send = _with_cors(send, origin.strip())
        await self.app(scope, receive, send)

    async def _refuse(self, scope, receive, send, status, message, code, type_="invalid_request_error",
                      close: bool = False):
        """close: a request whose framing is in doubt; where its body ends is not known, so the
        connection is closed after the answer (what follows is not a request to serve)."""
        return await error_response(ApiError(status, message, None, code, type_), close=close)(scope, receive, send)

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
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes", None, "request_too_large")
    except ClientDisconnect:  # gone, or closed for sending its body too slowly: nobody to answer
        raise ApiError(400, "the connection closed before the request body was complete", None,
                       "incomplete_body") from None
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


_RENDER_ARGS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "seconds", "date_string",
                "datetime"}


class ServerState:
    """What the request handlers read (request.app.state.bundle): the settings, the engine's
    worker, the chat template and what it can do, and the preparation of each kind of request:
    parsing, template rendering and tokenizing, run in the prep pool, never on the event loop."""

    def __init__(self, settings, worker, template=None, info: dict | None = None):
        self.settings, self.worker, self.template = settings, worker, template
        self.engine: Engine = worker.engine
        self.prep = PrepPool()
        self.info = dict(info or {})
        self.model_id = self.info.get("name") or "model"
        # What the chat template can do, read once: how it has the model call tools, whether it
        # takes enable_thinking, whether its answers start with <think> (reasoning models).
        source = getattr(template, "source", None) or ""
        self.tool_style = tools.style_of(source)
        self.source = source
        self.thinks = reasoning.is_thinking_template(source)
        switch = reasoning.template_switch(source, settings.think)
        # What the page shows: whether the model thinks, and whether it can be asked not to.
        self.info["thinking"] = {"thinks": self.thinks, "switchable": bool(switch),
                                 "default": switch.get("enable_thinking", self.thinks)}
        self._object_arguments = None

    @property
    def object_arguments(self) -> bool:
        if self._object_arguments is None:
            self._object_arguments = self.tool_style == "generic" or tools.takes_object_arguments(self.template)
        return self._object_arguments

    def sampling_for(self, p: api.GenParams, stops) -> Sampling:
        s = self.settings
        return Sampling(
            temp=s.temp if p.temperature is None else p.temperature,
            top_p=s.top_p if p.top_p is None else p.top_p,
            top_k=s.top_k if p.top_k is None else p.top_k,
            repeat_penalty=s.repeat_penalty if p.repeat_penalty is None else p.repeat_penalty,
            seed=s.seed if p.seed is None else p.seed,
            max_tokens=p.max_tokens or s.max_tokens,
            stop=list(stops) + p.stop,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            grammar=p.grammar,
            logit_bias=p.logit_bias or {},
            logprobs=p.logprobs,
        )

    def check_sampling(self, params: api.GenParams) -> None:
        """What only the model can tell: token ids in range, a grammar llama.cpp parses."""
        try:
            self.engine.checked_tokens(list(params.logit_bias or {}))
        except ValueError as exc:
            raise ApiError(400, f"logit_bias: {exc}", "logit_bias", "invalid_value") from None
        if params.grammar and not self.engine.check_grammar(params.grammar):
            raise ApiError(400, "the grammar does not parse as GBNF (llama.cpp: " + (last_error() or "no detail")
                           + ")", "grammar", "invalid_value")

    def tokens_for(self, text, raw: bool) -> list[int]:
        eng, param = self.engine, "messages" if not raw else "prompt"
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

    def render_chat(self, body: dict) -> tuple[api.GenParams, str]:
        """A chat request's parameters and its prompt as the template renders it."""
        api.check_fields(body, api.CHAT_FIELDS, "chat completions")
        params = api.parse_common(body)
        params.logprobs = api.parse_logprobs(body, chat=True)
        try:
            spec = tools.parse(body)
            if spec is not None:
                spec.style = self.tool_style
                if spec.active and params.grammar:
                    raise ApiError(400, "give either tools or a JSON response_format/grammar, not both", "tools",
                                   "invalid_value")
                params.grammar = tools.grammar(spec) if spec.active else params.grammar
        except tools.ToolError as exc:
            raise ApiError(400, str(exc), exc.param, "invalid_value") from None
        params.tools = spec
        messages = api.parse_messages(body)
        if self.settings.system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.settings.system})
        # The rendered prompt holds every message: when their text alone cannot fit the context,
        # say so before the template renders 40,000 turns (issue 8.7).
        try:
            self.engine.check_text_fits(sum(len(m["content"].encode("utf-8")) for m in messages))
        except ContextOverflowError as exc:
            raise ApiError(400, str(exc), "messages", "context_length_exceeded") from None
        messages = tools.for_template(messages, spec, self.object_arguments)
        native = spec is not None and spec.active and spec.style != "generic"
        try:
            thinking = reasoning.thinking_wanted(body)
        except reasoning.ReasoningError as exc:
            raise ApiError(400, str(exc), exc.param, "invalid_value") from None
        # chat_template_kwargs go to the template as variables, as llama-server passes them.
        variables = dict(body.get("chat_template_kwargs") or {})
        taken = next((k for k in variables if k in _RENDER_ARGS), None)
        if taken:
            raise ApiError(400, f"'chat_template_kwargs.{taken}' is set by the server, not the request",
                           "chat_template_kwargs", "invalid_value")
        variables.update(reasoning.template_switch(self.source, self.settings.think, thinking))
        try:
            text = self.template.render(messages, tools=spec.wanted() if native else None, **variables)
        except TemplateError as exc:
            raise ApiError(400, str(exc), "messages", "template_error") from None
        if self.thinks:
            params.think = reasoning.starts_inside(text)
        return params, text

    def prepare_chat(self, body: dict) -> tuple[api.GenParams, list[int]]:
        params, text = self.render_chat(body)
        self.check_sampling(params)
        return params, self.tokens_for(text, raw=False)

    def prepare_completion(self, body: dict) -> tuple[api.GenParams, list[int]]:
        api.check_fields(body, api.COMPLETION_FIELDS, "completions")
        params = api.parse_common(body)
        params.logprobs = api.parse_logprobs(body, chat=False)
        self.check_sampling(params)
        return params, self.tokens_for(api.parse_prompt(body), raw=True)

    def prepare_embeddings(self, body: dict) -> tuple[list, str]:
        inputs, fmt = api.parse_embedding_input(body)
        for v in inputs:
            if isinstance(v, list):
                try:
                    self.engine.checked_tokens(v)
                except ValueError as exc:
                    raise ApiError(400, str(exc), "input", "invalid_value") from None
        return inputs, fmt


def state_of(request: Request) -> ServerState:
    return request.app.state.bundle


async def prepared(request: Request, prepare):
    """The request's body, read here, parsed and prepared (prepare(body)) in the prep pool."""
    raw = await read_body(request)
    return await state_of(request).prep.run(lambda: prepare(parse_json(raw)))


# --- the endpoints: each reads its state from the app; add a route to ROUTES below ----------------

async def chat_completions(request: Request):
    st = state_of(request)
    params, tokens = await prepared(request, st.prepare_chat)
    return await generate(request, tokens, st.sampling_for(params, st.template.stop),
                          api.ChatShape(st.model_id, params, len(tokens)))


async def responses(request: Request):
    st = state_of(request)
    params, tokens, body = await prepared(request, lambda body: (*st.prepare_chat(api.responses_to_chat(body)), body))
    return await generate(request, tokens, st.sampling_for(params, st.template.stop),
                          api.ResponsesShape(st.model_id, params, len(tokens), body))


async def completions(request: Request):
    st = state_of(request)
    params, tokens = await prepared(request, st.prepare_completion)
    return await generate(request, tokens, st.sampling_for(params, []),
                          api.CompletionShape(st.model_id, params, len(tokens)))


async def apply_template(request: Request):
    """POST /apply-template (as llama-server): the prompt a chat request becomes, not generated.
    Like llama.cpp's, without the leading BOS text when the tokenizer adds BOS itself."""
    st = state_of(request)
    _, text = await prepared(request, st.render_chat)
    bos = getattr(st.engine, "bos_text", "")
    if getattr(st.engine, "add_bos", False) and bos and text.startswith(bos):
        text = text[len(bos):]
    return JSONResponse({"prompt": text})


async def embeddings(request: Request):
    st = state_of(request)
    inputs, fmt = await prepared(request, st.prepare_embeddings)
    # One job per input: each runs between two decoding steps, so a long list of inputs
    # never holds up the conversations being generated for more than one embedding.
    jobs = [st.worker.submit(lambda engine, cancelled, text=text: engine.embed(text)).future for text in inputs]
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
    return JSONResponse({"object": "list", "data": data, "model": st.model_id,
                         "usage": {"prompt_tokens": n, "total_tokens": n}})


async def models(request: Request):
    st = state_of(request)
    return JSONResponse({"object": "list", "data": [
        {"id": st.model_id, "object": "model", "created": st.info.get("created", 0), "owned_by": "bundle",
         "meta": {"backend": st.info.get("backend"), "context": st.engine.n_ctx}}]})


async def info_route(request: Request):
    st = state_of(request)
    return JSONResponse({**st.info, "context": st.engine.n_ctx,
                         "defaults": {"temperature": st.settings.temp, "system": st.settings.system or ""}})


async def health(request: Request):
    worker = state_of(request).worker
    s = worker.stats
    busy = worker.scheduler.busy_slots()
    return JSONResponse({"status": "ok", "queued": worker.pending(),
                         "slots": {"total": worker.parallel, "busy": busy},
                         "stats": {"jobs": s.finished + busy, "cancelled": s.cancelled, "skipped": s.skipped,
                                   "max_tokens_after_cancel": s.max_tokens_after_cancel}})


async def metrics(request: Request):
    return PlainTextResponse(prometheus_text(state_of(request).worker), media_type="text/plain; version=0.0.4")


async def page(request: Request):
    return FileResponse(WEB / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                      "X-Content-Type-Options": "nosniff",
                                                      "Referrer-Policy": "no-referrer"})


async def static(request: Request):
    name = request.path_params["name"]
    missing = ApiError(404, f"no such file: /static/{name[:100]}", None, "not_found")
    if len(name) > 255 or "\0" in name:
        raise missing
    try:
        path = (WEB / name).resolve()
        if WEB.resolve() not in path.parents or not path.is_file():
            raise missing
    except (OSError, ValueError):
        raise missing from None
    return FileResponse(path, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


ROUTES = [
    Route("/", page),
    Route("/health", health),
    Route("/metrics", metrics),
    Route("/info", info_route),
    Route("/v1/models", models),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/responses", responses, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/apply-template", apply_template, methods=["POST"]),
    Route("/static/{name:path}", static),
]


async def _api_error(request, exc: ApiError):
    return error_response(exc)


async def _not_found(request, exc):
    return error_response(ApiError(404, f"no route {request.method} {request.url.path}", None, "not_found"))


async def _bad_method(request, exc):
    return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}", None,
                                   "method_not_allowed"))


def create_app(settings, engine, *, template=None, info: dict | None = None, api_key: str | None = None,
               allowed_hosts: set[str] | None = None, allowed_origins: set[str] | None = None):
    """settings: runtime Settings (defaults for requests); engine: an Engine, or a worker that owns
    one (EngineWorker, or a stand-in with its methods in tests); template: the ChatTemplate;
    info: what /info and the page show. The app, behind its Guard (hosts, origins, API key)."""
    worker = engine if hasattr(engine, "generate") and hasattr(engine, "scheduler") else EngineWorker(engine)
    app = Starlette(routes=ROUTES, exception_handlers={ApiError: _api_error, 404: _not_found, 405: _bad_method})
    app.state.bundle = ServerState(settings, worker, template, info)
    app.state.worker = worker
    return Guard(app, allowed_hosts, api_key, allowed_origins)


# --- generating: one choice or n, streamed (SSE) or answered once ----------------------------------

def _streaming(body) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _seeded(sampling: Sampling, i: int) -> Sampling:
    return dataclasses.replace(sampling, seed=sampling.seed + i if sampling.seed >= 0 else -1)


async def generate_choices(request: Request, tokens, sampling, shape, cancel):
    worker = state_of(request).worker
    futures = [worker.generate(tokens, _seeded(sampling, i), on_text=lambda text: None, cancel=cancel)
               for i in range(shape.n)]
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


def stream_choices(request: Request, tokens, sampling, shape, cancel):
    """n > 1, streamed: the choices are generated side by side (seeds seed+i) and their
    chunks interleave as they come, each with its index; one usage chunk at the end."""
    worker = state_of(request).worker
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
        s = _seeded(sampling, i)
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
            yield "".join(api.sse(indexed(s.first(), i)) for i, s in enumerate(shapes))
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
                    yield api.sse(ApiError(500, str(value), None, "generation_failed", "server_error").body())
                    break
                else:
                    left.discard(i)
                    prompt, completion = value.prompt_tokens, completion + value.completion_tokens
                    ends = [b for b in shapes[i].last(value) if b.get("choices")]
                    for b in ends:
                        b.pop("usage", None)  # one usage chunk for all the choices, at the end
                    yield "".join(api.sse(indexed(b, i)) for b in ends)
                    continue
                if body is not None:
                    yield api.sse(indexed(body, i))
            if shape.include_usage and not left:
                kind = "text_completion" if isinstance(shape, api.CompletionShape) else "chat.completion.chunk"
                yield api.sse({"id": shape.id, "object": kind, "created": shape.created,
                               "model": shape.model, "choices": [], "usage": api.usage(prompt, completion)})
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()

    return _streaming(stream())


async def generate(request: Request, tokens, sampling, shape):
    """Run one generation; stream it (SSE) or answer once. The shape (api.ChatShape, …) builds
    the bodies."""
    worker = state_of(request).worker
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
        return stream_choices(request, tokens, sampling, shape, cancel)
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
        sse = getattr(shape, "sse", api.sse)
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

    return _streaming(stream())


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
    import h11
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
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # A response goes out in several writes (head, body; each streamed token): with
                # Nagle's algorithm the second waits for the client's delayed ACK, 40 ms on
                # Linux, on every keep-alive request and token. (asyncio's transports set it,
                # but only on sockets they see as TCP; measured here: 44 ms a /health without.)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
                self._watch_body(len(data))

        _body_since = None
        _body_bytes = 0
        _body_timer = None

        def _watch_body(self, n: int):
            """While a request's body is still coming, it must keep MIN_BODY_RATE after the grace."""
            if self.conn.their_state is not h11.SEND_BODY:
                self._body_since = None
                if self._body_timer is not None:
                    self._body_timer.cancel()
                    self._body_timer = None
                return
            if self._body_since is None:
                self._body_since, self._body_bytes = time.monotonic(), 0
            self._body_bytes += n
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self._body_time_left(), self._body_check)

        def _body_time_left(self) -> float:
            allowed = REQUEST_HEAD_SECONDS + self._body_bytes / MIN_BODY_RATE
            return max(0.05, self._body_since + allowed - time.monotonic())

        def _body_check(self):
            self._body_timer = None
            if self._body_since is None or self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
                return
            left = self._body_time_left()
            if left > 0.05:
                self._body_timer = self.loop.call_later(left, self._body_check)
                return
            self.transport.close()  # a body trickled too slowly: the handler sees a disconnect

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_head_timer()  # idle between requests: the next head is due in time too

        def connection_lost(self, exc):
            self._disarm_head_timer()
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
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
