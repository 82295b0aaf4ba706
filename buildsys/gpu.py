"""The GPU back ends' build steps, one per registry row (runtime.host.gpu.registry): CUDA from
PyPI's CUDA 13 wheels, Vulkan from Debian's headers and glslc (buildsys/vulkan.py); and keeping
a stub folder's back ends exactly the ones asked for."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from runtime.host.gpu.registry import CUDA, GPU_BACKENDS, VULKAN

from . import vulkan
from .cache import fetch_sdist, publish
from .console import log
from .elf import check_portable
from .stub import LLAMA_CPP_PYTHON, ZSTD_LEVEL, cache_dir, pack_tar, run_with_progress, write_meta

# CUDA from PyPI. CUDA 12's wheels ship no nvcc (only ptxas), so 13 is the newest *and* the only
# major buildable from the registries: Turing (sm_75) and newer, NVIDIA driver 580 or newer.
CUDA_PACKAGES = ["nvidia-cuda-nvcc==13.5.37", "nvidia-cuda-runtime==13.5.37", "nvidia-cublas==13.10.0.20",
                 "nvidia-cuda-cccl==13.3.5.0.6", "nvidia-cuda-crt==13.5.37", "nvidia-nvvm==13.5.37"]
CUDA_VERSION_MIN = [13, 0]
# Real code for Turing, Ampere, Ada, Hopper, Blackwell (data centre and consumer); PTX of the
# newest for GPUs that come later (the driver compiles it on first use).
CUDA_ARCHITECTURES = "75-real;80-real;86-real;89-real;90-real;100-real;120-real;120-virtual"
CUDA_FLAGS = ["-DGGML_CUDA=ON", "-DGGML_CUDA_NO_VMM=ON", "-DGGML_BACKEND_DL=ON", "-DGGML_NATIVE=OFF",
              "-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
CUDA_LIBS = ["libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13"]


def ensure_cuda_toolkit() -> Path:
    """The CUDA toolkit from PyPI's nvidia-* wheels, unpacked into one tree (bin/nvcc, include/, lib/)."""
    key = hashlib.sha256(" ".join(CUDA_PACKAGES).encode()).hexdigest()[:12]
    root = cache_dir() / f"cuda-toolkit-{key}"
    top = root / "nvidia" / "cu13"
    if (root / ".complete").exists():
        return top
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=cache_dir()))
    try:
        log(f"CUDA toolkit: fetching {', '.join(CUDA_PACKAGES)} from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *CUDA_PACKAGES, "-d", str(work / "dl")],
                       check=True)
        for whl in (work / "dl").glob("*.whl"):
            with zipfile.ZipFile(whl) as z:
                z.extractall(work / "tree")
        lib = work / "tree" / "nvidia" / "cu13" / "lib"
        for name in CUDA_LIBS:  # the unversioned names CMake links against
            (lib / name.rsplit(".", 1)[0]).symlink_to(name)
        for exe in (work / "tree" / "nvidia" / "cu13").glob("**/bin/*"):
            if exe.is_file():
                exe.chmod(0o755)
        publish(work / "tree", root)
        return top
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_cuda_backend(archs: str) -> Path:
    """libggml-cuda.so compiled from the same llama.cpp source as the CPU wheel, cached by
    version, CUDA packages, flags and architectures."""
    key = hashlib.sha256(" ".join([*CUDA_PACKAGES, *sorted(CUDA_FLAGS), archs]).encode()).hexdigest()[:12]
    folder = cache_dir() / f"ggml-cuda-{LLAMA_CPP_PYTHON}-{key}"
    lib = folder / "libggml-cuda.so"
    if lib.exists():
        log(f"CUDA back end: cached ({lib})")
        return lib
    toolkit = ensure_cuda_toolkit()
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=folder))
    try:
        with tarfile.open(fetch_sdist(f"llama-cpp-python=={LLAMA_CPP_PYTHON}", work, "llama_cpp_python-*.tar.gz")) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = work / "build"
        log(f"CUDA back end: configuring for architectures {archs}")
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja" if shutil.which("ninja") else "Unix Makefiles",
                        *CUDA_FLAGS, f"-DCMAKE_CUDA_ARCHITECTURES={archs}", f"-DCUDAToolkit_ROOT={toolkit}",
                        f"-DCMAKE_CUDA_COMPILER={toolkit / 'bin' / 'nvcc'}"],
                       check=True, stdout=subprocess.DEVNULL)
        log("CUDA back end: compiling (long: each architecture adds to it; see --cuda-archs)")
        run_with_progress(["cmake", "--build", str(build), "--target", "ggml-cuda", "-j", str(os.cpu_count() or 2)],
                          dict(os.environ), folder / "build.log")
        built = next(build.glob("bin/libggml-cuda.so"))
        os.replace(built, lib)
        return lib
    finally:
        shutil.rmtree(work, ignore_errors=True)


def add_cuda(out_dir: Path, meta: dict, args) -> None:
    """libggml-cuda.so and the CUDA runtime libraries it needs (the runtime preloads them from
    the entry by path, so their location needs no RPATH)."""
    archs = args.cuda_archs
    cuda = meta.get("native", {}).get("cuda")
    if cuda and cuda.get("architectures") == archs and (out_dir / CUDA.stub_file).exists():
        log(f"CUDA back end up to date: {out_dir / CUDA.stub_file}")
        return
    lib = ensure_cuda_backend(archs)
    log("CUDA back end: packing it with the CUDA runtime libraries")
    toolkit = ensure_cuda_toolkit()
    files = {CUDA.library: lib, **{name: toolkit / "lib" / name for name in CUDA_LIBS}}
    # level 10: the libraries are ~1 GB, and level 19 would take many minutes
    record = pack_tar(files, out_dir / CUDA.stub_file, 10)
    meta["native"]["cuda"] = {**record, "architectures": archs, "cuda_packages": CUDA_PACKAGES}
    meta.setdefault("backends", {})["cuda"] = {"version_min": CUDA_VERSION_MIN, "architectures": archs}
    write_meta(out_dir / "stub.json", meta)
    log(f"CUDA back end: {out_dir / CUDA.stub_file} ({record['size'] / 2**20:.0f} MiB; needs NVIDIA driver for CUDA "
        f"{'.'.join(map(str, CUDA_VERSION_MIN))}+)")


def add_vulkan(out_dir: Path, meta: dict, args) -> None:
    """libggml-vulkan.so (buildsys/vulkan.py) for the target's machine. The Vulkan loader it
    links is the system's (for another machine: the one in its userland, buildsys/qemu.py)."""
    import targets

    target = targets.by_name(args.target)
    loader = vulkan.SYSTEM_LOADER
    if target.machine != os.uname().machine:
        from . import qemu

        loader = qemu.build_userland(cache_dir()) / qemu.LIBDIR / vulkan.LOADER
    lib = vulkan.ensure_backend(cache_dir(), LLAMA_CPP_PYTHON, log, run_with_progress, target.triple, loader)
    digest = hashlib.sha256(lib.read_bytes()).hexdigest()
    record = meta.get("native", {}).get("vulkan")
    if record and record.get("library_sha256") == digest and (out_dir / VULKAN.stub_file).exists():
        log(f"Vulkan back end up to date: {out_dir / VULKAN.stub_file}")
        return
    check_portable([lib], system={vulkan.LOADER, "libggml-base.so.0"}, machine=target.machine)
    t0 = time.time()
    record = pack_tar({VULKAN.library: lib}, out_dir / VULKAN.stub_file, ZSTD_LEVEL)
    meta["native"]["vulkan"] = {**record, "library_sha256": digest, "loader": vulkan.LOADER}
    write_meta(out_dir / "stub.json", meta)
    log(f"Vulkan back end: {out_dir / VULKAN.stub_file} ({record['unpacked_size'] / 2**20:.1f} MiB -> "
        f"{record['size'] / 2**20:.1f} MiB zstd in {time.time() - t0:.0f} s; needs a Vulkan 1.2 driver)")


GPU_BUILDS = {"cuda": add_cuda, "vulkan": add_vulkan}


def sync_gpu(out_dir: Path, meta: dict, args) -> None:
    """The stub folder holds exactly the GPU back ends asked for (bundles carry what it holds).
    A compiled back end stays cached: asking for it again re-adds it in seconds."""
    for b in GPU_BACKENDS:
        if getattr(args, b.key):
            GPU_BUILDS[b.key](out_dir, meta, args)
        elif (out_dir / b.stub_file).exists() or meta.get("native", {}).get(b.key):
            (out_dir / b.stub_file).unlink(missing_ok=True)
            meta.get("native", {}).pop(b.key, None)
            meta.get("backends", {}).pop(b.key, None)
            write_meta(out_dir / "stub.json", meta)
            log(f"{b.label} back end removed from the stub folder (python build.py {b.build_flag} adds it back)")
