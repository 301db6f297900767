"""Offset bookkeeping: which input offsets may be committed.

An offset is committable only when it and every earlier offset of its partition that this worker
received are done (their result or dead letter is durable). The commit position is the first
offset not yet done — Kafka's "next offset to consume" — so a crash re-delivers exactly the
unfinished tail and nothing is ever skipped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TopicPartition = tuple[str, int]


@dataclass
class _PartitionState:
    pending: deque[int] = field(default_factory=deque)  # received, in offset order
    done: set[int] = field(default_factory=set)
    next_commit: int | None = None  # first offset not yet done (or last done + 1)
    committed: int | None = None


class OffsetTracker:
    """Per-partition received/done offsets, and the positions safe to commit."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _PartitionState] = {}

    def received(self, tp: TopicPartition, offset: int) -> None:
        state = self._parts.setdefault(tp, _PartitionState())
        if state.pending and offset <= state.pending[-1]:
            raise ValueError(f"{tp}: offset {offset} received after {state.pending[-1]}")
        state.pending.append(offset)

    def done(self, tp: TopicPartition, offset: int) -> None:
        state = self._parts[tp]
        state.done.add(offset)
        while state.pending and state.pending[0] in state.done:
            first = state.pending.popleft()
            state.done.discard(first)
            state.next_commit = first + 1

    def committable(self) -> dict[TopicPartition, int]:
        """Positions that advanced since the last `mark_committed`."""
        return {tp: s.next_commit for tp, s in self._parts.items()
                if s.next_commit is not None and s.next_commit != s.committed}

    def mark_committed(self, positions: dict[TopicPartition, int]) -> None:
        for tp, offset in positions.items():
            if tp in self._parts:
                self._parts[tp].committed = offset

    def in_flight(self, tp: TopicPartition | None = None) -> int:
        """Received but not yet done (per partition, or in total)."""
        if tp is not None:
            return len(self._parts[tp].pending) if tp in self._parts else 0
        return sum(len(s.pending) for s in self._parts.values())

    def forget(self, tps: list[TopicPartition]) -> None:
        """Drop partitions this worker no longer owns (revoked or lost)."""
        for tp in tps:
            self._parts.pop(tp, None)

    def partitions(self) -> list[TopicPartition]:
        return list(self._parts)
