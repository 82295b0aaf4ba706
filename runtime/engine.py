"""The model and its generation loop, on llama.cpp's own C API (through llama-cpp-python's
low-level ctypes bindings; the high-level `Llama` class costs ~20% of decode speed in Python
work per token and only takes a path).

The model is loaded with llama_model_load_from_file_ptr from the bundle file itself, at the
payload offset, memory-mapped (docs/facts.md #4): no copy of the model is ever written.
"""

from __future__ import annotations

import array
import codecs
import ctypes
import heapq
import itertools
import math
import operator
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import ContextOverflowError, ModelLoadError, RuntimeFailure

__all__ = ["ContextOverflowError", "Engine", "Result", "Sampling"]

# llama-bench's defaults: prompts are decoded in batches of up to 2048, 512 at a time.
N_BATCH = 2048
N_UBATCH = 512
PENALTY_LAST_N = 64


def import_bindings(libdir: Path):
    """Import llama_cpp.llama_cpp (the ctypes bindings) without llama_cpp/__init__.py
    (runtime.llama_package), bound to the library in libdir."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(libdir)
    from . import llama_package, native

    native.prepare_library_search(libdir)
    if "llama_cpp.llama_cpp" in sys.modules:
        return sys.modules["llama_cpp.llama_cpp"]
    llama_package.register()
    import llama_cpp.llama_cpp as C

    return C


_libc = None


def _c_runtime():
    """The C runtime whose FILE* libllama reads: glibc's on Linux; on Windows msvcrt.dll, the
    one the MinGW-built DLLs link (build.py checks that they do)."""
    global _libc
    if _libc is None:
        if sys.platform == "win32":
            _libc = ctypes.CDLL("msvcrt")
            _libc._wfopen.restype = ctypes.c_void_p
            _libc._wfopen.argtypes = [ctypes.c_wchar_p, ctypes.c_wchar_p]
            _libc._fseeki64.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
            _libc.fseek_ = _libc._fseeki64
        else:
            _libc = ctypes.CDLL(None)
            _libc.fopen.restype = ctypes.c_void_p
            _libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
            _libc.fseeko.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
            _libc.fseek_ = _libc.fseeko
        _libc.fclose.argtypes = [ctypes.c_void_p]
    return _libc


def _fopen(path: str, offset: int):
    """A C FILE* positioned at offset (llama_model_load_from_file_ptr reads from there). On
    Windows opened by its wide name: any path (spaces, non-ASCII) in any code page."""
    libc = _c_runtime()
    if sys.platform == "win32":
        fp = libc._wfopen(str(path), "rb")
    else:
        fp = libc.fopen(os.fsencode(path), b"rb")
    if not fp:
        raise ModelLoadError(f"cannot open {path} to load the model")
    if libc.fseek_(fp, offset, 0) != 0:
        libc.fclose(fp)
        raise ModelLoadError(f"cannot seek to the model inside {path}")
    return fp


@dataclass
class Sampling:
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


@dataclass
class Result:
    text: str = ""
    finish_reason: str = "stop"  # "stop" (model or stop string), "length", "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    first_token_seconds: float = 0.0
    logprobs: list | None = None  # TokenLogprob per token of text (when Sampling.logprobs is set)


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


_log_callback = None  # module-level on purpose: C keeps the pointer for the process's life
_recent_errors: list[str] = []
GGML_LOG_LEVEL_ERROR = 4


def set_logging(C, verbose: bool) -> None:
    """Keep llama.cpp's and ggml's thousands of log lines off stderr unless asked (docs/facts.md
    #8). Called before the back ends load, so their messages are caught too. Errors are kept
    (the last few) so a failure can say what llama.cpp said."""
    global _log_callback

    def log(level, text, user_data):
        line = text.decode("utf-8", "replace")
        if level == GGML_LOG_LEVEL_ERROR:
            _recent_errors.append(line.strip())
            del _recent_errors[:-5]
        if verbose:
            sys.stderr.write(line)

    _log_callback = C.llama_log_callback(log)
    C.llama_log_set(_log_callback, None)


def last_error() -> str:
    return _recent_errors[-1] if _recent_errors else ""


class Engine:
    """One model, one context. Not thread-safe: callers serialise generate()."""

    def __init__(self, C, model_path: str, offset: int, ctx: int, threads: int, gpu_layers: int = 0,
                 n_seq: int = 1, devices: list[int] | None = None):
        """devices: the ggml devices to offload to (runtime/backend.py); [] keeps everything on
        the CPU even where a GPU back end is loaded (llama.cpp would otherwise still use it for
        large batches); None lets llama.cpp use every GPU device ggml has."""
        self.C = C
        C.llama_backend_init()
        params = C.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        if devices is not None:
            self._devices = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)  # NULL-terminated
            params.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        params.use_mmap = True
        t0 = time.perf_counter()
        if isinstance(model_path, (list, tuple)):
            # Split GGUF parts beside the executable (bundle build --split): each mapped from its file.
            # (ggml opens them by their UTF-8 names on Windows too: it converts to wide names)
            paths = (ctypes.c_char_p * len(model_path))(
                *(str(p).encode("utf-8") if sys.platform == "win32" else os.fsencode(p) for p in model_path))
            self.model = C.llama_model_load_from_splits(paths, len(model_path), params)
        else:
            fp = _fopen(model_path, offset)
            try:
                self.model = C.llama_model_load_from_file_ptr(fp, params)
            finally:
                _libc.fclose(fp)  # the mapping stays valid after the FILE is closed
        self.load_seconds = time.perf_counter() - t0
        if not self.model:
            raise ModelLoadError("llama.cpp could not load the model" + (f" ({last_error()})" if last_error() else ""))
        self.vocab = C.llama_model_get_vocab(self.model)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = C.llama_model_n_ctx_train(self.model)
        self.threads = threads
        cparams = C.llama_context_default_params()
        cparams.n_ctx = min(ctx, self.n_ctx_train) if self.n_ctx_train > 0 else ctx
        cparams.n_batch = min(N_BATCH, cparams.n_ctx)  # (before the context is multiplied by n_seq)
        cparams.n_ubatch = min(N_UBATCH, cparams.n_batch)
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        # Several conversations at once (runtime/batch.py): each gets a KV cache of its own, of
        # the full context. Measured (issue 11): with one cache shared by all (llama-server's
        # -kvu) a conversation's cells sit among the others' and the attention sums them in
        # another order, so greedy answers changed with the load (3 of 8 the same as alone);
        # with a cache per sequence all 8 matched. The price is memory: n_seq times the KV
        # cache, which Runtime.parallel() keeps in budget.
        cparams.n_seq_max = max(1, n_seq)
        if n_seq > 1:
            cparams.kv_unified = False
            cparams.n_ctx *= n_seq
        # No abort_callback: ggml calls it for every graph node, and a Python callback there
        # costs more than the whole decode of a small model. Cancellation is checked between
        # llama_decode calls instead.
        self.ctx = C.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            C.llama_model_free(self.model)
            raise ModelLoadError(
                f"llama.cpp could not create a context of {cparams.n_ctx} tokens; try a smaller --ctx"
            )
        from . import native

        self._threadpool, self._threadpool_free = native.cpu_threadpool(threads)
        if self._threadpool:
            lib = C._lib
            lib.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            lib.llama_attach_threadpool.restype = None
            lib.llama_attach_threadpool(self.ctx, self._threadpool, self._threadpool)
        self.n_seq = max(1, n_seq)
        self.n_ctx = C.llama_n_ctx(self.ctx) // self.n_seq  # what one conversation may hold
        self.n_batch = cparams.n_batch
        self.memory = C.llama_get_memory(self.ctx)
        self.kv_tokens: list[int] = []  # what the KV cache holds, to reuse a shared prefix
        self._piece_buf = ctypes.create_string_buffer(256)
        self._one = (C.llama_token * 1)()
        self.bos_text = self.token_text(C.llama_vocab_bos(self.vocab))
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.vocab))  # the GGUF's add_bos_token
        self.eos_text = self.token_text(C.llama_vocab_eos(self.vocab))

    # -- metadata ---------------------------------------------------------------------------
    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        text = self.C.llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", "replace") if text else ""

    def chat_template(self) -> str | None:
        value = self.C.llama_model_chat_template(self.model, None)
        return value.decode("utf-8", "replace") if value else None

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self.C.llama_model_desc(self.model, buf, 256)
        return buf.value.decode("utf-8", "replace")

    # -- tokens -----------------------------------------------------------------------------
    def max_token_bytes(self) -> int:
        """The longest token's text in bytes (read once from the vocabulary)."""
        if getattr(self, "_max_token_bytes", None) is None:
            C, longest = self.C, 1
            for tok in range(self.n_vocab):
                text = C.llama_vocab_get_text(self.vocab, tok)
                if text and len(text) > longest:
                    longest = len(text)
            self._max_token_bytes = longest + 8  # byte-level pieces can be wider than their text
        return self._max_token_bytes

    def check_text_fits(self, n_bytes: int) -> None:
        """Refuse at once a text that cannot fit the context: one longer than n_ctx times the
        longest token surely does not, and llama.cpp's tokenizer is quadratic in the number of
        special tokens (40,000 chat turns took it 25 s, issue 8.7)."""
        if n_bytes > 4 * self.n_ctx and n_bytes > self.n_ctx * self.max_token_bytes():
            raise ContextOverflowError(
                f"the prompt is {n_bytes} bytes, more than the context ({self.n_ctx} tokens) can hold; "
                "shorten it, /reset the chat, or raise --ctx")

    def tokenize_bounded(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """tokenize(), after check_text_fits()."""
        self.check_text_fits(len(text.encode("utf-8", "replace")))
        return self.tokenize(text, add_special, parse_special)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8", "replace")  # a lone surrogate cannot reach llama.cpp
        n_max = len(data) + 8
        buf = (self.C.llama_token * n_max)()
        n = self.C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            buf = (self.C.llama_token * -n)()
            n = self.C.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def tokenize_prompt(self, text: str) -> list[int]:
        """A rendered chat prompt: special tokens parsed; BOS added unless the template wrote it."""
        add_bos = not (self.bos_text and text.startswith(self.bos_text))
        return self.tokenize_bounded(text, add_special=add_bos, parse_special=True)

    def piece(self, token: int) -> bytes:
        n = self.C.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.C.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    # -- generation -------------------------------------------------------------------------
    def _sampler(self, s: Sampling, history: list[int]) -> "TokenSampler":
        """The request's samplers. With a grammar, two chains: one without it (sampled first) and
        one with it (sampled only when the grammar rejects the first one's token)."""
        fast = self._chain(s, history, None)
        if not s.grammar:
            return TokenSampler(self.C, fast)
        grammar = self.grammar_sampler(s.grammar)
        if grammar is None:
            self.C.llama_sampler_free(fast)
            raise ValueError("the grammar is not valid GBNF")
        full = self._chain(s, history, s.grammar)
        return TokenSampler(self.C, fast, full, grammar, history)

    def _chain(self, s: Sampling, history: list[int], grammar_text: str | None):
        C = self.C
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        if s.logit_bias:
            arr = (C.llama_logit_bias * len(s.logit_bias))(
                *(C.llama_logit_bias(tok, bias) for tok, bias in s.logit_bias.items()))
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_logit_bias(self.n_vocab, len(s.logit_bias), arr))
        penalize = s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty
        if penalize:
            pen = C.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N, s.repeat_penalty, s.frequency_penalty,
                                                 s.presence_penalty)
            for tok in history[-PENALTY_LAST_N:]:  # the history goes to this sampler only (not the grammar)
                C.llama_sampler_accept(pen, tok)
            C.llama_sampler_chain_add(chain, pen)
        if grammar_text:
            grammar = self.grammar_sampler(grammar_text)
            if grammar is None:
                C.llama_sampler_free(chain)
                raise ValueError("the grammar is not valid GBNF")
            C.llama_sampler_chain_add(chain, grammar)
        if s.temp <= 0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(s.top_k))
            if s.top_p < 1.0:
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(s.top_p, 1))
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(s.temp))
            seed = s.seed if s.seed >= 0 else random.SystemRandom().randrange(2**32 - 1)
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed))
        return chain

    def checked_tokens(self, tokens: list[int]) -> list[int]:
        """Token ids from a request, each in this vocabulary (llama.cpp would read out of bounds)."""
        bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is not in this model's vocabulary (0 to {self.n_vocab - 1})")
        return list(tokens)

    def grammar_sampler(self, gbnf: str):
        """llama.cpp's grammar sampler for gbnf (root rule "root"), or None when it does not parse."""
        sampler = self.C.llama_sampler_init_grammar(self.vocab, gbnf.encode("utf-8"), b"root")
        return sampler or None

    def check_grammar(self, gbnf: str) -> bool:
        sampler = self.grammar_sampler(gbnf)
        if sampler is None:
            return False
        self.C.llama_sampler_free(sampler)
        return True

    def _decode(self, tokens: list[int], cancelled=lambda: False) -> bool:
        """Decode tokens in batches; False when cancelled between two batches."""
        C = self.C
        for i in range(0, len(tokens), self.n_batch):
            if cancelled():
                return False
            chunk = tokens[i : i + self.n_batch]
            arr = (C.llama_token * len(chunk))(*chunk)
            rc = C.llama_decode(self.ctx, C.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                self._forget_from(len(self.kv_tokens))
                raise RuntimeFailure(f"llama_decode failed ({rc}); the context may be full, try a larger --ctx")
            self.kv_tokens.extend(chunk)
        return True

    def _forget_from(self, n_keep: int) -> None:
        self.C.llama_memory_seq_rm(self.memory, 0, n_keep, -1)
        del self.kv_tokens[n_keep:]

    def reset(self) -> None:
        self.C.llama_memory_clear(self.memory, True)
        self.kv_tokens = []

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {n_prompt} tokens, longer than the context ({self.n_ctx} tokens); "
                "shorten it, /reset the chat, or raise --ctx"
            )

    def generate(
        self,
        prompt: list[int],
        sampling: Sampling,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Result:
        """Decode prompt (reusing the KV cache's shared prefix), then sample until a stop.

        Text is passed to on_text as it becomes final: a piece that might begin a stop string
        is held back until it is known not to.
        """
        C = self.C
        self.check_fits(len(prompt))
        result = Result(prompt_tokens=len(prompt))
        t0 = time.perf_counter()
        # Reuse what the cache already holds; at least the last prompt token is decoded so
        # there are fresh logits to sample from.
        keep = 0
        limit = min(len(self.kv_tokens), len(prompt) - 1)
        while keep < limit and self.kv_tokens[keep] == prompt[keep]:
            keep += 1
        self._forget_from(keep)
        if not self._decode(prompt[keep:], cancelled):
            result.finish_reason = "cancelled"
            return result
        t1 = time.perf_counter()
        result.prompt_seconds = t1 - t0
        sampler = self._sampler(sampling, prompt)
        text = TextOut(sampling.stop, on_text)
        max_tokens = sampling.max_tokens if sampling.max_tokens > 0 else 1 << 30
        one = self._one
        vocab, ctx = self.vocab, self.ctx
        sample, is_eog, decode, batch_one = sampler.sample, C.llama_vocab_is_eog, C.llama_decode, C.llama_batch_get_one
        ignore_eog = sampling.ignore_eog
        n = 0
        try:
            while True:
                if n >= max_tokens:
                    result.finish_reason = "length"
                    break
                if cancelled():
                    result.finish_reason = "cancelled"
                    break
                tok = sample(ctx, -1)
                if is_eog(vocab, tok) and not ignore_eog:
                    break
                n += 1
                if n == 1:
                    result.first_token_seconds = time.perf_counter() - t0
                if text.add(self.piece(tok)):
                    break
                if len(self.kv_tokens) >= self.n_ctx:
                    result.finish_reason = "length"
                    break
                one[0] = tok
                rc = decode(ctx, batch_one(one, 1))
                if rc != 0:
                    raise RuntimeFailure(f"llama_decode failed ({rc}) while generating")
                self.kv_tokens.append(tok)
        finally:
            sampler.free()
        result.text = text.finish()
        result.completion_tokens = n
        result.decode_seconds = time.perf_counter() - t1
        return result

    def benchmark(self, n_prompt: int = 512, n_gen: int = 128, reps: int = 3) -> dict:
        """llama-bench's two tests, through this engine's own paths: a prompt of n_prompt random
        tokens decoded from an empty cache (pp), and n_gen tokens from the generation loop (tg)."""
        rng = random.Random(1234)
        n_prompt = min(n_prompt, self.n_ctx - 1)
        n_gen = min(n_gen, self.n_ctx - 2)
        tokens = [rng.randrange(100, max(101, self.n_vocab - 100)) for _ in range(n_prompt)]
        bos = self.C.llama_vocab_bos(self.vocab)
        start = [bos if bos >= 0 else tokens[0]]
        greedy = Sampling(temp=0, repeat_penalty=1.0, max_tokens=n_gen, ignore_eog=True)
        self.reset()
        self._decode(tokens[:16])  # warm-up, as llama-bench does
        pp, tg = [], []
        for _ in range(reps):
            self.reset()
            t0 = time.perf_counter()
            self._decode(tokens)
            pp.append(n_prompt / (time.perf_counter() - t0))
            self.reset()
            r = self.generate(start, greedy)
            tg.append(r.completion_tokens / r.decode_seconds)
        self.reset()
        pp.sort()
        tg.sort()
        return {"n_prompt": n_prompt, "n_gen": n_gen, "reps": reps, "threads": self.threads,
                "prompt_tps": pp[len(pp) // 2], "decode_tps": tg[len(tg) // 2],
                "prompt_tps_all": pp, "decode_tps_all": tg}

    def embed(self, text) -> tuple[list[float], int]:
        """Mean-pooled, L2-normalised embedding of text, or of a list of token ids (a second
        context, made on first use)."""
        C = self.C
        if getattr(self, "_embed_ctx", None) is None:
            p = C.llama_context_default_params()
            p.n_ctx = min(self.n_ctx, 2048)
            p.n_batch = p.n_ubatch = p.n_ctx  # a whole input in one batch: pooling needs it
            p.n_threads = p.n_threads_batch = self.threads
            p.embeddings = True
            p.pooling_type = 1  # LLAMA_POOLING_TYPE_MEAN
            p.no_perf = True
            self._embed_ctx = C.llama_init_from_model(self.model, p)
            if not self._embed_ctx:
                raise RuntimeFailure("llama.cpp could not create an embeddings context")
            self._embed_n_ctx = p.n_ctx
        if isinstance(text, list):
            tokens = self.checked_tokens(text)
        else:
            tokens = self.tokenize_bounded(text, add_special=True, parse_special=False)
        if len(tokens) > self._embed_n_ctx:
            raise ContextOverflowError(
                f"the input is {len(tokens)} tokens, longer than the embedding context ({self._embed_n_ctx} tokens)"
            )
        if not tokens:
            raise RuntimeFailure("the input is empty")
        C.llama_memory_clear(C.llama_get_memory(self._embed_ctx), True)
        arr = (C.llama_token * len(tokens))(*tokens)
        if C.llama_decode(self._embed_ctx, C.llama_batch_get_one(arr, len(tokens))) != 0:
            raise RuntimeFailure("llama_decode failed while embedding")
        n_embd = C.llama_model_n_embd(self.model)
        ptr = C.llama_get_embeddings_seq(self._embed_ctx, 0)
        if not ptr:
            raise RuntimeFailure("llama.cpp returned no embedding")
        vec = ptr[:n_embd]
        norm = sum(v * v for v in vec) ** 0.5 or 1.0
        return [v / norm for v in vec], len(tokens)

    def close(self) -> None:
        if getattr(self, "_embed_ctx", None):
            self.C.llama_free(self._embed_ctx)
            self._embed_ctx = None
        if getattr(self, "ctx", None):
            self.C.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "_threadpool", None):
            self._threadpool_free(self._threadpool)  # after the context that used it
            self._threadpool = None
        if getattr(self, "model", None):
            self.C.llama_model_free(self.model)
            self.model = None


class TextOut:
    """Pieces of an answer as they become final: UTF-8 assembled across tokens, and text that
    could still turn into a stop string held back until it cannot. One per generation (the
    single loop above and each slot of runtime.batch)."""

    def __init__(self, stops, on_text):
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.stops = [s for s in stops if s]
        self.on_text = on_text
        self.pending = ""  # text not yet passed on (may be the start of a stop string)
        self.out: list[str] = []
        self.decoded = 0  # characters decoded so far (passed on, held back or cut)

    def add(self, piece: bytes) -> bool:
        """Add a token's bytes; True when a stop string was reached (the text ends before it)."""
        text = self.utf8.decode(piece)
        self.decoded += len(text)
        self.pending += text
        if self.stops:
            cut = _find_stop(self.pending, self.stops)
            if cut is not None:
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
