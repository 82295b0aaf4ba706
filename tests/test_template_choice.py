"""Which chat format a bundle uses (issue 10.4): a GGUF without a template gets its family's
preset, said at build time and in the banner; `--template none` sends prompts as they are (base
models); presets write BOS only where the vocabulary wants one. Real builds, real executables."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import QUESTION, run_bundle_cmd, run_exe
from test_server import Server

from runtime.prompts.template import PRESETS, fallback_preset, load_template


def _without_template(model: Path, dest: Path) -> Path:
    """The demo model with its chat template's key renamed (same length: nothing else moves)."""
    data = model.read_bytes()
    key = b"tokenizer.chat_template"
    assert data.count(key) == 1
    dest.write_bytes(data.replace(key, b"tokenizer.chat_templatx", 1))
    return dest


def test_no_template_gets_the_family_preset_and_says_so(model, stub, tmp_path):
    bare = _without_template(model, tmp_path / "bare.gguf")
    out = tmp_path / "bare"
    r = run_bundle_cmd("build", bare, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "carries no chat template: using the chatml preset" in r.stderr  # SmolLM2: a GPT-2 style vocabulary
    r = run_exe(out, "-p", QUESTION, "--temp", "0", "-n", "16")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "template chatml" in r.stderr  # the banner names the format


def test_banner_names_the_ggufs_own_template(built_bundle):
    r = run_exe(built_bundle, "-p", "Hi", "-n", "2")
    assert "template from the GGUF" in r.stderr, r.stderr


def test_template_none_is_plain_completion(model, stub, tmp_path, built_bundle):
    """A bundle built with --template none answers -p exactly as the completions API continues
    the same text (greedy): no chat markup around the prompt."""
    raw = tmp_path / "raw"
    r = run_bundle_cmd("build", model, "--template", "none", "-o", raw)
    assert r.returncode == 0, r.stderr
    prompt = "The capital of France is"
    r = run_exe(raw, "-p", prompt, "--temp", "0", "-n", "8")
    assert r.returncode == 0, r.stderr
    server = Server(built_bundle)
    try:
        ref = server.client().completions.create(model="m", prompt=prompt, temperature=0, max_tokens=8)
    finally:
        server.stop()
    assert r.stdout.strip() == ref.choices[0].text.strip()
    assert "<|im_start|>" not in r.stdout


def test_presets_leave_bos_to_the_vocabulary(model, stub, tmp_path):
    """The demo vocabulary has add_bos_token = false: through the llama3 preset the prompt has
    exactly the tokens of its text, no BOS token."""
    out = tmp_path / "l3"
    r = run_bundle_cmd("build", model, "--template", "llama3", "-o", out)
    assert r.returncode == 0, r.stderr
    server = Server(out)
    try:
        chat = server.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
        text = load_template("llama3", None).render(
            [{"role": "user", "content": "Hi"}])
        assert not text.startswith("<|im_start|>")
        ref = server.client().completions.create(model="m", prompt=text, max_tokens=1)
    finally:
        server.stop()
    assert chat.usage.prompt_tokens == ref.usage.prompt_tokens


@pytest.mark.parametrize("arch, pre, tok, name, preset", [
    ("gemma3", None, "llama", "gemma-3-4b", "gemma"),
    ("phi3", "default", "llama", "Phi 3", "phi3"),
    ("llama", "llama-bpe", "gpt2", "Llama 3.1 8B", "llama3"),
    ("llama", "default", "llama", "Mistral 7B v0.1", "mistral"),
    ("llama", "default", "llama", "Llama 2 7B", "llama2"),
    ("qwen2", "qwen2", "gpt2", "Qwen2.5", "chatml"),
])
def test_fallback_by_family(arch, pre, tok, name, preset):
    assert fallback_preset(arch, pre, tok, name) == preset


def test_none_preset_renders_the_text_alone():
    t = load_template("none", None)
    assert t.render([{"role": "user", "content": "2+2="}]) == "2+2="
    assert t.render([{"role": "system", "content": "A"}, {"role": "user", "content": "B"}]) == "A\n\nB"
    assert "none" in PRESETS
