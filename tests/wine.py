"""Running the Windows bundle under Debian's wine, for the tests and the benchmark.

Each user of this module gets its own wine prefix (a fresh "Windows" with nothing of the
build's in it). Two traps of wine are handled here: Python under wine dies at start when its
standard streams are regular files or /dev/null, so every run gets pipes; and wine's background
processes (wineserver, services) keep inherited pipes open, so they are started first with
their output discarded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from buildsys.windows import WINE_CANDIDATES, WINESERVER_CANDIDATES, add_wine_standins


def _first(paths: list[str]) -> str | None:
    return next((p for p in paths if os.access(p, os.X_OK)), None)


# On Windows itself (the hosted-runner workflow, .github/workflows/windows.yml) the same tests
# start the .exe directly.
NATIVE = sys.platform == "win32"
WINE = None if NATIVE else _first(WINE_CANDIDATES)
WINESERVER = None if NATIVE else _first(WINESERVER_CANDIDATES)


class Wine:
    def __init__(self, prefix: Path):
        self.prefix = prefix
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("BUNDLE_", "XDG_", "PYTHON", "VIRTUAL_ENV", "LD_", "WINE"))}
        env.update(WINEPREFIX=str(prefix), WINEDEBUG="-all", WINEARCH="win64", WINEDLLOVERRIDES="mscoree,mshtml=",
                   DISPLAY="")
        self.env = env

    def start(self) -> "Wine":
        if not hasattr(self, "started"):
            self.started = time.time()
        self.prefix.mkdir(parents=True, exist_ok=True)
        if NATIVE:
            return self
        null = subprocess.DEVNULL
        subprocess.run([WINESERVER, "-p"], env=self.env, stdin=null, stdout=null, stderr=null)
        subprocess.run([WINE, "wineboot", "-i"], env=self.env, stdin=null, stdout=null, stderr=null, timeout=600)
        add_wine_standins(self.prefix)  # what Windows has and wine 8 lacks (bcryptprimitives.dll)
        # A Windows process that lives as long as the prefix is used: wine stops its own
        # background processes (services, explorer, plugplay) when the last program ends and
        # starts them again with the next one, which they then slow down by seconds and whose
        # pipes they hold open after it has exited. cmd.exe waits on a pipe we never write to.
        self.keeper = subprocess.Popen([WINE, "cmd.exe"], env=self.env, stdin=subprocess.PIPE, stdout=null,
                                       stderr=null)
        return self

    def stop(self) -> None:
        if NATIVE:
            return
        keeper = getattr(self, "keeper", None)
        if keeper is not None:
            keeper.kill()
            keeper.wait()
            self.keeper = None
        subprocess.run([WINESERVER, "-k"], env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    @property
    def local_appdata(self) -> Path:
        if NATIVE:
            return Path(os.environ["LOCALAPPDATA"])
        return self.profile / "AppData" / "Local"

    @property
    def profile(self) -> Path:
        """The user's folder in the prefix (wine names it after $USER, else the passwd entry)."""
        if NATIVE:
            return Path(os.environ["USERPROFILE"])
        users = [p for p in (self.prefix / "drive_c" / "users").iterdir() if p.name.lower() != "public"]
        assert len(users) == 1, users
        return users[0]

    @property
    def launcher(self) -> list[str]:
        return [] if NATIVE else [WINE]

    def env_with(self, **extra) -> dict:
        return {**self.env, **extra}

    def run(self, exe: Path, *args, input: str = "", timeout: float = 300, cwd=None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """exe under wine with pipes for stdin, stdout and stderr (text, UTF-8). Its output is
        what arrived by the time it exited and a moment after: a wine background process it
        started may hold the pipes open for longer."""
        proc = subprocess.Popen([*self.launcher, str(exe), *map(str, args)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or self.env, cwd=cwd)
        chunks = {1: [], 2: []}

        def drain(stream, key):
            for block in iter(lambda: os.read(stream.fileno(), 1 << 16), b""):
                chunks[key].append(block)

        readers = [threading.Thread(target=drain, args=(proc.stdout, 1), daemon=True),
                   threading.Thread(target=drain, args=(proc.stderr, 2), daemon=True)]
        for r in readers:
            r.start()
        try:
            proc.stdin.write(input.encode())
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        for r in readers:
            r.join(timeout=1.0)

        def text(key):
            return b"".join(chunks[key]).decode("utf-8", "replace")

        return subprocess.CompletedProcess(proc.args, proc.returncode, text(1), text(2))

    def serve(self, exe: Path) -> tuple[subprocess.Popen, int]:
        """exe --server on a free port of 127.0.0.1, answering /health: (process, port)."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = self.popen(exe, "--server", "--port", port, "--no-browser")
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        except BaseException:
            proc.kill()
            raise
        return proc, port

    def popen(self, exe: Path, *args, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen([*self.launcher, str(exe), *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env or self.env, encoding="utf-8", errors="replace")


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")
