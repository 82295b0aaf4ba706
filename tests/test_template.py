import pytest

from bundler.gguf import read_gguf
from runtime.prompts.template import PRESETS, ChatTemplate, load_template
from runtime.errors import TemplateError

CONVO = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]


def test_chatml_preset_exact():
    t = load_template("chatml", None)
    assert t.render(CONVO) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "<|im_end|>" in t.stop


def test_llama3_preset_exact():
    t = load_template("llama3", None, bos_token="<|begin_of_text|>")  # BOS: the tokenizer's
    assert t.render(CONVO[1:2]) == (
        "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_renders_every_turn(name):
    text = load_template(name, None, bos_token="<s>", eos_token="</s>").render(CONVO)
    for part in ("U1", "A1", "U2", "S"):
        assert part in text, (name, text)
    assert text.index("U1") < text.index("A1") < text.index("U2")


def test_gguf_template_with_its_default_system_prompt(model):
    t = load_template("auto", read_gguf(str(model)).chat_template)
    text = t.render([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_end|>" in t.stop


def test_sandbox_blocks_python_internals():
    t = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError):
        t.render(CONVO)


def test_raise_exception_and_syntax_errors():
    with pytest.raises(TemplateError, match="refused the conversation: no system"):
        ChatTemplate("{{ raise_exception('no system') }}").render(CONVO)
    with pytest.raises(TemplateError, match="not valid Jinja"):
        ChatTemplate("{% for %}")


GEMMA_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_system_folded_into_first_user_turn_when_the_template_refuses_it():
    from runtime.prompts.template import ChatTemplate

    t = ChatTemplate(GEMMA_LIKE, "gemma-like", bos_token="<bos>")
    out = t.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert out == "<bos><start_of_turn>user\nBe brief.\nHi<end_of_turn>\n<start_of_turn>model\n"  # llama.cpp joins with \\n
    # without a system message nothing changes; a refusal for another reason still fails
    assert t.render([{"role": "user", "content": "Hi"}]) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_date_string_is_today():
    import datetime

    from runtime.prompts.template import ChatTemplate

    t = ChatTemplate("Today Date: {{ date_string }}", "t")
    assert t.render([{"role": "user", "content": "x"}]) == "Today Date: " + datetime.date.today().strftime("%d %b %Y")
