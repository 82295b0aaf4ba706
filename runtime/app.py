"""The executable's command line: one-shot answers, terminal chat, --info, --verify.

stdout carries only the answer (so `./model -p ... | other` works); banners, progress and
errors go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

from . import __version__
from .errors import RuntimeFailure, UsageError
from .payload import MODEL_ENTRY, FORMAT_VERSION, PayloadError, read_payload
from .settings import Settings, parse_bool, resolve
from .template import TemplateError, load_template

NATIVE_CPU_ENTRY = "native/cpu.tar.zst"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def self_path() -> str:
    """The bundle file this process runs from."""
    if getattr(sys, "frozen", False):
        return sys.executable
    path = os.environ.get("BUNDLE_SELF")
    if not path:
        raise UsageError("not running from a bundle; set BUNDLE_SELF=path/to/bundle to run the runtime from source")
    return path


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Chat with the model inside this file. With no arguments in a terminal: a chat.",
    )
    mode = p.add_argument_group("what to do")
    mode.add_argument("-p", "--prompt", help="answer PROMPT once, print the answer on stdout, exit")
    mode.add_argument("-f", "--file", metavar="FILE", help="read the prompt from FILE (- for stdin)")
    mode.add_argument("--cli", action="store_true", help="chat in the terminal")
    mode.add_argument("--info", action="store_true", help="show the model, settings, back end and hardware")
    mode.add_argument("--verify", action="store_true", help="check every byte of this file against its hashes")
    mode.add_argument("--bench", action="store_true",
                      help="measure prompt (512 tokens) and generation (128 tokens) speed on this machine")
    mode.add_argument("--json", action="store_true", help="with --info or --bench: print JSON")
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-tokens", type=int, dest="max_tokens", help="most tokens to generate (-1: no limit)")
    g.add_argument("--temp", type=float, help="temperature (0: greedy)")
    g.add_argument("--top-p", type=float, dest="top_p")
    g.add_argument("--top-k", type=int, dest="top_k")
    g.add_argument("--repeat-penalty", type=float, dest="repeat_penalty")
    g.add_argument("--seed", type=int, help="random seed (-1: random)")
    g.add_argument("-c", "--ctx", type=int, help="context length in tokens")
    g.add_argument("-t", "--threads", type=int, help="CPU threads (default: physical cores)")
    g.add_argument("--system", help="system prompt")
    g.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's own log on stderr")
    p.add_argument("--version", action="version", version=f"bundle runtime {__version__} (format {FORMAT_VERSION})")
    return p


class Runtime:
    """What a launch has found and loaded: payload, settings, libraries, model."""

    def __init__(self, path: str, args):
        self.path = path
        self.args = args
        self.payload = read_payload(path)
        self.manifest = self.payload.manifest
        flags = {k: getattr(args, k, None) for k in Settings.field_names()}
        self.settings = resolve(self.manifest.get("settings"), flags)
        self.verbose = bool(args.verbose) or parse_bool(os.environ.get("BUNDLE_VERBOSE", "0"), "BUNDLE_VERBOSE")
        self.libdir = None
        self.C = None
        self.engine = None
        self.variant = None

    def threads(self) -> int:
        from .native import physical_cores

        return self.settings.threads or physical_cores()

    def load_libraries(self) -> None:
        from . import native
        from .engine import import_bindings, set_logging

        t0 = time.perf_counter()
        self.libdir = native.extract_entry(self.payload, NATIVE_CPU_ENTRY, say=say)
        # libllama first (it loads libggml.so.0 by soname), then silence, then the back ends.
        self.C = import_bindings(self.libdir)
        set_logging(self.C, self.verbose)
        native.load_backends(self.libdir, os.environ.get("BUNDLE_CPU_VARIANT") or None)
        self.variant = native.loaded_cpu_variant()
        self.libs_seconds = time.perf_counter() - t0

    def load_model(self):
        from .engine import Engine, ModelLoadError

        if self.C is None:
            self.load_libraries()
        if MODEL_ENTRY not in self.payload.entries:
            raise RuntimeFailure(f"{self.path} holds no model; rebuild it with bundle build")
        offset = self.payload.absolute_offset(MODEL_ENTRY)
        with open(self.path, "rb") as f:
            f.seek(offset)
            if f.read(4) != b"GGUF":
                raise RuntimeFailure(f"{self.path}: the model inside it is damaged; copy the file again")
        try:
            self.engine = Engine(self.C, self.path, offset, self.settings.ctx, self.threads())
        except ModelLoadError as exc:
            # Name the damage if there is any: a hash check costs a read of the model, only on failure.
            problems = [p for p in self.payload.verify() if p.startswith(MODEL_ENTRY)]
            if problems:
                raise RuntimeFailure(f"{self.path}: {problems[0]}; copy the file again") from None
            raise RuntimeFailure(f"{exc}; run with -v to see llama.cpp's log") from None
        return self.engine

    def template(self):
        e = self.engine
        name = self.manifest.get("template_name") or self.settings.template or "auto"
        source = self.manifest.get("template") or (e.chat_template() if e else None)
        return load_template(name, source, e.bos_text if e else "", e.eos_text if e else "")

    def sampling(self, stop):
        from .engine import Sampling

        s = self.settings
        return Sampling(s.temp, s.top_p, s.top_k, s.repeat_penalty, s.seed, s.max_tokens, list(stop))

    def banner(self) -> str:
        m = self.manifest.get("model", {})
        e = self.engine
        parts = [
            self.manifest.get("name") or m.get("name") or "model",
            " ".join(x for x in (m.get("size_label"), m.get("quantization")) if x),
            f"CPU ({self.variant or 'unknown variant'})",
            f"{self.threads()} threads",
            f"ctx {e.n_ctx if e else self.settings.ctx}",
        ]
        return " · ".join(p for p in parts if p)

    def info(self) -> dict:
        from .native import cache_root, physical_cores

        if self.C is None:
            self.load_libraries()
        return {
            "bundle": self.path,
            "name": self.manifest.get("name"),
            "format_version": self.payload.version,
            "runtime_version": __version__,
            "built": self.manifest.get("built"),
            "model": self.manifest.get("model", {}),
            "template": self.manifest.get("template_name", "auto"),
            "settings": self.settings.to_manifest(),
            "backend": {"name": "CPU", "cpu_variant": self.variant, "libraries": str(self.libdir)},
            "threads": self.threads(),
            "context": self.settings.ctx,
            "hardware": _hardware(physical_cores()),
            "stub": self.manifest.get("stub", {}),
            "cache_dir": str(cache_root()),
            "entries": {n: {"size": e.size, "sha256": e.sha256} for n, e in self.payload.entries.items()},
        }


def _hardware(cores: int) -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": cores,
        "memory_bytes": mem,
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
    }


def _read_prompt(args) -> str | None:
    if args.prompt is not None and args.file is not None:
        raise UsageError("give either -p PROMPT or -f FILE, not both")
    if args.file is not None:
        if args.file == "-":
            return sys.stdin.read()
        try:
            with open(args.file, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise UsageError(f"cannot read the prompt file {args.file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"the prompt file {args.file} is not UTF-8 text") from None
    return args.prompt


def one_shot(rt: Runtime, prompt: str) -> int:
    engine = rt.load_model()
    say(rt.banner())
    tmpl = rt.template()
    messages = ([{"role": "system", "content": rt.settings.system}] if rt.settings.system else [])
    messages.append({"role": "user", "content": prompt})
    tokens = engine.tokenize_prompt(tmpl.render(messages))
    out = sys.stdout

    def emit(text):
        out.write(text)
        out.flush()

    result = engine.generate(tokens, rt.sampling(tmpl.stop), on_text=emit)
    out.write("\n")
    out.flush()
    if rt.verbose:
        rate = result.completion_tokens / result.decode_seconds if result.decode_seconds else 0
        say(f"{result.prompt_tokens} prompt tokens, {result.completion_tokens} generated, {rate:.1f} tok/s")
    return 0


def chat(rt: Runtime) -> int:
    from .chat import ChatSession, run_chat

    engine = rt.load_model()
    tmpl = rt.template()
    try:
        import readline  # noqa: F401  (line editing and history where available)
    except ImportError:
        pass
    stop_flag = {"stop": False}

    def on_sigint(signum, frame):
        stop_flag["stop"] = True

    def respond(messages, write):
        stop_flag["stop"] = False
        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            tokens = engine.tokenize_prompt(tmpl.render(messages))
            result = engine.generate(
                tokens, rt.sampling(tmpl.stop), on_text=write, cancelled=lambda: stop_flag["stop"]
            )
        finally:
            signal.signal(signal.SIGINT, previous)
        return result.text, result.finish_reason == "cancelled"

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    def respond_safely(messages, write_):
        try:
            return respond(messages, write_)
        except RuntimeFailure as exc:  # e.g. the conversation outgrew the context
            write_(f"\n[{exc}]")
            return "", True

    run_chat(ChatSession(rt.settings.system), input, write, respond_safely, banner=rt.banner())
    return 0


def run(argv) -> int:
    prog = os.path.basename(sys.argv[0]) if getattr(sys, "frozen", False) else "runtime"
    args = build_parser(prog).parse_args(argv)
    if getattr(sys, "frozen", False):
        from .leftovers import claim_and_sweep

        claim_and_sweep()
    path = self_path()
    if args.verify:
        return verify(path)
    rt = Runtime(path, args)
    if args.info:
        data = rt.info()
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            print(_format_info(data))
        return 0
    if args.bench:
        return bench(rt, args.json)
    prompt = _read_prompt(args)
    if prompt is not None:
        if not prompt.strip():
            raise UsageError("the prompt is empty; pass some text with -p or -f")
        return one_shot(rt, prompt)
    if args.cli or sys.stdin.isatty():
        return chat(rt)
    raise UsageError("nothing to do: pass -p PROMPT, -f FILE or --cli (see --help)")


def bench(rt: Runtime, as_json: bool) -> int:
    t0 = time.perf_counter()
    engine = rt.load_model()
    load = time.perf_counter() - t0
    say(rt.banner())
    say("measuring: a 512-token prompt, then 128 generated tokens, 3 times…")
    r = engine.benchmark(reps=int(os.environ.get("BUNDLE_BENCH_REPS", "3")))
    r.update({"backend": "CPU", "cpu_variant": rt.variant, "load_seconds": load,
              "model": rt.manifest.get("model", {}).get("name")})
    if as_json:
        print(json.dumps(r, indent=2))
    else:
        print(f"prompt   {r['n_prompt']:>4} tokens: {r['prompt_tps']:8.1f} tokens/s")
        print(f"generate {r['n_gen']:>4} tokens: {r['decode_tps']:8.1f} tokens/s")
        print(f"back end: CPU ({rt.variant}), {r['threads']} threads; model loaded in {load:.2f} s")
    return 0


def verify(path: str) -> int:
    payload = read_payload(path)
    say(f"checking {len(payload.entries)} entries in {path}…")
    problems = payload.verify()
    if problems:
        for p in problems:
            say(f"damaged: {p}")
        say("this file is damaged; copy it again")
        return 1
    print(f"ok: {path} is intact ({payload.file_size} bytes, {len(payload.entries)} entries)")
    return 0


def _format_info(d: dict) -> str:
    m = d.get("model", {})
    s = d["settings"]
    lines = [
        f"name:        {d.get('name')}",
        f"model:       {m.get('name')} · {m.get('architecture')} · {m.get('size_label')} · {m.get('quantization')}",
        f"template:    {d.get('template')}",
        f"back end:    {d['backend']['name']} ({d['backend']['cpu_variant']})",
        f"threads:     {d['threads']}",
        f"context:     {d['context']}",
        "settings:    " + ", ".join(f"{k}={v}" for k, v in s.items()),
        f"hardware:    {d['hardware']['cpu']}, {d['hardware']['physical_cores']} cores, {d['hardware']['os']}",
        f"format:      {d['format_version']} (runtime {d['runtime_version']})",
        f"cache:       {d['cache_dir']}",
    ]
    stub = d.get("stub") or {}
    if stub.get("glibc_min"):
        lines.append(f"needs:       glibc ≥ {stub['glibc_min']} (built with llama-cpp-python {stub.get('llama_cpp_python')})")
    return "\n".join(lines)


def main(argv=None) -> int:
    debug = os.environ.get("BUNDLE_DEBUG", "") not in ("", "0")
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        say(f"error: {exc}")
        return 2
    except (RuntimeFailure, PayloadError, TemplateError) as exc:
        if debug:
            raise
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("")
        return 130
    except BrokenPipeError:
        # the reader of our stdout went away (| head); nothing left to say
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as exc:  # the last boundary: no traceback unless asked
        if debug:
            raise
        say(f"error: unexpected {type(exc).__name__}: {exc}; run again with BUNDLE_DEBUG=1 and report it")
        return 1
