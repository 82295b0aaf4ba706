"""Issue 22, classes 4-8 on the real executable: nothing hangs, nothing crashes, nothing fills a
disk or memory, and each bad input gets one line saying what is wrong and what to do."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import time
from pathlib import Path

import blake3
import pytest
from attack import flip, read_toc, write_toc
from conftest import QUESTION, run_bundle_cmd, run_exe
from ggufmaker import ARRAY, STRING, llama_kv, write_gguf
from test_cli import assert_one_line_error, listing

from runtime import bundlefile as P

LOCATOR = P.PYI_COOKIE_SIZE  # the 88-byte cookie copy before the tail's padding
FUZZ_LOCATOR = os.environ.get("BUNDLE_FUZZ_LOCATOR") == "all"


def locator_at(path: Path) -> int:
    return path.stat().st_size - P.TAIL_PAD - LOCATOR


def ends_with_one_line(r, seconds: float, took: float, *needles) -> str:
    assert took < seconds, (took, r.stderr)
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "[PYI" not in lines[0], r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def timed(exe: Path, *args, timeout: float = 30, **kw):
    t0 = time.monotonic()
    r = run_exe(exe, *args, timeout=timeout, **kw)
    return r, time.monotonic() - t0


# -- 4. hangs: the archive locator -------------------------------------------------------------

# pkg_len (4 bytes at +8 of the cookie), then toc_offset, toc_len and the Python version: a flip of
# any of their bits
PKG_FIELDS = range(8, 24)


@pytest.mark.parametrize("mode", [("-p", QUESTION), ("--info",), ("--verify",)])
def test_a_flipped_locator_length_ends_at_once_with_one_line(bundle_copy, mode):
    at = locator_at(bundle_copy)
    for i, bit in [(8, 0x01), (9, 0x80), (10, 0x10), (11, 0x04), (12, 0x02), (16, 0x40)]:
        flip(bundle_copy, at + i, bit)
        r, took = timed(bundle_copy, *mode)
        ends_with_one_line(r, 2.0, took, "damaged", "copy the file again")
        flip(bundle_copy, at + i, bit)


def test_a_locator_appended_twice_ends_at_once_with_one_line(bundle_copy):
    with open(bundle_copy, "rb") as f:
        f.seek(locator_at(bundle_copy))
        cookie = f.read(LOCATOR)
    with open(bundle_copy, "ab") as f:
        f.write(cookie)
    for mode in (("-p", QUESTION), ("--info",), ("--verify",)):
        r, took = timed(bundle_copy, *mode)
        ends_with_one_line(r, 2.0, took, "damaged", "copy the file again")


def test_every_bit_of_the_locator_ends_in_time(bundle_copy):
    """No flip of the locator or of the padding after it hangs: each launch ends (one line, or an
    answer when the flip is harmless) well within its time. `make fuzz` flips every bit of the
    locator and every 64th byte of the 32 KiB after it; here every bit of the length and version
    fields and a byte in each other field."""
    at = locator_at(bundle_copy)
    if FUZZ_LOCATOR:
        cases = [(at + i, 1 << b) for i in range(LOCATOR) for b in range(8)]
        cases += [(at + LOCATOR + i, 0xFF) for i in range(0, P.TAIL_PAD, 64)]
    else:
        cases = [(at + i, 1 << b) for i in PKG_FIELDS for b in range(8)]
        cases += [(at + i, 0xFF) for i in (0, 3, 7, 20, 24, 30, 60, 87)]
        cases += [(at + LOCATOR + i, 0xFF) for i in (0, 4096, P.TAIL_PAD - 1)]
    slow = []
    for offset, bit in cases:
        flip(bundle_copy, offset, bit)
        try:
            r, took = timed(bundle_copy, "--verify", timeout=60)
        except subprocess.TimeoutExpired:
            slow.append((offset - at, bit, "hung"))
        else:
            if took > 10 or "Traceback" in r.stderr or "[PYI" in r.stderr:
                slow.append((offset - at, bit, round(took, 1), r.stderr[-300:]))
        flip(bundle_copy, offset, bit)
    assert not slow, slow


# -- 4. hangs: FIFOs and devices ---------------------------------------------------------------

@pytest.mark.parametrize("command", ["build", "inspect", "verify"])
def test_a_fifo_is_refused_not_waited_on(command, tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    r = run_bundle_cmd(command, fifo, *(["-o", tmp_path / "out"] if command == "build" else []), timeout=30)
    assert_one_line_error(r, "not a regular file")
    assert not (tmp_path / "out").exists()


# -- 5. crashes: a file-size limit, a full TMPDIR, an unreadable file --------------------------

def test_a_file_size_limit_is_one_line_and_leaves_no_folder(built_bundle, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run(["prlimit", "--fsize=2000000", str(built_bundle), "-p", QUESTION], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL, env=dict(os.environ, TMPDIR=str(tmp)))
    assert r.returncode == 1, (r.returncode, r.stderr)  # not killed by SIGXFSZ
    ends_with_one_line(r, 60, 0, "file-size limit")
    assert listing(tmp) == []


def test_a_full_tmpdir_is_one_line_and_leaves_no_folder(built_bundle, tmp_path):
    script = f"""
        d=$(mktemp -d) && mount -t tmpfs -o size=6m tmpfs "$d" &&
        TMPDIR="$d" {built_bundle} --info 2>"$d.err" >/dev/null; echo "first=$?";
        ls "$d" | grep -c _MEI; cat "$d.err";
        mount -o remount,size=200m "$d" &&
        TMPDIR="$d" {built_bundle} --info >/dev/null 2>&1; echo "second=$?"
    """
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, BUNDLE_CACHE_DIR=str(tmp_path / "cache")))
    out = r.stdout.splitlines()
    assert out[0] == "first=1" and out[1] == "0", r.stdout + r.stderr  # no partial _MEI left
    errors = [x for x in out[2:-1] if x.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: cannot unpack the runtime into"), out
    assert "free some disk space" in errors[0]
    assert out[-1] == "second=0", r.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs another user (setpriv): root reads any file")
def test_an_executable_that_cannot_be_read_says_so(built_bundle, tmp_path):
    import shutil
    import tempfile

    pub = Path(tempfile.mkdtemp(prefix="bundle-mode-"))
    try:
        pub.chmod(0o755)
        exe = pub / "model"
        shutil.copy(built_bundle, exe)
        exe.chmod(0o111)
        r = subprocess.run(["setpriv", "--reuid=54321", "--regid=54321", "--clear-groups", str(exe), "-p", QUESTION],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                           env={"PATH": "/usr/bin:/bin", "TMPDIR": str(pub)})
        ends_with_one_line(r, 60, 0, "cannot read", "chmod a+r")
    finally:
        shutil.rmtree(pub, ignore_errors=True)


# -- 6. resources: a decompression bomb, an endless prompt file --------------------------------

def _bomb(expands_to: int) -> bytes:
    """A zstd tar of one library whose contents (zeros) are expands_to bytes: a few KiB."""
    import zstandard

    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False) as z:
        with tarfile.open(fileobj=z, mode="w|") as tar:
            info = tarfile.TarInfo("libggml-base.so")
            info.size, info.mode = expands_to, 0o755

            class Zeros(io.RawIOBase):
                left = expands_to

                def readable(self):
                    return True

                def readinto(self, b):
                    n = min(len(b), self.left)
                    b[:n] = bytes(n)
                    self.left -= n
                    return n

            tar.addfile(info, io.BufferedReader(Zeros(), 1 << 20))
    return out.getvalue()


def test_a_decompression_bomb_stops_at_the_recorded_size(bundle_copy, isolated_user_dirs):
    bomb = _bomb(1 << 30)
    assert len(bomb) < 256 * 1024
    toc = read_toc(bundle_copy)
    entry = next(e for e in toc["entries"] if e["name"] == "native/cpu.tar.zst")
    start = P.read_payload(str(bundle_copy)).payload_start
    with open(bundle_copy, "r+b") as f:
        f.seek(start + entry["offset"])
        f.write(bomb)
    entry.update(size=len(bomb), blake3=blake3.blake3(bomb).hexdigest())  # a TOC that vouches for it
    write_toc(bundle_copy, toc)
    r, took = timed(bundle_copy, "-p", QUESTION, timeout=120)
    ends_with_one_line(r, 60, took, "runtime libraries inside it are damaged", "copy the file again")
    cache = isolated_user_dirs / "cache" / "bundle"
    used = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert used < 1 << 20, used  # nothing unpacked, nothing left behind
    assert [p for p in (cache / "native").iterdir() if not p.name.endswith(".lock")] == []


def test_an_endless_prompt_file_is_read_only_as_far_as_the_context(built_bundle):
    r, took = timed(built_bundle, "-f", "/dev/zero", "-c", "512", timeout=60)
    ends_with_one_line(r, 60, took, "more than a context of 512 tokens", "raise --ctx")


# -- 8. messages -------------------------------------------------------------------------------

def test_a_toc_without_the_cpu_libraries_says_so(bundle_copy):
    toc = read_toc(bundle_copy)
    toc["entries"] = [e for e in toc["entries"] if e["name"] != "native/cpu.tar.zst"]
    write_toc(bundle_copy, toc)
    r = run_exe(bundle_copy, "-p", QUESTION)
    ends_with_one_line(r, 60, 0, "carries no native/cpu.tar.zst", "build or copy it again")


def test_one_appended_byte_is_named_as_such(bundle_copy):
    size = bundle_copy.stat().st_size
    with open(bundle_copy, "ab") as f:
        f.write(b"x")
    r = run_exe(bundle_copy, "-p", QUESTION)
    ends_with_one_line(r, 60, 0, "1 byte(s) more than it was built with", f"truncate -s {size}")


def test_a_very_long_model_name_is_clipped_not_a_crash(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", llama_kv(general__name=(STRING, "n" * 5000)))
    r = run_bundle_cmd("build", path, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    name = P.read_payload(str(tmp_path / "out")).manifest.model.name
    assert name.startswith("nnn") and len(name) <= 200
    r = run_bundle_cmd("build", path, "-o", tmp_path / "out2", "--name", "x" * 1500)
    assert_one_line_error(r, "--name is 1500 characters")


def test_an_architecture_llama_cpp_does_not_know_is_refused_at_build(tmp_path):
    kv = [(k.replace("llama.", "nonsense."), t, v) for k, t, v in llama_kv(general__architecture=(STRING, "nonsense"))]
    path = write_gguf(tmp_path / "m.gguf", kv)
    r = run_bundle_cmd("build", path, "-o", tmp_path / "out")
    assert_one_line_error(r, "'nonsense' is not one this runtime's llama.cpp", "supported architecture")
    assert not (tmp_path / "out").exists()


def test_a_token_list_shorter_than_the_embeddings_is_refused_at_build(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", llama_kv(tokenizer__ggml__tokens=(ARRAY, (STRING, ["a", "b", "c"]))))
    r = run_bundle_cmd("build", path, "-o", tmp_path / "out")
    assert_one_line_error(r, "has 3 tokens but its embedding table has 4 rows")
