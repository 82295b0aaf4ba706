"""A copy of a GGUF with its Q4_1 tensors requantized to Q4_0, made at bench time with the `gguf`
package (llama.cpp's own Python GGUF library): every tensor of another type and every metadata
field is kept as it is, general.file_type says Q4_0. llama.cpp repacks Q4_0 weights for its
matrix-matrix CPU kernels, so batching pays far more on it than on Q4_1 (issue 27).

    python -m bench.requant MODEL.gguf [OUT.gguf]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def q4_0_copy(model: Path, out: Path | None = None) -> Path:
    """The Q4_0 copy of model (cached beside the bench's other files; made once)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import dequantize, quantize

    if out is None:
        cache = Path(os.environ.get("BUNDLE_CACHE_DIR") or Path.home() / ".cache" / "bundle") / "bench"
        out = cache / (model.stem.replace("Q4_1", "") + "-requant-Q4_0.gguf")
    if out.exists() and out.stat().st_mtime >= model.stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(model)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(out) + ".part", arch)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = f.contents()
        if key == "general.file_type":
            value = int(LlamaFileType.MOSTLY_Q4_0)
        sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY and len(f.types) > 1 else None
        writer.add_key_value(key, value, f.types[0], sub)
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists dimensions innermost first
        if t.tensor_type == Q.Q4_1:
            data = quantize(dequantize(t.data, Q.Q4_1).reshape(shape).astype(np.float32), Q.Q4_0)
            writer.add_tensor(t.name, data, raw_dtype=Q.Q4_0)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(out) + ".part", out)
    return out


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models" / "SmolLM2-135M-Instruct.gguf"
    print(q4_0_copy(src, Path(sys.argv[2]) if len(sys.argv) > 2 else None))
