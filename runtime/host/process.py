"""The process itself: standard streams, signals, and the tie to PyInstaller's bootloader.

A bundle runs as two processes: PyInstaller's bootloader (the pid the user sees) and its child,
the Python runtime. These are the rules both live by (issue 8.5, 8.6, 8.11):

- The child dies with its parent: `kill -9` of the bundle must not leave a server running.
- Ctrl-C during a one-shot answer (`-p`) ends the process at once with status 130 and writes
  nothing more on stdout, whatever it is doing (loading, rendering, generating). The chat and
  the server install their own handling on top (stop the reply; shut down cleanly).
- Closed standard streams are pointed at /dev/null, so no later open() takes their numbers;
  whether stdout was closed is remembered (an answer cannot be delivered there).
- Text streams replace what their encoding cannot show (an ISO-8859-1 terminal) instead of
  failing with UnicodeEncodeError.
"""

from __future__ import annotations

import os
import signal
import sys

STDOUT_WAS_CLOSED = False
PR_SET_PDEATHSIG = 1


def ensure_std_streams() -> None:
    global STDOUT_WAS_CLOSED
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if fd == 1:
                STDOUT_WAS_CLOSED = True
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        stream = getattr(sys, name)
        if stream is None:
            stream = open(fd, mode, buffering=1 if name == "stderr" else -1, encoding="utf-8",
                          errors="replace", closefd=False)
            setattr(sys, name, stream)
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        try:
            if sys.platform == "win32" and not stream.isatty():
                # Pipes and files on Windows default to the ANSI code page (cp1252: no CJK, no
                # emoji); text in and out of a bundle is UTF-8 there too, as on Linux. (A console
                # is written in UTF-16 by Python itself, whatever its code page.)
                stream.reconfigure(encoding="utf-8")
            if stream is not sys.stdin:
                stream.reconfigure(errors="replace" if stream is sys.stdout else "backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass


def exit_now(status: int) -> None:
    """Leave without running Python's exit machinery (no buffered stdout is written)."""
    try:
        os.write(2, b"\n")
    except OSError:
        pass
    os._exit(status)


def _on_sigint(signum, frame) -> None:
    exit_now(130)


def exit_on_sigint() -> None:
    """Ctrl-C: status 130 at once (the default until a mode takes SIGINT over)."""
    signal.signal(signal.SIGINT, _on_sigint)


def die_with_parent() -> None:
    """Ask Linux to kill this process when the bootloader that started it dies, then check that
    it has not died already (it could have, just before the request). On Windows, where the
    bootloader's death leaves its child running, a thread waits on the parent's handle."""
    if sys.platform == "win32":
        _die_with_parent_windows()
        return
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or (parent == 1 and not _init_is_our_bootloader()):
        os._exit(1)


def _init_is_our_bootloader() -> bool:
    """With parent 1: either the bootloader died and init took this process over, or the
    bootloader *is* init (a container's entrypoint, a new PID namespace). Both run the same
    executable, so they share a name (/proc/PID/comm, also under qemu-user, where /proc/1/exe
    would name the emulator)."""
    try:
        with open("/proc/1/comm", "rb") as one, open("/proc/self/comm", "rb") as me:
            return one.read() == me.read()
    except OSError:
        return False


def _die_with_parent_windows() -> None:
    import ctypes
    import threading

    SYNCHRONIZE, INFINITE = 0x00100000, 0xFFFFFFFF
    try:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = ctypes.c_void_p
        kernel32.OpenProcess.argtypes = [ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32]
        kernel32.WaitForSingleObject.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        handle = kernel32.OpenProcess(SYNCHRONIZE, 0, os.getppid())
    except (OSError, AttributeError):
        return
    if not handle:
        return  # the parent is gone already or cannot be watched: nothing to tie to

    def watch():
        kernel32.WaitForSingleObject(handle, INFINITE)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def silence_stdout() -> None:
    """After stdout failed (full disk, closed pipe): make the exit-time flush harmless."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
        sys.stdout = open(1, "w", closefd=False)
    except OSError:
        pass
