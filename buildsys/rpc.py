"""ggml's RPC back end (libggml-rpc.so), built from the same llama.cpp source and toolchain as the
CPU libraries and carried beside them in native-cpu.tar.zst: `--rpc-worker` serves this machine's
back ends through it, `--rpc HOST:PORT` loads a model across workers with it
(runtime/host/rpc.py).

ggml's RPC server has no authentication, and its sockets are TCP only: bound to loopback, any
local user could still reach it. So the source is changed in three places (each checked, see
cache.apply_patches): an endpoint whose host is "fd" names a listening Unix socket the caller
made in a private folder (0700) — the worker's ggml server accepts on it, the coordinator's ggml
client connects to where it listens, each time it (re)connects —, and TCP_NODELAY is not
required of such a socket. The runtime puts
its own authenticated TCP front before either end; ggml never listens on the network.
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
_FD_SERVER = """socket_ptr socket_t::create_server(const char * host, int port) {
"""
_FD_CLIENT = """socket_ptr socket_t::connect(const char * host, int port) {
"""
_FD_LISTEN = """#ifndef _WIN32
    if (strcmp(host, "fd") == 0) {  // bundle: the caller's listening Unix socket (buildsys/rpc.py)
        return socket_ptr(new socket_t(std::make_unique<impl>((sockfd_t) port)));
    }
#endif
"""
_FD_CONNECT = """#ifndef _WIN32
    if (strcmp(host, "fd") == 0) {  // bundle: connect to where the caller's Unix socket listens
        struct sockaddr_un where;
        socklen_t len = sizeof(where);
        if (getsockname(port, (struct sockaddr *) &where, &len) < 0 || where.sun_family != AF_UNIX) {
            return nullptr;
        }
        auto unix_fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (unix_fd < 0) {
            return nullptr;
        }
        if (::connect(unix_fd, (struct sockaddr *) &where, len) < 0) {
            close(unix_fd);
            return nullptr;
        }
        return socket_ptr(new socket_t(std::make_unique<impl>(unix_fd)));
    }
#endif
"""
_ACCEPT_NODELAY = """    if (!set_no_delay(client_socket_fd)) {
        GGML_LOG_ERROR("Failed to set TCP_NODELAY\\n");
        return nullptr;
    }
    return socket_ptr(new socket_t(std::make_unique<impl>(client_socket_fd)));"""
_ACCEPT_ANY = """    if (!set_no_delay(client_socket_fd) && errno != EOPNOTSUPP) {  // bundle: a Unix socket has no Nagle
        GGML_LOG_ERROR("Failed to set TCP_NODELAY\\n");
        return nullptr;
    }
    return socket_ptr(new socket_t(std::make_unique<impl>(client_socket_fd)));"""
PATCHES = [
    (_TRANSPORT, _FD_SERVER, _FD_SERVER + _FD_LISTEN),
    (_TRANSPORT, _FD_CLIENT, _FD_CLIENT + _FD_CONNECT),
    (_TRANSPORT, _ACCEPT_NODELAY, _ACCEPT_ANY),
    (_TRANSPORT, "#include <cstring>\n", "#include <cstring>\n#include <cerrno>\n#ifndef _WIN32\n#include <sys/un.h>\n#endif\n"),
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


def cache_key(llama_version: str, triple: str = zig.TRIPLE) -> str:
    ident = [llama_version, *sorted(FLAGS), *zig.identity(triple), repr(PATCHES), "stripped"]
    return hashlib.sha256(" ".join(ident).encode()).hexdigest()[:12]


def ensure_library(cache: Path, llama_version: str, log, run_with_progress, triple: str = zig.TRIPLE) -> Path:
    """libggml-rpc.so for triple's machine, compiled once per llama.cpp version, flags, toolchain
    and changes (cached under cache/ggml-rpc-VERSION-KEY/; a minute or two the first time)."""
    folder = cache / f"ggml-rpc-{llama_version}-{cache_key(llama_version, triple)}"
    lib = folder / LIBRARY
    if lib.exists() and (folder / PROTOCOL_FILE).exists():
        log(f"RPC back end: cached ({lib})")
        return lib
    def prepare(src: Path, work: Path) -> list[str]:
        apply_patches(src, PATCHES, "buildsys/rpc.py")
        (folder / PROTOCOL_FILE).write_text(".".join(map(str, read_protocol(src))))
        return []

    return ggml.build_library(cache, folder, lib, llama_version, triple, FLAGS, "ggml-rpc", "RPC back end", log,
                              run_with_progress, prepare, strip=STRIP.get(triple.split("-")[0], "strip"))
