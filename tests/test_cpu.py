"""Issue 24: the processor facts the runtime reads on ARM (the hardware there cannot run here:
sysfs trees and the kernel's capability words as an RK3588, a Snapdragon or a Raspberry Pi
report them are given to the real functions)."""

from __future__ import annotations

import json

from runtime.host import cpu


def _sysfs(tmp_path, fact: str, values: list[int]):
    for n, v in enumerate(values):
        d = tmp_path / f"cpu{n}" / fact.rsplit("/", 1)[0] if "/" in fact else tmp_path / f"cpu{n}"
        d.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"cpu{n}" / fact).write_text(f"{v}\n")
    return str(tmp_path)


def test_big_little_counts_the_big_cores(tmp_path):
    # RK3588: four Cortex-A55 (capacity 414) and four Cortex-A76 (1024)
    root = _sysfs(tmp_path, "cpu_capacity", [414] * 4 + [1024] * 4)
    assert cpu.fast_cpus(range(8), root) == {4, 5, 6, 7}
    # only the CPUs this process may use are rated
    assert cpu.fast_cpus({0, 1, 6}, root) == {6}


def test_prime_and_big_cores_both_count(tmp_path):
    # one prime core, three big, four LITTLE (a phone's DynamIQ cluster)
    root = _sysfs(tmp_path, "cpu_capacity", [1024, 870, 870, 870, 325, 325, 325, 325])
    assert cpu.fast_cpus(range(8), root) == {0, 1, 2, 3}


def test_alike_cores_or_no_facts_mean_all_of_them(tmp_path):
    assert cpu.fast_cpus(range(4), _sysfs(tmp_path / "pi5", "cpu_capacity", [1024] * 4)) is None
    assert cpu.fast_cpus(range(4), str(tmp_path / "nothing")) is None


def test_max_frequency_when_there_is_no_capacity(tmp_path):
    root = _sysfs(tmp_path, "cpufreq/cpuinfo_max_freq", [1800000] * 4 + [2400000] * 2)
    assert cpu.fast_cpus(range(6), root) == {4, 5}
    # a partly readable tree does not guess
    (tmp_path / "cpu5" / "cpufreq" / "cpuinfo_max_freq").unlink()
    assert cpu.fast_cpus(range(6), root) is None


def test_arm_features_as_ggml_reads_them():
    HWCAP_ASIMD, HWCAP_FPHP, HWCAP_ASIMDHP, HWCAP_ASIMDDP, HWCAP_SVE = 1 << 1, 1 << 9, 1 << 10, 1 << 20, 1 << 22
    HWCAP2_SVE2, HWCAP2_I8MM, HWCAP2_SME = 1 << 1, 1 << 13, 1 << 23
    assert cpu.arm_features(HWCAP_ASIMD, 0) == ["asimd"]  # Cortex-A53 (Raspberry Pi 3/4's A72 alike)
    # FPHP without ASIMDHP is not fp16 for ggml
    assert cpu.arm_features(HWCAP_ASIMD | HWCAP_ASIMDDP | HWCAP_FPHP, 0) == ["asimd", "dotprod"]
    a76 = HWCAP_ASIMD | HWCAP_ASIMDDP | HWCAP_FPHP | HWCAP_ASIMDHP
    assert cpu.arm_features(a76, 0) == ["asimd", "dotprod", "fp16"]
    v9 = cpu.arm_features(a76 | HWCAP_SVE, HWCAP2_SVE2 | HWCAP2_I8MM | HWCAP2_SME)
    assert v9 == ["asimd", "dotprod", "fp16", "sve", "i8mm", "sve2", "sme"]


def test_this_machine_reports_its_features():
    hw = cpu.hardware(cpu.physical_cores())
    json.dumps(hw)
    assert isinstance(hw["cpu_features"], list)
    if hw["machine"] == "x86_64":
        assert "sse4_2" in hw["cpu_features"]  # every x86-64 CPU ggml's variants start from
