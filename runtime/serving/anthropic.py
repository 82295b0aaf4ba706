"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens), as llama-server,
ollama and LM Studio serve it, so tools built on the Anthropic SDKs talk to a bundle: a request
becomes the chat request it asks for (messages_to_chat), and the answer takes Anthropic's shape
(MessagesShape): content blocks (text, thinking, tool_use), stop_reason, and when streamed,
Anthropic's event sequence. Errors on these paths are in Anthropic's shape (errors.anthropic_path)."""

from __future__ import annotations

import json
import uuid

from ..prompts import reasoning, tools
from .errors import ApiError

# Accepted and not acted on (listed in the README): they describe the caller or ask for hosted
# services a local model does not have.
# (cache_control: this server keeps the prompts it computed anyway; output_config.effort, speed: one
# model, one speed.)
IGNORED = ("metadata", "service_tier", "container", "context_management", "cache_control", "diagnostics",
           "inference_geo", "speed", "user_profile_id", "workspace_id")
_KNOWN = {"model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "stream",
          "tools", "tool_choice", "thinking", "output_config", *IGNORED}
_COUNT_KNOWN = {"model", "messages", "system", "tools", "tool_choice", "thinking", "output_config", "cache_control"}
MAX_STOP_SEQUENCES = 16


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param, "invalid_request_error")


def _check_known(body: dict, known: set) -> None:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise _bad(f"{unknown[0]}: Extra inputs are not permitted", unknown[0])


def _system_text(system) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                        and isinstance(b.get("text"), str) for b in system):
        return "\n\n".join(b["text"] for b in system)
    raise _bad("system: must be a string or a list of text blocks", "system")


def _tool_result_text(block: dict, where: str) -> str:
    content = block.get("content", "")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for b in content:
            if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
                raise _bad(f"{where}.content: only text blocks are supported by this model", where)
            parts.append(b["text"])
        return "\n".join(parts)
    raise _bad(f"{where}.content: must be a string or a list of text blocks", where)


def _unsupported_block(kind, where: str) -> ApiError:
    if kind in ("image", "document", "search_result"):
        return _bad(f"{where}: {kind} blocks are not supported: this model reads text only", where)
    return _bad(f"{where}: content blocks of type {kind!r} are not supported", where)


def _messages(body: dict) -> list[dict]:
    """Anthropic's messages as chat messages: tool_use blocks become an assistant's tool_calls,
    tool_result blocks become `tool` messages (before the user's own words of that turn)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise _bad(f"{where}.role: must be 'user' or 'assistant'", where)
        role, content = m["role"], m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content: must be a string or a list of content blocks", where)
        texts, calls = [], []
        for j, block in enumerate(content):
            at = f"{where}.content.{j}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue  # earlier thinking is not given back to the model (as chat templates drop it)
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("name"), str) or not isinstance(block.get("id"), str):
                    raise _bad(f"{at}: a tool_use block needs an 'id' and a 'name'", at)
                calls.append({"id": block["id"], "type": "function", "function": {
                    "name": block["name"], "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise _bad(f"{at}: a tool_result block needs its 'tool_use_id'", at)
                text = _tool_result_text(block, at)
                if block.get("is_error"):
                    text = "Error: " + text
                out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
            else:
                raise _unsupported_block(kind, at)
        if role == "assistant":
            msg = {"role": "assistant", "content": "".join(texts)}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        elif texts:
            out.append({"role": "user", "content": "".join(texts)})
    return out


def _tools(value) -> list:
    if not isinstance(value, list):
        raise _bad("tools: must be a list", "tools")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom") or "input_schema" not in tool:
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _bad(f"tools.{i}: only client tools with an input_schema are supported by this server"
                       + (f" (not {kind!r})" if kind else ""), f"tools.{i}")
        fn = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(value, chat: dict) -> None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise _bad("tool_choice: must be {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}", "tool_choice")
    if kind == "tool":
        if not isinstance(value.get("name"), str):
            raise _bad("tool_choice: {\"type\": \"tool\"} needs the tool's 'name'", "tool_choice")
        chat["tool_choice"] = {"type": "function", "function": {"name": value["name"]}}
    else:
        chat["tool_choice"] = {"any": "required"}.get(kind, kind)
    if value.get("disable_parallel_tool_use"):
        chat["parallel_tool_calls"] = False


def _thinking(value, chat: dict) -> None:
    """thinking {"type": "enabled", "budget_tokens"} or {"type": "disabled"}: reasoning models think
    or not, as with chat's reasoning switch (the budget is not enforced: listed in the README)."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise _bad("thinking: must be {\"type\": \"enabled\" | \"disabled\"}", "thinking")
    chat["chat_template_kwargs"] = {"enable_thinking": kind != "disabled"}


def _output_config(value, chat: dict) -> None:
    """output_config {"format": {"type": "json_schema", "schema"}, "effort"}: the schema becomes the
    grammar the answer must follow, as chat's response_format (effort is accepted, with no effect)."""
    if not isinstance(value, dict) or set(value) - {"format", "effort"}:
        raise _bad("output_config: must be an object with 'format' and/or 'effort'", "output_config")
    fmt = value.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise _bad("output_config.format: must be {\"type\": \"json_schema\", \"schema\": {…}}", "output_config")
    chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def messages_to_chat(body: dict, counting: bool = False) -> tuple[dict, list[str]]:
    """The chat request an Anthropic request asks for, and its stop_sequences (which Anthropic
    allows more of than chat's four, so they are applied apart)."""
    _check_known(body, _COUNT_KNOWN if counting else _KNOWN)
    messages = _messages(body)
    if body.get("system") is not None:
        messages.insert(0, {"role": "system", "content": _system_text(body["system"])})
    chat: dict = {"messages": messages}
    if not counting:
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise _bad("max_tokens: Field required: a whole number of at least 1", "max_tokens")
        chat["max_tokens"] = max_tokens
        for name in ("temperature", "top_p", "top_k", "stream"):
            if body.get(name) is not None:
                chat[name] = body[name]
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
        if body.get("tool_choice") is not None:
            _tool_choice(body["tool_choice"], chat)
    if body.get("thinking") is not None:
        _thinking(body["thinking"], chat)
    if body.get("output_config") is not None:
        _output_config(body["output_config"], chat)
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES or \
            not all(isinstance(s, str) and s for s in stops):
        raise _bad(f"stop_sequences: must be a list of at most {MAX_STOP_SEQUENCES} non-empty strings",
                   "stop_sequences")
    return chat, list(stops)


def _usage(result, n_prompt: int | None = None) -> dict:
    """Anthropic's usage: input_tokens are those decoded; those found computed (a slot's cache,
    the prompt cache) are cache_read_input_tokens, as Anthropic counts its own cache's."""
    cached = result.cached_tokens if result is not None else 0
    return {"input_tokens": (result.prompt_tokens if result is not None else n_prompt) - cached,
            "output_tokens": result.completion_tokens if result is not None else 0,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


class MessagesShape:
    """POST /v1/messages: a message of content blocks; streamed as Anthropic's events
    (message_start, content_block_start/delta/stop, message_delta, message_stop). With tools the
    answer is parsed for calls once it is whole, so its blocks go out at the end."""

    chunk_object = "message"
    end_of_stream = ""
    include_usage = False
    n = 1
    logprobs = None

    def __init__(self, model, params, n_prompt, stops: list[str]):
        self.id, self.model, self.n_prompt = "msg_" + uuid.uuid4().hex[:24], model, n_prompt
        self.stream, self.stops = params.stream, stops
        spec = getattr(params, "tools", None)
        self.tools = spec if spec is not None and spec.active else None
        self.think = getattr(params, "think", None)
        self.splitter = reasoning.Splitter(self.think) if self.think is not None else None
        self.block = -1  # the index of the open content block (-1: none yet)
        self.kind = None  # its kind: "text" or "thinking"

    def sse(self, event: dict) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    def error(self, exc: ApiError) -> dict:
        return exc.anthropic_body()

    def _message(self, content: list, stop_reason=None, stop_sequence=None, result=None) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": _usage(result, self.n_prompt)}

    def _stop(self, result, calls) -> tuple[str, str | None]:
        if calls:
            return "tool_use", None
        if result.finish_reason == "length":
            return "max_tokens", None
        if result.stop_string is not None and result.stop_string in self.stops:
            return "stop_sequence", result.stop_string
        return "end_turn", None

    def _blocks(self, result) -> tuple[list, list]:
        thought, text = (None, result.text) if self.think is None else reasoning.split(result.text, self.think)
        content, calls = tools.parse_answer(text, self.tools) if self.tools else (text, [])
        blocks = []
        if thought:
            blocks.append({"type": "thinking", "thinking": thought, "signature": ""})
        if content or not calls:
            blocks.append({"type": "text", "text": content or ""})
        for c in calls:
            try:
                arguments = json.loads(c["function"]["arguments"])
            except ValueError:
                arguments = {}
            blocks.append({"type": "tool_use", "id": "toolu_" + c["id"].removeprefix("call_"),
                           "name": c["function"]["name"], "input": arguments})
        return blocks, calls

    def final(self, result) -> dict:
        blocks, calls = self._blocks(result)
        reason, sequence = self._stop(result, calls)
        return self._message(blocks, reason, sequence, result)

    # -- streamed -----------------------------------------------------------------------------
    def first(self) -> list:
        return [{"type": "message_start", "message": self._message([])}, {"type": "ping"}]

    def _open(self, kind: str) -> list:
        out = self._close()
        self.block += 1
        self.kind = kind
        empty = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "", "signature": ""}
        return out + [{"type": "content_block_start", "index": self.block, "content_block": empty}]

    def _close(self) -> list:
        if self.kind is None:
            return []
        out = []
        if self.kind == "thinking":
            out.append({"type": "content_block_delta", "index": self.block,
                        "delta": {"type": "signature_delta", "signature": ""}})
        self.kind = None
        return out + [{"type": "content_block_stop", "index": self.block}]

    def _pieces(self, parts) -> list:
        out = []
        for kind, piece in parts:
            kind = "thinking" if kind == "reasoning" else "text"
            if not piece:
                continue
            if kind != self.kind:
                out += self._open(kind)
            delta = {"type": "text_delta", "text": piece} if kind == "text" else \
                {"type": "thinking_delta", "thinking": piece}
            out.append({"type": "content_block_delta", "index": self.block, "delta": delta})
        return out

    def delta(self, text, logprobs=None):
        if self.tools:
            return None
        parts = self.splitter.feed(text) if self.splitter is not None else [("content", text)]
        return self._pieces(parts) or None

    def last(self, result) -> list:
        if self.tools:
            blocks, calls = self._blocks(result)
            out = []
            for b in blocks:
                if b["type"] == "tool_use":
                    out += self._close()
                    self.block += 1
                    out += [{"type": "content_block_start", "index": self.block,
                             "content_block": dict(b, input={})},
                            {"type": "content_block_delta", "index": self.block,
                             "delta": {"type": "input_json_delta",
                                       "partial_json": json.dumps(b["input"], ensure_ascii=False)}},
                            {"type": "content_block_stop", "index": self.block}]
                elif b["type"] == "thinking":
                    out += self._pieces([("reasoning", b["thinking"])])
                elif b["text"]:
                    out += self._pieces([("content", b["text"])])
        else:
            calls = []
            out = self._pieces(self.splitter.finish()) if self.splitter is not None else []
        if self.block < 0:  # nothing was said: one empty text block, as Anthropic answers
            out += self._open("text")
        out += self._close()
        reason, sequence = self._stop(result, calls)
        return out + [{"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                       "usage": {"output_tokens": result.completion_tokens}},
                      {"type": "message_stop"}]
