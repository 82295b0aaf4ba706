"""Chat templates: the GGUF's own Jinja template (rendered in a sandbox) or a named preset.

Templates are rendered the way Hugging Face renders them (trim_blocks, lstrip_blocks, loop
controls), so a GGUF's embedded template gives the prompt its authors meant.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from dataclasses import dataclass

from ..errors import TemplateError

# Limits on one rendering (issue 8.7). A chat template comes from the bundle (untrusted) and
# the conversation from a request (untrusted): neither may hang the process or eat its memory.
RENDER_SECONDS = 2.0
RENDER_CHARS = 16 * 1024 * 1024  # the rendered prompt (it must fit the context anyway)
RENDER_GROWTH = 256 * 1024 * 1024  # resident memory a rendering may add
MAX_INT_ARG = 1_000_000  # no legitimate template pads a string to a million characters
MAX_REPEAT = 1_000_000  # 'x' * n, [..] * n

# name -> (jinja source, stop strings). Written for trim_blocks=True: no newline right after a tag.
PRESETS: dict[str, tuple[str, list[str]]] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ["<|im_end|>", "<|im_start|>"],
    ),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
        "{% else %}### Response:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}",
        ["### Instruction:", "### Response:"],
    ),
    # llama.cpp's built-in "llama2-sys-bos": BOS only inside the history (the tokenizer adds the first).
    "llama2": (
        "{% set ns = namespace(inside=true) %}[INST] {% for m in messages %}"
        "{% if not ns.inside %}{% set ns.inside = true %}<s>[INST] {% endif %}"
        "{% if m['role'] == 'system' %}<<SYS>>\n{{ m['content'] }}\n<</SYS>>\n\n"
        "{% elif m['role'] == 'user' %}{{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}</s>{% set ns.inside = false %}{% endif %}{% endfor %}",
        ["[INST]"],
    ),
    # llama.cpp's built-in "llama3".
    "llama3": (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        ["<|eot_id|>", "<|start_header_id|>"],
    ),
    # llama.cpp's built-in "mistral-v3" (Mistral 7B v0.3 and the SentencePiece Mistrals).
    "mistral": (
        "{% set ns = namespace(inside=false) %}{% for m in messages %}"
        "{% if not ns.inside %}[INST] {% set ns.inside = true %}{% endif %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}{{ m['content'] }}[/INST]"
        "{% else %} {{ m['content'] | trim }}</s>{% set ns.inside = false %}{% endif %}{% endfor %}",
        ["[INST]"],
    ),
    # llama.cpp's built-in "gemma": the system text (trimmed) opens the first user turn.
    "gemma": (
        "{% set ns = namespace(sys='') %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.sys = ns.sys + (m['content'] | trim) %}"
        "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{% if ns.sys and m['role'] != 'assistant' %}{{ ns.sys }}\n\n{% set ns.sys = '' %}{% endif %}"
        "{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        ["<end_of_turn>", "<start_of_turn>"],
    ),
    "phi3": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        ["<|end|>", "<|user|>", "<|endoftext|>"],
    ),
    # No chat format: the text itself (a base model continues it; `-p "2+2="` is sent as is).
    # Several messages are joined by blank lines, roles left out.
    "none": (
        "{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ m['content'] }}{% endfor %}",
        [],
    ),
}
# No preset writes the first BOS: the tokenizer adds it where the vocabulary wants one
# (add_bos_token), as llama.cpp's built-in formats leave it to the tokenizer.


def fallback_preset(architecture: str, tokenizer_pre: str | None, tokenizer_model: str | None,
                    name: str | None) -> str:
    """The preset for a GGUF that carries no chat template, by its family: what llama.cpp's
    built-in templates would give that family, ChatML when nothing tells."""
    arch = (architecture or "").lower()
    if arch.startswith("gemma"):
        return "gemma"
    if arch == "phi3":
        return "phi3"
    if tokenizer_pre == "llama-bpe":
        return "llama3"
    if arch in ("llama", "mistral") and tokenizer_model == "llama":  # SentencePiece: Llama 2, Mistral 7B
        return "mistral" if "mistral" in (name or "").lower() else "llama2"
    return "chatml"

# Stop strings worth adding for the GGUF's own template, by the markers it uses.
_MARKER_STOPS = {
    "<|im_start|>": ["<|im_end|>", "<|im_start|>"],
    "<|start_header_id|>": ["<|eot_id|>"],
    "<start_of_turn>": ["<end_of_turn>"],
    "<|end|>": ["<|end|>"],
}


class TemplateLimitError(TemplateError):
    """The template went over a time, size or memory limit."""


def _raise_exception(message):
    raise TemplateError(f"the chat template refused the conversation: {message}")


def _resident_bytes() -> int:
    if sys.platform == "win32":
        return _working_set_bytes()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0


_memory_counters = None


def _working_set_bytes() -> int:
    """Windows: the process's working set (K32GetProcessMemoryInfo), its resident memory."""
    global _memory_counters
    try:
        import ctypes

        if _memory_counters is None:
            class Counters(ctypes.Structure):
                _fields_ = [("cb", ctypes.c_uint32), ("PageFaultCount", ctypes.c_uint32)] + [
                    (n, ctypes.c_size_t) for n in ("PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage",
                                                   "QuotaPagedPoolUsage", "QuotaPeakNonPagedPoolUsage",
                                                   "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")]

            kernel32 = ctypes.WinDLL("kernel32")
            kernel32.GetCurrentProcess.restype = ctypes.c_void_p
            kernel32.K32GetProcessMemoryInfo.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32]
            _memory_counters = (kernel32, Counters)
        kernel32, Counters = _memory_counters
        c = Counters(cb=ctypes.sizeof(Counters))
        if kernel32.K32GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(c), c.cb):
            return c.WorkingSetSize
    except (OSError, AttributeError):
        pass
    return 0


class _Watch:
    """A trace function for the rendering thread: the generated template code is Python, so a
    line event fires at every step of its loops; each checks the clock, and every few
    milliseconds the process's resident memory."""

    def __init__(self, name: str, seconds: float):
        self.name = name
        self.deadline = time.monotonic() + seconds
        self.next_memory = 0.0
        self.base = _resident_bytes()

    def __call__(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename != "<template>":
            return None  # jinja's own helpers: no line events inside them (the cost of tracing)
        now = time.monotonic()
        if now > self.deadline:
            raise TemplateLimitError(f"the chat template ({self.name}) took longer than {RENDER_SECONDS:g} s")
        if now > self.next_memory:
            self.next_memory = now + 0.002
            if self.base and _resident_bytes() - self.base > RENDER_GROWTH:
                raise TemplateLimitError(f"the chat template ({self.name}) used more than "
                                         f"{RENDER_GROWTH >> 20} MiB of memory")
        return self


def _check_args(args, kwargs, what: str) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT_ARG:
            raise TemplateLimitError(f"the chat template passed {what} a number over {MAX_INT_ARG}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """tojson as chat templates are written for (Hugging Face's and llama.cpp's): keys in their
    order, no HTML escaping, non-ASCII kept; Jinja's own sorts keys and escapes <, > and &."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _lenient_undefined():
    """A missing variable or key as llama.cpp's template engine has it: its attributes are
    missing too, and joined to a string it adds nothing (Command R+ writes a parameter's absent
    description; firefunction joins an absent `functions`). Printed, it is empty, as in Jinja."""
    from jinja2 import ChainableUndefined

    class LenientUndefined(ChainableUndefined):
        __slots__ = ()

        def __add__(self, other):
            return other if isinstance(other, str) else ChainableUndefined.__add__(self, other)

        def __radd__(self, other):
            return other if isinstance(other, str) else ChainableUndefined.__radd__(self, other)

    return LenientUndefined


def _generation_extension():
    """{% generation %}…{% endgeneration %}: Hugging Face's marker of the assistant's own text
    (for training masks); renders its body unchanged."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return Generation


def _limited_environment():
    # The sandbox lets a template change the lists and dicts it builds (Kimi K2's append to a
    # list of its own): what it is given is a copy made for each rendering.
    from jinja2.sandbox import SandboxedEnvironment

    class LimitedSandbox(SandboxedEnvironment):
        """The sandbox, plus limits on the operations that allocate in one C call."""

        intercepted_binops = frozenset(["*", "**", "%"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        if len(seq) * abs(n) > MAX_REPEAT:
                            raise TemplateLimitError("the chat template builds a string or list over "
                                                     f"{MAX_REPEAT} items")
            elif operator == "**":
                if isinstance(right, int) and abs(right) > 64 and isinstance(left, int) and abs(left) > 1:
                    raise TemplateLimitError("the chat template raises a number to a huge power")
            elif operator == "%" and isinstance(left, str):
                _check_args(right if isinstance(right, tuple) else (right,), {}, "a format")
                if any(ch.isdigit() for ch in left) and len(left) < 64:
                    import re

                    for width in re.findall(r"%[-+ #0]*(\d+)", left):
                        if int(width) > MAX_INT_ARG:
                            raise TemplateLimitError("the chat template formats to a huge width")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
            _check_args(args, kwargs, "a call")
            method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
            if getattr(method, "__name__", "") in ("format", "format_map") and isinstance(
                    getattr(method, "__self__", None), str):
                import re

                for width in re.findall(r"(\d{7,})", method.__self__):
                    if int(width) > MAX_INT_ARG:
                        raise TemplateLimitError("the chat template formats to a huge width")
            return super().call(__context, __obj, *args, **kwargs)

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, undefined=_lenient_undefined(),
                         extensions=["jinja2.ext.loopcontrols", _generation_extension()])
    env.filters["tojson"] = _tojson
    env.filters["safe"] = str  # a prompt is text, not HTML: nothing is ever escaped

    def guarded(name, fn):
        def filter_(*args, **kwargs):
            _check_args(args[1:], kwargs, f"the filter {name}")
            return fn(*args, **kwargs)

        for attr in ("jinja_pass_arg",):  # keep pass_context / pass_environment markers
            if hasattr(fn, attr):
                setattr(filter_, attr, getattr(fn, attr))
        return filter_

    env.filters = {name: guarded(name, fn) for name, fn in env.filters.items()}
    return env


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@dataclass
class ChatTemplate:
    source: str
    name: str = "auto"
    stop: tuple = ()
    bos_token: str = ""
    eos_token: str = ""

    def __post_init__(self):
        # Imported here: jinja2 is only needed once a chat starts.
        from jinja2 import TemplateSyntaxError

        if len(self.source) > 1024 * 1024:
            raise TemplateError(f"the chat template ({self.name}) is longer than 1 MiB")
        env = _limited_environment()
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"the chat template ({self.name}) is not valid Jinja: {exc}") from None
        except (RecursionError, MemoryError, ValueError, OverflowError) as exc:
            raise TemplateError(f"the chat template ({self.name}) cannot be compiled: {type(exc).__name__}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               seconds: float = RENDER_SECONDS, tools: list | None = None, **variables) -> str:
        """Render under the limits above; any failure is a TemplateError that names it.

        A template that refuses the system role (Gemma's: raise_exception('System role not
        supported')) gets the system text folded into the first user turn instead, separated by
        a newline, as llama.cpp does for such templates, rather than failing every
        conversation that has a system prompt."""
        try:
            return self._render(messages, add_generation_prompt, seconds, tools, variables)
        except TemplateError as exc:
            if "refused the conversation" not in str(exc) or not any(m.get("role") == "system" for m in messages):
                raise
            folded = fold_system(messages)
            if folded is None:
                raise
            return self._render(folded, add_generation_prompt, seconds, tools, variables)

    def _render(self, messages: list[dict], add_generation_prompt: bool, seconds: float,
                tools: list | None = None, variables: dict | None = None) -> str:
        from jinja2 import TemplateError as JinjaError

        watch = _Watch(self.name, seconds)
        today = datetime.date.today()
        previous = sys.gettrace()
        pieces, size = [], 0
        sys.settrace(watch)
        try:
            for piece in self._template.generate(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                date_string=today.strftime("%d %b %Y"),  # Llama 3.x: "Today Date: …"
                datetime=today.strftime("%b %d %Y"),  # firefunction: "Today is …" (both as llama.cpp gives them)
                **({"tools": tools} if tools else {}),
                **(variables or {}),
            ):
                size += len(piece)
                if size > RENDER_CHARS:
                    raise TemplateLimitError(f"the chat template ({self.name}) rendered more than "
                                             f"{RENDER_CHARS >> 20} M characters")
                pieces.append(piece)
        except TemplateError:
            raise
        except JinjaError as exc:
            raise TemplateError(f"the chat template ({self.name}) failed: {exc}") from None
        except RecursionError:
            raise TemplateLimitError(f"the chat template ({self.name}) recursed too deeply") from None
        except MemoryError:
            raise TemplateLimitError(f"the chat template ({self.name}) ran out of memory") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, ZeroDivisionError) as exc:
            raise TemplateError(f"the chat template ({self.name}) failed: {type(exc).__name__}: {exc}") from None
        finally:
            sys.settrace(previous)
        return "".join(pieces)


def fold_system(messages: list[dict]) -> list[dict] | None:
    """The system messages' text joined onto the first user message; None when there is none."""
    system = "\n".join(m["content"] for m in messages if m.get("role") == "system" and m.get("content"))
    rest = [dict(m) for m in messages if m.get("role") != "system"]
    first_user = next((m for m in rest if m.get("role") == "user"), None)
    if first_user is None:
        return None
    if system:
        first_user["content"] = system + "\n" + (first_user.get("content") or "")
    return rest


def stops_for(name: str, source: str) -> list[str]:
    if name in PRESETS:
        return list(PRESETS[name][1])
    stops: list[str] = []
    for marker, extra in _MARKER_STOPS.items():
        if marker in source:
            stops += [s for s in extra if s not in stops]
    return stops


def load_template(name: str, source: str | None, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    """name is 'auto' (use source, the GGUF's template), a preset name, or 'file:...' (source
    given). The presets leave the first BOS to the tokenizer (Engine.tokenize_prompt)."""
    if name in PRESETS:
        source = PRESETS[name][0]
    if not source:
        # A GGUF without a template, in a bundle built before fallbacks were chosen by family.
        name, source = "chatml", PRESETS["chatml"][0]
    return ChatTemplate(source, name, tuple(stops_for(name, source)), bos_token, eos_token)
