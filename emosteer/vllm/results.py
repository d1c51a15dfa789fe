"""Request results (captures and errors) as the workers hand them out, merged over
tensor-parallel ranks; one implementation for the offline API (``emosteer.LLM``) and the
HTTP route (``GET /v1/emosteer/captures/{key}``).

A worker returns, per result key, ``{"error", "positions", "tensors"}`` with the tensors
as one safetensors blob named ``heads.<layer>`` ([P, H/tp, D]) and ``residual.<layer>``
([P, d]). Heads are concatenated in rank order (global head order); the residual is
replicated over ranks, so rank 0's is taken.
"""

from __future__ import annotations

import json
from typing import Any

import torch


def merge_results(per_rank: list[dict], keys: list[str]) -> dict[str, dict]:
    """key -> ``{"error": str | None, "captures": None | {"heads": {layer: T}, "residual":
    {layer: T}, "positions": [...]}}`` for the keys some worker held."""
    from safetensors.torch import load

    out: dict[str, dict] = {}
    for key in keys:
        parts = [r.get(key) for r in per_rank]
        if parts[0] is None:
            continue
        error = next((p["error"] for p in parts if p and p.get("error")), None)
        loaded = [load(p["tensors"]) if p and p.get("tensors") else {} for p in parts]
        heads: dict[int, torch.Tensor] = {}
        residual: dict[int, torch.Tensor] = {}
        for name in loaded[0]:
            kind, layer = name.split(".")
            if kind == "heads":
                heads[int(layer)] = torch.cat([ld[name] for ld in loaded], dim=1)
            else:
                residual[int(layer)] = loaded[0][name]
        captures = None
        if heads or residual:
            captures = {
                "heads": dict(sorted(heads.items())),
                "residual": dict(sorted(residual.items())),
                "positions": list(parts[0]["positions"]),
            }
        out[key] = {"error": error, "captures": captures}
    return out


def to_json(key: str, result: dict) -> dict:
    """A merged result as plain JSON (nested lists, layers as string keys)."""
    caps = result.get("captures")
    body: dict[str, Any] = {"key": key, "error": result.get("error"), "positions": [],
                            "heads": {}, "residual": {}}
    if caps:
        body["positions"] = caps["positions"]
        body["heads"] = {str(layer): t.float().tolist() for layer, t in caps["heads"].items()}
        body["residual"] = {str(layer): t.float().tolist() for layer, t in caps["residual"].items()}
    return body


def to_safetensors(key: str, result: dict) -> bytes:
    """A merged result as one safetensors file: tensors ``heads.<layer>`` [P, H, D] and
    ``residual.<layer>`` [P, d]; metadata ``emosteer`` = JSON {key, error, positions}."""
    from safetensors.torch import save

    caps = result.get("captures") or {"heads": {}, "residual": {}, "positions": []}
    tensors = {f"heads.{layer}": t.contiguous() for layer, t in caps["heads"].items()}
    tensors.update({f"residual.{layer}": t.contiguous() for layer, t in caps["residual"].items()})
    meta = {"key": key, "error": result.get("error"), "positions": caps["positions"]}
    return save(tensors, metadata={"emosteer": json.dumps(meta)})
