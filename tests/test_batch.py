"""Several conversations at once (issue 11): the scheduler in-process on the real model, and the
real bundle's server with many clients."""

import http.client
import json
import os
import socket
import threading
import time

import pytest
from conftest import QUESTION, load_engine
from test_server import Server, serving

from runtime.inference.scheduler import Scheduler
from runtime.inference.sampling import Sampling, TextOut
from runtime.prompts.template import load_template
from runtime.inference.scheduler import CancelFlag

PROMPTS = ["What is the capital of France? Answer in one word.", "Write a poem about the sea.",
           "List three fruits.", "Explain gravity briefly.", "Count from one to ten.", "Tell me a joke.",
           "What is 2+2?", "Describe a cat."]


@pytest.fixture(scope="module")
def batched(built_bundle, tmp_path_factory):
    e = load_engine(built_bundle, tmp_path_factory.mktemp("cache"), ctx=1024, threads=2, n_seq=4)
    tmpl = load_template("auto", e.chat_template(), e.bos_text, e.eos_text)

    def prompt(text):
        return e.tokenize_prompt(tmpl.render([{"role": "user", "content": text}]))

    yield e, Scheduler(e, 4), prompt


def sampling(i, **kw):
    # even: greedy; odd: sampled with a fixed seed
    return Sampling(temp=0 if i % 2 == 0 else 0.8, top_k=40, top_p=0.95, repeat_penalty=1.0, seed=1234 + i,
                    max_tokens=kw.pop("max_tokens", 48), **kw)


def test_together_gives_the_same_text_as_alone(batched):
    engine, sched, prompt = batched
    alone = [sched.generate(prompt(p), sampling(i)).result(120).text for i, p in enumerate(PROMPTS)]
    futures = [sched.generate(prompt(p), sampling(i)) for i, p in enumerate(PROMPTS)]  # 8 requests, 4 slots
    together = [f.result(300).text for f in futures]
    assert together == alone
    assert "Paris" in together[0]


def test_stop_strings_and_limits_per_request(batched):
    engine, sched, prompt = batched
    full = sched.generate(prompt("Write a short story about a cat."), sampling(0, max_tokens=60)).result(120)
    words = full.text.split()
    stop = words[5]
    futures = [sched.generate(prompt("Write a short story about a cat."), sampling(0, max_tokens=60, stop=[stop])),
               sched.generate(prompt("Write a short story about a cat."), sampling(0, max_tokens=5))]
    cut, short = (f.result(120) for f in futures)
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    assert short.completion_tokens == 5 and short.finish_reason == "length"


def test_cancel_frees_the_slot_and_the_others_go_on(batched):
    engine, sched, prompt = batched
    flags = [CancelFlag() for _ in range(4)]
    seen = [[] for _ in range(4)]
    futures = [sched.generate(prompt("Write a very long story about dragons."), sampling(0, max_tokens=200),
                              on_text=seen[i].append, cancel=flags[i]) for i in range(4)]
    deadline = time.time() + 60
    while not seen[0] and time.time() < deadline:
        time.sleep(0.01)
    flags[0].set()
    r0 = futures[0].result(60)
    assert r0.finish_reason == "cancelled" and r0.completion_tokens < 200
    waiter = sched.generate(prompt(QUESTION), sampling(0))  # takes the freed slot at once
    assert "Paris" in waiter.result(120).text
    for f in futures[1:]:
        assert f.result(300).completion_tokens == 200 or f.result().finish_reason == "stop"


def test_a_long_prompt_joins_in_chunks(batched):
    engine, sched, prompt = batched
    long_text = "Summarise this: " + "The quick brown fox jumps over the lazy dog. " * 60
    short = sched.generate(prompt("Write a poem about the sea."), sampling(0, max_tokens=60))
    long = sched.generate(prompt(long_text), sampling(0, max_tokens=8))
    assert long.result(300).prompt_tokens > sched.prefill_chunk  # decoded over several steps
    assert short.result(300).text == sched.generate(prompt("Write a poem about the sea."),
                                                     sampling(0, max_tokens=60)).result(300).text


def test_text_out_holds_back_a_stop_string():
    got = []
    t = TextOut(["END"], got.append)
    assert not t.add(b"abc E")
    assert got == ["abc "]
    assert t.add(b"ND more")
    assert t.finish() == "abc "


# -- the real server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server8(built_bundle, tmp_path_factory):
    yield from serving(built_bundle, tmp_path_factory, "--parallel", "8")


def stream(server, i, out, max_tokens=40):
    c = server.client(timeout=300)
    kw = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "seed": 99 + i}
    pieces = []
    for chunk in c.chat.completions.create(model="any", messages=[{"role": "user", "content": PROMPTS[i]}],
                                           max_tokens=max_tokens, stream=True, **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    out[i] = "".join(pieces)


def test_eight_streamed_clients_get_what_they_get_alone(server8):
    alone = {}
    for i in range(8):
        stream(server8, i, alone)
    together = {}
    threads = [threading.Thread(target=stream, args=(server8, i, together)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == alone
    status, health = server8.request("GET", "/health")
    assert health["slots"] == {"total": 8, "busy": 0}


def test_metrics_in_prometheus_format(server8):
    conn = http.client.HTTPConnection("127.0.0.1", server8.port, timeout=30)
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    text = r.read().decode()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain")
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split()
            values[name] = float(value)
    assert values["bundle_slots_total"] == 8 and values["bundle_requests_total"] >= 1
    assert values["bundle_generated_tokens_total"] > 0 and values["bundle_generated_tokens_per_second"] > 0


def test_a_client_that_leaves_frees_its_slot(built_bundle):
    s = Server(built_bundle, "--parallel", "2")
    try:
        sock = socket.create_connection(("127.0.0.1", s.port))
        body = json.dumps({"messages": [{"role": "user", "content": "Write a very long story about dragons."}],
                           "stream": True, "max_tokens": 2000, "temperature": 0}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        other = {}
        t = threading.Thread(target=stream, args=(s, 0, other))
        t.start()
        sock.settimeout(60)
        got = b""
        while got.count(b"data: ") < 4:
            chunk = sock.recv(4096)
            assert chunk
            got += chunk
        sock.close()
        deadline = time.time() + 30
        while time.time() < deadline:
            _, h = s.request("GET", "/health")
            if h["stats"]["cancelled"] >= 1:
                break
        assert h["stats"]["cancelled"] == 1 and h["stats"]["max_tokens_after_cancel"] <= 1
        t.join(120)
        assert "Paris" in other[0]
    finally:
        s.stop()


def test_banner_and_info_show_the_slots(built_bundle):
    s = Server(built_bundle, "--parallel", "3")
    try:
        assert any("3 slots" in line for line in s.lines)
    finally:
        s.stop()
    from conftest import run_exe

    d = json.loads(run_exe(built_bundle, "--info", "--json", env=dict(os.environ, BUNDLE_PARALLEL="5")).stdout)
    assert d["parallel"] == 5


def test_slot_choice_keeps_busy_slots_in_one_run():
    """llama.cpp decodes per-sequence caches in micro-batches of consecutive sequence ids: busy
    slots 0, 2, 4, 6 cost four graph computations a step (measured: 32.7 ms against 21.7 ms for
    0-3, and 8.1 ms for one), so a newcomer fills the gap, unless a slot holds a long prefix of
    its prompt (the next turn of a conversation)."""
    from runtime.inference.scheduler import LONG_PREFIX, _Slot, choose_slot, runs

    assert runs([]) == 0 and runs([3]) == 1 and runs([0, 1, 2, 3]) == 1 and runs([0, 2, 4, 6]) == 4
    header = list(range(30))  # what every prompt of a chat template shares
    slots = [_Slot(i) for i in range(8)]
    for s in slots:
        s.cached = header + [1000 + s.seq] * 10
    free = [s for s in slots if s.seq not in (0, 1, 3)]
    prompt = header + [5000] * 20
    assert choose_slot(free, [0, 1, 3], prompt)[0].seq == 2  # fills the gap: one run
    slots[6].cached = header + [6000] * 20  # the start of this very prompt, but short of it by 20
    assert choose_slot(free, [0, 1, 3], header + [6000] * 20 + [7] * 20)[0].seq == 2
    # all of it but the last token (the same question again) is not worth a micro-batch more at
    # every step of every answer: the gap is filled (COVER_GAP)
    assert choose_slot(free, [0, 1, 3], header + [6000] * 20 + [7])[0].seq == 2
    # ... but where it adds no run, its first token after one step beats a prompt's computation
    # (llama-server's slot choice by similarity does the same)
    slot, keep = choose_slot(free, [0, 1, 2, 3, 4, 5], header + [6000] * 20 + [7])
    assert slot.seq == 6 and keep == 50
    slot, keep = choose_slot(free, [], header + [6000] * 20 + [7])  # the first of a burst
    assert slot.seq == 6 and keep == 50
    slots[7].cached = header + [6000] * 10  # covering less of it: the one holding most wins
    assert choose_slot([slots[6], slots[7]], [0, 1, 2, 3, 4, 5], header + [6000] * 20 + [7])[0].seq == 6
    # A burst of questions asked before, arriving in another order: the first took slot 4; the
    # one cached in slot 2 still goes there, because the one cached in slot 3 waits beside it
    from runtime.inference.scheduler import expected_slots

    burst = [_Slot(i) for i in range(8)]
    for s in burst:
        s.cached = header + [2000 + s.seq] * 20
    open_ = [s for s in burst if s.seq != 4]
    asked = {i: header + [2000 + i] * 20 + [9] for i in range(8)}
    assert choose_slot(open_, [4], asked[2])[0].seq != 2  # alone, it would rather not split the run
    waiting = [(asked[3], ())]
    slot, keep = choose_slot(open_, [4], asked[2], expected=expected_slots(open_, waiting))
    assert slot.seq == 2 and keep == 50
    # a newcomer that holds nothing leaves the slot another waiting request holds to it
    assert choose_slot(open_, [4], [1] * 40)[0].seq == 3
    assert choose_slot(open_, [4], [1] * 40, expected=expected_slots(open_, waiting))[0].seq == 2
    slots[6].cached = header + [6000] * LONG_PREFIX  # a conversation's earlier turns
    slot, keep = choose_slot(free, [0, 1, 3], header + [6000] * LONG_PREFIX + [7])
    assert slot.seq == 6 and keep == 30 + LONG_PREFIX
    assert choose_slot([slots[5], slots[4]], [], prompt)[0].seq == 4  # ties: the lowest id
    # every free slot will be taken by the requests waiting: the runs end the same whatever each
    # takes, so a short cached prefix wins (the same question asked again by 8 clients at once)
    slots[6].cached = header + [6000] * 20
    slot, keep = choose_slot(free, [0, 1, 3], header + [6000] * 20 + [7], fills=True)
    assert slot.seq == 6 and keep == 50


def test_a_cache_away_from_the_busy_slots_is_copied_beside_them(batched):
    """The same question again while slot 0 is busy: the slot holding it (2) would split the run,
    so it goes to slot 1 with slot 2's cache copied in, decoding one token of its prompt; its
    greedy answer is the one a cold scheduler gives, and the busy slot's answer is unchanged."""
    e, _, prompt = batched
    sched = Scheduler(e, 3)
    sched.forget_all()
    q, x, y, z = (prompt(p) for p in (PROMPTS[3], PROMPTS[1], PROMPTS[2], PROMPTS[4]))
    long_answer = Sampling(temp=0, repeat_penalty=1.0, max_tokens=60, ignore_eog=True)
    fx, fy = sched.generate(x, long_answer), sched.generate(y, long_answer)
    while sum(s.req is not None for s in sched.slots) < 2:
        time.sleep(0.01)
    first = sched.generate(q, Sampling(temp=0, repeat_penalty=1.0, max_tokens=16)).result(300)
    fx.result(300), fy.result(300)
    assert sched.slots[2].cached[:len(q)] == q  # q was computed in the last slot
    fz = sched.generate(z, long_answer)
    while sched.slots[0].req is None or len(sched.slots[0].cached) <= len(z):  # z's prompt decoded, in slot 0
        time.sleep(0.01)
    before = sched.stats.prompt_tokens
    again = sched.generate(q, Sampling(temp=0, repeat_penalty=1.0, max_tokens=16)).result(300)
    assert sched.stats.prompt_tokens - before == 1 and again.cached_tokens == len(q) - 1
    assert sched.slots[1].cached[:len(q)] == q and again.text == first.text
    rz = fz.result(300)
    cold = Scheduler(e, 1)
    cold.forget_all()
    assert cold.generate(z, long_answer).result(300).text == rz.text
    cold.forget_all()
    sched.forget_all()


def test_requests_arriving_one_after_another_share_the_first_step(batched, monkeypatch):
    """Clients started together reach the engine milliseconds apart (each request is parsed and
    its template rendered first): the engine, woken from idle, waits while they keep coming
    (BURST_SECONDS at a time, BURST_MOST_SECONDS in all), so all four prompts go into the first
    decode and every answer takes one token per step: as many steps as tokens, not one more.
    The times are scaled up tenfold here (gaps of 12 ms, waits of 20 ms): a busy test machine
    can delay a thread by a few milliseconds, never the rule."""
    import runtime.inference.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "BURST_SECONDS", 0.02)
    monkeypatch.setattr(scheduler_module, "BURST_MOST_SECONDS", 0.12)
    e, sched, prompt = batched
    tokens = [prompt(p) for p in PROMPTS[:4]]
    n = 8
    for _ in range(2):  # the second time, each prompt is found in a slot's cache
        while sched.busy_slots() or sched.pending():
            time.sleep(0.01)
        before = sched.stats.steps
        futures = []
        for t in tokens:
            futures.append(sched.generate(t, Sampling(temp=0, repeat_penalty=1.0, max_tokens=n, ignore_eog=True)))
            time.sleep(0.012)  # 36 ms from the first to the last: more than one wait
        assert all(f.result(300).completion_tokens == n for f in futures)
        assert sched.stats.steps - before == n
