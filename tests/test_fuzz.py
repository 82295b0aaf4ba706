"""Fuzzing the two readers of untrusted files (issue 8): the bundle's payload reader and the
GGUF reader. Seeded; a few hundred cases in `make test`, many more with `make fuzz`
(BUNDLE_FUZZ_CASES). Every case must end in the reader's own error (a clean one-line message)
or a payload that passes every check; never another exception."""

import json
import os
import random
import struct

import pytest
from test_payload import write

from bundler.gguf import GGUFError, read_gguf
from runtime import bundlefile as P
from runtime import digest

CASES = int(os.environ.get("BUNDLE_FUZZ_CASES", "300"))
SEED = int(os.environ.get("BUNDLE_FUZZ_SEED", "8"))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "bundle"
    write(path, {"model.gguf": b"GGUF" + os.urandom(200_000), "native/cpu.tar.zst": os.urandom(70_000)},
          {"name": "fuzz", "settings": {"temp": 0.5}, "model": {"name": "m", "layout": {
              "n_layer": 2, "layer_bytes": [1, 2], "output_bytes": 3, "n_embd_k_gqa": 4, "n_embd_v_gqa": 4}}})
    return path.read_bytes()


def _mutate_toc(rng, toc: dict):
    """Structured mutations: wrong types, out-of-range numbers, path tricks, deep nesting."""
    evil = rng.choice([
        -1, 2**64, 1e308, float("nan"), "../../..////home", "", None, True, [], {}, "x" * 100_000,
        "0" * 64, "g" * 64, [[[[[]]]]], {"a": {"b": {"c": {}}}}, "\x1b[2J", 65536, 2**52 + 1,
    ])
    where = rng.randrange(5)
    if where == 0 and toc["entries"]:
        e = rng.choice(toc["entries"])
        e[rng.choice(["name", "offset", "size", "blake3", "sha256", "compression", "unpacked_size", "extra"])] = evil
    elif where == 1:
        m = toc.setdefault("manifest", {})
        m[rng.choice(["name", "settings", "model", "stub", "template", "template_name", "built"])] = evil
    elif where == 2:
        layout = toc["manifest"].setdefault("model", {}).setdefault("layout", {})
        if isinstance(layout, dict):
            layout[rng.choice(["n_layer", "layer_bytes", "output_bytes", "n_embd_k_gqa"])] = evil
    elif where == 3:
        toc[rng.choice(["format", "entries", "regions", "manifest"])] = evil
    else:
        toc["entries"].append(dict(rng.choice(toc["entries"])))  # duplicate / overlap
    return toc


def _check(path):
    try:
        p = P.read_payload(str(path))
    except P.PayloadError as exc:
        assert "\n" not in str(exc) and str(exc)
        return "refused"
    p.verify()  # a payload that is read must also verify without crashing
    for e in p.entries.values():
        assert e.name in P.KNOWN_ENTRIES and digest.is_digest(e.digest)
        assert p.payload_start + e.offset + e.size <= p.file_size
    return "read"


def test_fuzz_bundle_reader(sample, tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "b"
    outcomes = {"refused": 0, "read": 0}
    for i in range(CASES):
        data = bytearray(sample)
        kind = rng.randrange(4)
        if kind == 0:  # random flips anywhere near the structures
            for _ in range(rng.randint(1, 8)):
                at = rng.choice([rng.randrange(len(data)), len(data) - rng.randrange(1, 200),
                                 rng.randrange(65536, 65536 + 128)])
                data[at] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(data))
        elif kind == 1:  # cuts
            path.write_bytes(bytes(data[: rng.randrange(len(data))]))
        elif kind == 2:  # trailer/header fields
            path.write_bytes(bytes(data))
            start, size, toc_offset, toc_size, file_size = __import__("attack").locate(path)
            fields = [P.TRAILER_MAGIC, rng.choice([1, 2, 0, 2**31]), rng.choice([0, 1]),
                      rng.choice([size, 0, size + 65536, 2**63]), rng.choice([file_size, file_size - 1, 0]),
                      rng.choice([toc_offset, 0, 2**63, toc_offset + 1]), rng.choice([toc_size, 0, 2**40]),
                      os.urandom(16)]
            with open(path, "r+b") as f:
                f.seek(start + size - P.HEADER_SIZE)
                f.write(struct.pack(P.HEADER_FORMAT, *fields))
        else:  # a TOC an attacker wrote, with its hash recomputed
            from attack import read_toc, write_toc

            path.write_bytes(bytes(data))
            toc = _mutate_toc(rng, read_toc(path))
            try:
                raw = json.dumps(toc).encode()
            except ValueError:
                raw = b"{"
            if rng.random() < 0.05:
                raw = b"[" * 100_000 + b"]" * 100_000
            if len(raw) < 300_000:
                write_toc(path, None, raw=raw)
        outcomes[_check(path)] += 1
    assert outcomes["refused"] > CASES // 2, outcomes


@pytest.fixture(scope="module")
def gguf_head(model):
    with open(model, "rb") as f:
        return f.read(3_000_000)  # metadata and tensor table; the data is never parsed


def test_fuzz_gguf_reader(gguf_head, tmp_path):
    rng = random.Random(SEED + 1)
    path = tmp_path / "m.gguf"
    for i in range(max(CASES // 3, 50)):
        data = bytearray(gguf_head)
        for _ in range(rng.randint(1, 6)):
            at = rng.choice([rng.randrange(4, 64), rng.randrange(len(data)), rng.randrange(4, 200_000)])
            data[at] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        path.write_bytes(bytes(data))
        try:
            read_gguf(str(path))
        except GGUFError as exc:
            assert "\n" not in str(exc)
