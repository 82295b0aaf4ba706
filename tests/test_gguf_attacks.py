"""Issue 8.10: GGUFs that llama.cpp cannot load are refused by `bundle build` with a one-line
reason (the real command), and metadata cannot put escape codes on a terminal."""

import json

import pytest
from conftest import run_bundle_cmd, run_exe
from ggufmaker import ARRAY, I32, STRING, U32, llama_kv, write_gguf
from test_cli import assert_one_line_error, listing

CASES = {
    "alignment 0": (llama_kv(general__alignment=(U32, 0)), None, "general.alignment"),
    "alignment 3": (llama_kv(general__alignment=(U32, 3)), None, "not a power of two"),
    "alignment -1": (llama_kv(general__alignment=(I32, -1)), None, "general.alignment"),
    "unknown tensor type": (llama_kv(), [("token_embd.weight", (32, 4), 77, 512)], "type 77, unknown"),
    "no architecture": (llama_kv(general__architecture=None), None, "general.architecture"),
    "block_count 2e7": (llama_kv(llama__block_count=(U32, 20_000_000)), None, "block_count"),
    "nested arrays": (llama_kv(general__tags=(ARRAY, (ARRAY, [(STRING, ["a"])]))), None, "nested"),
    "head_count_kv odd": (llama_kv(llama__attention__head_count_kv=(U32, 3)), None, "must divide"),
    "head_count_kv 0": (llama_kv(llama__attention__head_count_kv=(U32, 0)), None, "head_count_kv"),
    "key_length 0": (llama_kv(llama__attention__key_length=(U32, 0)), None, "key_length"),
    "tensor beyond layers": (llama_kv(), [("blk.5.attn_q.weight", (32, 4), 0, 512)], "beyond"),
    "row not in blocks": (llama_kv(), [("token_embd.weight", (33, 4), 2, 18 * 4)], "block"),
    "overlapping tensors": (llama_kv(), "overlap", "starts at"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_build_refuses_models_llama_cpp_cannot_load(case, tmp_path):
    kv, tensors, needle = CASES[case]
    path = tmp_path / "m.gguf"
    if tensors == "overlap":
        write_gguf(path, kv, [("a.weight", (32,), 0, 128), ("b.weight", (32,), 0, 128)])
        data = bytearray(path.read_bytes())  # point b at a's data
        at = data.index(b"b.weight") + len("b.weight") + 4 + 8 + 4
        data[at:at + 8] = (0).to_bytes(8, "little")
        path.write_bytes(bytes(data))
    else:
        write_gguf(path, kv, tensors, alignment=kv and dict((k, v) for k, _, v in kv).get("general.alignment", 32))
    out = tmp_path / "out"
    out.mkdir()
    r = run_bundle_cmd("build", path, "-o", out / "x")
    assert_one_line_error(r, needle)
    assert "unexpected" not in r.stderr and "report it" not in r.stderr
    assert listing(out) == []


def test_a_small_valid_model_passes_the_checks(tmp_path):
    from bundler.gguf import read_gguf

    info = read_gguf(str(write_gguf(tmp_path / "ok.gguf", llama_kv())))
    assert info.architecture == "llama" and info.layout()["n_layer"] == 1


ESCAPES = "\x1b]2;pwned\x07\x1b[2J\u202eevil"


def test_escape_codes_in_metadata_are_shown_escaped(tmp_path, model, built_bundle):
    path = write_gguf(tmp_path / "esc.gguf", llama_kv(general__name=(STRING, ESCAPES)))
    r = run_bundle_cmd("inspect", path)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\u202e" not in r.stdout and "\\x1b]2;pwned" in r.stdout
    r = run_bundle_cmd("inspect", path, "--json")
    assert "\x1b" not in r.stdout and json.loads(r.stdout)["model"]["name"] == ESCAPES
    # a bundle whose manifest carries them: --info and the banner escape them too
    out = tmp_path / "b"
    assert run_bundle_cmd("build", model, "-o", out, "--name", ESCAPES).returncode == 0
    r = run_exe(out, "--info")
    assert r.returncode == 0 and "\x1b" not in r.stdout + r.stderr and "\\x1b]2;pwned" in r.stdout
    r = run_bundle_cmd("inspect", out)
    assert "\x1b" not in r.stdout + r.stderr
