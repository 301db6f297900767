"""The BERT tokenizer pipeline, exactly, for texts made of characters it treats simply.

`tokenizers` spends ~130 µs on a 50-character Chinese text (development CPU): normaliser,
pre-tokeniser and WordPiece walk the text as several passes of string surgery. For most characters
of Chinese text each pass is trivial: the normaliser leaves the character as it is, and then either
it is a token on its own (a CJK ideograph or punctuation: the pre-tokeniser isolates it and
WordPiece looks it up whole), it separates tokens (whitespace), or it belongs to a word (letters,
digits, symbols) that WordPiece splits greedily. `CharPieces` classifies the 65,536 characters of
the Basic Multilingual Plane once by these rules and tokenises a text with one table lookup per
character; a text with any other character (one the normaliser changes, drops or decomposes, or
one outside the table) gets `None`, and the caller uses `tokenizers`. Added tokens (`[CLS]`,
`[PREFIX]`, …) are split out of the raw text first, as `tokenizers` does.

The rules read Python's Unicode database, `tokenizers` its own (older) one: characters assigned or
re-categorised since (new punctuation, ideographs `tokenizers` still takes for unassigned and
drops) would differ. So the table is checked against the real pipeline when it is built (~0.4 s,
once per process and vocabulary), and every character it disagrees on is left to `tokenizers`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Sequence

Pieces = tuple[tuple[int, ...], tuple[tuple[int, int], ...]]  # a string's token ids and character offsets

UNSAFE, SPACE, WORD = -3, -2, -1  # table entries; a token id (≥ 0) marks a character that is a token alone
MAX_WORD_CHARS = 100  # longer words become one [UNK], as WordPiece's `max_input_chars_per_word`
_BMP = 0x10000


def char_kind(ch: str) -> int:
    """`SPACE`, `WORD`, `UNSAFE`, or 0 for a character that is a token on its own.

    `UNSAFE` for everything the normaliser changes: control and format characters (dropped),
    U+FFFD (dropped), characters NFD decomposes and marks (accent stripping, reordering),
    characters that lower-case to something else (except ASCII capitals, lowered below), and
    whitespace other than the ASCII and `Zs` kinds.
    """
    code = ord(ch)
    category = unicodedata.category(ch)
    if ch in "\t\n\r ":
        return SPACE
    if category[0] in "CM" or ch == "\ufffd" or unicodedata.normalize("NFD", ch) != ch:
        return UNSAFE
    if ch.lower() != ch and not "A" <= ch <= "Z":
        return UNSAFE
    if ch.isspace():
        return SPACE if category == "Zs" else UNSAFE
    if _is_cjk(code) or _is_punctuation(code, category):
        return 0
    return WORD


def _is_cjk(code: int) -> bool:
    """The BMP part of BERT's "Chinese character" ranges (the normaliser puts spaces around these)."""
    return 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF


def _is_punctuation(code: int, category: str) -> bool:
    """BERT's punctuation: ASCII symbols and marks, and every Unicode `P*` character."""
    return 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126 or category[0] == "P"


def _by_segment(pieces: tuple[Sequence[int], Sequence[tuple[int, int]]],
                width: int) -> dict[int, list[tuple[int, int, int]]]:
    """Tokens (id, start, end) grouped by which `width`-character segment of the text they start in."""
    segments: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for token, (a, b) in zip(*pieces):
        segments[a // width].append((token, a, b))
    return segments


def _char_class(codes: list[int]) -> str:
    """A regex character class matching exactly `codes` (sorted), as ranges."""
    parts, start, prev = [], None, None
    for code in codes + [-2]:
        if prev is not None and code == prev + 1:
            prev = code
            continue
        if start is not None:
            parts.append(re.escape(chr(start)) + ("" if prev == start else "-" + re.escape(chr(prev))))
        start = prev = code
    return "[" + "".join(parts) + "]"


class CharPieces:
    """Table-driven tokenisation of BMP texts whose characters the normaliser leaves alone."""

    def __init__(self, vocab: dict[str, int], unk_id: int, added: dict[str, int],
                 reference: Callable[[str], Pieces]) -> None:
        """`reference`: the `tokenizers` pipeline's `pieces`, which the table is checked against."""
        self._vocab = vocab
        self._unk = unk_id
        self._added = added
        self._added_re = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
        self._spans = tuple((i, i + 1) for i in range(8192))
        self._table = [vocab.get(ch.lower(), unk_id) if (kind := char_kind(ch)) == 0 else kind
                       for ch in map(chr, range(_BMP))]
        self._runs_re = self._compile_runs()
        for code in self._disagreements(reference):
            self._table[code] = UNSAFE
        self._runs_re = self._compile_runs()

    def _compile_runs(self) -> re.Pattern[str]:
        """A run of word characters (one WordPiece word) or of whitespace (skipped)."""
        word = [c for c, kind in enumerate(self._table) if kind == WORD]
        space = [c for c, kind in enumerate(self._table) if kind == SPACE]
        return re.compile(f"{_char_class(word)}+|{_char_class(space)}+")

    def _disagreements(self, reference: Callable[[str], Pieces]) -> list[int]:
        """Characters of the table that `reference` tokenises differently.

        Ideographs are a token each in both whatever their neighbours (the ranges are fixed), so
        they are checked all in one string. Every other character is checked between letters, in
        `中a?a` (four characters per candidate): a word character joins them, punctuation splits
        them, whitespace vanishes, and a character `tokenizers` drops or changes shows too.
        """
        candidates = [c for c, kind in enumerate(self._table) if kind != UNSAFE]
        cjk = [c for c in candidates if _is_cjk(c)]
        theirs = _by_segment(reference("".join(map(chr, cjk))), 1)
        bad = [c for i, c in enumerate(cjk) if theirs.get(i) != [(self._table[c], i, i + 1)]]
        others = [c for c in candidates if not _is_cjk(c)]
        text = "".join(f"中a{chr(c)}a" for c in others)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        self._plain(text, 0, len(text), ids, offsets)
        mine, theirs = _by_segment((ids, offsets), 4), _by_segment(reference(text), 4)
        return bad + [c for k, c in enumerate(others) if mine.get(k) != theirs.get(k)]

    def pieces(self, text: str) -> Pieces | None:
        """Token ids and character offsets of `text` (no special tokens), or None if it needs the
        full pipeline."""
        if "[" in text and self._added_re.search(text):
            ids: list[int] = []
            offsets: list[tuple[int, int]] = []
            pos = 0
            for match in self._added_re.finditer(text):
                if not self._plain(text, pos, match.start(), ids, offsets):
                    return None
                ids.append(self._added[match.group()])
                offsets.append(match.span())
                pos = match.end()
            if not self._plain(text, pos, len(text), ids, offsets):
                return None
            return tuple(ids), tuple(offsets)
        ids, offsets = [], []
        return (tuple(ids), tuple(offsets)) if self._plain(text, 0, len(text), ids, offsets) else None

    def _plain(self, text: str, start: int, stop: int, ids: list[int], offsets: list[tuple[int, int]]) -> bool:
        """Append the tokens of `text[start:stop]` (no added tokens in it); False if it is unsafe."""
        try:
            kinds = list(map(self._table.__getitem__, map(ord, text[start:stop])))
        except IndexError:  # a character beyond the BMP
            return False
        lowest = min(kinds, default=0)
        if lowest == UNSAFE:
            return False
        if lowest >= 0:
            ids += kinds
            offsets += self._offsets(start, stop)
            return True
        at = start
        for run in self._runs_re.finditer(text, start, stop):
            a, b = run.span()
            ids += kinds[at - start:a - start]
            offsets += self._offsets(at, a)
            if kinds[a - start] == WORD:
                for token, x, y in self._wordpiece(text[a:b].lower()):
                    ids.append(token)
                    offsets.append((a + x, a + y))
            at = b
        ids += kinds[at - start:]
        offsets += self._offsets(at, stop)
        return True

    def _offsets(self, a: int, b: int) -> tuple[tuple[int, int], ...]:
        if b <= len(self._spans):  # shared tuples: most texts are shorter
            return self._spans[a:b]
        return tuple((i, i + 1) for i in range(a, b))

    def _wordpiece(self, word: str) -> tuple[tuple[int, int, int], ...]:
        """Greedy longest-match-first split of one word into (id, start, end), or one [UNK]."""
        if len(word) > MAX_WORD_CHARS:
            return ((self._unk, 0, len(word)),)
        out = []
        start = 0
        while start < len(word):
            for end in range(len(word), start, -1):
                token = self._vocab.get(word[start:end] if start == 0 else "##" + word[start:end])
                if token is not None:
                    out.append((token, start, end))
                    start = end
                    break
            else:
                return ((self._unk, 0, len(word)),)
        return tuple(out)
