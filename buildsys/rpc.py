"""ggml's RPC back end (libggml-rpc.so on Linux, ggml-rpc.dll on Windows), built from the same
llama.cpp source and toolchain as the CPU libraries and carried beside them in native-cpu.tar.zst:
`--rpc-worker` serves this machine's back ends through it, `--rpc HOST:PORT` loads a model across
workers with it (runtime/host/rpc.py).

ggml's RPC server has no authentication, and its sockets are TCP only: bound to loopback, any
local user could still reach it. So the source is changed in four places (each checked, see
cache.apply_patches): an endpoint "bundlehook<address>:<n>" names a function of the caller's that
returns a connected socket. The worker's ggml server asks it for each connection instead of
accepting one; the coordinator's ggml client asks it instead of connecting. The runtime hands
ggml one end of a socket pair and carries the other over its own authenticated TCP link, so
ggml has no socket that anyone else can reach, on any system.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from . import ggml, zig
from .cache import apply_patches
from .python import STRIP

LIBRARY = "libggml-rpc.so"
PROTOCOL_FILE = "protocol"
FLAGS = ["-DGGML_RPC=ON", "-DGGML_RPC_RDMA=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF",
         "-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]

_TRANSPORT = "ggml/src/ggml-rpc/transport.cpp"
# An endpoint whose host is "bundlehook" + a hex address names a function of the caller's,
# long long hook(int n), that returns a connected socket (or -1): the coordinator's ggml client
# calls it instead of connecting (n: the worker's index), the worker's ggml server instead of
# accepting (it blocks until the caller has a connection that proved the key).
_HOOKS = """static bool is_valid_fd(sockfd_t sockfd) {"""
_HOOKS_NEW = """typedef long long (*bundle_hook_t)(int);  // bundle: the caller's sockets (buildsys/rpc.py)
static bundle_hook_t bundle_hook(const char * host) {
    if (strncmp(host, "bundlehook", 10) != 0) {
        return nullptr;
    }
    return (bundle_hook_t) (uintptr_t) strtoull(host + 10, nullptr, 16);
}
static bundle_hook_t bundle_accept_hook = nullptr;
static int bundle_accept_arg = 0;

""" + _HOOKS
_ACCEPT = """socket_ptr socket_t::accept() {
"""
_ACCEPT_NEW = _ACCEPT + """    if (bundle_accept_hook) {  // bundle: the caller hands over each connection
        long long fd = bundle_accept_hook(bundle_accept_arg);
        if (fd < 0) {
            return nullptr;
        }
        return socket_ptr(new socket_t(std::make_unique<impl>((sockfd_t) fd)));
    }
"""
_SERVER = """socket_ptr socket_t::create_server(const char * host, int port) {
"""
_SERVER_NEW = _SERVER + """    if (bundle_hook_t hook = bundle_hook(host)) {  // bundle: no socket of ggml's own
        bundle_accept_hook = hook;
        bundle_accept_arg = port;
        return socket_ptr(new socket_t(std::make_unique<impl>((sockfd_t) -1)));
    }
"""
_CLIENT = """socket_ptr socket_t::connect(const char * host, int port) {
"""
_CLIENT_NEW = _CLIENT + """    if (bundle_hook_t hook = bundle_hook(host)) {  // bundle: the caller's connection to worker `port`
        long long fd = hook(port);
        if (fd < 0) {
            return nullptr;
        }
        return socket_ptr(new socket_t(std::make_unique<impl>((sockfd_t) fd)));
    }
"""
PATCHES = [
    (_TRANSPORT, _HOOKS, _HOOKS_NEW),
    (_TRANSPORT, _ACCEPT, _ACCEPT_NEW),
    (_TRANSPORT, _SERVER, _SERVER_NEW),
    (_TRANSPORT, _CLIENT, _CLIENT_NEW),
]


def read_protocol(src: Path) -> tuple[int, int, int]:
    """RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION of the source: both ends of a link must agree."""
    text = (src / "ggml" / "include" / "ggml-rpc.h").read_text()
    found = dict(re.findall(r"#define RPC_PROTO_(MAJOR|MINOR|PATCH)_VERSION\s+(\d+)", text))
    if len(found) != 3:
        raise SystemExit("ggml-rpc.h no longer names its protocol version as expected; update buildsys/rpc.py")
    return int(found["MAJOR"]), int(found["MINOR"]), int(found["PATCH"])


def protocol(lib: Path) -> list[int]:
    """The protocol version of a library ensure_library made (recorded in the stub's facts)."""
    return [int(x) for x in (lib.parent / PROTOCOL_FILE).read_text().split(".")]


def for_windows(triple: str) -> bool:
    return "mingw" in triple


def library_name(triple: str) -> str:
    return "ggml-rpc.dll" if for_windows(triple) else LIBRARY


def cache_key(llama_version: str, triple: str = zig.TRIPLE) -> str:
    if for_windows(triple):
        from . import windows

        tools = [windows.toolchain_identity()]
    else:
        tools = zig.identity(triple)
    ident = [llama_version, *sorted(FLAGS), *tools, repr(PATCHES), "stripped"]
    return hashlib.sha256(" ".join(ident).encode()).hexdigest()[:12]


def ensure_library(cache: Path, llama_version: str, log, run_with_progress, triple: str = zig.TRIPLE) -> Path:
    """The RPC library for triple's machine (zig for Linux, MinGW for Windows), compiled once per
    llama.cpp version, flags, toolchain and changes (cached under cache/ggml-rpc-VERSION-KEY/; a
    minute or two the first time)."""
    folder = cache / f"ggml-rpc-{llama_version}-{cache_key(llama_version, triple)}"
    lib = folder / library_name(triple)
    if lib.exists() and (folder / PROTOCOL_FILE).exists():
        log(f"RPC back end: cached ({lib})")
        return lib
    windows = for_windows(triple)
    if windows:
        from . import windows as mingw

        strip = mingw.tool(mingw.STRIP)
    else:
        strip = STRIP.get(triple.split("-")[0], "strip")

    def prepare(src: Path, work: Path) -> list[str]:
        apply_patches(src, PATCHES, "buildsys/rpc.py")
        (folder / PROTOCOL_FILE).write_text(".".join(map(str, read_protocol(src))))
        return [f"-DCMAKE_TOOLCHAIN_FILE={mingw.toolchain_file(work)}"] if windows else []

    return ggml.build_library(cache, folder, lib, llama_version, triple, FLAGS, "ggml-rpc",
                              "RPC back end (Windows)" if windows else "RPC back end", log, run_with_progress,
                              prepare, strip=strip, zig_toolchain=not windows)
