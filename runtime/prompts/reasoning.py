"""Reasoning models (issue 10.4): DeepSeek-R1 distills, Qwen3, and others that think between
`<think>` and `</think>` before they answer.

As llama-server does: the thinking goes to `reasoning_content` and the answer to `content`
(streamed as `delta.reasoning_content`, then `delta.content`); a template that takes
`enable_thinking` (Qwen3's) gets it — true unless the request turns it off with
`chat_template_kwargs: {"enable_thinking": false}` (llama-server's field) or
`reasoning_effort: "none"`/`"minimal"` (OpenAI's). A template whose generation prompt already
opens the thinking (DeepSeek-R1's ends in `<think>\\n`) makes the answer start inside it.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
# Reasoning blocks of the templates that take enable_thinking: <think> (DeepSeek, Qwen), Gemma 4's
# <|think|> switch, Command R7B's <|START_THINKING|>. Where none is found (Apertus' "Deliberation"),
# thinking is off unless asked for, as llama-server has it.
THINKING_MARKERS = (OPEN, "<|think|>", "<|START_THINKING|>")


class ReasoningError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def thinking_wanted(body: dict) -> bool | None:
    """The request's say on thinking: True, False, or None (the template's default)."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ReasoningError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    flag = (kwargs or {}).get("enable_thinking")
    if flag is not None and not isinstance(flag, bool):
        raise ReasoningError("'chat_template_kwargs.enable_thinking' must be a boolean", "chat_template_kwargs")
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in ("none", "minimal", "low", "medium", "high"):
            raise ReasoningError("'reasoning_effort' must be none, minimal, low, medium or high", "reasoning_effort")
        if flag is None:
            flag = effort not in ("none", "minimal")
    return flag


def template_switch(source: str | None, setting: str = "auto", wanted: bool | None = None) -> dict:
    """The template variables that turn thinking on or off, for a template that takes
    enable_thinking ({} for others): what the request or the chat asks (wanted), else the
    bundle's setting (--think on/off), else llama-server's default: on where the template has a
    reasoning block llama.cpp knows."""
    src = source or ""
    if "enable_thinking" not in src:
        return {}
    if wanted is None:
        wanted = {"on": True, "off": False}.get(setting)
    if wanted is None:
        wanted = any(marker in src for marker in THINKING_MARKERS)
    return {"enable_thinking": wanted}


def is_thinking_template(source: str | None) -> bool:
    return bool(source) and (OPEN in source or "enable_thinking" in source)


def starts_inside(prompt: str) -> bool:
    """Whether the rendered prompt leaves the model inside an open <think> block."""
    return prompt.rstrip().endswith(OPEN)


def split(text: str, inside: bool) -> tuple[str | None, str]:
    """(reasoning, answer) of a whole reply."""
    s = Splitter(inside)
    parts = s.feed(text) + s.finish()
    reasoning = "".join(t for kind, t in parts if kind == "reasoning")
    answer = "".join(t for kind, t in parts if kind == "content")
    return (reasoning.strip() or None), answer.lstrip("\n") if reasoning else answer


class Splitter:
    """Streamed text -> [("reasoning" | "content", text)], tags removed; text that could be the
    start of a tag is held back until it cannot."""

    def __init__(self, inside: bool):
        self.inside = inside  # within <think> … </think>
        self.seen_close = False
        self.pending = ""
        self.started = False  # any content yet (only a leading <think> opens a block)

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.pending += text
        out = []
        while self.pending:
            tag = CLOSE if self.inside else OPEN
            at = self.pending.find(tag)
            if at >= 0 and (self.inside or not self.started and not self.pending[:at].strip()):
                if self.pending[:at]:
                    out.append(("reasoning" if self.inside else "content", self.pending[:at]))
                self.pending = self.pending[at + len(tag):]
                self.inside = not self.inside
                self.seen_close = self.seen_close or tag == CLOSE
                continue
            hold = _partial(self.pending, tag) if (self.inside or not self.started) else 0
            emit = self.pending[: len(self.pending) - hold]
            self.pending = self.pending[len(emit):]
            kind = "reasoning" if self.inside else "content"
            if kind == "content" and self.seen_close and not self.started:
                emit = emit.lstrip("\n")  # the blank line(s) between the thinking and the answer
            if emit:
                if kind == "content" and emit.strip():
                    self.started = True
                out.append((kind, emit))
            break
        return [(k, t) for k, t in out if t]

    def finish(self) -> list[tuple[str, str]]:
        rest, self.pending = self.pending, ""
        if not self.inside and self.seen_close and not self.started:
            rest = rest.lstrip("\n")
        return [("reasoning" if self.inside else "content", rest)] if rest else []


def _partial(text: str, tag: str) -> int:
    """Length of the longest end of text that begins tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
