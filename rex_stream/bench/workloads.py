"""Benchmark workloads: real texts and schemas from the model repository's bundled dev sets.

Each `$REX_SHARED/rex/data/<task>/dev.json` is JSON Lines; a record carries `text` and `schema`
(plus the gold `info_list`, unused here). The golden reference cases of family "dev"
(`rex/golden/public.jsonl`) are exactly these records: the text unchanged and the record's own
schema. Classification sets already carry their task marker (`[CLASSIFY]` / `[MULTICLASSIFY]`)
at the start of the text; a record of those sets that lacks it gets it prepended, so every
classification message runs as the reference runs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# All bundled dev sets, in the order `mix` interleaves them.
TASKS = ("ner", "re", "ee", "absa", "mrc", "tc_single_label", "tc_multi_label")
WORKLOADS = {"ner": ("ner",), "re": ("re",), "mix": TASKS}
_MARKERS = {"tc_single_label": "[CLASSIFY]", "tc_multi_label": "[MULTICLASSIFY]"}

Item = tuple[str, dict[str, Any]]


def shared_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The shared data folder: `explicit`, else $REX_SHARED, else ../shared (from the cwd)."""
    return Path(explicit if explicit is not None else os.environ.get("REX_SHARED", "../shared"))


def load_task(task: str, shared: str | os.PathLike | None = None) -> list[Item]:
    """(text, schema) pairs of one dev set, in file order."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
    path = shared_dir(shared) / "rex" / "data" / task / "dev.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (set REX_SHARED to the project's shared/ folder)")
    items: list[Item] = []
    marker = _MARKERS.get(task)
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            record = json.loads(line)
            text, schema = record["text"], record["schema"]
            if marker is not None and "[CLASSIFY]" not in text and "[MULTICLASSIFY]" not in text:
                text = marker + text
            items.append((text, schema))
    if not items:
        raise ValueError(f"{path} holds no records")
    return items


def load_workload(name: str, shared: str | os.PathLike | None = None, messages: int = 20_000) -> list[Item]:
    """Exactly `messages` (text, schema) pairs: the dev sets' records repeated in order.

    `ner` and `re` are their dev sets; `mix` interleaves all seven sets round-robin (one record of
    each set in turn; a shorter set wraps around), so long texts and many-label schemas are spread
    evenly through the stream. The sequence is repeated until it holds at least `messages` items
    and then cut to exactly `messages`.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r} (one of {', '.join(WORKLOADS)})")
    sets = [load_task(t, shared) for t in WORKLOADS[name]]
    if len(sets) == 1:
        cycle = sets[0]
    else:
        longest = max(len(s) for s in sets)
        cycle = [s[i % len(s)] for i in range(longest) for s in sets]
    count = max(1, messages)
    return [cycle[i % len(cycle)] for i in range(count)]
