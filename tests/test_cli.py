"""`bundle build / inspect / verify` as a user runs them: the installed command in a subprocess.

Every bad input gets one line that says what is wrong and what to do, exit status 1, and no
partial output left behind.
"""

import json
import os
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import BUNDLE_CMD, as_nobody, run_bundle_cmd


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def assert_one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    # one error line, the last thing said (a summary printed before writing may precede it)
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_build_writes_a_bundle_and_summary(model, out_dir):
    out = out_dir / "demo"
    r = run_bundle_cmd("build", model, "-o", out, "--temp", "0.3", "--system", "Be brief.")
    assert r.returncode == 0, r.stderr
    assert "llama, 135M parameters, Q4_1, trained context 8192" in r.stderr
    assert listing(out_dir) == ["demo"]
    assert os.access(out, os.X_OK)
    d = json.loads(run_bundle_cmd("inspect", out, "--json").stdout)
    assert d["kind"] == "bundle" and d["settings"]["temp"] == 0.3 and d["settings"]["system"] == "Be brief."
    assert d["model"]["quantization"] == "Q4_1" and d["template_name"] == "auto"
    assert {e["name"] for e in d["entries"]} == {"model.gguf", "native/cpu.tar.zst", "native/vulkan.tar.zst"}
    assert d["stub"]["glibc_min"]
    # readelf reads the bundle as a well-formed ELF, without warnings
    re = subprocess.run(["readelf", "-h", "-S", str(out)], capture_output=True, text=True)
    assert re.returncode == 0 and re.stderr == "" and "pydata" in re.stdout


def test_default_output_is_dist_model_stem(model, tmp_path):
    r = run_bundle_cmd("build", model, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert listing(tmp_path / "dist") == ["SmolLM2-135M-Instruct"]


def test_inspect_gguf_and_verify(model, built_bundle):
    r = run_bundle_cmd("inspect", model)
    assert r.returncode == 0 and "Q4_1" in r.stdout and "embedded Jinja template" in r.stdout
    r = run_bundle_cmd("verify", built_bundle)
    assert r.returncode == 0 and "intact" in r.stdout


def test_rebuild_replaces_a_bundle_but_not_other_files(model, out_dir):
    out = out_dir / "demo"
    assert run_bundle_cmd("build", model, "-o", out).returncode == 0
    assert run_bundle_cmd("build", model, "-o", out, "--temp", "0.1").returncode == 0
    assert json.loads(run_bundle_cmd("inspect", out, "--json").stdout)["settings"]["temp"] == 0.1
    precious = out_dir / "notes.txt"
    precious.write_text("my notes")
    r = run_bundle_cmd("build", model, "-o", precious)
    assert_one_line_error(r, "exists and is not a bundle", "--force")
    assert precious.read_text() == "my notes"
    assert listing(out_dir) == ["demo", "notes.txt"]
    assert run_bundle_cmd("build", model, "-o", precious, "--force").returncode == 0
    assert run_bundle_cmd("verify", precious).returncode == 0


def test_output_cannot_be_the_model(model, tmp_path):
    copy = tmp_path / "m.gguf"
    shutil.copy(model, copy)
    r = run_bundle_cmd("build", copy, "-o", copy, "--force")
    assert_one_line_error(r, "is the model itself")
    assert copy.read_bytes()[:4] == b"GGUF"


def bad_inputs(tmp_path, model):
    zipped = tmp_path / "model.zip"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    text = tmp_path / "notes.gguf"
    text.write_text("hello, this is not a model\n")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.gguf"
    with open(model, "rb") as f:
        cut.write_bytes(f.read(50_000_000))
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    return {
        "zip": (zipped, ["not a GGUF file", "unzip it"]),
        "text": (text, ["not a GGUF file"]),
        "empty": (empty, ["is empty", "again"]),
        "truncated": (cut, ["truncated", "50000000", "again"]),
        "directory": (folder, ["is a directory"]),
        "missing": (tmp_path / "nope.gguf", ["does not exist"]),
    }


@pytest.mark.parametrize("case", ["zip", "text", "empty", "truncated", "directory", "missing"])
def test_bad_model_files(case, model, tmp_path, out_dir):
    path, needles = bad_inputs(tmp_path, model)[case]
    r = run_bundle_cmd("build", path, "-o", out_dir / "x")
    assert_one_line_error(r, *needles)
    assert listing(out_dir) == []


def test_unknown_template(model, out_dir):
    r = run_bundle_cmd("build", model, "-o", out_dir / "x", "--template", "vicuna")
    assert_one_line_error(r, "unknown template 'vicuna'", "chatml")
    assert listing(out_dir) == []


def test_broken_template_file(model, tmp_path, out_dir):
    t = tmp_path / "t.jinja"
    t.write_text("{% for m in messages %}{{ m.content }")
    r = run_bundle_cmd("build", model, "-o", out_dir / "x", "--template", t)
    assert_one_line_error(r, "not valid Jinja")
    assert listing(out_dir) == []


@pytest.fixture
def public_tmp():
    """A folder an unprivileged user can reach (pytest's own tmp folders are private to root)."""
    d = Path(tempfile.mkdtemp(prefix="bundle-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_unreadable_model(model, public_tmp):
    p = public_tmp / "locked.gguf"
    shutil.copy(model, p)
    p.chmod(0)
    out_dir = public_tmp / "out"
    out_dir.mkdir(mode=0o777)
    out_dir.chmod(0o777)
    r = subprocess.run(as_nobody() + BUNDLE_CMD + ["build", str(p), "-o", str(out_dir / "x")],
                       capture_output=True, text=True)
    assert_one_line_error(r, "not readable", "permission")
    assert listing(out_dir) == []


def test_unwritable_output_folder(model, public_tmp):
    locked = public_tmp / "locked"
    locked.mkdir(mode=0o555)
    r = subprocess.run(as_nobody() + BUNDLE_CMD + ["build", str(model), "-o", str(locked / "x")],
                       capture_output=True, text=True)
    assert_one_line_error(r, "cannot write to", "writable folder")
    assert listing(locked) == []


def test_full_disk_is_caught_before_writing(model):
    """A real small filesystem (tmpfs in a private mount namespace) too small for the bundle."""
    script = (
        'd=$(mktemp -d) && mount -t tmpfs -o size=40m tmpfs "$d" && '
        f'{" ".join(BUNDLE_CMD)} build {model} -o "$d/x"; echo "rc=$?"; ls -A "$d"'
    )
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                       capture_output=True, text=True)
    assert "rc=1" in r.stdout, (r.stdout, r.stderr)
    assert r.stdout.strip().endswith("rc=1")  # nothing listed after rc: the folder is empty
    assert "not enough free space" in r.stderr and "MiB are free" in r.stderr
    assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1  # checked before the summary


def test_write_failure_midway_leaves_nothing(model, out_dir):
    """The file size limit makes writes fail partway (EFBIG), as a disk filling up would."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000_000, 60_000_000))

    r = subprocess.run(BUNDLE_CMD + ["build", str(model), "-o", str(out_dir / "x")],
                       capture_output=True, text=True, preexec_fn=limit)
    assert_one_line_error(r, "cannot write", "File too large")
    assert listing(out_dir) == []


def test_missing_stub_names_the_folder(model, out_dir, tmp_path):
    env = dict(os.environ, BUNDLE_STUBS_DIR=str(tmp_path / "nostubs"))
    r = run_bundle_cmd("build", model, "-o", out_dir / "x", env=env)
    assert_one_line_error(r, str(tmp_path / "nostubs" / "linux-x86_64"), "build.py")
    r = run_bundle_cmd("build", model, "-o", out_dir / "x", "--target", "windows-x86_64", env=env)
    assert_one_line_error(r, "windows-x86_64", "python build.py --target windows-x86_64")
    r = run_bundle_cmd("build", model, "-o", out_dir / "x", "--target", "linux-aarch64", env=env)
    assert_one_line_error(r, "linux-aarch64", "python build.py --target linux-aarch64")
    r = run_bundle_cmd("build", model, "-o", out_dir / "x", "--target", "macos-arm64")
    assert_one_line_error(r, "unknown target 'macos-arm64'", "linux-x86_64, windows-x86_64")
    assert listing(out_dir) == []


def test_a_target_built_on_other_machines_says_so():
    """A target whose stub this machine cannot build (PyInstaller does not cross-compile) names
    the machines that can, rather than a build command that would fail here."""
    import dataclasses

    import targets

    elsewhere = dataclasses.replace(targets.by_name("linux-x86_64"), name="linux-riscv64", built_on=("linux-riscv64",))
    hint = elsewhere.missing_stub_hint("stubs/linux-riscv64")
    assert "on a linux-riscv64 machine" in hint and "does not cross-compile" in hint
    assert targets.by_name("windows-x86_64").missing_stub_hint("x") == targets.by_name("windows-x86_64").build_hint


def test_a_stub_built_for_another_target_is_refused(model, out_dir):
    """--stub of one target with --target another: one line naming both and the stub to build."""
    win = Path(__file__).resolve().parent.parent / "stubs" / "windows-x86_64" / "bundle-runtime.exe"
    r = run_bundle_cmd("build", model, "-o", out_dir / "x", "--stub", str(win))
    assert_one_line_error(r, "built for windows-x86_64, not linux-x86_64", "--target windows-x86_64")
    assert listing(out_dir) == []


def test_verify_names_damage(bundle_copy):
    from runtime.bundlefile import read_payload

    p = read_payload(str(bundle_copy))
    with open(bundle_copy, "r+b") as f:
        f.seek(p.absolute_offset("model.gguf") + 5_000_000)
        f.write(b"\xff\x00\xff")
    r = run_bundle_cmd("verify", bundle_copy)
    assert r.returncode == 1
    assert "damaged: model.gguf (the model): damaged" in r.stderr
    assert "Traceback" not in r.stderr


def test_verify_truncated(bundle_copy):
    size = bundle_copy.stat().st_size
    with open(bundle_copy, "r+b") as f:
        f.truncate(size // 2)
    r = run_bundle_cmd("verify", bundle_copy)
    assert_one_line_error(r, f"this file is incomplete: {size // 2} of {size} bytes", "copy it again")


def test_hf_reference_from_prefilled_cache_offline(model, out_dir, isolated_user_dirs):
    """hf://owner/repo/file.gguf resolved by huggingface_hub from its cache, HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = isolated_user_dirs / "hf" / "hub" / "models--acme--tiny"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    os.symlink(model, snap / "tiny.gguf")
    r = run_bundle_cmd("build", "hf://acme/tiny/tiny.gguf", "-o", out_dir / "tiny")
    assert r.returncode == 0, r.stderr
    assert listing(out_dir) == ["tiny"]
    r = run_bundle_cmd("build", "hf://acme/tiny/other.gguf", "-o", out_dir / "other")
    assert_one_line_error(r, "not in the local Hugging Face cache", "HF_HUB_OFFLINE")
    r = run_bundle_cmd("build", "hf://acme", "-o", out_dir / "other")
    assert r.returncode == 2 and "hf://owner/repo/file.gguf" in r.stderr
    assert listing(out_dir) == ["tiny"]
