"""The llama_cpp package (llama-cpp-python) without its __init__.py, which imports the high-level
Llama class and with it numpy (40 MB kept out of the stub, docs/facts.md #8) and loads the C library
from its default place. Registering the package module unexecuted lets Python find its submodules:
the ctypes bindings (engine.import_bindings, after the library path is set) and the pure-Python
JSON schema → GBNF converter (grammar())."""

from __future__ import annotations

import importlib.util
import sys

from .errors import RuntimeFailure


def register() -> None:
    if "llama_cpp" not in sys.modules:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None:
            raise RuntimeFailure("llama_cpp is missing from this runtime; rebuild the stub (python build.py)")
        sys.modules["llama_cpp"] = importlib.util.module_from_spec(spec)


def grammar():
    """llama_cpp.llama_grammar: JSON_GBNF and json_schema_to_gbnf."""
    register()
    from llama_cpp import llama_grammar

    return llama_grammar
