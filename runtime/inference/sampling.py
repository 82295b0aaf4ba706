"""A request's sampling, one token at a time, and its text as it becomes final: the settings
(Sampling), llama.cpp's sampler chain with grammar-checked sampling (TokenSampler), the model's
log-probabilities (token_logprobs), stop strings and UTF-8 across tokens (TextOut), and what a
generation returns (Result)."""

from __future__ import annotations

import array
import codecs
import ctypes
import heapq
import itertools
import math
import operator
from dataclasses import dataclass, field, fields

PENALTY_LAST_N = 64

@dataclass(kw_only=True)
class LlamaSamplers:
    """llama.cpp's samplers beyond OpenAI's, by llama-server's names, with llama.cpp's defaults
    (each off unless it says otherwise: min_p 0.05 is on, as in llama.cpp), declared once: the
    settings (flags, BUNDLE_* variables, bundle build) and each answer's Sampling take them, and
    requests give them by the same names."""

    min_p: float = 0.05
    typical_p: float = 1.0
    top_n_sigma: float = -1.0  # <= 0: off
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1  # -1: the whole context
    mirostat: int = 0  # 1 or 2: Mirostat (replaces the samplers but the penalties)
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0


LLAMA_SAMPLING = {f.name: f.default for f in fields(LlamaSamplers)}
# The order the samplers run in (llama-server's `samplers`, llama.cpp's --samplers), and its default.
SAMPLER_NAMES = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
DEFAULT_ORDER = SAMPLER_NAMES
# Other spellings llama.cpp takes, and the one-letter form (--sampling-seq "edskypmxt").
SAMPLER_ALIASES = {"typical_p": "typ_p", "typical": "typ_p", "nucleus": "top_p", "temp": "temperature",
                   "top-k": "top_k", "top-p": "top_p", "min-p": "min_p", "typ-p": "typ_p",
                   "top-n-sigma": "top_n_sigma"}
SAMPLER_LETTERS = {"e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p", "p": "top_p",
                   "m": "min_p", "x": "xtc", "t": "temperature"}
DRY_BREAKERS = ("\n", ":", "\"", "*")


def sampler_order(value) -> tuple[str, ...]:
    """llama.cpp's sampler order from a list of names, a ';'-separated string of names, or the
    one-letter form ("kypmxt"); ValueError names what is not a sampler."""
    if isinstance(value, str):
        items = [v for v in value.replace(",", ";").split(";") if v.strip()]
        if len(items) == 1 and items[0] not in SAMPLER_NAMES and items[0] not in SAMPLER_ALIASES \
                and all(c in SAMPLER_LETTERS for c in items[0]):
            return tuple(SAMPLER_LETTERS[c] for c in items[0])
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise ValueError("give the samplers as a list of names")
    out = []
    for item in items:
        name = SAMPLER_ALIASES.get(item.strip().lower(), item.strip().lower())
        if name not in SAMPLER_NAMES:
            raise ValueError(f"{item!r} is not a sampler (the samplers: {', '.join(SAMPLER_NAMES)})")
        if name not in out:
            out.append(name)
    return tuple(out)


def sampler_problems(values: dict) -> list[str]:
    """What is out of range among llama.cpp's sampler values (the settings' and a request's)."""
    limits = {"min_p": (0, 1), "typical_p": (0, 1), "xtc_probability": (0, 1), "xtc_threshold": (0, 1),
              "dry_multiplier": (0, 1e6), "dry_base": (1, 1e6), "dry_allowed_length": (0, 1 << 20),
              "dry_penalty_last_n": (-1, 1 << 24), "mirostat_tau": (0, 1e6), "mirostat_eta": (0, 1e6),
              "dynatemp_range": (0, 1e6), "dynatemp_exponent": (0, 1e6), "top_n_sigma": (-1e6, 1e6)}
    out = []
    for name, value in values.items():
        if name == "mirostat":
            if value not in (0, 1, 2):
                out.append(f"mirostat={value} must be 0 (off), 1 or 2")
        elif name in limits and not limits[name][0] <= value <= limits[name][1]:
            lo, hi = limits[name]
            out.append(f"{name}={value} must be from {lo:g} to {hi:g}")
    return out


@dataclass
class Sampling(LlamaSamplers):
    temp: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int = -1
    max_tokens: int = 1024
    stop: list = field(default_factory=list)
    ignore_eog: bool = False  # benchmarks: keep generating past end-of-generation tokens
    frequency_penalty: float = 0.0  # OpenAI's, applied by llama.cpp's penalties sampler
    presence_penalty: float = 0.0
    grammar: str | None = None  # GBNF (structured output): only text it accepts is sampled
    logit_bias: dict = field(default_factory=dict)  # token id -> bias added to its logit
    logprobs: int | None = None  # record each token's log-probability and this many alternatives
    lora: tuple | None = None  # the LoRA adapters' scales for this answer (None: the server's current ones)
    dry_sequence_breakers: tuple = DRY_BREAKERS
    samplers: tuple = DEFAULT_ORDER  # llama.cpp's samplers' order
    ignore_eos: bool = False  # llama-server's: end-of-generation tokens are never sampled


@dataclass
class Result:
    text: str = ""
    finish_reason: str = "stop"  # "stop" (model or stop string), "length", "cancelled"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those found computed (a slot's cache, the prompt cache)
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    first_token_seconds: float = 0.0
    logprobs: list | None = None  # TokenLogprob per token of text (when Sampling.logprobs is set)
    stop_string: str | None = None  # the stop string that ended it, if one did


@dataclass
class TokenLogprob:
    """One generated token: its bytes, its log-probability under the model, the most likely
    alternatives at that step [(token id, bytes, log-probability)], and where its text starts
    and ends in the answer (characters)."""

    token: int
    piece: bytes
    logprob: float
    top: list
    start: int = 0
    end: int = 0


class TokenSampler:
    """A request's sampling, one token at a time: llama.cpp's sampler chain; with a grammar,
    llama.cpp's grammar-checked rejection sampling (common_sampler_sample): the token is drawn
    without the grammar, then only it is checked against the grammar; only when the grammar
    rejects it is it drawn again with the grammar applied to the whole vocabulary. Most tokens
    of a JSON answer pass the check, so the grammar costs one token's check instead of a pass
    over every token of the vocabulary (49,152 for the demo model) at every step."""

    def __init__(self, C, fast, full=None, grammar=None, history=()):
        self.C, self.fast, self.full, self.grammar = C, fast, full, grammar
        self.sample = (lambda ctx, idx: C.llama_sampler_sample(fast, ctx, idx)) if grammar is None else self._checked
        if grammar is not None:
            self._one = C.llama_token_data(0, 1.0, 0.0)
            self._arr = C.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)
            self._arr_p = ctypes.byref(self._arr)
            self.recent = list(history[-PENALTY_LAST_N:])  # the fast chain's penalty window
            self.rejected = 0

    def _checked(self, ctx, idx) -> int:
        C = self.C
        tok = C.llama_sampler_sample(self.fast, ctx, idx)  # also accepted by the fast chain
        one, arr = self._one, self._arr
        one.id, one.logit, one.p = tok, 1.0, 0.0
        arr.size, arr.selected, arr.sorted = 1, -1, False
        C.llama_sampler_apply(self.grammar, self._arr_p)
        if one.logit != -math.inf:
            C.llama_sampler_accept(self.full, tok)
        else:
            self.rejected += 1
            tok = C.llama_sampler_sample(self.full, ctx, idx)  # the grammar over the vocabulary
            self._replace_last(tok)
        C.llama_sampler_accept(self.grammar, tok)
        self.recent = self.recent[-(PENALTY_LAST_N - 1):] + [tok]
        return tok

    def _replace_last(self, tok: int) -> None:
        """The fast chain took the rejected token into its penalty window: give it the right one."""
        C = self.C
        for i in range(C.llama_sampler_chain_n(self.fast)):
            s = C.llama_sampler_chain_get(self.fast, i)
            if C.llama_sampler_name(s) == b"penalties":
                C.llama_sampler_reset(s)
                for t in self.recent[-(PENALTY_LAST_N - 1):] + [tok]:
                    C.llama_sampler_accept(s, t)

    def free(self) -> None:
        for s in (self.fast, self.full, self.grammar):
            if s is not None:
                self.C.llama_sampler_free(s)
        self.fast = self.full = self.grammar = None


def token_logprobs(C, ctx, idx: int, n_vocab: int, token: int, top: int) -> tuple[float, list]:
    """log softmax of the logits llama.cpp computed at batch position idx: the sampled token's
    value and the top alternatives' [(id, value)]. The model's own distribution: before the
    sampling settings, logit_bias and any grammar. (Pure Python over the vocabulary: a few ms
    a token, paid only by requests that ask for log-probabilities.)"""
    logits = array.array("f", ctypes.string_at(C.llama_get_logits_ith(ctx, idx), 4 * n_vocab))
    try:  # logits are small numbers: exp() of each fits a double (2.5x faster than shifting first)
        total = sum(map(math.exp, logits))
        lse = math.log(total)
    except (OverflowError, ValueError):  # a logit over ~709, or all of them far below zero
        m = max(logits)
        lse = m + math.log(math.fsum(map(math.exp, map(operator.sub, logits, itertools.repeat(m)))))
    best, seen = [], {}
    for v in heapq.nlargest(top, logits) if top else ():
        i = logits.index(v, seen.get(v, 0))  # (equal values: each index once)
        seen[v] = i + 1
        best.append(i)
    return logits[token] - lse, [(i, logits[i] - lse) for i in best]


class TextOut:
    """Pieces of an answer as they become final: UTF-8 assembled across tokens, and text that
    could still turn into a stop string held back until it cannot. One per generation (each slot of
    runtime.inference.scheduler)."""

    def __init__(self, stops, on_text):
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.stops = [s for s in stops if s]
        self.on_text = on_text
        self.pending = ""  # text not yet passed on (may be the start of a stop string)
        self.out: list[str] = []
        self.decoded = 0  # characters decoded so far (passed on, held back or cut)
        self.stopped_by: str | None = None  # the stop string reached

    def add(self, piece: bytes) -> bool:
        """Add a token's bytes; True when a stop string was reached (the text ends before it)."""
        text = self.utf8.decode(piece)
        self.decoded += len(text)
        self.pending += text
        if self.stops:
            cut = _find_stop(self.pending, self.stops)
            if cut is not None:
                self.stopped_by = next(st for st in self.stops if self.pending.startswith(st, cut))
                self.pending = self.pending[:cut]
                return True
            hold = _partial_stop(self.pending, self.stops)
            if len(self.pending) > hold:
                self._emit(self.pending[: len(self.pending) - hold])
                self.pending = self.pending[len(self.pending) - hold:]
        elif self.pending:
            self._emit(self.pending)
            self.pending = ""
        return False

    def _emit(self, text: str) -> None:
        self.out.append(text)
        if self.on_text:
            self.on_text(text)

    def finish(self) -> str:
        self.pending += self.utf8.decode(b"", final=True)
        if self.pending:
            self._emit(self.pending)
            self.pending = ""
        return "".join(self.out)


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _find_stop(text: str, stops: list[str]) -> int | None:
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best):
            best = i
    return best
