"""The executable's command line: its flags, where the bundle file is (self_path, open_once), and
the prompt given with -p or -f (bounded by what the context can hold)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import ContextOverflowError, UsageError
from ..host.gpu.registry import KEYS as GPU_KEYS
from .. import __version__
from ..bundlefile import FORMAT_VERSION


# Set by a universal file's shell launcher (bundler/universal.py) for the runtime it unpacked
# into the cache and runs: the file the launcher was started as, which holds the model.
LAUNCHED_FROM = "BUNDLE_UNIVERSAL_FILE"


def self_path() -> str:
    """The bundle file this process runs from: its own executable, or the universal file it was
    started from (taken out of the environment, so that nothing this runtime starts inherits it)."""
    if getattr(sys, "frozen", False):
        launched = os.environ.pop(LAUNCHED_FROM, None)
        return os.path.abspath(launched) if launched else sys.executable
    path = os.environ.get("BUNDLE_SELF")
    if not path:
        raise UsageError("not running from a bundle; set BUNDLE_SELF=path/to/bundle to run the runtime from source")
    return path


def open_once(path: str) -> str:
    """A path that names the file opened now, whatever later happens to path: /proc/self/fd/N
    where there is /proc (Linux), else path itself (Windows does not let a running executable be
    replaced). A file that cannot be opened is left to read_payload to explain."""
    if sys.platform == "win32":
        return path
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return path
    source = f"/proc/self/fd/{fd}"
    if not os.path.exists(source):
        os.close(fd)
        return path
    return source


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Chat with the model inside this file. With no arguments in a terminal: a chat.",
    )
    mode = p.add_argument_group("what to do (no arguments: chat in a terminal, plus the web chat)")
    mode.add_argument("-p", "--prompt", help="answer PROMPT once, print the answer on stdout, exit")
    mode.add_argument("-f", "--file", metavar="FILE", help="read the prompt from FILE (- for stdin)")
    mode.add_argument("--cli", action="store_true", help="chat in the terminal")
    mode.add_argument("--server", action="store_true", help="serve the web chat and an OpenAI-compatible API")
    mode.add_argument("--info", action="store_true", help="show the model, settings, back end and hardware")
    mode.add_argument("--verify", action="store_true", help="check every byte of this file against its hashes")
    mode.add_argument("--bench", action="store_true",
                      help="measure prompt (512 tokens) and generation (128 tokens) speed on this machine")
    mode.add_argument("--json", action="store_true", help="with --info or --bench: print JSON")
    w = p.add_argument_group("web server")
    w.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, help="port to listen on (default 8080; 0: any free port)")
    w.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API")
    w.add_argument("-np", "--parallel", type=int, help="conversations decoded together (default: 4, fewer for a "
                   "small context; 1: one at a time)")
    w.add_argument("--no-browser", action="store_true", help="do not open the web chat in a browser")
    w.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="let the web page at ORIGIN (e.g. http://localhost:3000) use the API (repeatable)")
    r = p.add_argument_group("across machines (ggml RPC: for a model too big for one machine)")
    r.add_argument("--rpc-worker", action="store_true", dest="rpc_worker",
                   help="lend this machine's CPU or GPU to a coordinator (--host, --port: where to listen; "
                        "default 127.0.0.1:50052)")
    r.add_argument("--rpc", metavar="HOST:PORT[,...]",
                   help="run the model across these workers and this machine")
    r.add_argument("--rpc-key", dest="rpc_key", metavar="KEY",
                   help="the key coordinator and workers share (or BUNDLE_RPC_KEY); required off loopback")
    r.add_argument("-ts", "--tensor-split", dest="tensor_split", metavar="SHARES",
                   help="with --rpc: each machine's share of the layers, this one first (e.g. 1,3); default: "
                        "by free memory")
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-tokens", type=int, dest="max_tokens", help="most tokens to generate (-1: no limit)")
    g.add_argument("--temp", type=float, help="temperature (0: greedy)")
    g.add_argument("--top-p", type=float, dest="top_p")
    g.add_argument("--top-k", type=int, dest="top_k")
    g.add_argument("--repeat-penalty", type=float, dest="repeat_penalty")
    g.add_argument("--seed", type=int, help="random seed (-1: random)")
    # llama.cpp's samplers, spelled as llama.cpp spells them
    g.add_argument("--min-p", type=float, dest="min_p", help="min-p sampling (default 0.05; 0: off)")
    g.add_argument("--typical", type=float, dest="typical_p", help="locally typical sampling (default 1.0: off)")
    g.add_argument("--top-nsigma", "--top-n-sigma", type=float, dest="top_n_sigma", help="top-n-sigma (-1: off)")
    g.add_argument("--xtc-probability", type=float, dest="xtc_probability", help="XTC: chance of a cut (0: off)")
    g.add_argument("--xtc-threshold", type=float, dest="xtc_threshold", help="XTC: the probability cut (default 0.1)")
    g.add_argument("--dry-multiplier", type=float, dest="dry_multiplier", help="DRY repetition penalty (0: off)")
    g.add_argument("--dry-base", type=float, dest="dry_base")
    g.add_argument("--dry-allowed-length", type=int, dest="dry_allowed_length")
    g.add_argument("--dry-penalty-last-n", type=int, dest="dry_penalty_last_n", help="tokens DRY looks back (-1: context)")
    g.add_argument("--mirostat", type=int, choices=[0, 1, 2], help="Mirostat sampling, 1 or 2 (0: off)")
    g.add_argument("--mirostat-lr", type=float, dest="mirostat_eta", help="Mirostat's learning rate, eta (0.1)")
    g.add_argument("--mirostat-ent", type=float, dest="mirostat_tau", help="Mirostat's target entropy, tau (5.0)")
    g.add_argument("--dynatemp-range", type=float, dest="dynatemp_range", help="dynamic temperature range (0: off)")
    g.add_argument("--dynatemp-exp", type=float, dest="dynatemp_exponent")
    g.add_argument("--samplers", "--sampling-seq", dest="samplers", metavar="ORDER",
                   help="the samplers' order: names separated by ';' (penalties;dry;top_n_sigma;top_k;typ_p;top_p;"
                        "min_p;xtc;temperature) or letters (edskypmxt)")
    g.add_argument("--ignore-eos", action="store_const", const=True, dest="ignore_eos",
                   help="never end the answer early: generate until --max-tokens")
    g.add_argument("-c", "--ctx", type=int, help="context length in tokens")
    g.add_argument("-t", "--threads", type=int, help="CPU threads (default: the free physical cores)")
    g.add_argument("--system", help="system prompt")
    g.add_argument("--context-overflow", choices=["truncate", "error"], dest="context_overflow",
                   help="a chat longer than the context: leave out its oldest turns (truncate, the default) "
                        "or stop with an error")
    g.add_argument("-cram", "--cache-ram", type=int, dest="cache_ram", metavar="MiB",
                   help="computed prompts kept in memory for any slot to reuse (default 8192, at most a quarter "
                        "of the memory; -1: no limit; 0: none)")
    g.add_argument("--no-prompt-cache", action="store_const", const=False, dest="prompt_cache",
                   help="do not save the state after the system prompt in the per-user cache for the next launch")
    g.add_argument("-j", "--json-schema", metavar="SCHEMA", dest="json_schema",
                   help="answer only JSON that SCHEMA allows (a JSON schema; {} for any JSON object)")
    g.add_argument("-jf", "--json-schema-file", metavar="FILE", dest="json_schema_file",
                   help="the same, with the schema read from FILE")
    g.add_argument("--think", choices=["auto", "on", "off"],
                   help="reasoning models: think before answering (auto: as llama-server does for the template)")
    g.add_argument("--gpu", choices=["auto", "off", *GPU_KEYS],
                   help="auto (default): the first GPU back end that works, in this order: "
                        f"{', '.join(GPU_KEYS)}; else the CPU. off: CPU only; a name: that back end or fail")
    g.add_argument("-ngl", "--gpu-layers", type=int, dest="gpu_layers", help="layers to put on the GPU (default: all that fit)")
    g.add_argument("--lora", action="append", metavar="NAME=SCALE",
                   help="apply the packed LoRA adapter NAME at SCALE (0: not at all; repeatable; --info lists them)")
    g.add_argument("--no-lora", action="store_true", dest="no_lora",
                   help="apply none of the packed LoRA adapters (the base model alone)")
    g.add_argument("--base", metavar="PATH",
                   help="an adapter-only bundle: the base model's bundle or .gguf (default: found beside it)")
    g.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's own log on stderr")
    p.add_argument("--version", action="version", version=f"bundle runtime {__version__} (format {FORMAT_VERSION})")
    return p


def adapter_scales(adapters, asked: list[str] | None, none: bool) -> dict[str, float]:
    """The scale of each packed adapter: its default, 0 with --no-lora, or what --lora NAME=SCALE
    says. A name the bundle does not carry, or a scale that is not a number, is a UsageError."""
    import math

    scales = {a.name: 0.0 if none else a.scale for a in adapters}
    for item in asked or ():
        name, eq, value = item.rpartition("=")
        if not eq or not name:
            raise UsageError(f"--lora {item}: give NAME=SCALE, e.g. --lora {next(iter(scales), 'style')}=0.5")
        if name not in scales:
            have = ", ".join(scales) or "none"
            raise UsageError(f"--lora {item}: this bundle carries no adapter named {name!r} (it carries: {have})")
        try:
            scale = float(value)
        except ValueError:
            raise UsageError(f"--lora {item}: {value!r} is not a number") from None
        if not math.isfinite(scale) or abs(scale) > 1000:
            raise UsageError(f"--lora {item}: the scale must be a finite number of at most 1000")
        scales[name] = scale
    return scales


# No token of any vocabulary we know spans more bytes than this: a prompt file longer than the
# context times this cannot fit, and is not read further (-f /dev/zero must not fill memory).
MAX_BYTES_PER_TOKEN = 32


def read_prompt(args, ctx: int) -> str | None:
    if args.prompt is not None and args.file is not None:
        raise UsageError("give either -p PROMPT or -f FILE, not both")
    if args.file is None:
        return args.prompt
    limit = ctx * MAX_BYTES_PER_TOKEN
    name = "standard input" if args.file == "-" else f"the prompt file {args.file}"
    if args.file == "-":
        data = sys.stdin.buffer.read(limit + 1) if sys.stdin is not None else b""
    else:
        data = _read_at_most(args.file, limit + 1, "the prompt file")
    if len(data) > limit:
        raise ContextOverflowError(f"{name} holds more than {limit} bytes, more than a context of {ctx} tokens "
                                   "can hold; shorten it or raise --ctx")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if args.file == "-":
            raise UsageError("the prompt on standard input is not UTF-8 text; convert it first "
                             "(iconv -t UTF-8)") from None
        raise UsageError(f"the prompt file {args.file} is not UTF-8 text") from None


MAX_SCHEMA_FILE = 1 << 20


def _read_at_most(path: str, n: int, what: str) -> bytes:
    """The first n bytes of a file named on the command line (never more: -f /dev/zero)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


def read_schema(args) -> dict | None:
    """The JSON schema of -j or -jf, parsed; None when neither is given."""
    if args.json_schema is not None and args.json_schema_file is not None:
        raise UsageError("give either -j SCHEMA or -jf FILE, not both")
    if args.json_schema_file is not None:
        text = _read_at_most(args.json_schema_file, MAX_SCHEMA_FILE + 1, "the schema file")
        if len(text) > MAX_SCHEMA_FILE:
            raise UsageError(f"the schema file {args.json_schema_file} is larger than {MAX_SCHEMA_FILE} bytes")
        where = f"the schema file {args.json_schema_file}"
    elif args.json_schema is not None:
        text, where = args.json_schema, "-j"
    else:
        return None
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{where} is not JSON ({str(exc)[:100]}); give a JSON schema, e.g. "
                         "'{\"type\": \"object\"}'") from None
    if not isinstance(schema, dict):
        raise UsageError(f"{where} is not a JSON schema (an object); e.g. '{{\"type\": \"object\"}}'")
    return schema
