"""Inline vectors: a request that carries its steering vector instead of naming a bank entry.

``"vector": {"data": <base64>, "dtype": "float32" | "bfloat16", "layers": [...]}`` on a
``steer`` item: the little-endian values of one ``[d]`` row per layer of the item (its
``layers``, in ascending order; the object's own ``layers``, when given, must be the
same). The vector is named by its contents, ``"inline:<sha256>"``, and joins the bank the
request is compiled against as a residual entry (zeros at the layers it does not list),
so it is content-hashed into the vector pool exactly like a registered entry: identical
inline vectors share pool rows and slots, and the hash is part of the fingerprint and of
the prefix-cache identity. ``emosteer.client.inline_vector`` encodes a tensor.
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
MAX_INLINE_BYTES = 16 * 2**20  # decoded bytes of all inline vectors of one request

__all__ = ["DTYPES", "MAX_INLINE_BYTES", "PREFIX", "InlineVector", "encode", "overlay", "parse"]


@dataclass(frozen=True)
class InlineVector:
    name: str  # "inline:<sha256 of dtype, layers and bytes>"
    dtype: str
    data: bytes
    field: str  # where it came from, for errors ("steer[0].vector")

    def to_json(self) -> dict:
        return {"data": base64.b64encode(self.data).decode(), "dtype": self.dtype}

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


def parse(value: Any, field: str, layers: tuple[int, ...] | None) -> tuple[InlineVector, tuple[int, ...] | None]:
    """An inline vector object; returns it and the layer list it fixes (None: the item's)."""
    F.obj(value, field, ("data", "dtype", "layers"), ("data", "dtype"))
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
    own = None
    if "layers" in value:
        own = F.layers(value["layers"], f"{field}.layers", allow_all=False)
        if layers is not None and own != layers:
            raise SpecError(f"{field}.layers", f"lists layers {list(own)}, the item's layers are {list(layers)}")
    iv = InlineVector("", dtype, data, field)
    if not bool(torch.isfinite(iv.rows()).all()):
        raise SpecError(f"{field}.data", "holds NaN or Inf")
    h = hashlib.sha256(f"{dtype}|{list(own or layers or [])}|".encode() + data).hexdigest()
    return InlineVector(PREFIX + h, dtype, data, field), own


def overlay(bank: "VectorBank | None", info: "ModelInfo", items) -> "VectorBank | None":
    """``bank`` plus the inline vectors of ``items`` (steer items with ``inline`` set and
    explicit layers: resolve "all" first, or pass ``info`` to resolve it here)."""
    extra = {}
    total = 0
    for it in items:
        iv = getattr(it, "inline", None)
        if iv is None:
            continue
        total += len(iv.data)
        if total > MAX_INLINE_BYTES:
            raise SpecError(iv.field, f"the request's inline vectors exceed {MAX_INLINE_BYTES} bytes")
        layers = it.layers if it.layers is not None else tuple(range(info.num_layers))
        extra[iv.name] = ("residual", iv.entry(layers, info))
    if not extra:
        return bank
    from emosteer.request.bank import VectorBank

    return (bank if bank is not None else VectorBank(info)).overlay(extra)


def encode(tensor: torch.Tensor, dtype: str = "float32", layers=None) -> dict:
    """The JSON object of an inline vector: ``tensor`` ``[n, d]`` (or ``[d]``), one row per
    layer of the item, as little-endian ``dtype`` in base64."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    t = tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
    out = {"data": base64.b64encode(t.view(-1).view(torch.uint8).numpy().tobytes()).decode(), "dtype": dtype}
    if layers is not None:
        out["layers"] = sorted(int(x) for x in layers)
    return out
