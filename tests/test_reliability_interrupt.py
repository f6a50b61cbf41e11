"""Interruptions and full disks: training and labeling resume with nothing lost; writes never half-land.

* ``distill_student(checkpoint_dir=...)``: a run killed mid-epoch and resumed ends with exactly the
  weights (``torch.equal``: bit for bit) and the losses of a run never interrupted. Bit-for-bit, not a
  tolerance: resuming restores every piece of state (weights, AdamW moments and step, schedule,
  torch RNG for dropout, numpy RNG for the batch order) and replays the same single-threaded CPU
  kernels on the same inputs, so any difference at all means a piece of state was lost. A tolerance
  could hide exactly that (e.g. a dropout mask drawn from the wrong RNG state changes one step only).
* ``label_pairs``: a teacher that dies after k chunks, then a rerun, gives the byte-identical file of
  an uninterrupted run, every pair once, and the teacher is never asked twice for a committed pair.
* ``ENOSPC`` mid-write (checkpoint, labeling chunk, final teacher file, bundle): a clear ``OSError``
  with that errno, no partial final file, the previous file intact, no temporary files left behind.
"""

from __future__ import annotations

import copy
import errno
import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import VOCAB, WORDS, bert_tokenizer  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast  # noqa: E402

import darl_lite.distill.trainer as trainer  # noqa: E402
import darl_lite.teacher_file as teacher_file  # noqa: E402
from darl_lite.bundle import load_bundle, write_bundle  # noqa: E402
from darl_lite.distill.label import label_pairs, part_path, progress_path  # noqa: E402
from darl_lite.distill.trainer import DistillConfig, distill_student  # noqa: E402
from darl_lite.errors import DataError, InputError  # noqa: E402
from darl_lite.teacher_file import read_provenance, read_teacher_outputs, write_teacher_outputs  # noqa: E402
from darl_lite.types import Pair  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: polite on a shared machine, and the same kernels in every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, PreTrainedTokenizerFast]:
    """A 2-layer, 32-wide BERT with dropout on (so the torch RNG state matters on resume)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return BertForSequenceClassification(config), bert_tokenizer()


@pytest.fixture(scope="module")
def data() -> tuple[list[Pair], np.ndarray]:
    rng = np.random.default_rng(0)
    pairs = [
        Pair(
            " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))),
            " ".join(rng.choice(WORDS, size=int(rng.integers(2, 9)))),
            grade=int(rng.integers(0, 3)) if i % 3 else None,
        )
        for i in range(64)
    ]
    return pairs, rng.dirichlet(np.ones(3), size=len(pairs)).astype(np.float32)


# 64 pairs / batch 8 = 8 steps per epoch, 2 epochs = 16 steps.
CONFIG = DistillConfig(epochs=2, batch_size=8, lr=1e-3, max_length=16, seed=0)


def _train(tiny: Any, data: Any, **kwargs: Any) -> tuple[Any, Any]:
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    result = distill_student(model, tokenizer, *data, CONFIG, progress=False, **kwargs)
    return model, result


@pytest.fixture(scope="module")
def reference(tiny: Any, data: Any) -> tuple[dict[str, Any], Any]:
    """The uninterrupted run without checkpoints: weights and result."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, result = _train(tiny, data)
    finally:
        torch.set_num_threads(before)
    return {k: v.clone() for k, v in model.state_dict().items()}, result


def _assert_same_weights(model: Any, weights: dict[str, Any]) -> None:
    state = model.state_dict()
    assert state.keys() == weights.keys()
    different = [name for name, value in state.items() if not torch.equal(value, weights[name])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"


class _Crash(RuntimeError):
    pass


def _crash_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the forward pass of optimiser step ``step`` raise, as a killed process would stop there."""
    calls = {"n": 0}
    real = trainer.distillation_loss

    def loss(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == step:
            raise _Crash(f"simulated crash at step {step}")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "distillation_loss", loss)


def _fresh_model(tiny: Any) -> Any:
    """A model with other initial weights: a restarted process need not rebuild the same init."""
    torch.manual_seed(123)
    return BertForSequenceClassification(tiny[0].config)


def test_checkpointing_does_not_change_the_run(tiny: Any, data: Any, reference: Any, tmp_path: Path) -> None:
    model, result = _train(tiny, data, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=5)
    _assert_same_weights(model, reference[0])
    assert result.losses == reference[1].losses and result.steps == 16
    # Every 5 steps and at the end; the newest two kept; nothing temporary left.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000015", "step-00000016"]


def test_crash_mid_epoch_then_resume_equals_an_uninterrupted_run(
    tiny: Any, data: Any, reference: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        _crash_at_step(patch, 11)  # epoch 2, batch 3; the newest checkpoint is step 9 (epoch 2, batch 1)
        with pytest.raises(_Crash):
            _train(tiny, data, checkpoint_dir=ckpt, checkpoint_every=3)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000006", "step-00000009"]
    meta = json.loads((ckpt / "step-00000009" / "meta.json").read_text())
    assert (meta["epoch"], meta["batches_done_in_epoch"], meta["step"]) == (1, 1, 9)

    model, tokenizer = _fresh_model(tiny), tiny[1]
    result = distill_student(
        model, tokenizer, *data, CONFIG, progress=False, checkpoint_dir=ckpt, checkpoint_every=3
    )
    _assert_same_weights(model, reference[0])
    assert result.losses == reference[1].losses
    assert result.steps == 16 and result.pairs_seen == reference[1].pairs_seen


def test_a_finished_run_resumes_to_its_final_weights_without_training(
    tiny: Any, data: Any, reference: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _train(tiny, data, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=8)
    _crash_at_step(monkeypatch, 1)  # any training step would raise
    model = _fresh_model(tiny)
    result = distill_student(model, tiny[1], *data, CONFIG, progress=False, checkpoint_dir=tmp_path / "ckpt")
    _assert_same_weights(model, reference[0])
    assert result.losses == reference[1].losses


def test_disk_full_while_checkpointing_fails_cleanly_and_resumes(
    tiny: Any, data: Any, reference: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "ckpt"
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 8): some bytes land, then the disk is full
            handle.write(b"\x80\x02partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, handle, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_disk)
        with pytest.raises(OSError) as info:
            _train(tiny, data, checkpoint_dir=ckpt, checkpoint_every=4)
    assert info.value.errno == errno.ENOSPC
    # The half-written checkpoint is gone; the previous one is whole.
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000004"]
    model = _fresh_model(tiny)
    distill_student(model, tiny[1], *data, CONFIG, progress=False, checkpoint_dir=ckpt, checkpoint_every=4)
    _assert_same_weights(model, reference[0])


def test_a_checkpoint_of_another_run_is_refused(tiny: Any, data: Any, tmp_path: Path) -> None:
    _train(tiny, data, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=8)
    other = DistillConfig(epochs=2, batch_size=8, lr=2e-3, max_length=16, seed=0)
    with pytest.raises(InputError, match="belongs to another run"):
        distill_student(
            copy.deepcopy(tiny[0]), tiny[1], *data, other, progress=False, checkpoint_dir=tmp_path / "ckpt"
        )
    with pytest.raises(InputError, match="checkpoint_every must be >= 1"):
        distill_student(
            copy.deepcopy(tiny[0]), tiny[1], *data, CONFIG, checkpoint_dir=tmp_path / "x", checkpoint_every=0
        )


class _Payload:
    """Pickled into a forged checkpoint: unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_checkpoint_holding_code_is_refused_not_run(tiny: Any, data: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _train(tiny, data, checkpoint_dir=ckpt, checkpoint_every=16)
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(marker)}, ckpt / "step-00000016" / "state.pt")
    with pytest.raises(InputError, match=r"state\.pt is unreadable"):
        distill_student(copy.deepcopy(tiny[0]), tiny[1], *data, CONFIG, progress=False, checkpoint_dir=ckpt)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Resumable labeling


class HashTeacher:
    """A deterministic teacher: probabilities from a hash of the pair; records what it was asked."""

    name = "hash-teacher"
    kind = "test"

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.asked: list[tuple[str, str]] = []
        self.calls = 0
        self.fail_on_call = fail_on_call

    def predict_proba(self, pairs: Sequence[Pair]) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise ConnectionError("teacher endpoint went away")
        self.asked.extend(p.key for p in pairs)
        raw = np.array(
            [[zlib.crc32(f"{p.query}|{p.item}|{g}".encode()) % 997 + 1 for g in range(3)] for p in pairs],
            dtype=np.float64,
        )
        return (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)


TEXTS = ["szechwan cuisine", "四川菜 麻婆豆腐", "مطبخ سيتشوان", "🍜🌶️ noodles", "mapo\x00doufu", "a\tb\r\nc"]


@pytest.fixture(scope="module")
def label_input() -> list[Pair]:
    pairs = [Pair(TEXTS[i % len(TEXTS)] + f" q{i % 37}", f"item {i} {TEXTS[i % 5]}") for i in range(2300)]
    return pairs + pairs[:50]  # repeated pairs are labeled once


PROVENANCE = {"name": "hash-teacher", "kind": "test", "command": "pytest"}


@pytest.fixture(scope="module")
def labeled_once(label_input: list[Pair], tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("label") / "teacher.jsonl.gz"
    result = label_pairs(HashTeacher(), label_input, out, chunk_size=400, provenance=PROVENANCE)
    assert (result.n_pairs, result.n_chunks, result.chunks_labeled, result.resumed) == (2300, 6, 6, False)
    return _content(out)


def _content(path: Path) -> bytes:
    # The decompressed bytes: write_teacher_outputs' gzip header carries the name of its random
    # temporary file (gzip's FNAME field), so the compressed bytes of two equal writes differ.
    return gzip.decompress(path.read_bytes())


def _records(path: Path) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [tuple(json.loads(line)[k] for k in ("query", "item")) for line in handle]


def test_labeling_writes_every_pair_once_in_the_teacher_file_format(
    label_input: list[Pair], labeled_once: bytes, tmp_path: Path
) -> None:
    out = tmp_path / "t.jsonl.gz"
    out.write_bytes(gzip.compress(labeled_once))
    keys = _records(out)
    assert len(keys) == len(set(keys)) == 2300
    assert set(keys) == {p.key for p in label_input}
    outputs = read_teacher_outputs(out)
    np.testing.assert_array_equal(
        np.stack([outputs[p.key] for p in label_input[:10]]), HashTeacher().predict_proba(label_input[:10])
    )


def test_interrupted_labeling_resumes_and_equals_an_uninterrupted_run(
    label_input: list[Pair], labeled_once: bytes, tmp_path: Path
) -> None:
    out = tmp_path / "teacher.jsonl.gz"
    dying = HashTeacher(fail_on_call=4)  # three chunks committed, the fourth call dies
    with pytest.raises(ConnectionError):
        label_pairs(dying, label_input, out, chunk_size=400, provenance=PROVENANCE)
    assert not out.exists()
    assert json.loads(progress_path(out).read_text())["chunks_done"] == 3

    again = HashTeacher()
    result = label_pairs(again, label_input, out, chunk_size=400, provenance=PROVENANCE)
    assert result.resumed and result.chunks_labeled == 3
    # Nothing committed was asked again, nothing was skipped.
    assert len(again.asked) == 2300 - 1200 and set(dying.asked).isdisjoint(again.asked)
    assert _content(out) == labeled_once
    assert read_provenance(out) == {**PROVENANCE, "n_records": 2300, "n_grades": 3}
    assert not part_path(out).exists() and not progress_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, out.name + ".provenance.json"]


def test_a_chunk_written_but_not_committed_is_dropped_on_resume(
    label_input: list[Pair], labeled_once: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between appending a chunk and recording it: the rerun cuts the part file back."""
    import darl_lite.distill.label as label

    out = tmp_path / "teacher.jsonl.gz"
    real = label._write_progress
    calls = {"n": 0}

    def crash_after_append(path: Path, progress: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the initial write, chunk 1, then chunk 2's record: killed
            raise KeyboardInterrupt
        real(path, progress)

    with monkeypatch.context() as patch:
        patch.setattr(label, "_write_progress", crash_after_append)
        with pytest.raises(KeyboardInterrupt):
            label_pairs(HashTeacher(), label_input, out, chunk_size=400, provenance=PROVENANCE)
    assert json.loads(progress_path(out).read_text())["chunks_done"] == 1
    assert part_path(out).read_bytes().count(b"\n") == 800  # chunk 2 landed but is not committed
    result = label_pairs(HashTeacher(), label_input, out, chunk_size=400, provenance=PROVENANCE)
    assert result.chunks_labeled == 5
    assert _content(out) == labeled_once


def test_disk_full_while_appending_a_chunk(
    label_input: list[Pair], labeled_once: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import darl_lite.distill.label as label

    out = tmp_path / "teacher.jsonl.gz"
    real = label._append
    calls = {"n": 0}

    def full_disk(part: Path, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            with open(part, "ab") as handle:
                handle.write(data[: len(data) // 2])  # half a chunk lands
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(part, data)

    with monkeypatch.context() as patch:
        patch.setattr(label, "_append", full_disk)
        with pytest.raises(
            OSError, match=r"chunk 3 of 6 .*No space left.* 800 of 2300 pairs are saved"
        ) as info:
            label_pairs(HashTeacher(), label_input, out, chunk_size=400, provenance=PROVENANCE)
    assert info.value.errno == errno.ENOSPC
    assert not out.exists()
    label_pairs(HashTeacher(), label_input, out, chunk_size=400, provenance=PROVENANCE)
    assert _content(out) == labeled_once


def test_disk_full_writing_the_final_file_keeps_the_previous_one(
    label_input: list[Pair], labeled_once: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "teacher.jsonl.gz"
    previous = [Pair("old query", "old item")]
    write_teacher_outputs(out, previous, [[0.2, 0.3, 0.5]], {"name": "old", "kind": "test"})
    old_bytes, old_sidecar = out.read_bytes(), (tmp_path / (out.name + ".provenance.json")).read_bytes()

    def full_disk(tmp: Path, records: Any, compress: bool) -> None:
        tmp.write_bytes(b"\x1f\x8b partial gzip")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(teacher_file, "_write_jsonl", full_disk)
        with pytest.raises(OSError, match=r"previous teacher\.jsonl\.gz .*is intact") as info:
            label_pairs(HashTeacher(), label_input, out, chunk_size=400, provenance=PROVENANCE)
    assert info.value.errno == errno.ENOSPC
    assert out.read_bytes() == old_bytes
    assert (tmp_path / (out.name + ".provenance.json")).read_bytes() == old_sidecar
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # All labels are safe: the rerun writes the file without asking the teacher anything.
    idle = HashTeacher(fail_on_call=1)
    result = label_pairs(idle, label_input, out, chunk_size=400, provenance=PROVENANCE)
    assert result.chunks_labeled == 0 and idle.calls == 0
    assert _content(out) == labeled_once


def test_labeling_refuses_work_files_of_another_run_and_bad_teachers(
    label_input: list[Pair], tmp_path: Path
) -> None:
    out = tmp_path / "teacher.jsonl.gz"
    with pytest.raises(ConnectionError):
        label_pairs(HashTeacher(fail_on_call=2), label_input, out, chunk_size=400, provenance=None)
    with pytest.raises(InputError, match="different teacher, pair list or chunk size"):
        label_pairs(HashTeacher(), label_input[:100], out, chunk_size=400, provenance=None)
    with pytest.raises(InputError, match="different teacher, pair list or chunk size"):
        label_pairs(HashTeacher(), label_input, out, chunk_size=500, provenance=None)

    class NaNTeacher(HashTeacher):
        def predict_proba(self, pairs: Sequence[Pair]) -> np.ndarray:
            probs = super().predict_proba(pairs)
            probs[1, 0] = np.nan
            return probs

    with pytest.raises(DataError, match=r"output for pair 1, field 'probs'\[0\]: must be finite"):
        label_pairs(NaNTeacher(), label_input, tmp_path / "nan.jsonl", chunk_size=400, provenance=None)
    with pytest.raises(InputError, match="no pairs"):
        label_pairs(HashTeacher(), [], tmp_path / "e.jsonl", provenance=None)
    with pytest.raises(InputError, match="JSON-serialisable"):
        label_pairs(HashTeacher(), label_input, tmp_path / "p.jsonl", provenance={"x": object()})


def test_disk_full_while_writing_a_bundle_keeps_the_previous_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import darl_lite.bundle as bundle_module

    sources = {}
    for role, name in (("tokenizer", "tokenizer.json"), ("model.int8", "model_int8.onnx")):
        sources[role] = tmp_path / name
        sources[role].write_bytes(name.encode() * 100)
    manifest = {"grades": {"names": ["a", "b"], "gains": [0, 1]}, "max_length": 8}
    target = tmp_path / "bundles" / "b"
    write_bundle(target, sources, manifest)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    real_copy = bundle_module.shutil.copyfile

    def full_disk(src: Any, dst: Any) -> Any:
        if Path(src).name == "model_int8.onnx":
            Path(dst).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst)

    sources["tokenizer"].write_bytes(b"a new tokenizer")
    with monkeypatch.context() as patch:
        patch.setattr(bundle_module.shutil, "copyfile", full_disk)
        with pytest.raises(OSError) as info:
            write_bundle(target, sources, manifest, overwrite=True)
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in target.parent.iterdir()] == ["b"]  # no staging directory left
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    load_bundle(target)  # the old bundle still verifies
