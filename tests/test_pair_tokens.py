"""Pairs assembled from separately tokenised queries and items equal the tokenizer's own pair
encoding: ids, type ids and the truncation flag, on real pairs, long synthetic ones and other layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_models import VOCAB, WORDS, _tokenizer, bert_tokenizer, decoder_tokenizer
from tokenizers import Tokenizer, processors

from darl_lite.datasets import Splits
from darl_lite.distill.backbone import minilm_path
from darl_lite.pair_tokens import PairEncoder, longest_first


def _reference(path: Path, max_length: int, queries: list[str], items: list[str]) -> list:
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_length, strategy="longest_first")
    return tok.encode_batch(list(zip(queries, items, strict=True)))


def _assert_same(path: Path, max_length: int, queries: list[str], items: list[str]) -> PairEncoder:
    encoder = PairEncoder(path, max_length)
    rows = encoder.encode(queries, items)
    expected = _reference(path, max_length, queries, items)
    for k, e in enumerate(expected):
        assert rows.ids[k] == e.ids, (k, queries[k], items[k])
        assert rows.type_ids[k] == e.type_ids, (k, queries[k], items[k])
        assert rows.truncated[k] == (len(e.overflowing) > 0), (k, queries[k], items[k])
        assert rows.lengths[k] == len(e.ids)
    return encoder


@pytest.fixture(scope="module")
def minilm_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True).backend_tokenizer.save(str(path))
    return path


@pytest.mark.parametrize("max_length", [64, 16, 8])
def test_every_shipped_pair_matches_the_tokenizer(
    minilm_tokenizer: Path, splits: Splits, max_length: int
) -> None:
    pairs = [p for split in (splits.train, splits.dev, splits.id_test, splits.ood_test) for p in split]
    queries, items = [p.query for p in pairs], [p.item for p in pairs]
    encoder = _assert_same(minilm_tokenizer, max_length, queries, items)
    assert encoder.template is not None  # the fast path ran, not the whole-pair fallback
    if max_length == 16:  # the short budget really truncates, on both sides
        rows = encoder.encode(queries, items)
        assert 0.1 < rows.truncated.mean() < 1.0


def test_long_and_odd_pairs_match_the_tokenizer(minilm_tokenizer: Path) -> None:
    rng = np.random.default_rng(0)
    words = ["search", "relevance", "naïve", "Zürich", "東京", "grading", "unbelievable", "x", "!!", "42"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words, size=n)) if n else "\u200b"  # zero-width: no tokens

    sizes = [0, 1, 2, 3, 5, 8, 13, 21, 30, 31, 32, 33, 60, 61, 62, 64, 90]
    queries = [text(a) for a in sizes for _ in sizes]
    items = [text(b) for _ in sizes for b in sizes]
    for max_length in (64, 32, 7):
        _assert_same(minilm_tokenizer, max_length, queries, items)


def test_many_queries_in_one_call_keep_each_pair_aligned(minilm_tokenizer: Path, splits: Splits) -> None:
    pairs = list(splits.ood_test[:300])
    rng = np.random.default_rng(1)
    order = rng.permutation(len(pairs))  # queries interleaved, not grouped
    _assert_same(minilm_tokenizer, 24, [pairs[i].query for i in order], [pairs[i].item for i in order])


def test_longest_first_matches_tokenizers_own_table() -> None:
    # tokenizers/src/utils/truncation.rs, truncate_encodings_longest_first (max_length 7)
    table = {
        (0, 0): (0, 0), (0, 2): (0, 2), (0, 4): (0, 4), (0, 8): (0, 7),
        (2, 0): (2, 0), (2, 2): (2, 2), (2, 4): (2, 4), (2, 8): (2, 5),
        (4, 0): (4, 0), (4, 2): (4, 2), (4, 4): (3, 4), (4, 8): (3, 4),
        (8, 0): (7, 0), (8, 2): (5, 2), (8, 4): (4, 3), (8, 8): (3, 4),
    }  # fmt: skip
    for (n1, n2), kept in table.items():
        assert longest_first(n1, n2, 7) == kept, (n1, n2)


@pytest.mark.parametrize(
    "make",
    [
        bert_tokenizer,
        decoder_tokenizer,
        lambda: _tokenizer(  # RoBERTa / XLM-R layout: two separators in the middle, one type id
            processors.TemplateProcessing(
                single="[CLS] $A [SEP]",
                pair="[CLS] $A [SEP] [SEP] $B [SEP]",
                special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])],
            )
        ),
    ],
    ids=["bert", "decoder", "roberta"],
)
def test_other_pair_layouts(make, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    make().backend_tokenizer.save(str(path))
    rng = np.random.default_rng(2)
    queries = [" ".join(rng.choice(WORDS, size=k)) for k in rng.integers(1, 30, size=200)]
    items = [" ".join(rng.choice(WORDS, size=k)) for k in rng.integers(1, 40, size=200)]
    encoder = _assert_same(path, 24, queries, items)
    assert encoder.template is not None


def test_a_tokenizer_without_special_tokens_or_a_known_layout(tmp_path: Path) -> None:
    plain = bert_tokenizer().backend_tokenizer
    plain.post_processor = None  # pairs are just the two pieces, type ids all 0
    path = tmp_path / "plain.json"
    plain.save(str(path))
    queries, items = ["city river " * 10] * 20, [f"song {'album ' * k}" for k in range(20)]
    _assert_same(path, 16, queries, items)
    # item before query: not the layout the fast path assembles, so whole pairs are tokenised
    swapped = bert_tokenizer().backend_tokenizer
    swapped.post_processor = processors.TemplateProcessing(
        single="$A", pair="$B:1 [SEP] $A", special_tokens=[("[SEP]", VOCAB["[SEP]"])]
    )
    path = tmp_path / "swapped.json"
    swapped.save(str(path))
    encoder = _assert_same(path, 16, queries, items)
    assert encoder.template is None


def test_lone_surrogates_are_scored_as_replacement_characters(minilm_tokenizer: Path) -> None:
    encoder = PairEncoder(minilm_tokenizer, 32)
    rows = encoder.encode(["bad \ud800 query"], ["item \udfff text"])
    clean = encoder.encode(["bad \ufffd query"], ["item \ufffd text"])
    assert rows.ids == clean.ids
