"""Computed prompts kept for later: in host memory across slots and requests (as llama-server's
--cache-ram), and the state after the system prompt on disk across launches.

In memory. When a slot is about to lose much of what its KV cache holds (another conversation
takes it), its sequence's state (llama_state_seq_get_data: the keys and values of its cells) is
copied into a PromptCache first. A newcomer whose prompt shares a longer prefix with an entry than
with any free slot has that state copied into its slot (llama_state_seq_set_data) and decodes only
the rest. Entries are kept in least-recently-used order within a size limit; one whose tokens
are a prefix of a newer entry's goes (the newer one serves both). A state holds the keys and
values computed with one set of LoRA scales: it serves only requests with the same.

On disk (PromptStore). The state after the bundle's system prompt is saved once in the per-user
cache, named by what it depends on (the model's hash, the adapters and their scales, the
tokens, the context and slots, llama.cpp's version), written atomically, checked (a digest of
the data) before use, the folder kept under a size limit, and an entry of the same bundle file
made for something else (a rebuilt bundle, another system prompt) removed when a new one is
saved. A second launch copies it into a slot instead of decoding the system prompt again.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import hmac
import json
import os
import secrets
import stat
import struct
import time
from dataclasses import dataclass, field

from ..host import cachedir

# Copying a state costs far less than computing it: measured on the demo model (2 cores), a
# state of 100 tokens is read in 0.7-2.3 ms and written back in 0.3-0.5 ms, where decoding a
# prompt token beside other answers costs 1-4 ms. So a slot's state is saved before it is given
# to another conversation when the new prompt would discard at least SAVE_MIN of its tokens (the
# next turn of the same conversation discards one or two: the end of the last answer, which the
# template writes again), and a cached state is copied into a slot when it spares RESTORE_MIN
# more tokens than the slot holds, and a 256th of its length (a copy is of the whole state).
SAVE_MIN = 16
RESTORE_MIN = 4


def worth_restoring(k: int, keep: int) -> bool:
    """Whether a state of k tokens of the prompt is worth copying into a slot that keeps keep."""
    return k - keep >= max(RESTORE_MIN, k >> 8)


def common_prefix(a, b, limit: int | None = None) -> int:
    """How many leading items a and b share (at most limit): compared in slices, so a long prefix
    costs a few list comparisons in C instead of one Python step per token."""
    if type(a) is not type(b):  # a tuple never equals a list: compare like with like
        a, b = list(a), list(b)
    n = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    lo, hi = 0, n  # a[:lo] == b[:lo]; the first difference is before hi
    if a[:n] == b[:n]:
        return n
    while hi - lo > 16:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    while lo < hi and a[lo] == b[lo]:
        lo += 1
    return lo


@dataclass
class Entry:
    tokens: tuple
    lora: tuple
    data: object  # a ctypes byte array: the sequence state as llama_state_seq_get_data wrote it
    size: int
    used: float = field(default_factory=time.monotonic)


@dataclass
class CacheCounters:
    saved: int = 0  # states copied in
    hits: int = 0  # requests that started from an entry
    reused_tokens: int = 0  # prompt tokens those requests did not decode
    evicted: int = 0  # entries dropped for room
    restore_failures: int = 0


class PromptCache:
    """Sequence states in host memory, least recently used first out, within limit bytes
    (None: no limit)."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self.size = 0
        self.stats = CacheCounters()
        self._next = 0

    def __len__(self) -> int:
        return len(self.entries)

    def best(self, tokens: list[int], lora: tuple) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with tokens (computed with these LoRA scales),
        and that length; never the whole prompt (its last token is always decoded)."""
        best, best_k = None, 0
        limit = len(tokens) - 1
        for entry in self.entries.values():
            if entry.lora != lora:
                continue
            k = common_prefix(entry.tokens, tokens, limit)
            if k > best_k:
                best, best_k = entry, k
        return best, best_k

    def covers(self, tokens: list[int], lora: tuple) -> bool:
        """Whether an entry holds all of tokens already (they are a prefix of its tokens)."""
        return any(e.lora == lora and len(e.tokens) >= len(tokens) and common_prefix(e.tokens, tokens) == len(tokens)
                   for e in self.entries.values())

    def use(self, entry: Entry, reused: int) -> None:
        for key, e in self.entries.items():
            if e is entry:
                self.entries.move_to_end(key)
                break
        entry.used = time.monotonic()
        self.stats.hits += 1
        self.stats.reused_tokens += reused

    def add(self, tokens, lora: tuple, data, size: int) -> bool:
        """Keep a state; False when it is larger than the whole limit. Entries it extends go."""
        if self.limit is not None and size > self.limit:
            return False
        tokens = tuple(tokens)
        for key in [k for k, e in self.entries.items()
                    if e.lora == lora and len(e.tokens) <= len(tokens) and common_prefix(e.tokens, tokens) == len(e.tokens)]:
            self._drop(key)
        while self.limit is not None and self.entries and self.size + size > self.limit:
            self._drop(next(iter(self.entries)))
            self.stats.evicted += 1
        self.entries[self._next] = Entry(tokens, lora, data, size)
        self._next += 1
        self.size += size
        self.stats.saved += 1
        return True

    def _drop(self, key: int) -> None:
        self.size -= self.entries.pop(key).size

    def clear(self) -> None:
        self.entries.clear()
        self.size = 0


# -- llama.cpp's sequence state -------------------------------------------------------------------

def read_state(C, ctx, seq: int):
    """(data, size): the keys and values one sequence holds, as llama.cpp writes them."""
    size = C.llama_state_seq_get_size(ctx, seq)
    data = (ctypes.c_uint8 * max(1, size))()
    written = C.llama_state_seq_get_data(ctx, data, size, seq)
    return data, written


def write_state(C, ctx, seq: int, data, size: int) -> bool:
    """Put a state read by read_state into sequence seq (what it held is replaced)."""
    return C.llama_state_seq_set_data(ctx, data, size, seq) == size


# -- on disk -----------------------------------------------------------------------------------

MAGIC = b"BUNDLE-KV\x001\n"
KEY_FILE = ".key"
SUFFIX = ".kv"
FOLDER = "prompts"
DISK_LIMIT = 2 << 30  # the folder's size, all bundles together; the oldest files go first
DISK_MIN = 128  # a system prompt shorter than this (in tokens) is decoded again: cheaper than a file


class PromptStore:
    """The state after a bundle's system prompt, in the per-user cache (see the module's text).
    Every method fails quietly: a cache that cannot be read or written costs time, never an
    answer."""

    def __init__(self, cache_root, owner: str, identity: dict, limit: int = DISK_LIMIT, say=lambda msg: None):
        """owner: the bundle file (its entries replace each other); identity: what a state
        depends on besides its tokens (the model's hash, adapters, context, slots, versions)."""
        self.root, self.limit, self.say = cache_root, limit, say
        self.owner = hashlib.sha256(os.fsencode(owner)).hexdigest()[:16]
        self.identity = identity
        self.last_problem: str | None = None

    def name(self, tokens: list[int]) -> str:
        key = json.dumps({"identity": self.identity, "tokens": list(tokens)}, sort_keys=True).encode()
        return f"{self.owner}-{hashlib.sha256(key).hexdigest()[:32]}{SUFFIX}"

    def _folder(self):
        root = cachedir.Folder.open_root(self.root)
        try:
            return root.sub(FOLDER)
        finally:
            root.close()

    def load(self, tokens: list[int]):
        """(data, size) saved for exactly these tokens, checked; None when there is none, or it is
        damaged (then it is removed, and the caller saves a good one)."""
        name = self.name(tokens)
        self.last_problem = None
        try:
            with self._folder() as folder:
                try:
                    fd = folder.open(name, os.O_RDONLY)
                except FileNotFoundError:
                    return None
                with os.fdopen(fd, "rb") as f:
                    st = os.fstat(f.fileno())
                    own = stat.S_ISREG(st.st_mode) and (not cachedir.POSIX or st.st_uid == os.geteuid())
                    key = self._key(folder, create=False)
                    state = self._read(f, name, tokens, key) if own and key else None
                if state is None:
                    folder.remove(name)
                return state
        except (OSError, cachedir.UnsafeCacheError) as exc:
            self.last_problem = str(exc)
            return None

    @staticmethod
    def _key(folder, create: bool) -> bytes | None:
        """The key states are signed with (32 random bytes made once in the private folder): a
        file put there by anything but the runtime is not believed."""
        key = folder.read_own(KEY_FILE, 64)
        if key and len(key) == 32:
            return key
        if not create:
            return None
        key = secrets.token_bytes(32)
        folder.write_atomic(KEY_FILE, key)
        return key

    @staticmethod
    def _digest(key: bytes, data) -> str:
        return hmac.new(key, data, hashlib.sha256).hexdigest()

    def _read(self, f, name: str, tokens: list[int], key: bytes):
        """The state in an open file, read straight into the buffer llama.cpp will read."""
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or not head.startswith(MAGIC):
            self.last_problem = f"{name}: not a saved prompt"
            return None
        (n,) = struct.unpack_from("<I", head, len(MAGIC))
        try:
            header = json.loads(f.read(min(n, 1 << 26)))
            size, digest = int(header["size"]), str(header["mac"])
            saved_tokens = header["tokens"]
        except (ValueError, KeyError, TypeError):
            self.last_problem = f"{name}: its header is damaged"
            return None
        if saved_tokens != list(tokens) or header.get("identity") != self.identity:
            self.last_problem = f"{name}: saved for another prompt"
            return None
        buf = (ctypes.c_uint8 * max(1, size))()
        got = f.readinto(memoryview(buf).cast("B")[:size]) if size else 0
        if got != size or f.read(1) or not hmac.compare_digest(self._digest(key, memoryview(buf).cast("B")[:size]), digest):
            self.last_problem = f"{name}: damaged (its size or digest does not match)"
            return None
        return buf, size

    def save(self, tokens: list[int], data, size: int) -> bool:
        """Write the state for tokens (atomically); other entries of this bundle file go, and the
        oldest of all while the folder is over its limit."""
        name = self.name(tokens)
        raw = bytes(memoryview(data).cast("B")[:size])
        if len(raw) > self.limit:
            return False
        try:
            with self._folder() as folder:
                header = json.dumps({"identity": self.identity, "tokens": list(tokens), "size": size,
                                     "mac": self._digest(self._key(folder, create=True), raw),
                                     "saved": time.time()}).encode()
                for other in folder.listdir():
                    if other.startswith(self.owner + "-") and other.endswith(SUFFIX) and other != name:
                        folder.remove(other)
                self._make_room(folder, len(raw) + len(header))
                folder.write_atomic(name, MAGIC + struct.pack("<I", len(header)) + header + raw)
            return True
        except (OSError, cachedir.UnsafeCacheError) as exc:
            self.last_problem = str(exc)
            return False

    def _make_room(self, folder, need: int) -> None:
        files = []
        for name in folder.listdir():
            if name.endswith(SUFFIX) or name.endswith(".tmp"):
                try:
                    st = folder.lstat(name)
                except OSError:
                    continue
                files.append((st.st_mtime, st.st_size, name))
        total = sum(s for _, s, _ in files)
        for _, size, name in sorted(files):
            if total + need <= self.limit:
                break
            folder.remove(name)
            total -= size
