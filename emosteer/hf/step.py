"""Per-forward state of the transformers backend and the captures it hands back.

``Step`` is what the hooks of ``emosteer/hf/steerer.py`` read during one forward: each
token's slot and capture rows, from the per-step builder the vLLM worker uses too
(``emosteer/request/step.py``). ``collect`` and ``finish`` turn the captured rows into
per-row captures in the vLLM path's layout.
"""

from __future__ import annotations

import numpy as np
import torch

from emosteer.hf.plan import Plan
from emosteer.request.step import CAPTURE_KINDS, capture_layout, token_row_offsets, token_slots

__all__ = ["Step", "prompt_positions", "collect", "finish"]


class Step:
    """Per-forward state the hooks read: which slot and which capture each token has
    (from the per-step builder the vLLM worker uses too, ``emosteer/request/step.py``).

    ``pos`` ``[B, T]``: each token's position in its request (prompt tokens from 0, then
    the generated ones), -1 for padding."""

    def __init__(self, plan: Plan, pos: torch.Tensor, grad: bool, keep: dict[str, set[int]] | None):
        B, T = pos.shape
        self.plan, self.B, self.T, self.grad = plan, B, T, grad
        self.keep = keep or {}
        device = pos.device
        p = pos.reshape(-1).cpu().numpy().astype(np.int64)
        valid = p >= 0
        qs = np.arange(B + 1, dtype=np.int64) * T
        row = np.repeat(np.arange(B), T)
        first = np.where(valid.reshape(B, T), p.reshape(B, T), np.iinfo(np.int64).max).min(axis=1)
        first = np.where(first == np.iinfo(np.int64).max, 0, first)
        self.tok_row = torch.from_numpy(row).to(device)
        self.base_slot = torch.from_numpy(token_slots(plan.tables, row, p, qs, valid)).long().to(device)
        # The head op's per-token pool-row offset (position-aligned patches), int32 [B*T].
        off = token_row_offsets(plan.tables, p, qs)
        self.row_off = (torch.zeros(B * T, dtype=torch.int32) if off is None
                        else torch.from_numpy(off)).to(device)
        self.layout = capture_layout(plan.tables, p, qs, first, plan.info.num_layers, None, valid)
        self.acts: dict[str, dict[int, torch.Tensor]] = {"heads": {}, "mlp": {}, "residual": {}}
        # kind -> layer -> the captured tokens' rows, in token order
        self.caps: dict[str, dict[int, torch.Tensor]] = {k: {} for k in CAPTURE_KINDS}
        self.key_span: torch.Tensor | None = None  # [B, K] image index of each key, -1 = none

    def slot(self, on: torch.Tensor | None) -> torch.Tensor | None:
        """int32 token_slot for a layer whose acting slots are ``on`` (None: no op)."""
        if on is None:
            return None
        s = self.base_slot
        act = (s >= 0) & on[s.clamp(min=0)]
        if not bool(act.any()):
            return None
        return torch.where(act, s, torch.full_like(s, -1)).to(torch.int32)

    def cap_mask(self, kind: str, layer: int) -> torch.Tensor | None:
        """bool ``[B*T]``: the tokens whose ``kind`` is captured at ``layer`` (None: none)."""
        m = self.layout.layer_tokens(kind, layer)
        return None if m is None else torch.from_numpy(m).to(self.base_slot.device)


def prompt_positions(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` position of each prompt token in its row (left or right padding),
    -1 for padding."""
    m = mask.long()
    return torch.where(m.bool(), m.cumsum(1) - 1, torch.full_like(m, -1))


def collect(st: Step, store: list[dict | None], positions: list[list[int]]) -> None:
    """Hand the step's captured rows to their batch rows (``store``) and append the
    positions they were captured at."""
    new: dict[int, set[int]] = {}
    captures = st.plan.tables.captures
    for entry, kind, layer, pos, rows in st.layout.records:
        buf = st.caps[kind].get(layer)
        if buf is None:
            continue
        row = captures[entry][0]
        local = torch.from_numpy(st.layout.local_rows(kind, layer, rows)).to(buf.device)
        store[row][kind].setdefault(layer, []).append(buf[local])
        new.setdefault(row, set()).update(pos.tolist())
    for row, pos in new.items():
        positions[row].extend(sorted(pos))


def finish(plan: Plan, store: list[dict | None], positions: list[list[int]],
           spans: torch.Tensor | None = None) -> list[dict | None]:
    """Per row: captures in the vLLM layout; ``spans`` ([B, K] image index per key)
    trims attention-to-image rows to each row's own images."""
    out: list[dict | None] = []
    info = plan.info
    for row, c in enumerate(plan.captures):
        if c is None:
            out.append(None)
            continue
        e = store[row]
        res = {"heads": {}, "residual": {}, "attn_image": {}, "probe": {}, "positions": positions[row]}
        n_img = int(spans[row].max()) + 1 if spans is not None and spans.numel() else 0
        empty = {"heads": (0, info.num_heads, info.head_dim), "residual": (0, info.hidden_size),
                 "attn_image": (0, info.num_heads, n_img), "probe": (0,)}
        when = plan.specs[row].when
        gate = (when.layer,) if c.probe and when is not None else None
        for kind, sel in (("heads", c.heads), ("residual", c.residual), ("attn_image", c.attn_image),
                          ("probe", gate)):
            for l in sel or ():
                parts = e[kind].get(l, [])
                if parts:
                    t = torch.cat(parts, dim=0)
                    res[kind][l] = t[:, :, :n_img] if kind == "attn_image" else t
                else:
                    res[kind][l] = torch.empty(empty[kind])
        out.append(res)
    return out
