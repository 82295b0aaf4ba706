"""The payload format: writer -> reader round trips on synthetic files, and damage detection."""

import struct

import blake3
import pytest

from runtime import bundlefile as P


def fake_stub(archive_body: bytes = b"A" * 5000) -> tuple[bytes, int]:
    """Bytes shaped like a PyInstaller one-file stub: a 'bootloader', an archive ending in a
    cookie, and a few bytes after it. Returns (bytes, archive_start)."""
    boot = b"\x7fELF-not-really" + b"\0" * 3000
    pkg_len = len(archive_body) + P.PYI_COOKIE_SIZE
    cookie = struct.pack(P.PYI_COOKIE_FORMAT, P.PYI_COOKIE_MAGIC, pkg_len, 0, 0, 311, b"libpython3.11.so")
    return boot + archive_body + cookie + b"S" * 300, len(boot)


def write(path, entries: dict, manifest=None, tail_mode="auto"):
    stub, archive_start = fake_stub()
    cookie_pos = stub.rfind(P.PYI_COOKIE_MAGIC)
    stub_archive = stub[archive_start : cookie_pos + P.PYI_COOKIE_SIZE]
    start = P.align_up(len(stub))
    with open(path, "wb") as f:
        f.write(stub)
        w = P.PayloadWriter(f, start)
        for name, data in entries.items():
            w.add_bytes(name, data)
        toc = w.toc_bytes(manifest or {"name": "t"})
        end = start + w.size_with(toc)
        tail = P.make_tail(stub_archive, end + P.PYI_COOKIE_SIZE, archive_start)
        if tail_mode == "archive":
            tail = stub_archive + bytes(P.TAIL_PAD)
        w.finish(toc, end + len(tail))
        f.seek(end)
        f.write(tail)
    return start, archive_start


@pytest.mark.parametrize("tail_mode", ["auto", "archive"])
def test_round_trip(tmp_path, tail_mode):
    path = tmp_path / "b"
    data = {"model.gguf": b"GGUF" + bytes(range(256)) * 1000, "native/cpu.tar.zst": b"x" * 70000}
    start, archive_start = write(path, data, {"name": "demo", "settings": {"temp": 0.5}}, tail_mode)
    p = P.read_payload(str(path))
    assert p.payload_start == start
    assert p.manifest.name == "demo" and p.manifest.settings == {"temp": 0.5}
    assert p.manifest == P.Manifest.from_json(p.manifest.to_json())  # the typed manifest round-trips
    assert p.version == P.FORMAT_VERSION
    for name, blob in data.items():
        e = p.entries[name]
        assert p.read_entry(name) == blob
        assert e.digest == "blake3:" + blake3.blake3(blob).hexdigest()
        assert (p.payload_start + e.offset) % P.ENTRY_ALIGN == 0  # mmap-able GGUF
    assert p.verify() == []
    # The tail's cookie leads a PyInstaller bootloader to an archive: the stub's own, or the
    # copy that ends the file when the distance does not fit in 32 bits.
    with open(path, "rb") as f:
        found = P.find_archive_start(f, path.stat().st_size)
    if tail_mode == "auto":
        assert found == archive_start
    else:
        assert found == p.payload_start + p.payload_size


def test_cookie_tail_is_small_and_archive_tail_copies(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, {"model.gguf": b"1" * 10})
    write(b, {"model.gguf": b"1" * 10}, tail_mode="archive")
    assert b.stat().st_size - a.stat().st_size == 5000  # the archive body, copied


def test_make_tail_falls_back_to_archive_copy_beyond_4_gib():
    stub, archive_start = fake_stub()
    cookie_pos = stub.rfind(P.PYI_COOKIE_MAGIC)
    arch = stub[archive_start : cookie_pos + P.PYI_COOKIE_SIZE]
    assert len(P.make_tail(arch, archive_start + 10**6, archive_start)) == P.PYI_COOKIE_SIZE + P.TAIL_PAD
    assert P.make_tail(arch, archive_start + 5 * 2**30, archive_start) == arch + bytes(P.TAIL_PAD)


def test_truncated_file_says_how_much_is_missing(tmp_path):
    path = tmp_path / "b"
    write(path, {"model.gguf": b"G" * 300000})
    full = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(full - 100000)
    with pytest.raises(P.IncompleteError) as e:
        P.read_payload(str(path))
    assert f"this file is incomplete: {full - 100000} of {full} bytes" in str(e.value)


def test_damaged_entry_is_named(tmp_path):
    path = tmp_path / "b"
    write(path, {"model.gguf": b"G" * 300000, "native/cpu.tar.zst": b"o" * 10})
    p = P.read_payload(str(path))
    with open(path, "r+b") as f:
        f.seek(p.absolute_offset("model.gguf") + 1234)
        f.write(b"X")
    problems = P.read_payload(str(path)).verify()
    assert len(problems) == 1 and problems[0].startswith("model.gguf (the model): damaged")


def test_damaged_toc_is_refused(tmp_path):
    path = tmp_path / "b"
    write(path, {"model.gguf": b"1"})
    p = P.read_payload(str(path))
    toc_at = p.payload_start + p.payload_size - P.HEADER_SIZE - 20
    with open(path, "r+b") as f:
        f.seek(toc_at)
        f.write(b"#")
    with pytest.raises(P.PayloadError, match="table of contents is damaged"):
        P.read_payload(str(path))


def test_newer_format_is_refused(tmp_path):
    path = tmp_path / "b"
    write(path, {"model.gguf": b"1"})
    p = P.read_payload(str(path))
    trailer_at = p.payload_start + p.payload_size - P.HEADER_SIZE
    with open(path, "r+b") as f:
        f.seek(trailer_at + 8)
        f.write(struct.pack("<I", P.FORMAT_VERSION + 1))
    with pytest.raises(P.NewerFormatError, match="newer than this program understands"):
        P.read_payload(str(path))


def test_not_a_bundle(tmp_path):
    path = tmp_path / "plain"
    path.write_bytes(b"hello" * 1000)
    with pytest.raises(P.NotABundleError):
        P.read_payload(str(path))
    with pytest.raises(P.NotABundleError):
        P.read_payload(str(tmp_path))


def test_writer_refuses_unaligned_start(tmp_path):
    with open(tmp_path / "x", "wb") as f:
        with pytest.raises(ValueError):
            P.PayloadWriter(f, 1000)
