#!/usr/bin/env bash
# The GPU check of issue #5, for a session that is lent a GPU machine (the device tool).
#
#   bench/gpu_check.sh prepare   # here: a tiny model, the ggml sources and a click wheel in .gpu-check/
#   bench/gpu_check.sh run       # there, in one device call that carries stubs/linux-x86_64 and .gpu-check:
#       run(command="bash bench/gpu_check.sh run", carry=["stubs/linux-x86_64", ".gpu-check"], timeout_s=600)
#
# Upload limit 64 MiB: the CUDA-enabled native blob (cuBLAS alone is ~800 MB) cannot travel, so
# `run` compiles ggml's CUDA back end there for that GPU's architecture only (16 cores: minutes)
# from the same llama.cpp sources, packs it with that machine's CUDA runtime libraries into the
# stub folder, builds a bundle of the tiny model and reports: CUDA chosen, all layers offloaded,
# greedy output on the GPU equal to the CPU's, decode tok/s GPU vs CPU; then the same for the
# stub's Vulkan back end on that GPU (issue 12). The demo model (94 MiB)
# does not fit the upload; the tiny one is made with the gguf package from its tokenizer.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_CPP_PYTHON=$(python3 -c "import re;print(re.search(r'LLAMA_CPP_PYTHON = \"(.+?)\"', open('build.py').read()).group(1))")

prepare() {
    make stub model
    .venv/bin/python -m pip install -q gguf
    rm -rf .gpu-check && mkdir -p .gpu-check/wheels
    .venv/bin/python bench/make_tiny_model.py models/SmolLM2-135M-Instruct.gguf .gpu-check/tiny.gguf
    tmp=$(mktemp -d)
    .venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$tmp"
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    src=$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp/ggml)
    mkdir -p .gpu-check/ggml/src
    cp -r "$src/CMakeLists.txt" "$src/cmake" "$src/include" .gpu-check/ggml/
    find "$src/src" -maxdepth 1 -type f -exec cp {} .gpu-check/ggml/src/ \;
    cp -r "$src/src/ggml-cuda" "$src/src/ggml-cpu" .gpu-check/ggml/src/
    touch .gpu-check/ggml/ggml.pc.in  # the vendored copy lacks the pkg-config template a standalone build wants
    rm -rf "$tmp"
    .venv/bin/python -m pip download -q --no-deps click -d .gpu-check/wheels
    du -sh .gpu-check stubs/linux-x86_64
    echo "prepared; now: run(command=\"bash bench/gpu_check.sh run\", carry=[\"stubs/linux-x86_64\", \".gpu-check\"])"
}

run() {
    out=${OUT:-/tmp/gpu-check-out}
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$out/gpu.txt"
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
    nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    echo "== compiling ggml's CUDA back end for sm_$cap"
    start=$(date +%s)
    cmake -S .gpu-check/ggml -B /tmp/ggml-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DGGML_CPU=OFF \
        -DGGML_BACKEND_DL=ON -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_CUDA_NO_VMM=ON \
        -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF \
        -DCMAKE_CUDA_ARCHITECTURES="${cap}-real" -DCMAKE_CUDA_COMPILER="$nvcc" > "$out/cmake.log" 2>&1
    cmake --build /tmp/ggml-cuda --target ggml-cuda -j"$(nproc)" > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
    echo "compiled in $(( $(date +%s) - start )) s"
    lib=$(find /tmp/ggml-cuda -name libggml-cuda.so | head -1)
    cudart=$(ldconfig -p | awk '/libcudart.so.13 /{print $NF; exit}')
    [ -n "$cudart" ] || cudart=$(find / -name 'libcudart.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)
    cudadir=$(dirname "$cudart")
    stub=/tmp/gpu-stub
    rm -rf "$stub" && mkdir -p "$stub/pack"
    cp stubs/linux-x86_64/bundle-runtime stubs/linux-x86_64/native-cpu.tar.zst stubs/linux-x86_64/stub.json "$stub/"
    cp "$lib" "$stub/pack/"
    for l in libcudart.so.13 libcublas.so.13 libcublasLt.so.13; do
        cp -L "$(find "$cudadir" /usr/local/cuda*/ -name "$l" 2>/dev/null | head -1)" "$stub/pack/$l"
    done
    tar -C "$stub/pack" -cf "$stub/native-cuda.tar" .
    python3 - "$stub" <<'EOF'
import json, os, sys
stub = sys.argv[1]
meta = json.load(open(f"{stub}/stub.json"))
meta["native"]["cuda"] = {"file": "native-cuda.tar", "compression": "none",
                          "unpacked_size": os.path.getsize(f"{stub}/native-cuda.tar")}
meta["cuda_version_min"] = [13, 0]
json.dump(meta, open(f"{stub}/stub.json", "w"))
EOF
    python3 -c "import click" 2>/dev/null || python3 -m pip install -q --no-index --find-links .gpu-check/wheels click
    PYTHONPATH=. python3 -m bundler.cli build .gpu-check/tiny.gguf --stub "$stub/bundle-runtime" --gpu cuda -o /tmp/tiny-gpu
    export BUNDLE_CACHE_DIR=/tmp/gpu-check-cache
    check CUDA /tmp/tiny-gpu cuda
    # Vulkan on the same GPU, through the NVIDIA driver's own Vulkan driver (nvidia_icd.json):
    # the stub's native-vulkan.tar.zst travels with stubs/linux-x86_64 (6 MiB).
    echo "== Vulkan"
    ls /usr/share/vulkan/icd.d/ /etc/vulkan/icd.d/ 2>/dev/null | tee "$out/vulkan-icds.txt" || true
    PYTHONPATH=. python3 -m bundler.cli build .gpu-check/tiny.gguf --gpu vulkan -o /tmp/tiny-vk
    check Vulkan /tmp/tiny-vk vulkan
}

# check NAME EXE TAG: NAME chosen with all layers, greedy GPU output == CPU's, decode speed.
check() {
    name=$1 exe=$2 tag=$3
    "$exe" --info --json > "$out/info-$tag.json"
    python3 - "$out/info-$tag.json" "$name" <<'EOF'
import json, sys
b = json.load(open(sys.argv[1]))["backend"]
name = sys.argv[2]
print(f"back end: {b['name']} on {b['device']}; layers on the GPU: {b['gpu_layers']} of {b['n_layer']} (+ output)")
print(f"{name} chosen:", b["name"] == name, "| all layers offloaded:", b["name"] == name and b["gpu_layers"] > (b["n_layer"] or 0))
if b.get("cpu_reason"):
    print("CPU because:", b["cpu_reason"])
EOF
    prompt="Tell me about the sea."
    gpu_text=$("$exe" -p "$prompt" --temp 0 -n 48 2>"$out/gpu-run-$tag.txt")
    cpu_text=$("$exe" -p "$prompt" --temp 0 -n 48 --gpu off 2>"$out/cpu-run-$tag.txt")
    printf '%s\n' "$gpu_text" > "$out/gpu-answer-$tag.txt"
    printf '%s\n' "$cpu_text" > "$out/cpu-answer-$tag.txt"
    if [ "$gpu_text" = "$cpu_text" ]; then echo "greedy output $name == CPU: yes"; else
        echo "greedy output $name == CPU: NO"; echo "$name: $gpu_text"; echo "CPU: $cpu_text"; fi
    "$exe" --bench --json > "$out/bench-$tag.json"
    "$exe" --bench --json --gpu off -t 16 > "$out/bench-cpu-$tag.json"
    python3 - "$out" "$tag" <<'EOF'
import json, sys
g = json.load(open(f"{sys.argv[1]}/bench-{sys.argv[2]}.json")); c = json.load(open(f"{sys.argv[1]}/bench-cpu-{sys.argv[2]}.json"))
print(f"decode tok/s: GPU {g['decode_tps']:.1f} vs CPU {c['decode_tps']:.1f} ({g['decode_tps'] / c['decode_tps']:.2f}x); "
      f"prompt tok/s: GPU {g['prompt_tps']:.1f} vs CPU {c['prompt_tps']:.1f}")
EOF
}

case "${1:-run}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bench/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
