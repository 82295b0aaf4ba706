"""A conversation longer than the context, made to fit (--context-overflow truncate): the oldest
turns are left out, a whole turn at a time (a user message and everything after it up to the next
one: the answer, tool calls, tool results), while the system prompt and the latest turn are always
kept. How many to leave out is found by bisection over the rendered prompt's length in tokens
(rendering and tokenizing is the caller's `count`), so a long chat costs a few renders, not one
per turn."""

from __future__ import annotations

from typing import Callable

TRUNCATE, ERROR = "truncate", "error"
MODES = (TRUNCATE, ERROR)


def turn_starts(messages: list[dict]) -> list[int]:
    """Where each turn begins: the index of every user message after the leading system ones."""
    return [i for i, m in enumerate(messages) if m.get("role") == "user"]


def text_bytes(messages: list[dict]) -> int:
    return sum(len(str(m.get("content") or "").encode("utf-8", "replace")) for m in messages)


def fit(messages: list[dict], count: Callable[[list[dict]], int], limit: int,
        max_bytes: int | None = None) -> tuple[list[dict], int]:
    """(the messages that fit in `limit` tokens, how many turns were left out). The system
    messages at the head and the last turn stay; when even they do not fit, they are returned as
    they are (the caller's length check says what is wrong). max_bytes: first leave out turns,
    without tokenizing, until the messages' text is no longer than that (what no context of
    `limit` tokens could hold anyway; tokenizing a huge chat is slow)."""
    if max_bytes is not None:
        messages, first = _fit(messages, text_bytes, max_bytes)
        kept, more = _fit(messages, count, limit)
        return kept, first + more
    return _fit(messages, count, limit)


def _fit(messages: list[dict], count: Callable[[list[dict]], int], limit: int) -> tuple[list[dict], int]:
    if count(messages) <= limit:
        return messages, 0
    starts = turn_starts(messages)
    if len(starts) < 2:
        return messages, 0
    head = messages[:starts[0]]

    def without(k: int) -> list[dict]:  # the first k turns left out
        return head + messages[starts[k]:]

    lo, hi = 1, len(starts) - 1  # leaving out hi turns keeps only the last one
    if count(without(hi)) > limit:
        return without(hi), hi
    while lo < hi:  # the fewest turns to leave out
        mid = (lo + hi) // 2
        if count(without(mid)) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return without(lo), lo


def answer_room(n_ctx: int, max_tokens: int) -> int:
    """Tokens kept free for the answer when a conversation is cut to fit: a quarter of the context,
    or the answer's limit when that is smaller."""
    quarter = max(16, n_ctx // 4)
    return min(quarter, max_tokens) if max_tokens > 0 else quarter


def note(dropped: int, n_ctx: int) -> str:
    turns = "turn" if dropped == 1 else "turns"
    return f"({dropped} earlier {turns} left out: the conversation no longer fits the context of {n_ctx} tokens)"
