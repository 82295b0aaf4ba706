"""Extraction of the native libraries into the per-user cache."""

import fcntl
import threading

from runtime.host import cpu, libraries as native
from runtime.bundlefile import read_payload

ENTRY = "native/cpu.tar.zst"


def test_extract_once_and_reuse(built_bundle, tmp_path):
    payload = read_payload(str(built_bundle))
    first = native.extract_entry(payload, ENTRY, root=tmp_path)
    assert (first / "libllama.so").exists() and (first / "libggml.so.0").exists()
    assert (first / "libggml-cpu-x64.so").exists()
    # built by zig with ggml's own thread pool and a static libc++: no compiler runtime travels
    assert not any((first / n).exists() for n in ("libgomp.so.1", "libstdc++.so.6", "libgcc_s.so.1"))
    assert (first / "libggml.so").is_symlink()  # one copy per library, aliases are links
    marker = (first / ".complete").stat().st_mtime_ns
    assert native.extract_entry(payload, ENTRY, root=tmp_path) == first
    assert (first / ".complete").stat().st_mtime_ns == marker


def test_waits_for_the_lock_and_says_so(built_bundle, tmp_path):
    payload = read_payload(str(built_bundle))
    key = payload.entries[ENTRY].digest.split(":")[1][:24]
    (tmp_path / "native").mkdir()
    holder = open(tmp_path / "native" / f"{key}.lock", "a+b")
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
    said, result, waiting = [], [], threading.Event()

    def note(msg):
        said.append(msg)
        waiting.set()

    t = threading.Thread(target=lambda: result.append(native.extract_entry(payload, ENTRY, root=tmp_path, say=note)))
    t.start()
    assert waiting.wait(30), "the extraction never said it was waiting"
    assert t.is_alive() and "waiting for another launch" in said[0]
    holder.close()
    t.join(30)
    assert result and (result[0] / ".complete").exists()


def test_physical_cores():
    assert 1 <= cpu.physical_cores() <= (__import__("os").cpu_count() or 1)
