"""What every target's stub is made of, whatever builds it: the llama-cpp-python version, the
build cache, the web page's vendored scripts, PyInstaller's arguments, the native libraries
packed as zstd tars, the stub's record (stub.json), and the digest of the sources a stub is
built from (a stub is rebuilt when any of them changes)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .cache import fetch_sdist, publish
from .console import log

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON = "0.3.36"
# The chat page's Markdown renderer and sanitiser, fetched from the npm registry at build time
# (never committed) and shipped inside the stub with their licences.
# and pdf.js (the attachments' text, taken out of PDFs in the page; its worker runs beside it).
WEB_VENDOR = {"marked": ("18.2.1", ("lib/marked.umd.js",)), "dompurify": ("3.5.0", ("dist/purify.min.js",)),
              "pdfjs-dist": ("6.5.438", ("build/pdf.min.mjs", "build/pdf.worker.min.mjs"))}
NATIVE_NAME = "native-cpu.tar.zst"
ZSTD_LEVEL = 19
# What the stub's Python side is made of: installed from manylinux2014 (glibc 2.17) wheels into
# the portable CPython (buildsys/python.py), at the versions this environment was tested with.
STUB_REQUIREMENTS = ["pyinstaller", "jinja2", "zstandard", "blake3", "starlette", "uvicorn"]
# Modules the runtime never imports; keeping them out keeps launch fast (docs/facts.md #8).
# (ssl stays: uvicorn imports it at module level.)
EXCLUDES = [
    "numpy", "llama_cpp.llama", "llama_cpp.server", "llama_cpp.llama_chat_format",
    "llama_cpp.llava_cpp", "llama_cpp.mtmd_cpp", "llama_cpp.llama_speculative",
    "llama_cpp.llama_cache", "llama_cpp.llama_tokenizer",
    "tkinter", "sqlite3", "unittest", "pydoc", "doctest", "lib2to3",
    "zstandard.backend_cffi", "cffi", "_cffi_backend", "bundler", "pytest",
    "xmlrpc", "setuptools", "pkg_resources", "websockets", "wsproto",
    "uvloop", "httptools", "watchfiles", "yaml", "dotenv",
    # decimal falls back to the pure-Python _pydecimal; nothing here decodes CJK legacy encodings
    "_decimal", "_codecs_cn", "_codecs_jp", "_codecs_kr", "_codecs_tw", "_codecs_hk", "_codecs_iso2022",
]
# The sources every stub is built from: a change to any of them rebuilds the stubs.
SOURCE_FOLDERS = ("runtime", "buildsys", "build_hooks", "targets")


def cache_dir() -> Path:
    base = os.environ.get("BUNDLE_BUILD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bundle", "build"
    )
    return Path(base)


def flags_key(version: str, flags: list[str]) -> str:
    digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    return f"llama-cpp-python-{version}-{digest}"


def run_with_progress(cmd: list[str], env: dict, logfile: Path) -> None:
    """Run a long build, keeping its full log in logfile and showing compile progress."""
    start = time.time()
    last, last_pct = 0.0, -100
    pattern = re.compile(r"\[\s*(\d+)%\]|\[(\d+)/(\d+)\]")
    with open(logfile, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            out.write(line)
            m = pattern.search(line)
            now = time.time()
            if m:
                pct = int(m.group(1) or 100 * int(m.group(2)) // int(m.group(3)))
                if pct - last_pct >= 5 or now - last >= 60:  # a line per 5%, or a sign of life a minute
                    log(f"  compiling: {pct}% ({now - start:.0f} s)")
                    last, last_pct = now, pct
        rc = proc.wait()
    if rc != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-25:]
        sys.exit("\n".join(tail) + f"\nbuild failed (exit {rc}); full log: {logfile}")


def pack_native(files: dict[str, bytes], dest: Path) -> dict:
    """One tar: each distinct library once, its other names as symlinks (the wheel holds
    libggml.so, .so.0 and .so.0.x.y as three copies, docs/facts.md #5b)."""
    import zstandard

    by_content: dict[str, list[str]] = {}
    for name, data in files.items():
        by_content.setdefault(hashlib.sha256(data).hexdigest(), []).append(name)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for names in sorted(by_content.values()):
            # the real file gets the soname-style name (libx.so.0) when there is one
            names.sort(key=lambda n: (not re.search(r"\.so\.\d+$", n), len(n), n))
            real = names[0]
            info = tarfile.TarInfo(real)
            info.size, info.mode, info.mtime = len(files[real]), 0o755, 0
            tar.addfile(info, io.BytesIO(files[real]))
            for alias in names[1:]:
                link = tarfile.TarInfo(alias)
                link.type, link.linkname, link.mtime = tarfile.SYMTYPE, real, 0
                tar.addfile(link)
    raw = buf.getvalue()
    packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(packed)
    os.replace(tmp, dest)
    variants = sorted(m.group(1) for n in files if (m := re.match(r"(?:lib)?ggml-cpu-(.+?)\.(?:so|dll)$", n)))
    return {
        "file": dest.name,
        "sha256": hashlib.sha256(packed).hexdigest(),
        "size": len(packed),
        "unpacked_size": len(raw),
        "cpu_variants": variants,
        "libraries": sorted(files),
    }


def runpath_to_origin(lib: Path) -> bytes:
    """The library's bytes with its RUNPATH (CMake leaves the build folder there, a path that
    on another machine could be anyone's /tmp) overwritten in place by $ORIGIN."""
    data = lib.read_bytes()
    out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*)\]", out)
    if not m or m.group(1) == "$ORIGIN":
        return data
    old = m.group(1).encode() + b"\0"
    if data.count(old) != 1 or len(old) < 8:
        sys.exit(f"cannot rewrite the RUNPATH of {lib} ({m.group(1)!r}); rebuild it")
    return data.replace(old, b"$ORIGIN".ljust(len(old), b"\0"))


def pack_tar(files: dict[str, Path], dest: Path, level: int) -> dict:
    """Libraries as one zstd tar (a GPU back end's entry), their RUNPATHs set to $ORIGIN.
    Multi-threaded zstd: the CUDA libraries are ~1 GB."""
    import zstandard

    tmp = dest.with_suffix(".tmp")
    unpacked = 0
    cctx = zstandard.ZstdCompressor(level=level, threads=-1)
    with open(tmp, "wb") as raw, cctx.stream_writer(raw) as out, tarfile.open(fileobj=out, mode="w|") as tar:
        for name, path in files.items():
            data = runpath_to_origin(path) if name.startswith("libggml") else None
            info = tar.gettarinfo(str(path.resolve()), arcname=name)
            info.mtime, info.mode = 0, 0o755
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            unpacked += info.size
    digest = hashlib.sha256()
    with open(tmp, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    os.replace(tmp, dest)
    return {"file": dest.name, "sha256": digest.hexdigest(), "size": dest.stat().st_size, "unpacked_size": unpacked,
            "libraries": sorted(files)}


def ensure_web_vendor() -> Path:
    """marked, DOMPurify and pdf.js from the npm registry, cached; returns the folder to ship."""
    folder = cache_dir() / ("web-vendor-" + "-".join(f"{n}{v}" for n, (v, _) in sorted(WEB_VENDOR.items())))
    if (folder / ".complete").exists():
        return folder
    if not shutil.which("npm"):
        sys.exit("npm is needed to fetch the chat page's libraries (marked, DOMPurify, pdf.js); install Node.js/npm")
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=cache_dir()))
    try:
        out = work / "vendor"
        out.mkdir()
        for name, (version, members) in WEB_VENDOR.items():
            log(f"fetching {name}@{version} from the npm registry")
            tgz = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=work, check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            with tarfile.open(work / tgz) as tar:
                tar.extractall(work / name, filter="data")
            pkg = work / name / "package"
            for member in members:
                shutil.copy(pkg / member, out / Path(member).name)
            lic = next(p for p in pkg.iterdir() if p.name.upper().startswith("LICENSE"))
            shutil.copy(lic, out / f"LICENSE.{name}.txt")
        return publish(out, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def stub_requirements() -> list[str]:
    """STUB_REQUIREMENTS at the versions installed here, and everything they pull in pinned the
    same way (a constraints list of this environment)."""
    from importlib import metadata

    pins = []
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in ("bundle", "llama_cpp_python", "llama-cpp-python"):
            pins.append(f"{name}=={dist.version}")
    return sorted(set(pins), key=str.lower)


def pyinstaller_args(web_vendor: Path, name: str, native_path=str, strip: bool = True) -> list[str]:
    """PyInstaller's arguments for the stub, the same for every target; native_path turns a
    path of this machine into one the target's PyInstaller reads (wine's Z: drive)."""
    sep = ";" if native_path is not str else os.pathsep
    p = native_path
    args = [
        p(ROOT / "runtime" / "__main__.py"),
        # --strip: the bootloader unpacks the archive at every launch, and symbols are most of
        # libpython (23 -> 6 MiB) and of zstandard's extension (12 -> 1 MiB). (ELF only.)
        "--onefile", *(["--strip"] if strip else []), "--name", name, "--noconfirm", "--clean",
        "--log-level", "WARN", "--paths", p(ROOT),
        "--additional-hooks-dir", p(ROOT / "build_hooks"),
        "--runtime-hook", p(ROOT / "build_hooks" / "rth_bundle_signals.py"),
        "--runtime-hook", p(ROOT / "build_hooks" / "rth_bundle_tmpdir.py"),
        # every module of the runtime, whether imported at the top or inside a function
        "--collect-submodules", "runtime", "--hidden-import", "llama_cpp.llama_cpp",
        "--hidden-import", "jinja2.ext", "--hidden-import", "zstandard.backend_c",
        "--hidden-import", "llama_cpp.llama_grammar",  # JSON schema -> GBNF (structured output)
        "--hidden-import", "uvicorn.protocols.http.h11_impl", "--hidden-import", "uvicorn.loops.asyncio",
        "--hidden-import", "uvicorn.lifespan.off",
        "--add-data", f"{p(ROOT / 'runtime' / 'serving' / 'web')}{sep}runtime/serving/web",
        "--add-data", f"{p(web_vendor)}{sep}runtime/serving/web/vendor",
    ]
    for mod in EXCLUDES:
        args += ["--exclude-module", mod]
    return args


def llama_architectures(version: str = LLAMA_CPP_PYTHON) -> list[str]:
    """The model architectures the vendored llama.cpp loads (LLM_ARCH_NAMES in src/llama-arch.cpp),
    for `bundle build` to refuse a model that would build and then not load. Read from the
    sdist once, cached."""
    cached = cache_dir() / f"llama-architectures-{version}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fetch_sdist(f"llama-cpp-python=={version}", Path(tmp), "llama_cpp_python-*.tar.gz")) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("vendor/llama.cpp/src/llama-arch.cpp"))
            text = tar.extractfile(member).read().decode("utf-8")
    table = text.split("LLM_ARCH_NAMES = {", 1)[1].split("};", 1)[0]
    names = sorted({name for key, name in re.findall(r'\{\s*LLM_ARCH_(\w+)\s*,\s*"([^"]+)"', table)
                    if key not in ("CLIP", "UNKNOWN")})  # clip: a placeholder for llama-quantize
    if len(names) < 20:
        sys.exit(f"llama-arch.cpp of llama-cpp-python {version}: found only {len(names)} architectures")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = cached.with_suffix(".tmp")
    tmp_file.write_text(json.dumps(names))
    os.replace(tmp_file, cached)
    return names


def stub_meta(target: str, stub: Path, flags: list[str], python_version: str, native: dict, inputs: str,
              **extra) -> dict:
    """stub.json's record of a stub, the same keys for every target (plus extra)."""
    import PyInstaller

    from runtime import __version__ as runtime_version
    from runtime.bundlefile import FORMAT_VERSION

    return {
        "target": target,
        "stub": stub.name,
        "stub_sha256": hashlib.sha256(stub.read_bytes()).hexdigest(),
        "stub_size": stub.stat().st_size,
        "runtime_version": runtime_version,
        "format_version": FORMAT_VERSION,
        "llama_cpp_python": LLAMA_CPP_PYTHON,
        "build_flags": flags,
        "python": python_version,
        "pyinstaller": PyInstaller.__version__,
        "architectures": llama_architectures(),
        **extra,
        "native": {"cpu": native},
        "inputs": inputs,
    }


def write_meta(path: Path, meta: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)


def sources_digest(h) -> None:
    """Feed the stub's sources (SOURCE_FOLDERS and build.py) into the hash h."""
    for folder in SOURCE_FOLDERS:
        for p in sorted((ROOT / folder).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(ROOT)).encode())
                h.update(p.read_bytes())
    h.update((ROOT / "build.py").read_bytes())


def check_variants(target, native: dict) -> None:
    """The CPU variants packed must be the ones the target's record names (targets/)."""
    if sorted(native["cpu_variants"]) != sorted(target.cpu_variants):
        sys.exit(f"{target.name}: the native libraries hold the CPU variants {', '.join(sorted(native['cpu_variants']))}, "
                 f"but targets/ records {', '.join(sorted(target.cpu_variants))}; update the target's record")
