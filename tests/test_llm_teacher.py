"""The LLM teacher's CPU recipe on tiny models and synthetic features (seconds in all).

* :mod:`darl_lite.distill.llm_features`: last-token hidden states of a tiny random Qwen2, cached in
  resumable chunks (the head's input, input order, resume, spec check, distinct pairs);
* :mod:`darl_lite.distill.llm_teacher`: the probe head's file, temperature fit, probe training, and
  layer choice / DASA / ablation on a synthetic :class:`Splits` with one informative layer;
* :mod:`darl_lite.distill.teacher_tune`: :class:`ProbeTeacher` against the cached features.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import WORDS, decoder_tokenizer, tiny_qwen  # noqa: E402

from darl_lite.datasets import Splits  # noqa: E402
from darl_lite.distill.llm_features import (  # noqa: E402
    META_NAME,
    TEACHER_TEMPLATE,
    cache_features,
    distinct_pairs,
)
from darl_lite.distill.llm_teacher import (  # noqa: E402
    PROBE_ARMS,
    FeatureTable,
    ProbeConfig,
    ProbeHead,
    _augmentation,
    ablation_markdown,
    fit_temperature,
    probe_ablation,
    summary,
    train_probe,
    tune_probe,
)
from darl_lite.distill.teacher_tune import ProbeTeacher  # noqa: E402
from darl_lite.errors import InputError  # noqa: E402
from darl_lite.types import Pair  # noqa: E402

N_LAYERS = 2  # tiny_qwen: 2 blocks -> 3 hidden states (0 = embeddings, 2 = final-norm output)
LAST = N_LAYERS  # what layer -1 resolves to


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def text_pairs(n: int, seed: int = 0) -> list[Pair]:
    """Distinct pairs of varied lengths over the tiny vocabulary (so batches need padding)."""
    rng = np.random.default_rng(seed)
    out: list[Pair] = []
    for i in range(n):
        query = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
        item = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 10))))
        out.append(Pair(query=f"{query} w{i}", item=item, grade=i % 3, query_id=f"q{i % 4}"))
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is ~100x faster than several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llm():
    return tiny_qwen(), decoder_tokenizer()


def run_cache(llm, pairs, cache_dir, **kwargs):
    model, tok = llm
    options = {"model_sha256": "tiny", "layers": (0, -1), "progress": False, "batch_size": 4, "chunk_size": 4}
    options.update(kwargs)
    return cache_features(model, tok, pairs, cache_dir, **options)


def single_pair_inputs(tok, pair: Pair) -> dict:
    """The pair through the template and the tokenizer directly: one sequence, no padding."""
    return tok(TEACHER_TEMPLATE.format(query=pair.query, item=pair.item), return_tensors="pt")


# --------------------------------------------------------------------------------------------------
# cache_features / distinct_pairs
# --------------------------------------------------------------------------------------------------


def test_last_layer_is_the_heads_input_and_layer_zero_the_embeddings(llm, tmp_path: Path) -> None:
    model, tok = llm
    pairs = text_pairs(9, seed=1)
    features = run_cache(llm, pairs, tmp_path / "cache", layers=(0, -1))
    # Layers come back resolved to hidden_states indices (-1 -> the last one).
    assert set(features) == {0, LAST}
    assert all(v.shape == (9, model.config.hidden_size) and v.dtype == np.float32 for v in features.values())
    for i in (0, 4, 8):
        inputs = single_pair_inputs(tok, pairs[i])
        with torch.no_grad():
            logits = model(**inputs).logits[0]
            from_cache = model.score(torch.from_numpy(features[LAST][i]))
            embedding = model.model.embed_tokens(inputs["input_ids"])[0, -1]
        np.testing.assert_allclose(from_cache.numpy(), logits.numpy(), atol=1e-5)
        np.testing.assert_allclose(features[0][i], embedding.numpy(), atol=1e-6)
    # The vectors depend on the pair (not a constant row).
    assert not np.allclose(features[LAST][0], features[LAST][1])


def test_rows_follow_input_order_whatever_the_batch_size(llm, tmp_path: Path) -> None:
    pairs = text_pairs(11, seed=2)
    base = run_cache(llm, pairs, tmp_path / "b1", batch_size=1, chunk_size=100)
    for n, (batch_size, chunk_size) in enumerate([(3, 5), (4, 4), (16, 11)]):
        other = run_cache(llm, pairs, tmp_path / f"b{n + 2}", batch_size=batch_size, chunk_size=chunk_size)
        for layer in base:
            np.testing.assert_allclose(other[layer], base[layer], atol=1e-5)
    # Reversed input -> reversed rows.
    backwards = run_cache(llm, pairs[::-1], tmp_path / "rev", batch_size=3, chunk_size=5)
    np.testing.assert_allclose(backwards[LAST], base[LAST][::-1], atol=1e-5)


def test_cache_resumes_only_the_missing_chunk(llm, tmp_path: Path) -> None:
    pairs = text_pairs(11, seed=3)
    cache = tmp_path / "cache"
    first = run_cache(llm, pairs, cache, chunk_size=3)
    chunks = sorted(cache.glob("chunk-*.npz"))
    assert [c.name for c in chunks] == [f"chunk-{i:05d}.npz" for i in range(4)]  # 3+3+3+2
    assert (cache / META_NAME).exists()
    old = 1_000_000_000 * 10**9  # stamp every chunk far in the past: a rewrite would change it
    for chunk in chunks:
        os.utime(chunk, ns=(old, old))
    chunks[1].unlink()

    second = run_cache(llm, pairs, cache, chunk_size=3)
    assert set(second) == set(first)
    for layer in first:
        np.testing.assert_array_equal(second[layer], first[layer])
    assert chunks[1].exists() and chunks[1].stat().st_mtime_ns != old
    assert [chunks[i].stat().st_mtime_ns for i in (0, 2, 3)] == [old, old, old]
    assert not list(cache.glob("*.tmp*"))

    # A third run reads everything back and writes nothing.
    stamps = {c.name: c.stat().st_mtime_ns for c in chunks}
    third = run_cache(llm, pairs, cache, chunk_size=3)
    np.testing.assert_array_equal(third[LAST], first[LAST])
    assert {c.name: c.stat().st_mtime_ns for c in chunks} == stamps


@pytest.mark.parametrize(
    "change",
    [
        {"template": "query {query} entity {item}"},
        {"layers": (1, -1)},
        {"chunk_size": 5},
        {"max_length": 32},
        {"model_sha256": "another model"},
        {"pairs": "other"},
    ],
    ids=["template", "layers", "chunk_size", "max_length", "model", "pairs"],
)
def test_cache_of_a_different_spec_is_refused(llm, tmp_path: Path, change: dict) -> None:
    pairs = text_pairs(5, seed=4)
    cache = tmp_path / "cache"
    run_cache(llm, pairs, cache)
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    kwargs = dict(change)
    other_pairs = text_pairs(5, seed=5) if kwargs.pop("pairs", None) else pairs
    with pytest.raises(InputError, match="different run"):
        run_cache(llm, other_pairs, cache, **kwargs)
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before  # nothing touched
    # Layers that name the same hidden states are the same spec (-1 == 2 here).
    run_cache(llm, pairs, cache, layers=(LAST, 0, -1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": (N_LAYERS + 1,)}, "layers must lie"),
        ({"layers": (-(N_LAYERS + 2),)}, "layers must lie"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_cache_rejects_bad_arguments(llm, tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        run_cache(llm, text_pairs(2), tmp_path / "cache", **kwargs)


def test_distinct_pairs_keeps_the_first_occurrence_in_split_order() -> None:
    a = Pair("q1", "x", grade=0, query_id="1")
    a_again = Pair("q1", "x", grade=2, query_id="other")  # same texts, other grade and id
    b = Pair("q1", "y", grade=1, query_id="1")
    c = Pair("q2", "x", grade=2, query_id="2")  # same item, other query: distinct
    d = Pair("q3", "z", grade=0, query_id="3")
    splits = Splits(
        train=(a, b, a_again),
        dev=(c, b),
        id_test=(),
        ood_train=(d, a_again),
        ood_dev=(c,),
        ood_test=(d, Pair("q3", "w", grade=1, query_id="3")),
    )
    out = distinct_pairs(splits)
    assert [p.key for p in out] == [("q1", "x"), ("q1", "y"), ("q2", "x"), ("q3", "z"), ("q3", "w")]
    assert out[0] is a and out[0].grade == 0
    assert len({p.key for p in out}) == len(out)


# --------------------------------------------------------------------------------------------------
# ProbeHead, fit_temperature, train_probe, ProbeConfig
# --------------------------------------------------------------------------------------------------


def random_head(hidden: int, layer: int = -1, seed: int = 0, temperature: float = 1.7) -> ProbeHead:
    rng = np.random.default_rng(seed)
    return ProbeHead(
        layer=layer,
        mean=rng.normal(size=hidden).astype(np.float32),
        scale=rng.uniform(0.5, 2.0, size=hidden).astype(np.float32),
        weight=rng.normal(size=(3, hidden)).astype(np.float32),
        bias=rng.normal(size=3).astype(np.float32),
        temperature=temperature,
    )


def test_probe_head_roundtrip_is_exact(tmp_path: Path) -> None:
    head = random_head(7, layer=12, temperature=1.2345678901234)
    path = tmp_path / "head.npz"
    head.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["head.npz"]  # no temporary left
    with zipfile.ZipFile(path) as archive:  # plain arrays, no pickled objects
        assert sorted(archive.namelist()) == sorted(
            f"{k}.npy" for k in ("layer", "mean", "scale", "weight", "bias", "temperature")
        )
    loaded = ProbeHead.load(path)
    assert loaded.layer == 12 and loaded.temperature == head.temperature
    for name in ("mean", "scale", "weight", "bias"):
        got, want = getattr(loaded, name), getattr(head, name)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    x = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict_proba(x), head.predict_proba(x))
    # A name without the .npz suffix works too.
    head.save(tmp_path / "head.bin")
    np.testing.assert_array_equal(ProbeHead.load(tmp_path / "head.bin").weight, head.weight)


def _write_text(path: Path) -> None:
    path.write_text("not a head\n")


def _write_other_npz(path: Path) -> None:
    np.savez(path, layer=np.int64(1), mean=np.zeros(3))  # keys missing


def _write_npy(path: Path) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.zeros(3))


def _write_broken_zip(path: Path) -> None:
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 40)


def _write_empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(None, id="missing"),
        pytest.param(_write_text, id="text"),
        pytest.param(_write_other_npz, id="npz-without-keys"),
        pytest.param(_write_npy, id="npy"),
        pytest.param(_write_broken_zip, id="broken-zip"),
        pytest.param(_write_empty, id="empty"),
    ],
)
def test_probe_head_load_of_a_bad_file_is_an_input_error(tmp_path: Path, write) -> None:
    path = tmp_path / "head.npz"
    if write is not None:
        write(path)
    with pytest.raises(InputError, match="not a probe head file"):
        ProbeHead.load(path)


def test_fit_temperature_recovers_the_scale_of_the_logits() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    true_logits = (rng.normal(size=(n, 3)) * 1.5).astype(np.float32)
    probs = np.exp(true_logits - true_logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    # Grades drawn from softmax(true_logits): T = 1 is the calibrated temperature of true_logits.
    grades = (rng.random(n)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1).astype(np.int64)
    assert grades.min() == 0 and grades.max() == 2
    for k in (2.0, 0.5, 1.0):
        t = fit_temperature(true_logits * k, grades)
        assert abs(np.log(t / k)) < 0.06, (k, t)
    # The search range [0.05, 20] bounds the answer.
    assert fit_temperature(true_logits * 50, grades) == pytest.approx(20.0, rel=1e-3)
    assert fit_temperature(true_logits * 0.01, grades) == pytest.approx(0.05, rel=1e-3)


def separable(n_per_class: int, hidden: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.zeros((3, hidden))
    centres[0, 0] = centres[1, 1] = centres[2, 2] = 5.0
    grades = np.tile(np.arange(3), n_per_class)
    x = centres[grades] + 0.5 * rng.normal(size=(len(grades), hidden)) + 10.0  # off-centre: standardised
    return x.astype(np.float32), grades.astype(np.int64)


@pytest.mark.parametrize("loss", ["ce", "graded"])
def test_train_probe_fits_separable_classes(loss: str) -> None:
    x, y = separable(100)
    config = ProbeConfig(loss=loss, epochs=20, batch_size=32, lr=0.05, seed=3)
    head = train_probe(x, y, config, layer=5)
    assert head.layer == 5 and head.temperature == 1.0
    assert head.weight.shape == (3, 6) and head.bias.shape == (3,) and head.mean.shape == (6,)
    x_test, y_test = separable(50, seed=1)
    probs = head.predict_proba(x_test)
    assert probs.shape == (150, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs.argmax(axis=1) == y_test).mean() >= 0.98
    # Seeded: the same config gives the same head.
    again = train_probe(x, y, config, layer=5)
    np.testing.assert_array_equal(again.weight, head.weight)


def test_train_probe_losses_differ_and_bad_inputs_are_refused() -> None:
    x, y = separable(20)
    ce = train_probe(x, y, ProbeConfig(loss="ce", epochs=3, batch_size=16))
    graded = train_probe(x, y, ProbeConfig(loss="graded", epochs=3, batch_size=16))
    assert not np.array_equal(ce.weight, graded.weight)
    with pytest.raises(InputError, match="as many grades"):
        train_probe(x, y[:-1], ProbeConfig())
    with pytest.raises(InputError, match="as many grades"):
        train_probe(x[:0], y[:0], ProbeConfig())


def test_train_probe_accepts_float64_features() -> None:
    x, y = separable(10)
    head = train_probe(x.astype(np.float64), y, ProbeConfig(epochs=1))
    assert head.weight.dtype == np.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "mse"}, "loss must be"),
        ({"augmentation": "mixup"}, "augmentation must be"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"augment_budget": -1}, "augment_budget"),
    ],
)
def test_probe_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        ProbeConfig(**kwargs)


# --------------------------------------------------------------------------------------------------
# tune_probe / probe_ablation / DASA on a synthetic Splits
# --------------------------------------------------------------------------------------------------

H = 8
INFORMATIVE, NOISE = 1, 3  # the informative layer has the lower index: ties would pick NOISE
BUDGET = 10


def synthetic() -> tuple[Splits, FeatureTable]:
    """Splits of graded pairs and features at two "layers", one informative, one pure noise.

    Informative layer: dims 0-2 place each grade around its own centre; dims 3-7 follow one shared
    factor (plus a little noise), so in-distribution rows span a line there. The ``ood_train`` pool
    holds 60 such rows (6 queries) and 20 planted rows off that line (2 queries, item names
    ``far ...``): two in each of 10 regions ``8·(e_a − e_b)/√2``, a, b in dims 3-7 — directions
    the training data never takes, even after per-dimension standardisation.
    """
    rng = np.random.default_rng(0)
    centres = np.zeros((3, H))
    centres[0, 0] = centres[1, 1] = centres[2, 2] = 3.0
    regions = [(a, b) for a in range(3, H) for b in range(a + 1, H)]
    assert len(regions) == 10
    splits: dict[str, list[Pair]] = {}
    informative: list[np.ndarray] = []

    def add(split: str, n: int, n_queries: int, *, planted: bool = False) -> None:
        prefix = "far " if planted else ""
        for j in range(n):
            grade = j % 3
            qid = f"{split}-{prefix}q{j % n_queries}"
            pair = Pair(query=f"query {qid}", item=f"{prefix}{split} item {j}", grade=grade, query_id=qid)
            splits.setdefault(split, []).append(pair)
            x = np.empty(H)
            x[3:] = rng.normal() + 0.1 * rng.normal(size=H - 3)
            if planted:
                x[:3] = centres[:, :3].mean(axis=0) + rng.normal(size=3)  # ordinary where the grades live
                a, b = regions[j // 2]
                x[a] += 8.0 / np.sqrt(2)
                x[b] -= 8.0 / np.sqrt(2)
            else:
                x[:3] = centres[grade, :3] + rng.normal(size=3)
            informative.append(x)

    add("train", 150, 15)
    add("dev", 60, 6)
    add("id_test", 60, 6)
    add("ood_train", 60, 6)
    add("ood_train", 20, 2, planted=True)
    add("ood_dev", 60, 6)
    add("ood_test", 60, 6)
    split_obj = Splits(**{name: tuple(pairs) for name, pairs in splits.items()})
    pairs = distinct_pairs(split_obj)
    assert len(pairs) == len(informative)  # all keys distinct, in split order as added
    x_inf = np.asarray(informative, np.float32)
    x_noise = rng.normal(size=x_inf.shape).astype(np.float32)
    return split_obj, FeatureTable.build({INFORMATIVE: x_inf, NOISE: x_noise}, pairs)


@pytest.fixture(scope="module")
def synth() -> tuple[Splits, FeatureTable]:
    return synthetic()


BASE = ProbeConfig(epochs=15, batch_size=32, lr=0.02, augment_budget=BUDGET, per_query_cap=4)


def test_feature_table_rows_and_missing_pairs(synth) -> None:
    splits, table = synth
    rows = table.rows(splits.dev[:3])
    assert rows.dtype == np.int64 and rows.tolist() == [150, 151, 152]
    np.testing.assert_array_equal(table.of(INFORMATIVE, splits.dev[:3]), table.features[INFORMATIVE][150:153])
    with pytest.raises(InputError, match="no cached features"):
        table.rows([Pair("nowhere", "nothing")])
    with pytest.raises(InputError, match="rows but there are"):
        FeatureTable.build({0: np.zeros((3, 2), np.float32)}, list(splits.train[:4]))


def test_tune_probe_chooses_the_informative_layer(synth) -> None:
    splits, table = synth
    tuned = tune_probe(table, splits, replace(BASE, augmentation="none"))
    assert tuned.head.layer == INFORMATIVE
    assert set(tuned.dev_by_layer) == {INFORMATIVE, NOISE}
    assert tuned.dev_by_layer[INFORMATIVE] >= 0.9 > 0.6 > tuned.dev_by_layer[NOISE]
    assert tuned.augmented == 0
    assert set(tuned.metrics) == {"dev", "ood_dev", "id_test", "ood_test"}
    assert tuned.metrics["id_test"]["macro_f1"] >= 0.9 and tuned.metrics["ood_test"]["macro_f1"] >= 0.9
    assert 0.25 <= tuned.head.temperature <= 4.0
    info = summary(tuned)
    assert info["layer"] == INFORMATIVE and info["augmented_pairs"] == 0
    assert set(info["dev_macro_f1_by_layer"]) == {str(INFORMATIVE), str(NOISE)}


def test_dasa_picks_the_planted_far_pool_rows(synth) -> None:
    splits, table = synth
    dasa = _augmentation(table, INFORMATIVE, splits, replace(BASE, augmentation="dasa", per_query_cap=None))
    assert len(dasa) == BUDGET and len(set(dasa)) == BUDGET
    assert all(p in splits.ood_train for p in dasa)
    assert all(p.item.startswith("far ") for p in dasa), [p.item for p in dasa]
    # The random control of equal size mostly draws in-distribution rows (60 of the pool's 80).
    rand = _augmentation(table, INFORMATIVE, splits, replace(BASE, augmentation="random", per_query_cap=None))
    assert len(rand) == BUDGET and sum(p.item.startswith("far ") for p in rand) < BUDGET
    # With a cap of 4 per query, the two far queries give 4 each and the rest comes from elsewhere.
    capped = _augmentation(table, INFORMATIVE, splits, replace(BASE, augmentation="dasa", per_query_cap=4))
    assert len(capped) == BUDGET
    per_query: dict[str | None, int] = {}
    for p in capped:
        per_query[p.query_id] = per_query.get(p.query_id, 0) + 1
    assert max(per_query.values()) <= 4
    assert sum(p.item.startswith("far ") for p in capped) == 8
    # No augmentation when the arm has none or the budget is 0.
    assert _augmentation(table, INFORMATIVE, splits, replace(BASE, augmentation="none")) == []
    assert _augmentation(table, INFORMATIVE, splits, replace(BASE, augment_budget=0)) == []
    # A budget above the pool is clipped to the pool.
    everything = _augmentation(
        table,
        INFORMATIVE,
        splits,
        replace(BASE, augmentation="random", augment_budget=10_000, per_query_cap=None),
    )
    assert sorted(p.item for p in everything) == sorted(p.item for p in splits.ood_train)


def test_probe_ablation_runs_every_arm(synth) -> None:
    splits, table = synth
    arms = probe_ablation(table, splits, BASE)
    assert list(arms) == list(PROBE_ARMS)
    for arm, (loss, augmentation) in PROBE_ARMS.items():
        tuned = arms[arm]
        assert tuned.config == replace(BASE, loss=loss, augmentation=augmentation)
        assert tuned.head.layer == INFORMATIVE, arm
        assert tuned.augmented == (0 if augmentation == "none" else BUDGET), arm
        assert tuned.metrics["id_test"]["macro_f1"] >= 0.85, arm
    # The "none" arms differ only in the loss.
    assert not np.array_equal(arms["ce-none"].head.weight, arms["graded-none"].head.weight)
    table_md = ablation_markdown(arms)
    lines = table_md.strip().splitlines()
    assert len(lines) == 2 + len(PROBE_ARMS)
    assert lines[0].startswith("| arm | layer | augmented |")
    for line, (arm, tuned) in zip(lines[2:], arms.items(), strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 9
        assert cells[:3] == [arm, str(INFORMATIVE), str(tuned.augmented)]


# --------------------------------------------------------------------------------------------------
# ProbeTeacher
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [-1, 1])
def test_probe_teacher_matches_the_head_on_cached_features(llm, tmp_path: Path, layer: int) -> None:
    model, tok = llm
    pairs = text_pairs(10, seed=7)
    features = run_cache(llm, pairs, tmp_path / "cache", layers=(layer,), batch_size=3, chunk_size=4)
    (resolved,) = features
    assert resolved == layer % (N_LAYERS + 1)
    head = random_head(model.config.hidden_size, layer=layer, seed=2, temperature=0.8)
    teacher = ProbeTeacher(model, tok, head, name="tiny", batch_size=4)
    assert teacher.kind == "llm" and teacher.name == "tiny"
    probs = teacher.predict_proba(pairs)
    assert probs.shape == (10, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, head.predict_proba(features[resolved]), atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert not np.allclose(probs[0], probs[1])
    # One pair alone gives its row of the batch.
    np.testing.assert_allclose(teacher.predict_proba(pairs[3:4])[0], probs[3], atol=1e-5)
    empty = teacher.predict_proba([])
    assert empty.shape == (0, 3) and empty.dtype == np.float32


def test_probe_teacher_with_a_trained_head_and_a_bad_layer(llm, tmp_path: Path) -> None:
    model, tok = llm
    pairs = text_pairs(12, seed=8)
    features = run_cache(llm, pairs, tmp_path / "cache", layers=(-1,))
    grades = np.asarray([p.grade for p in pairs], np.int64)
    head = train_probe(features[LAST], grades, ProbeConfig(epochs=5, batch_size=4, lr=0.05), layer=LAST)
    head.save(tmp_path / "head.npz")
    teacher = ProbeTeacher(model, tok, ProbeHead.load(tmp_path / "head.npz"))
    np.testing.assert_allclose(teacher.predict_proba(pairs), head.predict_proba(features[LAST]), atol=1e-5)
    with pytest.raises(InputError, match="hidden states"):
        ProbeTeacher(model, tok, replace(head, layer=N_LAYERS + 1))


def test_cli_label_with_a_head_grades_a_pairs_file_with_the_tuned_teacher(llm, tmp_path: Path) -> None:
    """`distill label --model DIR --head HEAD` writes the tuned teacher's grades, with provenance."""
    from darl_lite.cli import main
    from darl_lite.teacher_file import read_provenance, read_teacher_outputs

    model, tok = llm
    model_dir = tmp_path / "llm"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    head = random_head(model.config.hidden_size, layer=1, seed=5)
    head.save(tmp_path / "head.npz")
    pairs = text_pairs(9, seed=11)
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text(
        "".join(json.dumps({"query": p.query, "item": p.item}) + "\n" for p in pairs), encoding="utf-8"
    )
    out = tmp_path / "graded.jsonl.gz"
    argv = ["distill", "label", "--model", str(model_dir), "--head", str(tmp_path / "head.npz")]
    assert main([*argv, "--pairs", str(pairs_file), "--out", str(out), "--batch-size", "4"]) == 0
    outputs = read_teacher_outputs(out)
    expected = ProbeTeacher(model, tok, head).predict_proba(pairs)
    np.testing.assert_allclose(np.stack([outputs[p.key] for p in pairs]), expected, atol=1e-5)
    provenance = read_provenance(out)
    assert provenance is not None
    assert provenance["kind"] == "llm" and provenance["head"] == str(tmp_path / "head.npz")
