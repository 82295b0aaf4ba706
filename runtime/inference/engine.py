"""The model and its generation loop, on llama.cpp's own C API (through llama-cpp-python's
low-level ctypes bindings; the high-level `Llama` class costs ~20% of decode speed in Python
work per token and only takes a path).

The model is loaded with llama_model_load_from_file_ptr from the bundle file itself, at the
payload offset, memory-mapped (docs/facts.md #4): no copy of the model is ever written.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import random
import sys
import time

from ..errors import ContextOverflowError, ModelLoadError, RuntimeFailure
from ..host import bindings
from .sampling import PENALTY_LAST_N, Result, Sampling, TokenSampler

__all__ = ["ContextOverflowError", "Engine", "Result", "Sampling"]

# llama-bench's defaults: prompts are decoded in batches of up to 2048, 512 at a time.
N_BATCH = 2048
N_UBATCH = 512


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


class Engine:
    """One model, one context: loading, tokens, samplers, embeddings. Not thread-safe, and it
    generates nothing itself: runtime.inference.scheduler owns it and runs every answer."""

    def __init__(self, C, model_path: str, offset: int, ctx: int, threads: int, gpu_layers: int = 0,
                 n_seq: int = 1, devices: list[int] | None = None, adapters=(), tensor_split=None):
        """devices: the ggml devices to offload to (runtime/host/gpu/choice.py); [] keeps everything on
        the CPU even where a GPU back end is loaded (llama.cpp would otherwise still use it for
        large batches); None lets llama.cpp use every GPU device ggml has."""
        self.C = C
        C.llama_backend_init()
        params = C.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        if devices is not None:
            self._devices = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)  # NULL-terminated
            params.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        if tensor_split:  # each device's share of the offloaded layers, in the order of devices
            n = max(C.llama_max_devices(), len(tensor_split))
            self._split = (ctypes.c_float * n)(*tensor_split)
            params.tensor_split = ctypes.cast(self._split, ctypes.POINTER(ctypes.c_float))
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
            raise ModelLoadError("llama.cpp could not load the model" + (f" ({bindings.last_error()})" if bindings.last_error() else ""))
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
        # Several conversations at once (runtime/inference/scheduler.py): each gets a KV cache of its own, of
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
        self._threadpool, self._threadpool_free = bindings.cpu_threadpool(threads)
        if self._threadpool:
            lib = C._lib
            lib.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            lib.llama_attach_threadpool.restype = None
            lib.llama_attach_threadpool(self.ctx, self._threadpool, self._threadpool)
        self.adapters: list = []  # LoRA adapters loaded (llama_adapter_lora pointers), in the bundle's order
        self.adapter_names: list[str] = []
        self._load_adapters(adapters)
        self.n_seq = max(1, n_seq)
        self.n_ctx = C.llama_n_ctx(self.ctx) // self.n_seq  # what one conversation may hold
        self.n_batch = cparams.n_batch
        self.memory = C.llama_get_memory(self.ctx)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._one = (C.llama_token * 1)()
        self.bos_text = self.token_text(C.llama_vocab_bos(self.vocab))
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.vocab))  # the GGUF's add_bos_token
        self.eos_text = self.token_text(C.llama_vocab_eos(self.vocab))

    def _load_adapters(self, adapters) -> None:
        """LoRA adapters (path, offset, name), each read through a FILE* at its offset in the
        bundle (no copy of it is written anywhere). None applies until set_lora() says so."""
        C = self.C
        for path, offset, name in adapters:
            fp = _fopen(path, offset)
            try:
                adapter = C.llama_adapter_lora_init_from_file_ptr(self.model, fp)
            finally:
                _libc.fclose(fp)
            if not adapter:
                raise ModelLoadError(f"llama.cpp could not load the LoRA adapter {name}"
                                     + (f" ({bindings.last_error()})" if bindings.last_error() else ""))
            self.adapters.append(adapter)
            self.adapter_names.append(name)
        self.lora = tuple(0.0 for _ in self.adapters)

    def set_lora(self, scales) -> None:
        """Apply the adapters at these scales (one per adapter, in order) to whatever is decoded
        next, every sequence alike; an adapter at 0 is left out, so the base's computation is
        exactly the base's. (The scheduler never puts two scale sets in one decode.)"""
        scales = tuple(float(x) for x in scales)
        if scales == self.lora:
            return
        if len(scales) != len(self.adapters):
            raise ValueError(f"{len(scales)} scales for {len(self.adapters)} adapters")
        C = self.C
        active = [(a, x) for a, x in zip(self.adapters, scales) if x != 0]
        handles = (C.llama_adapter_lora_p_ctypes * max(1, len(active)))(*(a for a, _ in active))
        values = (ctypes.c_float * max(1, len(active)))(*(x for _, x in active))
        if C.llama_set_adapters_lora(self.ctx, handles, len(active), values) != 0:
            raise RuntimeFailure("llama.cpp could not apply the LoRA adapters")
        self.lora = scales

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

    def text_limit(self) -> int:
        """The most bytes of text the context could hold (check_text_fits refuses more)."""
        return max(4 * self.n_ctx, self.n_ctx * self.max_token_bytes())

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
    def sampler_for(self, s: Sampling, history: list[int]) -> TokenSampler:
        """The request's samplers. With a grammar, two chains: one without it (sampled first) and
        one with it (sampled only when the grammar rejects the first one's token)."""
        fast = self.chain(s, history, None)
        if not s.grammar:
            return TokenSampler(self.C, fast)
        grammar = self.grammar_sampler(s.grammar)
        if grammar is None:
            self.C.llama_sampler_free(fast)
            raise ValueError("the grammar is not valid GBNF")
        full = self.chain(s, history, s.grammar)
        return TokenSampler(self.C, fast, full, grammar, history)

    def chain(self, s: Sampling, history: list[int], grammar_text: str | None):
        """llama.cpp's sampler chain for s, as llama-server builds it (common_sampler_init): logit
        bias, then the samplers in s.samplers' order, each only when set to do something; Mirostat
        in place of all but the penalties; greedy at temperature 0."""
        C = self.C
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        add = functools.partial(C.llama_sampler_chain_add, chain)
        bias = dict(s.logit_bias)
        if s.ignore_eos:
            bias.update((tok, -math.inf) for tok in self.eog_tokens())
        if bias:
            arr = (C.llama_logit_bias * len(bias))(*(C.llama_logit_bias(tok, b) for tok, b in bias.items()))
            add(C.llama_sampler_init_logit_bias(self.n_vocab, len(bias), arr))
        if grammar_text:
            grammar = self.grammar_sampler(grammar_text)
            if grammar is None:
                C.llama_sampler_free(chain)
                raise ValueError("the grammar is not valid GBNF")
            add(grammar)
        seed = s.seed if s.seed >= 0 else random.SystemRandom().randrange(2**32 - 1)
        greedy = s.temp <= 0
        order = s.samplers if not (s.mirostat or greedy) else [n for n in s.samplers if n in ("penalties", "dry")]
        if "penalties" not in order:  # repeat_penalty and OpenAI's penalties are always applied
            order = ["penalties", *order]
        for name in order:  # each one as llama.cpp adds it (those set to do nothing return at once)
            if name == "penalties":
                if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
                    pen = C.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N, s.repeat_penalty,
                                                         s.frequency_penalty, s.presence_penalty)
                    for tok in history[-PENALTY_LAST_N:]:  # the history goes to this sampler (not the grammar)
                        C.llama_sampler_accept(pen, tok)
                    add(pen)
            elif name == "dry":
                if s.dry_multiplier > 0:
                    add(self._dry(s, history))
            elif name == "top_n_sigma":
                add(C.llama_sampler_init_top_n_sigma(s.top_n_sigma))
            elif name == "top_k":
                add(C.llama_sampler_init_top_k(s.top_k))
            elif name == "typ_p":
                add(C.llama_sampler_init_typical(s.typical_p, 0))
            elif name == "top_p":
                add(C.llama_sampler_init_top_p(s.top_p, 0))
            elif name == "min_p":
                add(C.llama_sampler_init_min_p(s.min_p, 0))
            elif name == "xtc":
                add(C.llama_sampler_init_xtc(s.xtc_probability, s.xtc_threshold, 0, seed))
            elif name == "temperature":
                add(C.llama_sampler_init_temp_ext(s.temp, s.dynatemp_range, s.dynatemp_exponent))
        if greedy:
            add(C.llama_sampler_init_greedy())
        elif s.mirostat == 1:
            add(C.llama_sampler_init_temp(s.temp))
            add(C.llama_sampler_init_mirostat(self.n_vocab, seed, s.mirostat_tau, s.mirostat_eta, 100))
        elif s.mirostat == 2:
            add(C.llama_sampler_init_temp(s.temp))
            add(C.llama_sampler_init_mirostat_v2(seed, s.mirostat_tau, s.mirostat_eta))
        else:
            add(C.llama_sampler_init_dist(seed))
        return chain

    def _dry(self, s: Sampling, history: list[int]):
        """llama.cpp's DRY sampler ("don't repeat yourself"), told the history it looks back over."""
        C = self.C
        breakers = [b.encode("utf-8") for b in s.dry_sequence_breakers]
        arr = (ctypes.c_char_p * max(1, len(breakers)))(*breakers)
        last_n = self.n_ctx if s.dry_penalty_last_n < 0 else s.dry_penalty_last_n
        dry = C.llama_sampler_init_dry(self.vocab, s.dry_multiplier, s.dry_base, s.dry_allowed_length, last_n,
                                       arr, len(breakers))
        for tok in history[-last_n:] if last_n else ():
            C.llama_sampler_accept(dry, tok)
        return dry

    def eog_tokens(self) -> list[int]:
        """The vocabulary's end-of-generation tokens (found once: a pass over the vocabulary)."""
        if getattr(self, "_eog", None) is None:
            is_eog = self.C.llama_vocab_is_eog
            self._eog = [t for t in range(self.n_vocab) if is_eog(self.vocab, t)]
        return self._eog

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

    def clear(self) -> None:
        """Empty every sequence's KV cache (the scheduler's slots forget theirs with it)."""
        self.C.llama_memory_clear(self.memory, True)

    def decode_prompt(self, tokens: list[int]) -> None:
        """Decode tokens into sequence 0 in batches of n_batch, nothing sampled: llama-bench's
        prompt test (runtime.inference.scheduler.benchmark) and the sampler's tests. Answers are
        generated by the scheduler, never here."""
        C = self.C
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i : i + self.n_batch]
            arr = (C.llama_token * len(chunk))(*chunk)
            rc = C.llama_decode(self.ctx, C.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                raise RuntimeFailure(f"llama_decode failed ({rc}); the context may be full, try a larger --ctx")

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {n_prompt} tokens, longer than the context ({self.n_ctx} tokens); "
                "shorten it, /reset the chat, or raise --ctx"
            )

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


