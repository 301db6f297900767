"""Device side of the engine: pad a batch of forwards, run the model, bring back joined links.

Only compact data crosses the host/device boundary: [B, L] token ids, position ids, the two
prompt-isolation vectors and the [TYPE] positions go in (the L×L mask is expanded on the device),
and the three-link rule of `decode` is joined on the device: what comes back is, per forward, the
candidate spans with a [spans, slots] matrix of which slots they match (plus scores where a
classification needs them, and one row/column for the handshake pass).

A batch goes through four stages so the engine can overlap them across batches (see
`Engine._pipeline`): `prepare` (host arrays, async copy in), `launch` (the model and the link
join, queued on the device without waiting), `fetch` (span extraction and the copies out, on a
side stream that waits for this batch only) and `collect` (waits for those copies, builds
`Links`). Because extraction runs on its own stream, later batches can already be queued on the
main stream while the host waits for, copies out and decodes an earlier one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .decode import Links, type_positions
from .layout import build_layout
from .model import RexModel
from .recursion import Forward
from .tokenizer import SpecialIds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# How classification confidences are scored. The golden reference data (shared/rex/golden) was
# produced with raw logits in place of the pipeline's sigmoid probabilities — every one of its
# classification outputs follows from logit means (the shipped code would average sigmoids;
# its results differ on 29 of the 311 public cases). "logit" reproduces the golden data and is
# the default; "sigmoid" reproduces the shipped model-repository code.
CLS_SCORES = ("logit", "sigmoid")

_ARRAYS = ("ids", "pos", "group", "slot", "valid")

class _HintLayout(NamedTuple):
    """The cached layout of one `[CLS] hint [SEP]`: what every forward with that hint shares."""

    pos: np.ndarray
    group: np.ndarray
    slot: np.ndarray
    text_start: int  # the first text token's position id
    types: np.ndarray  # positions of its [TYPE] tokens (rank order = slot order)


@dataclass
class Prepared:
    """One padded batch on the device (its inputs may still be in flight)."""

    tensors: dict[str, torch.Tensor]
    nh: np.ndarray  # hint lengths, on the host
    lengths: list[int]
    cls: list[int]  # rows whose forward wants its classification row/column
    started: float  # perf_counter() when preparation began (batch latency is measured from here)


@dataclass
class Launched:
    prepared: Prepared
    logits: torch.Tensor
    spans: torch.Tensor  # [B, L, L] bool: candidate span links (h <= t in the text)
    head_rank: torch.Tensor  # [B, L, R] bool: text token i has a head link to the hint's r-th [TYPE]
    tail_rank: torch.Tensor  # [B, L, R] bool: the r-th [TYPE] has a tail link to text token j
    ready: torch.cuda.Event | None  # the batch's kernels on the main stream are done once this fires
    gpu_start: torch.cuda.Event | None


@dataclass
class Fetched:
    prepared: Prepared
    counts: torch.Tensor  # spans per forward
    spans: torch.Tensor  # [S, 2] (h, t)
    span_scores: torch.Tensor  # [S]
    matched: torch.Tensor  # [S, R] bool
    head_scores: torch.Tensor | None  # [S, R] (batches with a classification forward only)
    tail_scores: torch.Tensor | None
    cls_rows: torch.Tensor | None
    cls_cols: torch.Tensor | None
    gpu_start: torch.cuda.Event | None
    ready: torch.cuda.Event | None
    done: torch.cuda.Event | None  # the copies out have landed once this fires


class ForwardRunner:
    """Runs padded batches of forwards through one model on one device."""

    def __init__(self, model: RexModel, special: SpecialIds, device: torch.device, dtype: str,
                 cls_score: str = "logit") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        if cls_score not in CLS_SCORES:
            raise ValueError(f"cls_score must be one of {CLS_SCORES}")
        self.score = torch.sigmoid if cls_score == "sigmoid" else torch.clone
        self._layouts: dict[tuple[int, ...], _HintLayout] = {}
        self.model = model
        self.special = special
        self.device = device
        self.dtype = dtype
        self.cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self.cuda else None  # link extraction and copies out
        self.timing = False  # time each batch with CUDA events (benchmarks read Fetched.gpu_start/ready)

    def _hint_layout(self, f: Forward) -> _HintLayout:
        """Layout of the `[CLS] hint [SEP]` part, cached: many forwards share a hint."""
        key = tuple(f.ids[: f.num_hint_tokens])
        hit = self._layouts.get(key)
        if hit is None:
            pos, group, slot = build_layout(f.ids[: f.num_hint_tokens], self.special)
            hit = _HintLayout(pos, group, slot, int(pos.max()) + 1, type_positions(key, self.special.type))
            if len(self._layouts) >= 50_000:
                self._layouts.clear()
            self._layouts[key] = hit
        return hit

    def _autocast(self):
        if self.dtype == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.dtype])

    def _event(self) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=self.timing)
        event.record()
        return event

    def _to_host(self, x: torch.Tensor) -> torch.Tensor:
        """Queue a device→host copy into pinned memory (no wait); on CPU the tensor itself."""
        if not self.cuda:
            return x
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return out.copy_(x, non_blocking=True)

    # ------------------------------------------------------------------------------ stages

    def prepare(self, forwards: Sequence[Forward]) -> Prepared:
        """Host-side padding of one batch into [B, L] arrays, copied to the device in one transfer.

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
        packed = np.empty((len(_ARRAYS), stride), dtype=np.int64)
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
        host = torch.from_numpy(packed)
        if self.cuda:
            host = host.pin_memory()
        device = host.to(self.device, non_blocking=True)
        tensors = {name: row[: n * width].view(n, width) for name, row in zip(_ARRAYS, device.unbind(0))}
        tensors["valid"] = tensors["valid"].bool()
        tensors["nh"] = torch.from_numpy(nh).to(self.device, non_blocking=True)
        tensors["types"] = torch.from_numpy(types).to(self.device, non_blocking=True)
        return Prepared(tensors, nh, lengths, [b for b, f in enumerate(forwards) if f.want_cls_probs], started)

    def tensors(self, forwards: Sequence[Forward]) -> dict[str, torch.Tensor]:
        """The device tensors of one padded batch (ids, pos, group, slot, valid, nh, types)."""
        return self.prepare(forwards).tensors

    @torch.inference_mode()
    def logits(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """fp32 logits [B, L, L] of one padded batch.

        The dense L×L prompt-isolation mask is expanded here only for the SDPA path; the fused
        (flex, triton) paths evaluate isolation from the per-token group/slot vectors themselves.
        """
        g, s, valid = t["group"], t["slot"], t["valid"]
        mask = None
        if self.model.attention == "sdpa":
            gi, gj = g[:, :, None], g[:, None, :]
            si, sj = s[:, :, None], s[:, None, :]
            blocked = ((gi >= 0) & (gj >= 0) & (gi != gj)) | ((gi >= 0) & (gi == gj) & (si >= 0) & (sj >= 0) & (si != sj))
            mask = ~blocked & valid[:, :, None] & valid[:, None, :]
        with self._autocast():
            return self.model(t["ids"], t["pos"], mask, valid, group=g, slot=s).float()

    @torch.inference_mode()
    def launch(self, prepared: Prepared) -> Launched:
        """Queue the model and the link join on the device; returns without waiting for them.

        The three-link rule of `decode` is joined here: head links (text row → [TYPE] column) and
        tail links ([TYPE] row → text column) are gathered per slot rank, and the candidate spans are
        the span links (h ≤ t in the text) whose head row has some head link and whose tail column
        has some tail link. `fetch` then only pairs each candidate with its ranks.
        """
        t = prepared.tensors
        gpu_start = self._event() if self.timing else None
        logits = self.logits(t)
        width = logits.shape[1]
        idx = torch.arange(width, device=logits.device)
        text = (idx[None, :] >= t["nh"][:, None]) & t["valid"]
        is_type = t["ids"] == self.special.type
        positive = logits > 0
        heads = positive & text[:, :, None] & is_type[:, None, :]
        tails = positive & is_type[:, :, None] & text[:, None, :]
        spans = positive & (heads.any(-1)[:, :, None] & tails.any(-2)[:, None, :]) & (idx[:, None] <= idx[None, :])
        types = t["types"]
        head_rank = heads.gather(2, types[:, None, :].expand(-1, width, -1))
        tail_rank = tails.gather(1, types[:, :, None].expand(-1, -1, width)).transpose(1, 2)
        return Launched(prepared, logits, spans, head_rank, tail_rank, self._event(), gpu_start)

    @torch.inference_mode()
    def fetch(self, launched: Launched) -> Fetched:
        """Pair the candidate spans with their slot ranks and queue the copies out, on the side stream."""
        prepared, logits = launched.prepared, launched.logits
        stream = nullcontext()
        if self._side is not None and launched.ready is not None:
            self._side.wait_event(launched.ready)
            for t in (logits, launched.spans, launched.head_rank, launched.tail_rank, prepared.tensors["nh"],
                      prepared.tensors["types"]):
                t.record_stream(self._side)  # made on the main stream, read on the side one
            stream = torch.cuda.stream(self._side)
        with stream:
            where = launched.spans.nonzero()  # the one host wait: the number of spans is data-dependent
            b, first, last = where.unbind(1)
            matched = launched.head_rank[b, first] & launched.tail_rank[b, last]
            counts = torch.bincount(b, minlength=logits.shape[0])
            span_scores = self.score(logits[b, last, first])  # the reference reads scores at (col, row)
            head_scores = tail_scores = rows = cols = None
            if prepared.cls:
                slot_tokens = prepared.tensors["types"][b]  # [S, R]
                head_scores = self._to_host(self.score(logits[b[:, None], slot_tokens, first[:, None]]))
                tail_scores = self._to_host(self.score(logits[b[:, None], last[:, None], slot_tokens]))
                rows_of = torch.tensor(prepared.cls, device=logits.device)
                nh = prepared.tensors["nh"][rows_of]
                rows = self._to_host(self.score(logits[rows_of, nh, :]))
                cols = self._to_host(self.score(logits[rows_of, :, nh]))
            return Fetched(prepared, self._to_host(counts), self._to_host(where[:, 1:].to(torch.int32)),
                           self._to_host(span_scores), self._to_host(matched), head_scores, tail_scores, rows, cols,
                           launched.gpu_start, launched.ready, self._event())

    def collect(self, fetched: Fetched) -> list[Links]:
        """Links of every forward of the batch, in order (waits for the copies out only)."""
        if fetched.done is not None:
            fetched.done.synchronize()
        spans, span_scores, matched = fetched.spans.numpy(), fetched.span_scores.numpy(), fetched.matched.numpy()
        head = None if fetched.head_scores is None else fetched.head_scores.numpy()
        tail = None if fetched.tail_scores is None else fetched.tail_scores.numpy()
        cls_rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if fetched.cls_rows is not None and fetched.cls_cols is not None:
            nh = fetched.prepared.nh
            rows, cols = fetched.cls_rows.numpy(), fetched.cls_cols.numpy()
            cls_rows = {b: (rows[k, : nh[b] + 1], cols[k, : nh[b] + 1]) for k, b in enumerate(fetched.prepared.cls)}
        out = []
        start = 0
        for b, count in enumerate(fetched.counts.tolist()):
            row, col = cls_rows.get(b, (None, None))
            part = slice(start, start + count)
            out.append(Links(spans[part], span_scores[part], matched[part],
                             None if head is None else head[part], None if tail is None else tail[part], row, col))
            start += count
        return out
