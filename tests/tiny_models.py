"""Tiny models and tokenizers built from configs, shared by the tests (no downloads, milliseconds).

A word-level vocabulary over a few dozen words, BERT-style and decoder-style pair templates, and
2-layer, 32-wide BERT and Qwen2 sequence classifiers with 3 grades.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

from darl_lite.types import GRADE_NAMES, Pair

_WORD_TEXT = (
    "szechwan dish food cuisine american chinese city river mountain band album song film actor "
    "novel author country capital president war battle museum painter football club team league "
    "university school language island lake bridge church castle airport company car ship bird "
    "tree flower king queen empire revolution planet star galaxy computer software game"
)
WORDS = tuple(_WORD_TEXT.split())
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>"]
VOCAB = {tok: i for i, tok in enumerate([*SPECIALS, *WORDS, *(f"w{i}" for i in range(120))])}


def _tokenizer(post: processors.TemplateProcessing) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = post
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="<eos>",
    )


def bert_tokenizer() -> PreTrainedTokenizerFast:
    cls_id, sep_id = VOCAB["[CLS]"], VOCAB["[SEP]"]
    return _tokenizer(
        processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    )


def decoder_tokenizer() -> PreTrainedTokenizerFast:
    # LLM style: no BOS/CLS, a separator between query and item, an EOS at the end.
    sep_id, eos_id = VOCAB["[SEP]"], VOCAB["<eos>"]
    return _tokenizer(
        processors.TemplateProcessing(
            single="$A <eos>",
            pair="$A [SEP] $B <eos>",
            special_tokens=[("[SEP]", sep_id), ("<eos>", eos_id)],
        )
    )


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,  # deterministic, fast-converging training in few steps
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        pad_token_id=0,
        id2label=dict(enumerate(GRADE_NAMES)),
        label2id={n: i for i, n in enumerate(GRADE_NAMES)},
    )
    return BertForSequenceClassification(config).eval()


def tiny_qwen(pad_token_id: int | None = 0) -> Qwen2ForSequenceClassification:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        num_labels=3,
        pad_token_id=pad_token_id,
        eos_token_id=VOCAB["<eos>"],
    )
    return Qwen2ForSequenceClassification(config).eval()


def toy_pairs(n: int = 48, seed: int = 0) -> list[Pair]:
    """Grade 2 when the item repeats the query word, 1 when it shares a 'topic' half, else 0."""
    rng = np.random.default_rng(seed)
    half = len(WORDS) // 2
    pairs = []
    for i in range(n):
        q = int(rng.integers(len(WORDS)))
        grade = i % 3
        if grade == 2:
            item = f"{WORDS[q]} {WORDS[(q + 1) % len(WORDS)]}"
        elif grade == 1:
            same = [w for j, w in enumerate(WORDS) if (j < half) == (q < half) and j != q]
            item = " ".join(rng.choice(same, size=2 + i % 2))
        else:
            other = [w for j, w in enumerate(WORDS) if (j < half) != (q < half)]
            item = " ".join(rng.choice(other, size=1 + i % 3))
        pairs.append(Pair(WORDS[q], item, grade=grade, query_id=f"q{q}"))
    return pairs
