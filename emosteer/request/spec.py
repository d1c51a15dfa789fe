"""What one request asks for: steering, head patching, neuron gain, boost and capture.

A ``SteerSpec`` is parsed from the JSON object a request carries (docs/DESIGN.md §4), checked
strictly (unknown keys, wrong types, NaN/inf and absurd values raise ``SpecError`` whose
``.field`` names the culprit, e.g. ``"steer[0].scale"``; the field parsers are in
``fields.py``, what a position means in ``positions.py``), validated against a vector
bank and a model, and fingerprinted so that identical configs share one device slot.
``emosteer.request.schema.json_schema()`` is the published schema of the same object.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from emosteer.request import fields as F
from emosteer.request import inline as inline_vec
from emosteer.request.inline import InlineVector
from emosteer.request import positions as pos_model
from emosteer.request.fields import MAX_ABS_SCALE, MAX_GAIN, SpecError
from emosteer.request.items import (
    MAX_BASIS, SCALE_MODES, STEER_MODES, GateItem, SteerItem, parse_steer, parse_when,
)  # fmt: skip
from emosteer.request.positions import CAPTURE_POSITIONS, MAX_POSITIONS, POSITIONS, Positions

if TYPE_CHECKING:
    from emosteer.request.bank import ModelInfo, VectorBank

MAX_CAPTURE_ROWS = 4096
MAX_STEER_ITEMS = 1024  # steer items per request
MAX_HEAD_ITEMS = 65536  # head items per request after expanding "head" lists
FINGERPRINT_VERSION = 1

SALT_PREFIX = "emosteer@"  # reserved: a client cache_salt containing it is refused
HEAD_MODES = ("add", "patch", "ablate", "scale")


# -- items ----------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadItem:
    """``z[l,h] <- a*z + b*v`` on the head output: add (a=1, b=scale, v=vec[l,h]),
    patch (a=0, b=1, v=vec[l,h]), ablate (a=0, b=0), scale (a=scale, b=0). An add with
    ``scale_mode="relative"`` adds ``scale * |z| * v / |v|`` instead: a fraction of the
    head's own output norm, per token (the op's ``c = scale / |v|``, ``b = 0``)."""

    layer: int
    head: int
    mode: Literal["add", "patch", "ablate", "scale"]
    vector: str | None = None
    scale: float = 1.0
    positions: Positions = "all"
    # Internal (never parsed): the index into a "head_positions" vector [N, L, H, D]
    # this item reads, set by the compiler for one listed position.
    at: int | None = None
    inline: InlineVector | None = None  # the vector carried by the request (``inline.py``)
    scale_mode: Literal["absolute", "relative"] = "absolute"  # add only

    @property
    def relative(self) -> bool:
        return self.scale_mode == "relative"

    @property
    def reads_vector(self) -> bool:
        """Whether the op reads this item's vector (an add of scale 0 reads none)."""
        return self.vector is not None and (self.affine()[1] != 0.0 or (self.relative and self.scale != 0.0))

    def affine(self) -> tuple[float, float]:
        """The (a, b) pair of the head-affine op for this item (a relative add's b is 0:
        its coefficient of v is ``c * |z|``, from ``compile``)."""
        return {
            "add": (1.0, 0.0 if self.relative else self.scale),
            "patch": (0.0, 1.0),
            "ablate": (0.0, 0.0),
            "scale": (self.scale, 0.0),
        }[self.mode]

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"layer": self.layer, "head": self.head, "mode": self.mode}
        if self.vector is not None:
            # an inline vector as the request's own data, so that the dict round-trips
            d["vector"] = self.inline.to_json() if self.inline is not None else self.vector
        if self.mode in ("add", "scale"):
            d["scale"] = self.scale
        if self.relative:
            d["scale_mode"] = self.scale_mode
        d["positions"] = pos_model.to_json(self.positions)
        if self.at is not None:
            d["at"] = self.at
        return d


def head_norm(bank: "VectorBank", item: HeadItem) -> float:
    """``|v|`` of a head item's vector at its (layer, head), in float32: what a relative
    add divides its scale by (the spec check refuses 0)."""
    return float(bank.get(item.vector, "head")[item.layer, item.head].float().norm())


@dataclass(frozen=True)
class NeuronItem:
    """ENA: gain ``g[l,i] = 1 + (gamma-1)*mask[l,i]`` on the MLP activation."""

    set: str
    gamma: float
    positions: Positions = "all"

    def to_dict(self) -> dict:
        return {"set": self.set, "gamma": self.gamma, "positions": pos_model.to_json(self.positions)}


BOOST_MODES = ("weight", "logit")
MAX_IMAGES = 8  # image spans per request that VEE and attn_image captures see


@dataclass(frozen=True)
class BoostItem:
    """VEE: at the heads of mask ``heads`` [L, H], the attention of a query on the
    request's image keys is amplified by ``beta`` and the softmax renormalises.

    ``mode="weight"`` (default) multiplies the softmax weight of every image key by
    beta before renormalising (= adds log beta to its logit, whatever the logit's sign);
    ``mode="logit"`` multiplies the logit itself. ``prefill_layers`` / ``decode_layers``
    restrict the layers per phase (the paper's rule: shallow-to-middle layers while the
    prompt is read, deep layers while the narrative is written); ``None`` = every layer
    of the mask, ``()`` = none in that phase. beta = 1 is exactly plain attention."""

    heads: str
    beta: float
    mode: str = "weight"
    prefill_layers: tuple[int, ...] | None = None
    decode_layers: tuple[int, ...] | None = None

    def layers_for(self, phase: str) -> tuple[int, ...] | None:
        """The layer selection of ``phase`` ("prompt" or "generated")."""
        return self.prefill_layers if phase == "prompt" else self.decode_layers

    def to_dict(self) -> dict:
        sel = lambda v: "all" if v is None else ("none" if v == () else list(v))  # noqa: E731
        return {"heads": self.heads, "beta": self.beta, "mode": self.mode,
                "prefill_layers": sel(self.prefill_layers), "decode_layers": sel(self.decode_layers)}


def _phase_layers(value: Any, field: str) -> tuple[int, ...] | None:
    if value == "none":
        return ()
    return F.layers(value, field)


@dataclass(frozen=True)
class CaptureItem:
    """Which activations to return. ``heads`` / ``residual`` / ``attn_image``: layers, ``"all"`` (until
    ``SteerSpec.resolve`` makes it explicit) or None (nothing). ``positions``: "last" =
    the last prompt token, "all" = every prompt and generated token, "generated"."""

    heads: tuple[int, ...] | Literal["all"] | None = None
    residual: tuple[int, ...] | Literal["all"] | None = None
    positions: Literal["last", "all", "generated"] = "last"
    # Layers whose attention mass on the request's image keys is returned, per captured
    # position, head and image ([P, H, images]).
    attn_image: tuple[int, ...] | Literal["all"] | None = None
    # The gate's probe score per captured position (needs "when").
    probe: bool = False

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        for key in ("heads", "residual", "attn_image"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value if value == "all" else list(value)
        if self.probe:
            d["probe"] = True
        d["positions"] = self.positions
        return d

    def rows(self, num_layers: int, num_tokens: int) -> int:
        """Captured rows (one row = one token at one layer, heads and residual counted
        apart) for a request whose captured positions number ``num_tokens``."""
        count = 0
        for value in (self.heads, self.residual, self.attn_image):
            if value is not None:
                count += num_layers if value == "all" else len(value)
        return (count + int(self.probe)) * num_tokens


def _parse_heads(value: Any, field: str) -> list[HeadItem]:
    F.obj(value, field, ("layer", "head", "mode", "vector", "scale", "scale_mode", "positions"),
          ("layer", "head", "mode"))
    layer = F.integer(value["layer"], f"{field}.layer")
    mode = F.choice(value["mode"], f"{field}.mode", HEAD_MODES)
    heads = F.layers(value["head"], f"{field}.head", allow_all=False)
    assert heads is not None
    vector = inline = None
    if mode in ("add", "patch"):
        if "vector" not in value:
            raise SpecError(f"{field}.vector", f"is required for mode {mode!r}")
        if isinstance(value["vector"], dict):
            inline = inline_vec.parse_head(value["vector"], f"{field}.vector", layer, heads)
            vector = inline.name
        else:
            vector = F.name(value["vector"], f"{field}.vector")
    elif "vector" in value:
        raise SpecError(f"{field}.vector", f"is not allowed for mode {mode!r}")
    scale = 1.0
    if mode == "scale":
        if "scale" not in value:
            raise SpecError(f"{field}.scale", "is required for mode 'scale'")
        scale = F.scale(value["scale"], f"{field}.scale")
    elif mode == "add":
        scale = F.scale(value.get("scale", 1.0), f"{field}.scale")
    elif "scale" in value:
        raise SpecError(f"{field}.scale", f"is not allowed for mode {mode!r}")
    scale_mode = F.choice(value.get("scale_mode", "absolute"), f"{field}.scale_mode", SCALE_MODES)
    if scale_mode == "relative" and mode != "add":
        raise SpecError(f"{field}.scale_mode", f"'relative' is for mode 'add' only, not {mode!r}")
    positions = pos_model.parse(value.get("positions", "all"), f"{field}.positions")
    return [HeadItem(layer, h, mode, vector, scale, positions, inline=inline, scale_mode=scale_mode)
            for h in heads]


def _parse_capture(value: Any, field: str) -> CaptureItem:
    F.obj(value, field, ("heads", "residual", "attn_image", "probe", "positions"))
    sel = {}
    for key in ("heads", "residual", "attn_image"):
        if key not in value:
            sel[key] = None
        else:
            raw = value[key]
            parsed = F.layers(raw, f"{field}.{key}")
            sel[key] = "all" if parsed is None else parsed
    probe = value.get("probe", False)
    if not isinstance(probe, bool):
        raise SpecError(f"{field}.probe", f"must be true or false, got {probe!r}")
    if sel["heads"] is None and sel["residual"] is None and sel["attn_image"] is None and not probe:
        raise SpecError(field, 'captures nothing; give "heads", "residual", "attn_image" and/or "probe"')
    positions = F.choice(value.get("positions", "last"), f"{field}.positions", CAPTURE_POSITIONS)
    return CaptureItem(sel["heads"], sel["residual"], positions, sel["attn_image"], probe)


# -- the request ----------------------------------------------------------------------
@dataclass(frozen=True)
class SteerSpec:
    """One request's emosteer config (immutable, hashable, JSON round-trippable)."""

    steer: tuple[SteerItem, ...] = ()
    heads: tuple[HeadItem, ...] = ()
    neurons: NeuronItem | None = None
    boost: BoostItem | None = None
    capture: CaptureItem | None = None
    when: GateItem | None = None

    @classmethod
    def parse(cls, obj: "dict | str | SteerSpec | None") -> "SteerSpec":
        """From a dict, a JSON string, a SteerSpec (returned as is) or None (empty)."""
        if obj is None:
            return cls()
        if isinstance(obj, SteerSpec):
            return obj
        if isinstance(obj, (str, bytes)):
            try:
                obj = json.loads(obj)  # NaN/Infinity parse to floats; _num names their field
            except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
                raise SpecError("spec", f"is not valid JSON: {e}") from None
            except RecursionError:
                raise SpecError("spec", "is nested too deeply") from None
        F.obj(obj, "", ("steer", "heads", "neurons", "boost", "capture", "when"))
        steer: list[SteerItem] = []
        if "steer" in obj:
            if not isinstance(obj["steer"], list):
                raise SpecError("steer", f"must be a list of objects, got {F.type_name(obj['steer'])}")
            if len(obj["steer"]) > MAX_STEER_ITEMS:
                raise SpecError("steer", f"has {len(obj['steer'])} items; the limit is {MAX_STEER_ITEMS}")
            steer = [parse_steer(v, f"steer[{i}]") for i, v in enumerate(obj["steer"])]
        heads: list[HeadItem] = []
        if "heads" in obj:
            if not isinstance(obj["heads"], list):
                raise SpecError("heads", f"must be a list of objects, got {F.type_name(obj['heads'])}")
            # one (a, b, v) per head and token: a head may be set twice only for disjoint
            # positions ("prompt" and "generated")
            seen: dict[tuple[int, int], list[tuple[str, int]]] = {}
            for i, v in enumerate(obj["heads"]):
                for item in _parse_heads(v, f"heads[{i}]"):
                    key = (item.layer, item.head)
                    for pos, j in seen.get(key, ()):
                        if pos_model.overlap(pos, item.positions):
                            raise SpecError(
                                f"heads[{i}].head",
                                f"layer {key[0]} head {key[1]} is already set by heads[{j}] for "
                                f"positions {pos_model.to_json(pos)!r}; one intervention per head and position",
                            )
                    seen.setdefault(key, []).append((item.positions, i))
                    heads.append(item)
                if len(heads) > MAX_HEAD_ITEMS:
                    raise SpecError("heads", f"expands to more than {MAX_HEAD_ITEMS} (layer, head) items")
        neurons = boost = capture = None
        if "neurons" in obj:
            v = F.obj(obj["neurons"], "neurons", ("set", "gamma", "positions"), ("set", "gamma"))
            neurons = NeuronItem(
                F.name(v["set"], "neurons.set"),
                F.gain(v["gamma"], "neurons.gamma"),
                pos_model.parse(v.get("positions", "all"), "neurons.positions"),
            )
        if "boost" in obj:
            v = F.obj(obj["boost"], "boost", ("heads", "beta", "mode", "prefill_layers", "decode_layers"),
                     ("heads", "beta"))
            boost = BoostItem(
                F.name(v["heads"], "boost.heads"),
                F.gain(v["beta"], "boost.beta"),
                F.choice(v.get("mode", "weight"), "boost.mode", BOOST_MODES),
                _phase_layers(v.get("prefill_layers", "all"), "boost.prefill_layers"),
                _phase_layers(v.get("decode_layers", "all"), "boost.decode_layers"),
            )
            if boost.prefill_layers == () and boost.decode_layers == ():
                raise SpecError("boost", 'acts nowhere: prefill_layers and decode_layers are both "none"')
        if "capture" in obj:
            capture = _parse_capture(obj["capture"], "capture")
        when = parse_when(obj["when"], "when") if "when" in obj else None
        if capture is not None and capture.probe and when is None:
            raise SpecError("capture.probe", 'needs a gate ("when") whose probe score it returns')
        out = cls(tuple(steer), tuple(heads), neurons, boost, capture, when)
        if when is not None and not out.acts_after(when.layer):
            raise SpecError("when.layer", f"no intervention acts after layer {when.layer}: the gate "
                            "would change nothing (it gates the interventions of later layers)")
        return out

    def acts_after(self, layer: int) -> bool:
        """Whether some intervention acts at a layer after ``layer`` (neurons and "all"
        layer selections: assumed to, as the model's depth is not known here)."""
        if any(s.layers is None or max(s.layers) > layer for s in self.steer):
            return True
        if any(h.layer > layer for h in self.heads) or self.neurons is not None:
            return True
        b = self.boost
        return b is not None and any(sel is None or (sel and max(sel) > layer)
                                     for sel in (b.prefill_layers, b.decode_layers))

    # -- checks against a model --------------------------------------------------------
    def validate(
        self,
        bank: "VectorBank | None",
        info: "ModelInfo",
        num_prompt_tokens: int | None = None,
        max_new_tokens: int | None = None,
    ) -> None:
        """Vector names exist with the right kind and shape; layers and heads in range;
        at most MAX_CAPTURE_ROWS captured rows (counted when the token counts are given,
        or always for positions "last")."""
        L, H = info.num_layers, info.num_heads
        bank = inline_vec.overlay(bank, info, self.inline_items())

        def vec(name: str, kind: str, field: str) -> None:
            if bank is None or name not in bank:
                known = ", ".join(bank.names(kind)[:20]) if bank is not None else ""
                raise SpecError(field, f"no vector {name!r} in the bank (known {kind}: {known or 'none'})")
            if bank.kind(name) != kind:
                raise SpecError(field, f"vector {name!r} is of kind {bank.kind(name)!r}, needs {kind!r}")
            got, want = tuple(bank.get(name).shape), info.shape_of(kind)
            if got != want:
                raise SpecError(field, f"vector {name!r} has shape {got}, the model needs {want}")

        def layers_ok(layers: Any, field: str) -> None:
            if layers is None or layers == "all":
                return
            for layer in layers:
                if layer >= L:
                    raise SpecError(field, f"layer {layer} out of range; the model has {L} layers (0..{L - 1})")

        for i, s in enumerate(self.steer):
            for j, n in enumerate(s.names()):
                vec(n, "residual", f"steer[{i}].vector" + (f"[{j}]" if isinstance(s.vector, tuple) else ""))
            layers_ok(s.layers, f"steer[{i}].layers")
            if bank is not None and s.mode != "project_out" and (s.mode == "clamp" or s.scale_mode == "relative"):
                norms = bank.get(s.vector).float().norm(dim=-1)
                zero = [layer for layer in (s.layers or range(L)) if not float(norms[layer]) > 0]
                if zero:
                    raise SpecError(f"steer[{i}].vector", f"vector {s.vector!r} is zero at layer {zero[0]}: "
                                    f"it has no direction to {'clamp along' if s.mode == 'clamp' else 'scale'}")
        if self.when is not None:
            vec(self.when.probe, "probe", "when.probe")
            layers_ok((self.when.layer,), "when.layer")
        for i, h in enumerate(self.heads):
            layers_ok((h.layer,), f"heads[{i}].layer")
            if h.head >= H:
                raise SpecError(f"heads[{i}].head", f"head {h.head} out of range; the model has {H} heads")
            if h.vector is not None:
                if bank is not None and h.vector in bank and bank.kind(h.vector) == "head_positions":
                    n = int(bank.get(h.vector).shape[0])
                    if not isinstance(h.positions, tuple) or len(h.positions) != n:
                        raise SpecError(
                            f"heads[{i}].positions",
                            f"vector {h.vector!r} holds one head vector per position ({n}); list "
                            f"exactly {n} prompt positions to patch",
                        )
                    got = tuple(bank.get(h.vector).shape[1:])
                    want = info.shape_of("head")
                    if got != want:
                        raise SpecError(f"heads[{i}].vector", f"vector {h.vector!r} has per-position shape {got}, the model needs {want}")
                else:
                    vec(h.vector, "head", f"heads[{i}].vector")
                    if h.relative and bank is not None and not float(head_norm(bank, h)) > 0:
                        raise SpecError(f"heads[{i}].vector", f"vector {h.vector!r} is zero at layer "
                                        f"{h.layer} head {h.head}: it has no direction to scale")
                if h.relative and bank is not None and bank.kind(h.vector) != "head":
                    raise SpecError(f"heads[{i}].scale_mode", "'relative' needs a head vector (one "
                                    f"[D] row per head), not {bank.kind(h.vector)!r}")
        if self.neurons is not None:
            vec(self.neurons.set, "neurons", "neurons.set")
        if num_prompt_tokens is not None:
            items = [(f"steer[{i}]", s) for i, s in enumerate(self.steer)]
            items += [(f"heads[{i}]", h) for i, h in enumerate(self.heads)]
            items += [("neurons", self.neurons)] if self.neurons is not None else []
            for field, item in items:
                past = pos_model.past_prompt(item.positions, num_prompt_tokens)
                if past is not None:
                    raise SpecError(f"{field}.positions",
                                    f"position {past} is past the prompt ({num_prompt_tokens} tokens)")
        if self.boost is not None:
            vec(self.boost.heads, "head_mask", "boost.heads")
            layers_ok(self.boost.prefill_layers, "boost.prefill_layers")
            layers_ok(self.boost.decode_layers, "boost.decode_layers")
        if self.capture is not None:
            c = self.capture
            layers_ok(c.heads, "capture.heads")
            layers_ok(c.residual, "capture.residual")
            layers_ok(c.attn_image, "capture.attn_image")
            tokens = pos_model.capture_tokens(c.positions, num_prompt_tokens, max_new_tokens)
            if tokens is not None and c.rows(L, tokens) > MAX_CAPTURE_ROWS:
                raise SpecError(
                    "capture.positions",
                    f"asks for {c.rows(L, tokens)} rows ({tokens} tokens x layers); the limit is "
                    f"{MAX_CAPTURE_ROWS}: capture fewer layers or positions",
                )

    def resolve(self, info: "ModelInfo") -> "SteerSpec":
        """Make every ``"all"`` layer selection explicit for ``info``."""
        every = tuple(range(info.num_layers))
        steer = tuple(replace(s, layers=every) if s.layers is None else s for s in self.steer)
        capture = self.capture
        if capture is not None:
            capture = replace(
                capture,
                heads=every if capture.heads == "all" else capture.heads,
                residual=every if capture.residual == "all" else capture.residual,
                attn_image=every if capture.attn_image == "all" else capture.attn_image,
            )
        boost = self.boost
        if boost is not None:
            boost = replace(
                boost,
                prefill_layers=every if boost.prefill_layers is None else boost.prefill_layers,
                decode_layers=every if boost.decode_layers is None else boost.decode_layers,
            )
        return SteerSpec(steer, self.heads, self.neurons, boost, capture, self.when)

    # -- predicates --------------------------------------------------------------------
    def intervenes(self) -> bool:
        return bool(self.steer or self.heads or self.neurons or self.boost)

    def is_empty(self) -> bool:
        return not self.intervenes() and self.capture is None

    def inline_items(self) -> list:
        """The steer and head items (those that may carry an inline vector)."""
        return [*self.steer, *self.heads]

    def inline_names(self) -> list[str]:
        """The names of the vectors this request carries inline (``inline.py``)."""
        return sorted({s.inline.name for s in self.inline_items() if s.inline is not None})

    def vector_names(self) -> list[str]:
        """Every bank entry the interventions use (sorted, unique)."""
        names = {n for s in self.steer for n in s.names()}
        names |= {h.vector for h in self.heads if h.vector is not None}
        if self.neurons is not None:
            names.add(self.neurons.set)
        if self.boost is not None:
            names.add(self.boost.heads)
        if self.when is not None:
            names.add(self.when.probe)
        return sorted(names)

    # -- identity ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.steer:
            d["steer"] = [s.to_dict() for s in self.steer]
        if self.heads:
            d["heads"] = [h.to_dict() for h in self.heads]
        if self.neurons is not None:
            d["neurons"] = self.neurons.to_dict()
        if self.boost is not None:
            d["boost"] = self.boost.to_dict()
        if self.capture is not None:
            d["capture"] = self.capture.to_dict()
        if self.when is not None:
            d["when"] = self.when.to_dict()
        return d

    def fingerprint(self, bank: "VectorBank | None" = None) -> str:
        """sha256 hex of the canonical intervention part (capture excluded): equal
        configs share a device slot. Item order does not matter. With ``bank``, the
        content hash of every used vector is mixed in, so re-registering a name with new
        values gives a new fingerprint. Call on ``resolve(info)`` output to make
        ``"all"`` and the explicit layer list the same config."""
        d = self.to_dict()
        d.pop("capture", None)
        canon = lambda items: sorted(items, key=lambda x: json.dumps(x, sort_keys=True))  # noqa: E731
        if "steer" in d:
            for item, s in zip(d["steer"], self.steer):
                if s.inline is not None:  # by its content-derived name (hashed with the bank)
                    item["vector"] = s.inline.name
            d["steer"] = canon(d["steer"])
        if "heads" in d:
            d["heads"] = canon(d["heads"])
        payload: dict[str, Any] = {"v": FINGERPRINT_VERSION, "spec": d}
        if bank is not None:
            payload["bank"] = {n: bank.content_hash(n) for n in self.vector_names()}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()


__all__ = [
    "BOOST_MODES", "CAPTURE_POSITIONS", "MAX_BASIS", "SCALE_MODES", "STEER_MODES", "GateItem", "HEAD_MODES", "MAX_ABS_SCALE", "MAX_CAPTURE_ROWS", "MAX_GAIN",
    "MAX_HEAD_ITEMS", "MAX_IMAGES", "MAX_POSITIONS", "MAX_STEER_ITEMS", "POSITIONS", "SALT_PREFIX",
    "BoostItem", "CaptureItem", "HeadItem", "NeuronItem", "Positions", "SpecError", "SteerItem",
    "SteerSpec",
]  # fmt: skip
