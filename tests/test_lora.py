"""LoRA adapters packed into a bundle (`bundle build --lora`), applied at launch (`--lora
NAME=SCALE`, `--no-lora`), listed by `--info` and `bundle inspect`; hostile adapters refused at
build time with one line each.

The adapters are made here for the demo model with the `gguf` package (random A and B on every
attn_q and attn_v, as llama.cpp's convert_lora_to_gguf.py lays them out), and run by the real
bundle: llama.cpp reads each adapter through a FILE* straight out of the bundle file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_bundle_cmd, run_exe

POEM = ["-p", "Write a short poem about the sea.", "--temp", "0", "-n", "40"]


def make_lora(base: Path, out: Path, *, std: float = 0.06, rank: int = 8, alpha: float = 8.0, seed: int = 1,
              b_zero: bool = False, arch: str | None = None, transpose: bool = False, duplicate: bool = False,
              targets=("attn_q", "attn_v")) -> Path:
    """A LoRA GGUF for base: A ([n_in, r] as ggml counts) and B ([r, n_out]) for each targeted
    weight; b_zero makes it a no-op whatever its scale."""
    import gguf

    reader = gguf.GGUFReader(str(base))
    arch = arch or bytes(reader.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(str(out), arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    rng = np.random.default_rng(seed)
    for t in reader.tensors:
        if not t.name.endswith(".weight") or t.name.split(".")[-2] not in targets:
            continue
        n_in, n_out = int(t.shape[0]), int(t.shape[1])
        a = rng.normal(0, std, (rank, n_in)).astype(np.float32)  # numpy's order is ggml's reversed
        b = np.zeros((n_out, rank), np.float32) if b_zero else rng.normal(0, std, (n_out, rank)).astype(np.float32)
        stem = t.name[: -len(".weight")] + ".weight"
        w.add_tensor(stem + ".lora_a", a.T.copy() if transpose else a)
        w.add_tensor(stem + ".lora_b", b)
        if duplicate:  # named lora_c here (the writer refuses twins), renamed lora_b below
            w.add_tensor(stem + ".lora_c", b)
            duplicate = False
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if b".lora_c" in out.read_bytes():
        out.write_bytes(out.read_bytes().replace(b".lora_c", b".lora_b", 1))
    return out


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, model) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("lora")
    return {"poet": make_lora(model, where / "poet.gguf"),
            "zero": make_lora(model, where / "zero.gguf", b_zero=True)}


@pytest.fixture(scope="session")
def lora_bundle(tmp_path_factory, model, stub, adapters) -> Path:
    out = tmp_path_factory.mktemp("lorabundle") / "poet-bundle"
    r = run_bundle_cmd("build", model, "--lora", adapters["poet"], "--lora", f"nothing={adapters['zero']}:1",
                       "-o", out)
    assert r.returncode == 0, r.stderr
    assert "LoRA adapter poet: poet.gguf, rank 8, 60 tensors, scale 1" in r.stderr, r.stderr
    return out


def _answer(bundle: Path, *args) -> str:
    r = run_exe(bundle, *POEM, *args, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_the_adapter_changes_the_answer_and_scale_0_gives_the_base_exactly(built_bundle, lora_bundle):
    base = _answer(built_bundle)
    with_poet = _answer(lora_bundle)
    assert with_poet != base, "the adapter at scale 1 changed nothing"
    assert _answer(lora_bundle, "--no-lora") == base
    assert _answer(lora_bundle, "--lora", "poet=0") == base
    # an adapter whose B is zero changes nothing at any scale
    assert _answer(lora_bundle, "--lora", "poet=0", "--lora", "nothing=3") == base
    assert _answer(lora_bundle, "--no-lora", "--lora", "poet=1") == with_poet


def test_info_and_inspect_list_the_adapters(lora_bundle):
    r = run_exe(lora_bundle, "--info", "--json", "--lora", "poet=0.5")
    assert r.returncode == 0, r.stderr
    adapters = json.loads(r.stdout)["adapters"]
    assert [(a["name"], a["default_scale"], a["scale"], a["rank"]) for a in adapters] == [
        ("poet", 1.0, 0.5, 8), ("nothing", 1.0, 1.0, 8)]
    text = run_exe(lora_bundle, "--info", "--lora", "poet=0.5").stdout
    assert "adapters:    poet at 0.5 (packed at 1), nothing at 1" in text, text
    d = json.loads(run_bundle_cmd("inspect", "--json", lora_bundle).stdout)
    assert {"lora/poet.gguf", "lora/nothing.gguf"} <= {e["name"] for e in d["entries"]}
    assert [a["name"] for a in d["adapters"]] == ["poet", "nothing"]
    assert run_bundle_cmd("verify", lora_bundle).returncode == 0


@pytest.mark.parametrize("flag, says", [
    ("--lora=nope=1", "this bundle carries no adapter named 'nope' (it carries: poet, nothing)"),
    ("--lora=poet=loud", "--lora poet=loud: 'loud' is not a number"),
    ("--lora=poet=nan", "the scale must be a finite number"),
])
def test_a_wrong_lora_flag_is_one_line(lora_bundle, flag, says):
    r = run_exe(lora_bundle, "-p", "hi", flag)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], r.stderr


def _refused(model, tmp_path, adapter, says):
    r = run_bundle_cmd("build", model, "--lora", adapter, "-o", tmp_path / "out")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and says in lines[-1], r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_hostile_adapters_are_refused_at_build_time(model, tmp_path):
    _refused(model, tmp_path, make_lora(model, tmp_path / "arch.gguf", arch="qwen2"),
             "is an adapter for qwen2 models, and the base is llama")
    _refused(model, tmp_path, make_lora(model, tmp_path / "shape.gguf", transpose=True), "do not fit its base tensor")
    _refused(model, tmp_path, make_lora(model, tmp_path / "nan.gguf", alpha=float("nan")),
             "adapter.lora.alpha is nan, not a finite number")
    _refused(model, tmp_path, make_lora(model, tmp_path / "dup.gguf", duplicate=True), "appears twice")
    whole = make_lora(model, tmp_path / "whole.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    _refused(model, tmp_path, cut, "is truncated")
    _refused(model, tmp_path, model, "is not a LoRA adapter")
    r = run_bundle_cmd("build", whole, "-o", tmp_path / "out")
    assert r.returncode == 1 and "is a LoRA adapter, not a model" in r.stderr, r.stderr
    r = run_bundle_cmd("build", model, "--lora", f"{whole}:loud", "-o", tmp_path / "out")
    assert r.returncode != 0 and "does not exist" in r.stderr, r.stderr


# -- the server: llama-server's /lora-adapters and per-request "lora" --------------------------------


@pytest.fixture(scope="module")
def lora_server(lora_bundle):
    import socket
    import subprocess

    from wine import wait_for_http

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(lora_bundle), "--server", "--port", str(port), "--no-browser", "-np", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _post(url: str, body, expect: int = 200):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            assert r.status == expect
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        assert exc.code == expect, exc.read()
        return json.loads(exc.read())


def _get(url: str):
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def _chat(base: str, lora=None) -> str:
    body = {"messages": [{"role": "user", "content": POEM[1]}], "temperature": 0, "max_tokens": 40}
    if lora is not None:
        body["lora"] = lora
    return _post(f"{base}/v1/chat/completions", body)["choices"][0]["message"]["content"]


def test_per_request_scales_give_the_text_of_the_matching_launch(lora_server, lora_bundle):
    assert _get(f"{lora_server}/lora-adapters") == [
        {"id": 0, "name": "poet", "path": "lora/poet.gguf", "scale": 1.0},
        {"id": 1, "name": "nothing", "path": "lora/nothing.gguf", "scale": 1.0}]
    for scale in (1, 0.5, 0):
        launched = _answer(lora_bundle, "--lora", f"poet={scale}").strip()
        assert _chat(lora_server, [{"id": 0, "scale": scale}]).strip() == launched, scale
    assert _chat(lora_server, []).strip() == _answer(lora_bundle, "--no-lora").strip()  # unlisted: 0
    # completions and responses take the field too
    prompt = {"prompt": "The sea is", "temperature": 0, "max_tokens": 24}
    texts = {s: _post(f"{lora_server}/v1/completions", {**prompt, "lora": [{"id": 0, "scale": s}]})["choices"][0]["text"]
             for s in (0, 1)}
    assert texts[0] != texts[1]
    assert _post(f"{lora_server}/v1/completions", {**prompt, "lora": []})["choices"][0]["text"] == texts[0]
    ask = {"input": POEM[1], "temperature": 0, "max_output_tokens": 40}
    outs = {s: _post(f"{lora_server}/v1/responses", {**ask, "lora": [{"id": 0, "scale": s}]})["output"][0]["content"][0]["text"]
            for s in (0, 1)}
    assert outs[0].strip() == _answer(lora_bundle, "--no-lora").strip()
    assert outs[1].strip() == _answer(lora_bundle).strip()
    r = _post(f"{lora_server}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "lora": [{"id": 7, "scale": 1}]}, expect=400)
    assert "invalid adapter id 7" in r["error"]["message"]


def test_post_lora_adapters_changes_later_requests_only(lora_server, lora_bundle):
    poet = _chat(lora_server)
    try:
        assert _post(f"{lora_server}/lora-adapters", [{"id": 0, "scale": 0}]) == {"success": True}
        assert [a["scale"] for a in _get(f"{lora_server}/lora-adapters")] == [0.0, 0.0]
        assert _chat(lora_server).strip() == _answer(lora_bundle, "--no-lora").strip()
        assert _chat(lora_server, [{"id": 0, "scale": 1}]) == poet  # a request's own list still wins
    finally:
        _post(f"{lora_server}/lora-adapters", [{"id": 0, "scale": 1}, {"id": 1, "scale": 1}])
    assert _chat(lora_server) == poet


def test_two_clients_with_different_scales_at_once_each_get_their_solo_text(lora_server):
    from concurrent.futures import ThreadPoolExecutor

    solo = {s: _chat(lora_server, [{"id": 0, "scale": s}]) for s in (1, 0)}
    assert solo[1] != solo[0]
    # One client per scale: two clients with the same scale share a decode, whose two rows
    # meet the adapter's F32 matrices in llamafile's sgemm (ggml-cpu takes it from two rows on,
    # its vector products for one), so a long greedy answer can part from the solo one (seen 2
    # runs in 4; the README says so).
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda s: (s, _chat(lora_server, [{"id": 0, "scale": s}])), [1, 0]))
    assert all(text == solo[s] for s, text in got), got


# -- adapter-only bundles: the fine-tune travels without its base -----------------------------------


def test_an_adapter_only_bundle_runs_on_the_base_beside_it(built_bundle, lora_bundle, adapters, model, tmp_path):
    import shutil

    stick = tmp_path / "stick"
    stick.mkdir()
    shutil.copy2(built_bundle, stick / built_bundle.name)  # the base, as the user already has it
    r = run_bundle_cmd("build", "--lora", adapters["poet"], "--base", stick / built_bundle.name, "-o",
                       stick / "poet")
    assert r.returncode == 0, r.stderr
    assert f"an adapter for {built_bundle.name}" in r.stderr, r.stderr
    only = stick / "poet"
    assert only.stat().st_size < built_bundle.stat().st_size - model.stat().st_size + (8 << 20)  # no model inside
    poet = _answer(lora_bundle, "--lora", "nothing=0")
    assert _answer(only) == poet
    assert _answer(only, "--no-lora") == _answer(built_bundle)
    info = json.loads(run_exe(only, "--info", "--json").stdout)
    assert info["base"]["found"] == str(stick / built_bundle.name)

    # the base's .gguf under another name serves as well (found by its content)
    (stick / built_bundle.name).unlink()
    shutil.copy2(model, stick / "my-base.gguf")
    assert _answer(only) == poet

    # no base beside it: one line that names what it needs and where it looked
    (stick / "my-base.gguf").unlink()
    r = run_exe(only, "-p", "hi")
    assert r.returncode == 1
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: this bundle is an adapter: it needs the model {built_bundle.name} (93.8 MiB, blake3 "
                     f"{info['base']['blake3'][:12]}…), or a bundle of it, beside it (looked in {stick}); copy it "
                     "there, or pass --base PATH"], r.stderr

    # a wrong base, named with --base: refused with the same facts
    other = make_lora(model, tmp_path / "other.gguf")
    r = run_exe(only, "--base", other, "-p", "hi")
    assert r.returncode == 1 and f"--base {other} is not the model this adapter was built for" in r.stderr, r.stderr
    r = run_exe(only, "--base", model, *POEM)
    assert r.returncode == 0 and r.stdout == poet, r.stderr[-2000:]


# -- the web chat: a scale slider per adapter ------------------------------------------------------


def test_the_web_chat_shows_a_slider_per_adapter_and_sends_its_scale(lora_server, lora_bundle):
    from test_page import CHROMIUM, FLAGS

    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_context().new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(lora_server)
            page.wait_for_function("document.getElementById('model-name').textContent !== '…'")
            page.click("#toggle-settings")
            sliders = page.locator("#adapters input[type=range]")
            assert sliders.count() == 2
            assert page.inner_text("#adapters").split() == ["LoRA", "poet", "1.00", "LoRA", "nothing", "1.00"]
            sliders.nth(0).fill("0")
            sliders.nth(0).dispatch_event("change")
            assert page.inner_text("#adapters").split()[2] == "0.00"
            page.fill("#temperature", "0")
            page.dispatch_event("#temperature", "change")
            page.fill("#input", "Write a short poem about the sea.")
            with page.expect_request("**/v1/chat/completions") as sent:
                page.press("#input", "Enter")
            assert json.loads(sent.value.post_data)["lora"] == [{"id": 0, "scale": 0}, {"id": 1, "scale": 1}]
            page.wait_for_selector("#send:not([hidden])", timeout=120_000)
            page.reload()  # the conversation keeps its scales
            page.wait_for_function("document.getElementById('model-name').textContent !== '…'")
            page.click("#toggle-settings")
            assert page.locator("#adapters input[type=range]").nth(0).input_value() == "0"
            assert errors == []
        finally:
            browser.close()


def test_a_windows_bundle_applies_its_adapter_under_wine(model, adapters, tmp_path, wine):
    """The adapter is read through msvcrt's FILE* (opened by its wide name) out of the .exe."""
    exe = tmp_path / "Poet démo"
    r = run_bundle_cmd("build", model, "--target", "windows-x86_64", "--lora", adapters["poet"], "-o", exe)
    assert r.returncode == 0, r.stderr
    exe = exe.with_name(exe.name + ".exe")
    poet, base = wine.run(exe, *POEM), wine.run(exe, *POEM, "--no-lora")
    assert poet.returncode == 0 and base.returncode == 0, poet.stderr[-2000:] + base.stderr[-2000:]
    assert poet.stdout.strip() and poet.stdout != base.stdout
