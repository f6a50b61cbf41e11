"""Stages 2-3 of the teacher recipe on a tiny random Qwen2 (4 blocks, 32 wide): seconds in all.

* the block runner and the cut cache give exactly the model's own ``hidden_states``;
* the cache resumes chunk by chunk and refuses another spec;
* WiSE-FT at α = 0 is stage 1 and at α = 1 stage 2 (real forward passes);
* the whole ``teacher-stages`` run, interrupted in the cache and in stage 2 and resumed, redoes no
  finished chunk or checkpointed step and ends where an uninterrupted run ends; the served
  :class:`StagedTeacher` reproduces the teacher file it wrote.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import VOCAB, WORDS, decoder_tokenizer  # noqa: E402
from transformers import Qwen2Config, Qwen2ForSequenceClassification  # noqa: E402

from darl_lite.datasets import Splits  # noqa: E402
from darl_lite.distill.backbone import collate, tokenize_pairs  # noqa: E402
from darl_lite.distill.cut_cache import cache_cut_states, lower_pass  # noqa: E402
from darl_lite.distill.decoder_blocks import DecoderParts, last_token  # noqa: E402
from darl_lite.distill.llm_features import TEACHER_TEMPLATE, distinct_pairs  # noqa: E402
from darl_lite.distill.llm_teacher import ProbeConfig, ProbeHead  # noqa: E402
from darl_lite.distill.staged_teacher import StagedTeacher, load_top  # noqa: E402
from darl_lite.distill.teacher_stages import Hooks, StagesConfig, run_teacher_stages  # noqa: E402
from darl_lite.distill.top_tune import (  # noqa: E402
    TopConfig,
    TopModel,
    head_arrays,
    predict_logits,
    set_interpolation,
    train_top,
)
from darl_lite.errors import InputError  # noqa: E402
from darl_lite.teacher_file import read_provenance, read_teacher_outputs  # noqa: E402
from darl_lite.types import Pair  # noqa: E402

N_LAYERS = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_qwen4() -> Qwen2ForSequenceClassification:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        num_labels=3,
        pad_token_id=0,
        eos_token_id=VOCAB["<eos>"],
    )
    return Qwen2ForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def llm():
    return tiny_qwen4(), decoder_tokenizer()


def text_pairs(n: int, prefix: str, seed: int) -> list[Pair]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        query = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
        item = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 10))))
        out.append(
            Pair(
                f"{query} w{i % 120}",
                f"{item} {prefix}{i}",
                grade=int(rng.integers(0, 3)),
                query_id=f"{prefix}q{i % 5}",
            )
        )
    return out


def tiny_splits() -> Splits:
    sizes = {"train": 48, "dev": 20, "id_test": 16, "ood_train": 24, "ood_dev": 16, "ood_test": 16}
    return Splits(**{name: tuple(text_pairs(n, name, seed)) for seed, (name, n) in enumerate(sizes.items())})


def encode(tok, pairs):
    enc = tokenize_pairs(tok, pairs, 96, token_type_ids=False, template=TEACHER_TEMPLATE)
    return collate([{"input_ids": e["input_ids"]} for e in enc], 0)


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cut", "layer"), [(1, 3), (0, N_LAYERS), (2, 2)])
def test_block_runner_and_top_model_give_the_models_hidden_states(llm, cut: int, layer: int) -> None:
    model, tok = llm
    inputs = encode(tok, text_pairs(7, "x", seed=3))
    mask = inputs["attention_mask"]
    parts = DecoderParts.of(model)
    with torch.no_grad():
        ref = model.model(**inputs, output_hidden_states=True).hidden_states
        states, probe = lower_pass(parts, inputs["input_ids"], mask, cut, layer)
        head = ProbeHead(
            layer,
            np.zeros(32, np.float32),
            np.ones(32, np.float32),
            np.zeros((3, 32), np.float32),
            np.zeros(3, np.float32),
        )
        top = TopModel(parts, cut, layer, head)
        from_cut = top.features(states, mask)
    real = mask.bool()
    assert mask.min() == 0  # the batch is padded
    np.testing.assert_allclose(states[real].numpy(), ref[cut][real].numpy(), atol=1e-6)
    np.testing.assert_allclose(probe.numpy(), last_token(ref[layer], mask).numpy(), atol=1e-5)
    np.testing.assert_allclose(from_cut.numpy(), last_token(ref[layer], mask).numpy(), atol=1e-5)


def test_cut_cache_resumes_chunk_by_chunk_and_refuses_another_spec(llm, tmp_path: Path) -> None:
    model, tok = llm
    pairs = text_pairs(20, "c", seed=4)
    kw = {
        "model_sha256": "tiny",
        "cut": 1,
        "probe_layer": 3,
        "chunk_size": 6,
        "batch_size": 4,
        "compute_dtype": "float32",
        "progress": False,
    }
    full = cache_cut_states(model, tok, pairs, tmp_path / "full", **kw)
    written: list[int] = []

    def stop_after_two(index: int) -> None:
        written.append(index)
        if len(written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_cut_states(model, tok, pairs, tmp_path / "part", on_chunk=stop_after_two, **kw)
    first = (tmp_path / "part" / "chunk-00000.npz").stat().st_mtime_ns
    again: list[int] = []
    resumed = cache_cut_states(model, tok, pairs, tmp_path / "part", on_chunk=again.append, **kw)
    assert written == [0, 1] and again == [2, 3]  # finished chunks are not redone
    assert (tmp_path / "part" / "chunk-00000.npz").stat().st_mtime_ns == first
    np.testing.assert_array_equal(resumed.states, full.states)
    np.testing.assert_array_equal(resumed.probe, full.probe)
    assert full.states.dtype == np.float16 and len(full) == 20
    with pytest.raises(InputError, match="cut"):
        cache_cut_states(model, tok, pairs, tmp_path / "full", **{**kw, "cut": 2})


def test_interpolation_at_zero_is_stage_one_and_at_one_stage_two(llm, tmp_path: Path) -> None:
    model, tok = llm
    pairs = text_pairs(24, "i", seed=5)
    cache = cache_cut_states(
        model,
        tok,
        pairs,
        tmp_path / "cache",
        model_sha256="tiny",
        cut=1,
        probe_layer=3,
        compute_dtype="float32",
        storage_dtype="float32",
        progress=False,
    )
    rng = np.random.default_rng(0)
    head1 = ProbeHead(
        3,
        cache.probe.mean(0),
        cache.probe.std(0) + 1e-6,
        rng.normal(size=(3, 32)).astype(np.float32),
        np.zeros(3, np.float32),
        1.0,
    )
    top = TopModel(DecoderParts.of(model), 1, 3, head1, rank=4, seed=0)
    rows = np.arange(len(pairs))
    grades = np.asarray([p.grade for p in pairs])
    cfg = TopConfig(rank=4, lr=5e-2, head_lr=5e-2, batch_size=8, epochs=2, compute_dtype="float32")
    outcome = train_top(top, cache, rows, grades, cfg, tmp_path / "ckpt", progress=False)
    assert outcome.steps == 6
    with pytest.raises(InputError, match="another stage-2 configuration"):
        train_top(top, cache, rows, grades, replace(cfg, lr=1e-3), tmp_path / "ckpt", progress=False)
    stage2 = predict_logits(top, cache, rows, compute_dtype="float32")
    head2 = head_arrays(top)
    assert not np.allclose(head2[0], head1.weight)  # training moved the head and the blocks
    set_interpolation(top, head1, head2, 0.0)
    at0 = predict_logits(top, cache, rows, compute_dtype="float32")
    np.testing.assert_allclose(at0, head1.logits(cache.probe), atol=1e-4)
    set_interpolation(top, head1, head2, 1.0)
    np.testing.assert_allclose(predict_logits(top, cache, rows, compute_dtype="float32"), stage2, atol=1e-6)
    set_interpolation(top, head1, head2, 0.5)
    half = predict_logits(top, cache, rows, compute_dtype="float32")
    assert not np.allclose(half, stage2, atol=1e-3) and not np.allclose(half, at0, atol=1e-3)
    with pytest.raises(InputError, match="alpha"):
        set_interpolation(top, head1, head2, 1.5)


def _config() -> StagesConfig:
    return StagesConfig(
        seeds=(0, 1),
        cut=1,
        layer=3,
        chunk_size=40,
        cache_batch_size=8,
        eval_batch_size=16,
        compute_dtype="float32",
        storage_dtype="float32",
        alpha_grid=(0.5,),
        probe=ProbeConfig(epochs=3, augment_budget=6, per_query_cap=None, batch_size=32),
        top=TopConfig(rank=4, lr=1e-2, head_lr=1e-2, batch_size=8, checkpoint_every=2),
    )


def test_whole_run_interrupted_and_resumed_equals_an_uninterrupted_run(llm, tmp_path: Path) -> None:
    model, tok = llm
    model_dir = tmp_path / "llm"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    splits = tiny_splits()
    kw = {"progress": False, "ablation": False}
    plain = run_teacher_stages(splits, model_dir, tmp_path / "plain", _config(), **kw)

    chunks: list[int] = []
    steps: list[int] = []

    def chunk_hook(index: int) -> None:
        chunks.append(index)
        if index == 1:
            raise KeyboardInterrupt

    def step_hook(step: int) -> None:
        steps.append(step)
        if step == 3 and len(steps) == 3:
            raise KeyboardInterrupt

    hooks = Hooks(on_chunk=chunk_hook, on_step=step_hook)
    out = tmp_path / "resumed"
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            run_teacher_stages(splits, model_dir, out, _config(), hooks=hooks, **kw)
    assert chunks == [0, 1, 2, 3]  # the second run computed only the missing chunks
    assert steps == [1, 2, 3]
    resumed = run_teacher_stages(splits, model_dir, out, _config(), hooks=hooks, **kw)
    n_steps = plain.per_seed[0]["1+2"]["steps"]
    assert steps[3] == 3 and steps[3 : 3 + n_steps - 2] == list(range(3, n_steps + 1))  # from checkpoint 2
    assert resumed.per_seed[0]["1+2"]["resumed_from"] == 2
    assert resumed.chosen == plain.chosen
    for seed in (0, 1):
        for stage in ("1", "1+2", "1+2+3"):
            for split, values in plain.per_seed[seed][stage]["metrics"].items():
                assert resumed.per_seed[seed][stage]["metrics"][split] == pytest.approx(values)
    a, b = read_teacher_outputs(plain.teacher_file), read_teacher_outputs(resumed.teacher_file)
    keys = list(a)
    np.testing.assert_allclose(np.stack([a[k] for k in keys]), np.stack([b[k] for k in keys]), atol=1e-6)
    assert len(keys) == len(distinct_pairs(splits))
    assert (out / "stage_table.md").read_text(encoding="utf-8").count("±") > 10

    # The served teacher grades pairs exactly as the teacher file was produced.
    provenance = read_provenance(resumed.teacher_file)
    assert provenance is not None and provenance["head"] == "teacher_llm_top.npz"
    teacher = StagedTeacher.from_files(model_dir, resumed.top_file, batch_size=5)
    pairs = distinct_pairs(splits)[:30]
    np.testing.assert_allclose(teacher.predict_proba(pairs), np.stack([b[p.key] for p in pairs]), atol=1e-5)
    assert teacher.predict_proba([]).shape == (0, 3)


def test_top_file_errors_name_the_file(llm, tmp_path: Path) -> None:
    model, _ = llm
    bad = tmp_path / "top.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="staged-teacher file"):
        load_top(bad, DecoderParts.of(model))
    np.savez(tmp_path / "other.npz", layer=np.int64(3))
    with pytest.raises(InputError, match="format"):
        load_top(tmp_path / "other.npz", DecoderParts.of(model))
    with pytest.raises(InputError, match="cut"):
        TopModel(DecoderParts.of(model), 3, 1, replace(_head(), layer=1))


def _head() -> ProbeHead:
    return ProbeHead(
        3,
        np.zeros(32, np.float32),
        np.ones(32, np.float32),
        np.zeros((3, 32), np.float32),
        np.zeros(3, np.float32),
    )


def test_cli_parses_teacher_stages() -> None:
    from darl_lite.cli import build_parser

    args = build_parser().parse_args(
        ["distill", "teacher-stages", "--out", "x", "--seeds", "0", "1", "--cut", "0", "--device", "cuda"]
    )
    assert args.seeds == [0, 1] and args.cut == 0 and args.device == "cuda" and callable(args.handler)


def test_subsample_keeps_whole_queries_and_reaches_the_cap() -> None:
    from darl_lite.distill.teacher_stages import subsample_splits

    splits = tiny_splits()
    small = subsample_splits(splits, (("train", 20), ("dev", 5)))
    assert 20 <= len(small.train) < 48 and 5 <= len(small.dev) < 20
    assert small.ood_test == splits.ood_test  # splits without a cap are kept whole
    for part, full in ((small.train, splits.train), (small.dev, splits.dev)):
        kept = {p.query_id for p in part}
        assert [p for p in full if p.query_id in kept] == list(part)  # whole queries, in order
    assert subsample_splits(splits, (("train", 20),)) == small.__class__(
        **{**small.__dict__, "dev": splits.dev}
    )
    with pytest.raises(InputError, match="unknown splits"):
        subsample_splits(splits, (("valid", 3),))


@pytest.mark.slow
def test_real_teacher_top_blocks_from_the_cut_give_its_hidden_states() -> None:
    """The real Qwen2.5-Coder-0.5B: cut-16 states + blocks 16-17 = hidden_states[18] (fp32)."""
    from darl_lite.distill.teacher_fetch import default_cache_dir
    from darl_lite.distill.teacher_tune import load_llm

    folder = default_cache_dir()
    if not (folder / "config.json").exists():
        pytest.skip("the teacher LLM is not fetched (darl-lite distill fetch-teacher)")
    model, tok = load_llm(folder)
    inputs = encode(
        tok, [Pair("szechwan cuisine", "Mapo doufu"), Pair("river in europe", "Danube flows east")]
    )
    mask = inputs["attention_mask"]
    parts = DecoderParts.of(model)
    with torch.no_grad():
        ref = model.model(**inputs, output_hidden_states=True).hidden_states
        states, probe = lower_pass(parts, inputs["input_ids"], mask, 16, 18)
        top = TopModel(
            parts,
            16,
            18,
            replace(
                _head(),
                mean=np.zeros(896, np.float32),
                scale=np.ones(896, np.float32),
                weight=np.zeros((3, 896), np.float32),
                layer=18,
            ),
        )
        from_cut = top.features(states, mask)
    expected = last_token(ref[18], mask).numpy()
    np.testing.assert_allclose(probe.numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(from_cut.numpy(), expected, atol=1e-3)
