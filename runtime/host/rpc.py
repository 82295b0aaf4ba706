"""Beyond one machine: ggml's RPC back end (libggml-rpc.so, built by buildsys/rpc.py) behind a
handshake on a shared key. `--rpc-worker` serves this machine's back end; `--rpc HOST:PORT,...`
loads a model across the workers and this machine.

ggml's RPC server has no authentication (llama.cpp: never expose it). Here ggml has no socket
that anyone else can reach: its server asks this module for each connection and its client asks
for each link (the library's "bundlehook" endpoints, buildsys/rpc.py), and gets one end of a
socket pair whose other end this process holds. Between the two machines runs this module's TCP
link, which opens with a handshake before a single byte is passed on:

    worker      -> coordinator   HELLO = MAGIC, ggml protocol (3 bytes), keyed (1), nonce_w (32)
    coordinator -> worker        MAGIC, ggml protocol (3), nonce_c (32),
                                 HMAC-SHA256(key, b"coordinator" + HELLO + nonce_c)
    worker      -> coordinator   b"OK" + HMAC-SHA256(key, b"worker" + HELLO + nonce_c),
                                 or b"NO" + a length (2) + one line saying why

The coordinator checks the worker's proof as well: a model is never sent to a machine that does
not hold the key. The key authenticates, it does not encrypt: tensors and activations cross the
network in clear (the README says so).

A worker that dies or is cut off: the link sees the connection end (TCP keepalive and
TCP_USER_TIMEOUT bound a silent peer to about ten seconds) and calls on_lost; ggml's side of the
link is then left open and unanswered, so ggml (which aborts the process on a broken socket)
waits instead, and the caller ends the request (`-p`: one line, exit 1; the server: an API
error, and /health says so).
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import queue
import secrets
import shutil
import socket
import struct
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RuntimeFailure, UsageError

LIBRARY = "ggml-rpc.dll" if os.name == "nt" else "libggml-rpc.so"
MAGIC = b"bundle-rpc\x01"
NONCE = 32
MAC = 32
HELLO_SIZE = len(MAGIC) + 3 + 1 + NONCE
REPLY_SIZE = len(MAGIC) + 3 + NONCE + MAC
HANDSHAKE_SECONDS = 10.0
DEFAULT_PORT = 50052  # llama.cpp's rpc-server's
KEY_ENV = "BUNDLE_RPC_KEY"
TENSOR_CACHE = "rpc-tensors"
TENSOR_CACHE_MAX = 32 << 30


class HandshakeError(Exception):
    """The other end is not what it must be; the message says why, in one line."""


def version_text(v) -> str:
    return ".".join(str(x) for x in v)


def compatible(server, client) -> bool:
    """ggml's own rule (negotiate_hello): the same major version, the server's minor no newer."""
    return server[0] == client[0] and server[1] <= client[1]


def _mac(key: bytes, who: bytes, hello: bytes, nonce_c: bytes) -> bytes:
    return hmac.new(key, who + hello + nonce_c, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise HandshakeError("the connection closed during the handshake")
        data += chunk
    return data


def worker_handshake(sock: socket.socket, key: bytes, protocol, gate=lambda: None) -> None:
    """The worker's half: nothing is passed to ggml unless this returns. gate(): called once the
    coordinator has proved the key; a reason to refuse it after all (busy), or None."""
    sock.settimeout(HANDSHAKE_SECONDS)
    hello = MAGIC + bytes(protocol) + bytes([1 if key else 0]) + secrets.token_bytes(NONCE)
    sock.sendall(hello)
    try:
        reply = _recv_exact(sock, REPLY_SIZE)
    except socket.timeout:
        raise HandshakeError("no handshake within 10 s") from None
    if not reply.startswith(MAGIC):
        raise HandshakeError("no handshake (not a bundle coordinator; a plain ggml RPC client?)")
    theirs = tuple(reply[len(MAGIC):len(MAGIC) + 3])
    nonce_c = reply[len(MAGIC) + 3:len(MAGIC) + 3 + NONCE]
    if not compatible(tuple(protocol), theirs):
        why = (f"the coordinator speaks ggml RPC {version_text(theirs)}, this worker {version_text(protocol)}: "
               "run the same bundle on every machine")
        _refuse(sock, why)
        raise HandshakeError(why)
    if not hmac.compare_digest(reply[-MAC:], _mac(key, b"coordinator", hello, nonce_c)):
        why = "wrong key" if key else "a key was given, this worker takes none"
        _refuse(sock, why)
        raise HandshakeError(why)
    busy = gate()
    if busy:
        _refuse(sock, busy)
        raise HandshakeError(busy)
    sock.sendall(b"OK" + _mac(key, b"worker", hello, nonce_c))
    sock.settimeout(None)


def _refuse(sock: socket.socket, why: str) -> None:
    text = why.encode()[:400]
    try:
        sock.sendall(b"NO" + struct.pack("<H", len(text)) + text)
    except OSError:
        pass


def coordinator_handshake(sock: socket.socket, key: bytes, protocol, where: str) -> None:
    """The coordinator's half; raises HandshakeError naming the worker and what to do."""
    sock.settimeout(HANDSHAKE_SECONDS)
    try:
        hello = _recv_exact(sock, HELLO_SIZE)
    except socket.timeout:
        raise HandshakeError(f"{where} did not answer the handshake within 10 s; is it a bundle's --rpc-worker?") from None
    except HandshakeError:
        raise HandshakeError(f"{where} closed the connection; is it a bundle's --rpc-worker?") from None
    if not hello.startswith(MAGIC):
        raise HandshakeError(f"{where} is not a bundle's --rpc-worker (no handshake)")
    theirs, keyed = tuple(hello[len(MAGIC):len(MAGIC) + 3]), hello[len(MAGIC) + 3]
    if not compatible(theirs, tuple(protocol)):
        raise HandshakeError(f"the worker at {where} speaks ggml RPC {version_text(theirs)}, this bundle "
                             f"{version_text(protocol)}: run the same bundle on every machine")
    if keyed and not key:
        raise HandshakeError(f"the worker at {where} needs a key: pass --rpc-key (or set {KEY_ENV})")
    if key and not keyed:
        raise HandshakeError(f"the worker at {where} takes no key (it listens on loopback only), so it cannot prove "
                             "it holds yours; start it with the same --rpc-key")
    nonce_c = secrets.token_bytes(NONCE)
    sock.sendall(MAGIC + bytes(protocol) + nonce_c + _mac(key, b"coordinator", hello, nonce_c))
    try:
        verdict = _recv_exact(sock, 2)
        if verdict == b"NO":
            (n,) = struct.unpack("<H", _recv_exact(sock, 2))
            why = _recv_exact(sock, n).decode(errors="replace")
            raise HandshakeError(f"the worker at {where} refused: {why}")
        proof = _recv_exact(sock, MAC)
    except socket.timeout:
        raise HandshakeError(f"the worker at {where} did not finish the handshake within 10 s") from None
    except HandshakeError as exc:
        if "refused" in str(exc):
            raise
        raise HandshakeError(f"the worker at {where} closed the connection: wrong key?") from None
    if verdict != b"OK" or not hmac.compare_digest(proof, _mac(key, b"worker", hello, nonce_c)):
        raise HandshakeError(f"the worker at {where} could not prove it holds the key; is it yours?")
    sock.settimeout(None)


def tune_link(sock: socket.socket) -> None:
    """No Nagle delay (a token is a few small messages), and a silent peer noticed within about
    ten seconds: keepalive probes after 5 s idle, and sent data unacknowledged for 10 s."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", 10000)):
        if hasattr(socket, name):  # (Windows has no TCP_USER_TIMEOUT: there keepalive alone bounds it)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
            except OSError:
                pass


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected sockets of this process: (ours, ggml's). A Unix socket pair where there is
    one; on Windows a loopback TCP pair whose ends are checked to be each other (another
    program could connect to the short-lived listener first: CPython 3.11's socketpair does not
    check that, CVE-2024-3219), without Nagle's delay (ggml sends a message in several writes)."""
    if hasattr(socket, "AF_UNIX"):
        return socket.socketpair()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for _ in range(8):
            client = socket.create_connection(listener.getsockname())
            ours, _addr = listener.accept()
            if ours.getpeername() == client.getsockname() and ours.getsockname() == client.getpeername():
                for s in (ours, client):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return ours, client
            ours.close()
            client.close()
    raise OSError("could not make a private socket pair on loopback")


class Hook:
    """A function of ours that ggml calls for a socket (the "bundlehook" endpoints of
    buildsys/rpc.py): make(n) returns ggml's end of a socket_pair; ggml owns it from then on.
    on_error(n, exc): make failed (ggml then gets -1: the worker's server stops, the
    coordinator's ggml aborts, so make keeps that for what cannot be helped)."""

    TYPE = ctypes.CFUNCTYPE(ctypes.c_longlong, ctypes.c_int)

    def __init__(self, make, on_error):
        def call(n: int) -> int:
            try:
                return make(n).detach()
            except Exception as exc:  # an exception must not cross into C (ctypes would return 0: stdin)
                on_error(n, exc)
                return -1

        self._c = self.TYPE(call)  # kept: ggml holds its address

    def endpoint(self, n: int) -> bytes:
        return b"bundlehook%x:%d" % (ctypes.cast(self._c, ctypes.c_void_p).value, n)


def _pump(src: socket.socket, dst: socket.socket, done) -> None:
    """Copy src to dst until src ends; done(error or None) once."""
    error = None
    try:
        while True:
            data = src.recv(1 << 20)
            if not data:
                break
            dst.sendall(data)
    except OSError as exc:
        error = exc
    done(error)


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--rpc takes HOST:PORT[,HOST:PORT...]; {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    import ipaddress

    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def key_from(args_key: str | None) -> bytes:
    key = args_key if args_key is not None else os.environ.get(KEY_ENV, "")
    return key.encode()


# -- the library ----------------------------------------------------------------------------------

class Library:
    """libggml-rpc.so of the unpacked native libraries, with the ggml calls both sides use."""

    def __init__(self, libdir: Path, ggml_lib: str):
        path = libdir / LIBRARY
        if not path.exists():
            raise RuntimeFailure("this bundle's runtime carries no RPC back end (it was built before --rpc); "
                                 "rebuild it with a current stub")
        # ggml's functions: on Linux libggml finds them all (its dependencies' symbols are
        # global); a Windows DLL exports only its own, and ggml-base.dll holds the devices'.
        found = [ctypes.CDLL(str(libdir / ggml_lib))]
        if os.name == "nt":
            found.append(ctypes.CDLL(str(libdir / "ggml-base.dll")))
        self.lib = lib = ctypes.CDLL(str(path))
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        self.ggml = ggml = types.SimpleNamespace()
        for name, res, args in (
            ("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
            ("ggml_backend_dev_description", ctypes.c_char_p, [vp]),
            ("ggml_backend_dev_name", ctypes.c_char_p, [vp]),
            ("ggml_backend_dev_by_type", vp, [ctypes.c_int]),
            ("ggml_backend_reg_dev_count", sz, [vp]),
            ("ggml_backend_reg_dev_get", vp, [vp, sz]),
        ):
            f = next(getattr(d, name) for d in found if hasattr(d, name))
            f.restype, f.argtypes = res, args
            setattr(ggml, name, f)
        lib.ggml_backend_rpc_add_server.restype = vp
        lib.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
        lib.ggml_backend_rpc_start_server.restype = None
        lib.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, sz, sz, ctypes.POINTER(vp)]

    def memory(self, dev) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def describe(self, dev) -> str:
        return (self.ggml.ggml_backend_dev_description(dev) or b"?").decode(errors="replace")

    def cpu_device(self):
        return self.ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU


# -- the worker -------------------------------------------------------------------------------------

def trim_tensor_cache(folder: Path, limit: int | None = None) -> None:
    """ggml keeps tensors it was sent (by hash) so that the next load sends only hashes; the
    oldest go first once the folder holds more than limit (32 GiB, or a quarter of the free
    space when that is less)."""
    try:
        files = [(p.stat(), p) for p in folder.iterdir() if p.is_file()]
        if limit is None:
            limit = min(TENSOR_CACHE_MAX, shutil.disk_usage(folder).free // 4)
    except OSError:
        return
    total = sum(st.st_size for st, _ in files)
    for st, p in sorted(files, key=lambda x: x[0].st_mtime):
        if total <= limit:
            break
        p.unlink(missing_ok=True)
        total -= st.st_size


@dataclass
class Offer:
    devices: list  # ggml device pointers
    lines: list[str]  # what each is, with its memory


def serve_worker(lib: Library, offer: Offer, host: str, port: int, key: bytes, threads: int, cache: Path,
                 protocol, say, log) -> int:
    """Serve offer's devices to coordinators at host:port until interrupted. Never returns
    normally (Ctrl+C ends it)."""
    if not key and not is_loopback(host):
        raise UsageError(f"--rpc-worker on {host} needs a key: anyone who reaches this port could use this machine. "
                         f"Pass --rpc-key KEY (or set {KEY_ENV}), the same on the coordinator")
    try:
        front = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise RuntimeFailure(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    handoff: queue.Queue = queue.Queue()  # ggml's ends of the connections that proved the key

    def failed(_n, exc):
        log(f"rpc worker: {exc}")

    hook = Hook(lambda _n: handoff.get(), failed)
    tensors = cache / TENSOR_CACHE
    tensors.mkdir(mode=0o700, exist_ok=True)
    trim_tensor_cache(tensors)
    # ggml's server prints its own banner and a line per connection on stdout: this mode's words
    # go to stderr, ggml's to nowhere.
    quiet_stdout()
    array = (ctypes.c_void_p * len(offer.devices))(*offer.devices)
    server = threading.Thread(target=lib.lib.ggml_backend_rpc_start_server, daemon=True, name="ggml-rpc",
                              args=(hook.endpoint(0), str(tensors).encode(), threads, len(offer.devices), array))
    server.start()
    bound = front.getsockname()
    say(f"rpc worker: serving {'; '.join(offer.lines)}")
    say(f"rpc worker: listening on {bound[0]}:{bound[1]} (ggml RPC {version_text(protocol)}; "
        + ("a key is required" if key else "no key: this machine only") + "); Ctrl+C stops it")
    busy = threading.Lock()  # ggml's server serves one coordinator at a time
    serving: list[str] = []
    # ggml opens a new connection whenever it needs one again: say once that a coordinator came,
    # and that it left when none of its connections is back within a few seconds.
    present: dict[str, int] = {}
    seen = threading.Lock()

    def arrived(host_: str) -> None:
        with seen:
            present[host_] = present.get(host_, 0) + 1
            if present[host_] == 1 and host_ not in leaving:
                log(f"rpc worker: coordinator {host_} connected")
            leaving.discard(host_)

    leaving: set[str] = set()

    def departed(host_: str) -> None:
        with seen:
            present[host_] -= 1
            if present[host_]:
                return
            leaving.add(host_)

        def gone():
            with seen:
                if host_ in leaving and not present.get(host_):
                    leaving.discard(host_)
                    log(f"rpc worker: coordinator {host_} disconnected")
                    trim_tensor_cache(tensors)  # once it is gone, not at each of ggml's reconnections

        threading.Timer(3.0, gone).start()

    def session(conn: socket.socket, peer: str) -> None:
        held = []

        def gate():
            # a coordinator reconnecting right after it closed gets in once the old link is gone
            if busy.acquire(timeout=5):
                held.append(True)
                serving[:] = [peer]
                return None
            return f"busy: serving another coordinator ({serving[0] if serving else '?'}); try again when it is done"

        try:
            worker_handshake(conn, key, protocol, gate)
            host_ = peer.rpartition(":")[0]
            arrived(host_)
            try:
                tune_link(conn)
                ours, theirs = socket_pair()
                handoff.put(theirs)  # ggml serves it once done with the one before
                _bridge(conn, ours)
            finally:
                departed(host_)
        except (HandshakeError, OSError) as exc:
            log(f"rpc worker: {'lost' if held else 'refused'} {peer}: {exc}")
        finally:
            conn.close()
            if held:
                busy.release()

    front.settimeout(0.5)  # (Windows delivers Ctrl+C only between calls, not inside a blocking accept)
    while True:
        try:
            conn, addr = front.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        threading.Thread(target=session, args=(conn, f"{addr[0]}:{addr[1]}"), daemon=True).start()


def quiet_stdout() -> None:
    """Standard output to nowhere, for the C runtime ggml prints with as well as Python's (on
    Windows the MinGW libraries use msvcrt.dll, whose descriptors are its own)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    if os.name == "nt":
        try:
            crt = ctypes.CDLL("msvcrt")
            crt.fflush(None)
            nul = crt._open(b"NUL", 1)  # O_WRONLY
            if nul >= 0:
                crt._dup2(nul, 1)
        except (OSError, AttributeError):
            pass


def _bridge(a: socket.socket, b: socket.socket) -> None:
    """Both directions until either side ends; then both are closed."""
    finished = threading.Event()

    def done(_error):
        finished.set()

    threading.Thread(target=_pump, args=(b, a, done), daemon=True).start()
    threading.Thread(target=_pump, args=(a, b, done), daemon=True).start()
    finished.wait()
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


# -- the coordinator --------------------------------------------------------------------------------

@dataclass
class Worker:
    address: str  # HOST:PORT as given
    host: str
    port: int
    endpoint: bytes = b""  # what ggml calls it (a "bundlehook" endpoint: this process's link to it)
    devices: list = field(default_factory=list)
    memory: list = field(default_factory=list)  # (free, total) per device
    layers: int = 0


class Workers:
    """The coordinator's links to its workers: whenever ggml (re)connects to one, it gets one end
    of a socket pair whose other end is carried to the worker over an authenticated TCP link."""

    def __init__(self, lib: Library, addresses: list[str], key: bytes, protocol, on_lost):
        self.lib, self.key, self.protocol, self.on_lost = lib, key, protocol, on_lost
        self.lost: str | None = None
        self.workers = [Worker(text.strip(), *parse_endpoint(text)) for text in addresses]
        self._unanswered: list[socket.socket] = []  # our ends of links to a lost worker, kept open
        self.hook = Hook(self._open, lambda n, exc: self._lose(self.workers[n], f"could not link to the worker at "
                                                                                f"{self.workers[n].address} ({exc})"))

    def connect(self) -> None:
        """Check every worker (handshake: a wrong key or version is named here, before ggml),
        then give each to ggml and list its devices."""
        for w in self.workers:
            self._link(w).close()
        for i, w in enumerate(self.workers):
            w.endpoint = self.hook.endpoint(i)
            reg = self.lib.lib.ggml_backend_rpc_add_server(w.endpoint)
            if not reg:
                raise RuntimeFailure(f"the worker at {w.address} offers no device")
            for d in range(self.lib.ggml.ggml_backend_reg_dev_count(reg)):
                dev = self.lib.ggml.ggml_backend_reg_dev_get(reg, d)
                w.devices.append(dev)
                w.memory.append(self.lib.memory(dev))

    def _link(self, w: Worker) -> socket.socket:
        where = w.address
        try:
            sock = socket.create_connection((w.host, w.port), timeout=HANDSHAKE_SECONDS)
        except OSError as exc:
            raise RuntimeFailure(f"cannot reach the worker at {where} ({exc.strerror or exc}); is `--rpc-worker` "
                                 "running there, and the port open?") from None
        try:
            coordinator_handshake(sock, self.key, self.protocol, where)
        except HandshakeError as exc:
            sock.close()
            raise RuntimeFailure(str(exc)) from None
        except OSError as exc:
            sock.close()
            raise RuntimeFailure(f"the worker at {where} broke the handshake ({exc})") from None
        tune_link(sock)
        return sock

    def _open(self, n: int) -> socket.socket:
        """ggml's end of a new link to worker n (ggml asks whenever it (re)connects)."""
        w = self.workers[n]
        ours, theirs = socket_pair()
        try:
            outer = self._link(w)
        except RuntimeFailure as exc:
            self._lose(w, str(exc))
            self._unanswered.append(ours)  # open and unanswered: ggml waits rather than aborts
            return theirs
        threading.Thread(target=self._carry, args=(w, ours, outer), daemon=True, name=f"rpc-{w.address}").start()
        return theirs

    def _carry(self, w: Worker, inner: socket.socket, outer: socket.socket) -> None:
        ended = {}
        lock = threading.Lock()
        both = threading.Event()

        def done(side):
            def f(error):
                with lock:
                    ended[side] = error
                    if side == "worker" and "ggml" not in ended:
                        # The worker's side ended while ggml still talks to it: lost.
                        why = f"{error.strerror or error}" if error else "the connection closed"
                        self._lose(w, f"lost the worker at {w.address} ({why})")
                        return  # ggml's side stays open: ggml waits instead of aborting
                    if side == "ggml":
                        try:
                            outer.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                    if len(ended) == 2:
                        both.set()
            return f

        threading.Thread(target=_pump, args=(outer, inner, done("worker")), daemon=True).start()
        threading.Thread(target=_pump, args=(inner, outer, done("ggml")), daemon=True).start()
        both.wait()
        inner.close()
        outer.close()

    def _lose(self, w: Worker, message: str) -> None:
        if self.lost is None:
            self.lost = message
            self.on_lost(message)

    def all_devices(self) -> list:
        return [d for w in self.workers for d in w.devices]


def plan_layers(n_layer: int, local_free: int, local_gpu_devices: list, local_gpu_free: list[int],
                workers: list[Worker], split: list[float] | None) -> tuple[int, list[float], list[int], int]:
    """How the layers spread: returns (n_gpu_layers, tensor_split over the devices in order —
    this machine's GPUs, then each worker's devices —, the layers on each such device, the
    layers on this machine's CPU). By free memory unless split (--tensor-split: this machine
    first, then each worker) is given. Mirrors llama.cpp's assignment (llama-model.cpp): the
    last n_gpu_layers of the n_layer + 1 (the output counts as one) go to the devices by
    cumulative share; the rest stays on the CPU."""
    worker_free = [sum(f for f, _ in w.memory) for w in workers]
    n_dev_local = len(local_gpu_devices)
    if split is not None:
        if len(split) != 1 + len(workers) or any(x < 0 for x in split) or sum(split) <= 0:
            raise UsageError(f"--tensor-split takes {1 + len(workers)} shares (this machine, then each worker, "
                             f"e.g. {','.join(['1'] * (1 + len(workers)))}); got {','.join(map(str, split))}")
        local_share, worker_shares = split[0], split[1:]
    else:
        local_share, worker_shares = float(sum(local_gpu_free) if n_dev_local else local_free), list(map(float, worker_free))
    # each worker's share over its devices by their free memory
    shares: list[float] = []
    if n_dev_local:
        total = sum(local_gpu_free) or 1
        shares += [local_share * f / total for f in local_gpu_free]
    for w, s in zip(workers, worker_shares):
        total = sum(f for f, _ in w.memory) or 1
        shares += [s * f / total if total else s / len(w.memory) for f, _ in w.memory]
    total_layers = n_layer + 1
    if n_dev_local:
        gpu_layers = total_layers
    else:
        whole = local_share + sum(worker_shares)
        gpu_layers = min(total_layers, round(total_layers * sum(worker_shares) / whole)) if whole else 0
    cum, acc = [], 0.0
    s_sum = sum(shares) or 1.0
    for x in shares:
        acc += x
        cum.append(acc / s_sum)
    per_device = [0] * len(shares)
    cpu_layers = 0
    start = max(total_layers - gpu_layers, 0)
    import bisect

    for il in range(n_layer):  # the repeating layers (the output layer is reported with them below)
        if il < start or not shares:
            cpu_layers += 1
            continue
        per_device[min(bisect.bisect_right(cum, (il - start) / gpu_layers), len(shares) - 1)] += 1
    return gpu_layers, shares, per_device, cpu_layers


def parse_split(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) for x in text.replace("/", ",").split(",")]
    except ValueError:
        raise UsageError(f"--tensor-split takes numbers separated by commas (e.g. 3,1); got {text!r}") from None


def wait_forever() -> None:
    while True:
        time.sleep(3600)
