"""The theoretical GEMM peak (bench/peak.py) on fixed CPU descriptions: the arithmetic, worked by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench.gemm import check_against_theory
from bench.peak import MAX_BOOST_GHZ, checked_peaks, parse_cpuinfo, theoretical_peak


def _cpuinfo(n: int, *, vendor: str, family: int, name: str, mhz: float, flags: str, cores: int) -> str:
    block = (
        f"processor\t: {{i}}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 2\n"
        f"model name\t: {name}\ncpu MHz\t\t: {mhz}\nsiblings\t: {n}\ncpu cores\t: {cores}\n"
        f"flags\t\t: {flags}\n"
    )
    return "\n".join(block.format(i=i) for i in range(n))


ZEN5 = _cpuinfo(
    2, vendor="AuthenticAMD", family=26, name="AMD EPYC", mhz=2600.0, cores=2,
    flags="fpu sse avx avx2 fma avx512f avx512bw avx512vl avx_vnni avx512_vnni",
)  # fmt: skip
ZEN4 = ZEN5.replace("cpu family\t: 26", "cpu family\t: 25")
BROADWELL = _cpuinfo(
    8, vendor="GenuineIntel", family=6, name="Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz", mhz=2400.0,
    cores=4, flags="fpu sse avx avx2 fma",
)  # fmt: skip


def test_zen5_avx512_vnni_two_ports() -> None:
    cpu = parse_cpuinfo(ZEN5)
    peak = theoretical_peak(cpu, threads=2)
    assert (peak.isa, peak.ports, peak.int8_macs_per_cycle, peak.cores) == ("avx512_vnni", 2, 128, 2)
    # 2 cores × 2.6 GHz × (64 MACs × 2 ports) × 2 ops = 1,331.2 GOPS; fp32 2 × 2.6 × (16 × 2 × 2)
    assert peak.int8_gops == pytest.approx(1331.2)
    assert peak.fp32_gflops == pytest.approx(332.8)
    assert theoretical_peak(cpu, threads=1).int8_gops == pytest.approx(665.6)
    assert theoretical_peak(cpu, threads=16).cores == 2  # never more cores than the machine has


def test_zen4_double_pumped_one_port() -> None:
    peak = theoretical_peak(parse_cpuinfo(ZEN4), threads=2)
    assert (peak.ports, peak.int8_macs_per_cycle, peak.fp32_flops_per_cycle) == (1, 64, 32)
    assert peak.int8_gops == pytest.approx(2 * 2.6 * 64 * 2)


def test_avx2_path_and_smt_siblings_share_a_core() -> None:
    cpu = parse_cpuinfo(BROADWELL)
    assert (cpu.logical_cpus, cpu.threads_per_core, cpu.physical_cores) == (8, 2, 4)
    peak = theoretical_peak(cpu, threads=8)
    # vpmaddubsw + vpmaddwd: 32 MACs per cycle per core; 4 cores × 2.4 GHz × 32 × 2 = 614.4 GOPS
    assert (peak.isa, peak.cores, peak.int8_macs_per_cycle) == ("avx2", 4, 32)
    assert peak.int8_gops == pytest.approx(614.4)
    assert peak.fp32_gflops == pytest.approx(4 * 2.4 * 32)


def test_cpufreq_maximum_and_given_ports_win() -> None:
    cpu = parse_cpuinfo(ZEN5, max_freq_khz=3_700_000)
    assert cpu.clock_ghz == pytest.approx(3.7)
    four = theoretical_peak(cpu, 2, ports=4)
    assert four.int8_gops == pytest.approx(2 * 3.7 * 64 * 4 * 2)
    assert four.fp32_gflops == pytest.approx(2 * 3.7 * 64)  # the FMA ports stay the model's 2
    with pytest.raises(ValueError, match="threads must be >= 1"):
        theoretical_peak(cpu, 0)


def test_measured_peak_above_theory_is_flagged_and_not_used() -> None:
    cpu = parse_cpuinfo(ZEN5)
    # This project's 2-thread figures: fp32 443 GFLOPS implies 443 / (2 × 64) = 3.46 GHz > 2.6 nominal.
    check = checked_peaks({"fp32": 443.0, "int8": 3757.0}, cpu, threads=2)
    clock = 443.0 / 128
    assert check["fp32_implied_clock_ghz"] == pytest.approx(clock)
    assert check["estimate"]["clock_ghz"] == pytest.approx(clock)
    int8 = check["precisions"]["int8"]
    assert int8["theoretical"] == pytest.approx(2 * clock * 128 * 2)  # 1,772 GOPS
    assert int8["impossible"] and int8["checked"] == pytest.approx(int8["theoretical"])
    assert int8["ratio"] == pytest.approx(3757.0 / int8["theoretical"])
    assert not check["precisions"]["fp32"]["impossible"]
    assert check["at_reported_clock"]["int8_gops"] == pytest.approx(1331.2)


def test_an_int8_rate_raises_the_clock_too() -> None:
    """The AVX2 EPYC of 2026-12-07, nominal 2.45 GHz: the fp32 probe implied 2.46 GHz, but a bare
    u8xs8 kernel ran at 187 GOPS on one core, which needs 187 / (32 MACs x 2) = 2.92 GHz at least."""
    cpu = parse_cpuinfo(
        _cpuinfo(2, vendor="AuthenticAMD", family=25, name="AMD EPYC", mhz=2445.4, flags="avx2 fma", cores=2)
    )
    check = checked_peaks({"fp32": 78.65, "int8": 150.0, "int8_static": 187.0}, cpu, threads=1)
    assert check["implied_clock_ghz"]["int8_static"] == pytest.approx(187.0 / 64)
    assert check["estimate"]["clock_ghz"] == pytest.approx(187.0 / 64)
    assert "int8_static" in check["estimate"]["clock_source"]
    assert check["precisions"]["int8_static"]["theoretical"] == pytest.approx(187.0)  # never below it
    assert check["precisions"]["fp32"]["theoretical"] == pytest.approx(187.0 / 64 * 32)
    assert not any(row["impossible"] for row in check["precisions"].values())
    assert check["at_reported_clock"]["int8_gops"] == pytest.approx(2.4454 * 64)
    # a rate that needs a clock above any x86 core's boost is still impossible
    absurd = checked_peaks({"fp32": 78.65, "int8": 64 * (MAX_BOOST_GHZ + 0.1)}, cpu, threads=1)
    assert absurd["precisions"]["int8"]["impossible"]
    assert absurd["estimate"]["clock_ghz"] == pytest.approx(78.65 / 32)
    # a clock given by hand is never raised
    given = checked_peaks({"fp32": 78.65, "int8": 187.0}, cpu, threads=1, clock_ghz=2.45)
    assert given["precisions"]["int8"]["impossible"] and given["estimate"]["clock_ghz"] == 2.45


def test_plausible_peak_is_kept_and_gemm_reports_the_checked_one() -> None:
    cpu = parse_cpuinfo(ZEN5)
    out = check_against_theory({"fp32": 300.0, "int8": 1000.0}, 4767.0, threads=2, cpu=cpu)
    assert out["peak_gops"] == {"fp32": 300.0, "int8": 1000.0}  # below the 1,331 GOPS limit: kept
    assert out["measured_peak_gops"]["int8"] == 1000.0
    assert out["theoretical_peak_gops"]["int8"] == pytest.approx(1331.2)
    assert out["peak_check"]["precisions"]["int8_static"]["impossible"]
    assert out["peak_gops_static_int8"] == pytest.approx(1331.2)


def test_recheck_uses_the_cpu_that_measured(tmp_path: Path) -> None:
    """Old results files carry no CPU record: the machine line of run.json beside them says which CPU
    (this project's committed figures came from an Intel Xeon with AMX, not from today's AMD machine)."""
    import json

    from bench.gemm import recheck
    from bench.peak import cpu_from_machine_line, cpu_from_record, cpu_record

    line = "2 vCPUs of Intel(R) Xeon(R) Processor (avx512f, avx512_vnni, amx_int8), 24 GiB RAM, Python 3.11"
    cpu = cpu_from_machine_line(line)
    assert (cpu.vendor, cpu.logical_cpus, cpu.clock_ghz) == ("GenuineIntel", 2, 0.0)
    assert {"amx_int8", "avx512_vnni", "fma"} <= cpu.flags
    old = {
        "threads": 2,
        "rows": [],
        "peak_gops": {"fp32": 443.0, "int8": 3757.0},
        "peak_gops_static_int8": 4767.0,
    }
    (tmp_path / "gemm_t2.json").write_text(json.dumps(old))
    (tmp_path / "run.json").write_text(json.dumps({"machine": line}))
    out = recheck(tmp_path / "gemm_t2.json")
    # AMX: 1,024 MACs per cycle per core; 2 cores at the fp32-implied 443 / 128 GHz.
    limit = 2 * (443.0 / 128) * 1024 * 2
    assert out["peak_check"]["estimate"]["isa"] == "amx_int8"
    assert out["theoretical_peak_gops"]["int8"] == pytest.approx(limit)
    assert out["peak_gops"]["int8"] == 3757.0 and not out["peak_check"]["precisions"]["int8"]["impossible"]
    assert cpu_from_record(out["cpu"]) == cpu  # the record written now round-trips
    assert cpu_from_record(cpu_record(parse_cpuinfo(ZEN5))).flags == {
        "avx2",
        "fma",
        "avx512f",
        "avx_vnni",
        "avx512_vnni",
    }
