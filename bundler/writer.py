"""Writing a bundle: a copy of the stub, then the payload, then the tail (runtime/bundlefile
has the layout and why).

Nothing is compiled or packaged here: building a bundle is a file copy (hashed on the way) plus
a few KiB of headers, so it runs at disk speed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from runtime import digest
from runtime.host.gpu.registry import GPU_BACKENDS
from runtime.bundlefile import Manifest, ModelPart, Region, StubInfo, MODEL_ENTRY, NATIVE_CPU_ENTRY, NotABundleError, PayloadError, PayloadWriter, align_up, PYI_COOKIE_SIZE, find_cookie, masked, pe_hash_mask, TAIL_PAD, make_tail, read_payload

from runtime.bundlefile.layout import RUNTIME_ENTRY, lora_entry, stored_name

from . import universal
from .errors import BundleError
from .stubs import Stub

# Room for the TOC, headers and alignment on top of the entries when checking free space.
SLACK = 4 * 1024 * 1024


def is_bundle(path: Path) -> bool:
    try:
        read_payload(str(path))
        return True
    except NotABundleError:
        return False
    except PayloadError:
        return True  # a damaged or cut bundle is still a bundle: replacing it loses nothing


def _nearest_existing(folder: Path) -> Path:
    """The folder itself, or its nearest ancestor that exists (-o may name folders to create)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_output(output: Path, model: Path, force: bool) -> None:
    """Refuse what would lose the user's data or fail later, before anything is written."""
    try:
        exists = output.exists() or output.is_symlink()
    except PermissionError:
        raise BundleError(f"cannot reach {output} (permission denied); choose a writable folder with -o") from None
    if exists:
        if output.is_dir():
            raise BundleError(f"the output {output} is a directory; pass a file path with -o")
        try:
            if model.exists() and output.samefile(model):
                raise BundleError(f"the output {output} is the model itself; choose another path with -o")
        except OSError:
            pass
        if not force and not is_bundle(output):
            raise BundleError(
                f"{output} exists and is not a bundle; choose another path with -o or pass --force to replace it"
            )
    folder = _nearest_existing(output.parent)
    if not folder.is_dir():
        raise BundleError(f"the output folder {folder} is a file; choose another path with -o")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BundleError(f"cannot write to {folder} (permission denied); choose a writable folder with -o")


def check_space(output: Path, model: Path, stub: Stub, gpu: tuple[str, ...] = (), stored=()) -> None:
    folder = _nearest_existing(output.parent)
    # (split: the parts take the model's size plus a header each, well inside SLACK)
    needed = stub.exe.stat().st_size + model.stat().st_size + SLACK + sum(
        s.exe.stat().st_size + s.native_cpu.stat().st_size + sum(s.gpu[k].stat().st_size for k in gpu if k in s.gpu)
        for s in (stub, *stored))
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise BundleError(
            f"not enough free space in {folder}: the bundle needs {needed / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB are free; free some space or choose another folder with -o"
        )


def write_bundle(
    model: Path,
    stub: Stub,
    output: Path,
    manifest: dict,
    progress: Callable[[int], None] | None = None,
    tail_mode: str = "auto",
    gpu: tuple[str, ...] = (),
    parts: list | None = None,
    stored: list[Stub] = (),
    adapters: list = (),
) -> dict:
    """Write the bundle at output (via a temporary file in the same folder). Returns figures.

    gpu: the keys of the GPU back ends to carry (runtime/host/gpu/registry.py), each from the stub folder.

    stored: a universal file's other runtimes (bundler/universal.py): stub is then the Windows
    one, whose DOS header becomes the shell launcher of these.

    adapters: (name, path) of the LoRA adapters to pack (manifest.adapters describes them).

    parts: the model already written as split parts (bundler/split.py: temporary path, final
    name, size, sha256 each): the executable then carries no model, and the parts are renamed
    into place beside it just before it is."""
    stub_bytes = stub.exe.read_bytes()
    if stored:
        stub_bytes = universal.make_room(stub_bytes)
    cookie_pos, archive_start = find_stub_archive(stub_bytes)
    stub_archive = stub_bytes[archive_start : cookie_pos + PYI_COOKIE_SIZE]
    payload_start = align_up(len(stub_bytes))
    folder = output.parent
    check_space(output, model if model is not None else Path(adapters[0][1]), stub, gpu, stored)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create the output folder {folder}: {exc.strerror}; choose another with -o") from None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise BundleError(f"cannot write to {folder}: {exc.strerror}; choose a writable folder with -o") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(stub_bytes)
            writer = PayloadWriter(f, payload_start)
            native_meta = stub.meta.get("native", {}).get("cpu", {})
            writer.add_file(NATIVE_CPU_ENTRY, stub.native_cpu, "zstd", native_meta.get("unpacked_size"))
            for backend in GPU_BACKENDS:
                if backend.key in gpu and backend.key in stub.gpu:
                    record = stub.meta["native"][backend.key]
                    writer.add_file(backend.entry, stub.gpu[backend.key], record.get("compression", "zstd"),
                                    record.get("unpacked_size"))
            launched = {}  # a universal file: each runtime with its libraries
            for other in stored:
                exe = other.exe.read_bytes()
                data, magic_at = universal.stored_runtime(exe)
                entry = writer.add_bytes(stored_name(other.target, RUNTIME_ENTRY), data)
                launched[other.target] = (payload_start + entry.offset, entry.size,
                                          hashlib.sha256(exe).hexdigest(), magic_at)
                writer.add_file(stored_name(other.target, NATIVE_CPU_ENTRY), other.native_cpu, "zstd",
                                other.meta.get("native", {}).get("cpu", {}).get("unpacked_size"))
                for backend in other.gpu_backends():
                    if backend.key in gpu:
                        record = other.meta["native"][backend.key]
                        writer.add_file(stored_name(other.target, backend.entry), other.gpu[backend.key],
                                        record.get("compression", "zstd"), record.get("unpacked_size"))
            for name, path in adapters:
                writer.add_file(lora_entry(name), path)
            if not isinstance(manifest, Manifest):
                manifest = Manifest.from_json(manifest)
            if stored:
                manifest = dataclasses.replace(manifest, runtimes={
                    other.target: StubInfo.from_json(other.manifest_info()) for other in stored})
            if model is None:  # an adapter-only bundle: the base's model is found at launch
                model_entry = None
            elif parts:
                model_entry = None
                manifest = dataclasses.replace(manifest, model=dataclasses.replace(
                    manifest.model, parts=tuple(ModelPart(name, size, digest) for _, name, size, digest in parts)))
            else:
                model_entry = writer.add_file(MODEL_ENTRY, model, progress=progress)
                manifest = dataclasses.replace(manifest, model=dataclasses.replace(manifest.model,
                                                                                   digest=model_entry.digest))
            # The tail's cookie reaches back from the payload's end, which depends on the TOC's
            # length, which holds the tail's hash: settle it in a few rounds (it moves by 64 KiB
            # steps, so it is stable at once unless the TOC crosses a boundary). A universal
            # file's launcher names the file's size, and is hashed in the bootloader region.
            tail, payload_end = b"", -1
            for _ in range(5):
                if stored:
                    stub_bytes = universal.front_with_launcher(stub_bytes, launched, payload_end + len(tail),
                                                               manifest.targets())
                stub_regions = runtime_regions(stub_bytes, archive_start, cookie_pos, payload_start)
                toc = writer.toc_bytes(manifest, [*stub_regions, _region("tail", payload_end, tail)])
                end = payload_start + writer.size_with(toc)
                if end == payload_end:
                    break
                payload_end = end
                tail = make_tail(stub_archive, payload_end + PYI_COOKIE_SIZE, archive_start)
                if tail_mode == "archive":  # tests use this to cover the >4 GiB layout with a small model
                    tail = stub_archive + tail[-TAIL_PAD:]
            else:
                raise BundleError("the bundle's table of contents did not settle; report it")
            file_size = payload_end + len(tail)
            if stored:
                f.seek(0)
                f.write(stub_bytes[:archive_start])  # the launcher, now that the numbers are known
            writer.finish(toc, file_size)
            f.seek(payload_end)
            f.write(tail)
            # No fsync, as cp, compilers and PyInstaller do not: the bundle is rebuilt from its
            # inputs, and checks itself at launch (a file cut short by a power loss is named as
            # such). The rename alone keeps a half-written file from ever taking the name.
        os.chmod(tmp, 0o755)
        for part_tmp, name, *_ in parts or ():
            os.replace(part_tmp, folder / name)
        os.replace(tmp, output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == 28:  # ENOSPC
            raise BundleError(f"the disk holding {folder} is full; free some space or choose another folder with -o") from None
        raise BundleError(f"cannot write {output}: {exc.strerror}; check the folder and free space") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {
        "path": str(output),
        "size": file_size,
        "model_offset": payload_start + model_entry.offset if model_entry else None,
        "model_digest": model_entry.digest if model_entry else None,
        "parts": [(name, size) for _, name, size, _ in parts or ()],
    }


def _region(name: str, offset: int, data: bytes) -> Region:
    return Region(name, offset, len(data), digest.of_bytes(data))


def runtime_regions(stub_bytes: bytes, archive_start: int, cookie_pos: int, payload_start: int) -> list[Region]:
    """Hashes of the stub's parts, so verify and the first launch see damage to the runtime
    itself: the bootloader, PyInstaller's archive, and what follows it up to the payload."""
    cookie_end = cookie_pos + PYI_COOKIE_SIZE
    end = stub_bytes[cookie_end:] + bytes(payload_start - len(stub_bytes))
    import io

    # A Windows stub's checksum and certificate-table entry are hashed as zeros: signing the
    # finished bundle (Authenticode) rewrites them, and must not read as damage.
    bootloader = masked(stub_bytes[:archive_start], 0, pe_hash_mask(io.BytesIO(stub_bytes)))
    return [_region("bootloader", 0, bootloader),
            _region("archive", archive_start, stub_bytes[archive_start:cookie_end]),
            _region("stub-end", cookie_end, end)]


def find_stub_archive(stub_bytes: bytes) -> tuple[int, int]:
    """(cookie offset, archive start) of the stub's PyInstaller archive."""
    import io

    found = find_cookie(io.BytesIO(stub_bytes), len(stub_bytes))
    if found is None or found[0] + PYI_COOKIE_SIZE - found[1] < 0:
        raise BundleError("the stub has no PyInstaller archive; rebuild it with python build.py")
    return found[0], found[0] + PYI_COOKIE_SIZE - found[1]
