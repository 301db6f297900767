"""Batching policy: when the messages waiting for the GPU form a batch.

A batch closes at `max_messages`, at `max_tokens` (an estimate of level-0 tokens, so a few long
texts don't make a huge batch), or when its oldest message has waited `max_wait_ms` — heavy
traffic fills the GPU, thin traffic still gets bounded latency.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..engine.requests import Request

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    max_messages: int
    max_tokens: int
    max_wait_ms: int


def estimate_tokens(request: Request) -> int:
    """Rough level-0 token count: one per character (Chinese) plus the prompt's type names."""
    return min(len(request.text), 4096) + sum(len(name) + 1 for name in request.schema) + 3


@dataclass
class Accumulator(Generic[T]):
    """Items waiting for a batch, with their token estimates and arrival times."""

    policy: BatchPolicy
    clock: Callable[[], float]
    items: list[T] = field(default_factory=list)
    tokens: int = 0
    oldest: float | None = None
    _sizes: list[int] = field(default_factory=list)

    def add(self, item: T, tokens: int) -> None:
        if not self.items:
            self.oldest = self.clock()
        self.items.append(item)
        self._sizes.append(tokens)
        self.tokens += tokens

    def ready(self) -> bool:
        if not self.items:
            return False
        if len(self.items) >= self.policy.max_messages or self.tokens >= self.policy.max_tokens:
            return True
        return (self.clock() - (self.oldest or 0.0)) * 1000.0 >= self.policy.max_wait_ms

    def wait_s(self) -> float | None:
        """Seconds until the time bound closes the batch (None when empty)."""
        if not self.items:
            return None
        return max(0.0, self.policy.max_wait_ms / 1000.0 - (self.clock() - (self.oldest or 0.0)))

    def take(self) -> list[T]:
        """Remove and return the next batch (bounded by the message and token limits)."""
        count, tokens = 0, 0
        for size in self._sizes:
            if count and (count >= self.policy.max_messages or tokens + size > self.policy.max_tokens):
                break
            count += 1
            tokens += size
        batch, self.items = self.items[:count], self.items[count:]
        self._sizes = self._sizes[count:]
        self.tokens -= tokens
        self.oldest = self.clock() if self.items else None
        return batch

    def drop(self, keep: Callable[[T], bool]) -> list[T]:
        """Remove items for which `keep` is false (e.g. of revoked partitions); return them."""
        kept, dropped, sizes = [], [], []
        for item, size in zip(self.items, self._sizes):
            if keep(item):
                kept.append(item)
                sizes.append(size)
            else:
                dropped.append(item)
        self.items, self._sizes, self.tokens = kept, sizes, sum(sizes)
        if not kept:
            self.oldest = None
        return dropped

    def __len__(self) -> int:
        return len(self.items)

