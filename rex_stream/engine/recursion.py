"""One request's recursive extraction, written as a generator so many requests advance together.

`solve(request)` yields the list of forwards one schema level needs, receives their links, decodes,
builds the next level, and finally returns the request's output. The scheduler (engine.py) runs
level k of every request in shared batches before any request's level k+1: a wavefront.

Reference behaviours reproduced here (see shared/rex/README.md): prefixes in discovery order,
classification windows with the marker token re-inserted (and the text edited as the reference
edits its working copy), per-chunk classification candidates, the handshake ("blank") pass when
a classification finds nothing, and the final single/multi-label selection.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

from .decode import DecodeInput, Hit, Links, Result, decode_blank, decode_links
from .prompt import Prefix, build_hints
from .tokenizer import CLASSIFY_TOKEN, MULTI_CLASSIFY_TOKEN, Pieces, RexTokenizer, Window

MULTI_LABEL_THRESHOLD = 0.9
INFO_KEY_SEP = "[INFOKEY]"


@dataclass(frozen=True)
class Forward:
    """One model input and what decoding it needs."""

    ids: list[int]
    num_hint_tokens: int
    want_cls_probs: bool


Solver = Generator[list[Forward], list[Links], list[list[Result]]]


def is_leaf_path(schema: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    """Whether `path` is a type path from the root to a leaf of `schema`: only these are ever output.

    The reference builds the set of all such paths per request; following the one path asked about
    gives the same answer without walking the whole schema per request (~3 µs of the ~30 µs of host
    time of a ner message, measured on the development CPU).
    """
    node: Any = schema
    for key in path:
        if not node or key not in node:
            return False
        node = node[key]
    return not node


def task_marker(text: str) -> str | None:
    if CLASSIFY_TOKEN in text:
        return CLASSIFY_TOKEN
    if MULTI_CLASSIFY_TOKEN in text:
        return MULTI_CLASSIFY_TOKEN
    return None


@dataclass(frozen=True)
class _Tokens:
    """How one level tokenises its hints (token counts of their parts, pieces) and its text."""

    count: Callable[[str], int]
    hint: Callable[[str], Pieces]
    text: Callable[[str], Pieces]


def solve(tok: RexTokenizer, text: str, schema: Mapping[str, Any], text_pieces: Pieces | None = None) -> Solver:
    """The whole pipeline for one (text, schema): first pass, handshake pass, label selection.

    The request's text, and the hints below level 0 (they quote its spans), are tokenised once per
    request, whatever the number of hint chunks, levels and passes; only level-0 hints, built from
    the schema alone, use the tokenizer's caches shared by all requests. Messages share schemas, not
    texts: a shared text cache would only pay off on repeated texts, and would make a benchmark
    that repeats a dev set (ner: 100 distinct texts) time cache hits instead of tokenisation.
    `text_pieces`: the text's `pieces`, if the caller tokenised it already (with its batch mates).
    """
    pieces = _memo(tok.pieces, {} if text_pieces is None else {text: text_pieces})
    own = _Tokens(_memo(tok.token_count, {}), pieces, pieces)
    shared = _Tokens(tok.count, tok.hint_pieces, pieces)
    results = yield from _recurse(tok, text, schema, False, shared, own)
    marker = task_marker(text)
    if not results and marker is not None:
        results = yield from _recurse(tok, text, schema, True, shared, own)
    if results and CLASSIFY_TOKEN in text:
        best = _mean_confidences(results)
        results = [results[best.index(max(best))]]
        _drop_confidence(results)
    if results and MULTI_CLASSIFY_TOKEN in text:
        means = _mean_confidences(results)
        keep = [i for i, m in enumerate(means) if m > MULTI_LABEL_THRESHOLD] or [means.index(max(means))]
        results = [results[i] for i in keep]
        _drop_confidence(results)
    return results


def _mean_confidences(results: list[list[Result]]) -> list[float]:
    return [sum(item["confidence"] for item in items) / len(items) for items in results]


def _drop_confidence(results: list[list[Result]]) -> None:
    for items in results:
        for item in items:
            item.pop("confidence")


@dataclass
class _Planned:
    chunk: int
    window: Window
    text: str  # the (possibly edited) text this window's offsets refer to


def _memo(encode: Callable[[str], Any], known: dict[str, Any]) -> Callable[[str], Any]:
    """`encode`, computed once per string for this request (`known`: what is already computed)."""

    def get(s: str) -> Any:
        found = known.get(s)
        if found is None:
            found = known[s] = encode(s)
        return found

    return get


def _recurse(tok: RexTokenizer, text: str, schema: Mapping[str, Any], blank: bool, first: _Tokens,
             deeper: _Tokens) -> Solver:
    results: list[Any] = []
    level: dict[Prefix, Any] = {(): schema}
    tokens = first
    while level:
        hints = build_hints(level, tokens.count)
        marker = task_marker(text)
        planned, text = _plan(tok, tokens, hints, text, marker)
        links = yield [Forward(p.window.ids, p.window.num_hint_tokens, marker is not None) for p in planned]
        next_level: dict[Prefix, Any] = {}
        chunk_info: dict[str, list] = {}
        candidates: list[tuple[str, list[float]]] = []
        for index, (plan, link) in enumerate(zip(planned, links)):
            w = plan.window
            inp = DecodeInput(offsets=w.offsets, num_hint_tokens=w.num_hint_tokens,
                              slots=hints[plan.chunk].slots, text=plan.text)
            if marker is None:
                hits = decode_links(inp, link, with_confidence=False)
                results.extend(_extraction_step(hits, level, schema, next_level))
            else:
                hits = decode_blank(inp, link) if blank else decode_links(inp, link, with_confidence=True)
                _classification_step(hits, level, schema, next_level, chunk_info, marker)
            last_of_chunk = index + 1 == len(planned) or planned[index + 1].chunk != plan.chunk
            if marker is not None and last_of_chunk:
                _close_chunk(chunk_info, candidates, results, marker)
                chunk_info = {}
        if marker == CLASSIFY_TOKEN and candidates:
            key, confs = sorted(candidates, key=lambda c: sum(c[1]), reverse=True)[0]
            results.append(_label_items(key, confs, marker))
        level, tokens = next_level, deeper
    return results


def _plan(tok: RexTokenizer, tokens: _Tokens, hints: list, text: str, marker: str | None) -> tuple[list[_Planned], str]:
    """Every window of every chunk of one level, in the reference's order.

    For classification, windows after the first get the marker token at their start (their last
    text token dropped), and the reference inserts the marker into its working text at the
    window's start character (from this chunk's tokenisation) — later chunks and levels tokenise
    that edited text, so we do the same.
    """
    planned: list[_Planned] = []
    for c, hint in enumerate(hints):
        windows = tok.windows(tokens.hint(hint.text), tokens.text(text), classification=marker is not None)
        for j, w in enumerate(windows):
            if j and marker is not None:
                w, text = _reinsert_marker(w, text, j, marker, tok)
            planned.append(_Planned(c, w, text))
    return planned, text


def _reinsert_marker(w: Window, text: str, j: int, marker: str, tok: RexTokenizer) -> tuple[Window, str]:
    nh = w.num_hint_tokens
    marker_id = tok.special.classify if marker == CLASSIFY_TOKEN else tok.special.multi_classify
    start = w.offsets[nh][0]
    size = len(marker)
    ids = w.ids[:nh] + [marker_id] + w.ids[nh:-2] + [w.ids[-1]]
    shifted = [(a + j * size, b + j * size) for a, b in w.offsets[nh:-2]]
    offsets = w.offsets[:nh] + [(start + (j - 1) * size, start + j * size)] + shifted + [w.offsets[-1]]
    return Window(ids, offsets, nh), text[:start] + marker + text[start:]


def _extraction_step(hits: list[Hit], level: Mapping, schema: Mapping, next_level: dict) -> list[list[Result]]:
    found = []
    types: dict[tuple, tuple[str, ...]] = {}  # per prefix: its type path (many hits share a prefix)
    for hit in hits:
        prefix, name = hit.slot
        child = level[prefix][name]
        if child:
            next_level[prefix + ((name, hit.span, (hit.start, hit.end)),)] = child
        path = types.get(prefix)
        if path is None:
            path = types[prefix] = tuple(e[0].strip() for e in prefix)
        if is_leaf_path(schema, path + (name,)):
            info = [{"type": t, "span": e[1], "offset": list(e[2])} for t, e in zip(path, prefix)]
            info.append({"type": name, "span": hit.span, "offset": [hit.start, hit.end]})
            found.append(info)
    return found


def _classification_step(hits: list[Hit], level: Mapping, schema: Mapping, next_level: dict,
                         chunk_info: dict[str, list], marker: str) -> None:
    for hit in hits:
        prefix, name = hit.slot
        child = level[prefix][name]
        if child:
            next_level[prefix + ((name, hit.span, (hit.start, hit.end), hit.confidence),)] = child
        on_marker = [e for e in prefix if e[1] == marker]
        key = INFO_KEY_SEP.join([e[0].strip() for e in on_marker] + [name])
        value = [{"type": e[0].strip(), "span": e[1], "offset": list(e[2]), "confidence": e[3]} for e in on_marker]
        value.append({"type": name, "span": hit.span, "offset": [hit.start, hit.end], "confidence": hit.confidence})
        if hit.span == marker and is_leaf_path(schema, tuple(item["type"] for item in value)):
            chunk_info.setdefault(key, []).append(value)


def _close_chunk(chunk_info: dict[str, list], candidates: list, results: list, marker: str) -> None:
    """Per hint chunk: a single-label candidate, or every multi-label hit with its first confidence."""
    if marker == CLASSIFY_TOKEN:
        if len(chunk_info) == 1:
            key, values = next(iter(chunk_info.items()))
            candidates.append((key, [item["confidence"] for item in values[0]]))
        elif chunk_info:
            averaged = {}
            for key, values in chunk_info.items():
                columns = zip(*[[item["confidence"] for item in value] for value in values])
                averaged[key] = [sum(col) / len(col) for col in columns]
            candidates.append(sorted(averaged.items(), key=lambda kv: sum(kv[1]), reverse=True)[0])
    else:
        for key, values in chunk_info.items():
            confs = [item["confidence"] for item in values[0]]
            results.append(_label_items(key, confs, marker))


def _label_items(key: str, confs: list[float], marker: str) -> list[Result]:
    return [
        {"type": name, "span": marker, "offset": [0, len(marker)], "confidence": conf}
        for name, conf in zip(key.split(INFO_KEY_SEP), confs)
    ]
