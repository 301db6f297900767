"""Prompt isolation: reset position ids and the attention pattern of one model input.

The reference builds an L×L 0/1 matrix in Python per query. We describe the same pattern with
two small per-token vectors, so batches travel to the device as [B, L] ints and the mask is
expanded there:

* `group[i]`: index of the prefix group a hint token belongs to, -1 for `[CLS]` and the text;
* `slot[i]`: index of the `[TYPE]` span inside its group, -1 for `[PREFIX]`+prefix tokens, `[CLS]`
  and text.

Token i may attend token j unless both are in different groups, or both are in different type
spans of the same group. `[CLS]` and text tokens attend to (and are attended by) everything.
"""

from __future__ import annotations

import numpy as np

from .tokenizer import SpecialIds


def build_layout(ids: list[int], special: SpecialIds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Position ids, group ids and slot ids (all int64 [L]) for one `[CLS] hint [SEP] text [SEP]`."""
    n = len(ids)
    positions = np.zeros(n, dtype=np.int64)
    group = np.full(n, -1, dtype=np.int64)
    slot = np.full(n, -1, dtype=np.int64)
    if n < 2 or ids[0] != special.cls or ids[1] != special.prefix:
        raise ValueError("a model input must start with [CLS][PREFIX]")
    # The hint ends at the first [SEP]; everything from there on is text (positions continue).
    hint_end = ids.index(special.sep)
    g = -1
    s = -1
    prefix_len = 0
    type_pos = 0
    for i in range(1, hint_end):
        t = ids[i]
        if t == special.prefix:
            g += 1
            s = -1
            prefix_len = 0
        elif t == special.type:
            s += 1
            type_pos = 0
        group[i] = g
        slot[i] = s
        if s < 0:
            prefix_len += 1
            positions[i] = prefix_len
        else:
            type_pos += 1
            positions[i] = prefix_len + type_pos
    start = int(positions[:hint_end].max()) + 1
    positions[hint_end:] = np.arange(start, start + n - hint_end)
    return positions, group, slot


def attention_allowed(group: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """The boolean L×L pattern for one input (reference semantics; used by tests and debugging)."""
    gi, gj = group[:, None], group[None, :]
    si, sj = slot[:, None], slot[None, :]
    other_group = (gi >= 0) & (gj >= 0) & (gi != gj)
    other_type = (gi >= 0) & (gi == gj) & (si >= 0) & (sj >= 0) & (si != sj)
    return ~(other_group | other_type)
