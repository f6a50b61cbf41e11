"""The theoretical GEMM peak of this CPU, from its flags and clock: what a measured "peak" must not pass.

    python -m bench.peak            # prints the CPU, the assumption and the int8 / fp32 peaks as JSON

peak (ops/s) = physical cores used × clock × MACs per cycle per core × 2 (a multiply-add is 2 ops).

int8 MACs per cycle per core, by the best instruction set the flags show (onnxruntime's MLAS picks
the same one):

- ``amx_int8``: one ``tdpbusd`` (16×16 int32 tile, 64 byte pairs each = 16,384 MACs) per 16 cycles
  on the one tile unit = 1,024;
- ``avx512_vnni``: ``vpdpbusd`` on a 512-bit register = 64 u8×s8 MACs, × VNNI ports;
- ``avx_vnni``: ``vpdpbusd`` on a 256-bit register = 32 MACs, × 2 ports;
- ``avx2``: ``vpmaddubsw`` (32 u8×s8 products) needs ``vpmaddwd`` to widen them before the add:
  2 multiply uops per 32 MACs on the 2 multiply ports = 32.

VNNI ports by CPU model: AMD family 0x1A (Zen 5) runs 512-bit instructions on full-width pipes, 2 of
which multiply: 2. AMD family 0x19 (Zen 4) double-pumps 512-bit instructions through 256-bit pipes:
1 zmm instruction per cycle. Intel Xeon Silver/Bronze and Intel client cores have one 512-bit FMA
unit: 1. Every other model (Xeon Gold/Platinum, unknown CPUs): 2 — the larger count, so that a
measured rate flagged above the peak is impossible whichever count the model really has.
fp32: 16 lanes × 2 × the same ports with AVX-512 (Zen 4: 2 × 256-bit = 32 FLOPs per cycle); AVX2+FMA
8 lanes × 2 × 2 ports.

Clock: ``cpufreq/cpuinfo_max_freq`` (the highest boost) where the kernel exposes it; else
``/proc/cpuinfo``'s MHz, which under a hypervisor is the nominal clock and may sit well below the
boost the cores really run at. A measured rate is a lower bound on the clock: a kernel that did R
ops/s on c cores of p ops per cycle ran at R / (c·p) GHz at least. :func:`checked_peaks` therefore
raises the clock to the highest one any measurement implies (fp32 or int8), so the theoretical peak
is never below what was measured, and flags as impossible only a measurement that would need a clock
above :data:`MAX_BOOST_GHZ`, faster than any x86 core runs (the timing or kernel artefact the
check exists for: 3,757 GOPS on two AVX-512 VNNI cores implies 7.3 GHz). With a raised clock, "% of
the theoretical peak" is an upper bound on efficiency: the real clock may be higher still.
(Why not the fp32 rate alone, as before 2026-12-07: on the AVX2 EPYC at a nominal 2.45 GHz, the
fp32 probe implied 2.46 GHz and so an int8 peak of 157 GOPS per core, while a plain ``MatMulInteger``
ran at 187 GOPS on one core: 2.92 GHz at least.)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
#: The highest boost clock of any shipping x86 core (Intel Core i9-14900KS, 2024): a measured rate
#: that needs a faster clock on this CPU's ports is impossible, whatever clock the OS reports.
MAX_BOOST_GHZ = 6.2
SYS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class CpuInfo:
    """What the peak depends on, read from /proc/cpuinfo and sysfs."""

    model_name: str
    vendor: str
    family: int | None
    model: int | None
    flags: frozenset[str]
    logical_cpus: int
    threads_per_core: int
    clock_ghz: float
    clock_source: str

    @property
    def physical_cores(self) -> int:
        return max(1, self.logical_cpus // max(1, self.threads_per_core))


@dataclass(frozen=True)
class PeakEstimate:
    """The theoretical int8 and fp32 GEMM peaks for ``cores`` cores at ``clock_ghz``."""

    isa: str
    int8_macs_per_cycle: int
    fp32_flops_per_cycle: int
    ports: int
    ports_reason: str
    cores: int
    clock_ghz: float
    clock_source: str
    int8_gops: float = field(init=False)
    fp32_gflops: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "int8_gops", self.cores * self.clock_ghz * self.int8_macs_per_cycle * 2)
        object.__setattr__(self, "fp32_gflops", self.cores * self.clock_ghz * self.fp32_flops_per_cycle)


def _field(block: str, name: str) -> str | None:
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def parse_cpuinfo(text: str, max_freq_khz: int | None = None, logical_cpus: int | None = None) -> CpuInfo:
    """A :class:`CpuInfo` from /proc/cpuinfo's text (its first processor block) and a cpufreq maximum."""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    if not blocks:
        raise ValueError("cpuinfo text has no processor block")
    first = blocks[0]
    siblings, cores = _int(_field(first, "siblings")), _int(_field(first, "cpu cores"))
    threads_per_core = siblings // cores if siblings and cores and siblings >= cores else 1
    mhz = _field(first, "cpu MHz")
    if max_freq_khz:
        clock, source = max_freq_khz / 1e6, "cpufreq cpuinfo_max_freq"
    elif mhz:
        clock, source = float(mhz) / 1e3, "/proc/cpuinfo cpu MHz (nominal under a hypervisor)"
    else:
        raise ValueError("no clock in cpuinfo and no cpufreq maximum: pass the clock explicitly")
    return CpuInfo(
        model_name=_field(first, "model name") or "unknown",
        vendor=_field(first, "vendor_id") or "unknown",
        family=_int(_field(first, "cpu family")),
        model=_int(_field(first, "model")),
        flags=frozenset((_field(first, "flags") or "").split()),
        logical_cpus=logical_cpus if logical_cpus is not None else len(blocks),
        threads_per_core=threads_per_core,
        clock_ghz=clock,
        clock_source=source,
    )


def read_cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (the CPUs this process may run on)."""
    max_freq = SYS_CPU / "cpu0" / "cpufreq" / "cpuinfo_max_freq"
    khz = int(max_freq.read_text().strip()) if max_freq.is_file() else None
    return parse_cpuinfo(CPUINFO.read_text(), khz, logical_cpus=len(os.sched_getaffinity(0)))


def vnni_ports(cpu: CpuInfo) -> tuple[int, str]:
    """512-bit VNNI/FMA instructions issued per cycle per core for this model, and why."""
    name = cpu.model_name.lower()
    if cpu.vendor == "AuthenticAMD" and cpu.family == 0x1A:
        return 2, "AMD family 0x1A (Zen 5): full-width 512-bit pipes, 2 of them multiply"
    if cpu.vendor == "AuthenticAMD" and cpu.family == 0x19:
        return 1, "AMD family 0x19 (Zen 4): 512-bit instructions double-pumped through 256-bit pipes"
    if cpu.vendor == "GenuineIntel" and ("silver" in name or "bronze" in name or "core" in name):
        return 1, "Intel Xeon Silver/Bronze or client core: one 512-bit FMA unit"
    return 2, "two 512-bit units assumed (Xeon Gold/Platinum, or unknown model: the upper bound)"


def theoretical_peak(
    cpu: CpuInfo,
    threads: int,
    clock_ghz: float | None = None,
    clock_source: str = "given",
    ports: int | None = None,
) -> PeakEstimate:
    """The peak of ``threads`` threads: one per physical core at most (SMT siblings share the ports).

    ``ports`` overrides the int8 (VNNI) port count :func:`vnni_ports` assumes for the model; the fp32
    peak keeps the model's FMA port count.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if ports is not None and ports < 1:
        raise ValueError(f"ports must be >= 1, got {ports}")
    fma_ports, reason = vnni_ports(cpu)
    if ports is None:
        ports = fma_ports
    else:
        reason = f"given: {ports} VNNI ports (fp32 keeps the model's {fma_ports} FMA ports)"
    f = cpu.flags
    fp32 = 16 * 2 * fma_ports if "avx512f" in f else (8 * 2 * 2 if {"avx2", "fma"} <= f else 4 * 2 * 2)
    if "amx_int8" in f:
        isa, macs, reason = "amx_int8", 1024, "one AMX tile unit: 16,384 MACs per tdpbusd every 16 cycles"
    elif "avx512_vnni" in f:
        isa, macs = "avx512_vnni", 64 * ports
    elif "avx_vnni" in f:
        isa, macs, ports, reason = "avx_vnni", 32 * 2, 2, "256-bit vpdpbusd on 2 ports"
    elif "avx2" in f:
        isa, macs, ports, reason = "avx2", 32, 2, "vpmaddubsw + vpmaddwd: 2 multiplies per 32 MACs, 2 ports"
    else:
        isa, macs, ports, reason = "sse4", 16, 2, "128-bit pmaddubsw + pmaddwd on 2 ports"
    return PeakEstimate(
        isa=isa,
        int8_macs_per_cycle=macs,
        fp32_flops_per_cycle=fp32,
        ports=ports,
        ports_reason=reason,
        cores=min(threads, cpu.physical_cores),
        clock_ghz=clock_ghz if clock_ghz is not None else cpu.clock_ghz,
        clock_source=clock_source if clock_ghz is not None else cpu.clock_source,
    )


def checked_peaks(
    measured: dict[str, float],
    cpu: CpuInfo,
    threads: int,
    clock_ghz: float | None = None,
    ports: int | None = None,
) -> dict:
    """The measured peaks (``{"int8": GOPS, "fp32": GFLOPS}``; any ``int8_*`` key is held against the
    int8 peak) against the theoretical ones.

    Unless ``clock_ghz`` is given, the clock is raised to the highest one a plausible measurement
    implies (module docstring), when that is above the reported clock. A measured rate above the
    theoretical peak is flagged impossible; the checked peak is the smaller of the two, the figure
    a "% of peak" may rest on.
    """
    base = theoretical_peak(cpu, threads, clock_ghz, ports=ports)
    per_cycle = {"int8": 2 * base.int8_macs_per_cycle, "fp32": base.fp32_flops_per_cycle}
    implied_by = {
        name: value / (base.cores * per_cycle["int8" if name.startswith("int8") else name])
        for name, value in measured.items()
    }
    plausible = {name: ghz for name, ghz in implied_by.items() if ghz <= MAX_BOOST_GHZ}
    estimate = base
    if clock_ghz is None and plausible and max(plausible.values()) > base.clock_ghz:
        name, implied = max(plausible.items(), key=lambda kv: kv[1])
        source = f"implied by the measured {name} rate ({base.clock_source}: {base.clock_ghz:.2f} GHz)"
        estimate = theoretical_peak(cpu, threads, implied, source, ports=ports)
    theory = {"int8": estimate.int8_gops, "fp32": estimate.fp32_gflops}
    checks = {}
    for name, value in measured.items():
        limit = theory["int8" if name.startswith("int8") else name]  # int8_static: the same units
        checks[name] = {
            "measured": value,
            "theoretical": limit,
            "ratio": value / limit,
            "impossible": value > limit * 1.0001,
            "checked": min(value, limit),
        }
    return {
        "estimate": asdict(estimate),
        "implied_clock_ghz": implied_by,
        "max_boost_ghz": MAX_BOOST_GHZ,
        "fp32_implied_clock_ghz": implied_by.get("fp32", 0.0),
        "at_reported_clock": {"int8_gops": base.int8_gops, "fp32_gflops": base.fp32_gflops},
        "precisions": checks,
    }


_ISA_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile"})


def cpu_record(cpu: CpuInfo) -> dict:
    """``cpu`` as plain JSON values (its ISA flags only): what a results file keeps to be re-checked."""
    return {**asdict(cpu), "flags": sorted(cpu.flags & _ISA_FLAGS), "physical_cores": cpu.physical_cores}


def cpu_from_record(record: dict) -> CpuInfo:
    """The :class:`CpuInfo` a :func:`cpu_record` describes."""
    fields = {k: v for k, v in record.items() if k != "physical_cores"}
    return CpuInfo(**{**fields, "flags": frozenset(record["flags"])})


def cpu_from_machine_line(line: str) -> CpuInfo:
    """A :class:`CpuInfo` from ``bench.run``'s machine line, ``"2 vCPUs of MODEL (flag, flag), ..."``.

    That line keeps no clock and no core topology: the clock is left at 0 (unknown), so
    :func:`checked_peaks` takes the one the measured fp32 rate implies, and each vCPU counts as a core.
    """
    count, _, rest = line.partition(" vCPUs of ")
    model, _, tail = rest.partition(" (")
    if not count.strip().isdigit() or not tail:
        raise ValueError(f"not a bench.run machine line: {line[:80]!r}")
    flags = frozenset(f.strip() for f in tail.split(")", 1)[0].split(","))
    if "avx512f" in flags:
        flags |= {"avx2", "fma"}
    vendor = (
        "GenuineIntel"
        if "intel" in model.lower()
        else "AuthenticAMD"
        if "amd" in model.lower()
        else "unknown"
    )
    return CpuInfo(model, vendor, None, None, flags, int(count), 1, 0.0, "unknown (not recorded)")


def describe(cpu: CpuInfo, threads: int) -> dict:
    """The CPU and its theoretical peaks, as plain JSON values."""
    return {"cpu": cpu_record(cpu), "peak": asdict(theoretical_peak(cpu, threads))}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    print(json.dumps(describe(read_cpu_info(), args.threads), indent=2))


if __name__ == "__main__":
    main()
