"""A llama model over 4 GiB, made with the `gguf` package (issue 9.3: FAT32 holds no file that
large, so such a model must travel split). Its weights are all zeros and the file is sparse:
it takes no disk space and answers nonsense, but llama.cpp loads and runs it like any model.
The tokenizer is the demo model's."""

from __future__ import annotations

import os
from pathlib import Path

import gguf


def make_big_model(path: Path, tokenizer_from: Path, n_layer: int = 4, n_embd: int = 4096,
                   n_ff: int = 16384) -> int:
    """Write the model at path; returns its size in bytes."""
    src = gguf.GGUFReader(str(tokenizer_from))
    n_vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("big-zeros")
    w.add_block_count(n_layer)
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(32)
    w.add_head_count_kv(32)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // 32)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, field in src.fields.items():
        if key.startswith("tokenizer.") and key != "tokenizer.chat_template":
            value = field.contents()
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, value, vtype, sub_type=sub)
    f32 = gguf.GGMLQuantizationType.F32
    shapes = [("token_embd.weight", (n_vocab, n_embd)), ("output_norm.weight", (n_embd,))]
    for i in range(n_layer):
        shapes += [(f"blk.{i}.attn_norm.weight", (n_embd,)), (f"blk.{i}.ffn_norm.weight", (n_embd,))]
        shapes += [(f"blk.{i}.attn_{x}.weight", (n_embd, n_embd)) for x in ("q", "k", "v", "output")]
        shapes += [(f"blk.{i}.ffn_gate.weight", (n_ff, n_embd)), (f"blk.{i}.ffn_up.weight", (n_ff, n_embd)),
                   (f"blk.{i}.ffn_down.weight", (n_embd, n_ff))]
    import numpy as np

    data = 0
    for name, shape in shapes:
        nbytes = 4
        for d in shape:
            nbytes *= d
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=f32)
        data += (nbytes + 31) // 32 * 32
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    head = os.path.getsize(path)
    total = (head + 31) // 32 * 32 + data
    with open(path, "r+b") as f:
        f.truncate(total)  # zeros, without writing them: a sparse file
    return total
