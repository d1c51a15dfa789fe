"""What one request asks for: steering, head patching, neuron gain, boost and capture.

A ``SteerSpec`` is parsed from the JSON object a request carries (docs/DESIGN.md §4), checked
strictly (unknown keys, wrong types, NaN/inf and absurd values raise ``SpecError`` whose
``.field`` names the culprit, e.g. ``"steer[0].scale"``), validated against a vector
bank and a model, and fingerprinted so that identical configs share one device slot.
``json_schema()`` is the published schema of the same object (docs/steer.schema.json).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Union, TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from emosteer.request.bank import ModelInfo, VectorBank

MAX_ABS_SCALE = 1e4
MAX_GAIN = 100.0  # gamma (neurons) and beta (boost) lie in (0, MAX_GAIN]
MAX_CAPTURE_ROWS = 4096
MAX_STEER_ITEMS = 1024  # steer items per request
MAX_HEAD_ITEMS = 65536  # head items per request after expanding "head" lists
FINGERPRINT_VERSION = 1

POSITIONS = ("all", "prompt", "generated", "last")
SALT_PREFIX = "emosteer@"  # reserved: a client cache_salt containing it is refused
MAX_POSITIONS = 4096  # explicit prompt positions per item
CAPTURE_POSITIONS = ("last", "all", "generated")
HEAD_MODES = ("add", "patch", "ablate", "scale")
COMPONENTS = {"head_out": "attn.head_out", "residual": "residual", "mlp_act": "mlp.act"}

# "all" | "prompt" | "generated" | "last" (the last prompt token) | explicit prompt token
# indices (a sorted tuple of ints; the JSON form is a list)
Positions = Union[str, tuple[int, ...]]


def _positions(value: Any, field: str) -> "Positions":
    if isinstance(value, str):
        return _choice(value, field, POSITIONS)
    if not isinstance(value, list) or not value:
        raise SpecError(field, f"must be one of {list(POSITIONS)} or a non-empty list of prompt "
                        f"token indices, got {_tname(value)}")
    if len(value) > MAX_POSITIONS:
        raise SpecError(field, f"lists {len(value)} positions; the limit is {MAX_POSITIONS}")
    out = [_int(v, f"{field}[{i}]") for i, v in enumerate(value)]
    if len(set(out)) != len(out):
        raise SpecError(field, "lists a position twice")
    return tuple(sorted(out))


def position_kind(positions: "Positions") -> set[str]:
    """Which token classes an item's positions touch: "P" (every prompt token), "G"
    (generated tokens), "L" (the last prompt token), "X" (listed prompt tokens)."""
    if isinstance(positions, tuple):
        return {"X"}
    return {"all": {"P", "G"}, "prompt": {"P"}, "generated": {"G"}, "last": {"L"}}[positions]


def positions_overlap(p: "Positions", q: "Positions") -> bool:
    """Whether two items' positions can share a token (a listed position and "last"
    are checked later, once the prompt length is known)."""
    a, b = position_kind(p), position_kind(q)
    if "P" in a and b & {"P", "L", "X"} or "P" in b and a & {"P", "L", "X"}:
        return True
    if a & b & {"G", "L"}:
        return True
    if isinstance(p, tuple) and isinstance(q, tuple):
        return bool(set(p) & set(q))
    return False


class SpecError(ValueError):
    """A malformed or unservable request config; ``field`` is its dotted path."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


def act_name(layer: int, component: str) -> str:
    """Dotted activation name: ``act_name(12, "head_out") == "layers.12.attn.head_out"``.
    ``component`` is one of head_out, residual, mlp_act (or the dotted suffix itself)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    suffix = COMPONENTS.get(component)
    if suffix is None:
        if component in COMPONENTS.values():
            suffix = component
        else:
            raise ValueError(f"unknown component {component!r}; expected one of {sorted(COMPONENTS)}")
    return f"layers.{layer}.{suffix}"


# -- field checks ---------------------------------------------------------------------
def _obj(value: Any, field: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        raise SpecError(field or "spec", f"must be an object, got {_tname(value)}")
    for key in value:
        if key not in allowed:
            where = f"{field}.{key}" if field else str(key)
            raise SpecError(where, f"unknown key {key!r}; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in value:
            raise SpecError(f"{field}.{key}" if field else key, "is required")
    return value


def _tname(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _int(value: Any, field: str) -> int:
    # JSON (and its schema) does not tell 1 from 1.0, so an integral float is an int
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field, f"must be an integer, got {_tname(value)} {value!r}")
    if value < 0:
        raise SpecError(field, f"must be >= 0, got {value}")
    return value


def _num(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(field, f"must be a number, got {_tname(value)} {value!r}")
    value = float(value) + 0.0  # -0.0 -> 0.0, so equal configs print alike
    if not math.isfinite(value):
        raise SpecError(field, f"must be finite, got {value}")
    return value


def _scale(value: Any, field: str) -> float:
    value = _num(value, field)
    if abs(value) > MAX_ABS_SCALE:
        raise SpecError(field, f"|scale| must be <= {MAX_ABS_SCALE:g}, got {value:g}")
    return value


def _gain(value: Any, field: str) -> float:
    value = _num(value, field)
    if not 0.0 < value <= MAX_GAIN:
        raise SpecError(field, f"must be in (0, {MAX_GAIN:g}], got {value:g}")
    return value


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(field, f"must be a non-empty vector name, got {value!r}")
    return value


def _choice(value: Any, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices or not isinstance(value, str):
        raise SpecError(field, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _layers(value: Any, field: str, allow_all: bool = True) -> tuple[int, ...] | None:
    """int | [int, ...] | "all" -> sorted tuple, or None for "all"."""
    if value == "all" and allow_all:
        return None
    if isinstance(value, list):
        if not value:
            raise SpecError(field, "must not be an empty list")
        out = [_int(v, f"{field}[{i}]") for i, v in enumerate(value)]
        if len(set(out)) != len(out):
            raise SpecError(field, f"lists a layer twice: {value}")
        return tuple(sorted(out))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (_int(value, field),)
    raise SpecError(field, f'must be an integer, a list of integers or "all", got {value!r}')


# -- items ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SteerItem:
    """Add ``scale * bank[vector][l]`` to the residual output of each layer l
    (``layers=None`` = every layer). Several items on one layer add up."""

    vector: str
    layers: tuple[int, ...] | None
    scale: float
    positions: Positions = "all"

    def to_dict(self) -> dict:
        return {
            "vector": self.vector,
            "layers": "all" if self.layers is None else list(self.layers),
            "scale": self.scale,
            "positions": _pos_json(self.positions),
        }


@dataclass(frozen=True)
class HeadItem:
    """``z[l,h] <- a*z + b*v`` on the head output: add (a=1, b=scale, v=vec[l,h]),
    patch (a=0, b=1, v=vec[l,h]), ablate (a=0, b=0), scale (a=scale, b=0)."""

    layer: int
    head: int
    mode: Literal["add", "patch", "ablate", "scale"]
    vector: str | None = None
    scale: float = 1.0
    positions: Positions = "all"
    # Internal (never parsed): the index into a "head_positions" vector [N, L, H, D]
    # this item reads, set by the compiler for one listed position.
    at: int | None = None

    def affine(self) -> tuple[float, float]:
        """The (a, b) pair of the head-affine op for this item."""
        return {
            "add": (1.0, self.scale),
            "patch": (0.0, 1.0),
            "ablate": (0.0, 0.0),
            "scale": (self.scale, 0.0),
        }[self.mode]

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"layer": self.layer, "head": self.head, "mode": self.mode}
        if self.vector is not None:
            d["vector"] = self.vector
        if self.mode in ("add", "scale"):
            d["scale"] = self.scale
        d["positions"] = _pos_json(self.positions)
        if self.at is not None:
            d["at"] = self.at
        return d


@dataclass(frozen=True)
class NeuronItem:
    """ENA: gain ``g[l,i] = 1 + (gamma-1)*mask[l,i]`` on the MLP activation."""

    set: str
    gamma: float
    positions: Positions = "all"

    def to_dict(self) -> dict:
        return {"set": self.set, "gamma": self.gamma, "positions": _pos_json(self.positions)}


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
    return _layers(value, field)


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

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        for key in ("heads", "residual", "attn_image"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value if value == "all" else list(value)
        d["positions"] = self.positions
        return d

    def rows(self, num_layers: int, num_tokens: int) -> int:
        """Captured rows (one row = one token at one layer, heads and residual counted
        apart) for a request whose captured positions number ``num_tokens``."""
        count = 0
        for value in (self.heads, self.residual, self.attn_image):
            if value is not None:
                count += num_layers if value == "all" else len(value)
        return count * num_tokens


def _pos_json(positions: "Positions"):
    return list(positions) if isinstance(positions, tuple) else positions


def _parse_steer(value: Any, field: str) -> SteerItem:
    _obj(value, field, ("vector", "layers", "scale", "positions"), ("vector", "layers", "scale"))
    return SteerItem(
        vector=_name(value["vector"], f"{field}.vector"),
        layers=_layers(value["layers"], f"{field}.layers"),
        scale=_scale(value["scale"], f"{field}.scale"),
        positions=_positions(value.get("positions", "all"), f"{field}.positions"),
    )


def _parse_heads(value: Any, field: str) -> list[HeadItem]:
    _obj(value, field, ("layer", "head", "mode", "vector", "scale", "positions"), ("layer", "head", "mode"))
    layer = _int(value["layer"], f"{field}.layer")
    mode = _choice(value["mode"], f"{field}.mode", HEAD_MODES)
    heads = _layers(value["head"], f"{field}.head", allow_all=False)
    assert heads is not None
    vector = None
    if mode in ("add", "patch"):
        if "vector" not in value:
            raise SpecError(f"{field}.vector", f"is required for mode {mode!r}")
        vector = _name(value["vector"], f"{field}.vector")
    elif "vector" in value:
        raise SpecError(f"{field}.vector", f"is not allowed for mode {mode!r}")
    scale = 1.0
    if mode == "scale":
        if "scale" not in value:
            raise SpecError(f"{field}.scale", "is required for mode 'scale'")
        scale = _scale(value["scale"], f"{field}.scale")
    elif mode == "add":
        scale = _scale(value.get("scale", 1.0), f"{field}.scale")
    elif "scale" in value:
        raise SpecError(f"{field}.scale", f"is not allowed for mode {mode!r}")
    positions = _positions(value.get("positions", "all"), f"{field}.positions")
    return [HeadItem(layer, h, mode, vector, scale, positions) for h in heads]


def _parse_capture(value: Any, field: str) -> CaptureItem:
    _obj(value, field, ("heads", "residual", "attn_image", "positions"))
    sel = {}
    for key in ("heads", "residual", "attn_image"):
        if key not in value:
            sel[key] = None
        else:
            raw = value[key]
            parsed = _layers(raw, f"{field}.{key}")
            sel[key] = "all" if parsed is None else parsed
    if sel["heads"] is None and sel["residual"] is None and sel["attn_image"] is None:
        raise SpecError(field, 'captures nothing; give "heads", "residual" and/or "attn_image"')
    positions = _choice(value.get("positions", "last"), f"{field}.positions", CAPTURE_POSITIONS)
    return CaptureItem(sel["heads"], sel["residual"], positions, sel["attn_image"])


# -- the request ----------------------------------------------------------------------
@dataclass(frozen=True)
class SteerSpec:
    """One request's emosteer config (immutable, hashable, JSON round-trippable)."""

    steer: tuple[SteerItem, ...] = ()
    heads: tuple[HeadItem, ...] = ()
    neurons: NeuronItem | None = None
    boost: BoostItem | None = None
    capture: CaptureItem | None = None

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
        _obj(obj, "", ("steer", "heads", "neurons", "boost", "capture"))
        steer: list[SteerItem] = []
        if "steer" in obj:
            if not isinstance(obj["steer"], list):
                raise SpecError("steer", f"must be a list of objects, got {_tname(obj['steer'])}")
            if len(obj["steer"]) > MAX_STEER_ITEMS:
                raise SpecError("steer", f"has {len(obj['steer'])} items; the limit is {MAX_STEER_ITEMS}")
            steer = [_parse_steer(v, f"steer[{i}]") for i, v in enumerate(obj["steer"])]
        heads: list[HeadItem] = []
        if "heads" in obj:
            if not isinstance(obj["heads"], list):
                raise SpecError("heads", f"must be a list of objects, got {_tname(obj['heads'])}")
            # one (a, b, v) per head and token: a head may be set twice only for disjoint
            # positions ("prompt" and "generated")
            seen: dict[tuple[int, int], list[tuple[str, int]]] = {}
            for i, v in enumerate(obj["heads"]):
                for item in _parse_heads(v, f"heads[{i}]"):
                    key = (item.layer, item.head)
                    for pos, j in seen.get(key, ()):
                        if positions_overlap(pos, item.positions):
                            raise SpecError(
                                f"heads[{i}].head",
                                f"layer {key[0]} head {key[1]} is already set by heads[{j}] for "
                                f"positions {_pos_json(pos)!r}; one intervention per head and position",
                            )
                    seen.setdefault(key, []).append((item.positions, i))
                    heads.append(item)
                if len(heads) > MAX_HEAD_ITEMS:
                    raise SpecError("heads", f"expands to more than {MAX_HEAD_ITEMS} (layer, head) items")
        neurons = boost = capture = None
        if "neurons" in obj:
            v = _obj(obj["neurons"], "neurons", ("set", "gamma", "positions"), ("set", "gamma"))
            neurons = NeuronItem(
                _name(v["set"], "neurons.set"),
                _gain(v["gamma"], "neurons.gamma"),
                _positions(v.get("positions", "all"), "neurons.positions"),
            )
        if "boost" in obj:
            v = _obj(obj["boost"], "boost", ("heads", "beta", "mode", "prefill_layers", "decode_layers"),
                     ("heads", "beta"))
            boost = BoostItem(
                _name(v["heads"], "boost.heads"),
                _gain(v["beta"], "boost.beta"),
                _choice(v.get("mode", "weight"), "boost.mode", BOOST_MODES),
                _phase_layers(v.get("prefill_layers", "all"), "boost.prefill_layers"),
                _phase_layers(v.get("decode_layers", "all"), "boost.decode_layers"),
            )
            if boost.prefill_layers == () and boost.decode_layers == ():
                raise SpecError("boost", 'acts nowhere: prefill_layers and decode_layers are both "none"')
        if "capture" in obj:
            capture = _parse_capture(obj["capture"], "capture")
        return cls(tuple(steer), tuple(heads), neurons, boost, capture)

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
            vec(s.vector, "residual", f"steer[{i}].vector")
            layers_ok(s.layers, f"steer[{i}].layers")
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
        if self.neurons is not None:
            vec(self.neurons.set, "neurons", "neurons.set")
        if num_prompt_tokens is not None:
            items = [(f"steer[{i}]", s) for i, s in enumerate(self.steer)]
            items += [(f"heads[{i}]", h) for i, h in enumerate(self.heads)]
            items += [("neurons", self.neurons)] if self.neurons is not None else []
            for field, item in items:
                if isinstance(item.positions, tuple) and item.positions[-1] >= num_prompt_tokens:
                    raise SpecError(
                        f"{field}.positions",
                        f"position {item.positions[-1]} is past the prompt ({num_prompt_tokens} tokens)",
                    )
        if self.boost is not None:
            vec(self.boost.heads, "heads", "boost.heads")
            layers_ok(self.boost.prefill_layers, "boost.prefill_layers")
            layers_ok(self.boost.decode_layers, "boost.decode_layers")
        if self.capture is not None:
            c = self.capture
            layers_ok(c.heads, "capture.heads")
            layers_ok(c.residual, "capture.residual")
            layers_ok(c.attn_image, "capture.attn_image")
            tokens = {"last": 1, "all": num_prompt_tokens, "generated": max_new_tokens}[c.positions]
            if c.positions == "all" and tokens is not None:
                tokens += max_new_tokens or 0
            if tokens is not None and c.rows(L, tokens) > MAX_CAPTURE_ROWS:
                raise SpecError(
                    "capture.positions",
                    f"asks for {c.rows(L, tokens)} rows ({tokens} tokens x layers); the limit is "
                    f"{MAX_CAPTURE_ROWS}: capture fewer layers or positions",
                )

    def resolve(self, info: "ModelInfo") -> "SteerSpec":
        """Make every ``"all"`` layer selection explicit for ``info``."""
        every = tuple(range(info.num_layers))
        steer = tuple(
            SteerItem(s.vector, every if s.layers is None else s.layers, s.scale, s.positions)
            for s in self.steer
        )
        capture = self.capture
        if capture is not None:
            capture = CaptureItem(
                every if capture.heads == "all" else capture.heads,
                every if capture.residual == "all" else capture.residual,
                capture.positions,
                every if capture.attn_image == "all" else capture.attn_image,
            )
        boost = self.boost
        if boost is not None:
            from dataclasses import replace

            boost = replace(
                boost,
                prefill_layers=every if boost.prefill_layers is None else boost.prefill_layers,
                decode_layers=every if boost.decode_layers is None else boost.decode_layers,
            )
        return SteerSpec(steer, self.heads, self.neurons, boost, capture)

    # -- predicates --------------------------------------------------------------------
    def intervenes(self) -> bool:
        return bool(self.steer or self.heads or self.neurons or self.boost)

    def is_empty(self) -> bool:
        return not self.intervenes() and self.capture is None

    def changes_prompt(self) -> bool:
        """True when an intervention touches prompt positions, so the prompt's KV cache
        differs from an unsteered one (the prefix-cache key must change). A boost does
        unless it acts in decode only."""
        items = (*self.steer, *self.heads, *([self.neurons] if self.neurons else []))
        return (self.boost is not None and self.boost.prefill_layers != ()) or any(
            isinstance(it.positions, tuple) or it.positions in ("all", "prompt", "last") for it in items
        )

    def vector_names(self) -> list[str]:
        """Every bank entry the interventions use (sorted, unique)."""
        names = {s.vector for s in self.steer}
        names |= {h.vector for h in self.heads if h.vector is not None}
        if self.neurons is not None:
            names.add(self.neurons.set)
        if self.boost is not None:
            names.add(self.boost.heads)
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
            d["steer"] = canon(d["steer"])
        if "heads" in d:
            d["heads"] = canon(d["heads"])
        payload: dict[str, Any] = {"v": FINGERPRINT_VERSION, "spec": d}
        if bank is not None:
            payload["bank"] = {n: bank.content_hash(n) for n in self.vector_names()}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()


# -- the published schema ---------------------------------------------------------------
def json_schema() -> dict:
    """JSON Schema (draft 2020-12) of the request object. It mirrors ``parse`` except
    for checks that need a model or a bank, and (layer, head) set twice."""
    layer = {"type": "integer", "minimum": 0}
    layer_list = {"type": "array", "items": layer, "minItems": 1, "uniqueItems": True}
    name = {"type": "string", "minLength": 1}
    scale = {"type": "number", "minimum": -MAX_ABS_SCALE, "maximum": MAX_ABS_SCALE}
    gain = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_GAIN}
    positions = {
        "description": "'all', 'prompt', 'generated', 'last' (the last prompt token) or a list of "
        "prompt token indices",
        "default": "all",
        "oneOf": [
            {"enum": list(POSITIONS)},
            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1,
             "maxItems": MAX_POSITIONS, "uniqueItems": True},
        ],
    }
    selection = {"$ref": "#/$defs/layer_selection"}
    phase_selection = {"description": "layers of this phase; 'all' (default) or 'none'",
                       "default": "all", "oneOf": [selection, {"const": "none"}]}

    def entry(kind: str) -> dict:
        return {**name, "description": f"name of a bank entry of kind {kind}"}

    def obj(required: list[str], properties: dict, **extra: Any) -> dict:
        out = {"type": "object", "additionalProperties": False, "properties": properties}
        return {**out, "required": required, **extra} if required else {**out, **extra}

    def mode_rule(mode: str, require: list[str], forbid: list[str]) -> dict:
        then: dict[str, Any] = {"required": require} if require else {}
        if forbid:
            then["not"] = {"anyOf": [{"required": [k]} for k in forbid]}
        return {"if": {"properties": {"mode": {"const": mode}}}, "then": then}

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "emosteer request config",
        "description": "The object under extra_args['emosteer'] (offline) or vllm_xargs.emosteer (server).",
        **obj([], {
            "steer": {"type": "array", "items": {"$ref": "#/$defs/steer_item"}, "maxItems": MAX_STEER_ITEMS},
            "heads": {"type": "array", "items": {"$ref": "#/$defs/head_item"}, "maxItems": MAX_HEAD_ITEMS},
            "neurons": {"$ref": "#/$defs/neurons"},
            "boost": {"$ref": "#/$defs/boost"},
            "capture": {"$ref": "#/$defs/capture"},
        }),
        "$defs": {
            "layer_selection": {"oneOf": [layer, layer_list, {"const": "all"}]},
            "steer_item": obj(["vector", "layers", "scale"], {
                "vector": entry("residual [L, d]"), "layers": selection, "scale": scale,
                "positions": positions,
            }),
            "head_item": obj(["layer", "head", "mode"], {
                "layer": layer, "head": {"oneOf": [layer, layer_list]},
                "mode": {"enum": list(HEAD_MODES)}, "vector": entry("head [L, H, D]"),
                "scale": scale, "positions": positions,
            }, allOf=[
                mode_rule("add", ["vector"], []),
                mode_rule("patch", ["vector"], ["scale"]),
                mode_rule("ablate", [], ["vector", "scale"]),
                mode_rule("scale", ["scale"], ["vector"]),
            ]),
            "neurons": obj(["set", "gamma"], {
                "set": entry("neurons [L, I] (0/1 mask)"), "gamma": gain, "positions": positions,
            }),
            "boost": obj(["heads", "beta"], {
                "heads": entry("heads [L, H] (0/1 mask)"), "beta": gain,
                "mode": {"enum": list(BOOST_MODES), "default": "weight"},
                "prefill_layers": phase_selection, "decode_layers": phase_selection,
            }, **{"not": {"required": ["prefill_layers", "decode_layers"], "properties": {
                "prefill_layers": {"const": "none"}, "decode_layers": {"const": "none"}}}}),
            "capture": obj([], {
                "heads": selection, "residual": selection, "attn_image": selection,
                "positions": {"enum": list(CAPTURE_POSITIONS), "default": "last"},
            }, anyOf=[{"required": ["heads"]}, {"required": ["residual"]}, {"required": ["attn_image"]}]),
        },
    }  # fmt: skip


__all__ = [
    "BOOST_MODES", "MAX_ABS_SCALE", "MAX_CAPTURE_ROWS", "MAX_GAIN", "MAX_HEAD_ITEMS", "MAX_IMAGES",
    "MAX_STEER_ITEMS",
    "BoostItem", "CaptureItem", "HeadItem", "NeuronItem", "SpecError", "SteerItem",
    "SteerSpec", "act_name", "json_schema",
]  # fmt: skip
