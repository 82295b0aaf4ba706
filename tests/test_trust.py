"""Issue 8: a hostile or damaged bundle, a hostile web page and a hostile request do no harm.
Each attack runs against the real executable (or the real `bundle` command), as an adversary
would run it."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from attack import as_sha256_bundle, copy, cut_copy, flip, read_toc, write_toc
from conftest import QUESTION, run_bundle_cmd, run_exe

from runtime import bundlefile as P


def one_error_line(r):
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr and "[PYI" not in r.stderr, r.stderr
    return errors[0]


# -- 1. a crafted table of contents ------------------------------------------------------------

@pytest.fixture
def canary(isolated_user_dirs):
    """A folder full of the user's files, right next to the cache: nothing may touch it."""
    home = isolated_user_dirs
    precious = home / "Documents"
    precious.mkdir()
    (precious / "thesis.txt").write_text("four years of work")
    yield precious
    assert (precious / "thesis.txt").read_text() == "four years of work"


def _crafted(bundle_copy, mutate):
    toc = read_toc(bundle_copy)
    mutate(toc)
    write_toc(bundle_copy, toc)
    return bundle_copy


def _legacy(entry: dict, value: str) -> None:
    entry.pop("blake3")
    entry["sha256"] = value


TOC_ATTACKS = {
    # the attack that deleted a home folder: a "hash" that is a path out of the cache
    "blake3 path": lambda t: _entry(t, "native/cpu.tar.zst").update(blake3="../../..////" + "a" * 52),
    "blake3 short": lambda t: _entry(t, "native/cpu.tar.zst").update(blake3="abc"),
    "sha256 path (a bundle from before)": lambda t: _legacy(_entry(t, "native/cpu.tar.zst"), "../../..////" + "a" * 52),
    "no digest": lambda t: _entry(t, "native/cpu.tar.zst").pop("blake3"),
    "unknown entry": lambda t: _entry(t, "native/cpu.tar.zst").update(name="../../Documents"),
    "offset outside": lambda t: _entry(t, "model.gguf").update(offset=2**50),
    "negative size": lambda t: _entry(t, "model.gguf").update(size=-5),
    "overlap": lambda t: _entry(t, "model.gguf").update(offset=_entry(t, "native/cpu.tar.zst")["offset"]),
    "duplicate": lambda t: t["entries"].append(dict(_entry(t, "model.gguf"))),
    "bool size": lambda t: _entry(t, "model.gguf").update(size=True),
    "compression": lambda t: _entry(t, "native/cpu.tar.zst").update(compression="../x"),
    "huge layout": lambda t: t["manifest"]["model"]["layout"].update(n_layer=20_000_000),
    "settings object": lambda t: t["manifest"]["settings"].update(ctx={"$gt": 1}),
    "region inside payload": lambda t: t["regions"][0].update(offset=t["regions"][3]["offset"] - 100),
    "not an object": lambda t: t.update(manifest=[1, 2, 3]),
}


def _entry(toc, name):
    return next(e for e in toc["entries"] if e["name"] == name)


@pytest.mark.parametrize("attack", sorted(TOC_ATTACKS))
def test_crafted_toc_is_refused_before_anything_is_used(attack, bundle_copy, canary, isolated_user_dirs):
    _crafted(bundle_copy, TOC_ATTACKS[attack])
    r = run_exe(bundle_copy, "-p", QUESTION)
    assert r.returncode == 1, (r.returncode, r.stderr)
    line = one_error_line(r)
    assert "table of contents is damaged" in line or "lies outside the payload" in line, line
    assert r.stdout == ""
    cache = isolated_user_dirs / "cache" / "bundle"
    assert not (cache / "native").exists()  # nothing was unpacked from a file that failed its checks
    r = run_bundle_cmd("inspect", bundle_copy)
    assert r.returncode == 1 and "table of contents is damaged" in r.stderr or "outside" in r.stderr


def test_the_cache_never_removes_what_it_did_not_make(built_bundle, tmp_path, canary):
    """Defence in depth below the TOC check: unpacking clears only the names the runtime gives
    (its folder, its own work folders), and removes a link as a link, never what it points to."""
    from runtime.host import cachedir, libraries as native

    payload = P.read_payload(str(built_bundle))
    entry = payload.entries["native/cpu.tar.zst"]
    key = entry.digest.split(":")[1][:24]
    root = tmp_path / "native"
    root.mkdir(mode=0o700)
    (root / key).symlink_to(canary)
    (root / f".work-{key}-123").symlink_to(canary)
    (root / "abc").mkdir()
    (root / "abc" / "keep").write_text("x")
    with cachedir.Folder.open_root(root) as natives:
        folder = native._unpack_locked(payload, entry, natives, key)
        folder.close()
    assert (canary / "thesis.txt").exists() and (root / "abc" / "keep").exists()
    assert (root / key).is_dir() and not (root / key).is_symlink() and (root / key / "libllama.so").exists()
    assert not (root / f".work-{key}-123").exists()


# -- 2. damaged weights: checked at the first launch, remembered after -------------------------

def test_flipped_weight_is_caught_at_first_launch(bundle_copy):
    p = P.read_payload(str(bundle_copy))
    model = p.entries["model.gguf"]
    flip(bundle_copy, p.absolute_offset("model.gguf") + model.size - 1_000_000)  # deep in the weights
    r = run_exe(bundle_copy, "-p", QUESTION, "--temp", "0")
    assert r.returncode == 1 and r.stdout == ""
    line = one_error_line(r)
    assert "model.gguf" in line and "damaged" in line and "copy the file again" in line


def test_a_sha256_bundle_from_before_still_verifies_and_flips_are_caught(bundle_copy, tmp_path):
    """Bundles built before BLAKE3 (format 1, SHA-256 digests) are read, checked and run as before."""
    as_sha256_bundle(bundle_copy)
    info = json.loads(run_exe(bundle_copy, "--info", "--json").stdout)
    assert info["format_version"] == 1 and all("sha256" in e for e in info["entries"].values())
    assert info["first_launch_check"]["checked"] is True
    assert run_bundle_cmd("verify", bundle_copy).returncode == 0
    r = run_exe(bundle_copy, "-p", QUESTION, "--temp", "0")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    damaged = copy(bundle_copy, tmp_path / "damaged")
    p = P.read_payload(str(damaged))
    flip(damaged, p.absolute_offset("model.gguf") + p.entries["model.gguf"].size - 1_000_000)
    r = run_exe(damaged, "-p", QUESTION, "--temp", "0")
    line = one_error_line(r)
    assert r.returncode == 1 and "model.gguf" in line and "damaged" in line and "sha256" in line
    r = run_bundle_cmd("verify", damaged)
    assert r.returncode == 1 and "model.gguf" in r.stderr


def test_first_launch_checks_later_launches_do_not(built_bundle, tmp_path):
    first = json.loads(run_exe(built_bundle, "--info", "--json").stdout)["first_launch_check"]
    assert first["checked"] is True and first["bytes"] > 90_000_000
    again = json.loads(run_exe(built_bundle, "--info", "--json").stdout)["first_launch_check"]
    assert again["checked"] is False
    moved = copy(built_bundle, tmp_path / "moved")  # a new file (new inode): checked again
    assert json.loads(run_exe(moved, "--info", "--json").stdout)["first_launch_check"]["checked"] is True


def test_damage_after_a_good_first_launch_is_caught_when_the_file_changes(bundle_copy):
    assert run_exe(bundle_copy, "--info").returncode == 0  # checked and remembered
    p = P.read_payload(str(bundle_copy))
    flip(bundle_copy, p.absolute_offset("model.gguf") + 50_000_000)  # writing changes the mtime
    r = run_exe(bundle_copy, "-p", QUESTION)
    assert r.returncode == 1 and "model.gguf" in one_error_line(r)


# -- 3. verify covers the runtime itself --------------------------------------------------------

@pytest.mark.parametrize("where", ["elf header", "bootloader", "archive", "tail cookie", "payload header"])
def test_verify_reports_damage_to_the_runtime(where, bundle_copy):
    p = P.read_payload(str(bundle_copy))
    regions = p.regions
    offset = {
        "elf header": 0x18,  # e_entry
        "bootloader": regions["bootloader"].size // 2,
        "archive": regions["archive"].offset + regions["archive"].size // 2,
        "tail cookie": regions["tail"].offset + 20,  # inside the stretched pkg_len
        "payload header": p.payload_start + 40,
    }[where]
    flip(bundle_copy, offset)
    r = run_bundle_cmd("verify", bundle_copy)
    assert r.returncode == 1, r.stdout
    label = {"elf header": "runtime's program", "bootloader": "runtime's program", "archive": "Python archive",
             "tail cookie": "archive locator", "payload header": "payload header"}[where]
    assert label in r.stderr and "damaged" in r.stderr, r.stderr


def test_verify_lists_every_damaged_region(bundle_copy):
    p = P.read_payload(str(bundle_copy))
    flip(bundle_copy, p.regions["archive"].offset + 1000)
    flip(bundle_copy, p.absolute_offset("model.gguf") + 5_000_000)
    flip(bundle_copy, p.absolute_offset("native/cpu.tar.zst") + 1000)
    r = run_bundle_cmd("verify", bundle_copy)
    damaged = [x for x in r.stderr.splitlines() if x.startswith("damaged:")]
    assert len(damaged) == 3, r.stderr


def test_damaged_archive_is_caught_at_launch(bundle_copy):
    """A flip in PyInstaller's archive that still lets it start is found by the first-launch check."""
    p = P.read_payload(str(bundle_copy))
    region = p.regions["stub-end"]
    flip(bundle_copy, region.offset + region.size - 10)  # padding before the payload: harmless to run
    r = run_exe(bundle_copy, "-p", QUESTION)
    assert r.returncode == 1 and "the end of the runtime" in one_error_line(r)


# -- 4. cut copies -----------------------------------------------------------------------------

def cannot_speak(bundle: Path, cut: int) -> bool:
    """The cut points whose message cannot say "incomplete", from the layout: inside the runtime
    before its archive's own cookie ends (the bootloader finds no archive at all: "damaged or
    incomplete"). A cut inside the tail's cookie copy past its magic is told by the bootloader
    (issue 22: "ends inside its archive locator: this file is incomplete")."""
    p = P.read_payload(str(bundle))
    stub_cookie_end = p.regions["archive"].offset + p.regions["archive"].size
    return cut < stub_cookie_end


def cut_points(size: int, every: int = 1) -> list[int]:
    return sorted({size * i // 64 for i in range(1, 64)} | {size - k for k in range(1, 257, every)})


def test_cut_copies_say_they_are_incomplete(built_bundle, tmp_path):
    """Every 1/64th of the file and the last 256 bytes (every 4th here; all in `make fuzz`)."""
    size = built_bundle.stat().st_size
    every = int(os.environ.get("BUNDLE_CUT_EVERY", "4"))
    mute, speak = [], []
    dest = tmp_path / "cut"
    for cut in cut_points(size, every):
        cut_copy(built_bundle, dest, cut)
        r = run_exe(dest, "-p", QUESTION, timeout=60)
        said = "this file is incomplete" in r.stderr and "copy it again" in r.stderr
        if said:
            assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
            speak.append(cut)
        else:
            assert r.returncode != 0, r.stderr
            mute.append(cut)
        dest.unlink()
    predicted = [c for c in cut_points(size, every) if cannot_speak(built_bundle, c)]
    assert mute == predicted, (mute, predicted)
    assert len(speak) >= len(cut_points(size, every)) - 8


# -- 5. processes and leftovers ----------------------------------------------------------------

def _children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid):
    """Running, or exiting: a zombie leader whose other threads are still tearing down (and
    still hold its sockets) counts as alive."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0] != "Z" or int(fields[17]) > 1


def test_kill_9_of_the_bundle_ends_its_server(built_bundle):
    proc = subprocess.Popen([str(built_bundle), "--server", "--port", "0", "--no-browser"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    port = None
    while port is None and time.time() < deadline:
        line = proc.stderr.readline()
        if "http://127.0.0.1:" in line:
            port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    assert port
    child = _children(proc.pid)[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    deadline = time.time() + 5

    def serving():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    while (_alive(child) or serving()) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the runtime outlived the bundle"
    assert not serving(), "something still holds the port"


def test_unclaimed_temp_folders_of_dead_launches_are_swept(built_bundle, tmp_path):
    """Launches killed before they claimed their _MEI folder (the first ~0.2 s) leave partial
    folders; a later launch removes them once they are UNCLAIMED_AGE old."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir))
    for delay in (0.02, 0.05, 0.1):
        proc = subprocess.Popen([str(built_bundle), "--info"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        for pid in _children(proc.pid) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    # A foreign PyInstaller program's folder, also old: never touched.
    foreign = tmpdir / "_MEIforeign"
    foreign.mkdir()
    (foreign / "their_app.bin").write_bytes(b"x")
    left = [p for p in tmpdir.iterdir() if p.name.startswith("_MEI")]
    assert len(left) >= 2
    old = time.time() - 600
    for p in left:
        os.utime(p, (old, old))
    r = run_exe(built_bundle, "--info", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmpdir.iterdir() if p.name.startswith("_MEI")) == ["_MEIforeign"]


# -- 6. Ctrl-C -----------------------------------------------------------------------------

def _interrupt_at(bundle, when: float, after_output: bool = False):
    """Start -p as a terminal would (its own process group) and press Ctrl-C (SIGINT to the
    whole group) at `when` seconds, or `when` s after the first byte of the answer."""
    proc = subprocess.Popen([str(bundle), "-p", "Write a long story about a dragon and a knight.", "-n", "400",
                             "--temp", "0"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, bufsize=0,
                            # a shell gives a foreground program SIGINT at its default, even when
                            # the test run itself was started in the background (SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if after_output:
        first = proc.stdout.read(1)
        assert first
    else:
        first = b""
    time.sleep(when)
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    out, err = proc.communicate(timeout=30)
    return proc.returncode, first + out, err.decode(errors="replace")


@pytest.fixture(scope="module")
def full_story(built_bundle):
    r = subprocess.run([str(built_bundle), "-p", "Write a long story about a dragon and a knight.", "-n", "400",
                        "--temp", "0"], capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    return r.stdout


@pytest.mark.parametrize("when", [0.0, 0.05, 0.15, 0.3, 0.5, 0.8])
def test_ctrl_c_at_any_moment_of_a_one_shot(when, built_bundle, full_story):
    rc, out, err = _interrupt_at(built_bundle, when)
    if rc == 0:
        pytest.fail(f"finished before the Ctrl-C at {when}s: make the answer longer ({err})")
    assert full_story.startswith(out.rstrip(b"\n")), out
    if rc in (130, -signal.SIGINT):
        # 130; or ended by SIGINT itself while PyInstaller's bootloader was still unpacking or
        # Python had not yet set up its own handling: both are what a shell shows as 130.
        assert "Traceback" not in err and "[PYI" not in err and "KeyboardInterrupt" not in err, err
        return
    # The one window left (README): a ~20 ms stretch while Python itself starts, before the
    # first code of ours (the runtime hook). PyInstaller then reports the interrupt in its own
    # bootstrap (its message, or the bootloader guard's one line made of it: "error: the runtime
    # could not start: ..."); none of the runtime has run and nothing is on stdout.
    pyi = "[PYI" in err or "error: the runtime could not start" in err
    assert rc in (1, 255) and pyi and "KeyboardInterrupt" in err, (rc, err)
    assert "runtime/" not in err and "'__main__'" not in err and out == b"", err


def test_ctrl_c_while_answering_stops_at_once(built_bundle, full_story):
    rc, out, err = _interrupt_at(built_bundle, 0.2, after_output=True)
    assert rc == 130, (rc, err)
    assert "Traceback" not in err
    assert len(out) < len(full_story) and full_story.startswith(out)


# -- 11. flags and environment -----------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["-t", "100000"], "threads=100000"), (["--temp", "nan"], "temp=nan"),
    (["--repeat-penalty", "nan"], "repeat_penalty=nan"), (["--repeat-penalty", "inf"], "repeat_penalty=inf"),
    (["--top-p", "nan"], "top_p=nan"),
])
def test_bad_numbers_are_refused(built_bundle, flags, needle):
    r = run_exe(built_bundle, "-p", "hi", *flags)
    assert r.returncode == 2 and needle in one_error_line(r), r.stderr


def test_more_threads_than_cpus_are_capped(built_bundle):
    r = run_exe(built_bundle, "-p", QUESTION, "--temp", "0", "-t", "64")
    assert r.returncode == 0 and "Paris" in r.stdout
    assert "capped at" in r.stderr


def test_closed_and_full_stdout(built_bundle):
    r = subprocess.run(f"{built_bundle} -p '{QUESTION}' --temp 0 >&-", shell=True, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "standard output is closed" in one_error_line(r)
    r = subprocess.run(f"{built_bundle} -p '{QUESTION}' --temp 0 > /dev/full", shell=True, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "cannot write to standard output" in one_error_line(r), r.stderr
    r = subprocess.run(f"{built_bundle} --info > /dev/full", shell=True, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "No space left" in one_error_line(r), r.stderr


def test_closed_stderr_keeps_stdout_clean(built_bundle):
    r = subprocess.run(f"{built_bundle} -p '{QUESTION}' --temp 0 2>&-", shell=True, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip().count("\n") == 0 and "Paris" in r.stdout, r.stdout


def test_latin1_terminal_gets_replacement_not_a_crash(built_bundle):
    env = dict(os.environ, PYTHONIOENCODING="iso-8859-1")
    r = subprocess.run([str(built_bundle), "-p", "Translate 'thank you' into Japanese characters.", "--temp", "0",
                        "-n", "20"], capture_output=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert b"UnicodeEncodeError" not in r.stderr and b"Traceback" not in r.stderr


def test_non_utf8_path_and_stdin(built_bundle, tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/b\xff\xfendle"))
    copy(built_bundle, odd)
    r = subprocess.run([odd, "-p", QUESTION, "--temp", "0"], capture_output=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and b"Paris" in r.stdout, r.stderr
    r = subprocess.run([odd, "--info", "--json"], capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and json.loads(r.stdout)["bundle"]
    r = subprocess.run([str(built_bundle), "-f", "-"], input=b"caf\xe9 \xff", capture_output=True, timeout=60)
    assert r.returncode == 2 and b"not UTF-8" in r.stderr and b"Traceback" not in r.stderr


def test_uid_without_passwd_entry_or_home_never_writes_the_working_dir(built_bundle, tmp_path):
    import shutil
    import tempfile

    pub = Path(tempfile.mkdtemp(prefix="bundle-uid-"))
    try:
        pub.chmod(0o777)
        exe = copy(built_bundle, pub / "b")
        exe.chmod(0o755)
        work = pub / "work"
        work.mkdir(mode=0o777)
        work.chmod(0o777)
        tmp = pub / "tmp"
        tmp.mkdir(mode=0o1777)
        tmp.chmod(0o1777)
        env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp)}
        r = subprocess.run(["setpriv", "--reuid=54321", "--regid=54321", "--clear-groups", str(exe), "-p", QUESTION,
                            "--temp", "0"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
        assert list(work.iterdir()) == []  # no ./~/.cache
        assert (tmp / "bundle-cache-54321" / "native").is_dir()
    finally:
        shutil.rmtree(pub, ignore_errors=True)


def test_debug_false_means_false(bundle_copy):
    with open(bundle_copy, "r+b") as f:
        f.truncate(bundle_copy.stat().st_size // 2)
    r = run_exe(bundle_copy, "--info", env=dict(os.environ, BUNDLE_DEBUG="false"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = run_exe(bundle_copy, "--info", env=dict(os.environ, BUNDLE_DEBUG="maybe"))
    assert r.returncode == 2 and "BUNDLE_DEBUG" in r.stderr
