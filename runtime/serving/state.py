"""What a request needs before it can queue for the model, done off the event loop: its body
read (capped) and parsed, the chat template rendered, the prompt tokenized, the sampling settings
built (ServerState, in the prep pool's threads)."""

from __future__ import annotations

import asyncio
import json
import queue
import threading

from starlette.requests import ClientDisconnect, Request

from . import parsing
from ..prompts import fitting, reasoning
from ..prompts import tools
from .errors import ApiError
from ..inference.engine import Engine
from ..inference.sampling import Sampling
from ..host.bindings import last_error
from ..errors import ContextOverflowError, TemplateError
from .guard import MAX_BODY
from .errors import api_error

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
    scheduler, the chat template and what it can do, and the preparation of each kind of request:
    parsing, template rendering and tokenizing, run in the prep pool, never on the event loop."""

    def __init__(self, settings, scheduler, template=None, info: dict | None = None):
        self.settings, self.scheduler, self.template = settings, scheduler, template
        self.engine: Engine = scheduler.engine
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

    def sampling_for(self, p: parsing.GenParams, stops) -> Sampling:
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
            lora=None if p.lora is None else self.lora_scales(p.lora, "lora"),
            **{**s.llama_sampling(), **(p.llama or {})},
        )

    def lora_scales(self, pairs: list[tuple[int, float]], param: str) -> tuple:
        """llama-server's reading of an adapter list: the adapters it names at their scales, every
        other one at 0; an id the bundle has no adapter for is a 400."""
        n = len(getattr(self.engine, "adapters", ()))
        scales = [0.0] * n
        for ident, scale in pairs:
            if not 0 <= ident < n:
                have = f"ids 0 to {n - 1}" if n else "none"
                raise ApiError(400, f"'{param}': invalid adapter id {ident} (this bundle's adapters: {have}; "
                               "GET /lora-adapters lists them)", param, "invalid_value")
            scales[ident] = scale
        return tuple(scales)

    def check_sampling(self, params: parsing.GenParams) -> None:
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
            raise api_error(exc, param) from None
        if not tokens:
            raise ApiError(400, "the prompt is empty", "prompt", "invalid_value")
        return tokens

    def render_chat(self, body: dict) -> tuple[parsing.GenParams, str]:
        """A chat request's parameters and its prompt as the template renders it."""
        parsing.check_fields(body, parsing.CHAT_FIELDS, "chat completions")
        params = parsing.parse_common(body)
        params.logprobs = parsing.parse_logprobs(body, chat=True)
        try:
            spec = tools.parse(body)
            if spec is not None:
                spec.style = self.tool_style
                if spec.active and params.grammar:
                    raise ApiError(400, "give either tools or a JSON response_format/grammar, not both", "tools",
                                   "invalid_value")
                params.grammar = tools.grammar(spec) if spec.active else params.grammar
        except tools.ToolError as exc:
            raise api_error(exc) from None
        params.tools = spec
        messages = parsing.parse_messages(body)
        if self.settings.system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.settings.system})
        # The rendered prompt holds every message: when their text alone cannot fit the context,
        # say so before the template renders 40,000 turns (issue 8.7); unless the request lets
        # the oldest turns go (then they go before anything is rendered).
        if not params.truncate:
            try:
                self.engine.check_text_fits(fitting.text_bytes(messages))
            except ContextOverflowError as exc:
                raise api_error(exc, "messages") from None
        native = spec is not None and spec.active and spec.style != "generic"
        try:
            thinking = reasoning.thinking_wanted(body)
        except reasoning.ReasoningError as exc:
            raise api_error(exc) from None
        # chat_template_kwargs go to the template as variables, as llama-server passes them.
        variables = dict(body.get("chat_template_kwargs") or {})
        taken = next((k for k in variables if k in _RENDER_ARGS), None)
        if taken:
            raise ApiError(400, f"'chat_template_kwargs.{taken}' is set by the server, not the request",
                           "chat_template_kwargs", "invalid_value")
        variables.update(reasoning.template_switch(self.source, self.settings.think, thinking))

        def render(ms):
            return self.template.render(tools.for_template(ms, spec, self.object_arguments),
                                        tools=spec.wanted() if native else None, **variables)

        try:
            if params.truncate:  # the oldest turns left out until the prompt leaves room to answer
                n_ctx = self.engine.n_ctx
                room = fitting.answer_room(n_ctx, params.max_tokens or self.settings.max_tokens)
                messages, params.turns_left_out = fitting.fit(
                    messages, lambda ms: len(self.engine.tokenize_prompt(render(ms))), n_ctx - room,
                    max_bytes=self.engine.text_limit())
            text = render(messages)
        except TemplateError as exc:
            raise api_error(exc, "messages") from None
        except ContextOverflowError as exc:
            raise api_error(exc, "messages") from None
        if self.thinks:
            params.think = reasoning.starts_inside(text)
        return params, text

    def prepare_chat(self, body: dict) -> tuple[parsing.GenParams, list[int]]:
        params, text = self.render_chat(body)
        self.check_sampling(params)
        return params, self.tokens_for(text, raw=False)

    def prepare_completion(self, body: dict) -> tuple[parsing.GenParams, list[int]]:
        parsing.check_fields(body, parsing.COMPLETION_FIELDS, "completions")
        params = parsing.parse_common(body)
        params.logprobs = parsing.parse_logprobs(body, chat=False)
        self.check_sampling(params)
        return params, self.tokens_for(parsing.parse_prompt(body), raw=True)

    def prepare_embeddings(self, body: dict) -> tuple[list, str]:
        inputs, fmt = parsing.parse_embedding_input(body)
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
