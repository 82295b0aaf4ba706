"""Tool calling (issue 10.2): OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`.

Two ways, chosen by the model's chat template:

- **native**: the template takes a `tools` variable and teaches the model its own call syntax;
  the tools go to the template and the calls are parsed from what the model writes, in the
  format its template uses — Hermes/Qwen `<tool_call>{json}</tool_call>`, Llama 3.x JSON
  (`{"name": …, "parameters": …}`, after `<|python_tag|>` or alone), Mistral
  `[TOOL_CALLS][{…}]`. With `tool_choice` `required` or a named function, a grammar makes the
  model write exactly such calls, so even a small model returns a valid one.
- **generic** (the template knows no tools, like the demo model's): the tools are described in a
  system message, and a grammar makes the answer one JSON object, either
  `{"tool_calls": [{"name", "arguments"}]}` or (with `auto`) `{"response": "text"}`, as
  llama.cpp's server does for such templates.

Earlier turns are given back as the template expects them: an assistant message's `tool_calls`
(arguments as objects) and `tool` messages with their results; in the generic way, as text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
MAX_TOOLS = 128


class ToolError(ValueError):
    """A request's tools are malformed: (message, param)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolSpec:
    tools: list[dict]  # [{"type": "function", "function": {"name", "description", "parameters"}}]
    choice: str = "auto"  # none, auto, required, or "function"
    name: str | None = None  # the function tool_choice names
    parallel: bool = True
    style: str = "generic"  # generic, hermes, llama3, mistral
    names: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def wanted(self) -> list[dict]:
        """The tools the model may call: all, or the one tool_choice names."""
        if self.choice == "function":
            return [t for t in self.tools if t["function"]["name"] == self.name]
        return self.tools


def parse(body: dict) -> ToolSpec | None:
    """tools, tool_choice, parallel_tool_calls of a chat request; None without tools."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ToolError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if tools is None or tools == []:
        return None  # a tool_choice without tools chooses among nothing (llama-index sends it; as llama-server)
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ToolError(f"'tools' must be a list of at most {MAX_TOOLS} tools", "tools")
    out, names = [], []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{…}}}}", f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '-' or '.'",
                            f"tools[{i}].function.name")
        if name in names:
            raise ToolError(f"tools[{i}]: two tools are named {name!r}", f"tools[{i}].function.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object",
                            f"tools[{i}].function.parameters")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolError(f"tools[{i}].function.description must be a string", f"tools[{i}].function.description")
        # As llama.cpp hands tools to templates: these three keys, in this order.
        entry = {"name": name, "description": desc or "", "parameters": params}
        out.append({"type": "function", "function": entry})
        names.append(name)
    spec = ToolSpec(out, parallel=parallel, names=names)
    if choice is None or choice in ("auto", "none", "required"):
        spec.choice = choice or "auto"
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        spec.choice, spec.name = "function", choice["function"].get("name")
        if spec.name not in names:
            raise ToolError(f"tool_choice names {spec.name!r}, which is not among the tools", "tool_choice")
    else:
        raise ToolError("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": "
                        "{\"name\": …}}", "tool_choice")
    return spec


def style_of(template_source: str | None) -> str:
    """How a chat template has the model call tools: generic when it takes no `tools`."""
    src = template_source or ""
    if "tools" not in src:
        return "generic"
    if "<tool_call>" in src:
        return "hermes"
    if "[TOOL_CALLS]" in src:
        return "mistral"
    if "<|python_tag|>" in src or "ipython" in src or "<|start_header_id|>" in src:
        return "llama3"
    return "hermes"  # most tool-aware templates since Qwen 2.5 use its tags


# -- the prompt ---------------------------------------------------------------------------------


def _arguments(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _argument_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


_PROBE_MARK = "ARGUMENT_PROBE_4c1d"


def takes_object_arguments(template) -> bool:
    """Whether the chat template reads a tool call's arguments as an object (most Hugging Face
    templates: they tojson it or walk its items) or writes them as the JSON text they came as
    (Functionary's): probed once by rendering one call with object arguments, as llama.cpp does."""
    probe = [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "call00001", "type": "function", "function": {"name": "probe", "arguments": {"arg": _PROBE_MARK}}}]},
             {"role": "tool", "tool_call_id": "call00001", "content": "ok"}]
    tool = {"type": "function", "function": {"name": "probe", "description": "probe", "parameters": {
        "type": "object", "properties": {"arg": {"type": "string"}}, "required": ["arg"]}}}
    try:
        text = template.render(probe, add_generation_prompt=True, tools=[tool])
    except Exception:  # noqa: BLE001 - any failure means objects are not what it wants
        return False
    return _PROBE_MARK in text and f"{{'arg': '{_PROBE_MARK}'" not in text  # printed as a Python dict: not read


def for_template(messages: list[dict], spec: ToolSpec | None, object_arguments: bool = True) -> list[dict]:
    """The conversation as the template gets it: tool calls of earlier turns with their
    arguments as objects (what most Hugging Face templates expect) or as JSON text (templates
    that write them as they are); in the generic way, as text."""
    generic = spec is None or spec.style == "generic"
    as_args = _arguments if object_arguments else _argument_text
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        call_id = m.pop("tool_call_id", None)
        if calls:
            if generic:
                m["content"] = json.dumps({"tool_calls": [{"name": c["function"]["name"],
                                                           "arguments": _arguments(c["function"]["arguments"]),
                                                           "id": c["id"]} for c in calls]}, ensure_ascii=False)
            else:
                m["tool_calls"] = [{"id": c["id"], "type": "function",
                                    "function": {"name": c["function"]["name"],
                                                 "arguments": as_args(c["function"]["arguments"])}}
                                   for c in calls]
        if m["role"] == "tool":
            if generic:
                which = f" {call_id}" if call_id else ""
                m = {"role": "user", "content": f"Result of the tool call{which}: {m['content']}"}
            elif call_id:
                m["tool_call_id"] = call_id
        out.append(m)
    if spec is not None and spec.active and generic:
        out = _with_tool_instructions(out, spec)
    return out


def _with_tool_instructions(messages: list[dict], spec: ToolSpec) -> list[dict]:
    tools = [t["function"] for t in spec.wanted()]
    if spec.choice == "auto":
        how = ('Answer with one JSON object: {"tool_calls": [{"name": …, "arguments": {…}}]} to call tools, '
               'or {"response": "…"} to answer the user directly.')
    else:
        how = 'Answer with one JSON object: {"tool_calls": [{"name": …, "arguments": {…}}]}.'
    text = ("You can call these tools (JSON schemas of their arguments):\n"
            + json.dumps(tools, ensure_ascii=False, indent=2) + "\n" + how)
    if messages and messages[0]["role"] == "system":
        return [dict(messages[0], content=messages[0]["content"] + "\n\n" + text), *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# -- the grammar --------------------------------------------------------------------------------


def _call_schema(spec: ToolSpec, arguments_key: str = "arguments") -> dict:
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               arguments_key: t["function"]["parameters"]},
              "required": ["name", arguments_key]} for t in spec.wanted()]
    return calls[0] if len(calls) == 1 else {"oneOf": calls}


def grammar(spec: ToolSpec) -> str | None:
    """GBNF that makes the model write only what the choice allows; None for a native `auto`
    (the model writes text or calls freely, and the calls are found afterwards)."""
    if not spec.active:
        return None
    from ..host.bindings import grammar

    json_schema_to_gbnf = grammar().json_schema_to_gbnf

    call = _call_schema(spec)
    array = {"type": "array", "items": call, "minItems": 1}
    if not spec.parallel:
        array["maxItems"] = 1
    if spec.style == "generic":
        calls = {"type": "object", "properties": {"tool_calls": array}, "required": ["tool_calls"]}
        schema = calls if spec.choice != "auto" else {"oneOf": [calls, {
            "type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}]}
        return _convert(json_schema_to_gbnf, schema)
    if spec.choice == "auto":
        return None
    if spec.style == "hermes":
        one = _convert(json_schema_to_gbnf, call).replace("root ::=", "call ::=", 1)
        repeat = "" if not spec.parallel else ' ("\\n" tool-call)*'
        return one + '\ntool-call ::= "<tool_call>\\n" call "\\n</tool_call>"\nroot ::= tool-call' + repeat + "\n"
    if spec.style == "mistral":
        return _convert(json_schema_to_gbnf, array).replace("root ::=", "calls ::=", 1) + \
            '\nroot ::= "[TOOL_CALLS]" calls\n'
    # llama3: one JSON object {"name", "parameters"}
    return _convert(json_schema_to_gbnf, _call_schema(spec, "parameters"))


def _convert(fn, schema: dict) -> str:
    try:
        return fn(json.dumps(schema))
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ToolError(f"a tool's parameters cannot be turned into a grammar ({type(exc).__name__}: {exc})",
                        "tools") from None


# -- the answer ---------------------------------------------------------------------------------


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call(name, arguments) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _json_objects(text: str):
    """Every top-level JSON value in text, in order, with where it ends."""
    decoder = json.JSONDecoder()
    i = 0
    while i < len(text):
        j = min((k for k in (text.find("{", i), text.find("[", i)) if k >= 0), default=-1)
        if j < 0:
            return
        try:
            value, end = decoder.raw_decode(text, j)
        except ValueError:
            i = j + 1
            continue
        yield value, j, end
        i = end


def _string_prefix(rest: str) -> str:
    """The text of a JSON string whose opening quote came just before rest, as far as it goes:
    whole when it is closed, else up to where the answer was cut (a half escape dropped)."""
    try:
        return json.decoder.scanstring(rest, 0)[0]
    except ValueError:
        pass
    for k in range(len(rest), max(-1, len(rest) - 8), -1):
        try:
            return json.loads('"' + rest[:k] + '"')
        except ValueError:
            continue
    return ""


_RESPONSE_START = re.compile(r'\s*\{\s*"response"\s*:\s*"')


def _cut_generic(text: str) -> str | None:
    """A generic answer the grammar was still writing when it was cut (max_tokens, a stop string):
    the words of a `{"response": "…` so far, and nothing of a `{"tool_calls": …` (a call whose
    arguments are cut is no call, and its JSON is not an answer)."""
    m = _RESPONSE_START.match(text)
    if m:
        return _string_prefix(text[m.end():])
    return None if text.lstrip().startswith("{") else text


def parse_answer(text: str, spec: ToolSpec | None) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) from what the model wrote. Calls to tools that were not offered
    are not calls: their text stays content. A call cut off before its end (max_tokens) is neither
    a call nor content."""
    if spec is None or not spec.active:
        return text, []
    allowed = set(spec.names)
    if spec.style == "generic":
        try:
            value = json.loads(text)
        except ValueError:
            return _cut_generic(text), []
        if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
            calls = [_call(c.get("name"), c.get("arguments")) for c in value["tool_calls"]
                     if isinstance(c, dict) and c.get("name") in allowed]
            return (None, calls) if calls else (text, [])
        if isinstance(value, dict) and isinstance(value.get("response"), str):
            return value["response"], []
        return text, []
    calls, kept, last = [], [], 0
    opener = None  # where a call the model began but did not finish starts
    if spec.style == "hermes":
        for m in re.finditer(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S):
            try:
                value = json.loads(m.group(1))
            except ValueError:
                continue
            if isinstance(value, dict) and value.get("name") in allowed:
                calls.append(_call(value["name"], value.get("arguments", value.get("parameters"))))
                kept.append(text[last:m.start()])
                last = m.end()
        at = text.rfind("<tool_call>")
        if at >= last and "</tool_call>" not in text[at:]:
            opener = at
    elif spec.style == "mistral":
        at = text.find("[TOOL_CALLS]")
        if at >= 0:
            for value, start, end in _json_objects(text[at + len("[TOOL_CALLS]"):]):
                items = value if isinstance(value, list) else [value]
                calls += [_call(v["name"], v.get("arguments", v.get("parameters"))) for v in items
                          if isinstance(v, dict) and v.get("name") in allowed]
                break
            if calls:
                kept.append(text[:at])
                last = len(text)
            else:
                opener = at
    else:  # llama3
        body = text.split("<|python_tag|>", 1)[-1]
        offset = len(text) - len(body)
        for value, start, end in _json_objects(body):
            if isinstance(value, dict) and value.get("name") in allowed:
                calls.append(_call(value["name"], value.get("parameters", value.get("arguments"))))
                kept.append(text[last:offset + start])
                last = offset + end
        if not calls and offset:
            opener = offset - len("<|python_tag|>")
    if opener is not None:  # a call cut off: what came before it is the answer
        kept.append(text[last:opener])
    elif not calls:
        return text, []
    else:
        kept.append(text[last:])
    content = "".join(kept).replace("<|python_tag|>", "").strip()
    return content or None, calls
