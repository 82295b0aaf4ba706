"""Computed prompts kept for later (issue 27): the prompt cache in memory across slots (as
llama-server's --cache-ram), and the state after the system prompt on disk across launches.

In-process on the real model for the scheduler (its counters say what was decoded), and through
the real bundle for the disk: a second launch reads the system prompt's state instead of
decoding it again; another system prompt, another bundle and a damaged file do not reuse it."""

import json
import os
import subprocess
import time

import pytest
from conftest import load_engine, run_bundle_cmd

from runtime.inference.promptcache import MAGIC, PromptCache, common_prefix
from runtime.inference.sampling import Sampling
from runtime.inference.scheduler import Scheduler
from runtime.prompts.template import load_template


def test_common_prefix():
    a = list(range(1000))
    for k in (0, 1, 15, 16, 17, 500, 999):
        b = a[:k] + [-1] + a[k + 1:]
        assert common_prefix(a, b) == k
    assert common_prefix(a, a) == 1000 and common_prefix(a, a, 10) == 10 and common_prefix(a, a[:3]) == 3
    assert common_prefix([], a) == 0 and common_prefix(tuple(a), a[:500] + [-1]) == 500


def test_least_recently_used_goes_first_and_an_extended_entry_is_replaced():
    cache = PromptCache(limit=300)
    cache.add([1, 2, 3], (), b"a", 100)
    cache.add([4, 5, 6], (), b"b", 100)
    cache.add([7, 8, 9], (), b"c", 100)
    entry, k = cache.best([1, 2, 3, 10], ())
    assert k == 3
    cache.use(entry, k)  # [1, 2, 3] is now the most recently used
    cache.add([11, 12], (), b"d", 100)  # over the limit: [4, 5, 6] goes, the least recently used
    assert sorted(e.tokens for e in cache.entries.values()) == [(1, 2, 3), (7, 8, 9), (11, 12)]
    assert cache.stats.evicted == 1 and cache.size == 300
    cache.add([7, 8, 9, 10], (), b"e", 100)  # extends [7, 8, 9]: that one goes, nothing is evicted
    assert sorted(e.tokens for e in cache.entries.values()) == [(1, 2, 3), (7, 8, 9, 10), (11, 12)]
    assert cache.stats.evicted == 1
    assert cache.best([7, 8, 9, 10, 11], (0.5,)) == (None, 0)  # another LoRA scale: not the same keys
    assert not cache.add([1], (), b"f", 301)  # larger than the whole limit


@pytest.fixture(scope="module")
def engine(built_bundle, tmp_path_factory):
    e = load_engine(built_bundle, tmp_path_factory.mktemp("cache"), ctx=2048, threads=2, n_seq=2)
    yield e
    e.close()


@pytest.fixture(scope="module")
def render(engine):
    tmpl = load_template("auto", engine.chat_template(), engine.bos_text, engine.eos_text)
    return lambda messages: engine.tokenize_prompt(tmpl.render(messages))


GREEDY = dict(temp=0, repeat_penalty=1.0)
LONG_SYSTEM = " ".join(f"Rule {i}: answer briefly, politely and in English." for i in range(60))


def ask(system, question):
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def test_a_prefix_computed_in_one_slot_is_reused_in_another(engine, render):
    """A's long prompt is computed in a slot; B and D, two long answers, then take both slots (A's
    state goes to the cache first). C (A's system prompt, another question) waits for a slot,
    takes the one freed first, and decodes only what is new there; its greedy answer is the one a
    cold scheduler gives."""
    sched = Scheduler(engine, 2, cache=PromptCache(None))
    sched.forget_all()
    a, c = render(ask(LONG_SYSTEM, "What is the capital of France?")), render(ask(LONG_SYSTEM, "Name a red fruit."))
    b = render(ask("You are a poet. " * 30, "Write about the sea."))
    d = render(ask("You are a chef. " * 30, "Describe bread."))
    shared = common_prefix(a, c)
    assert shared > 600
    sched.generate(a, Sampling(max_tokens=4, **GREEDY)).result(300)
    before = sched.stats.prompt_tokens
    long_answer = Sampling(max_tokens=40, ignore_eog=True, **GREEDY)
    fb = sched.generate(b, long_answer)
    while sum(s.req is not None for s in sched.slots) < 1:
        time.sleep(0.01)
    fd = sched.generate(d, long_answer)
    while sum(s.req is not None for s in sched.slots) < 2:
        time.sleep(0.01)
    assert not any(s.cached[:len(a)] == a for s in sched.slots)  # A's computation is in no slot now
    fc = sched.generate(c, Sampling(max_tokens=12, **GREEDY))
    rb, rd, r = fb.result(300), fd.result(300), fc.result(300)
    assert sched.cache.stats.saved >= 1 and sched.cache.stats.hits == 1 and r.cached_tokens == shared
    assert any(s.cached[:len(c)] == c for s in sched.slots)
    # only what is new was decoded: B's and D's prompts (less what their slots held) and C's question
    assert sched.stats.prompt_tokens - before == (len(b) - rb.cached_tokens) + (len(d) - rd.cached_tokens) + (len(c) - shared)
    cold = Scheduler(engine, 1)
    cold.forget_all()
    assert cold.generate(c, Sampling(max_tokens=12, **GREEDY)).result(300).text == r.text
    cold.forget_all()


def test_a_short_conversation_comes_back_from_the_cache(engine, render):
    """A short question (no system prompt: a slot's cache shares the template's first tokens with
    any other) is answered, another takes its only slot, and it is asked again: its state comes
    back from the cache (a copy costs far less than decoding even a dozen tokens) and only its
    last token is decoded; the greedy answer is the same."""
    sched = Scheduler(engine, 1, cache=PromptCache(None))
    sched.forget_all()
    q, other = render([{"role": "user", "content": "Why is the sky blue?"}]), render([{"role": "user", "content": "Name a fish."}])
    template_part = common_prefix(q, other)
    assert 4 <= len(q) - 1 - template_part < 32  # fewer new tokens than the cache used to want
    first = sched.generate(q, Sampling(max_tokens=8, **GREEDY)).result(300)
    sched.generate(other, Sampling(max_tokens=8, **GREEDY)).result(300)
    assert sched.cache.stats.saved == 1
    before = sched.stats.prompt_tokens
    again = sched.generate(q, Sampling(max_tokens=8, **GREEDY)).result(300)
    assert sched.stats.prompt_tokens - before == 1 and again.cached_tokens == len(q) - 1
    assert sched.cache.stats.hits == 1 and again.text == first.text
    sched.forget_all()


def test_at_its_limit_the_least_recently_used_state_goes(engine, render):
    """A limit of about two states: three long prompts through one slot; the first one's state
    goes when the third one's comes, and the cache never holds more than its limit."""
    prompts = [render(ask(f"You are assistant number {i}. " * 40, "Hello.")) for i in range(4)]
    probe = Scheduler(engine, 1, cache=PromptCache(None))
    probe.forget_all()
    for p in prompts[:2]:
        probe.generate(p, Sampling(max_tokens=2, **GREEDY)).result(300)
    size = next(iter(probe.cache.entries.values())).size
    sched = Scheduler(engine, 1, cache=PromptCache(int(size * 2.5)))
    sched.forget_all()
    for p in prompts:
        sched.generate(p, Sampling(max_tokens=2, **GREEDY)).result(300)
    assert sched.cache.stats.saved == 3 and sched.cache.stats.evicted == 1
    starts = {tuple(e.tokens[:20]) for e in sched.cache.entries.values()}
    assert tuple(prompts[0][:20]) not in starts and tuple(prompts[1][:20]) in starts and tuple(prompts[2][:20]) in starts
    assert sched.cache.size <= sched.cache.limit


def test_the_server_reuses_a_prefix_from_the_cache_and_says_so(built_bundle, tmp_path_factory):
    """Through the real server with one slot: A, then B (A's state goes to the memory cache), then
    C sharing A's long system prompt: C's prompt tokens found computed are reported in its usage
    and in /metrics, and only the rest was decoded."""
    from test_server import served

    def metrics(server):
        status, body = server.request("GET", "/metrics")
        text = body.decode() if isinstance(body, bytes) else str(body)
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    with served(built_bundle, tmp_path_factory, "--parallel", "1", "-c", "2048") as server:
        client = server.client()

        def chat(system, question):
            return client.chat.completions.create(model="demo", messages=ask(system, question), temperature=0,
                                                  max_tokens=4)

        a = chat(LONG_SYSTEM, "What is the capital of France?")
        chat("You are a poet. " * 30, "Write about the sea.")
        before = metrics(server)
        c = chat(LONG_SYSTEM, "Name a red fruit.")
        after = metrics(server)
    cached = c.usage.prompt_tokens_details.cached_tokens
    assert cached > 600 and a.usage.prompt_tokens_details.cached_tokens < 50
    assert after["bundle_prompt_cache_hits_total"] - before["bundle_prompt_cache_hits_total"] == 1
    assert after["bundle_prompt_cache_reused_tokens_total"] - before["bundle_prompt_cache_reused_tokens_total"] == cached
    assert after["bundle_prompt_tokens_total"] - before["bundle_prompt_tokens_total"] == c.usage.prompt_tokens - cached
    assert after["bundle_prompt_cache_entries"] >= 1 and after["bundle_prompt_cache_bytes"] > 0


# -- on disk, through the real bundle ------------------------------------------------------------

SYSTEM_2000 = " ".join(f"Fact {i}: the archive room number {i} holds {i * 7} boxes of old letters." for i in range(110))


def launch(bundle, cache, *args, system=SYSTEM_2000):
    env = {**os.environ, "BUNDLE_CACHE_DIR": str(cache)}
    r = subprocess.run([str(bundle), "--system", system, "-p", "What is the capital of France?", "-n", "8",
                        "--temp", "0", "-v", *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next((x for x in r.stderr.splitlines() if x.startswith("system prompt:")), "")
    return r.stdout, line, r.stderr


def kv_files(cache):
    folder = cache / "prompts"
    return sorted(folder.glob("*.kv")) if folder.exists() else []


def test_the_second_launch_reads_the_system_prompt_instead_of_decoding_it(built_bundle, bundle_copy, model, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    first, how1, err1 = launch(built_bundle, cache)
    assert "decoded, saved" in how1, err1[-1500:]
    n = int(how1.split()[2])
    assert n >= 2000
    second, how2, err2 = launch(built_bundle, cache)
    assert "read from the per-user cache" in how2 and f" {n} tokens" in how2, err2[-1500:]
    assert second == first
    # the answer's own line: every system prompt token was found computed
    assert f"({n} found computed)" in err2
    (saved,) = kv_files(cache)
    assert saved.read_bytes().startswith(MAGIC) and saved.stat().st_mode & 0o077 == 0

    # another system prompt: decoded, and it replaces this bundle's file (one per bundle file)
    _, how3, _ = launch(built_bundle, cache, system=SYSTEM_2000.replace("Fact 5:", "Fact five:"))
    assert "decoded, saved" in how3
    assert len(kv_files(cache)) == 1 and kv_files(cache)[0] != saved

    # a damaged file is not believed: decoded again, replaced, same answer
    (saved,) = kv_files(cache)
    launch(built_bundle, cache)  # back to SYSTEM_2000
    (saved,) = kv_files(cache)
    data = bytearray(saved.read_bytes())
    data[-100] ^= 0xFF
    saved.write_bytes(bytes(data))
    again, how4, _ = launch(built_bundle, cache)
    assert "decoded, saved" in how4 and again == first
    _, how5, _ = launch(built_bundle, cache)
    assert "read from the per-user cache" in how5

    # another bundle (a copy at another path, then rebuilt there: another table of contents)
    _, how6, _ = launch(bundle_copy, cache)
    assert "decoded, saved" in how6
    r = run_bundle_cmd("build", model, "-o", bundle_copy, "--force", "--temp", "0.5")
    assert r.returncode == 0, r.stderr
    _, how7, _ = launch(bundle_copy, cache)
    assert "decoded, saved" in how7
    assert len(kv_files(cache)) == 2  # one per bundle file

    # --no-prompt-cache: nothing read or written
    _, how8, _ = launch(built_bundle, cache, "--no-prompt-cache")
    assert "decoded" in how8 and "saved" not in how8


def test_info_says_what_the_caches_keep_where(built_bundle, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    launch(built_bundle, cache)
    env = {**os.environ, "BUNDLE_CACHE_DIR": str(cache)}
    r = subprocess.run([str(built_bundle), "--info", "--json", "--cache-ram", "64"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)["prompt_cache"]
    assert info["ram_limit_bytes"] == 64 << 20
    assert info["disk"]["enabled"] and info["disk"]["files"] == 1 and info["disk"]["this_bundle"] == 1
    assert info["disk"]["folder"] == str(cache / "prompts") and info["disk"]["bytes"] > 1 << 20
    bad = subprocess.run([str(built_bundle), "--info", "--cache-ram", "-5"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2 and "cache_ram=-5" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
