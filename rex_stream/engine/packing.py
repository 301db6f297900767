"""Padding a batch of forwards into the arrays the model reads: pure host work, no device.

Both runners use it: `runner.ForwardRunner` uploads the result itself, a `device_server` client
sends it to the process that owns the device.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .decode import type_positions
from .layout import build_layout
from .recursion import Forward
from .tokenizer import SpecialIds

ARRAYS = ("ids", "pos", "group", "slot", "valid")


class HintLayout(NamedTuple):
    """The cached layout of one `[CLS] hint [SEP]`: what every forward with that hint shares."""

    pos: np.ndarray
    group: np.ndarray
    slot: np.ndarray
    text_start: int  # the first text token's position id
    types: np.ndarray  # positions of its [TYPE] tokens (rank order = slot order)


@dataclass
class Packed:
    """One padded batch on the host: what `ForwardRunner.upload` copies to the device (and what a
    `device_server` client sends). Plain numpy and lists, so it pickles cheaply."""

    arrays: np.ndarray  # [5, stride] int64: ids, pos, group, slot, valid, each [B, width] row-major
    width: int
    nh: np.ndarray  # hint lengths
    types: np.ndarray  # [B, R] positions of each forward's [TYPE] tokens, padded with 0
    lengths: list[int]
    cls: list[int]  # rows whose forward wants its classification row/column
    started: float  # perf_counter() when packing began (batch latency is measured from here)


class Packer:
    """Pads batches of forwards; caches each distinct hint's layout (many forwards share a hint)."""

    def __init__(self, special: SpecialIds) -> None:
        self.special = special
        self._layouts: dict[tuple[int, ...], HintLayout] = {}

    def _hint_layout(self, f: Forward) -> HintLayout:
        """Layout of the `[CLS] hint [SEP]` part, cached: many forwards share a hint."""
        key = tuple(f.ids[: f.num_hint_tokens])
        hit = self._layouts.get(key)
        if hit is None:
            pos, group, slot = build_layout(f.ids[: f.num_hint_tokens], self.special)
            hit = HintLayout(pos, group, slot, int(pos.max()) + 1, type_positions(key, self.special.type))
            if len(self._layouts) >= 50_000:
                self._layouts.clear()
            self._layouts[key] = hit
        return hit

    def pack(self, forwards: Sequence[Forward]) -> Packed:
        """Host-side padding of one batch into [B, L] arrays in one buffer (no device work).

        Vectorised over the batch: the forwards' ids and cached hint layouts are concatenated once
        and scattered into the padded arrays with two masks (no per-forward numpy calls).
        """
        started = time.perf_counter()
        lengths = [len(f.ids) for f in forwards]
        width, n = max(lengths), len(forwards)
        layouts = [self._hint_layout(f) for f in forwards]
        nh = np.fromiter((f.num_hint_tokens for f in forwards), dtype=np.int64, count=n)
        columns = np.arange(width)
        in_row = columns < np.asarray(lengths)[:, None]
        in_hint = columns < nh[:, None]
        # One buffer, one transfer. Each array starts on a 16-byte boundary (its stride is rounded up to
        # an even element count): Triton specialises kernels on pointer alignment, and arrays at odd
        # 8-byte offsets (n * width odd) compiled a second attention kernel mid-run (~1.7 s, H200).
        stride = n * width + (n * width) % 2
        packed = np.empty((len(ARRAYS), stride), dtype=np.int64)
        ids, pos, group, slot, valid = (row[: n * width].reshape(n, width) for row in packed)
        ids.fill(self.special.pad)
        ids[in_row] = np.fromiter(itertools.chain.from_iterable(f.ids for f in forwards), dtype=np.int64,
                                  count=sum(lengths))
        # Text positions continue after the hint's largest position: column - nh + start.
        starts = np.fromiter((layout.text_start for layout in layouts), dtype=np.int64, count=n)
        pos[:] = np.where(in_row, columns - nh[:, None] + starts[:, None], 0)
        group.fill(-1)
        slot.fill(-1)
        for array, field in ((pos, "pos"), (group, "group"), (slot, "slot")):
            array[in_hint] = np.concatenate([getattr(layout, field) for layout in layouts])
        valid[:] = in_row
        # [TYPE] positions per forward (rank order = slot order), padded with 0: column 0 ([CLS]) is no type.
        counts = [len(layout.types) for layout in layouts]
        types = np.zeros((n, max(counts)), dtype=np.int64)
        types[np.arange(types.shape[1]) < np.asarray(counts)[:, None]] = np.concatenate([layout.types for layout in layouts])
        return Packed(packed, width, nh, types, lengths, [b for b, f in enumerate(forwards) if f.want_cls_probs],
                      started)
