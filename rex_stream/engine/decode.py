"""Positive links of one forward → extracted spans, with the reference's rules and order.

A (prefix, type) slot whose `[TYPE]` token is T gets the span (h, t) of the text iff three
links fire: span h→t (h ≤ t), head h→T and tail T→t. Hits are ordered by span (row-major over
the positive links), then by the slot's position in the hint. Offsets are character offsets into
the text as it stood when this forward was built. Any lookup the reference would fail on (an
empty text, a span running past the end) drops that hit, as the reference's `try` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .prompt import Slot

Result = list[dict[str, Any]]


@dataclass
class Links:
    """What the device sends back for one forward.

    `pairs` are the (row, col) links with logit > 0 in the decodable region, row-major;
    `score_t[k]` is the label score at the transposed position (col, row) — the reference reads
    its confidences there. For classification, `cls_row`/`cls_col` hold the scores of row and
    column `num_hint_tokens` up to that index (the "blank" pass scores every label from them).
    What a score is (raw logit or sigmoid) is the runner's `cls_score` setting.
    """

    pairs: np.ndarray
    score_t: np.ndarray
    cls_row: np.ndarray | None = None
    cls_col: np.ndarray | None = None


@dataclass(frozen=True)
class DecodeInput:
    """Everything besides the links that decoding one forward needs."""

    offsets: list[tuple[int, int]]
    num_hint_tokens: int
    hint_offsets: dict[int, int]  # hint character → token index, as the reference maps it
    slots: Mapping[Slot, int]  # slot → character of its [TYPE] in the hint
    text: str


class Hit(NamedTuple):
    """One extracted span for one slot (a named tuple: decoding makes many of these)."""

    slot: Slot
    span: str
    start: int
    end: int
    confidence: float | None


def hint_char_to_token(offsets: list[tuple[int, int]], num_hint_tokens: int) -> dict[int, int]:
    """Map hint characters to token indices; later tokens overwrite earlier ones like the reference."""
    return {offsets[i][0]: i for i in range(num_hint_tokens)}


def _confidence(a: float, b: float, c: float) -> float:
    f32 = np.float32
    return round(float((f32(a) + f32(b) + f32(c)) / f32(3)), 4)


def _span_text(text: str, start: int, end: int) -> tuple[str, int] | None:
    try:
        while text[start] == " ":
            start += 1
    except IndexError:
        return None
    return text[start:end], start


def decode_links(inp: DecodeInput, links: Links, with_confidence: bool) -> list[Hit]:
    """All slot hits of one forward in the reference's order.

    Slots are handled by rank (their order in the hint), so the matched slots of a span sort as
    plain ints; the links are split into span/head/tail kinds with one vectorised pass.
    """
    nh = inp.num_hint_tokens
    slots = list(inp.slots)
    rank_of_token = {inp.hint_offsets[char]: rank for rank, char in enumerate(inp.slots.values())}
    rows, cols = links.pairs[:, 0], links.pairs[:, 1]
    text_row, text_col = rows >= nh, cols >= nh
    heads: dict[int, dict[int, float]] = {}
    tails: dict[int, dict[int, float]] = {}
    head = text_row & ~text_col
    for row, col, p in zip(rows[head].tolist(), cols[head].tolist(), links.score_t[head].tolist()):
        rank = rank_of_token.get(col)
        if rank is not None:
            heads.setdefault(row, {})[rank] = p
    tail = text_col & ~text_row
    for row, col, p in zip(rows[tail].tolist(), cols[tail].tolist(), links.score_t[tail].tolist()):
        rank = rank_of_token.get(row)
        if rank is not None:
            tails.setdefault(col, {})[rank] = p
    span = text_row & text_col & (rows <= cols)
    hits: list[Hit] = []
    text, offsets = inp.text, inp.offsets
    for first, last, span_p in zip(rows[span].tolist(), cols[span].tolist(), links.score_t[span].tolist()):
        head_ranks = heads.get(first)
        tail_ranks = tails.get(last)
        if not head_ranks or not tail_ranks:
            continue
        matched = head_ranks.keys() & tail_ranks.keys()
        if not matched:
            continue
        located = _span_text(text, offsets[first][0], offsets[last][1])
        if located is None:
            continue
        span_text, start = located
        end = offsets[last][1]
        for rank in sorted(matched):
            conf = _confidence(span_p, head_ranks[rank], tail_ranks[rank]) if with_confidence else None
            hits.append(Hit(slots[rank], span_text, start, end, conf))
    return hits


def decode_blank(inp: DecodeInput, links: Links) -> list[Hit]:
    """Handshake pass: every label scored at the marker token, regardless of the threshold."""
    nh = inp.num_hint_tokens
    assert links.cls_row is not None and links.cls_col is not None
    located = _span_text(inp.text, inp.offsets[nh][0], inp.offsets[nh][1])
    if located is None:
        return []
    span, start = located
    end = inp.offsets[nh][1]
    span_p = float(links.cls_row[nh])
    hits = []
    for slot, char in inp.slots.items():
        token = inp.hint_offsets[char]
        conf = _confidence(span_p, float(links.cls_col[token]), float(links.cls_row[token]))
        hits.append(Hit(slot, span, start, end, conf))
    return hits
