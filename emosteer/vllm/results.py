"""Request results (captures and errors) as the workers hand them out, merged over
tensor-parallel ranks; one implementation for the offline API (``emosteer.LLM``) and the
HTTP route (``GET /v1/emosteer/captures/{key}``).

A worker returns, per result key, ``{"error", "positions", "tensors"}`` with the tensors
as one safetensors blob named ``heads.<layer>`` ([P, H/tp, D]), ``residual.<layer>``
([P, d]), ``attn_image.<layer>`` ([P, H/tp, images]: attention mass on each image's
keys) and ``probe.<layer>`` ([P] float32: the gate's probe score at its layer, NaN where
the gate did not score the token). Heads are concatenated in rank order (global head order); the residual is
replicated over ranks, so rank 0's is taken.
"""

from __future__ import annotations

import json
from typing import Any

import torch


KINDS = ("heads", "residual", "attn_image", "probe")


def merge_results(per_rank: list[dict], keys: dict[str, str]) -> dict[str, dict]:
    """Client key -> ``{"error": str | None, "captures": None | {"heads": {layer: T},
    "residual": {layer: T}, "attn_image": {layer: T}, "positions": [...]}}`` for the keys
    some worker held. ``keys`` maps each client key to the key the workers filed its
    results under (``FrontendSteering.worker_keys``)."""
    from safetensors.torch import load

    out: dict[str, dict] = {}
    for key, wkey in keys.items():
        parts = [r.get(wkey) for r in per_rank]
        if parts[0] is None:
            continue
        error = next((p["error"] for p in parts if p and p.get("error")), None)
        loaded = [load(p["tensors"]) if p and p.get("tensors") else {} for p in parts]
        got: dict[str, dict[int, torch.Tensor]] = {k: {} for k in KINDS}
        for name in loaded[0]:
            kind, layer = name.split(".")
            if kind in ("heads", "attn_image"):  # sharded by head over the ranks
                got[kind][int(layer)] = torch.cat([ld[name] for ld in loaded], dim=1)
            else:
                got[kind][int(layer)] = loaded[0][name]
        captures = None
        if any(got.values()):
            captures = {k: dict(sorted(got[k].items())) for k in KINDS}
            captures["positions"] = list(parts[0]["positions"])
        out[key] = {"error": error, "captures": captures}
    return out


def to_json(key: str, result: dict) -> dict:
    """A merged result as plain JSON (nested lists, layers as string keys)."""
    caps = result.get("captures")
    body: dict[str, Any] = {"key": key, "error": result.get("error"), "positions": [],
                            **{k: {} for k in KINDS}}
    if caps:
        body["positions"] = caps["positions"]
        for k in KINDS:
            body[k] = {str(layer): t.float().tolist() for layer, t in caps.get(k, {}).items()}
    return body


def to_safetensors(key: str, result: dict) -> bytes:
    """A merged result as one safetensors file: tensors ``heads.<layer>`` [P, H, D],
    ``residual.<layer>`` [P, d] and ``attn_image.<layer>`` [P, H, images]; metadata
    ``emosteer`` = JSON {key, error, positions}."""
    from safetensors.torch import save

    caps = result.get("captures") or {"positions": []}
    tensors = {f"{k}.{layer}": t.contiguous() for k in KINDS for layer, t in caps.get(k, {}).items()}
    meta = {"key": key, "error": result.get("error"), "positions": caps["positions"]}
    return save(tensors, metadata={"emosteer": json.dumps(meta)})
