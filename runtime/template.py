"""Chat templates: the GGUF's own Jinja template (rendered in a sandbox) or a named preset.

Templates are rendered the way Hugging Face renders them (trim_blocks, lstrip_blocks, loop
controls), so a GGUF's embedded template gives the prompt its authors meant.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

# name -> (jinja source, stop strings). Written for trim_blocks=True: no newline right after a tag.
PRESETS: dict[str, tuple[str, list[str]]] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ["<|im_end|>", "<|im_start|>"],
    ),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
        "{% else %}### Response:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}",
        ["### Instruction:", "### Response:"],
    ),
    "llama2": (
        "{% set ns = namespace(sys='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% set ns.sys = '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' %}"
        "{% elif m['role'] == 'user' %}{{ bos_token }}[INST] {{ ns.sys }}{{ m['content'] }} [/INST]"
        "{% set ns.sys = '' %}{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}",
        ["[INST]"],
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        ["<|eot_id|>", "<|start_header_id|>"],
    ),
    "mistral": (
        "{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\n\n' %}"
        "{% elif m['role'] == 'user' %}[INST] {{ ns.sys }}{{ m['content'] }}[/INST]{% set ns.sys = '' %}"
        "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
        ["[INST]"],
    ),
    "gemma": (
        "{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\n\n' %}"
        "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{% if m['role'] == 'user' %}{{ ns.sys }}{% set ns.sys = '' %}{% endif %}"
        "{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        ["<end_of_turn>", "<start_of_turn>"],
    ),
    "phi3": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        ["<|end|>", "<|user|>", "<|endoftext|>"],
    ),
}

# Stop strings worth adding for the GGUF's own template, by the markers it uses.
_MARKER_STOPS = {
    "<|im_start|>": ["<|im_end|>", "<|im_start|>"],
    "<|start_header_id|>": ["<|eot_id|>"],
    "<start_of_turn>": ["<end_of_turn>"],
    "<|end|>": ["<|end|>"],
}


class TemplateError(Exception):
    pass


def _raise_exception(message):
    raise TemplateError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@dataclass
class ChatTemplate:
    source: str
    name: str = "auto"
    stop: tuple = ()
    bos_token: str = ""
    eos_token: str = ""

    def __post_init__(self):
        # Imported here: jinja2 is only needed once a chat starts.
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"the chat template ({self.name}) is not valid Jinja: {exc}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError as JinjaError

        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError:
            raise
        except JinjaError as exc:
            raise TemplateError(f"the chat template ({self.name}) failed: {exc}") from None


def stops_for(name: str, source: str) -> list[str]:
    if name in PRESETS:
        return list(PRESETS[name][1])
    stops: list[str] = []
    for marker, extra in _MARKER_STOPS.items():
        if marker in source:
            stops += [s for s in extra if s not in stops]
    return stops


def load_template(name: str, source: str | None, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    """name is 'auto' (use source, the GGUF's template), a preset name, or 'file:...' (source given)."""
    if name in PRESETS:
        source = PRESETS[name][0]
    if not source:
        # A GGUF without a template: ChatML is what most small instruct models expect.
        name, source = "chatml", PRESETS["chatml"][0]
    return ChatTemplate(source, name, tuple(stops_for(name, source)), bos_token, eos_token)
