"""Token ids of query–item pairs, each distinct query tokenised once.

A request is one query and many items. Tokenising every ``(query, item)`` pair re-tokenises the
query for every item; here the distinct queries and the items are tokenised on their own (without
special tokens), then each pair is assembled the way the tokenizer itself would: its own
post-processor's special tokens and type ids (read from the tokenizer once, at load) around the two
pieces, cut by tokenizers' ``longest_first`` rule (``tokenizers/src/utils/truncation.rs``). The ids are
identical to ``Tokenizer.encode_batch`` on the pairs (tested on every shipped pair and on long
synthetic ones); it halves the tokenizer's work for a 100-item request, which matters because
tokenising runs on the same cores right after onnxruntime's threads.

A tokenizer whose pair layout is not ``prefix, query, middle, item, suffix`` with one type id per
piece falls back to tokenising whole pairs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from tokenizers import Encoding, Tokenizer

from darl_lite.errors import BundleError

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
#: Probe texts whose pair encoding reveals the post-processor's layout.
_PROBE = ("query", "item")


@dataclass(frozen=True)
class TokenRows:
    """Per pair: token ids and type ids after truncation and special tokens, in input order."""

    ids: list[list[int]]
    type_ids: list[list[int]]
    lengths: NDArray[np.int64]  # (N,)
    truncated: NDArray[np.bool_]  # (N,) the tokenizer cut tokens to fit max_length


@dataclass(frozen=True)
class PairTemplate:
    """Special tokens around the two pieces and the type id of every position (from the tokenizer)."""

    prefix: list[int]
    middle: list[int]
    suffix: list[int]
    prefix_types: list[int]
    middle_types: list[int]
    suffix_types: list[int]
    query_type: int
    item_type: int

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    @classmethod
    def learn(cls, tokenizer: Tokenizer, pieces: Tokenizer) -> PairTemplate | None:
        """Read the layout from one encoded probe pair; None when it is not the expected shape."""
        pair = tokenizer.encode(*_PROBE)
        query = pieces.encode(_PROBE[0], add_special_tokens=False)
        item = pieces.encode(_PROBE[1], add_special_tokens=False)
        sequence = pair.sequence_ids
        ids, types = pair.ids, pair.type_ids
        q_at = [i for i, s in enumerate(sequence) if s == 0]
        i_at = [i for i, s in enumerate(sequence) if s == 1]
        if not q_at or not i_at or q_at != list(range(q_at[0], q_at[0] + len(q_at))):
            return None
        if i_at != list(range(i_at[0], i_at[0] + len(i_at))) or i_at[0] < q_at[-1]:
            return None
        if [ids[i] for i in q_at] != query.ids or [ids[i] for i in i_at] != item.ids:
            return None
        q_types, i_types = {types[i] for i in q_at}, {types[i] for i in i_at}
        if len(q_types) != 1 or len(i_types) != 1:
            return None
        a, b, c, d = q_at[0], q_at[-1] + 1, i_at[0], i_at[-1] + 1
        return cls(
            prefix=ids[:a],
            middle=ids[b:c],
            suffix=ids[d:],
            prefix_types=types[:a],
            middle_types=types[b:c],
            suffix_types=types[d:],
            query_type=q_types.pop(),
            item_type=i_types.pop(),
        )


def longest_first(n_query: int, n_item: int, budget: int) -> tuple[int, int]:
    """Tokens kept of each piece under tokenizers' ``longest_first`` rule for ``budget`` tokens."""
    if n_query + n_item <= budget:
        return n_query, n_item
    swap = n_query > n_item
    short, long_ = (n_item, n_query) if swap else (n_query, n_item)
    long_ = short if short > budget else max(short, budget - short)
    if short + long_ > budget:
        short = budget // 2
        long_ = short + budget % 2
    return (long_, short) if swap else (short, long_)


class PairEncoder:
    """Pairs to token rows for one tokenizer and ``max_length``; thread-safe (no state per call)."""

    def __init__(self, tokenizer_path: str | os.PathLike[str], max_length: int) -> None:
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
            self._pieces = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise BundleError(f"tokenizers cannot load {tokenizer_path}: {exc}") from exc
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length, strategy="longest_first")
        self._pieces.no_padding()
        self._pieces.no_truncation()
        self.max_length = max_length
        self.template = PairTemplate.learn(self.tokenizer, self._pieces)
        # tokenizers >= 0.21 skips the character offsets (unused here) in encode_batch_fast.
        self._batch = getattr(self._pieces, "encode_batch_fast", self._pieces.encode_batch)
        self._pair_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)

    def encode(self, queries: Sequence[str], items: Sequence[str]) -> TokenRows:
        """Token rows of pairs ``(queries[i], items[i])``; lone surrogates are scored as U+FFFD."""
        try:
            return self._encode(queries, items)
        except TypeError:
            # A lone surrogate (e.g. from a bad UTF-16 decode) cannot cross into Rust: score the
            # text with U+FFFD in its place, as a UTF-8 decoder with errors="replace" would.
            return self._encode(
                [_LONE_SURROGATE.sub("\ufffd", q) for q in queries],
                [_LONE_SURROGATE.sub("\ufffd", t) for t in items],
            )

    def _encode(self, queries: Sequence[str], items: Sequence[str]) -> TokenRows:
        if self.template is None or self.template.n_special >= self.max_length:
            return self._whole_pairs(queries, items)
        t = self.template
        distinct = list(dict.fromkeys(queries))
        query_ids = dict(
            zip(distinct, (e.ids for e in self._batch(distinct, add_special_tokens=False)), strict=True)
        )
        item_ids = [e.ids for e in self._batch(list(items), add_special_tokens=False)]
        budget = self.max_length - t.n_special
        n = len(items)
        ids: list[list[int]] = []
        type_ids: list[list[int]] = []
        truncated = np.zeros(n, bool)
        for k, (query, item) in enumerate(zip(queries, item_ids, strict=True)):
            q = query_ids[query]
            kq, ki = longest_first(len(q), len(item), budget)
            if kq < len(q) or ki < len(item):
                truncated[k] = True
                q, item = q[:kq], item[:ki]
            ids.append(t.prefix + q + t.middle + item + t.suffix)
            type_ids.append(
                t.prefix_types + [t.query_type] * kq + t.middle_types + [t.item_type] * ki + t.suffix_types
            )
        lengths = np.fromiter(map(len, ids), np.int64, n)
        return TokenRows(ids, type_ids, lengths, truncated)

    def _whole_pairs(self, queries: Sequence[str], items: Sequence[str]) -> TokenRows:
        encodings: list[Encoding] = self._pair_batch(list(zip(queries, items, strict=True)))
        n = len(encodings)
        return TokenRows(
            [e.ids for e in encodings],
            [e.type_ids for e in encodings],
            np.fromiter((len(e.ids) for e in encodings), np.int64, n),
            np.fromiter((len(e.overflowing) > 0 for e in encodings), bool, n),
        )
