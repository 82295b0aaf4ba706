"""What a launch does: answer once, chat in the terminal, serve the web chat, measure, verify."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from ..bundlefile import read_payload
from ..errors import RuntimeFailure, UsageError
from ..host.console import say, write_out
from ..inference.scheduler import CancelFlag, Scheduler, benchmark
from ..prompts import fitting, reasoning
from .chat import DIM, PLAIN, ThoughtStream


def one_shot(rt, prompt: str) -> int:
    """-p / -f: the answer on stdout. Ctrl-C at any moment ends the process with status 130 and
    nothing more on stdout (process.exit_on_sigint, installed before anything else runs)."""
    write_out("")  # a closed stdout fails here, before the model is loaded for nothing
    engine = rt.load_model()
    say(rt.banner())
    tmpl = rt.template()
    messages = [{"role": "system", "content": rt.settings.system}] if rt.settings.system else []
    messages.append({"role": "user", "content": prompt})
    text = tmpl.render(messages, **reasoning.template_switch(tmpl.source, rt.settings.think))
    tokens = engine.tokenize_prompt(text)
    engine.check_fits(len(tokens))
    scheduler = rt.scheduler(engine)
    on_text, thoughts = write_out, None
    if reasoning.is_thinking_template(tmpl.source):
        # The answer alone on stdout (it is piped); the thinking on stderr, where a person reads it.
        show = _is_terminal(sys.stderr)
        thoughts = ThoughtStream(reasoning.Splitter(reasoning.starts_inside(text)), write_out, show=show,
                                 dim=True, note=(lambda s: say(s, end="")) if show else (lambda s: None))
        on_text = thoughts.feed
    result = _wait(scheduler.generate(tokens, rt.sampling(tmpl.stop), on_text=on_text))
    if result.finish_reason == "cancelled":
        return 130
    if thoughts is not None:
        thoughts.finish()
        if not thoughts.answering and thoughts.thought:
            if result.finish_reason == "length":
                say(f"note: the model was still thinking when it reached {result.completion_tokens} tokens, so "
                    "there is no answer; raise -n (--max-tokens), or pass --think off")
            else:
                say("note: the model only thought and gave no answer (the thinking goes to a terminal, "
                    "never to stdout); try again, or pass --think off")
    write_out("\n")
    if rt.verbose:
        rate = result.completion_tokens / result.decode_seconds if result.decode_seconds else 0
        say(f"{result.prompt_tokens} prompt tokens ({result.cached_tokens} found computed), "
            f"{result.completion_tokens} generated, {rate:.1f} tok/s")
    return 0


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def chat(rt, scheduler=None) -> int:
    """The terminal chat. With a scheduler (the web server runs too), turns queue there."""
    from .chat import ChatSession, run_chat

    write_out("")
    engine = rt.load_model()
    scheduler = scheduler or rt.scheduler(engine)
    tmpl = rt.template()
    try:
        pass
    except ImportError:
        pass
    # Between replies Ctrl-C is Python's KeyboardInterrupt (the chat loop says how to leave);
    # during a reply, on_sigint below stops the reply.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    current = {"cancel": CancelFlag()}

    def on_sigint(signum, frame):
        current["cancel"].set()

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    session = ChatSession(rt.settings.system)
    thinks = reasoning.is_thinking_template(tmpl.source)
    dim = _is_terminal(sys.stdout)

    def note_(text):  # what the chat says about the conversation: dimmed on a terminal
        write(DIM + text + PLAIN if dim and text.strip() else text)

    def respond(messages, write_):
        cancel = CancelFlag()
        current["cancel"] = cancel
        previous = signal.signal(signal.SIGINT, on_sigint)
        thoughts = None
        try:
            switch = reasoning.template_switch(tmpl.source, rt.settings.think, session.think)
            sampling = rt.sampling(tmpl.stop)
            if rt.settings.context_overflow == fitting.TRUNCATE:
                limit = engine.n_ctx - fitting.answer_room(engine.n_ctx, sampling.max_tokens)
                messages, dropped = fitting.fit(
                    messages, lambda ms: len(engine.tokenize_prompt(tmpl.render(ms, **switch))), limit,
                    max_bytes=engine.text_limit())
                if dropped:
                    note_(fitting.note(dropped, engine.n_ctx) + "\n")
            text = tmpl.render(messages, **switch)
            tokens = engine.tokenize_prompt(text)
            engine.check_fits(len(tokens))
            on_text = write_
            if thinks:
                thoughts = ThoughtStream(reasoning.Splitter(reasoning.starts_inside(text)), write_,
                                         show=session.show_thinking, dim=_is_terminal(sys.stdout))
                on_text = thoughts.feed
            result = _wait(scheduler.generate(tokens, sampling, on_text=on_text, cancel=cancel))
        except RuntimeFailure as exc:  # e.g. the conversation outgrew the context
            write_(f"\n[{exc}]")
            return "", True
        finally:
            signal.signal(signal.SIGINT, previous)
        if thoughts is not None:
            thoughts.finish()
        if result.finish_reason == "length":  # never a silent cut
            full = result.completion_tokens < sampling.max_tokens or sampling.max_tokens <= 0
            note_("\n" + (f"(the answer reached the end of the context of {engine.n_ctx} tokens)" if full else
                          f"(the answer reached --max-tokens {sampling.max_tokens})"))
        if thoughts is not None:
            return "".join(thoughts.answer), result.finish_reason == "cancelled"  # the history keeps the answer
        return result.text, result.finish_reason == "cancelled"

    run_chat(session, input, write, respond, banner=rt.banner())
    return 0


def _wait(future):
    """A Future's result, waited for in short steps: Python runs signal handlers only between
    them on Windows (a plain wait on a lock there cannot be interrupted by Ctrl+C)."""
    from concurrent.futures import TimeoutError as FutureTimeout

    while True:
        try:
            return future.result(timeout=0.1)
        except FutureTimeout:
            continue


def _display_available() -> bool:
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def open_browser(url: str) -> bool:
    if not _display_available():
        return False
    import webbrowser

    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False


def start_server(rt, scheduler, port: int | None = None, fallback_ports: int = 0):
    """Bind and start the web server in a thread. Returns (server, url)."""
    from ..serving.http import PortInUseError, ServerThread, allowed_hosts_for, bind
    from ..serving.routes import create_app

    host = rt.settings.host
    port = rt.settings.port if port is None else port
    sock = None
    for candidate in range(port, port + fallback_ports + 1):
        try:
            sock = bind(host, candidate)
            break
        except PortInUseError:
            if candidate == port + fallback_ports:
                raise
    real_port = sock.getsockname()[1]
    if port and real_port != port:
        say(f"note: port {port} is in use by another program; serving on port {real_port} instead")
    origins = list(getattr(rt.args, "allow_origin", None) or [])
    origins += [o for o in os.environ.get("BUNDLE_ALLOW_ORIGINS", "").split(",") if o.strip()]
    app = create_app(rt.settings, scheduler, template=rt.template(), info=rt.server_info(),
                     api_key=rt.args.api_key or os.environ.get("BUNDLE_API_KEY") or None,
                     allowed_hosts=allowed_hosts_for(host, real_port), allowed_origins=set(origins))
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{real_port}/"
    return ServerThread(app, sock), url


def serve(rt, open_page: bool, move_if_busy: bool = False) -> int:
    """--server (or a launch without a terminal): the web chat and the API, in the foreground.
    move_if_busy: a double-click with no port asked for takes the next free port when the
    default one is held (another bundle, llama-server, a dev server); a port asked for fails."""
    engine = rt.load_model(n_seq=rt.parallel())
    say(rt.banner())
    scheduler = rt.scheduler(engine)
    if rt.workers is not None:
        rt.on_worker_lost = lambda message: _lost_worker(scheduler, message)
    server, url = start_server(rt, scheduler, fallback_ports=10 if move_if_busy else 0)
    say(f"web chat and OpenAI-compatible API: {url}  (API base {url}v1; Ctrl-C stops)")
    if rt.settings.host not in ("127.0.0.1", "localhost", "::1"):
        say(f"note: listening on {rt.settings.host}, reachable from other machines"
            + ("" if rt.args.api_key else "; consider --api-key"))
    if open_page and not rt.args.no_browser:
        if _display_available():
            threading.Timer(0.3, open_browser, args=(url,)).start()
        else:
            say(f"(no display here, so no browser was opened: open {url} in one)")
    server.serve_forever()
    return 0


def _lost_worker(scheduler, message: str) -> None:
    """--rpc --server: the server stays up to say so (/health, and each request's error)."""
    from ..errors import LostWorkerError

    say(f"error: {message}; requests fail until this server is restarted with the worker running")
    scheduler.break_down(LostWorkerError(f"{message}; restart the worker, then this server"))


def rpc_worker(rt) -> int:
    """--rpc-worker: lend this machine's back end (the GPU this bundle would use here, else the
    CPU) to coordinators, behind the key's handshake (runtime/host/rpc.py)."""
    from ..host import rpc

    host = rt.args.host or "127.0.0.1"
    port = rt.args.port if rt.args.port is not None else rpc.DEFAULT_PORT
    key = rpc.key_from(rt.args.rpc_key)
    if not key and not rpc.is_loopback(host):
        raise UsageError(f"--rpc-worker on {host} needs a key: anyone who reaches this port could use this machine; "
                         f"pass --rpc-key KEY (or set {rpc.KEY_ENV}), the same on the coordinator")
    rt.load_libraries()
    lib, protocol = rt.rpc_library()
    if rt.backend.devices:
        devices = list(rt.backend.devices)
    else:
        devices = [lib.cpu_device()]
    lines = []
    for d in devices:
        free, total = lib.memory(d)
        n = rt.threads()
        kind = rt.backend.name if rt.backend.devices else f"CPU, {n} thread{'s' if n > 1 else ''}"
        lines.append(f"{lib.describe(d)} ({kind}; {free / 2**30:.1f} of {total / 2**30:.1f} GiB free)")
    return rpc.serve_worker(lib, rpc.Offer(devices, lines), host, port, key, rt.threads(), rt.cache, protocol,
                            say, say)


def chat_with_server(rt, open_page: bool = False) -> int:
    """No arguments in a terminal: the chat in the foreground, the web chat in the background
    (and, in a console window opened for this program by a double-click, in the browser)."""
    from ..serving.http import PortInUseError

    scheduler = rt.scheduler(rt.load_model(n_seq=rt.parallel()))
    try:
        server, url = start_server(rt, scheduler, fallback_ports=10)
        server.start()
        say(f"web chat: {url}")
        if open_page:
            open_browser(url)
    except (PortInUseError, RuntimeFailure) as exc:
        say(f"(web chat not started: {exc})")
    return chat(rt, scheduler)


def bench(rt, as_json: bool) -> int:
    t0 = time.perf_counter()
    engine = rt.load_model()
    load = time.perf_counter() - t0
    say(rt.banner())
    say("measuring: a 512-token prompt, then 128 generated tokens…")
    r = benchmark(Scheduler(engine), reps=int(os.environ.get("BUNDLE_BENCH_REPS", "3")))
    r.update({"backend": rt.backend.name, "device": rt.backend.device, "gpu_layers": rt.backend.gpu_layers,
              "cpu_variant": rt.variant, "load_seconds": load,
              "model": rt.manifest.model.name})
    if as_json:
        write_out(json.dumps(r, indent=2) + "\n")
    else:
        write_out(f"prompt   {r['n_prompt']:>4} tokens: {r['prompt_tps']:8.1f} tokens/s\n"
                  f"generate {r['n_gen']:>4} tokens: {r['decode_tps']:8.1f} tokens/s\n"
                  f"back end: {rt.backend.describe()}, {r['threads']} threads; model loaded in {load:.2f} s\n")
    return 0


def verify(path: str) -> int:
    """--verify: every hashed byte, every damaged region named."""
    payload = read_payload(path)
    parts = len(payload.entries) + len(payload.regions)
    say(f"checking {parts} parts of {path}…")
    problems = payload.verify()
    if problems:
        for p in problems:
            say(f"damaged: {p}")
        say("this file is damaged; copy it again")
        return 1
    write_out(f"ok: {path} is intact ({payload.file_size} bytes, {len(payload.entries)} entries, "
              f"{len(payload.regions)} runtime regions)\n")
    return 0
