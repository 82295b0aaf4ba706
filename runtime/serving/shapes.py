"""The response shapes: how a Result becomes an OpenAI chat completion, a legacy completion or a
Responses object, answered once or streamed as events (the Shape protocol, shapes.Shape)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Protocol

from ..prompts import reasoning, tools
from .errors import ApiError


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage block; cached_tokens: prompt tokens found computed, not decoded again."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def timings(result) -> dict:
    """llama-server's timings block; the chat page shows tokens/s from it."""
    gen = result.completion_tokens
    return {
        "cache_n": result.cached_tokens,
        "prompt_n": result.prompt_tokens - result.cached_tokens,
        "prompt_ms": result.prompt_seconds * 1000,
        "predicted_n": gen,
        "predicted_ms": result.decode_seconds * 1000,
        "predicted_per_second": gen / result.decode_seconds if result.decode_seconds > 0 else 0.0,
    }


def finish_reason(result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


# Accepted and not acted on (listed in the README): they describe the caller or ask the server to
# store things, and a local server has nothing to do with either. `model` is any name (one model
# is served); `cache_prompt` (llama-server's) is what this server always does.


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _piece_text(piece: bytes) -> str:
    return piece.decode("utf-8", "replace")


def chat_logprob(e) -> dict:
    """One token as OpenAI's chat API gives it (ChatCompletionTokenLogprob)."""
    return {"token": _piece_text(e.piece), "logprob": e.logprob, "bytes": list(e.piece),
            "top_logprobs": [{"token": _piece_text(p), "logprob": v, "bytes": list(p)} for _, p, v in e.top]}


def completion_logprobs(entries, top: int | None) -> dict | None:
    """Tokens as the legacy completions API gives them (offsets within the generated text)."""
    if entries is None or top is None:
        return None
    return {"tokens": [_piece_text(e.piece) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_piece_text(p): v for _, p, v in e.top} for e in entries] if top else None,
            "text_offset": [e.start for e in entries]}


class Shape(Protocol):
    """What runtime.serving.streaming needs of a response shape: one per endpoint (ChatShape,
    CompletionShape, ResponsesShape), made per request. Streamed: first() once, delta() for each
    piece of text (or of log-probabilities), last() at the end, each event written with sse(),
    error() for a failure after the stream began, end_of_stream after everything. Answered once:
    final(). Events are dicts (or lists of them); None means nothing to send."""

    id: str
    model: str
    created: int
    stream: bool
    include_usage: bool
    n: int
    chunk_object: str  # the `object` of a streamed usage chunk
    end_of_stream: str

    def first(self): ...

    def delta(self, text: str, logprobs=None): ...

    def last(self, result) -> list: ...

    def final(self, result) -> dict: ...

    def sse(self, event: dict) -> str: ...

    def error(self, exc: ApiError) -> dict: ...


class ChatShape:
    """POST /v1/chat/completions: the answer (first/delta/last when streamed, final when not),
    with the thinking apart and tool calls parsed where the request asks."""

    chunk_object = "chat.completion.chunk"
    end_of_stream = "data: [DONE]\n\n"

    def __init__(self, model, params, n_prompt):
        self.id, self.model, self.created = new_id("chatcmpl"), model, now()
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
            choice["logprobs"] = {"content": [chat_logprob(e) for e in logprobs], "refusal": None}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    def sse(self, event: dict) -> str:
        return sse(event)

    def error(self, exc: ApiError) -> dict:
        return exc.body()

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
        return message, "tool_calls" if calls else finish_reason(result)

    def last(self, result):
        out, finish = [], finish_reason(result)
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
        end["timings"] = timings(result)
        out.append(end)
        if self.include_usage:
            out.append({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [],
                        "usage": usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)})
        return out

    def final(self, result):
        message, finish = self._answer(result) if self.tools or self.think is not None else (
            {"role": "assistant", "content": result.text}, finish_reason(result))
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message,
                             "logprobs": None if result.logprobs is None else {
                                 "content": [chat_logprob(e) for e in result.logprobs], "refusal": None},
                             "finish_reason": finish}],
                "usage": usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
                "timings": timings(result)}


class CompletionShape(ChatShape):
    """POST /v1/completions: text choices."""

    chunk_object = "text_completion"

    def __init__(self, model, params, n_prompt):
        super().__init__(model, params, n_prompt)
        self.id = new_id("cmpl")

    def _chunk(self, text, finish=None, logprobs=None):
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    def first(self):
        return self._chunk("")

    def delta(self, text, logprobs=None):
        return self._chunk(text, logprobs=completion_logprobs(logprobs, self.logprobs)
                           if self.logprobs is not None else None)

    def last(self, result):
        end = self._chunk("", finish_reason(result))
        end["timings"] = timings(result)
        if self.include_usage:
            end["usage"] = usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
        return [end]

    def final(self, result):
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": result.text,
                             "logprobs": completion_logprobs(result.logprobs, self.logprobs),
                             "finish_reason": finish_reason(result)}],
                "usage": usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)}


class ResponsesShape:
    """POST /v1/responses: output items (a message of output text; with tools, function_call items
    too); streamed as OpenAI's typed events (`event:` lines, a sequence number each, no [DONE]).
    With tools the answer is parsed for calls once it is whole, so its items go out at the end."""

    chunk_object = "response"
    end_of_stream = ""

    def __init__(self, model, params, n_prompt, body):
        self.id, self.model, self.created = new_id("resp"), model, now()
        self.item = new_id("msg")
        self.stream, self.include_usage, self.n_prompt, self.n, self.logprobs = params.stream, False, n_prompt, 1, None
        self.body, self.seq, self.text = body, 0, []
        spec = getattr(params, "tools", None)
        self.tools = spec if spec is not None and spec.active else None
        self._items = None

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

    @staticmethod
    def _function_call(call: dict, arguments: str | None = None, status: str = "completed") -> dict:
        fn = call["function"]
        return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"), "call_id": call["id"],
                "name": fn["name"], "arguments": fn["arguments"] if arguments is None else arguments,
                "status": status}

    def _output(self, result) -> list[dict]:
        """The output items of a finished answer (parsed once: the call ids stay the same)."""
        if self._items is None:
            done = "completed" if self._status(result) == "completed" else "incomplete"
            content, calls = tools.parse_answer(result.text, self.tools) if self.tools else (result.text, [])
            items = [self._message(content, done)] if content or not calls else []
            self._items = items + [self._function_call(c) for c in calls]
        return self._items

    def _response(self, status: str, result=None) -> dict:
        b = self.body
        fmt = (b.get("text") or {}).get("format") or {"type": "text"}
        out = {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
               "incomplete_details": None, "instructions": b.get("instructions"),
               "max_output_tokens": b.get("max_output_tokens"), "model": self.model, "output": [],
               "parallel_tool_calls": b.get("parallel_tool_calls", True), "previous_response_id": None,
               "reasoning": None, "store": False, "temperature": b.get("temperature"), "text": {"format": fmt},
               "tool_choice": b.get("tool_choice", "auto"), "tools": b.get("tools") or [], "top_p": b.get("top_p"),
               "truncation": b.get("truncation", "disabled"), "usage": None, "metadata": b.get("metadata") or {}}
        if result is not None:
            out["output"] = self._output(result)
            out["usage"] = {"input_tokens": result.prompt_tokens, "input_tokens_details": {"cached_tokens": result.cached_tokens},
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
        events = [{"type": "response.created", "response": pending},
                  {"type": "response.in_progress", "response": pending}]
        if self.tools:
            return events
        return events + [
            {"type": "response.output_item.added", "output_index": 0, "item": self._message(None, "in_progress")},
            {"type": "response.content_part.added", "item_id": self.item, "output_index": 0,
             "content_index": 0, "part": self._part("")}]

    def delta(self, text, logprobs=None) -> dict | None:
        if self.tools:
            return None
        self.text.append(text)
        return self._text_delta(text)

    def _text_delta(self, text: str, index: int = 0) -> dict:
        return {"type": "response.output_text.delta", "item_id": self.item, "output_index": index,
                "content_index": 0, "delta": text, "logprobs": []}

    def _message_end(self, item: dict, index: int) -> list:
        text = item["content"][0]["text"] if item["content"] else ""
        return [{"type": "response.output_text.done", "item_id": self.item, "output_index": index,
                 "content_index": 0, "text": text, "logprobs": []},
                {"type": "response.content_part.done", "item_id": self.item, "output_index": index,
                 "content_index": 0, "part": self._part(text)},
                {"type": "response.output_item.done", "output_index": index, "item": item}]

    def last(self, result) -> list:
        status = self._status(result)
        items = self._output(result)
        out = []
        for i, item in enumerate(items):
            if item["type"] == "message" and not self.tools:
                out += self._message_end(item, i)
            elif item["type"] == "message":
                text = item["content"][0]["text"] if item["content"] else ""
                out += [{"type": "response.output_item.added", "output_index": i,
                         "item": dict(item, status="in_progress", content=[])},
                        {"type": "response.content_part.added", "item_id": self.item, "output_index": i,
                         "content_index": 0, "part": self._part("")},
                        self._text_delta(text, i), *self._message_end(item, i)]
            else:
                out += [{"type": "response.output_item.added", "output_index": i,
                         "item": dict(item, arguments="", status="in_progress")},
                        {"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": i,
                         "delta": item["arguments"]},
                        {"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": i,
                         "name": item["name"], "arguments": item["arguments"]},
                        {"type": "response.output_item.done", "output_index": i, "item": item}]
        return out + [{"type": f"response.{status}", "response": self._response(status, result)}]

    def error(self, exc: ApiError) -> dict:
        return {"type": "error", "code": exc.code, "message": exc.message, "param": None}

    def final(self, result) -> dict:
        return self._response(self._status(result), result)
