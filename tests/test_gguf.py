"""GGUF reading on the real demo model, and the checks that catch bad files."""

import pytest

from bundler.gguf import GGUFError, read_gguf


def test_demo_model_summary(model):
    info = read_gguf(str(model))
    s = info.summary()
    assert s["architecture"] == "llama"
    assert s["size_label"] == "135M"
    assert s["quantization"] == "Q4_1"
    assert s["context_length"] == 8192
    assert 130e6 < s["parameters"] < 140e6
    assert "<|im_start|>" in info.chat_template
    assert info.data_offset % 32 == 0


def test_zip_is_named(tmp_path):
    p = tmp_path / "model.zip"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match="zip archive: unzip it"):
        read_gguf(str(p))


@pytest.mark.parametrize("cut", [10, 5000, 2_000_000])
def test_truncation_anywhere_is_caught(model, tmp_path, cut):
    p = tmp_path / "cut.gguf"
    with open(model, "rb") as f:
        p.write_bytes(f.read(cut))
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(str(p))


def test_last_byte_missing_is_caught(model, tmp_path):
    p = tmp_path / "cut.gguf"
    data = model.read_bytes()
    p.write_bytes(data[:-1])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(str(p))


def test_empty_directory_missing(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match="empty"):
        read_gguf(str(empty))
    with pytest.raises(GGUFError, match="directory"):
        read_gguf(str(tmp_path))
    with pytest.raises(GGUFError, match="does not exist"):
        read_gguf(str(tmp_path / "nope.gguf"))
