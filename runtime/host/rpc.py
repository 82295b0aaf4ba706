"""Beyond one machine: ggml's RPC back end (libggml-rpc.so, built by buildsys/rpc.py) behind a
handshake on a shared key. `--rpc-worker` serves this machine's back end; `--rpc HOST:PORT,...`
loads a model across the workers and this machine.

ggml's RPC server has no authentication (llama.cpp: never expose it). Here ggml never touches
the network: the worker's ggml server accepts only on a Unix socket in a private folder (0700),
and the coordinator's ggml client connects only to Unix sockets of its own process (the
library's "fd:N" endpoints, buildsys/rpc.py). Between the two runs this module's TCP link, which
opens with a handshake before a single byte is passed on:

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
import secrets
import shutil
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RuntimeFailure, UsageError

LIBRARY = "libggml-rpc.so"
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
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


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
            raise RuntimeFailure("this bundle's runtime carries no RPC back end (it was built before --rpc, or for "
                                 "Windows, which has none yet); rebuild it with a current stub")
        self.ggml = ggml = ctypes.CDLL(str(libdir / ggml_lib))
        self.lib = lib = ctypes.CDLL(str(path))
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        for name, res, args in (
            ("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
            ("ggml_backend_dev_description", ctypes.c_char_p, [vp]),
            ("ggml_backend_dev_name", ctypes.c_char_p, [vp]),
            ("ggml_backend_dev_by_type", vp, [ctypes.c_int]),
            ("ggml_backend_reg_dev_count", sz, [vp]),
            ("ggml_backend_reg_dev_get", vp, [vp, sz]),
        ):
            f = getattr(ggml, name)
            f.restype, f.argtypes = res, args
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
    private = Path(tempfile.mkdtemp(prefix="bundle-rpc-"))  # 0700: only this user reaches ggml's socket
    ggml_path = private / "ggml.sock"
    inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inner.bind(str(ggml_path))
    inner.listen(4)
    tensors = cache / TENSOR_CACHE
    tensors.mkdir(mode=0o700, exist_ok=True)
    trim_tensor_cache(tensors)
    # ggml's server prints its own banner (with the private endpoint) on stdout: this mode's
    # words go to stderr, ggml's to nowhere.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    array = (ctypes.c_void_p * len(offer.devices))(*offer.devices)
    server = threading.Thread(target=lib.lib.ggml_backend_rpc_start_server, daemon=True, name="ggml-rpc",
                              args=(f"fd:{inner.fileno()}".encode(), str(tensors).encode(), threads,
                                    len(offer.devices), array))
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
                ggml = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                ggml.connect(str(ggml_path))
                _bridge(conn, ggml)
            finally:
                departed(host_)
        except (HandshakeError, OSError) as exc:
            log(f"rpc worker: {'lost' if held else 'refused'} {peer}: {exc}")
        finally:
            conn.close()
            if held:
                busy.release()

    try:
        while True:
            conn, addr = front.accept()
            threading.Thread(target=session, args=(conn, f"{addr[0]}:{addr[1]}"), daemon=True).start()
    finally:
        shutil.rmtree(private, ignore_errors=True)


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
    endpoint: bytes = b""  # what ggml calls it ("fd:N": this process's Unix socket to the link)
    devices: list = field(default_factory=list)
    memory: list = field(default_factory=list)  # (free, total) per device
    layers: int = 0
    listener: socket.socket | None = None  # the Unix socket ggml connects to for this worker


class Workers:
    """The coordinator's links to its workers: each worker a private Unix socket that ggml
    connects to, each connection carried to the worker over an authenticated TCP link."""

    def __init__(self, lib: Library, addresses: list[str], key: bytes, protocol, on_lost):
        self.lib, self.key, self.protocol, self.on_lost = lib, key, protocol, on_lost
        self.lost: str | None = None
        self.workers = [Worker(text.strip(), *parse_endpoint(text)) for text in addresses]
        self.private = Path(tempfile.mkdtemp(prefix="bundle-rpc-"))  # 0700: only this user's ggml connects
        import atexit

        atexit.register(self.remove)

    def remove(self) -> None:
        """The private folder of the Unix sockets (at exit; a lost worker's os._exit calls it)."""
        shutil.rmtree(self.private, ignore_errors=True)

    def connect(self) -> None:
        """Check every worker (handshake: a wrong key or version is named here, before ggml),
        then give each to ggml and list its devices."""
        for w in self.workers:
            self._link(w).close()
        for i, w in enumerate(self.workers):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(self.private / f"worker{i}.sock"))
            listener.listen(4)
            threading.Thread(target=self._accept, args=(w, listener), daemon=True, name=f"rpc-{w.address}").start()
            w.endpoint = f"fd:{listener.fileno()}".encode()
            w.listener = listener
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

    def _accept(self, w: Worker, listener: socket.socket) -> None:
        while True:
            try:
                inner, _ = listener.accept()
            except OSError:
                return
            try:
                outer = self._link(w)
            except RuntimeFailure as exc:
                self._lose(w, str(exc))
                continue  # inner stays open and unanswered: ggml waits rather than aborts
            threading.Thread(target=self._carry, args=(w, inner, outer), daemon=True).start()

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
