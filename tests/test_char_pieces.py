"""The character-table tokeniser against the `tokenizers` pipeline it stands in for."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
from tokenizers import Tokenizer, normalizers

from rex_stream.engine.char_pieces import UNSAFE, CharPieces
from rex_stream.engine.tokenizer import BASE_SPECIAL_TOKENS, TASK_TOKENS, RexTokenizer


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> RexTokenizer:
    return RexTokenizer(tiny_model)


def reference(tok: RexTokenizer, texts: list[str]) -> list[tuple]:
    encodings = tok._single.encode_batch(texts, add_special_tokens=False)
    return [(tuple(e.ids), tuple(e.offsets)) for e in encodings]


def test_every_character_of_the_table_tokenises_as_tokenizers_does(tok: RexTokenizer):
    """Each of the ~40,000 characters the table takes, in a context that mixes every kind."""
    table = tok._chars
    taken = [chr(c) for c in range(0x10000) if table._table[c] != UNSAFE]
    assert len(taken) > 30_000  # ideographs, ASCII, punctuation, symbols, letters of many scripts
    texts = [f"x{c}Ab{c}{c}1 中{c}" for c in taken]
    mismatched = [c for c, text, ref in zip(taken, texts, reference(tok, texts)) if table.pieces(text) != ref]
    assert mismatched == []


def test_random_texts_agree_including_those_left_to_tokenizers(tok: RexTokenizer):
    """Mixed texts: ideographs, ASCII words (capitals, digits, over-long and unknown words),
    punctuation, whitespace kinds, added tokens, and characters the table refuses (accents, marks,
    controls, fullwidth capitals, U+FFFD, characters beyond the BMP)."""
    rng = random.Random(11)
    alphabet = list("中国北京上海的是在人年月日，。、：；（）《》“”！？·—") + list("abcXYZ0189 -_.,$+<>=^`|~")
    alphabet += ["\t", "\n", "\r\n", "\u3000", "\u2002", "\xa0", "hello", "Tokenizer", "x" * 101, "qzxjv"]
    alphabet += [*BASE_SPECIAL_TOKENS, *TASK_TOKENS, "[cls]"]
    refused = ["é", "ç", "\u0301", "\x00", "\x0b", "\u200b", "Ｃ", "Δ", "\ufffd", "𠀀", "가"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    texts += [t[: len(t) // 2] + rng.choice(refused) + t[len(t) // 2:] for t in texts[:500]]
    ours = [tok.pieces(t) for t in texts]
    assert ours == reference(tok, texts)
    assert ours == tok.pieces_of(texts)
    taken = [tok._chars.pieces(t) is not None for t in texts]
    assert taken == [True] * 3000 + [False] * 500  # only the texts with a refused character went to tokenizers


def test_dev_texts_agree_and_almost_all_take_the_table(tok: RexTokenizer, shared_dir: Path):
    texts = [json.loads(line)["text"] for path in sorted((shared_dir / "rex" / "data").glob("*/dev.json"))
             for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(texts) > 700
    assert [tok.pieces(t) for t in texts] == reference(tok, texts)
    assert sum(tok._chars.pieces(t) is not None for t in texts) >= 0.95 * len(texts)


def test_characters_the_pipeline_treats_otherwise_are_left_to_it(tok: RexTokenizer):
    """Checked against a pipeline that does not lower-case, the table gives up capitals (and only
    what that pipeline treats differently) instead of answering for it."""
    keep_case = Tokenizer.from_str(tok._single.to_str())
    keep_case.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=True)

    def pieces(text: str) -> tuple:
        enc = keep_case.encode(text, add_special_tokens=False)
        return tuple(enc.ids), tuple(enc.offsets)

    added = {t: tok._single.token_to_id(t) for t in (*BASE_SPECIAL_TOKENS, *TASK_TOKENS)}
    table = CharPieces(tok._vocab, tok._single.token_to_id("[UNK]"), added, pieces)
    assert table.pieces("Beijing 北京") is None
    assert table.pieces("beijing 北京") == pieces("beijing 北京")
    refused = {chr(c) for c in range(0x10000) if table._table[c] == UNSAFE} - {
        chr(c) for c in range(0x10000) if tok._chars._table[c] == UNSAFE}
    assert refused == set(string.ascii_uppercase)
