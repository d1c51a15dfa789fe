"""Inline vectors: a request that carries its steering vector instead of naming a bank entry.

``"vector": {"data": <base64>, "dtype": "float32" | "bfloat16", "layers": [...]}`` on a
``steer`` item: the little-endian values of one ``[d]`` row per layer of the item (its
``layers``, in ascending order; the object's own ``layers``, when given, must be the
same). The vector is named by its contents, ``"inline:<sha256>"``, and joins the bank the
request is compiled against as a residual entry (zeros at the layers it does not list),
so it is content-hashed into the vector pool exactly like a registered entry: identical
inline vectors share pool rows and slots, and the hash is part of the fingerprint and of
the prefix-cache identity. ``emosteer.client.inline_vector`` encodes a tensor.

On a ``heads`` item, ``"vector": {"data", "dtype", "heads": [...]}``: one ``[D]`` row per
head of ``heads`` (default: the item's own ``head`` list, which ``heads`` must then
include), or one ``[H, D]`` block for every head of the item's layer. It joins the bank
as a head entry (zeros at the other layers and heads), named by its contents, layer and
heads.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from emosteer.request import fields as F
from emosteer.request.fields import SpecError

if TYPE_CHECKING:
    from emosteer.request.bank import ModelInfo, VectorBank

PREFIX = "inline:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Decoded bytes of all inline vectors of one request: the ceiling checked while parsing.
# A server's own limit (plugin setting ``inline_mib``, default 16 MiB) is at most this.
MAX_INLINE_BYTES = 256 * 2**20

__all__ = ["DTYPES", "MAX_INLINE_BYTES", "PREFIX", "InlineVector", "encode", "overlay", "parse", "parse_head",
           "total_bytes"]


@dataclass(frozen=True)
class InlineVector:
    name: str  # "inline:<sha256 of dtype, layers and bytes>"
    dtype: str
    data: bytes
    field: str  # where it came from, for errors ("steer[0].vector")
    # Head items: the layer and the heads the rows belong to (None on steer items).
    layer: int | None = None
    heads: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"data": base64.b64encode(self.data).decode(), "dtype": self.dtype}
        if self.heads is not None:
            out["heads"] = list(self.heads)
        return out

    def rows(self) -> torch.Tensor:
        """The decoded ``[n, ...]`` float32 values (flat)."""
        return torch.frombuffer(bytearray(self.data), dtype=DTYPES[self.dtype]).float()

    def entry(self, layers: tuple[int, ...], info: "ModelInfo") -> torch.Tensor:
        """The ``[L, d]`` float32 residual entry: row i of the data at ``layers[i]``."""
        d = info.hidden_size
        flat = self.rows()
        if flat.numel() != len(layers) * d:
            raise SpecError(f"{self.field}.data", f"holds {flat.numel()} values; {len(layers)} layer(s) x "
                            f"hidden size {d} = {len(layers) * d} needed")
        out = torch.zeros(info.num_layers, d)
        out[list(layers)] = flat.view(len(layers), d)
        return out

    def head_entry(self, info: "ModelInfo") -> torch.Tensor:
        """The ``[L, H, D]`` float32 head entry: row i at (layer, heads[i]), or the whole
        ``[H, D]`` block of the layer."""
        L, H, D = info.num_layers, info.num_heads, info.head_dim
        assert self.layer is not None and self.heads is not None
        flat = self.rows()
        out = torch.zeros(L, H, D)
        bad = [h for h in self.heads if h >= H]
        if bad:
            raise SpecError(f"{self.field}.heads", f"head {bad[0]} out of range; the model has {H} heads")
        if self.layer >= L:
            raise SpecError(self.field.rsplit(".", 1)[0] + ".layer",
                            f"layer {self.layer} out of range; the model has {L} layers (0..{L - 1})")
        if flat.numel() == len(self.heads) * D:
            out[self.layer, list(self.heads)] = flat.view(len(self.heads), D)
        elif flat.numel() == H * D:
            out[self.layer] = flat.view(H, D)
        else:
            raise SpecError(f"{self.field}.data", f"holds {flat.numel()} values; {len(self.heads)} head(s) x "
                            f"head size {D} = {len(self.heads) * D}, or all {H} heads x {D} = {H * D}, needed")
        return out

def _decode(value: Any, field: str, keys: tuple[str, ...]) -> tuple[str, bytes]:
    """The dtype and the decoded, finite bytes of an inline vector object."""
    F.obj(value, field, keys, ("data", "dtype"))
    dtype = F.choice(value["dtype"], f"{field}.dtype", tuple(DTYPES))
    raw = value["data"]
    if not isinstance(raw, str):
        raise SpecError(f"{field}.data", f"must be a base64 string, got {F.type_name(raw)}")
    if len(raw) > MAX_INLINE_BYTES * 4 // 3 + 4:
        raise SpecError(f"{field}.data", f"is larger than {MAX_INLINE_BYTES} bytes decoded")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SpecError(f"{field}.data", f"is not valid base64: {e}") from None
    size = torch.empty((), dtype=DTYPES[dtype]).element_size()
    if not data or len(data) % size:
        raise SpecError(f"{field}.data", f"holds {len(data)} bytes, not a whole number of {dtype} values")
    if not bool(torch.isfinite(torch.frombuffer(bytearray(data), dtype=DTYPES[dtype])).all()):
        raise SpecError(f"{field}.data", "holds NaN or Inf")
    return dtype, data


def parse(value: Any, field: str, layers: tuple[int, ...] | None) -> tuple[InlineVector, tuple[int, ...] | None]:
    """An inline vector object; returns it and the layer list it fixes (None: the item's)."""
    dtype, data = _decode(value, field, ("data", "dtype", "layers"))
    own = None
    if "layers" in value:
        own = F.layers(value["layers"], f"{field}.layers", allow_all=False)
        if layers is not None and own != layers:
            raise SpecError(f"{field}.layers", f"lists layers {list(own)}, the item's layers are {list(layers)}")
    h = hashlib.sha256(f"{dtype}|{list(own or layers or [])}|".encode() + data).hexdigest()
    return InlineVector(PREFIX + h, dtype, data, field), own


def parse_head(value: Any, field: str, layer: int, heads: tuple[int, ...]) -> InlineVector:
    """The inline vector object of a ``heads`` item on ``layer`` listing ``heads``."""
    dtype, data = _decode(value, field, ("data", "dtype", "heads"))
    rows = heads
    if "heads" in value:
        raw = value["heads"]
        if not isinstance(raw, list) or not raw:
            raise SpecError(f"{field}.heads", f"must be a non-empty list of head indices, got {F.type_name(raw)}")
        rows = tuple(F.integer(h, f"{field}.heads[{i}]") for i, h in enumerate(raw))  # in the data's order
        if min(rows) < 0 or len(set(rows)) != len(rows):
            raise SpecError(f"{field}.heads", f"must list distinct head indices >= 0, got {list(rows)}")
        missing = [h for h in heads if h not in rows]
        if missing:
            raise SpecError(f"{field}.heads", f"has no row for head {missing[0]} of the item")
    h = hashlib.sha256(f"head|{dtype}|{layer}|{list(rows)}|".encode() + data).hexdigest()
    return InlineVector(PREFIX + h, dtype, data, field, layer=layer, heads=tuple(rows))


def overlay(bank: "VectorBank | None", info: "ModelInfo", items) -> "VectorBank | None":
    """``bank`` plus the inline vectors of ``items``: steer items (``inline`` set and
    explicit layers: resolve "all" first, or pass ``info`` to resolve it here) and head
    items (the heads of one item share one vector, counted once)."""
    extra = {}
    total = 0
    for it in items:
        iv = getattr(it, "inline", None)
        if iv is None or iv.name in extra:
            continue
        total += len(iv.data)
        if total > MAX_INLINE_BYTES:
            raise SpecError(iv.field, f"the request's inline vectors exceed {MAX_INLINE_BYTES} bytes")
        if iv.heads is not None:
            extra[iv.name] = ("head", iv.head_entry(info))
            continue
        layers = it.layers if it.layers is not None else tuple(range(info.num_layers))
        extra[iv.name] = ("residual", iv.entry(layers, info))
    if not extra:
        return bank
    from emosteer.request.bank import VectorBank

    return (bank if bank is not None else VectorBank(info)).overlay(extra)


def total_bytes(items) -> int:
    """Decoded bytes of the distinct inline vectors of ``items``."""
    seen: dict[str, int] = {}
    for it in items:
        iv = getattr(it, "inline", None)
        if iv is not None:
            seen[iv.name] = len(iv.data)
    return sum(seen.values())


def encode(tensor: torch.Tensor, dtype: str = "float32", layers=None, heads=None) -> dict:
    """The JSON object of an inline vector: ``tensor`` ``[n, d]`` (or ``[d]``), one row per
    layer of a steer item (or per head of a heads item: ``[n, D]`` with ``heads``, or
    ``[H, D]``), as little-endian ``dtype`` in base64."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    t = tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
    out = {"data": base64.b64encode(t.view(-1).view(torch.uint8).numpy().tobytes()).decode(), "dtype": dtype}
    if layers is not None:
        out["layers"] = sorted(int(x) for x in layers)
    if heads is not None:
        out["heads"] = [int(x) for x in heads]
    return out
