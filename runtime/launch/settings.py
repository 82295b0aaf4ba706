"""One settings object, one precedence:
built-in defaults < bundle manifest < BUNDLE_* environment < command-line flags.

The bundler writes Settings fields into the manifest; the runtime reads them back here.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

from ..host.gpu.registry import KEYS as GPU_KEYS
from ..errors import UsageError
from ..inference.sampling import DEFAULT_ORDER, LLAMA_SAMPLING, LlamaSamplers, sampler_order, sampler_problems

ENV_PREFIX = "BUNDLE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(value: str, name: str = "value") -> bool:
    """The one place booleans from text are parsed."""
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise UsageError(f"{name}={value!r} is not a yes/no value; use 1 or 0")


def env_flag(name: str, environ=None) -> bool:
    """A yes/no environment variable (BUNDLE_DEBUG, BUNDLE_VERBOSE), read when called."""
    environ = os.environ if environ is None else environ
    return parse_bool(environ.get(name, ""), name)


# Threads beyond this are refused outright (llama.cpp crashes spawning 10^5 of them); within it,
# the runtime caps them at the CPUs the process may use.
MAX_THREADS = 4096


@dataclass
class Settings(LlamaSamplers):
    ctx: int = 4096  # context length in tokens (capped at the model's training context)
    temp: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.0  # llama.cpp's default; 1.1 spoils short factual answers of small models
    max_tokens: int = 1024  # -1: until the model stops or the context is full
    seed: int = -1  # -1: random
    threads: int = 0  # 0: physical cores
    system: str | None = None  # None: the template's own default
    template: str = "auto"
    gpu: str = "auto"  # auto: CUDA, else Vulkan, when it works; off: never touch it; cuda/vulkan: that or fail
    gpu_layers: int = -1  # -1: as many as fit
    host: str = "127.0.0.1"  # the web server: loopback unless asked
    port: int = 8080
    parallel: int = 0  # conversations the server decodes together; 0: auto (runtime.launch.runtime.Runtime.parallel)
    think: str = "auto"  # reasoning models: on, off, or auto (on where llama.cpp would have it on)
    context_overflow: str = "truncate"  # a chat longer than the context: leave out its oldest turns, or error
    cache_ram: int = 8192  # MiB of computed prompts kept in memory across slots (llama-server's); -1: no limit, 0: none
    prompt_cache: bool = True  # the state after the system prompt saved in the per-user cache for the next launch
    # (llama.cpp's other samplers come from LlamaSamplers); samplers: their order, as llama.cpp's --samplers
    samplers: str = ";".join(DEFAULT_ORDER)
    ignore_eos: bool = False

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def llama_sampling(self) -> dict:
        """llama.cpp's sampler settings as runtime.inference.sampling.Sampling fields."""
        return {**{n: getattr(self, n) for n in LLAMA_SAMPLING}, "samplers": sampler_order(self.samplers),
                "ignore_eos": self.ignore_eos}

    def to_manifest(self) -> dict:
        data = asdict(self)  # the bundle's own settings first, llama.cpp's samplers after
        return {k: data[k] for k in sorted(data, key=lambda k: k in LLAMA_SAMPLING)}

    def merged(self, values: dict, source: str) -> "Settings":
        """A copy with values applied (None means 'not given'); values are converted and checked."""
        data = asdict(self)
        for name, value in values.items():
            if value is None or name not in data:
                continue
            data[name] = _convert(name, value, source)
        s = Settings(**data)
        s.check(source)
        return s

    def check(self, source: str = "settings") -> None:
        problems = []
        for name in ("temp", "top_p", "repeat_penalty", *LLAMA_SAMPLING):
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{name}={getattr(self, name)} must be a finite number")
        if problems:
            raise UsageError(f"{source}: " + "; ".join(problems))
        if not 16 <= self.ctx <= 1 << 24:
            problems.append(f"ctx={self.ctx} is out of range (16 to 16777216)")
        if self.temp < 0:
            problems.append(f"temp={self.temp} must be 0 or more")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be 0 (off) or more")
        if self.repeat_penalty <= 0:
            problems.append(f"repeat_penalty={self.repeat_penalty} must be above 0")
        if self.max_tokens == 0 or self.max_tokens < -1:
            problems.append(f"max_tokens={self.max_tokens} must be -1 (no limit) or at least 1")
        if self.gpu not in ("auto", "off", *GPU_KEYS):
            problems.append(f"gpu={self.gpu!r} must be one of auto, off, {', '.join(GPU_KEYS)}")
        if self.gpu_layers < -1:
            problems.append(f"gpu_layers={self.gpu_layers} must be -1 (auto) or 0 or more")
        if self.context_overflow not in ("truncate", "error"):
            problems.append(f"context_overflow={self.context_overflow!r} must be truncate or error")
        if self.think not in ("auto", "on", "off"):
            problems.append(f"think={self.think!r} must be auto, on or off")
        if self.cache_ram < -1:
            problems.append(f"cache_ram={self.cache_ram} must be -1 (no limit), 0 (none) or a size in MiB")
        if not 0 <= self.parallel <= 64:
            problems.append(f"parallel={self.parallel} must be 0 (auto) to 64")
        if not 0 <= self.port <= 65535:
            problems.append(f"port={self.port} must be between 0 and 65535")
        if not 0 <= self.threads <= MAX_THREADS:
            problems.append(f"threads={self.threads} must be 0 (auto) to {MAX_THREADS}")
        problems += sampler_problems({n: getattr(self, n) for n in LLAMA_SAMPLING})
        try:
            sampler_order(self.samplers)
        except ValueError as exc:
            problems.append(f"samplers={self.samplers!r}: {exc}")
        if self.max_tokens > 1 << 30:
            problems.append(f"max_tokens={self.max_tokens} is too large")
        if problems:
            raise UsageError(f"{source}: " + "; ".join(problems))


_TYPES = {f.name: f.type for f in fields(Settings)}


def _convert(name: str, value, source: str):
    kind = _TYPES[name]
    try:
        if "bool" in kind:
            return value if isinstance(value, bool) else parse_bool(value, name)
        if "int" in kind:
            return int(value)
        if "float" in kind:
            return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{source}: {name}={value!r} is not a number") from None
    return None if value is None else str(value)


def from_environment(environ=None) -> dict:
    """BUNDLE_CTX, BUNDLE_TEMP, ... read when called, not at import."""
    environ = os.environ if environ is None else environ
    out = {}
    for name in Settings.field_names():
        key = ENV_PREFIX + name.upper()
        if key in environ:
            out[name] = environ[key]
    return out


def resolve(manifest_settings: dict | None, flags: dict, environ=None) -> Settings:
    s = Settings()
    if manifest_settings:
        s = s.merged(manifest_settings, "bundle manifest")
    s = s.merged(from_environment(environ), "environment (BUNDLE_*)")
    return s.merged(flags, "command line")
