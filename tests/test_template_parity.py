"""Prompts identical to llama.cpp's (issue 10.4): every reference chat template shipped in the
llama.cpp source the runtime is built from (models/templates/, read from the build cache: `make
reference`), rendered for the same conversations by llama-server's POST /apply-template (built
from that source, loading the demo model) and by the bundle's own /apply-template, compared byte
for byte: system prompt, several turns, tools, a tool result, thinking on and off, non-ASCII text.

The bundle's side is its real server app and template code in process, over a stand-in engine
(tests/fakes.py) given the demo model's BOS/EOS as llama-server reports them; the last test
compares the real bundle, end to end, with llama-server on the demo model's own template.

Where the two differ on purpose, KNOWN says why; the test checks that they still differ, so
the list cannot go stale."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from conftest import ROOT
from fakes import FakeEngine, FakeScheduler
from test_server import served

from runtime.serving.routes import create_app
from runtime.launch.settings import Settings
from runtime.prompts.template import load_template

sys.path.insert(0, str(ROOT))
from bench.native import templates_dir, tools_dir  # noqa: E402

LLAMA_SERVER = tools_dir() / "llama-server"
TEMPLATES = sorted(templates_dir().glob("*.jinja")) if templates_dir().is_dir() else []

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city, in °C.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SYSTEM = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]
CALL = {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATIONS = {
    "system": {"messages": SYSTEM},
    "turns": {"messages": SYSTEM + [{"role": "assistant", "content": "Hi."},
                                    {"role": "user", "content": "Capital of France?"}]},
    "unicode": {"messages": [{"role": "system", "content": "Réponds « brièvement » <b>&</b>."},
                             {"role": "user", "content": "Qu'est-ce que 東京 ?"}]},
    "tools": {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]},
    "tool_result": {"messages": [{"role": "user", "content": "Weather in Paris?"},
                                 {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                 {"role": "tool", "tool_call_id": "call00001", "content": "Sunny, 21 °C"}],
                    "tools": [WEATHER]},
    "thinking_off": {"messages": SYSTEM, "chat_template_kwargs": {"enable_thinking": False}},
    "thinking_on": {"messages": SYSTEM, "chat_template_kwargs": {"enable_thinking": True}},
}

# Templates that take no `tools`: the bundle describes the tools in a system message and its
# grammar makes the reply a JSON call (tests/test_tools.py: even the 135M demo model calls
# correctly that way); llama-server renders the conversation without the tools, or (DeepSeek V3.1)
# with its own handler's call tokens.
_NO_TOOLS = "the template takes no tools: the bundle describes them in the system message, llama-server leaves them out"
_UNTOOLED = ["HuggingFaceTB-SmolLM3-3B", "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
             "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "deepseek-ai-DeepSeek-V3.1", "google-gemma-2-2b-it",
             "llama-cpp-deepseek-r1", "llama-cpp-rwkv-world", "microsoft-Phi-3.5-mini-instruct"]
KNOWN = {
    **{(name, conv): _NO_TOOLS for name in _UNTOOLED for conv in ("tools", "tool_result")},
    ("deepseek-ai-DeepSeek-V4", "turns"): "llama.cpp's DeepSeek V4 handler keeps an empty <think></think> in "
                                          "earlier turns; the template alone drops it",
    ("deepseek-ai-DeepSeek-V4-Flash-0731", "turns"): "as DeepSeek V4",
    ("google-gemma-4-31B-it-interleaved", "tool_result"): "llama.cpp rewrites tool messages into the older "
                                                          "Gemma 4 template's tool_responses; the bundle does not",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, model: Path, template: Path | None = None, builtin: str | None = None):
        self.port = _free_port()
        args = [str(LLAMA_SERVER), "-m", str(model), "--jinja", "--port", str(self.port), "--host", "127.0.0.1",
                "-c", "512", "-t", "1", "--no-warmup"]
        if template is not None:
            args += ["--chat-template-file", str(template)]
        if builtin is not None:  # one of llama.cpp's formats written in C++, not Jinja
            args += ["--no-jinja", "--chat-template", builtin]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "LLAMA_ARG_HOST": "127.0.0.1"})
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                self.props = self.get("/props")
                return
            except (OSError, ValueError):
                assert self.proc.poll() is None, self.proc.stderr.read()[-2000:]
                time.sleep(0.1)
        raise AssertionError("llama-server did not start")

    def get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def apply(self, body) -> str | None:
        """The prompt, or None when llama-server refuses the conversation."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/apply-template", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())["prompt"]
        except urllib.error.HTTPError as e:
            assert e.code in (400, 500), e
            return None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_the_reference_is_built():
    """Not a skip: without llama-server and the templates, parity is unchecked, and that fails."""
    assert LLAMA_SERVER.exists() and len(TEMPLATES) >= 60, "run `make reference` (bench/native.py) first"


def _bundle_prompt(template_path: Path, props: dict, body: dict) -> str | None:
    engine = FakeEngine()
    engine.bos_text, engine.add_bos = props.get("bos_token", ""), False
    template = load_template("file:" + template_path.name, template_path.read_text(), props.get("bos_token", ""),
                             props.get("eos_token", ""))
    client = TestClient(create_app(Settings(), FakeScheduler(engine=engine), template=template, info={"name": "m"}))
    r = client.post("/apply-template", json=body)
    return r.json()["prompt"] if r.status_code == 200 else None


def _first_difference(a: str, b: str) -> str:
    i = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    return f"at {i}:\n llama-server: {a[max(0, i - 80):i + 120]!r}\n bundle:       {b[max(0, i - 80):i + 120]!r}"


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_prompt_is_llama_servers(model, template):
    server = LlamaServer(model, template)
    compared = 0
    try:
        for conv, body in CONVERSATIONS.items():
            ref, ours = server.apply(body), _bundle_prompt(template, server.props, body)
            known = KNOWN.get((template.stem, conv))
            if ref is None:  # llama-server cannot render it (Gemma 2's tool result: the template
                continue     # refuses the tool role): nothing to compare with
            compared += 1
            if known:
                assert ours != ref, f"{conv}: now identical; remove it from KNOWN ({known})"
                continue
            assert ours is not None, f"{conv}: the bundle refuses what llama-server renders"
            assert ours == ref, f"{conv}: {_first_difference(ref, ours)}"
        assert compared >= len(CONVERSATIONS) - 1, f"llama-server rendered only {compared} conversations"
    finally:
        server.stop()


# The bundle's presets (for a GGUF without a template, or --template NAME) and the llama.cpp
# built-in format each one is.
PRESETS = {"chatml": "chatml", "llama2": "llama2-sys-bos", "llama3": "llama3", "mistral": "mistral-v3",
           "gemma": "gemma", "phi3": "phi3"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_is_llama_cpps_built_in_format(model, preset):
    server = LlamaServer(model, builtin=PRESETS[preset])
    try:
        template = load_template(preset, None, server.props.get("bos_token", ""), server.props.get("eos_token", ""))
        client = TestClient(create_app(Settings(), FakeScheduler(), template=template, info={"name": "m"}))
        for conv in ("system", "turns", "unicode"):
            ours = client.post("/apply-template", json=CONVERSATIONS[conv]).json()["prompt"]
            ref = server.apply(CONVERSATIONS[conv])
            assert ours == ref, f"{conv}: {_first_difference(ref, ours)}"
    finally:
        server.stop()


def test_real_bundle_matches_llama_server_on_the_models_own_template(model, built_bundle, tmp_path_factory):
    """End to end: the built demo bundle's /apply-template against llama-server's, same GGUF."""
    ref = LlamaServer(model)
    try:
        with served(built_bundle, tmp_path_factory) as s:
            for conv in ("system", "turns", "unicode"):
                status, body = s.request("POST", "/apply-template", CONVERSATIONS[conv])
                assert status == 200 and body["prompt"] == ref.apply(CONVERSATIONS[conv]), conv
    finally:
        ref.stop()
