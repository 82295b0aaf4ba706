#!/usr/bin/env python3
"""Build the runtime stub for a target: stubs/<target>/ (the targets are in targets/).

    python build.py                            # linux-x86_64, portable CPU build (every x86-64 generation)
    python build.py --vulkan                   # ... with ggml's Vulkan back end (what `make stub` builds)
    python build.py --cuda                     # ... with the CUDA back end (long: see the README)
    python build.py --target windows-x86_64    # the Windows stub, built here with MinGW and wine
    python build.py --force                    # rebuild the stub even if its inputs did not change

Every step is skipped when its output is already there: compiled libraries, CPython, the
bootloader and the back ends are cached per version, flags and toolchain under
~/.cache/bundle/build/. Each target's record names its toolchain step (buildsys.linux:build,
buildsys.windows:build); this file is only the command line over them.

Output: stubs/<target>/bundle-runtime[.exe], native-cpu.tar.zst, stub.json, and one
native-<backend>.tar.zst per GPU back end asked for (runtime/host/gpu/registry.py); a back end
not asked for is removed from the folder, since bundles carry what it holds.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import targets
from buildsys.gpu import CUDA_ARCHITECTURES
from runtime.host.gpu.registry import GPU_BACKENDS


def main() -> int:
    default = "linux-x86_64"
    ap = argparse.ArgumentParser(description="Build the bundle runtime stub for a target.")
    ap.add_argument("--target", choices=list(targets.TARGETS), default=default,
                    help=f"the platform of the stub (default {default})")
    ap.add_argument("--force", action="store_true", help="rebuild the stub even if nothing changed")
    for b in GPU_BACKENDS:
        ap.add_argument(b.build_flag, dest=b.key, action="store_true", help=f"also build {b.what}")
    ap.add_argument("--cuda-archs", default=os.environ.get("BUNDLE_CUDA_ARCHS", CUDA_ARCHITECTURES),
                    help=f"CMAKE_CUDA_ARCHITECTURES (default {CUDA_ARCHITECTURES})")
    args = ap.parse_args()
    target = targets.by_name(args.target)
    for b in GPU_BACKENDS:
        if getattr(args, b.key) and b.key not in target.gpu_backends:
            sys.exit(f"{b.build_flag}: the {target.name} stub cannot carry {b.what} (yet)")
    module, function = target.toolchain.split(":")
    return getattr(importlib.import_module(module), function)(args)


if __name__ == "__main__":
    sys.exit(main())
