"""GPU back ends as data: the registry (one GpuBackend row per back end: its entry, its libraries,
its probe and its check), the choice at launch (choice: probe, fit, load, fall back to the CPU
with a reason), and the probes (nvidia: NVML; vulkan: a forked child that lists the devices).
A new back end is one registry row, its probe, and its build step in buildsys/."""
