"""Token-budget batching policy: which forwards share one padded device batch.

Forwards are sorted by length (stable, so equal lengths keep submission order) and cut into runs
of neighbouring lengths; each run is split into batches whose padded size `len(batch) * longest`
stays within `max_tokens`, with at most `max_batch` items. Where the runs are cut is chosen to
minimise the padded tokens plus a fixed cost per batch (`batch_cost` tokens: launching, padding
and decoding a batch costs host and device time whatever its size). Filling every batch to the
budget instead lets one long forward pad a whole batch of short ones: over the 20,000 `ner`
messages of the benchmark the engine's batches padded 6.1 % of their tokens (18.6 % with request
admission); cut into runs, 2.2 % in 24 batches at the default cost (1.0 % in 29 at a cost of 2,048).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# What one more batch costs, in padded tokens. Mostly host time: launching a batch is ~13-16 ms of
# Python and kernel dispatch on the H200 hosts, whatever the batch's size (bench/host_stages.py),
# while the device runs ~3,000 tokens per ms. On those hosts fewer batches won over less padding:
# ner +21 %, re +23 % with the fewest batches against a cost of 2,048 (bench/results/h200-run8).
# Host processes of the device-server layout keep it: the device process pays the launch. At 2,048
# their 5,000-message calls padded 2.7 % instead of 10.7 % at the same rate, but the stream workers'
# 1,024-message batches became small device batches, and the workers through a broker fell to 68 %
# of the engine, against 90 % at 16,384 in an earlier run (bench/results/h200-run13-served).
BATCH_COST_TOKENS = 16384


def plan_batches(lengths: Sequence[int], max_tokens: int, max_batch: int = 1024,
                 batch_cost: int = BATCH_COST_TOKENS) -> list[list[int]]:
    """Indices of `lengths` grouped into batches, longest first (so memory peaks come early)."""
    if max_tokens <= 0 or max_batch <= 0:
        raise ValueError("max_tokens and max_batch must be positive")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for start, end in _runs([lengths[i] for i in order], max_tokens, max_batch, batch_cost):
        batches += _fill(order[start:end], lengths, max_tokens, max_batch)
    return batches


def _runs(ordered: list[int], max_tokens: int, max_batch: int, batch_cost: int) -> list[tuple[int, int]]:
    """Cut the descending `ordered` lengths into runs, at changes of length only.

    A run of n forwards led by length w costs n * w padded tokens and `batch_cost` per batch it
    needs; the cheapest cut is a shortest path over the distinct lengths (at most a few hundred),
    solved one numpy row per run start.
    """
    if not ordered:
        return []
    values = np.asarray(ordered, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])  # first position of each distinct length
    bounds = np.r_[starts, len(values)]  # run boundaries are positions in `ordered`
    groups = len(starts)
    best = np.full(groups + 1, np.inf)
    best[0] = 0.0
    came_from = np.zeros(groups + 1, dtype=np.int64)
    for g in range(groups):
        width = int(values[starts[g]])
        per_batch = max(1, min(max_tokens // width, max_batch))
        ends = np.arange(g + 1, groups + 1)
        count = bounds[ends] - bounds[g]
        cost = best[g] + count * width + batch_cost * -(-count // per_batch)
        better = cost < best[ends]
        best[ends[better]] = cost[better]
        came_from[ends[better]] = g
    runs = []
    end = groups
    while end > 0:
        start = int(came_from[end])
        runs.append((int(bounds[start]), int(bounds[end])))
        end = start
    return runs[::-1]


def _fill(order: list[int], lengths: Sequence[int], max_tokens: int, max_batch: int) -> list[list[int]]:
    """Split one run (descending lengths) into batches filled up to the budget."""
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        if current and ((len(current) + 1) * width > max_tokens or len(current) >= max_batch):
            batches.append(current)
            current = []
        if not current:
            width = lengths[i]
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Fraction of padded token slots that hold padding (a batching-quality figure for benchmarks)."""
    real = sum(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 0.0 if padded == 0 else 1.0 - real / padded
