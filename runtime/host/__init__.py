"""The machine the bundle runs on: the per-user cache and its trust rules (cachedir), the native
libraries unpacked there and loaded into this process (libraries, bindings), the CPU (cpu), the
process itself (signals, streams, leftovers of earlier launches), the console (say, write_out),
and the GPUs (gpu/: the back-end registry, the choice at launch, the NVIDIA and Vulkan probes).

May import: runtime.errors, runtime.text. Nothing above it: the host knows no bundle format,
model, prompt or server.
"""
