"""The Windows bundle (`bundle build --target windows-x86_64` -> model.exe), run under wine.

Everything runs the real thing: the stub built by `python build.py --target windows-x86_64`
(MinGW-compiled llama.cpp, python.org's Windows CPython, PyInstaller's Windows bootloader), the
real `bundle build`, the .exe started by wine in a fresh prefix of its own, with pipes for its
standard streams (tests/wine.py), and the official openai client on this side of loopback.
Wine is not Windows: what only a real Windows can show is listed in the README.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

import targets
from conftest import QUESTION, ROOT, WIN_NAME, run_bundle_cmd
from wine import NATIVE

pytestmark = pytest.mark.windows
TARGET = targets.by_name("windows-x86_64")
STUB_DIR = ROOT / "stubs" / TARGET.name
STUB = STUB_DIR / TARGET.stub_name
NAME = WIN_NAME  # (the bundle's name: spaces and letters outside ASCII, conftest.win_bundle)


def test_default_output_is_dist_model_exe(tmp_path, model, win_stub):
    r = run_bundle_cmd("build", model, "--target", "windows-x86_64", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dist" / "SmolLM2-135M-Instruct.exe").is_file()
    assert (tmp_path / "dist" / "SmolLM2-135M-Instruct.exe").read_bytes()[:2] == b"MZ"


def test_exe_answers_paris_from_a_path_with_spaces_and_non_ascii(wine, win_bundle):
    r = wine.run(win_bundle, "-p", QUESTION, "--temp", "0", "-n", "16")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_info_names_the_cpu_variant_and_the_cache_under_localappdata(wine, win_bundle):
    r = wine.run(win_bundle, "--info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    meta = json.loads((STUB_DIR / "stub.json").read_text())
    assert info["backend"]["cpu_variant"] in meta["native"]["cpu"]["cpu_variants"]
    assert info["stub"]["target"] == "windows-x86_64"
    # the runtime's cache is in %LOCALAPPDATA%\bundle, and the libraries were unpacked there
    assert re.match(r"[A-Za-z]:\\users\\[^\\]+\\AppData\\Local\\bundle\\cache", info["cache_dir"], re.I), info["cache_dir"]
    native = wine.local_appdata / "bundle" / "cache" / "native"
    assert any((d / "ggml.dll").exists() for d in native.iterdir())
    assert info["hardware"]["logical_cpus"] >= 1 and info["hardware"]["physical_cores"] >= 1


def test_bundle_verify_and_exe_verify(wine, win_bundle):
    r = run_bundle_cmd("verify", win_bundle)
    assert r.returncode == 0, r.stderr
    r = wine.run(win_bundle, "--verify")
    assert r.returncode == 0, r.stdout + r.stderr


def test_cut_copy_says_it_is_incomplete(wine, win_bundle, tmp_path):
    cut = tmp_path / "cut.exe"
    data = win_bundle.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    r = wine.run(cut, "-p", "hi")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "incomplete" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2, r.stderr  # a message, not a traceback


def test_damaged_model_byte_is_named(wine, win_bundle, tmp_path):
    bad = tmp_path / "bad.exe"
    shutil.copy2(win_bundle, bad)
    size = bad.stat().st_size
    with open(bad, "r+b") as f:  # a byte of the model, well inside the file
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    r = wine.run(bad, "-p", "hi")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "damaged" in r.stderr and "copy" in r.stderr, r.stderr


def test_split_parts_beside_the_exe_and_a_missing_part_is_named(wine, model, win_stub, tmp_path):
    out = tmp_path / "parts" / "small"
    r = run_bundle_cmd("build", model, "--target", "windows-x86_64", "--max-file-size", "60M", "-o", out)
    assert r.returncode == 0, r.stderr
    exe = out.with_name("small.exe")
    parts = sorted(p.name for p in exe.parent.glob("small-*-of-*.gguf"))
    assert len(parts) >= 2, os.listdir(exe.parent)
    assert all((exe.parent / p).stat().st_size <= 60 * 2**20 for p in parts)
    r = wine.run(exe, "-p", QUESTION, "--temp", "0", "-n", "16")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    (exe.parent / parts[-1]).rename(exe.parent / "elsewhere.gguf")
    r = wine.run(exe, "-p", "hi")
    assert r.returncode == 1
    assert parts[-1] in r.stderr, r.stderr


def test_server_answers_the_openai_client(wine, win_bundle):
    openai = pytest.importorskip("openai")
    proc, port = wine.serve(win_bundle)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": QUESTION}],
                                               temperature=0, max_tokens=16)
        assert "Paris" in reply.choices[0].message.content
        chunks = client.chat.completions.create(model="x", messages=[{"role": "user", "content": QUESTION}],
                                                temperature=0, max_tokens=16, stream=True)
        assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        # Killing the bootloader (the process the user started) ends the runtime it started
        # too (runtime/host/process.py waits on its parent's handle): the port closes.
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.time() + 20
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the server still answers 20 s after its bootloader was killed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_the_model_is_never_copied_to_disk(wine, win_bundle):
    """After the runs above: no file written since the prefix was made, in the wine prefix
    (Windows' temp folders, %LOCALAPPDATA%) or in the Linux temp folders, is over half the
    model's size (the bundles and parts the tests built are not looked at)."""
    wine.run(win_bundle, "-p", "Hi", "-n", "4")
    limit = (ROOT / "models" / "SmolLM2-135M-Instruct.gguf").stat().st_size // 2
    built = win_bundle.parents[2]  # pytest's base folder: the bundles themselves live there
    big = []
    for root in (wine.prefix, Path("/tmp"), Path("/var/tmp")):
        for folder, dirs, files in os.walk(root):
            if root != wine.prefix and Path(folder).is_relative_to(built):
                dirs.clear()
                continue
            for name in files:
                p = Path(folder) / name
                try:
                    st = p.lstat()
                except OSError:
                    continue
                if st.st_size > limit and st.st_mtime >= wine.started and p.is_file() and not p.is_symlink():
                    big.append(f"{p} ({st.st_size} bytes)")
    assert not big, big


def test_a_bundle_signed_after_it_was_built_still_runs_and_verifies(wine, win_bundle, tmp_path):
    """Authenticode signing (osslsigncode here; signtool on Windows) appends a certificate table
    and rewrites the PE checksum and one header entry: the bundle must still start, answer and
    verify, and damage must still be found."""
    if not shutil.which("osslsigncode") or not shutil.which("openssl"):
        pytest.fail("osslsigncode and openssl are needed: run `make buildtools-windows`")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=bundle test signer"], check=True, capture_output=True)
    signed = tmp_path / "signed.exe"
    r = subprocess.run(["osslsigncode", "sign", "-certs", cert, "-key", key, "-n", "demo", "-in", win_bundle,
                        "-out", signed], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert signed.stat().st_size > win_bundle.stat().st_size
    r = subprocess.run(["osslsigncode", "verify", "-in", signed, "-CAfile", cert], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr  # osslsigncode's own check of the signature
    r = run_bundle_cmd("verify", signed)
    assert r.returncode == 0, r.stderr
    r = wine.run(signed, "-p", QUESTION, "--temp", "0", "-n", "16")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    # one byte of the bootloader (not one of the fields signing rewrites) changed: found
    data = bytearray(signed.read_bytes())
    data[0x1000] ^= 0xFF
    bad = tmp_path / "bad-signed.exe"
    bad.write_bytes(bytes(data))
    r = run_bundle_cmd("verify", bad)
    assert r.returncode == 1 and "bootloader" in r.stderr, r.stderr


def test_temp_folder_of_a_killed_bundle_is_removed_by_the_next_launch(wine, win_bundle):
    """PyInstaller's bootloader removes its _MEI folder when the runtime ends; a bootloader that
    is killed cannot. The next launch removes such a folder once it is older than two minutes
    (its marker is no longer locked by a live runtime)."""
    temp = Path(os.environ["TEMP"]) if NATIVE else wine.profile / "Temp"
    before = set(temp.glob("_MEI*")) if temp.exists() else set()
    proc, _ = wine.serve(win_bundle)
    try:
        left = set(temp.glob("_MEI*")) - before
        assert len(left) == 1, left
    finally:
        proc.kill()
        proc.wait(timeout=30)
    (folder,) = left
    deadline = time.time() + 20
    while time.time() < deadline and wine_process_running(wine):
        time.sleep(0.2)
    assert folder.exists()  # killed: nobody removed it
    old = time.time() - 600
    os.utime(folder, (old, old))
    r = wine.run(win_bundle, "--info")
    assert r.returncode == 0, r.stderr
    assert not folder.exists()


def wine_process_running(wine) -> bool:
    """Whether a runtime of the test bundle still runs (its folder is in use until it ends)."""
    out = subprocess.run(["ps", "-eo", "comm"], capture_output=True, text=True).stdout if not NATIVE else ""
    return any(NAME[:15] in line for line in out.splitlines())


def test_model_over_4gib_goes_beside_the_exe_by_default(wine, model, win_stub, tmp_path):
    """Windows refuses to start an executable over 4 GiB: for this target the parts are written
    without being asked for, and the .exe answers from them (a sparse, all-zero model: its words
    are nonsense, its loading is real)."""
    from bigmodel import make_big_model

    big = tmp_path / "big.gguf"
    assert make_big_model(big, model) > 4 << 30
    out = tmp_path / "dist" / "big"
    r = run_bundle_cmd("build", big, "--target", "windows-x86_64", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "Windows runs no executable over 4 GiB" in r.stderr, r.stderr
    exe = out.with_name("big.exe")
    parts = sorted(exe.parent.glob("big-*-of-*.gguf"))
    assert len(parts) == 2, os.listdir(exe.parent)
    assert all(p.stat().st_size < 4 << 30 for p in [exe, *parts])
    try:
        r = wine.run(exe, "-p", "Hi", "-n", "2", "--temp", "0", "--ctx", "256", timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
    finally:  # 4 GiB of real bytes: pytest keeps the last runs' folders
        for p in [exe, *parts]:
            p.unlink(missing_ok=True)
