"""The direct reference: llama-cpp-python's high-level Llama on the .gguf, in this virtualenv.

    python bench/direct.py first-token MODEL PROMPT   -> prints the answer as it streams
    python bench/direct.py decode MODEL N             -> prints one JSON line of decode tok/s
"""

import ctypes
import json
import sys
import time
from pathlib import Path


def load_llama():
    import llama_cpp

    # The portable wheel puts its CPU variants in site-packages/bin/ (docs/facts.md #5a); ggml's
    # default search does not look there, so load them the way the runtime does.
    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml.so.0"
    variants = Path(llama_cpp.__file__).parent.parent / "bin"
    ggml = ctypes.CDLL(str(lib))
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path(str(variants).encode())
    return llama_cpp


def physical_cores():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from runtime.host.cpu import physical_cores as pc

    return pc()


def main():
    mode, model = sys.argv[1], sys.argv[2]
    llama_cpp = load_llama()
    llm = llama_cpp.Llama(model_path=model, n_ctx=4096, n_threads=physical_cores(), verbose=False)
    if mode == "first-token":
        for chunk in llm.create_chat_completion(
            messages=[{"role": "user", "content": sys.argv[3]}], temperature=0, max_tokens=8, stream=True
        ):
            text = chunk["choices"][0]["delta"].get("content")
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()
        sys.stdout.write("\n")
    elif mode == "decode":
        n = int(sys.argv[3])
        count, first, last = 0, None, None
        for _ in llm.create_completion("Once upon a time", max_tokens=n, temperature=0, stream=True):
            now = time.perf_counter()
            count += 1
            if first is None:
                first = now
            last = now
        rate = (count - 1) / (last - first) if count > 1 else 0.0
        print(json.dumps({"decode_tps": rate, "tokens": count}))


if __name__ == "__main__":
    main()
