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
import time
from pathlib import Path

WINE_CANDIDATES = ["/usr/lib/wine/wine64", "/usr/bin/wine64", "/usr/bin/wine"]
WINESERVER_CANDIDATES = ["/usr/lib/wine/wineserver", "/usr/bin/wineserver"]


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
        return self

    def stop(self) -> None:
        if NATIVE:
            return
        subprocess.run([WINESERVER, "-k"], env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    @property
    def local_appdata(self) -> Path:
        if NATIVE:
            return Path(os.environ["LOCALAPPDATA"])
        users = self.prefix / "drive_c" / "users"
        return users / os.environ.get("USER", "root") / "AppData" / "Local"

    @property
    def launcher(self) -> list[str]:
        return [] if NATIVE else [WINE]

    def env_with(self, **extra) -> dict:
        return {**self.env, **extra}

    def run(self, exe: Path, *args, input: str = "", timeout: float = 300, cwd=None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """exe under wine with pipes for stdin, stdout and stderr (text, UTF-8)."""
        return subprocess.run([*self.launcher, str(exe), *map(str, args)], input=input, capture_output=True, timeout=timeout,
                              env=env or self.env, cwd=cwd, encoding="utf-8", errors="replace")

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
