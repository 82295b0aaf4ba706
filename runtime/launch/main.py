"""The program's entry and its one error boundary: the command line parsed, the mode chosen
(one-shot answers, terminal chat, the server, --info, --verify, --bench), every failure one line
and an exit status.

stdout carries only the answer (so `./model -p ... | other` works); banners, progress and
errors go to stderr.
"""

from __future__ import annotations

import json
import os
import sys

from ..errors import RuntimeFailure, UsageError
from ..host import process
from ..host.console import say, write_out
from ..text import printable, printable_tree
from .cli import LAUNCHED_FROM, build_parser, read_prompt, read_schema, self_path
from .runtime import Runtime
from .settings import env_flag

def run(argv) -> int:
    from . import modes

    prog = os.path.basename(os.environ.get(LAUNCHED_FROM) or sys.argv[0]) if getattr(sys, "frozen", False) \
        else "runtime"
    args = build_parser(prog).parse_args(argv)
    if getattr(sys, "frozen", False):
        from ..host.leftovers import claim_and_sweep

        claim_and_sweep()
    path = self_path()
    if args.verify:
        return modes.verify(path)
    if args.rpc_worker and args.rpc:
        raise UsageError("--rpc-worker lends this machine to a coordinator; --rpc makes it one: choose one")
    rt = Runtime(path, args)
    if args.rpc_worker and not args.info:
        return modes.rpc_worker(rt)
    _say_if_wine_could_be_native(rt)
    if args.info:
        data = rt.info()
        write_out((json.dumps(data, indent=2) if args.json else _format_info(printable_tree(data))) + "\n")
        return 0
    if args.bench:
        return modes.bench(rt, args.json)
    schema = read_schema(args)  # a schema that does not parse is named before the model loads
    if schema is not None and args.prompt is None and args.file is None and not args.cli:
        raise UsageError("-j/-jf shapes the answers of -p, -f and --cli; the API takes a schema per request "
                         "(response_format)")
    prompt = read_prompt(args, rt.settings.ctx)
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
    # No terminal: started from a file manager (double-click). Serve, and open the page; on the
    # next free port when the default one is taken and no port was asked for.
    asked = args.port is not None or os.environ.get("BUNDLE_PORT") is not None
    return modes.serve(rt, open_page=True, move_if_busy=not asked)


def _say_if_wine_could_be_native(rt) -> None:
    """A universal file run under wine on Linux (a double-click where wine's binfmt_misc entry
    claims every "MZ" file, or `wine model.exe`): the same file has the native runtime, which is
    faster and can use the GPU."""
    from ..host.cpu import wine_host

    host = wine_host()
    native = [t for t in rt.targets if t.startswith(f"{(host or '').lower()}-")]
    if host and native:
        say(f"note: this is the Windows runtime, running under wine on {host}; this file runs natively there "
            f"(faster, and on the GPU): sh ./{os.path.basename(rt.path)}")


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
        f"hardware:    {d['hardware']['cpu']}, {d['hardware']['physical_cores']} cores, {d['hardware']['os']} "
        f"{d['hardware']['machine']}",
        "cpu features: " + (" ".join(d['hardware'].get('cpu_features') or []) or "(not known)"),
        f"target:      {(d.get('stub') or {}).get('target') or '(not recorded)'}"
        + (f" (this file runs on {', '.join(d['runs_on'])})" if len(d.get('runs_on') or ()) > 1 else ""),
        f"format:      {d['format_version']} (runtime {d['runtime_version']})",
        *([("adapters:    " + ", ".join(
            f"{a['name']} at {a['scale']:g}" + (f" (packed at {a['default_scale']:g})" if a['scale'] != a['default_scale']
                                                else "") for a in d["adapters"]))] if d.get("adapters") else []),
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
