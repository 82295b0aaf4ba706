"""OpenAI-shaped requests: validation of the fields we honour, clear 400s for the ones we
cannot. No web framework in here; the answers' shapes are in shapes.py."""

from __future__ import annotations

from dataclasses import dataclass

from ..inference.sampling import LLAMA_SAMPLING, sampler_order, sampler_problems
from ..prompts import structured
from .errors import ApiError


def _num(body: dict, name: str, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind}, got {type(value).__name__}", name, "invalid_type")
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name, "invalid_value")
    return value


@dataclass
class GenParams:
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: list
    stream: bool
    include_usage: bool
    frequency_penalty: float
    presence_penalty: float
    grammar: str | None = None  # GBNF from response_format or the `grammar` extension field
    logit_bias: dict = None  # token id -> bias
    n: int = 1  # choices to generate (decoded side by side when slots are free)
    logprobs: int | None = None  # log-probabilities wanted: how many alternatives per token
    tools: object = None  # runtime.prompts.tools.ToolSpec of a chat request with tools
    think: bool | None = None  # reasoning template: whether the answer starts inside <think>
    top_k: int | None = None  # llama.cpp's sampling fields (llama-server takes them too)
    repeat_penalty: float | None = None
    lora: list | None = None  # llama-server's per-request adapters: [(id, scale)], the others at 0
    llama: dict = None  # llama.cpp's other sampling fields given (Sampling's names): min_p, samplers, …
    truncate: bool = False  # `truncation: "auto"`: a conversation longer than the context loses its oldest turns
    turns_left_out: int = 0  # how many it lost


MAX_TOP_LOGPROBS = 20  # chat (OpenAI's limit); legacy completions allow 5


def parse_logprobs(body: dict, chat: bool) -> int | None:
    """Chat: `logprobs: true` and `top_logprobs` 0..20 (which needs logprobs). Completions:
    `logprobs` 0..5, the number of alternatives. None when not asked for."""
    n_probs = _num(body, "n_probs", 0, MAX_TOP_LOGPROBS, integer=True)  # llama.cpp's name
    if n_probs and body.get("logprobs") is None:
        return n_probs
    if chat:
        want = body.get("logprobs")
        if want is not None and not isinstance(want, bool):
            raise ApiError(400, f"'logprobs' must be a boolean, got {type(want).__name__}", "logprobs",
                           "invalid_type")
        top = _num(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
        if top is not None and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs' set to true", "top_logprobs", "invalid_value")
        return (top or 0) if want else None
    return _num(body, "logprobs", 0, 5, integer=True)


# Fields OpenAI accepts that this server cannot honour: rejected with a 400, as OpenAI does for
# values it does not support, rather than silently ignored.
_UNSUPPORTED = {
    "functions": lambda v: bool(v),
    "audio": lambda v: v is not None,
    "prediction": lambda v: v is not None,
    "best_of": lambda v: v not in (None, 1),
    "echo": lambda v: bool(v),
    "suffix": lambda v: bool(v),
}


def parse_common(body: dict) -> GenParams:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_type")
    for name, unsupported in _UNSUPPORTED.items():
        if name in body and unsupported(body[name]):
            raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    n = _num(body, "n", 1, MAX_N, integer=True) or 1
    grammar = parse_response_format(body)
    max_tokens = _num(body, "max_completion_tokens", 1, 10**7, integer=True)
    if max_tokens is None:
        max_tokens = _num(body, "max_tokens", 1, 10**7, integer=True)
    if max_tokens is None and body.get("n_predict") is not None:  # llama.cpp's name; -1: no limit
        max_tokens = _num(body, "n_predict", -1, 10**7, integer=True) or None
    llama = parse_llama_sampling(body)
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [_text(stop, "stop")]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "stop", "invalid_type")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream", "invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    return GenParams(
        max_tokens=max_tokens,
        temperature=_num(body, "temperature", 0, 2),
        top_p=_num(body, "top_p", 0, 1),
        seed=_num(body, "seed", -(2**63), 2**63 - 1, integer=True),
        stop=stops,
        stream=stream,
        include_usage=bool(opts.get("include_usage")),
        frequency_penalty=_num(body, "frequency_penalty", -2, 2) or 0.0,
        presence_penalty=_num(body, "presence_penalty", -2, 2) or 0.0,
        grammar=grammar,
        logit_bias=parse_logit_bias(body),
        n=n,
        top_k=_num(body, "top_k", 0, 10**6, integer=True),
        repeat_penalty=_num(body, "repeat_penalty", 0, 10),
        lora=parse_lora(body["lora"], "lora") if body.get("lora") is not None else None,
        llama=llama,
        truncate=parse_truncation(body),
    )


def parse_truncation(body: dict) -> bool:
    """`truncation` (the Responses API's field, taken on chat too): "auto" leaves out the oldest
    turns of a conversation longer than the context; "disabled" (the default) answers 400."""
    value = body.get("truncation")
    if value not in (None, "auto", "disabled"):
        raise ApiError(400, "'truncation' must be 'auto' or 'disabled'", "truncation", "invalid_value")
    return value == "auto"


_INT_SAMPLING = {"dry_allowed_length", "dry_penalty_last_n", "mirostat"}
MAX_BREAKERS = 32


def parse_llama_sampling(body: dict) -> dict:
    """llama.cpp's sampling fields, named and checked as llama-server takes them, as Sampling
    fields: {"min_p": 0.1, "samplers": ("top_k", "temperature"), …} for those given."""
    out = {}
    for name in LLAMA_SAMPLING:
        if body.get(name) is not None:
            out[name] = _num(body, name, -1e9, 1e9, integer=name in _INT_SAMPLING)
    problems = sampler_problems(out)
    if problems:
        name = problems[0].split("=", 1)[0]
        raise ApiError(400, problems[0], name, "invalid_value")
    if body.get("samplers") is not None:
        try:
            out["samplers"] = sampler_order(body["samplers"])
        except ValueError as exc:
            raise ApiError(400, f"'samplers': {exc}", "samplers", "invalid_value") from None
    breakers = body.get("dry_sequence_breakers")
    if breakers is not None:
        if not isinstance(breakers, list) or len(breakers) > MAX_BREAKERS or \
                not all(isinstance(b, str) and 0 < len(b) <= 64 for b in breakers):
            raise ApiError(400, f"'dry_sequence_breakers' must be a list of at most {MAX_BREAKERS} non-empty "
                           "strings", "dry_sequence_breakers", "invalid_type")
        out["dry_sequence_breakers"] = tuple(_text(b, "dry_sequence_breakers") for b in breakers)
    if body.get("ignore_eos") is not None:
        if not isinstance(body["ignore_eos"], bool):
            raise ApiError(400, "'ignore_eos' must be a boolean", "ignore_eos", "invalid_type")
        out["ignore_eos"] = body["ignore_eos"]
    return out


MAX_LORA_SCALE = 1000.0


def parse_lora(value, param: str) -> list[tuple[int, float]]:
    """llama-server's adapter list: [{"id": 0, "scale": 0.5}, ...] (ids are checked against the
    bundle's adapters by the caller)."""
    import math

    if not isinstance(value, list) or len(value) > 1024:
        raise ApiError(400, f"'{param}' must be a list of objects with 'id' and 'scale' fields", param, "invalid_type")
    out = []
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(item, dict) or set(item) - {"id", "scale"}:
            raise ApiError(400, f"{where} must be an object with 'id' and 'scale' fields", where, "invalid_type")
        ident, scale = item.get("id"), item.get("scale", 0.0)
        if not isinstance(ident, int) or isinstance(ident, bool):
            raise ApiError(400, f"{where}.id must be an adapter id (an integer)", where, "invalid_type")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or abs(scale) > MAX_LORA_SCALE:
            raise ApiError(400, f"{where}.scale must be a finite number of at most {MAX_LORA_SCALE:g}", where,
                           "invalid_value")
        out.append((ident, float(scale)))
    return out


MAX_N = 16
MAX_GRAMMAR_BYTES = 256 * 1024


def parse_response_format(body: dict) -> str | None:
    """response_format (OpenAI: text, json_object, json_schema) or `grammar` (llama.cpp's
    extension, GBNF) -> the GBNF the grammar sampler enforces, or None."""
    fmt = body.get("response_format")
    grammar = body.get("grammar")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise ApiError(400, "'grammar' must be a non-empty GBNF string", "grammar", "invalid_type")
        if len(grammar.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES:
            raise ApiError(400, f"'grammar' is longer than {MAX_GRAMMAR_BYTES} bytes", "grammar", "invalid_value")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise ApiError(400, "give either 'grammar' or a JSON 'response_format', not both", "grammar",
                           "invalid_value")
        return _text(grammar, "grammar")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return structured.any_json_grammar()
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError(400, "response_format.json_schema must be an object with a 'schema' object",
                           "response_format", "invalid_type")
        try:
            return structured.schema_grammar(spec.get("schema") or {})
        except structured.SchemaError as exc:
            raise ApiError(400, str(exc), "response_format", "invalid_value") from None
    raise ApiError(400, "response_format.type must be 'text', 'json_object' or 'json_schema'", "response_format",
                   "unsupported_value")


def parse_logit_bias(body: dict) -> dict:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}; -100 bans the token."""
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 1024:
        raise ApiError(400, "'logit_bias' must be an object of at most 1024 token ids", "logit_bias", "invalid_type")
    out = {}
    for key, bias in value.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise ApiError(400, f"logit_bias key {str(key)[:20]!r} is not a token id", "logit_bias",
                           "invalid_value") from None
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ApiError(400, "logit_bias values must be numbers from -100 to 100", "logit_bias", "invalid_value")
        out[tok] = float("-inf") if bias <= -100 else float(bias)
    return out


def _text(value: str, param: str) -> str:
    """A string from a request that llama.cpp can take: valid Unicode (JSON can carry lone
    surrogates, which no UTF-8 text holds)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{param}' is not valid Unicode text (it holds a lone surrogate)", param,
                       "invalid_value") from None
    return value


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", f"messages[{i}]", "invalid_type")
        role = m["role"]
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role '{role}' is not one of system, user, assistant, tool",
                           f"messages[{i}].role", "invalid_value")
        content = m.get("content")
        calls = _tool_calls(m, i) if role == "assistant" and m.get("tool_calls") else None
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported by this model",
                                   f"messages[{i}].content", "unsupported_content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           f"messages[{i}].content", "invalid_type")
        msg = {"role": role, "content": _text(content, f"messages[{i}].content")}
        if calls:
            msg["tool_calls"] = calls
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _tool_calls(m: dict, i: int) -> list[dict]:
    """An assistant message's earlier tool calls: [{"id", "type", "function": {"name", "arguments"}}]."""
    calls = m["tool_calls"]
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise ApiError(400, f"{where} must be a list", where, "invalid_type")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments", "{}"), (str, dict)):
            raise ApiError(400, f"{where}[{j}] must have a function with a name and arguments", f"{where}[{j}]",
                           "invalid_type")
        out.append({"id": str(c.get("id") or f"call_{j}"), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn.get("arguments", "{}")}})
    return out


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


MAX_TOKEN_IDS = 1 << 20


def parse_prompt(body: dict) -> str | list[int]:
    """A string, a list of one string, or token ids (a list of ints, or a list of one such list)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _token_ids(prompt[0])):
        prompt = prompt[0]
    if _token_ids(prompt):
        if len(prompt) > MAX_TOKEN_IDS:
            raise ApiError(400, f"'prompt' holds more than {MAX_TOKEN_IDS} token ids", "prompt", "invalid_value")
        return prompt
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string, token ids, or a list of one of them", "prompt", "invalid_type")
    return _text(prompt, "prompt")


def parse_embedding_input(body: dict) -> tuple[list, str]:
    """Strings or token ids: a string, a list of strings, a list of ints, a list of lists of ints."""
    value = body.get("input")
    if isinstance(value, str) or _token_ids(value):
        inputs = [value]
    elif isinstance(value, list) and value and (all(isinstance(v, str) for v in value)
                                                or all(_token_ids(v) for v in value)):
        inputs = value
    else:
        raise ApiError(400, "'input' must be a string, a list of strings, token ids, or a list of token-id lists",
                       "input", "invalid_type")
    if any(not v for v in inputs):
        raise ApiError(400, "'input' must not contain empty strings", "input", "invalid_value")
    if sum(len(v) for v in inputs if isinstance(v, list)) > MAX_TOKEN_IDS:
        raise ApiError(400, f"'input' holds more than {MAX_TOKEN_IDS} token ids", "input", "invalid_value")
    for v in inputs:
        if isinstance(v, str):
            _text(v, "input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", "encoding_format", "invalid_value")
    return inputs, fmt


IGNORED = ("model", "metadata", "store", "user", "service_tier", "safety_identifier", "prompt_cache_key",
           "cache_prompt", "verbosity", "prompt_cache_retention")
LLAMA_FIELDS = {*LLAMA_SAMPLING, "samplers", "dry_sequence_breakers", "ignore_eos", "n_predict", "n_probs"}
_SAMPLING = {"temperature", "top_p", "top_k", "repeat_penalty", "frequency_penalty", "presence_penalty", "seed",
             "stop", "max_tokens", "logit_bias", "n", "stream", "stream_options", "response_format", "grammar",
             "logprobs", "lora", *LLAMA_FIELDS}
CHAT_FIELDS = {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
               "truncation",
               "reasoning_effort", "chat_template_kwargs", "modalities", *_SAMPLING, *IGNORED, *_UNSUPPORTED}
COMPLETION_FIELDS = {"prompt", *_SAMPLING, *IGNORED, *_UNSUPPORTED}


def check_fields(body: dict, known: set, what: str) -> None:
    """A field this server does not know is a 400 that names it, never silently dropped."""
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"'{unknown[0]}' is not a field of the {what} API this server knows", unknown[0],
                       "unknown_parameter")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise ApiError(400, "only 'modalities': [\"text\"] is supported by this model", "modalities",
                       "unsupported_parameter")


# -- the Responses API (POST /v1/responses), translated to a chat request ----------------------

# Accepted and not acted on (listed in the README): nothing is stored, so there is nothing to
# retrieve later; the others describe the caller, not the answer.
RESPONSES_IGNORED = ("store", "metadata", "user", "service_tier",
                     "safety_identifier", "prompt_cache_key", "prompt_cache_retention")
_RESPONSES_UNSUPPORTED = {
    "previous_response_id": lambda v: v is not None,
    "conversation": lambda v: v is not None,
    "background": lambda v: bool(v),
    "prompt": lambda v: v is not None,
    "reasoning": lambda v: v is not None,
    "include": lambda v: bool(v),
    "max_tool_calls": lambda v: v is not None,
    "top_logprobs": lambda v: v not in (None, 0),
}
_RESPONSES_PASSED = ("temperature", "top_p", "lora", "top_k", "repeat_penalty", "seed", "frequency_penalty",
                     "presence_penalty", "stop", "truncation", *sorted(LLAMA_FIELDS - {"n_probs"}))
_RESPONSES_KNOWN = {"model", "input", "instructions", "max_output_tokens", "stream", "text", "tools", "tool_choice",
                    "parallel_tool_calls",
                    *_RESPONSES_PASSED, *RESPONSES_IGNORED, *_RESPONSES_UNSUPPORTED}
_INPUT_PART_TYPES = ("input_text", "output_text", "text")


def responses_to_chat(body: dict) -> dict:
    """A Responses API request as the chat request it asks for ({"messages", "max_tokens",
    "temperature", "top_p", "stream", "response_format"}), every field checked; 400s name the
    Responses field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_type")
    for name, unsupported in _RESPONSES_UNSUPPORTED.items():
        if name in body and unsupported(body[name]):
            raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    check_fields(body, _RESPONSES_KNOWN, "Responses")
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ApiError(400, "'instructions' must be a string", "instructions", "invalid_type")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        if not items.strip():
            raise ApiError(400, "'input' is empty", "input", "invalid_value")
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise ApiError(400, "'input' must be a string or a non-empty list of messages", "input", "invalid_type")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else type(item).__name__
        if kind == "function_call":
            call = _responses_call(item, where)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            continue
        if kind == "function_call_output":
            messages.append(_responses_call_output(item, where))
            continue
        if kind == "reasoning":  # a reasoning item handed back: its text was never shown; nothing to add
            continue
        if kind != "message":
            raise ApiError(400, f"{where}: only messages, function_call and function_call_output items are "
                           f"supported (not {kind!r})", where, "unsupported_content")
        messages.append({"role": item.get("role"), "content": _responses_text(item.get("content"), where)})
    chat = {"messages": messages, "stream": body.get("stream", False)}
    if body.get("tools"):
        chat["tools"] = _responses_tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _responses_tool_choice(body["tool_choice"])
    if body.get("parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = _num(body, "max_output_tokens", 1, 10**7, integer=True)
    for name in _RESPONSES_PASSED:
        if body.get(name) is not None:
            chat[name] = body[name]
    text = body.get("text")
    if text is not None:
        fmt = text.get("format") if isinstance(text, dict) else None
        if not isinstance(text, dict) or (fmt is not None and not isinstance(fmt, dict)):
            raise ApiError(400, "'text' must be an object with an optional 'format' object", "text", "invalid_type")
        if fmt and fmt.get("type") == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.get("name"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
        elif fmt:
            chat["response_format"] = fmt
    return chat


def _responses_text(content, where: str):
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in _INPUT_PART_TYPES \
                    or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.content[{j}]: only text parts are supported by this model",
                               f"{where}.content", "unsupported_content")
            texts.append(part["text"])
        return "".join(texts)
    return content


def _responses_call(item: dict, where: str) -> dict:
    """A function_call item given back (the model's earlier call) as a chat tool call."""
    name, args, call_id = item.get("name"), item.get("arguments", "{}"), item.get("call_id")
    if not isinstance(name, str) or not isinstance(args, str) or not isinstance(call_id, str):
        raise ApiError(400, f"{where}: a function_call item needs 'call_id', 'name' and 'arguments' (a string)",
                       where, "invalid_type")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def _responses_call_output(item: dict, where: str) -> dict:
    """A function_call_output item (the caller ran the tool) as a chat `tool` message."""
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str):
        raise ApiError(400, f"{where}: a function_call_output item needs its 'call_id'", where, "invalid_type")
    if isinstance(output, list):
        output = _responses_text(output, where)
    if not isinstance(output, str):
        raise ApiError(400, f"{where}.output must be a string or a list of text parts", where, "invalid_type")
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _responses_tools(tools) -> list:
    """Responses' function tools ({"type": "function", "name", "description", "parameters"}) as chat
    tools; the hosted tools (web search, files, computer use) are not something a local model has."""
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list", "tools", "invalid_type")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise ApiError(400, f"tools[{i}]: only function tools are supported by this server (not {kind!r})",
                           f"tools[{i}]", "unsupported_value")
        fn = {"name": tool.get("name"), "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
        if tool.get("description") is not None:
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _responses_tool_choice(choice):
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ApiError(400, "'tool_choice' must be auto, none, required or {\"type\": \"function\", \"name\": …}",
                   "tool_choice", "invalid_value")


# --- response shapes: what a generation's result looks like to each endpoint -------------------
