"""The real CUDA-enabled stub (python build.py --cuda), on this machine without a GPU.

Marked `cuda`: `make test` leaves these out (the CUDA back end takes longer to compile than CI
allows); `make test-cuda` builds it and runs them.
"""

import json
import os

import pytest
from conftest import QUESTION, STUB_DIR, run_bundle_cmd, run_exe
from test_gpu import FAKE_NVML, compile_so, native_folders

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def real_cuda_bundle(tmp_path_factory, model, stub):
    if not (STUB_DIR / "native-cuda.tar.zst").exists():
        pytest.fail("no CUDA back end in stubs/linux-x86_64/: run `make test-cuda` (python build.py --cuda)")
    out = tmp_path_factory.mktemp("cuda") / "cuda-bundle"
    r = run_bundle_cmd("build", model, "-o", out)  # --gpu auto: carried, since the stub has it
    assert r.returncode == 0, r.stderr
    assert "CUDA back end: carried" in r.stderr
    return out


def test_bundle_carries_the_cuda_entry(real_cuda_bundle):
    d = json.loads(run_bundle_cmd("inspect", real_cuda_bundle, "--json").stdout)
    assert "native/cuda.tar.zst" in {e["name"] for e in d["entries"]}
    assert d["stub"]["backends"]["cuda"]["version_min"] == [13, 0]


def test_no_driver_here_means_cpu_with_the_reason(real_cuda_bundle, isolated_user_dirs):
    env = dict(os.environ, BUNDLE_NVML_LIBRARY="/nonexistent/libnvidia-ml.so.1")
    b = json.loads(run_exe(real_cuda_bundle, "--info", "--json", env=env).stdout)["backend"]
    assert b["name"] == "CPU" and "no NVIDIA driver" in b["cpu_reason"] and b["cpu_variant"]
    r = run_exe(real_cuda_bundle, "-p", QUESTION, "--temp", "0", env=env)
    assert r.returncode == 0 and "Paris" in r.stdout
    assert len(native_folders(isolated_user_dirs)) == 1  # the CUDA libraries were not unpacked
    r = run_exe(real_cuda_bundle, "-p", QUESTION, "--gpu", "cuda", env=env)
    assert r.returncode == 1 and "--gpu cuda: no NVIDIA driver" in r.stderr


def test_real_cuda_library_without_a_driver_falls_back(real_cuda_bundle, isolated_user_dirs, tmp_path):
    """A driver answers (stand-in NVML), so the real CUDA libraries are unpacked and ggml's real
    libggml-cuda.so is loaded: without the driver's libcuda.so.1 the CUDA runtime finds no
    device, and the CPU runs."""
    nvml = compile_so(tmp_path, "libnvidia-ml", FAKE_NVML)
    env = dict(os.environ, BUNDLE_NVML_LIBRARY=str(nvml))
    b = json.loads(run_exe(real_cuda_bundle, "--info", "--json", env=env).stdout)["backend"]
    assert b["name"] == "CPU" and "the CUDA back end found no usable GPU" in b["cpu_reason"], b
    assert len(native_folders(isolated_user_dirs)) == 2  # CPU and CUDA libraries, each unpacked once
    r = run_exe(real_cuda_bundle, "-p", QUESTION, "--temp", "0", env=env)
    assert r.returncode == 0 and "Paris" in r.stdout and "running on the CPU" in r.stderr
