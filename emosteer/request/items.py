"""The residual items of a request config and its probe gate: ``steer`` and ``when``.

Parsed by ``SteerSpec.parse`` (``spec.py``), checked with the same field parsers
(``fields.py``) and position model (``positions.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from emosteer.request import fields as F
from emosteer.request import inline as inline_vec
from emosteer.request import positions as pos_model
from emosteer.request.fields import SpecError
from emosteer.request.inline import InlineVector
from emosteer.request.positions import Positions

__all__ = ["MAX_BASIS", "SCALE_MODES", "STEER_MODES", "GateItem", "SteerItem", "parse_steer", "parse_when"]


STEER_MODES = ("add", "clamp", "project_out")
SCALE_MODES = ("absolute", "relative")
MAX_BASIS = 8  # vectors a project_out item may list (its subspace)


@dataclass(frozen=True)
class SteerItem:
    """An intervention on the residual output of each layer l (``layers=None`` = every
    layer), along ``v = bank[vector][l]`` (``v^`` = v / |v|, ``h`` the residual):

    * ``add`` (default): ``h += scale * v``; with ``scale_mode="relative"``
      ``h += scale * |h| * v^`` (``scale`` reads like the paper's alpha). Items on one
      layer add up.
    * ``clamp``: the component of h along v^ is set to ``value`` (absolute) or to
      ``scale * |h|`` (relative).
    * ``project_out``: the component along v^ is removed; ``vector`` may list several
      names, whose span (an orthonormal basis of it per layer) is removed.

    Every item of a layer reads the residual as it enters the layer's steering."""

    vector: str | tuple[str, ...]
    layers: tuple[int, ...] | None
    scale: float = 0.0
    positions: Positions = "all"
    mode: str = "add"
    scale_mode: str = "absolute"
    value: float | None = None  # clamp target (absolute clamps)
    inline: InlineVector | None = None  # the vector carried by the request (``inline.py``)

    def names(self) -> tuple[str, ...]:
        return self.vector if isinstance(self.vector, tuple) else (self.vector,)

    def to_dict(self) -> dict:
        vector: Any = list(self.vector) if isinstance(self.vector, tuple) else self.vector
        if self.inline is not None:  # the request's own data, so that the dict round-trips
            vector = self.inline.to_json()
        d: dict[str, Any] = {
            "vector": vector,
            "layers": "all" if self.layers is None else list(self.layers),
        }
        if self.mode != "project_out" and self.value is None:
            d["scale"] = self.scale
        d["positions"] = pos_model.to_json(self.positions)
        if self.mode != "add":
            d["mode"] = self.mode
        if self.scale_mode != "absolute":
            d["scale_mode"] = self.scale_mode
        if self.value is not None:
            d["value"] = self.value
        return d


@dataclass(frozen=True)
class GateItem:
    """Probe-gated steering: at layer ``layer`` the probe ``probe`` (a bank entry of kind
    "probe", ``w = entry[layer, :d]``, ``b = entry[layer, d]``) scores each token's
    residual, ``p = w . h + b``; the config's interventions at later layers act on a
    token only where ``p > threshold`` (``below``: ``p < threshold``), or, with
    ``latch``, from the first token of the request where that held on."""

    probe: str
    layer: int
    threshold: float
    below: bool = False
    latch: bool = False

    def to_dict(self) -> dict:
        return {"probe": self.probe, "layer": self.layer,
                ("below" if self.below else "above"): self.threshold, "latch": self.latch}


def parse_steer(value: Any, field: str) -> SteerItem:
    F.obj(value, field, ("vector", "layers", "scale", "positions", "mode", "scale_mode", "value"),
          ("vector",))
    if "layers" not in value and not isinstance(value["vector"], dict):
        raise SpecError(f"{field}.layers", "is required")
    mode = F.choice(value.get("mode", "add"), f"{field}.mode", STEER_MODES)
    scale_mode = F.choice(value.get("scale_mode", "absolute"), f"{field}.scale_mode", SCALE_MODES)
    raw = value["vector"]
    inline = None
    layers = F.layers(value["layers"], f"{field}.layers") if "layers" in value else None
    if isinstance(raw, dict):
        inline, own = inline_vec.parse(raw, f"{field}.vector", layers)
        if "layers" not in value:
            if own is None:
                raise SpecError(f"{field}.layers", "is required (or give the inline vector's layers)")
            layers = own
        vector: str | tuple[str, ...] = inline.name
    elif isinstance(raw, list) and mode == "project_out":
        if not raw or len(raw) > MAX_BASIS:
            raise SpecError(f"{field}.vector", f"must list 1 to {MAX_BASIS} vector names, got {len(raw)}")
        names = tuple(F.name(v, f"{field}.vector[{i}]") for i, v in enumerate(raw))
        if len(set(names)) != len(names):
            raise SpecError(f"{field}.vector", f"lists a vector twice: {list(names)}")
        vector = names if len(names) > 1 else names[0]
    else:
        vector = F.name(raw, f"{field}.vector")

    def needs(key: str, why: str) -> None:
        if key not in value:
            raise SpecError(f"{field}.{key}", f"is required {why}")

    def forbids(key: str, why: str) -> None:
        if key in value:
            raise SpecError(f"{field}.{key}", f"is not allowed {why}")

    scale, target = 0.0, None
    if mode == "project_out":
        for key in ("scale", "value", "scale_mode"):
            forbids(key, "for mode 'project_out' (it removes the whole component)")
    elif mode == "clamp" and scale_mode == "absolute":
        needs("value", "for an absolute clamp (the component to set)")
        forbids("scale", "for an absolute clamp; give value, or scale_mode 'relative' and scale")
        target = F.scale(value["value"], f"{field}.value")
    else:
        needs("scale", f"for mode {mode!r}" + (" with scale_mode 'relative'" if mode == "clamp" else ""))
        forbids("value", f"for mode {mode!r}" + (" with scale_mode 'relative'" if mode == "clamp" else ""))
        scale = F.scale(value["scale"], f"{field}.scale")
    return SteerItem(
        vector=vector,
        layers=layers,
        scale=scale,
        positions=pos_model.parse(value.get("positions", "all"), f"{field}.positions"),
        mode=mode,
        scale_mode=scale_mode,
        value=target,
        inline=inline,
    )


def parse_when(value: Any, field: str) -> GateItem:
    F.obj(value, field, ("probe", "layer", "above", "below", "latch"), ("probe", "layer"))
    if ("above" in value) == ("below" in value):
        raise SpecError(field, 'give exactly one of "above" and "below" (the threshold of the probe score)')
    below = "below" in value
    latch = value.get("latch", False)
    if not isinstance(latch, bool):
        raise SpecError(f"{field}.latch", f"must be true or false, got {latch!r}")
    return GateItem(
        probe=F.name(value["probe"], f"{field}.probe"),
        layer=F.integer(value["layer"], f"{field}.layer"),
        threshold=F.number(value["below" if below else "above"], f"{field}.{'below' if below else 'above'}"),
        below=below,
        latch=latch,
    )
