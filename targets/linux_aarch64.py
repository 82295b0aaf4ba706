"""Linux on 64-bit ARM (Raspberry Pi 4/5, Graviton, Ampere, Jetson's CPU side, ARM laptops):
glibc 2.17 or newer and nothing else from the system, every ARMv8.0 to ARMv9.2 CPU through ggml's
CPU variants, and ARM GPUs through Vulkan. Built on x86-64 Linux with the same zig toolchain; its Python side (CPython and
PyInstaller, which does not cross-build) runs under qemu-user there, and so do its tests."""

from . import Target

TARGET = Target(
    name="linux-aarch64",
    system="linux",
    machine="aarch64",
    triple="aarch64-linux-gnu.2.17",
    exe_suffix="",
    exe_format="elf",
    toolchain="buildsys.linux:build",
    build_hint="run `python build.py --target linux-aarch64` (or `make stub-aarch64`)",
    # ggml's ARM Linux variants: baseline, +dotprod, +fp16, +SVE, +i8mm, +SVE2, +SME
    cpu_variants=("armv8.0_1", "armv8.2_1", "armv8.2_2", "armv8.2_3", "armv8.6_1", "armv8.6_2", "armv9.2_1",
                  "armv9.2_2"),
    gpu_backends=("vulkan",),  # Raspberry Pi 5's v3dv, Mali, Adreno through Mesa
    built_on=("linux-x86_64",),
    runner="qemu-aarch64",
    needs="glibc ≥ {glibc_min}",
    max_executable=None,
)
