"""An adapter-only bundle's base (bundle build --lora A --base B): the file that holds the model it
was built for, found at launch beside the bundle (or where --base says), and checked to be that
model (size, then its digest: hashed once per file, remembered like the first-launch check)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .. import digest
from ..errors import PayloadError
from ..text import printable
from . import checks
from .layout import MODEL_ENTRY
from .reader import read_payload

MAX_LOOKED_AT = 500  # files of the folder looked at (a USB stick's root can hold many)


def _human(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def model_in(path: str, ref) -> int | None:
    """Where in path the base's model starts: 0 for a .gguf of its size, the model entry of a
    bundle whose model is it; None for anything else."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size < ref.size:
            return None
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return None
    if magic == b"GGUF":
        return 0 if st.st_size == ref.size else None
    try:
        payload = read_payload(path)
    except PayloadError:
        return None
    entry = payload.entries.get(MODEL_ENTRY)
    if entry is None or entry.size != ref.size:
        return None
    if digest.algorithm_of(entry.digest) == digest.algorithm_of(ref.digest) and entry.digest != ref.digest:
        return None  # (hashed with another algorithm, it is hashed again with the reference's)
    return payload.payload_start + entry.offset


def find_base(payload, asked: str | None, cache_root: Path, say=lambda msg: None) -> tuple[str, int]:
    """(path, offset) of the base model an adapter-only bundle runs on. Raises PayloadError with
    one line naming the file it needs (name, size, SHA-256 prefix) and where it looked."""
    ref = payload.manifest.base
    own = os.path.abspath(payload.path)
    needs = f"{printable(ref.file)} ({_human(ref.size)}, {digest.short(ref.digest)})"
    if asked:
        offset = model_in(asked, ref)
        if offset is None or not checks.model_checked_once(asked, offset, ref.size, ref.digest, cache_root, say):
            raise PayloadError(f"--base {printable(asked)} is not the model this adapter was built for: it needs "
                               f"{needs}, its bundle or its .gguf")
        return asked, offset
    folder = os.path.dirname(own)
    try:
        names = sorted(os.listdir(folder))[:MAX_LOOKED_AT]
    except OSError:
        names = []
    names.sort(key=lambda n: n != ref.file)  # the file it was built against first
    for name in names:
        path = os.path.join(folder, name)
        if os.path.abspath(path) == own:
            continue
        offset = model_in(path, ref)
        if offset is not None and checks.model_checked_once(path, offset, ref.size, ref.digest, cache_root, say):
            return path, offset
    raise PayloadError(f"this bundle is an adapter: it needs the model {needs}, or a bundle of it, beside it "
                       f"(looked in {printable(folder)}); copy it there, or pass --base PATH")
