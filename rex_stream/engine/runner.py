"""Device side of the engine: pad a batch of forwards, run the model, bring back positive links.

Only compact data crosses the host/device boundary: [B, L] token ids, position ids and the two
prompt-isolation vectors go in (the L×L mask is expanded on the device), and only the positive
links of the decodable region (plus one row/column for classification) come back.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch

from .decode import Links
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


class ForwardRunner:
    """Runs padded batches of forwards through one model on one device."""

    def __init__(self, model: RexModel, special: SpecialIds, device: torch.device, dtype: str,
                 cls_score: str = "logit") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        if cls_score not in CLS_SCORES:
            raise ValueError(f"cls_score must be one of {CLS_SCORES}")
        self.score = torch.sigmoid if cls_score == "sigmoid" else torch.clone
        self._layouts: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray, int]] = {}
        self.model = model
        self.special = special
        self.device = device
        self.dtype = dtype

    def _hint_layout(self, f: Forward) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Layout of the `[CLS] hint [SEP]` part, cached: many forwards share a hint."""
        key = tuple(f.ids[: f.num_hint_tokens])
        hit = self._layouts.get(key)
        if hit is None:
            pos, group, slot = build_layout(f.ids[: f.num_hint_tokens], self.special)
            hit = (pos, group, slot, int(pos.max()) + 1)
            if len(self._layouts) >= 50_000:
                self._layouts.clear()
            self._layouts[key] = hit
        return hit

    def _autocast(self):
        if self.dtype == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.dtype])

    def tensors(self, forwards: Sequence[Forward]) -> dict[str, torch.Tensor]:
        """Host-side padding of one batch into [B, L] arrays, moved to the device."""
        width = max(len(f.ids) for f in forwards)
        n = len(forwards)
        ids = np.full((n, width), self.special.pad, dtype=np.int64)
        pos = np.zeros((n, width), dtype=np.int64)
        group = np.full((n, width), -1, dtype=np.int64)
        slot = np.full((n, width), -1, dtype=np.int64)
        valid = np.zeros((n, width), dtype=bool)
        for b, f in enumerate(forwards):
            length, nh = len(f.ids), f.num_hint_tokens
            ids[b, :length] = f.ids
            hint_pos, hint_group, hint_slot, start = self._hint_layout(f)
            pos[b, :nh], group[b, :nh], slot[b, :nh] = hint_pos, hint_group, hint_slot
            pos[b, nh:length] = np.arange(start, start + length - nh)
            valid[b, :length] = True
        nh = np.array([f.num_hint_tokens for f in forwards], dtype=np.int64)
        arrays = {"ids": ids, "pos": pos, "group": group, "slot": slot, "valid": valid, "nh": nh}
        return {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in arrays.items()}

    @torch.inference_mode()
    def logits(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """fp32 logits [B, L, L] of one padded batch.

        The dense L×L prompt-isolation mask is expanded here only for the SDPA path; the fused
        (flex) path builds its block mask from the per-token group/slot vectors itself.
        """
        g, s, valid = t["group"], t["slot"], t["valid"]
        mask = None
        if self.model.attention != "flex":
            gi, gj = g[:, :, None], g[:, None, :]
            si, sj = s[:, :, None], s[:, None, :]
            blocked = ((gi >= 0) & (gj >= 0) & (gi != gj)) | ((gi >= 0) & (gi == gj) & (si >= 0) & (sj >= 0) & (si != sj))
            mask = ~blocked & valid[:, :, None] & valid[:, None, :]
        with self._autocast():
            return self.model(t["ids"], t["pos"], mask, valid, group=g, slot=s).float()

    @torch.inference_mode()
    def run(self, forwards: Sequence[Forward]) -> list[Links]:
        """Links of every forward of one batch, in order."""
        t = self.tensors(forwards)
        logits = self.logits(t)
        return self.extract(logits, t, [f.want_cls_probs for f in forwards])

    def extract(self, logits: torch.Tensor, t: dict[str, torch.Tensor], want_cls: Sequence[bool]) -> list[Links]:
        """Positive links that can matter to decoding, found on the device.

        Head links (text row → [TYPE] column), tail links ([TYPE] row → text column), and span
        links (h ≤ t in the text) whose head row has some head link and whose tail column has
        some tail link — a span without both can never be decoded, so it never leaves the device.
        """
        n, width, _ = logits.shape
        valid = t["valid"]
        idx = torch.arange(width, device=logits.device)
        text = (idx[None, :] >= t["nh"][:, None]) & valid
        is_type = t["ids"] == self.special.type
        positive = logits > 0
        heads = positive & text[:, :, None] & is_type[:, None, :]
        tails = positive & is_type[:, :, None] & text[:, None, :]
        has_head, has_tail = heads.any(-1), tails.any(-2)
        spans = positive & (has_head[:, :, None] & has_tail[:, None, :]) & (idx[:, None] <= idx[None, :])
        where = (heads | tails | spans).nonzero()
        score_t = self.score(logits[where[:, 0], where[:, 2], where[:, 1]])
        counts = torch.bincount(where[:, 0], minlength=n).cpu().tolist()
        pairs = where[:, 1:].to(torch.int32).cpu().numpy()
        scores = score_t.cpu().numpy()
        cls_rows = {}
        for b in (b for b in range(n) if want_cls[b]):
            h = int(t["nh"][b])
            cls_rows[b] = (self.score(logits[b, h, : h + 1]).cpu().numpy(), self.score(logits[b, : h + 1, h]).cpu().numpy())
        out = []
        start = 0
        for b, count in enumerate(counts):
            row, col = cls_rows.get(b, (None, None))
            out.append(Links(pairs[start : start + count], scores[start : start + count], row, col))
            start += count
        return out
