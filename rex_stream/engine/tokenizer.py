"""WordPiece tokenizer of a RexUniNLU model directory, built directly with `tokenizers`.

The reference loads `BertTokenizerFast` from `vocab.txt` and adds four task tokens at run
time. We build the same pipeline (BERT normaliser with lower-casing and accent stripping,
BERT pre-tokeniser, WordPiece with 100-char words, `[CLS] A [SEP] B [SEP]` template) so the
token ids and character offsets are identical, without depending on `transformers`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

from tokenizers import AddedToken, Encoding, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from .char_pieces import CharPieces, Pieces

PREFIX_TOKEN = "[PREFIX]"
TYPE_TOKEN = "[TYPE]"
CLASSIFY_TOKEN = "[CLASSIFY]"
MULTI_CLASSIFY_TOKEN = "[MULTICLASSIFY]"
TASK_TOKENS = (PREFIX_TOKEN, TYPE_TOKEN, CLASSIFY_TOKEN, MULTI_CLASSIFY_TOKEN)
BASE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

MAX_LEN = 512
EXTRACTION_STRIDE = 32


@dataclass(frozen=True)
class Window:
    """One model input: `[CLS] hint [SEP] text-window [SEP]` with character offsets."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    num_hint_tokens: int


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    pad: int
    prefix: int
    type: int
    classify: int
    multi_classify: int


class RexTokenizer:
    """Encodes (hint, text) pairs into overflowing 512-token windows like the reference."""

    def __init__(self, model_dir: Path, max_len: int = MAX_LEN) -> None:
        model_dir = Path(model_dir)
        vocab_file = model_dir / "vocab.txt"
        if not vocab_file.is_file():
            raise FileNotFoundError(f"{vocab_file} not found: a RexUniNLU model directory needs vocab.txt")
        self._vocab = _read_vocab(vocab_file)
        self._settings = _tokenizer_settings(model_dir)
        self.max_len = max_len
        self._single = _build(self._vocab, self._settings)
        self._pair_tokenizers: dict[int, Tokenizer] = {}  # stride → truncating pair tokenizer (oracle only)
        tid = self._single.token_to_id
        self.special = SpecialIds(
            cls=tid("[CLS]"), sep=tid("[SEP]"), pad=tid("[PAD]"), prefix=tid(PREFIX_TOKEN),
            type=tid(TYPE_TOKEN), classify=tid(CLASSIFY_TOKEN), multi_classify=tid(MULTI_CLASSIFY_TOKEN),
        )
        self.vocab_size = self._single.get_vocab_size(with_added_tokens=True)
        added = {t: tid(t) for t in (*BASE_SPECIAL_TOKENS, *TASK_TOKENS)}
        # the table path assumes BERT's default normaliser (lower-casing, accent stripping, CJK spacing)
        self._chars = _char_pieces(self._single, self._vocab, added) if all(self._settings.values()) else None

        # Shared by all requests, for strings built from a schema alone (many messages share a schema):
        # texts, and hints that quote them, are memoised per request instead (`recursion.solve`).
        self.count = lru_cache(maxsize=65536)(self.token_count)
        self.hint_pieces = lru_cache(maxsize=8192)(self.pieces)

    def token_count(self, text: str) -> int:
        """Tokens of `text` plus one marker, as the reference counts hint parts (`len(ids) - 1` of the
        encoding with `[CLS]` and `[SEP]`)."""
        return len(self.pieces(text)[0]) + 1

    def pieces(self, text: str) -> Pieces:
        """Token ids and character offsets of `text` alone (no special tokens)."""
        found = self._chars.pieces(text) if self._chars else None
        return _tokenizers_pieces(self._single, text) if found is None else found

    def pieces_of(self, texts: list[str]) -> list[Pieces]:
        """`pieces` of each text; those the character table can't take are tokenised in one
        `tokenizers` call, on its threads."""
        found = [self._chars.pieces(t) for t in texts] if self._chars else [None] * len(texts)
        rest = [i for i, p in enumerate(found) if p is None]
        if rest:
            encodings = self._single.encode_batch([texts[i] for i in rest], add_special_tokens=False)
            for i, enc in zip(rest, encodings):
                found[i] = _encoding_pieces(enc)
        return found

    def windows(self, hint: Pieces, text: Pieces, classification: bool) -> list[Window]:
        """All windows of one (hint, text) pair, from their `pieces`: stride 32 for extraction, 0 for
        classification.

        Same result as the pair encoding of the two strings with `truncation="only_second"`,
        `max_length`, `stride` and overflowing tokens (`reference_windows`), but the hint and the
        text are tokenised separately, so a text is tokenised once per request rather than once per
        hint chunk and level, and a schema's hint once for all requests.
        """
        hint_ids, hint_offsets = hint
        text_ids, text_offsets = text
        cls, sep = self.special.cls, self.special.sep
        head_ids = [cls, *hint_ids, sep]
        head_offsets = [(0, 0), *hint_offsets, (0, 0)]
        nh = len(head_ids)
        room = self.max_len - 3 - len(hint_ids)
        stride = 0 if classification else EXTRACTION_STRIDE
        if len(text_ids) <= room:
            spans = [(0, len(text_ids))]
        else:
            spans = []
            for start in range(0, len(text_ids), room - stride):
                stop = min(start + room, len(text_ids))
                spans.append((start, stop))
                if stop == len(text_ids):
                    break
        return [
            Window(ids=head_ids + list(text_ids[a:b]) + [sep], offsets=head_offsets + list(text_offsets[a:b]) + [(0, 0)],
                   num_hint_tokens=nh)
            for a, b in spans
        ]

    def reference_windows(self, hint: str, text: str, classification: bool) -> list[Window]:
        """The pair encoding with overflowing windows, exactly as the reference calls the tokenizer."""
        stride = 0 if classification else EXTRACTION_STRIDE
        tok = self._pair_tokenizers.get(stride)
        if tok is None:
            tok = _build(self._vocab, self._settings)
            tok.enable_truncation(self.max_len, stride=stride, strategy="only_second")
            self._pair_tokenizers[stride] = tok
        enc = tok.encode(hint, text)
        result = []
        for part in [enc, *enc.overflowing]:
            nh = part.type_ids.index(1) if 1 in part.type_ids else len(part.ids)
            result.append(Window(ids=list(part.ids), offsets=list(part.offsets), num_hint_tokens=nh))
        return result


def _tokenizer_settings(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    lower = bool(settings.get("do_lower_case", True))
    strip = settings.get("strip_accents")
    return {
        "lowercase": lower,
        "strip_accents": lower if strip is None else bool(strip),
        "chinese_chars": bool(settings.get("tokenize_chinese_chars", True)),
    }


_char_tables: dict[tuple, CharPieces] = {}


def _char_pieces(tok: Tokenizer, vocab: dict[str, int], added: dict[str, int]) -> CharPieces:
    """The character table of a vocabulary, built and checked against `tok` once per process (~0.5 s)."""
    key = (tuple(vocab.items()), tuple(added.items()))
    if key not in _char_tables:
        _char_tables[key] = CharPieces(vocab, vocab["[UNK]"], added, partial(_tokenizers_pieces, tok))
    return _char_tables[key]


def _tokenizers_pieces(tok: Tokenizer, text: str) -> Pieces:
    return _encoding_pieces(tok.encode(text, add_special_tokens=False))


def _encoding_pieces(enc: Encoding) -> Pieces:
    return tuple(enc.ids), tuple(enc.offsets)


def _read_vocab(vocab_file: Path) -> dict[str, int]:
    """`vocab.txt`'s tokens and ids (a repeated line keeps its first id, as `tokenizers` does)."""
    vocab: dict[str, int] = {}
    with vocab_file.open(encoding="utf-8") as fh:
        for index, line in enumerate(fh):
            vocab.setdefault(line.rstrip("\n"), index)
    return vocab


def _build(vocab: dict[str, int], settings: dict) -> Tokenizer:
    tok = Tokenizer(WordPiece(dict(vocab), unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=settings["chinese_chars"],
        strip_accents=settings["strip_accents"], lowercase=settings["lowercase"],
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BASE_SPECIAL_TOKENS])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TASK_TOKENS])
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok
