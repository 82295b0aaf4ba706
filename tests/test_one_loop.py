"""One decode loop for every mode: the same greedy answer to the same prompt from -p, the terminal
chat and the API, with and without a JSON schema (runtime.inference.scheduler is the only place
answers are generated). The real bundle, run as a user runs it."""

import json
import subprocess

import pytest
from conftest import QUESTION, run_exe
from test_server import served

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
          "required": ["city", "country"]}


@pytest.mark.parametrize("schema", [None, SCHEMA], ids=["plain", "json-schema"])
def test_the_same_greedy_answer_from_every_mode(built_bundle, tmp_path_factory, schema):
    flags = ["--temp", "0", "-n", "40"] + (["-j", json.dumps(schema)] if schema else [])

    one_shot = run_exe(built_bundle, "-p", QUESTION, *flags)
    assert one_shot.returncode == 0, one_shot.stderr
    answer = one_shot.stdout.strip()
    assert "Paris" in answer
    if schema:
        assert set(json.loads(answer)) == {"city", "country"}

    chat = subprocess.run([str(built_bundle), "--cli", *flags], input=QUESTION + "\n/exit\n", capture_output=True,
                          text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert answer in chat.stdout, chat.stdout

    with served(built_bundle, tmp_path_factory) as server:
        body = {"model": "any", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
                "max_tokens": 40}
        if schema:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
        status, r = server.request("POST", "/v1/chat/completions", body)
        assert status == 200, r
        assert r["choices"][0]["message"]["content"].strip() == answer
        body["stream"] = True
        status, raw = server.request("POST", "/v1/chat/completions", body)
        streamed = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                           for line in raw.decode().splitlines()
                           if line.startswith("data: {") and json.loads(line[6:])["choices"])
        assert streamed.strip() == answer


def test_a_schema_that_is_not_json_is_one_line_before_the_model_loads(built_bundle):
    r = run_exe(built_bundle, "-p", QUESTION, "-j", "{not json")
    assert r.returncode == 2 and r.stdout == ""  # a usage error, as every wrong flag
    assert "loaded" not in r.stderr and "CPU (" not in r.stderr  # no banner: refused before the model
    assert r.stderr.strip().splitlines()[-1].startswith("error: -j is not JSON"), r.stderr
    r = run_exe(built_bundle, "--server", "-j", "{}")
    assert r.returncode == 2 and "-j/-jf shapes the answers of -p, -f and --cli" in r.stderr
