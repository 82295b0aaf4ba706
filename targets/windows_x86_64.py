"""Windows on x86-64, built on Linux: llama.cpp cross-compiled with MinGW-w64, PyInstaller run under
wine; the tests run its executables under wine too. No GPU back end yet."""

from . import Target

TARGET = Target(
    name="windows-x86_64",
    system="windows",
    machine="x86_64",
    triple="x86_64-w64-mingw32",
    exe_suffix=".exe",
    exe_format="pe",
    toolchain="buildsys.windows:build",
    build_hint="build it here with `python build.py --target windows-x86_64` (or `make stub-windows`)",
    # (sapphirerapids is left out: AMX does not build with MinGW)
    cpu_variants=("x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell", "skylakex", "cannonlake",
                  "cascadelake", "icelake", "cooperlake", "zen4", "alderlake"),
    gpu_backends=(),
    built_on=("linux-x86_64",),
    runner="wine",
    needs="Windows {windows_min}+",
    # Windows refuses to start an executable over 4 GiB ("This app can't run on your PC")
    max_executable=(4 << 30) - 1,
)
