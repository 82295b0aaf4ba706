"""The executable's command line: one-shot answers, terminal chat, --info, --verify.

stdout carries only the answer (so `./model -p ... | other` works); banners, progress and
errors go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from . import __version__, process
from .backends import KEYS as GPU_KEYS
from .errors import ContextOverflowError, OutputError, RuntimeFailure, UsageError
from .payload import FORMAT_VERSION, MODEL_ENTRY, NATIVE_CPU_ENTRY, read_payload
from .settings import Settings, env_flag, resolve
from .template import load_template
from .text import printable, printable_tree


def say(msg: str) -> None:
    try:
        print(msg, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # stderr gone: nothing to tell anyone


def write_out(text: str) -> None:
    """Write to stdout and flush, turning a failure into one clear error (issue 8.11)."""
    if process.STDOUT_WAS_CLOSED:
        raise OutputError("standard output is closed, so the answer has nowhere to go; run it without "
                          "closing stdout (or redirect it to a file)")
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        process.silence_stdout()
        raise OutputError(f"cannot write to standard output ({exc.strerror}); check where it goes "
                          "(a full disk, a closed file)") from None


def self_path() -> str:
    """The bundle file this process runs from."""
    if getattr(sys, "frozen", False):
        return sys.executable
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
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-tokens", type=int, dest="max_tokens", help="most tokens to generate (-1: no limit)")
    g.add_argument("--temp", type=float, help="temperature (0: greedy)")
    g.add_argument("--top-p", type=float, dest="top_p")
    g.add_argument("--top-k", type=int, dest="top_k")
    g.add_argument("--repeat-penalty", type=float, dest="repeat_penalty")
    g.add_argument("--seed", type=int, help="random seed (-1: random)")
    g.add_argument("-c", "--ctx", type=int, help="context length in tokens")
    g.add_argument("-t", "--threads", type=int, help="CPU threads (default: the free physical cores)")
    g.add_argument("--system", help="system prompt")
    g.add_argument("--think", choices=["auto", "on", "off"],
                   help="reasoning models: think before answering (auto: as llama-server does for the template)")
    g.add_argument("--gpu", choices=["auto", "off", *GPU_KEYS],
                   help="auto (default): the first GPU back end that works, in this order: "
                        f"{', '.join(GPU_KEYS)}; else the CPU. off: CPU only; a name: that back end or fail")
    g.add_argument("-ngl", "--gpu-layers", type=int, dest="gpu_layers", help="layers to put on the GPU (default: all that fit)")
    g.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's own log on stderr")
    p.add_argument("--version", action="version", version=f"bundle runtime {__version__} (format {FORMAT_VERSION})")
    return p


class Runtime:
    """What a launch has found and loaded: payload, settings, libraries, model."""

    def __init__(self, path: str, args):
        from .native import BusyMeter

        self.busy = BusyMeter()  # read when the thread count is chosen, after the launch's own work
        self.path = path
        self.args = args
        # Opened once: checked, unpacked from and mapped through this one descriptor, so a file
        # renamed over the bundle during the launch is never what runs (issue 22.3).
        self.source = open_once(path)
        self.payload = read_payload(path, self.source)
        self.manifest = self.payload.manifest
        flags = {k: getattr(args, k, None) for k in Settings.field_names()}
        self.settings = resolve(self.manifest.settings, flags)
        self.verbose = bool(args.verbose) or env_flag("BUNDLE_VERBOSE")
        self.cache = None
        self.check = None
        self.n_seq = 1  # conversations the engine holds at once (load_model)
        self.libdir = None
        self.C = None
        self.engine = None
        self.variant = None
        self.backend = None

    def threads(self) -> int:
        if getattr(self, "_threads", None) is None:
            self._threads = self._choose_threads()
        return self._threads

    def _choose_threads(self) -> int:
        from .native import physical_cores, usable_cpus

        wanted = self.settings.threads or physical_cores()
        limit = usable_cpus()
        if wanted > limit:
            # More threads than CPUs only slows llama.cpp down (and 10^5 of them crash it).
            say(f"note: {wanted} threads capped at {limit}, the CPUs this process may use")
            return limit
        if not self.settings.threads:
            # ggml's own thread pool (the portable build has no OpenMP) spins at its barriers:
            # when a thread competes with other busy programs for a core, decoding collapses
            # (measured: 2 threads beside 2 busy programs on 2 cores, next to nothing; 1 thread,
            # 15 tok/s). So the default leaves the cores other programs are using right now.
            free = max(1, limit - self.busy.busy_cpus())
            if free < wanted:
                say(f"note: {free} thread{'s' if free > 1 else ''}: other programs are using {limit - free} of the "
                    f"{limit} CPUs now (-t sets the count)")
                return free
        return wanted

    def check_payload(self) -> None:
        """First launch on this machine: hash what is about to be used (runtime/checks.py)."""
        from . import checks, native

        if self.check is None:
            if self.manifest.model.parts:
                self.payload.find_model_parts()  # a missing part is named before any hashing
            self.cache = native.usable_cache_root()
            self.check = checks.check_once(self.payload, self.cache, say=say)
            pause = os.environ.get("_BUNDLE_TEST_PAUSE_AFTER_CHECK")
            if pause:  # for the test that swaps the file between the check and the load
                say("test hook: paused after the check")
                time.sleep(float(pause))

    def load_libraries(self) -> None:
        from . import native
        from .engine import import_bindings, set_logging

        t0 = time.perf_counter()
        self.check_payload()
        self.libdir = native.extract_entry(self.payload, NATIVE_CPU_ENTRY, root=self.cache, say=say)
        # libllama first (it loads libggml.so.0 by soname), then silence, then the back ends.
        self.C = import_bindings(self.libdir)
        set_logging(self.C, self.verbose)
        native.load_backends(self.libdir, os.environ.get("BUNDLE_CPU_VARIANT") or None)
        self.variant = native.loaded_cpu_variant()
        self.choose_backend()
        self.libs_seconds = time.perf_counter() - t0

    def choose_backend(self) -> None:
        from . import backend
        from .engine import last_error

        import dataclasses

        layout = self.manifest.model.layout
        # The GPU must hold every slot's KV cache: plan for ctx times the slots.
        planned = dataclasses.replace(self.settings, ctx=self.settings.ctx * self.n_seq)
        self.backend = backend.choose(self.payload, planned, self.libdir,
                                      layout.to_json() if layout else None, say=say, last_log=last_error)
        if self.backend.name == "CPU" and self.backend.skipped:
            say(f"running on the CPU: {self.backend.reason}")
        if self.backend.note:
            say(f"note: {self.backend.note}")

    KV_BUDGET = 1 << 30  # the KV caches of all slots together, when --parallel is not given

    def parallel(self) -> int:
        """Slots of the server: --parallel, else 4 (llama-server's default) when their KV caches
        (one per slot, each of the full context) fit in KV_BUDGET, fewer otherwise: 4 for the
        demo model at ctx 4096 (90 MiB each), 2 for an 8B GQA model, 1 for a 7B without GQA."""
        if self.settings.parallel:
            return self.settings.parallel
        layout = self.manifest.model.layout
        if layout is None:
            return 1
        from .gpu import kv_bytes_per_layer

        per_slot = kv_bytes_per_layer(layout.to_json(), self.settings.ctx) * layout.n_layer
        return max(1, min(4, self.KV_BUDGET // max(1, per_slot)))

    def load_model(self, n_seq: int = 1):
        from .engine import Engine, ModelLoadError

        self.n_seq = n_seq
        if self.C is None:
            self.load_libraries()
        if self.manifest.model.parts:
            source, offset = self.payload.find_model_parts(), 0
        elif MODEL_ENTRY not in self.payload.entries:
            raise RuntimeFailure(f"{self.path} holds no model; rebuild it with bundle build")
        else:
            source, offset = self.source, self.payload.absolute_offset(MODEL_ENTRY)
            with open(self.source, "rb") as f:
                f.seek(offset)
                if f.read(4) != b"GGUF":
                    raise RuntimeFailure(f"{self.path}: the model inside it is damaged; copy the file again")
        from . import backend

        try:
            self.engine = backend.load(self.backend, self.settings, lambda gpu_layers, devices: Engine(
                self.C, source, offset, self.settings.ctx, self.threads(), gpu_layers, n_seq, devices), say=say)
        except ModelLoadError as exc:
            # Name the damage if there is any: a hash check costs a read of the model, only on failure.
            problems = [p for p in self.payload.verify() if p.startswith((MODEL_ENTRY, "model part"))]
            if problems:
                raise RuntimeFailure(f"{self.path}: {problems[0]}; copy the file again") from None
            raise RuntimeFailure(f"{exc}; run with -v to see llama.cpp's log") from None
        return self.engine

    def template(self):
        e = self.engine
        name = self.manifest.template_name or self.settings.template or "auto"
        source = self.manifest.template or (e.chat_template() if e else None)
        return load_template(name, source, e.bos_text if e else "", e.eos_text if e else "")

    def sampling(self, stop):
        from .engine import Sampling

        s = self.settings
        return Sampling(s.temp, s.top_p, s.top_k, s.repeat_penalty, s.seed, s.max_tokens, list(stop))

    def template_label(self) -> str:
        """The chat format in words: the GGUF's own, a preset, a file."""
        name = self.manifest.template_name or self.settings.template or "auto"
        return "from the GGUF" if name == "auto" else printable(name)

    def banner(self) -> str:
        m = self.manifest.model
        e = self.engine
        parts = [
            printable(self.manifest.name or m.name or "model"),
            printable(" ".join(x for x in (m.size_label, m.quantization) if x)),
            self.backend.describe() if self.backend else f"CPU ({self.variant or 'unknown variant'})",
            f"{self.threads()} threads",
            f"ctx {e.n_ctx if e else self.settings.ctx}",
            f"{e.n_seq} slots" if e and e.n_seq > 1 else "",
            f"template {self.template_label()}",
        ]
        return " · ".join(p for p in parts if p)

    def server_info(self) -> dict:
        return {
            "name": self.manifest.name,
            "model": self.manifest.model.to_json(),
            "backend": {**self.backend.to_json(), "threads": self.threads()},
            "created": int(time.time()),
        }

    def info(self) -> dict:
        from . import native
        from .native import physical_cores

        if self.C is None:
            self.load_libraries()
        return {
            "bundle": os.fsdecode(self.path),
            "name": self.manifest.name,
            "format_version": self.payload.version,
            "runtime_version": __version__,
            "built": self.manifest.built,
            "model": self.manifest.model.to_json(),
            "template": self.manifest.template_name,
            "settings": self.settings.to_manifest(),
            "backend": {**self.backend.to_json(), "libraries": str(native.real_path(self.libdir))},
            "threads": self.threads(),
            "context": self.settings.ctx,
            "parallel": self.parallel(),
            "hardware": _hardware(physical_cores()),
            "stub": self.manifest.stub.to_json(),
            "cache_dir": str(self.cache),
            "unpacked_in": _unpacked_in(),
            "first_launch_check": self.check,
            "entries": {n: {"size": e.size, "sha256": e.sha256} for n, e in self.payload.entries.items()},
        }


def _unpacked_in() -> dict | None:
    """Where the bootloader unpacked the Python runtime, and why there when it is not the
    usual temp folder (buildsys/bundle_unpack_dir.c)."""
    meipass = getattr(sys, "_MEIPASS", None)
    if not meipass:
        return None
    return {"folder": os.path.dirname(os.path.abspath(meipass)), "reason": getattr(sys, "_bundle_unpack_reason", None)}


def _windows_hardware() -> tuple[str | None, int | None]:
    """The processor's name (from the registry) and the memory size (GlobalMemoryStatusEx)."""
    model = mem = None
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"HARDWARE\DESCRIPTION\System\CentralProcessor\0") as key:
            model = str(winreg.QueryValueEx(key, "ProcessorNameString")[0]).strip() or None
    except OSError:
        pass
    try:
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32),
                        ("ullTotalPhys", ctypes.c_uint64), ("ullAvailPhys", ctypes.c_uint64),
                        ("ullTotalPageFile", ctypes.c_uint64), ("ullAvailPageFile", ctypes.c_uint64),
                        ("ullTotalVirtual", ctypes.c_uint64), ("ullAvailVirtual", ctypes.c_uint64),
                        ("ullAvailExtendedVirtual", ctypes.c_uint64)]

        status = MemoryStatus(dwLength=ctypes.sizeof(MemoryStatus))
        if ctypes.WinDLL("kernel32").GlobalMemoryStatusEx(ctypes.byref(status)):
            mem = status.ullTotalPhys
    except (OSError, AttributeError):
        pass
    return model, mem


def _hardware(cores: int) -> dict:
    model = mem = None
    if sys.platform == "win32":
        model, mem = _windows_hardware()
    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = mem or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
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


# No token of any vocabulary we know spans more bytes than this: a prompt file longer than the
# context times this cannot fit, and is not read further (-f /dev/zero must not fill memory).
MAX_BYTES_PER_TOKEN = 32


def _read_prompt(args, ctx: int) -> str | None:
    if args.prompt is not None and args.file is not None:
        raise UsageError("give either -p PROMPT or -f FILE, not both")
    if args.file is None:
        return args.prompt
    limit = ctx * MAX_BYTES_PER_TOKEN
    name = "standard input" if args.file == "-" else f"the prompt file {args.file}"
    if args.file == "-":
        data = sys.stdin.buffer.read(limit + 1) if sys.stdin is not None else b""
    else:
        try:
            with open(args.file, "rb") as f:
                data = f.read(limit + 1)
        except OSError as exc:
            raise UsageError(f"cannot read the prompt file {args.file}: {exc.strerror}") from None
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


def run(argv) -> int:
    from . import modes

    prog = os.path.basename(sys.argv[0]) if getattr(sys, "frozen", False) else "runtime"
    args = build_parser(prog).parse_args(argv)
    if getattr(sys, "frozen", False):
        from .leftovers import claim_and_sweep

        claim_and_sweep()
    path = self_path()
    if args.verify:
        return modes.verify(path)
    rt = Runtime(path, args)
    if args.info:
        data = rt.info()
        write_out((json.dumps(data, indent=2) if args.json else _format_info(printable_tree(data))) + "\n")
        return 0
    if args.bench:
        return modes.bench(rt, args.json)
    prompt = _read_prompt(args, rt.settings.ctx)
    if prompt is not None:
        if not prompt.strip():
            raise UsageError("the prompt is empty; pass some text with -p or -f")
        return modes.one_shot(rt, prompt)
    if args.server:
        return modes.serve(rt, open_page=True)
    if args.cli:
        return modes.chat(rt)
    if sys.stdin.isatty():
        return modes.chat_with_server(rt, open_page=started_in_own_window())
    # No terminal: started from a file manager (double-click). Serve, and open the page.
    return modes.serve(rt, open_page=True)


def started_in_own_window() -> bool:
    """True when a terminal window was opened just for this program (double-click "run in
    terminal", Windows Explorer): such a window closes the moment we exit, so errors would
    vanish unread. Seen as: a terminal, and no shell among our ancestors."""
    if os.environ.get("BUNDLE_NO_PAUSE"):
        return False
    if sys.platform == "win32":  # pragma: no cover - Windows stub
        try:
            import ctypes

            # The console's processes: the bootloader and us when Explorer opened it for this
            # program; a cmd.exe or PowerShell too when started from one; none at all when the
            # streams are pipes or files (no console to close).
            return 0 < ctypes.windll.kernel32.GetConsoleProcessList((ctypes.c_uint * 4)(), 4) <= 2
        except Exception:
            return False
    if not (sys.stdin and sys.stdin.isatty()):
        return False
    shells = {"bash", "sh", "zsh", "fish", "dash", "ksh", "tcsh", "csh", "nu", "xonsh", "tmux", "screen",
              "sshd", "su", "sudo", "login", "python", "python3", "make", "env", "timeout", "script"}
    pid = os.getppid()
    for _ in range(4):  # the PyInstaller bootloader, then whoever started it
        try:
            with open(f"/proc/{pid}/stat", errors="replace") as f:
                stat = f.read()
        except OSError:
            return False
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        if comm in shells or comm.startswith("python"):
            return False
        if comm != os.path.basename(sys.executable)[:15]:
            return True  # a terminal emulator or file manager started us directly
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
    return False


def pause_if_own_window() -> None:
    if started_in_own_window():
        try:
            input("Press Enter to close this window.")
        except (EOFError, KeyboardInterrupt):
            pass


def _format_info(d: dict) -> str:
    """d has been through printable_tree: nothing from the file reaches the terminal raw."""
    m = d.get("model", {})
    s = d["settings"]
    lines = [
        f"name:        {d.get('name')}",
        f"model:       {m.get('name')} · {m.get('architecture')} · {m.get('size_label')} · {m.get('quantization')}",
        f"template:    {d.get('template')}",
        f"back end:    {d['backend']['name']} ({d['backend']['device'] or d['backend']['cpu_variant']})"
        + (f" — CPU because {d['backend']['cpu_reason']}" if d['backend'].get('cpu_reason') else ""),
        f"threads:     {d['threads']}",
        f"context:     {d['context']}",
        "settings:    " + ", ".join(f"{k}={v}" for k, v in s.items()),
        f"hardware:    {d['hardware']['cpu']}, {d['hardware']['physical_cores']} cores, {d['hardware']['os']}",
        f"format:      {d['format_version']} (runtime {d['runtime_version']})",
        f"cache:       {d['cache_dir']}",
    ]
    unpacked = d.get("unpacked_in")
    if unpacked:
        lines.append(f"unpacked in: {unpacked['folder']}" + (f" (because {unpacked['reason']})" if unpacked.get("reason") else ""))
    stub = d.get("stub") or {}
    if stub.get("glibc_min"):
        lines.append(f"needs:       glibc ≥ {stub['glibc_min']} (built with llama-cpp-python {stub.get('llama_cpp_python')})")
    elif stub.get("windows_min"):
        lines.append(f"needs:       Windows {stub['windows_min']}+ (built with llama-cpp-python "
                     f"{stub.get('llama_cpp_python')})")
    return "\n".join(lines)


# What each kind of failure means for the exit status; the first match wins.
EXIT_STATUS = (
    (UsageError, 2),  # bad flags, settings or prompt: the user can fix the command line
    (RuntimeFailure, 1),  # damaged or incomplete file, cache, model, output: the message says what to do
)


def _status_for(exc: BaseException) -> int | None:
    for kind, status in EXIT_STATUS:
        if isinstance(exc, kind):
            return status
    return None


def main(argv=None) -> int:
    process.ensure_std_streams()
    process.exit_on_sigint()
    frozen = getattr(sys, "frozen", False)
    if frozen:
        process.die_with_parent()
    try:
        debug = env_flag("BUNDLE_DEBUG")
    except UsageError as exc:
        say(f"error: {exc}")
        return 2
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except RuntimeFailure as exc:
        if debug:
            raise
        say(f"error: {printable(exc)}")
        pause_if_own_window()
        return _status_for(exc)
    except KeyboardInterrupt:
        say("")
        return 130
    except BrokenPipeError:
        # the reader of our stdout went away (| head); nothing left to say
        process.silence_stdout()
        return 0
    except Exception as exc:  # the last boundary: no traceback unless asked
        if debug:
            raise
        say(f"error: unexpected {type(exc).__name__}: {printable(exc)}; run again with BUNDLE_DEBUG=1 and report it")
        pause_if_own_window()
        return 1
