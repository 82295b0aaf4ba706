"""The server itself: the listening socket, uvicorn's h11 protocol with the connection limits
(how many at once, request heads and bodies that must keep coming, idle keep-alives), and the
thread it runs in."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time


from ..errors import RuntimeFailure
from ..host.console import say
from .protocol import KEEPALIVE_IDLE_SECONDS, MAX_CONNECTIONS, protocol_class

LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}


def allowed_hosts_for(host: str, port: int) -> set[str] | None:
    """Host header values a request may carry. None (no check) when bound to every interface:
    then the machine's own addresses are legitimate names and cannot all be known."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = {host, f"{host}:{port}"}
    if host in LOOPBACK_NAMES:
        for n in LOOPBACK_NAMES:
            names |= {n, f"{n}:{port}"}
    return names


class PortInUseError(RuntimeFailure):
    pass


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(f"port {port} on {host} is already in use; pass --port N to use another "
                                 "(--port 0 picks a free one)") from None
        raise RuntimeFailure(f"cannot listen on {host}:{port}: {exc.strerror}; check --host and --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _OncePerMinute(logging.Filter):
    """asyncio logs a traceback for every accept() that fails for lack of file descriptors
    (1.3 MB/s under a flood of connections): keep one line a minute instead."""

    def __init__(self):
        super().__init__()
        self.last = 0.0

    def filter(self, record):
        if "out of system resource" not in str(record.msg):
            return True
        now = time.monotonic()
        if now - self.last > 60:
            self.last = now
            say("note: too many connections at once; new ones are refused until some close")
        return False


def raise_fd_limit(want: int = 8192) -> int:
    """The usual soft limit is 1024 file descriptors; the hard one is often far higher."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        return soft
    except (ImportError, ValueError, OSError):
        return 1024


class ServerThread:
    """uvicorn on an already-bound socket, in a thread (the chat may own the foreground)."""

    def __init__(self, app, sock: socket.socket):
        import uvicorn

        fds = raise_fd_limit()
        logging.getLogger("asyncio").addFilter(_OncePerMinute())
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1, timeout_keep_alive=KEEPALIVE_IDLE_SECONDS,
                                http=protocol_class(min(MAX_CONNECTIONS, max(16, fds - 64))))
        self.server = _Server(config)
        self.sock = sock
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)

    def _run(self):
        self.server.run(sockets=[self.sock])

    def start(self):
        self.thread.start()

    def serve_forever(self):
        """In the main thread: uvicorn handles Ctrl-C/SIGTERM and shuts down cleanly."""
        self.server.run(sockets=[self.sock])

    def stop(self):
        self.server.should_exit = True


EXIT_GRACE_SECONDS = 1.8


class _Server:
    """uvicorn.Server whose exit on Ctrl-C/SIGTERM is bounded: if a clean shutdown has not
    finished within EXIT_GRACE_SECONDS (a request stuck in C code), the process leaves anyway."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                super().handle_exit(sig, frame)
                if not getattr(self, "_watchdog", None):
                    self._watchdog = threading.Timer(EXIT_GRACE_SECONDS, os._exit, args=(0,))
                    self._watchdog.daemon = True
                    self._watchdog.start()

        return Server(config)
