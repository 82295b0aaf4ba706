"""The local web chat and OpenAI-compatible API: Starlette + uvicorn, built by create_app().

One model, one generation at a time (EngineWorker, first come first served); a client that
goes away stops its generation at the next token. Loopback by default, Host header checked
(DNS rebinding), no CORS headers at all (the page is same-origin), request bodies capped.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import socket
import struct
import threading
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from . import api
from .api import ApiError
from .engine import ContextOverflowError, Engine, Sampling
from .errors import RuntimeFailure
from .template import TemplateError
from .worker import CancelFlag, EngineWorker

WEB = Path(__file__).resolve().parent / "web"
MAX_BODY = 8 * 1024 * 1024
KEEPALIVE_SECONDS = 1.0
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class Guard:
    """ASGI middleware: Host header check, API key, body size cap (before any handler runs)."""

    def __init__(self, app, allowed_hosts: set[str] | None, api_key: str | None):
        self.app, self.allowed_hosts, self.api_key = app, allowed_hosts, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.allowed_hosts is not None:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host not in self.allowed_hosts and name not in self.allowed_hosts:
                return await error_response(ApiError(
                    403, f"Host '{host}' is not served here (DNS rebinding protection); use the URL the server printed",
                    None, "invalid_host", "permission_error"))(scope, receive, send)
        path = scope["path"]
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
        await self.app(scope, receive, send)


async def read_json(request: Request) -> dict:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes", None, "request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_type")
    return data


def create_app(settings, engine, *, template=None, info: dict | None = None, api_key: str | None = None,
               allowed_hosts: set[str] | None = None) -> Starlette:
    """settings: runtime Settings (defaults for requests); engine: an Engine or an EngineWorker
    that owns one; template: the ChatTemplate; info: what /info and the page show."""
    worker = engine if isinstance(engine, EngineWorker) else EngineWorker(engine)
    eng: Engine = worker.engine
    info = dict(info or {})
    model_id = info.get("name") or "model"

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
        )

    def tokens_for(text: str, raw: bool) -> list[int]:
        tokens = eng.tokenize(text, add_special=True, parse_special=False) if raw else eng.tokenize_prompt(text)
        try:
            eng.check_fits(len(tokens))
        except ContextOverflowError as exc:
            raise ApiError(400, str(exc), "messages" if not raw else "prompt", "context_length_exceeded") from None
        if not tokens:
            raise ApiError(400, "the prompt is empty", "prompt", "invalid_value")
        return tokens

    async def generate(request: Request, tokens, sampling, shape):
        """Run one generation; stream it (SSE) or answer once. shape(kind, ...) builds bodies."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = CancelFlag()
        after_cancel = [0]

        def on_text(text):
            if cancel.is_set():
                after_cancel[0] += 1
            loop.call_soon_threadsafe(events.put_nowait, ("text", text))

        def run(engine, cancelled):
            try:
                result = engine.generate(tokens, sampling, on_text=on_text, cancelled=cancelled)
            except BaseException as exc:
                loop.call_soon_threadsafe(events.put_nowait, ("error", exc))
                raise
            finally:
                worker.note_token_after_cancel(after_cancel[0])
            loop.call_soon_threadsafe(events.put_nowait, ("done", result))
            return result

        job = worker.submit(run, cancel)
        if not shape.stream:
            watch = asyncio.ensure_future(_watch_disconnect(request, cancel))
            try:
                result = await asyncio.wrap_future(job.future)
            except RuntimeFailure as exc:
                raise ApiError(500, str(exc), None, "generation_failed", "server_error") from None
            finally:
                watch.cancel()
            return JSONResponse(shape.final(result))

        async def stream():
            try:
                yield _sse(shape.first())
                while True:
                    try:
                        kind, value = await asyncio.wait_for(events.get(), KEEPALIVE_SECONDS)
                    except asyncio.TimeoutError:
                        yield ": waiting for the model\n\n"  # also notices a client that left the queue
                        continue
                    if kind == "text":
                        yield _sse(shape.delta(value))
                    elif kind == "error":
                        yield _sse(ApiError(500, str(value), None, "generation_failed", "server_error").body())
                        break
                    else:
                        for body in shape.last(value):
                            yield _sse(body)
                        break
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # a client that disconnected stops its generation at the next token

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def chat_completions(request: Request):
        body = await read_json(request)
        params = api.parse_common(body)
        messages = api.parse_messages(body)
        if settings.system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": settings.system})
        try:
            text = template.render(messages)
        except TemplateError as exc:
            raise ApiError(400, str(exc), "messages", "template_error") from None
        tokens = tokens_for(text, raw=False)
        return await generate(request, tokens, sampling_for(params, template.stop),
                              _ChatShape(model_id, params, len(tokens)))

    async def completions(request: Request):
        body = await read_json(request)
        params = api.parse_common(body)
        tokens = tokens_for(api.parse_prompt(body), raw=True)
        return await generate(request, tokens, sampling_for(params, []), _CompletionShape(model_id, params, len(tokens)))

    async def embeddings(request: Request):
        body = await read_json(request)
        inputs, fmt = api.parse_embedding_input(body)

        def run(engine, cancelled):
            return [engine.embed(text) for text in inputs]

        try:
            results = await asyncio.wrap_future(worker.submit(run).future)
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
        return JSONResponse({"status": "ok", "queued": worker.pending(),
                             "stats": {"jobs": s.jobs, "cancelled": s.cancelled, "skipped": s.skipped,
                                       "max_tokens_after_cancel": s.max_tokens_after_cancel}})

    async def page(request: Request):
        return FileResponse(WEB / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                          "X-Content-Type-Options": "nosniff",
                                                          "Referrer-Policy": "no-referrer"})

    async def static(request: Request):
        name = request.path_params["name"]
        path = (WEB / name).resolve()
        if WEB.resolve() not in path.parents or not path.is_file():
            return error_response(ApiError(404, f"no such file: /{name}", None, "not_found"))
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
        Route("/info", wrap(info_route)),
        Route("/v1/models", wrap(models)),
        Route("/v1/chat/completions", wrap(chat_completions), methods=["POST"]),
        Route("/v1/completions", wrap(completions), methods=["POST"]),
        Route("/v1/embeddings", wrap(embeddings), methods=["POST"]),
        Route("/static/{name:path}", static),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})
    app.state.worker = worker
    return Guard(app, allowed_hosts, api_key)


async def _watch_disconnect(request: Request, cancel: CancelFlag) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class _ChatShape:
    def __init__(self, model, params, n_prompt):
        self.id, self.model, self.created = api.new_id("chatcmpl"), model, api.now()
        self.stream, self.include_usage, self.n_prompt = params.stream, params.include_usage, n_prompt

    def _chunk(self, delta, finish=None):
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def first(self):
        return self._chunk({"role": "assistant", "content": ""})

    def delta(self, text):
        return self._chunk({"content": text})

    def last(self, result):
        end = self._chunk({}, api.finish_reason(result))
        end["timings"] = api.timings(result)
        out = [end]
        if self.include_usage:
            out.append({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [],
                        "usage": api.usage(result.prompt_tokens, result.completion_tokens)})
        return out

    def final(self, result):
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": api.finish_reason(result)}],
                "usage": api.usage(result.prompt_tokens, result.completion_tokens),
                "timings": api.timings(result)}


class _CompletionShape(_ChatShape):
    def __init__(self, model, params, n_prompt):
        super().__init__(model, params, n_prompt)
        self.id = api.new_id("cmpl")

    def _chunk(self, text, finish=None):
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    def first(self):
        return self._chunk("")

    def delta(self, text):
        return self._chunk(text)

    def last(self, result):
        end = self._chunk("", api.finish_reason(result))
        end["timings"] = api.timings(result)
        if self.include_usage:
            end["usage"] = api.usage(result.prompt_tokens, result.completion_tokens)
        return [end]

    def final(self, result):
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": result.text, "logprobs": None,
                             "finish_reason": api.finish_reason(result)}],
                "usage": api.usage(result.prompt_tokens, result.completion_tokens)}


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


class ServerThread:
    """uvicorn on an already-bound socket, in a thread (the chat may own the foreground)."""

    def __init__(self, app, sock: socket.socket):
        import uvicorn

        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
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
