"""The local web chat and OpenAI-compatible API: Starlette + uvicorn, built by create_app().
The endpoints, one function each; add a route to ROUTES. Each reads its state from the app
(ServerState), prepares its request off the event loop, and answers through runtime.serving.streaming."""

from __future__ import annotations

from pathlib import Path
import asyncio
import json
import base64
import struct

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

from . import anthropic
from . import parsing
from . import shapes
from .errors import ApiError
from ..errors import ContextOverflowError, RuntimeFailure
from .guard import Guard
from .state import ServerState
from .guard import error_response
from .streaming import answer
from .state import prepared
from .metrics import prometheus_text
from .state import read_body, state_of
from ..bundlefile.layout import lora_entry
from .errors import api_error

WEB = Path(__file__).resolve().parent / "web"
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


# --- the endpoints: each reads its state from the app; add a route to ROUTES below ----------------

async def chat_completions(request: Request):
    st = state_of(request)
    params, tokens = await prepared(request, st.prepare_chat)
    return await answer(request, tokens, st.sampling_for(params, st.template.stop),
                        shapes.ChatShape(st.model_id, params, len(tokens)), params.turns_left_out)


async def responses(request: Request):
    st = state_of(request)
    params, tokens, body = await prepared(request, lambda body: (*st.prepare_chat(parsing.responses_to_chat(body)), body))
    return await answer(request, tokens, st.sampling_for(params, st.template.stop),
                        shapes.ResponsesShape(st.model_id, params, len(tokens), body), params.turns_left_out)


async def messages(request: Request):
    """POST /v1/messages: Anthropic's Messages API (runtime.serving.anthropic)."""
    st = state_of(request)

    def prepare(body):
        chat, stops = anthropic.messages_to_chat(body)
        params, tokens = st.prepare_chat(chat)
        return params, tokens, stops

    params, tokens, stops = await prepared(request, prepare)
    sampling = st.sampling_for(params, st.template.stop)
    sampling.stop = sampling.stop + stops
    return await answer(request, tokens, sampling, anthropic.MessagesShape(st.model_id, params, len(tokens), stops),
                        params.turns_left_out)


async def count_tokens(request: Request):
    """POST /v1/messages/count_tokens: the prompt's length in this model's tokens."""
    st = state_of(request)

    def prepare(body):
        chat, _ = anthropic.messages_to_chat(body, counting=True)
        _, text = st.render_chat(chat)
        try:  # counted even when it would not fit the context, unless it is far too long to count
            return st.engine.tokenize_prompt(text)
        except ContextOverflowError as exc:
            raise api_error(exc, "messages") from None

    tokens = await prepared(request, prepare)
    return JSONResponse({"input_tokens": len(tokens)})


async def completions(request: Request):
    st = state_of(request)
    params, tokens = await prepared(request, st.prepare_completion)
    return await answer(request, tokens, st.sampling_for(params, []),
                          shapes.CompletionShape(st.model_id, params, len(tokens)))


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
    jobs = [st.scheduler.submit(lambda engine, cancelled, text=text: engine.embed(text)).future for text in inputs]
    try:
        results = [await asyncio.wrap_future(job) for job in jobs]
    except ContextOverflowError as exc:
        raise api_error(exc, "input") from None
    except RuntimeFailure as exc:
        raise api_error(exc, code="embedding_failed") from None
    data = []
    for i, (vec, _) in enumerate(results):
        value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if fmt == "base64" else vec
        data.append({"object": "embedding", "index": i, "embedding": value})
    n = sum(t for _, t in results)
    return JSONResponse({"object": "list", "data": data, "model": st.model_id,
                         "usage": {"prompt_tokens": n, "total_tokens": n}})


def _model_entry(st) -> dict:
    return {"id": st.model_id, "object": "model", "created": st.info.get("created", 0), "owned_by": "bundle",
            "meta": {"backend": st.info.get("backend"), "context": st.engine.n_ctx}}


async def models(request: Request):
    return JSONResponse({"object": "list", "data": [_model_entry(state_of(request))]})


async def model(request: Request):
    """GET /v1/models/{id}: the one model, under its name (OpenAI's retrieve); any other name is a
    404 that says which one is served."""
    st = state_of(request)
    ident = request.path_params["ident"]
    if ident != st.model_id:
        raise ApiError(404, f"no model {ident[:100]!r} here: this server serves {st.model_id!r}", "model",
                       "model_not_found")
    return JSONResponse(_model_entry(st))


async def info_route(request: Request):
    st = state_of(request)
    return JSONResponse({**st.info, "context": st.engine.n_ctx, "context_overflow": st.settings.context_overflow,
                         "defaults": {"temperature": st.settings.temp, "system": st.settings.system or ""}})


async def lora_adapters(request: Request):
    """GET /lora-adapters: the packed adapters and the scales requests that name none get; POST
    (llama-server's shape, [{"id", "scale"}], the others at 0) sets those scales for the requests
    that arrive from then on."""
    st = state_of(request)
    if request.method == "POST":
        body = await read_body(request)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON", None, "invalid_json") from None
        st.scheduler.set_lora(st.lora_scales(parsing.parse_lora(data, "body"), "body"))
        return JSONResponse({"success": True})
    scales = st.scheduler.lora
    return JSONResponse([{"id": i, "name": name, "path": lora_entry(name), "scale": scales[i]}
                         for i, name in enumerate(st.engine.adapter_names)])


async def health(request: Request):
    scheduler = state_of(request).scheduler
    broken = getattr(scheduler, "broken", None)
    if broken is not None:  # --rpc: a worker was lost; the model cannot run any more
        return JSONResponse({"status": "error", "error": {"message": str(broken), "type": "worker_lost"}},
                            status_code=503)
    s = scheduler.stats
    busy = scheduler.busy_slots()
    return JSONResponse({"status": "ok", "queued": scheduler.pending(),
                         "slots": {"total": scheduler.parallel, "busy": busy},
                         "stats": {"jobs": s.finished + busy, "cancelled": s.cancelled, "skipped": s.skipped,
                                   "max_tokens_after_cancel": s.max_tokens_after_cancel}})


async def metrics(request: Request):
    return PlainTextResponse(prometheus_text(state_of(request).scheduler), media_type="text/plain; version=0.0.4")


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
    return FileResponse(path, media_type=_STATIC_TYPES.get(path.suffix), headers={
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


# Named here, not guessed from the system's tables (a Windows registry may call .js text/plain,
# and a module script under nosniff must be JavaScript).
_STATIC_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".txt": "text/plain"}


ROUTES = [
    Route("/", page),
    Route("/health", health),
    Route("/metrics", metrics),
    Route("/info", info_route),
    Route("/v1/models", models),
    Route("/v1/models/{ident:path}", model),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/responses", responses, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/messages", messages, methods=["POST"]),
    Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
    Route("/apply-template", apply_template, methods=["POST"]),
    Route("/lora-adapters", lora_adapters, methods=["GET", "POST"]),
    Route("/static/{name:path}", static),
]


async def _api_error(request, exc: ApiError):
    return error_response(exc, path=request.url.path)


async def _not_found(request, exc):
    return error_response(ApiError(404, f"no route {request.method} {request.url.path}", None, "not_found"),
                          path=request.url.path)


async def _bad_method(request, exc):
    return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}", None,
                                   "method_not_allowed"), path=request.url.path)


def create_app(settings, scheduler, *, template=None, info: dict | None = None, api_key: str | None = None,
               allowed_hosts: set[str] | None = None, allowed_origins: set[str] | None = None):
    """settings: runtime Settings (defaults for requests); scheduler: the one owner of the model
    (runtime.inference.scheduler.Scheduler, or a stand-in with its methods in tests); template: the
    ChatTemplate; info: what /info and the page show. The app, behind its Guard (hosts, origins,
    API key)."""
    app = Starlette(routes=ROUTES, exception_handlers={ApiError: _api_error, 404: _not_found, 405: _bad_method})
    app.state.bundle = ServerState(settings, scheduler, template, info)
    app.state.scheduler = scheduler
    return Guard(app, allowed_hosts, api_key, allowed_origins)
