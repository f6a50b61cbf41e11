"""Bundles are verified before use and refused with the file and the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from darl_lite import BundleError, Scorer, load_bundle
from darl_lite.bundle import FORMAT_VERSION, MANIFEST_NAME, write_bundle
from darl_lite.ood import MahalanobisDetector


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST_NAME).read_text())


def _file_of(bundle: Path, role: str) -> Path:
    return bundle / _manifest(bundle)["files"][role]["path"]


def test_exported_bundle_loads_and_lists_every_file(tiny_bundle_dir: Path) -> None:
    bundle = load_bundle(tiny_bundle_dir)
    assert set(bundle.manifest["files"]) == {"model.int8", "model.fp32", "tokenizer", "ood.int8", "ood.fp32"}
    assert bundle.precisions == ["fp32", "int8"]
    assert bundle.grade_names == ["irrelevant", "weak", "strong"]
    for entry in bundle.manifest["files"].values():
        assert len(entry["sha256"]) == 64 and entry["size"] > 0
    assert bundle.manifest["parity"]["passed"] is True
    assert set(bundle.manifest["ood"]["thresholds"]) == {"int8", "fp32"}


def test_tampered_file_is_refused(bundle_copy: Path) -> None:
    target = _file_of(bundle_copy, "model.int8")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model_int8\.onnx \(model\.int8\) does not match its sha256"):
        Scorer.load(bundle_copy)


def test_truncated_file_is_refused(bundle_copy: Path) -> None:
    target = _file_of(bundle_copy, "tokenizer")
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(BundleError, match=r"tokenizer\.json \(tokenizer\) is 100 bytes.*truncated"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy: Path) -> None:
    _file_of(bundle_copy, "ood.int8").unlink()
    with pytest.raises(BundleError, match=r"ood_int8\.npz \(ood\.int8\) is missing"):
        load_bundle(bundle_copy)


def test_swapped_model_is_refused(bundle_copy: Path) -> None:
    fp32, int8 = _file_of(bundle_copy, "model.fp32"), _file_of(bundle_copy, "model.int8")
    int8.write_bytes(fp32.read_bytes())
    with pytest.raises(BundleError, match=r"model\.int8"):
        load_bundle(bundle_copy)


def test_wrong_format_version_is_refused(bundle_copy: Path) -> None:
    manifest = _manifest(bundle_copy)
    manifest["format_version"] = FORMAT_VERSION + 1
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"format_version {FORMAT_VERSION + 1}.*re-export"):
        load_bundle(bundle_copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)


def test_missing_precision_is_named(tiny_bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match=r"no 'fp16' model; it has \['fp32', 'int8'\]"):
        Scorer.load(tiny_bundle_dir, precision="fp16")


def test_ood_statistics_round_trip_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    detector = MahalanobisDetector.fit(rng.normal(size=(200, 8)), rng.integers(0, 3, 200))
    detector.save(tmp_path / "ood.npz")
    loaded = MahalanobisDetector.load(tmp_path / "ood.npz")
    np.testing.assert_array_equal(loaded.means, detector.means)
    np.testing.assert_array_equal(loaded.precision, detector.precision)


def test_write_bundle_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    source = tmp_path / "tokenizer.json"
    source.write_text("{}")
    manifest = {"grades": {"names": ["a", "b"], "gains": [0, 1]}, "max_length": 8}
    write_bundle(tmp_path / "b", {"tokenizer": source}, manifest)
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(tmp_path / "b", {"tokenizer": source}, manifest)
    with pytest.raises(BundleError, match="source files missing"):
        write_bundle(tmp_path / "c", {"tokenizer": tmp_path / "absent.json"}, manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "tokenizer.json"]
