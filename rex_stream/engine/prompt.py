"""Schema level → prompt ("hint") chunks, packed under the reference's 256-token limit.

A level is an ordered mapping from a prefix (the path of (type, span, offsets[, confidence])
already extracted) to the child schema to ask about. Each prefix contributes
`[PREFIX]prefix-string` followed by `[TYPE]name` for each child type (sorted); a chunk closes when
the next part would push it over `hint_max_len` tokens, and a continued prefix repeats its header.
Prefixes are kept in discovery order (the reference shuffles them; its golden data was made with
the shuffle disabled).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .tokenizer import PREFIX_TOKEN, TYPE_TOKEN

HINT_MAX_LEN = 256
PREFIX_STRING_MAX_LEN = 125
TYPE_NAME_MAX_LEN = 125

# A prefix element: (type, span, (start, end)) for extraction, plus a confidence for classification.
Prefix = tuple[tuple[Any, ...], ...]
Slot = tuple[Prefix, str]  # (prefix, child type): one [TYPE] token of the hint


@dataclass
class HintChunk:
    """One hint string and, for each of its [TYPE] tokens, the character where it starts."""

    text: str = ""
    slots: dict[Slot, int] = field(default_factory=dict)


def prefix_string(prefix: Prefix) -> str:
    return ",".join(f"{element[0]}: {element[1]}" for element in prefix)


def build_hints(level: Mapping[Prefix, Mapping[str, Any]], count: Callable[[str], int]) -> list[HintChunk]:
    """Pack every (prefix, child type) of one level into hint chunks.

    `count(s)` is the number of tokens of `s` plus one (the reference's `len(ids) - 1`).
    Over-long prefix strings and type names are skipped silently, as the reference does.
    """
    chunks: list[HintChunk] = []
    current = HintChunk()
    used = 2  # [CLS] and [SEP]
    for prefix, children in level.items():
        header = PREFIX_TOKEN + prefix_string(prefix)
        header_len = count(prefix_string(prefix))
        if header_len > PREFIX_STRING_MAX_LEN:
            continue
        first = True
        for name in sorted(children):
            name_len = count(name)
            if name_len > TYPE_NAME_MAX_LEN:
                continue
            needed = name_len + (header_len if first else 0)
            if used + needed > HINT_MAX_LEN:
                if current.text:
                    chunks.append(current)
                current = HintChunk(text=header)
                used = 2 + header_len + name_len
            else:
                if first:
                    current.text += header
                used += needed
            current.slots[(prefix, name)] = len(current.text)
            current.text += TYPE_TOKEN + name
            first = False
    if current.text:
        chunks.append(current)
    return chunks
