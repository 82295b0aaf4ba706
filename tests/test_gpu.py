"""GPU choice without a GPU: layer fitting on real and synthetic model layouts, and every
fallback reason reached by the real loading code.

There is no NVIDIA GPU or driver on these machines. Where the driver would answer, a small
stand-in for libnvidia-ml.so.1 (compiled here from C, chosen with BUNDLE_NVML_LIBRARY) reports
what a machine could have; everything after it (unpacking the CUDA libraries, ggml's dlopen of
its CUDA back end, the fallback to the CPU) is the real code meeting a real failure.
"""

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import QUESTION, STUB_DIR, run_bundle_cmd, run_exe

from bundler.gguf import read_gguf
from runtime.host.gpu import nvidia as gpu

GIB = 1024**3


def demo_layout(model):
    return read_gguf(str(model)).layout()


def synthetic_layout(n_layer=32, layer_mib=400, kv_width=1024, output_mib=500):
    """Shaped like an 8B Q4 model: 32 layers of ~400 MiB, GQA KV width 1024."""
    return {"n_layer": n_layer, "layer_bytes": [layer_mib * gpu.MIB] * n_layer, "output_bytes": output_mib * gpu.MIB,
            "n_embd_k_gqa": kv_width, "n_embd_v_gqa": kv_width}


def test_demo_model_layout(model):
    layout = demo_layout(model)
    assert layout["n_layer"] == 30 and len(layout["layer_bytes"]) == 30
    assert layout["n_embd_k_gqa"] == 3 * 64  # 3 KV heads of 64
    total = sum(layout["layer_bytes"]) + layout["output_bytes"]
    assert 80e6 < total < model.stat().st_size  # weights minus the CPU-side token embeddings


def test_demo_model_fits_fully_in_a_small_gpu(model):
    plan = gpu.plan_offload(demo_layout(model), 4096, 2 * GIB)
    assert plan.fits_fully and plan.gpu_layers == 31 and not plan.partial
    # KV: 30 layers x 4096 tokens x (192 + 192) x 2 bytes = 90 MiB
    assert gpu.kv_bytes_per_layer(demo_layout(model), 4096) * 30 == 30 * 4096 * 384 * 2


def test_demo_model_does_not_fit_in_almost_nothing(model):
    plan = gpu.plan_offload(demo_layout(model), 4096, 300 * gpu.MIB)
    assert plan.gpu_layers == 0 and not plan.fits_fully


def test_large_model_partial_offload_arithmetic():
    layout = synthetic_layout()
    kv = gpu.kv_bytes_per_layer(layout, 8192)  # 8192 x 2048 x 2 = 32 MiB per layer
    assert kv == 32 * gpu.MIB
    free = 8 * GIB
    plan = gpu.plan_offload(layout, 8192, free)
    budget = free - gpu.RESERVE_BYTES - int(gpu.RESERVE_FRACTION * free)
    assert plan.gpu_layers == budget // (432 * gpu.MIB)  # whole layers of 400 + 32 MiB
    assert plan.partial and not plan.fits_fully
    assert plan.needed_bytes == 32 * 432 * gpu.MIB + 500 * gpu.MIB + gpu.RESERVE_BYTES
    full = gpu.plan_offload(layout, 8192, 80 * GIB)
    assert full.fits_fully and full.gpu_layers == 33
    smaller_ctx = gpu.plan_offload(layout, 2048, free)
    assert smaller_ctx.gpu_layers > plan.gpu_layers  # a smaller context leaves room for more layers


FAKE_NVML = r"""
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
typedef struct { unsigned long long total, free, used; } mem_t;
static int env(const char *k, int d) { const char *v = getenv(k); return v ? atoi(v) : d; }
int nvmlInit_v2(void) {
    const char *m = getenv("FAKE_NVML_MARKER");
    if (m) { FILE *f = fopen(m, "a"); if (f) { fputs("init\n", f); fclose(f); } }
    return env("FAKE_NVML_INIT_RC", 0);
}
int nvmlShutdown(void) { return 0; }
int nvmlSystemGetDriverVersion(char *b, unsigned n) { strncpy(b, "999.99", n); return 0; }
int nvmlSystemGetCudaDriverVersion_v2(int *v) { *v = env("FAKE_NVML_CUDA", 13000); return 0; }
int nvmlDeviceGetCount_v2(unsigned *c) { *c = env("FAKE_NVML_COUNT", 1); return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned i, void **h) { *h = (void *)(long)(i + 1); return 0; }
int nvmlDeviceGetName(void *h, char *b, unsigned n) { strncpy(b, "Stand-in GPU", n); return 0; }
int nvmlDeviceGetMemoryInfo(void *h, mem_t *m) {
    m->total = 80ULL << 30; m->free = (unsigned long long)env("FAKE_NVML_FREE_MIB", 81920) << 20; m->used = 0; return 0;
}
int nvmlDeviceGetCudaComputeCapability(void *h, int *a, int *b) { *a = 9; *b = 0; return 0; }
"""

# Shaped like ggml's CUDA back end as a file, but without its entry point: ggml's loader opens it
# and fails to find ggml_backend_init, as it would with a broken or mismatched build.
FAKE_GGML_CUDA = "int ggml_cuda_placeholder(void) { return 0; }\n"


def compile_so(tmp: Path, name: str, source: str) -> Path:
    src = tmp / f"{name}.c"
    src.write_text(source)
    out = tmp / f"{name}.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return out


@pytest.fixture(scope="module")
def fake_nvml(tmp_path_factory):
    return compile_so(tmp_path_factory.mktemp("nvml"), "libnvidia-ml", FAKE_NVML)


@pytest.fixture(scope="module")
def cuda_bundle(tmp_path_factory, model, stub):
    """A bundle whose stub folder carries a CUDA entry: the real stub and CPU libraries, plus a
    CUDA tar holding a libggml-cuda.so that cannot initialise."""
    tmp = tmp_path_factory.mktemp("cudastub")
    folder = tmp / "stub"
    folder.mkdir()
    for name in ("bundle-runtime", "native-cpu.tar.zst"):
        os.symlink(STUB_DIR / name, folder / name)
    lib = compile_so(tmp, "libggml-cuda", FAKE_GGML_CUDA)
    import io

    import zstandard

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        tar.add(lib, arcname="libggml-cuda.so")
    (folder / "native-cuda.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    meta = json.loads((STUB_DIR / "stub.json").read_text())
    meta["backends"] = {"cuda": {"version_min": [13, 0]}}
    meta["native"]["cuda"] = {"file": "native-cuda.tar.zst", "unpacked_size": len(raw.getvalue())}
    (folder / "stub.json").write_text(json.dumps(meta))
    out = tmp / "cuda-bundle"
    r = run_bundle_cmd("build", model, "-o", out, "--stub", folder / "bundle-runtime", "--gpu", "cuda")
    assert r.returncode == 0, r.stderr
    assert "CUDA back end: carried" in r.stderr
    return out


def info(exe, env, *args):
    r = run_exe(exe, "--info", "--json", *args, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["backend"]


def native_folders(home: Path):
    native = home / "cache" / "bundle" / "native"
    return sorted(p.name for p in native.iterdir() if p.is_dir()) if native.exists() else []


@pytest.mark.parametrize("case, env_extra, reason", [
    ("no driver", {"BUNDLE_NVML_LIBRARY": "/nonexistent/libnvidia-ml.so.1"}, "no NVIDIA driver on this machine"),
    ("driver silent", {"FAKE_NVML_INIT_RC": "9"}, "does not answer (NVML error 9)"),
    ("no device", {"FAKE_NVML_COUNT": "0"}, "reports no GPU"),
    ("old driver", {"FAKE_NVML_CUDA": "12020"}, "supports CUDA 12.2, this bundle needs CUDA 13.0: update"),
    ("library fails", {}, "the CUDA back end failed to load"),
    ("no room", {"FAKE_NVML_FREE_MIB": "100"}, "does not fit in 100 MiB of free GPU memory"),
])
def test_fallback_reasons(cuda_bundle, fake_nvml, isolated_user_dirs, case, env_extra, reason):
    env = {**os.environ, "BUNDLE_NVML_LIBRARY": str(fake_nvml), **env_extra}
    b = info(cuda_bundle, env)
    assert b["name"] == "CPU" and reason in b["cpu_reason"], b
    assert b["cpu_variant"]
    cuda_unpacked = len(native_folders(isolated_user_dirs)) == 2
    assert cuda_unpacked == (case == "library fails")  # only where a driver answers and the model fits
    r = run_exe(cuda_bundle, "-p", QUESTION, "--temp", "0", env=env)  # falls back, never dies
    assert r.returncode == 0 and "Paris" in r.stdout
    assert "running on the CPU: " in r.stderr and reason in r.stderr
    r = run_exe(cuda_bundle, "-p", QUESTION, "--gpu", "cuda", env=env)  # asked for CUDA: a clean failure
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 1 and lines[-1].startswith("error: ") and sum(x.startswith("error: ") for x in lines) == 1
    assert "error: --gpu cuda: " in r.stderr and reason in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_gpu_off_never_touches_cuda(cuda_bundle, fake_nvml, isolated_user_dirs, tmp_path):
    marker = tmp_path / "nvml-called"
    env = dict(os.environ, BUNDLE_NVML_LIBRARY=str(fake_nvml), FAKE_NVML_MARKER=str(marker))
    b = info(cuda_bundle, env, "--gpu", "off")
    assert b["name"] == "CPU" and "turned off" in b["cpu_reason"]
    r = run_exe(cuda_bundle, "-p", QUESTION, "--temp", "0", "--gpu", "off", env=env)
    assert "Paris" in r.stdout and "running on the CPU" not in r.stderr
    assert not marker.exists()  # the driver was never asked
    assert len(native_folders(isolated_user_dirs)) == 1  # the CUDA libraries were never unpacked
    info(cuda_bundle, env)  # auto does ask
    assert marker.read_text().startswith("init")


def test_bundle_without_cuda_entry(built_bundle, model, tmp_path):
    b = info(built_bundle, None)
    assert b["name"] == "CPU" and "cuda" not in b["skipped"] and b["nvidia"] is None  # never asked
    r = run_exe(built_bundle, "-p", "hi", "--gpu", "cuda")
    assert r.returncode == 1 and "carries no CUDA back end" in r.stderr
    out = tmp_path / "cpu-only"
    assert run_bundle_cmd("build", model, "-o", out, "--gpu", "none").returncode == 0
    b = info(out, None)
    assert b["name"] == "CPU" and b["cpu_reason"] == "this bundle carries no GPU back end" and not b["skipped"]
    r = run_exe(out, "-p", QUESTION, "--temp", "0")
    assert r.returncode == 0 and "Paris" in r.stdout and "running on the CPU" not in r.stderr


def test_gpu_none_leaves_the_cuda_libraries_out(cuda_bundle, model, tmp_path):
    out = tmp_path / "cpu-only"
    stub = Path(os.readlink(cuda_bundle.parent / "stub" / "bundle-runtime")).parent  # the real stub folder
    folder = cuda_bundle.parent / "stub"
    r = run_bundle_cmd("build", model, "-o", out, "--stub", folder / "bundle-runtime", "--gpu", "none")
    assert r.returncode == 0 and "CUDA back end: left out" in r.stderr
    entries = {e["name"] for e in json.loads(run_bundle_cmd("inspect", out, "--json").stdout)["entries"]}
    assert entries == {"model.gguf", "native/cpu.tar.zst"}
    assert stub == STUB_DIR
    r = run_bundle_cmd("build", model, "-o", tmp_path / "x", "--gpu", "cuda")  # the plain stub has none
    assert r.returncode == 1 and "has no CUDA back end" in r.stderr


def test_probe_without_driver_is_a_reason_not_a_crash():
    p = gpu.probe_nvidia("/nonexistent/libnvidia-ml.so.1")
    assert p.problem and not p.devices


def test_probe_reads_the_stand_in_driver(fake_nvml):
    p = gpu.probe_nvidia(str(fake_nvml))
    assert p.problem is None and p.cuda_version == (13, 0) and p.driver_version == "999.99"
    assert p.devices[0].name == "Stand-in GPU" and p.devices[0].free_bytes == 80 * GIB
    assert p.devices[0].compute_capability == (9, 0)
