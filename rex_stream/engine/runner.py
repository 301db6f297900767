"""Device side of the engine: pad a batch of forwards, run the model, bring back joined links.

Only compact data crosses the host/device boundary: [B, L] token ids, position ids, the two
prompt-isolation vectors and the [TYPE] positions go in (the L×L mask is expanded on the device),
and the three-link rule of `decode` is joined on the device: what comes back is, per forward, the
candidate spans with a [spans, slots] matrix of which slots they match (plus scores where a
classification needs them, and one row/column for the handshake pass).

A batch goes through four stages so the engine can overlap them across batches (see
`Engine._pipeline`): `prepare` (host arrays from `packing.Packer`, async copy in), `launch` (the model and the link
join, queued on the device without waiting), `fetch` (span extraction and the copies out, on a
side stream that waits for this batch only) and `collect` (waits for those copies, builds
`Links`). Because extraction runs on its own stream, later batches can already be queued on the
main stream while the host waits for, copies out and decodes an earlier one.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from .decode import Links
from .model import RexModel
from .packing import ARRAYS, Packed, Packer
from .recursion import Forward
from .tokenizer import SpecialIds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# How classification confidences are scored. The golden reference data (shared/rex/golden) was
# produced with raw logits in place of the pipeline's sigmoid probabilities — every one of its
# classification outputs follows from logit means (the shipped code would average sigmoids;
# its results differ on 29 of the 311 public cases). "logit" reproduces the golden data and is
# the default; "sigmoid" reproduces the shipped model-repository code.
CLS_SCORES = ("logit", "sigmoid")

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
        self.packer = Packer(special)
        self.model = model
        self.special = special
        self.device = device
        self.dtype = dtype
        self.cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self.cuda else None  # link extraction and copies out
        self.timing = False  # time each batch with CUDA events (benchmarks read Fetched.gpu_start/ready)

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

    def upload(self, packed: Packed) -> Prepared:
        """Queue the copy of a packed batch to the device (pinned, asynchronous)."""
        n, width = len(packed.lengths), packed.width
        host = torch.from_numpy(packed.arrays)
        if self.cuda:
            host = host.pin_memory()
        device = host.to(self.device, non_blocking=True)
        tensors = {name: row[: n * width].view(n, width) for name, row in zip(ARRAYS, device.unbind(0))}
        tensors["valid"] = tensors["valid"].bool()
        tensors["nh"] = torch.from_numpy(packed.nh).to(self.device, non_blocking=True)
        tensors["types"] = torch.from_numpy(packed.types).to(self.device, non_blocking=True)
        return Prepared(tensors, packed.nh, packed.lengths, packed.cls, packed.started)

    def prepare(self, forwards: Sequence[Forward]) -> Prepared:
        """`Packer.pack` then `upload`: one batch on its way to the device."""
        return self.upload(self.packer.pack(forwards))

    def tensors(self, forwards: Sequence[Forward]) -> dict[str, torch.Tensor]:
        """The device tensors of one padded batch (ids, pos, group, slot, valid, nh, types)."""
        return self.prepare(forwards).tensors

    @torch.inference_mode()
    def logits(self, t: dict[str, torch.Tensor], lengths: Sequence[int] | None = None) -> torch.Tensor:
        """fp32 logits [B, L, L] of one padded batch (``lengths``: its rows' lengths, known on the host).

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
            return self.model(t["ids"], t["pos"], mask, valid, group=g, slot=s, lengths=lengths).float()

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
        logits = self.logits(t, prepared.lengths)
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

    def host_links(self, fetched: Fetched) -> HostLinks:
        """The batch's joined links as host arrays (waits for the copies out only)."""
        if fetched.done is not None:
            fetched.done.synchronize()

        def array(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.numpy()

        return HostLinks(fetched.counts.numpy(), fetched.spans.numpy(), fetched.span_scores.numpy(),
                         fetched.matched.numpy(), array(fetched.head_scores), array(fetched.tail_scores),
                         array(fetched.cls_rows), array(fetched.cls_cols))

    def collect(self, fetched: Fetched) -> list[Links]:
        """Links of every forward of the batch, in order (waits for the copies out only)."""
        return split_links(self.host_links(fetched), fetched.prepared.nh, fetched.prepared.cls)


@dataclass
class HostLinks:
    """A batch's joined links on the host, for all its forwards together (see `Fetched`)."""

    counts: np.ndarray
    spans: np.ndarray
    span_scores: np.ndarray
    matched: np.ndarray
    head_scores: np.ndarray | None
    tail_scores: np.ndarray | None
    cls_rows: np.ndarray | None
    cls_cols: np.ndarray | None


def split_links(batch: HostLinks, nh: np.ndarray, cls: list[int]) -> list[Links]:
    """Per forward of the batch, in order: its slice of the batch's links."""
    head, tail = batch.head_scores, batch.tail_scores
    cls_rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if batch.cls_rows is not None and batch.cls_cols is not None:
        rows, cols = batch.cls_rows, batch.cls_cols
        cls_rows = {b: (rows[k, : nh[b] + 1], cols[k, : nh[b] + 1]) for k, b in enumerate(cls)}
    out = []
    start = 0
    for b, count in enumerate(batch.counts.tolist()):
        row, col = cls_rows.get(b, (None, None))
        part = slice(start, start + count)
        out.append(Links(batch.spans[part], batch.span_scores[part], batch.matched[part],
                         None if head is None else head[part], None if tail is None else tail[part], row, col))
        start += count
    return out
