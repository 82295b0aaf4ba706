#!/usr/bin/env python3
"""A tiny llama-architecture GGUF (random weights, ~13 MB) with the demo model's tokenizer and
chat template, for checks that must travel under an upload limit (bench/gpu_check.sh).

    python bench/make_tiny_model.py models/SmolLM2-135M-Instruct.gguf models/tiny.gguf

Needs the `gguf` package (pip install gguf). Its answers are noise; what it is for is the same
computation on two back ends.
"""

import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER, CTX = 128, 384, 4, 2, 4, 2048


def field_value(reader, key):
    f = reader.fields[key]
    if len(f.types) > 1 and f.types[0].name == "ARRAY":
        parts = [f.parts[i] for i in f.data]
        if f.types[1].name == "STRING":
            return [bytes(p).decode("utf-8", "replace") for p in parts]
        return [p.tolist()[0] for p in parts]
    value = f.parts[f.data[0]]
    if f.types[0].name == "STRING":
        return bytes(value).decode("utf-8", "replace")
    return value.tolist()[0]


def main(src: str, dest: str) -> None:
    reader = GGUFReader(src)
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    w = GGUFWriter(dest, "llama")
    w.add_name("tiny-random")
    w.add_context_length(CTX)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_block_count(N_LAYER)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)  # mostly F16
    w.add_tokenizer_model(field_value(reader, "tokenizer.ggml.model"))
    w.add_tokenizer_pre(field_value(reader, "tokenizer.ggml.pre"))
    w.add_token_list(tokens)
    w.add_token_types(field_value(reader, "tokenizer.ggml.token_type"))
    w.add_token_merges(field_value(reader, "tokenizer.ggml.merges"))
    w.add_bos_token_id(field_value(reader, "tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(field_value(reader, "tokenizer.ggml.eos_token_id"))
    w.add_chat_template(field_value(reader, "tokenizer.chat_template"))
    rng = np.random.default_rng(1234)

    def t(name, *shape, f16=True):
        data = (rng.standard_normal(shape) * 0.05).astype(np.float16 if f16 else np.float32)
        w.add_tensor(name, data, raw_dtype=GGMLQuantizationType.F16 if f16 else GGMLQuantizationType.F32)

    head_dim = N_EMBD // N_HEAD
    t("token_embd.weight", len(tokens), N_EMBD)
    t("output_norm.weight", N_EMBD, f16=False)
    for i in range(N_LAYER):
        t(f"blk.{i}.attn_norm.weight", N_EMBD, f16=False)
        t(f"blk.{i}.attn_q.weight", N_EMBD, N_EMBD)
        t(f"blk.{i}.attn_k.weight", N_HEAD_KV * head_dim, N_EMBD)
        t(f"blk.{i}.attn_v.weight", N_HEAD_KV * head_dim, N_EMBD)
        t(f"blk.{i}.attn_output.weight", N_EMBD, N_EMBD)
        t(f"blk.{i}.ffn_norm.weight", N_EMBD, f16=False)
        t(f"blk.{i}.ffn_gate.weight", N_FF, N_EMBD)
        t(f"blk.{i}.ffn_up.weight", N_FF, N_EMBD)
        t(f"blk.{i}.ffn_down.weight", N_EMBD, N_FF)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
