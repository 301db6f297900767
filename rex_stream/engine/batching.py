"""Token-budget batching policy: which forwards share one padded device batch.

Forwards are sorted by length (stable, so equal lengths keep submission order) and cut into
batches whose padded size `len(batch) * longest` stays within `max_tokens`, with at most
`max_batch` items. Sorting keeps padding low; the budget keeps memory and latency bounded.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], max_tokens: int, max_batch: int = 1024) -> list[list[int]]:
    """Indices of `lengths` grouped into batches, longest first (so memory peaks come early)."""
    if max_tokens <= 0 or max_batch <= 0:
        raise ValueError("max_tokens and max_batch must be positive")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        length = lengths[i]
        width = max(longest, length)
        if current and ((len(current) + 1) * width > max_tokens or len(current) >= max_batch):
            batches.append(current)
            current, width = [], length
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches


def padding_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Fraction of padded token slots that hold padding (a batching-quality figure for benchmarks)."""
    real = sum(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 0.0 if padded == 0 else 1.0 - real / padded
