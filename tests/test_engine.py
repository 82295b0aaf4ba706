"""Generation on the real model, in-process: sampling settings and stop conditions, through the
one decode loop every mode uses (runtime.inference.scheduler.Scheduler).

The native libraries come out of a real bundle (extracted like the runtime does); the model is
loaded from inside the bundle at its payload offset.
"""

import pytest
from conftest import load_engine

from runtime.errors import ContextOverflowError
from runtime.inference.sampling import Sampling
from runtime.inference.scheduler import CancelFlag, Scheduler
from runtime.prompts.template import load_template


@pytest.fixture(scope="session")
def engine(built_bundle, tmp_path_factory):
    e = load_engine(built_bundle, tmp_path_factory.mktemp("cache"), ctx=512, threads=2)
    yield e
    e.close()


class Generate:
    """One answer at a time from the scheduler, waited for."""

    def __init__(self, engine):
        self.engine = engine
        self.scheduler = Scheduler(engine, 1)

    def __call__(self, tokens, sampling, on_text=None, cancel=None):
        return self.scheduler.generate(tokens, sampling, on_text=on_text, cancel=cancel).result(300)

    def reset(self):
        self.scheduler.forget_all()


@pytest.fixture(scope="session")
def gen(engine):
    return Generate(engine)


@pytest.fixture(scope="session")
def prompt_for(engine):
    tmpl = load_template("auto", engine.chat_template(), engine.bos_text, engine.eos_text)

    def make(text):
        return engine.tokenize_prompt(tmpl.render([{"role": "user", "content": text}]))

    return make


QUESTION = "What is the capital of France? Answer in one word."
STORY = "Write a short story about a cat."


def greedy(**kw):
    return Sampling(temp=0, repeat_penalty=1.0, **kw)


def test_greedy_answer_and_determinism(gen, prompt_for):
    a = gen(prompt_for(QUESTION), greedy())
    b = gen(prompt_for(QUESTION), greedy())
    assert "Paris" in a.text and a.text == b.text
    assert a.finish_reason == "stop" and a.completion_tokens > 0


def test_max_tokens_ends_with_length(gen, prompt_for):
    r = gen(prompt_for(STORY), greedy(max_tokens=7))
    assert r.finish_reason == "length" and r.completion_tokens == 7


def test_stop_string_cuts_before_it(gen, prompt_for):
    full = gen(prompt_for(STORY), greedy(max_tokens=40)).text
    words = full.split()
    stop = " " + words[len(words) // 2]
    cut = gen(prompt_for(STORY), greedy(max_tokens=40, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_streamed_pieces_add_up_to_the_text(gen, prompt_for):
    pieces = []
    r = gen(prompt_for(STORY), greedy(max_tokens=30, stop=["\n\n\n"]), on_text=pieces.append)
    assert "".join(pieces) == r.text and len(pieces) > 5


def test_seed_makes_sampling_repeatable(gen, prompt_for):
    s = dict(temp=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, max_tokens=30)
    a = gen(prompt_for(STORY), Sampling(seed=42, **s)).text
    b = gen(prompt_for(STORY), Sampling(seed=42, **s)).text
    others = {gen(prompt_for(STORY), Sampling(seed=n, **s)).text for n in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1


def test_top_k_1_and_tiny_top_p_are_greedy(gen, prompt_for):
    g = gen(prompt_for(STORY), greedy(max_tokens=25)).text
    k1 = gen(prompt_for(STORY), Sampling(temp=1.5, top_k=1, top_p=1.0, repeat_penalty=1.0,
                                                    seed=7, max_tokens=25)).text
    p0 = gen(prompt_for(STORY), Sampling(temp=1.5, top_k=0, top_p=0.001, repeat_penalty=1.0,
                                                    seed=7, max_tokens=25)).text
    assert k1 == g and p0 == g


def test_temperature_and_repeat_penalty_change_the_output(gen, prompt_for):
    g = gen(prompt_for(STORY), greedy(max_tokens=60)).text
    hot = gen(prompt_for(STORY), Sampling(temp=1.5, top_k=0, top_p=1.0, repeat_penalty=1.0,
                                                     seed=3, max_tokens=60)).text
    pen = gen(prompt_for(STORY), Sampling(temp=0, repeat_penalty=1.8, max_tokens=60)).text
    assert hot != g and pen != g


def test_frequency_and_presence_penalties_change_the_output(gen, prompt_for):
    g = gen(prompt_for(STORY), greedy(max_tokens=60)).text
    freq = gen(prompt_for(STORY), greedy(max_tokens=60, frequency_penalty=1.5)).text
    pres = gen(prompt_for(STORY), greedy(max_tokens=60, presence_penalty=1.5)).text
    assert freq != g and pres != g


def _chain_names(engine, s: Sampling) -> list[str]:
    C = engine.C
    chain = engine.chain(s, [1, 2, 3], None)
    try:
        return [C.llama_sampler_name(C.llama_sampler_chain_get(chain, i)).decode()
                for i in range(C.llama_sampler_chain_n(chain))]
    finally:
        C.llama_sampler_free(chain)


def test_sampler_chain_as_llama_cpp_builds_it(engine):
    # llama-server's chain (common_sampler_init): every sampler of the order; llama.cpp puts a
    # placeholder ("?name") where the settings make one do nothing; logit bias first
    assert _chain_names(engine, Sampling(repeat_penalty=1.0)) == [
        "?top-n-sigma", "top-k", "?typical", "top-p", "min-p", "?xtc", "temp-ext", "dist"]
    every = Sampling(repeat_penalty=1.1, logit_bias={5: 1.0}, dry_multiplier=0.8, min_p=0.1, typical_p=0.9,
                     top_n_sigma=1.5, xtc_probability=0.5, dynatemp_range=0.5)
    assert _chain_names(engine, every) == ["logit-bias", "penalties", "dry", "top-n-sigma", "top-k", "typical",
                                           "top-p", "min-p", "xtc", "temp-ext", "dist"]
    order = Sampling(repeat_penalty=1.0, samplers=("temperature", "min_p", "top_k"))
    assert _chain_names(engine, order) == ["temp-ext", "min-p", "top-k", "dist"]
    assert _chain_names(engine, Sampling(repeat_penalty=1.0, mirostat=2)) == ["temp", "mirostat-v2"]
    assert _chain_names(engine, Sampling(repeat_penalty=1.0, mirostat=1)) == ["temp", "mirostat"]
    assert _chain_names(engine, Sampling(temp=0, repeat_penalty=1.0, dry_multiplier=0.5)) == ["dry", "greedy"]


def test_min_p_1_and_tiny_top_n_sigma_are_greedy(gen, prompt_for):
    g = gen(prompt_for(STORY), greedy(max_tokens=25)).text
    hot = dict(temp=1.5, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=7, max_tokens=25)
    assert gen(prompt_for(STORY), Sampling(min_p=1.0, **hot)).text == g
    assert gen(prompt_for(STORY), Sampling(min_p=0.0, top_n_sigma=1e-4, **hot)).text == g
    assert gen(prompt_for(STORY), Sampling(min_p=0.0, **hot)).text != g


def test_llama_cpp_samplers_change_the_output(gen, prompt_for):
    base = dict(temp=0.7, top_k=40, top_p=0.95, repeat_penalty=1.0, seed=11, max_tokens=60)
    plain = gen(prompt_for(STORY), Sampling(**base)).text
    for extra in (dict(mirostat=2, mirostat_tau=3.0), dict(xtc_probability=1.0, xtc_threshold=0.01),
                  dict(dynatemp_range=0.7, dynatemp_exponent=1.0), dict(dry_multiplier=5.0, dry_allowed_length=1)):
        r = gen(prompt_for(STORY), Sampling(**base, **extra))
        assert r.completion_tokens > 0 and r.text != plain, extra


def test_ignore_eos_never_samples_an_end_token(gen, engine, prompt_for):
    assert engine.eog_tokens() and all(engine.C.llama_vocab_is_eog(engine.vocab, t) for t in engine.eog_tokens())
    eog = set(engine.eog_tokens())
    passed = gen(prompt_for(QUESTION), greedy(max_tokens=40, ignore_eog=True, logprobs=0))  # sampled, passed over
    assert eog & {e.token for e in passed.logprobs}
    r = gen(prompt_for(QUESTION), greedy(max_tokens=40, ignore_eos=True, logprobs=0))
    assert r.completion_tokens == 40 and r.finish_reason == "length"
    assert not eog & {e.token for e in r.logprobs}


def test_end_of_generation_token_stops(gen, prompt_for):
    r = gen(prompt_for(QUESTION), greedy(max_tokens=200))
    assert r.finish_reason == "stop" and r.completion_tokens < 200
    forced = gen(prompt_for(QUESTION), greedy(max_tokens=40, ignore_eog=True))
    assert forced.completion_tokens == 40


def test_prefix_reuse_gives_the_same_answer(gen, engine, prompt_for):
    first = prompt_for(QUESTION)
    gen(first, greedy(max_tokens=10))
    longer = prompt_for(QUESTION + " Then name its river.")
    warm = gen(longer, greedy(max_tokens=20)).text
    gen.reset()
    cold = gen(longer, greedy(max_tokens=20)).text
    assert warm == cold


def test_cancel_stops_between_tokens(gen, prompt_for):
    seen, cancel = [], CancelFlag()

    def on_text(text):
        seen.append(text)
        if len(seen) >= 3:
            cancel.set()

    r = gen(prompt_for(STORY), greedy(max_tokens=100), on_text=on_text, cancel=cancel)
    assert r.finish_reason == "cancelled" and r.completion_tokens <= 5


def test_prompt_longer_than_context(gen):
    with pytest.raises(ContextOverflowError, match="longer than the context"):
        gen(list(range(100, 700)), greedy())


def test_generation_stops_when_context_is_full(gen, engine, prompt_for):
    p = prompt_for("Count from one to one thousand, in words.")
    s = greedy(max_tokens=-1, stop=[])
    s.ignore_eog = True  # the model may not stop early: only the full context ends this
    r = gen(p, s)
    assert r.finish_reason == "length"
    # every position of the context holds a token; the last one sampled is shown, never decoded
    assert len(p) + r.completion_tokens == engine.n_ctx + 1


def _greedy_text(gen, tokens, sample, n):
    """A greedy answer decoded token by token straight on the engine (a job on the scheduler's
    thread, its slots' caches forgotten first): the reference the decode loop is checked against."""

    def run(engine, cancelled):
        engine.clear()
        engine.decode_prompt(tokens)
        out = []
        for _ in range(n):
            tok = sample()
            if engine.C.llama_vocab_is_eog(engine.vocab, tok):
                break
            out.append(engine.piece(tok))
            engine.decode_prompt([tok])
        return b"".join(out).decode("utf-8", "replace")

    gen.reset()
    try:
        return gen.scheduler.submit(run).future.result(300)
    finally:
        gen.reset()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_grammar_rejection_sampling_gives_what_the_whole_vocabulary_pass_gives(gen, engine, prompt_for, penalty):
    """Grammar-checked rejection sampling (the token drawn first, checked alone, drawn again with
    the grammar only when refused) picks the same greedy tokens as the grammar applied over every
    token of the vocabulary in one chain; the refusals happen (the grammar wants what the model
    would not write) and the penalty window is kept right through them."""
    grammar = 'root ::= "{\\"city\\": \\"" [A-Za-z ]{2,20} "\\", \\"zebra\\": " [0-9]{1,3} "}"'
    s = Sampling(temp=0, repeat_penalty=penalty, max_tokens=40, grammar=grammar)
    tokens = prompt_for(QUESTION)
    sampler = engine.sampler_for(s, tokens)
    try:
        got = _greedy_text(gen, tokens, lambda: sampler.sample(engine.ctx, -1), s.max_tokens)
        assert sampler.rejected > 0
    finally:
        sampler.free()
    chain = engine.chain(s, tokens, s.grammar)
    try:
        ref = _greedy_text(gen, tokens, lambda: engine.C.llama_sampler_sample(chain, engine.ctx, -1), s.max_tokens)
    finally:
        engine.C.llama_sampler_free(chain)
    assert got.startswith('{"city": "') and '"zebra": ' in got and got.endswith("}"), got
    assert got == ref
    assert gen(tokens, s).text == got  # and the decode loop uses it


def test_context_shift_reuses_the_turns_a_truncated_chat_keeps(engine):
    """A conversation whose oldest turns were left out (--context-overflow truncate): its system
    prompt is the cache's prefix, and the turns it keeps are further on in the cache; they are
    moved down (llama.cpp's shift of rotary positions), not decoded again, and the answer is the
    one a fresh decode gives."""
    tmpl = load_template("auto", engine.chat_template(), engine.bos_text, engine.eos_text)
    head = [{"role": "system", "content": "You are brief."}]
    turns = []
    for i in range(4):
        turns += [{"role": "user", "content": f"Tell me about the town of Town{i}, its rivers and bridges."},
                  {"role": "assistant", "content": f"Town{i} is old. " * 6}]
    g = greedy(max_tokens=24)
    sch = Scheduler(engine, 1)
    first = engine.tokenize_prompt(tmpl.render(head + turns + [{"role": "user", "content": "And Paris?"}]))
    answer = sch.generate(first, g).result(120)
    later = head + turns[4:] + [{"role": "user", "content": "And Paris?"}, {"role": "assistant", "content": answer.text},
                                {"role": "user", "content": "And Rome?"}]
    second = engine.tokenize_prompt(tmpl.render(later))
    before = sch.stats.prompt_tokens
    shifted = sch.generate(second, g).result(120)
    decoded = sch.stats.prompt_tokens - before
    assert sch.stats.shifted_tokens > 0.6 * len(second) and decoded < 0.2 * len(second)
    sch.forget_all()
    assert sch.generate(second, g).result(120).text == shifted.text


def test_kept_after_gap():
    from runtime.inference.scheduler import SHIFT_MIN, kept_after_gap

    sys_, old, kept, new = [1] * 5, list(range(100, 140)), list(range(200, 250)), [7, 8, 9]
    cached = sys_ + old + kept + [99, 98]  # the last answer's tail, which the new prompt spells otherwise
    assert kept_after_gap(cached, sys_ + kept + new, 5) == (45, 50)
    assert kept_after_gap(cached, sys_ + kept[:SHIFT_MIN - 1] + new, 5) == (0, 0)  # too short to be worth it
    assert kept_after_gap(cached, sys_ + new * 20, 5) == (0, 0)
