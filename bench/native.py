"""The native reference: llama.cpp's own llama-bench and llama-server, built with -march=native
from the llama.cpp source vendored in the same llama-cpp-python sdist the runtime is built from,
and the reference chat templates that source ships (models/templates/*.jinja), which the template
parity tests render with both (tests/test_template_parity.py).

Built once into ~/.cache/bundle/bench/<version>-native/ (never committed); later runs reuse it.
`python bench/native.py` (make reference) builds it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from buildsys.console import log  # noqa: E402
from buildsys.stub import LLAMA_CPP_PYTHON, cache_dir, run_with_progress  # noqa: E402
from buildsys.cache import fetch_sdist  # noqa: E402

TOOLS = ("llama-bench", "llama-server", "ggml-rpc-server")
# Without ggml's AMX code: on a Sapphire Rapids VM, this source built with -march=native by
# Debian's GCC 12 crashes in ggml_backend_amx_mul_mat at the first decode (llama-server and
# llama-bench alike; SIGSEGV, seen 2026-12-04). -march=native defines __AMX_INT8__ and friends,
# and ggml compiles its AMX path only under them; -U takes them back whatever the -march.
NO_AMX = "-U__AMX_INT8__ -U__AMX_TILE__ -U__AMX_BF16__"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DGGML_RPC=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
    f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}",
]


def tools_dir() -> Path:
    """Keyed by version and flags: a change of flags builds anew."""
    flags = hashlib.sha256("|".join(CMAKE_FLAGS).encode()).hexdigest()[:8]
    return cache_dir().parent / "bench" / f"llama.cpp-{LLAMA_CPP_PYTHON}-native-{flags}"


def templates_dir() -> Path:
    return tools_dir() / "templates"


def _source(work: Path) -> Path:
    log(f"reference: fetching llama-cpp-python {LLAMA_CPP_PYTHON} source for its vendored llama.cpp")
    sdist = fetch_sdist(f"llama-cpp-python=={LLAMA_CPP_PYTHON}", work, "llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))


def _keep_templates(src: Path) -> None:
    """The source's reference chat templates, kept beside the tools (read, never copied into the repo)."""
    dest = templates_dir()
    tmp = dest.with_name(".templates-new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src / "models" / "templates", tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def ensure_templates() -> Path:
    dest = templates_dir()
    if dest.is_dir() and any(dest.glob("*.jinja")):
        return dest
    tools_dir().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=tools_dir()))
    try:
        _keep_templates(_source(work))
        return dest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_tools() -> dict[str, Path]:
    folder = tools_dir()
    paths = {t: folder / t for t in TOOLS}
    if all(p.exists() for p in paths.values()):
        ensure_templates()
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=folder))
    try:
        src = _source(work)
        _keep_templates(src)
        build = work / "build"
        log("reference: configuring llama.cpp (-march=native)")
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja" if shutil.which("ninja") else "Unix Makefiles",
                        *CMAKE_FLAGS], check=True, stdout=subprocess.DEVNULL)
        log("reference: compiling llama-bench, llama-server and ggml-rpc-server (about 6 minutes on 2 cores)")
        t0 = time.time()
        run_with_progress(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TOOLS],
                          dict(os.environ), folder / "build.log")
        for t in TOOLS:
            os.replace(build / "bin" / t, paths[t])
        log(f"reference: built in {time.time() - t0:.0f} s -> {folder}")
        return paths
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    print(ensure_tools())
