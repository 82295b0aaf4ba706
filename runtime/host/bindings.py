"""llama.cpp in this process: its libraries loaded from the folder they were unpacked to (ggml
first, then its best CPU variant), its log, and its Python bindings.

The llama_cpp package (llama-cpp-python) is used without its __init__.py, which imports the high-level
Llama class and with it numpy (40 MB kept out of the stub, docs/facts.md #8) and loads the C library
from its default place. Registering the package module unexecuted lets Python find its submodules:
the ctypes bindings (import_bindings, after the library path is set) and the pure-Python
JSON schema → GBNF converter (grammar())."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import sys
from pathlib import Path

from ..errors import RuntimeFailure

WINDOWS = sys.platform == "win32"


def register() -> None:
    if "llama_cpp" not in sys.modules:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None:
            raise RuntimeFailure("llama_cpp is missing from this runtime; rebuild the stub (python build.py)")
        sys.modules["llama_cpp"] = importlib.util.module_from_spec(spec)


def grammar():
    """llama_cpp.llama_grammar: JSON_GBNF and json_schema_to_gbnf."""
    register()
    from llama_cpp import llama_grammar

    return llama_grammar


def import_bindings(libdir: Path):
    """Import llama_cpp.llama_cpp (the ctypes bindings) without llama_cpp/__init__.py
    (register), bound to the library in libdir."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(libdir)
    prepare_library_search(libdir)
    if "llama_cpp.llama_cpp" in sys.modules:
        return sys.modules["llama_cpp.llama_cpp"]
    register()
    import llama_cpp.llama_cpp as C

    return C


GGML_LIB = "ggml.dll" if WINDOWS else "libggml.so.0"
# Loaded by full path before libllama on Windows, in dependency order: the loader then reuses
# them by name instead of searching the PATH (where another program's ggml.dll may sit).
WINDOWS_PRELOAD = ["libwinpthread-1.dll", "libgcc_s_seh-1.dll", "libstdc++-6.dll", "ggml-base.dll", "ggml.dll"]
_VARIANT_FILE = re.compile(r"(?:lib)?ggml-cpu-([A-Za-z0-9_.]+?)\.(?:so|dll)\Z")
_libdir: Path | None = None  # the folder the back ends were loaded from


def cpu_variant_file(variant: str) -> str:
    return f"ggml-cpu-{variant}.dll" if WINDOWS else f"libggml-cpu-{variant}.so"


def cpu_variants_in(libdir: Path) -> list[str]:
    return sorted(m.group(1) for p in libdir.iterdir() if (m := _VARIANT_FILE.match(p.name)))


def prepare_library_search(libdir: Path) -> None:
    """Windows: make libllama.dll find its ggml and MinGW DLLs in libdir and only there."""
    global _libdir
    _libdir = libdir
    if not WINDOWS:
        return
    os.add_dll_directory(str(libdir))
    os.environ["PATH"] = str(libdir) + os.pathsep + os.environ.get("PATH", "")
    for name in WINDOWS_PRELOAD:
        if (libdir / name).exists():
            ctypes.CDLL(str(libdir / name))


def load_backends(libdir: Path, variant: str | None = None):
    """Load ggml and its best CPU variant (or the one named) from libdir, through the ggml
    library libllama itself uses (GGML_LIB)."""
    global _libdir
    _libdir = libdir
    ggml = ctypes.CDLL(str(libdir / GGML_LIB), **({} if WINDOWS else {"mode": ctypes.RTLD_GLOBAL}))
    if variant:
        path = libdir / cpu_variant_file(variant)
        if not path.exists():
            raise RuntimeFailure(f"no CPU variant {variant!r}; this bundle has: {', '.join(cpu_variants_in(libdir))}")
        ggml.ggml_backend_load.restype = ctypes.c_void_p
        ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
        if not ggml.ggml_backend_load(os.fsencode(path) if not WINDOWS else str(path).encode("utf-8")):
            raise RuntimeFailure(f"the CPU variant {variant!r} does not run on this processor")
    else:
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path(os.fsencode(libdir) if not WINDOWS else str(libdir).encode("utf-8"))
    return ggml


class _ThreadpoolParams(ctypes.Structure):  # ggml.h: struct ggml_threadpool_params
    _fields_ = [("cpumask", ctypes.c_bool * 512), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


def cpu_threadpool(n_threads: int):
    """A ggml CPU threadpool of n_threads that lives as long as the context it is attached to,
    as llama.cpp's own programs use. Without one, ggml makes threads for every graph and lets
    them go after: measured on a 2-vCPU VM, a single answer decoded at 66-80 tokens/s after a
    second of idleness against 90-96 back to back (the other vCPU had gone to sleep), where a
    persistent pool polls between tokens (ggml's default polling level, as llama.cpp's tools
    use). (pointer, free function), or (None, None) when the CPU back end does not offer one."""
    try:
        ggml = ctypes.CDLL(str(_libdir / GGML_LIB))
        ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
        ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        reg = ggml.ggml_backend_reg_by_name(b"CPU")
        new = reg and ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_new")
        free = reg and ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_free")
        if not new or not free:
            return None, None
        params = _ThreadpoolParams()
        ggml.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(_ThreadpoolParams), ctypes.c_int]
        ggml.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
        pool = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ThreadpoolParams))(new)(ctypes.byref(params))
        return (pool or None), ctypes.CFUNCTYPE(None, ctypes.c_void_p)(free)
    except (AttributeError, OSError, TypeError):
        return None, None


def loaded_cpu_variant() -> str | None:
    """Which CPU variant library this process loaded: on Linux read from /proc/self/maps, on
    Windows asked of the loader for each variant file in the libraries' folder."""
    if WINDOWS:
        if _libdir is None:
            return None
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.GetModuleHandleW.restype = ctypes.c_void_p
        kernel32.GetModuleHandleW.argtypes = [ctypes.c_wchar_p]
        for v in cpu_variants_in(_libdir):
            if kernel32.GetModuleHandleW(str(_libdir / cpu_variant_file(v))):
                return v
        return None
    try:
        with open("/proc/self/maps", errors="surrogateescape") as f:
            for line in f:
                m = _VARIANT_FILE.match(line.rsplit("/", 1)[-1].strip())
                if m:
                    return m.group(1)
    except OSError:
        pass
    return None


_log_callback = None  # module-level on purpose: C keeps the pointer for the process's life
_recent_errors: list[str] = []
GGML_LOG_LEVEL_ERROR = 4


def set_logging(C, verbose: bool) -> None:
    """Keep llama.cpp's and ggml's thousands of log lines off stderr unless asked (docs/facts.md
    #8). Called before the back ends load, so their messages are caught too. Errors are kept
    (the last few) so a failure can say what llama.cpp said."""
    global _log_callback

    def log(level, text, user_data):
        line = text.decode("utf-8", "replace")
        if level == GGML_LOG_LEVEL_ERROR:
            _recent_errors.append(line.strip())
            del _recent_errors[:-5]
        if verbose:
            sys.stderr.write(line)

    _log_callback = C.llama_log_callback(log)
    C.llama_log_set(_log_callback, None)


def last_error() -> str:
    return _recent_errors[-1] if _recent_errors else ""
