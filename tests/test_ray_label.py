"""The Ray path of ``distill label`` and DASA pool scoring, on a real local Ray cluster (no network).

One ``ray.init(num_cpus=2)`` for the module; a tiny random Qwen2 saved to disk with a random probe
head is the teacher each actor loads. Checked: the shards equal the single-process teacher file,
a rerun grades only the shards that are not on disk, bad input files and options fail with errors
that say what to fix, and the actors' DASA pool scores equal :func:`dasa.detector_scores` on
features computed in this process.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from tiny_models import WORDS, decoder_tokenizer, tiny_qwen  # noqa: E402

from darl_lite.cli import main  # noqa: E402
from darl_lite.distill.dasa import detector_scores  # noqa: E402
from darl_lite.distill.label import TeacherSpec  # noqa: E402
from darl_lite.distill.llm_features import TEACHER_TEMPLATE, compute_states  # noqa: E402
from darl_lite.distill.llm_teacher import ProbeHead  # noqa: E402
from darl_lite.distill.ray_dasa import FeatureSpec, pool_scores_ray  # noqa: E402
from darl_lite.distill.ray_engine import RayOptions  # noqa: E402
from darl_lite.distill.ray_label import (  # noqa: E402
    PLAN_NAME,
    label_pairs_ray,
    read_shards,
    shard_path,
)
from darl_lite.distill.teacher_tune import ProbeTeacher, load_llm  # noqa: E402
from darl_lite.errors import DataError, InputError  # noqa: E402
from darl_lite.teacher_file import read_provenance, read_teacher_outputs, write_teacher_outputs  # noqa: E402
from darl_lite.types import Pair  # noqa: E402

LAYER = 1  # tiny_qwen has hidden states 0..2


def text_pairs(n: int, seed: int = 0) -> list[Pair]:
    """Distinct pairs of varied lengths over the tiny vocabulary (so batches need padding)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        query = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
        item = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 10))))
        out.append(Pair(query=f"{query} w{i}", item=item))
    return out


def write_jsonl(path: Path, pairs: list[Pair]) -> Path:
    path.write_text("".join(json.dumps({"query": p.query, "item": p.item}) + "\n" for p in pairs), "utf-8")
    return path


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """A real local cluster with 2 CPUs for the module: two 1-CPU actors fit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Qwen2 + tokenizer folder and a random probe head on its layer 1."""
    folder = tmp_path_factory.mktemp("ray-teacher")
    model, tok = tiny_qwen(), decoder_tokenizer()
    model.save_pretrained(folder / "llm")
    tok.save_pretrained(folder / "llm")
    rng = np.random.default_rng(3)
    hidden = model.config.hidden_size
    ProbeHead(
        layer=LAYER,
        mean=rng.normal(size=hidden).astype(np.float32),
        scale=rng.uniform(0.5, 2.0, size=hidden).astype(np.float32),
        weight=rng.normal(size=(3, hidden)).astype(np.float32),
        bias=rng.normal(size=3).astype(np.float32),
        temperature=1.3,
    ).save(folder / "head.npz")
    return folder / "llm", folder / "head.npz"


def label_argv(model: Path, head: Path, pairs_file: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "label", "--model", str(model), "--head", str(head), "--pairs", str(pairs_file),
            "--out", str(out), "--batch-size", "4", *extra]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Grades


def test_ray_shards_equal_the_single_process_teacher_file(teacher_files, tmp_path: Path, capsys) -> None:
    model, head = teacher_files
    pairs = text_pairs(50, seed=1)
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", [*pairs, pairs[7]])  # a repeated row
    single = tmp_path / "single.jsonl.gz"
    assert main(label_argv(model, head, pairs_file, single)) == 0
    shards, merged = tmp_path / "shards", tmp_path / "merged.parquet"
    ray_opts = [
        "--ray",
        "--actors",
        "2",
        "--chunk-size",
        "16",
        "--ray-batch-size",
        "8",
        "--merge",
        str(merged),
    ]
    assert main(label_argv(model, head, pairs_file, shards, *ray_opts)) == 0
    assert "4 of 4 shards in this run on 2 Ray actor(s)" in capsys.readouterr().out

    expected = read_teacher_outputs(single)
    got = read_shards(shards)
    assert list(got) == [p.key for p in pairs]  # distinct pairs, input order
    want = np.stack([expected[p.key] for p in pairs])
    have = np.stack([got[p.key] for p in pairs])
    np.testing.assert_allclose(have, want, atol=1e-6)
    np.testing.assert_array_equal(have.argmax(axis=1), want.argmax(axis=1))
    # The teacher the actors built is the tuned teacher itself.
    llm, tok = load_llm(model)
    direct = ProbeTeacher(llm, tok, ProbeHead.load(head)).predict_proba(pairs)
    np.testing.assert_allclose(have, direct, atol=1e-6)

    names = sorted(p.name for p in shards.iterdir())
    assert names == [PLAN_NAME, "provenance.json", *(f"shard-{i:05d}.parquet" for i in range(4))]
    for i in range(4):  # every shard is a teacher file of its slice of the pairs
        assert list(read_teacher_outputs(shard_path(shards, i))) == [
            p.key for p in pairs[16 * i : 16 * i + 16]
        ]
    meta = json.loads((shards / "provenance.json").read_text())
    single_meta = read_provenance(single)
    assert single_meta is not None
    assert meta["name"] == single_meta["name"] and meta["kind"] == "llm"
    assert meta["model_sha256"] == single_meta["model_sha256"] and meta["ray"]["actors"] == 2
    merged_out = read_teacher_outputs(merged)
    assert list(merged_out) == list(got)
    np.testing.assert_array_equal(np.stack(list(merged_out.values())), have)


def test_rerun_grades_only_the_shards_not_on_disk(teacher_files, tmp_path: Path) -> None:
    model, head = teacher_files
    spec = TeacherSpec(model=str(model), head=str(head), batch_size=4)
    pairs = text_pairs(30, seed=2)
    out = tmp_path / "shards"
    options = RayOptions(actors=1, batch_size=8)
    first = label_pairs_ray(spec, pairs, out, shard_size=10, options=options)
    assert (first.n_pairs, first.n_shards, first.shards_labeled, first.resumed) == (30, 3, 3, False)
    before = read_shards(out)
    kept = {i: os.stat(shard_path(out, i)) for i in (0, 2)}

    shard_path(out, 1).unlink()  # as if the run had been killed before shard 1 was written
    stale = out / ".shard-00001.parquet.0123.tmp"  # and mid-write: a temporary, never a shard
    stale.write_bytes(b"half a shard")
    second = label_pairs_ray(spec, pairs, out, shard_size=10, options=options)
    assert (second.shards_labeled, second.resumed) == (1, True)
    assert not stale.exists()
    for i, st in kept.items():  # finished shards are not rewritten
        now = os.stat(shard_path(out, i))
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    after = read_shards(out)
    assert list(after) == list(before)
    np.testing.assert_allclose(np.stack(list(after.values())), np.stack(list(before.values())), atol=1e-6)

    third = label_pairs_ray(spec, pairs, out, shard_size=10, options=options)
    assert (third.shards_labeled, third.resumed) == (0, True)  # nothing to grade, no Ray job

    with pytest.raises(InputError, match="different teacher, pair list or shard size"):
        label_pairs_ray(spec, pairs[:20], out, shard_size=10, options=options)
    with pytest.raises(InputError, match="different teacher, pair list or shard size"):
        label_pairs_ray(spec, pairs, out, shard_size=15, options=options)
    # A shard on disk that is not this shard's pairs was changed outside the run: refused, kept.
    write_teacher_outputs(shard_path(out, 2), pairs[:10], np.full((10, 3), 1 / 3))
    with pytest.raises(DataError, match=r"shard-00002\.parquet holds 10 pairs that are not this shard"):
        label_pairs_ray(spec, pairs, out, shard_size=10, options=options)


# --------------------------------------------------------------------------------------------------
# Bad input files and options: clear errors, before any Ray work


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.jsonl", None, "no such file"),
        ("no_item.csv", "query,text\na,b\n", "missing column(s) 'item'"),
        ("broken.jsonl", '{"query": "a", "item": "b"}\n{"query": oops}\n', "line 2: invalid JSON"),
        ("corrupt.parquet", "not parquet at all", "not a readable Parquet file"),
        ("blank.jsonl", '{"query": "a", "item": "  "}\n', "line 1, field 'item'"),
        ("empty.jsonl", "", "no pairs to label"),
        ("pairs.txt", "a\tb\n", "pairs.txt"),
    ],
)
def test_bad_pairs_files_give_clear_errors(
    teacher_files, tmp_path: Path, capsys, name, text, message
) -> None:
    model, head = teacher_files
    pairs_file = tmp_path / name
    if text is not None:
        pairs_file.write_text(text, encoding="utf-8")
    assert main(label_argv(model, head, pairs_file, tmp_path / "shards", "--ray")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "shards").exists()  # refused before any folder or Ray job


def test_bad_options_give_clear_errors(teacher_files, tmp_path: Path, capsys) -> None:
    model, head = teacher_files
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(4))
    assert main(label_argv(model, head, pairs_file, tmp_path / "out.jsonl.gz", "--actors", "2")) == 2
    assert "--actors only apply with --ray" in capsys.readouterr().err
    assert main(label_argv(model, head, pairs_file, tmp_path / "s", "--ray", "--actors", "0")) == 2
    assert "RayOptions.actors must be an integer >= 1" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert main(label_argv(model, head, pairs_file, tmp_path / "a_file", "--ray")) == 2
    assert "with --ray it must be a folder" in capsys.readouterr().err
    assert main(label_argv(model, tmp_path / "nohead.npz", pairs_file, tmp_path / "s", "--ray")) == 2
    assert "nohead.npz: no such file" in capsys.readouterr().err
    wrong = ProbeHead.load(head)
    for name, bad in [
        ("layer", replace(wrong, layer=7)),
        ("width", replace(wrong, weight=wrong.weight[:, :5])),
    ]:
        bad.save(tmp_path / f"{name}.npz")
    assert main(label_argv(model, tmp_path / "layer.npz", pairs_file, tmp_path / "s", "--ray")) == 2
    assert "the head reads layer 7; this model has 3 hidden states" in capsys.readouterr().err
    assert main(label_argv(model, tmp_path / "width.npz", pairs_file, tmp_path / "s", "--ray")) == 2
    assert "the head reads 5 features; this model's hidden size is 32" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # all refused before a folder or an actor
    with pytest.raises(InputError, match="cpus_per_actor"):
        RayOptions(cpus_per_actor=0)
    with pytest.raises(DataError, match=r"no plan\.json"):
        read_shards(tmp_path)
    (tmp_path / "s2").mkdir()
    write_teacher_outputs(shard_path(tmp_path / "s2", 0), text_pairs(1), np.full((1, 3), 1 / 3))
    assert main(label_argv(model, head, pairs_file, tmp_path / "s2", "--ray")) == 2
    assert "holds shards but no plan.json" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# DASA pool scoring


def test_ray_pool_scores_equal_the_single_process_dasa_scores(teacher_files) -> None:
    model_dir, _ = teacher_files
    llm, tok = load_llm(model_dir)
    train_pairs, pool = text_pairs(40, seed=5), text_pairs(90, seed=6)
    grades = np.arange(40) % 3

    def states(pairs: list[Pair]) -> np.ndarray:
        from tqdm.auto import tqdm

        with tqdm(disable=True) as bar:
            return compute_states(
                llm, tok, pairs, (LAYER,), TEACHER_TEMPLATE, 96, 8, llm.config.pad_token_id, bar
            )[LAYER]

    x_train = states(train_pairs)
    mean, scale = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    train = (x_train - mean) / scale
    expected = detector_scores(train, grades, (states(pool) - mean) / scale, k=5)

    got = pool_scores_ray(
        FeatureSpec(str(model_dir), layer=LAYER),
        train,
        grades,
        pool,
        standardise=(mean, scale),
        k=5,
        return_features=True,
        options=RayOptions(actors=2, batch_size=16),
    )
    for name in ("mahalanobis", "knn"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["combined"], expected["combined"], atol=1e-12)
    np.testing.assert_allclose(got["features"], (states(pool) - mean) / scale, atol=1e-5)
    with pytest.raises(InputError, match="train_labels"):
        pool_scores_ray(FeatureSpec(str(model_dir), layer=LAYER), train, grades[:5], pool)
    with pytest.raises(InputError, match="pool is empty"):
        pool_scores_ray(FeatureSpec(str(model_dir), layer=LAYER), train, grades, [])


def test_a_killed_run_resumes_from_its_shards(teacher_files, tmp_path: Path) -> None:
    """A driver killed mid-run (SIGKILL, on the module's cluster) leaves whole shards only; the rerun
    grades just the rest and the result equals the single-process teacher file."""
    import signal
    import subprocess
    import sys
    import time

    model, head = teacher_files
    pairs = text_pairs(120, seed=9)
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "shards"
    address = ray.get_runtime_context().gcs_address
    opts = ["--ray", address, "--chunk-size", "10", "--ray-batch-size", "2"]
    argv = [sys.executable, "-m", "darl_lite.cli", *label_argv(model, head, pairs_file, out, *opts)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not list(out.glob("shard-*.parquet")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert 1 <= len(done) < 12, done  # killed after the first shard, before the last
    for name in done:  # every shard on disk is whole
        index = int(name[6:11])
        assert list(read_teacher_outputs(out / name)) == [p.key for p in pairs[10 * index : 10 * index + 10]]

    spec = TeacherSpec(model=str(model), head=str(head), batch_size=4)
    result = label_pairs_ray(spec, pairs, out, shard_size=10, options=RayOptions(batch_size=32))
    assert result.resumed and result.shards_labeled == 12 - len(done)
    single = tmp_path / "single.jsonl.gz"
    assert main(label_argv(model, head, pairs_file, single)) == 0
    expected, got = read_teacher_outputs(single), read_shards(out)
    np.testing.assert_allclose(
        np.stack([got[p.key] for p in pairs]), np.stack([expected[p.key] for p in pairs]), atol=1e-6
    )
