"""Issue 22: the cache is a trust boundary, and a checked file stays the file that runs.

Two real users (setpriv, as root can make them): a victim who runs the bundle, and an attacker
who can write where the victim's cache is. The attacker's weapon is a real shared library that
ggml's loader would open (it opens every libggml-cpu-*.so in the libraries' folder to ask its
score): if it is ever loaded, its constructor leaves a file behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from attack import copy, flip
from conftest import QUESTION

from runtime import bundlefile as P

VICTIM, ATTACKER = 54321, 54322
PLANTED_C = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    int fd = open(PWNED, O_WRONLY | O_CREAT, 0666);
    if (fd >= 0) close(fd);
}
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="two users need root to make them (setpriv)")


@pytest.fixture
def stage(built_bundle):
    """A world-traversable folder outside pytest's private tmp: the victim's bundle, a place for
    the attacker's proof of execution, and the planted library."""
    pub = Path(tempfile.mkdtemp(prefix="bundle-trust-"))
    pub.chmod(0o755)
    exe = copy(built_bundle, pub / "model")
    exe.chmod(0o755)
    proof = pub / "proof"
    proof.mkdir(mode=0o777)
    proof.chmod(0o777)
    lib = pub / "libggml-cpu-planted.so"
    src = pub / "planted.c"
    src.write_text(PLANTED_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src), f'-DPWNED="{proof}/pwned"'], check=True)
    lib.chmod(0o755)
    tmp = pub / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    try:
        yield {"pub": pub, "exe": exe, "lib": lib, "pwned": proof / "pwned", "tmp": tmp}
    finally:
        shutil.rmtree(pub, ignore_errors=True)


def as_user(uid: int, *cmd, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *map(str, cmd)],
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def ask(stage, env: dict) -> subprocess.CompletedProcess:
    return as_user(VICTIM, stage["exe"], "-p", QUESTION, "--temp", "0", env={"TMPDIR": str(stage["tmp"]), **env})


def one_line(r) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr and "[PYI" not in r.stderr, r.stderr
    return errors[0]


def chown_tree(path: Path, uid: int) -> None:
    for p in [path, *path.rglob("*")]:
        os.lchown(p, uid, uid)


def lib_folder(cache: Path) -> Path:
    return next(p for p in (cache / "native").iterdir() if p.is_dir() and not p.name.startswith("."))


def test_a_cache_others_can_write_is_refused_and_what_they_planted_never_runs(stage):
    cache = stage["pub"] / "team-cache"
    cache.mkdir()
    os.chown(cache, VICTIM, VICTIM)
    env = {"BUNDLE_CACHE_DIR": str(cache)}
    r = ask(stage, env)
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    # The cache becomes writable by everyone (a team folder, a chmod -R 777), and the attacker
    # plants a CPU "variant" beside the real ones.
    subprocess.run(["chmod", "-R", "a+rwX", str(cache)], check=True)
    r = as_user(ATTACKER, "cp", stage["lib"], lib_folder(cache) / "libggml-cpu-planted.so")
    assert r.returncode == 0, r.stderr
    r = ask(stage, env)
    assert r.returncode == 1 and r.stdout == ""
    line = one_line(r)
    assert str(cache) in line and "chmod go-w" in line, line
    assert not stage["pwned"].exists()
    # The user fixes the root as told: the runtime's own folders below get their modes fixed, and
    # the folder holding the planted file is not the one it unpacked: unpacked again, answered.
    os.chmod(cache, 0o755)
    r = ask(stage, env)
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    assert not stage["pwned"].exists()
    assert not (lib_folder(cache) / "libggml-cpu-planted.so").exists()
    for p in (cache / "native", lib_folder(cache)):
        assert p.stat().st_mode & 0o022 == 0, oct(p.stat().st_mode)


def test_another_users_cache_folder_is_refused_by_name(stage):
    cache = stage["pub"] / "theirs"
    cache.mkdir(mode=0o755)
    os.chown(cache, ATTACKER, ATTACKER)
    r = ask(stage, {"BUNDLE_CACHE_DIR": str(cache)})
    assert r.returncode == 1
    line = one_line(r)
    assert "belongs to another user" in line and str(cache) in line, line


def test_a_library_added_to_a_private_cache_is_not_loaded(stage):
    """Even the user's own hand (or a bug) adding a file: ggml is pointed only at a folder holding
    exactly what was unpacked."""
    cache = stage["pub"] / "mine"
    cache.mkdir(mode=0o700)
    os.chown(cache, VICTIM, VICTIM)
    env = {"BUNDLE_CACHE_DIR": str(cache)}
    assert ask(stage, env).returncode == 0
    planted = lib_folder(cache) / "libggml-cpu-planted.so"
    shutil.copy(stage["lib"], planted)
    os.chown(planted, VICTIM, VICTIM)
    r = ask(stage, env)
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    assert not stage["pwned"].exists() and not planted.exists()


@pytest.mark.parametrize("what", ["native", "libraries", "lock"])
def test_links_in_the_cache_are_never_followed(stage, what):
    cache = stage["pub"] / "mine"
    cache.mkdir(mode=0o700)
    elsewhere = stage["pub"] / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    env = {"BUNDLE_CACHE_DIR": str(cache)}
    key = P.read_payload(str(stage["exe"])).entries["native/cpu.tar.zst"].digest.split(":")[1][:24]
    if what == "native":
        (cache / "native").symlink_to(elsewhere)
    elif what == "libraries":
        (cache / "native").mkdir(mode=0o700)
        shutil.copy(stage["lib"], elsewhere / "libggml-cpu-planted.so")
        (cache / "native" / key).symlink_to(elsewhere)
    else:
        (cache / "native").mkdir(mode=0o700)
        (cache / "native" / f"{key}.lock").symlink_to(elsewhere / "created-through-the-link")
    chown_tree(cache, VICTIM)
    r = ask(stage, env)
    assert r.returncode == 1 and r.stdout == ""
    line = one_line(r)
    assert "link" in line and str(cache / "native") in line, line
    assert sorted(p.name for p in elsewhere.iterdir()) == (["libggml-cpu-planted.so"] if what == "libraries" else [])
    assert not stage["pwned"].exists()


def test_the_fallback_cache_another_user_made_first_is_not_used(stage):
    """No HOME, no XDG cache: the cache goes to the temp folder; the attacker made the usual name
    there first, world-writable, with a library in it. The victim gets a private name of its own."""
    tmp = stage["tmp"]
    theirs = tmp / f"bundle-cache-{VICTIM}"
    r = as_user(ATTACKER, "sh", "-c", f"mkdir -m 777 {theirs} && mkdir -m 777 {theirs}/native && "
                f"cp {stage['lib']} {theirs}/native/")
    assert r.returncode == 0, r.stderr
    r = ask(stage, {})
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    assert not stage["pwned"].exists()
    assert sorted(p.name for p in (theirs / "native").iterdir()) == ["libggml-cpu-planted.so"]  # nothing written
    ours = [p for p in tmp.iterdir() if p.name.startswith(f"bundle-cache-{VICTIM}-")]
    assert len(ours) == 1 and ours[0].stat().st_uid == VICTIM and ours[0].stat().st_mode & 0o077 == 0
    assert (ours[0] / "native").is_dir()
    r = ask(stage, {})  # the next launch finds the same private one
    assert r.returncode == 0 and [p for p in tmp.iterdir() if p.name.startswith(f"bundle-cache-{VICTIM}-")] == ours


# -- the libraries in the cache are checked before they are loaded -----------------------------

def test_a_truncated_cached_library_is_unpacked_again(built_bundle, isolated_user_dirs):
    from conftest import run_exe

    r = run_exe(built_bundle, "-p", QUESTION, "--temp", "0")
    assert r.returncode == 0 and "Paris" in r.stdout
    lib = lib_folder(isolated_user_dirs / "cache" / "bundle") / "libllama.so"
    size = lib.stat().st_size
    with open(lib, "r+b") as f:  # what a full disk or a crash during a write leaves
        f.truncate(size // 3)
    r = run_exe(built_bundle, "-p", QUESTION, "--temp", "0")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    assert lib.stat().st_size == size


def test_a_damaged_cached_library_of_the_right_size_is_unpacked_again(built_bundle, isolated_user_dirs):
    from conftest import run_exe

    assert run_exe(built_bundle, "--info").returncode == 0
    lib = lib_folder(isolated_user_dirs / "cache" / "bundle") / "libggml-base.so"
    before = lib.read_bytes()
    flip(lib, len(before) // 2)
    r = run_exe(built_bundle, "-p", QUESTION, "--temp", "0")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    assert lib.read_bytes() == before


# -- a checked file stays the file that runs ---------------------------------------------------

def _damage_weights(path: Path) -> None:
    p = P.read_payload(str(path))
    flip(path, p.absolute_offset("model.gguf") + p.entries["model.gguf"].size - 1_000_000)


def test_damage_with_the_mtime_put_back_is_still_caught(bundle_copy):
    from conftest import run_exe

    assert run_exe(bundle_copy, "-p", QUESTION, "--temp", "0").returncode == 0  # checked, remembered
    st = bundle_copy.stat()
    _damage_weights(bundle_copy)
    os.utime(bundle_copy, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r
    assert bundle_copy.stat().st_mtime_ns == st.st_mtime_ns
    r = run_exe(bundle_copy, "-p", QUESTION, "--temp", "0")
    assert r.returncode == 1 and r.stdout == "" and "damaged" in r.stderr, r.stderr


def test_a_planted_verdict_is_not_believed(bundle_copy, isolated_user_dirs):
    from conftest import run_exe

    from runtime.bundlefile import checks

    _damage_weights(bundle_copy)
    # The verdict the runtime would look for, planted by hand (or by another program).
    verified = isolated_user_dirs / "cache" / "bundle" / "verified"
    verified.mkdir(parents=True, mode=0o700)
    name = checks.verdict_key(P.read_payload(str(bundle_copy)))
    (verified / name).write_text(json.dumps({"checked": time.time(), "mac": "0" * 64}))
    r = run_exe(bundle_copy, "-p", QUESTION, "--temp", "0")
    assert r.returncode == 1 and "damaged" in r.stderr, r.stderr


def test_a_file_swapped_during_the_launch_is_never_what_runs(built_bundle, tmp_path):
    """The runtime checks the bundle, then (a test hook) pauses; a damaged copy is renamed over
    it. What loads is the file that was checked: the right answer, not the damaged copy's."""
    path = copy(built_bundle, tmp_path / "model")
    damaged = copy(built_bundle, tmp_path / ".damaged")
    _damage_weights(damaged)
    p = P.read_payload(str(damaged))
    with open(damaged, "r+b") as f:  # damage enough to change any answer: zero the whole model
        f.seek(p.absolute_offset("model.gguf") + 8 * 1024 * 1024)
        f.write(b"\0" * (p.entries["model.gguf"].size - 9 * 1024 * 1024))
    proc = subprocess.Popen([str(path), "-p", QUESTION, "--temp", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, _BUNDLE_TEST_PAUSE_AFTER_CHECK="2"))
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "paused after the check" in line:
            break
    assert any("paused after the check" in x for x in seen), "".join(seen)
    os.replace(damaged, path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Paris" in out, "".join(seen) + err
