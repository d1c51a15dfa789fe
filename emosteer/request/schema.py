"""The published JSON Schema of a request config (docs/steer.schema.json).

It mirrors ``SteerSpec.parse`` except for checks that need a model or a bank, and a
(layer, head) set twice; ``tests/test_spec.py`` keeps the file and this function equal.
"""

from __future__ import annotations

from typing import Any

from emosteer.request.inline import DTYPES as INLINE_DTYPES
from emosteer.request.spec import (
    BOOST_MODES, CAPTURE_POSITIONS, HEAD_MODES, MAX_ABS_SCALE, MAX_BASIS, MAX_GAIN, MAX_HEAD_ITEMS,
    MAX_POSITIONS, MAX_STEER_ITEMS, POSITIONS, SCALE_MODES, STEER_MODES,
)  # fmt: skip

__all__ = ["json_schema"]


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
            "when": {"$ref": "#/$defs/when"},
        }, **{"if": {"required": ["capture"], "properties": {"capture": {
            "required": ["probe"], "properties": {"probe": {"const": True}}}}},
            "then": {"required": ["when"]}}),
        "$defs": {
            "layer_selection": {"oneOf": [layer, layer_list, {"const": "all"}]},
            "steer_item": obj(["vector"], {
                "vector": {"oneOf": [entry("residual [L, d]"), {"$ref": "#/$defs/inline_vector"}, {
                    "type": "array", "items": name, "minItems": 1, "maxItems": MAX_BASIS, "uniqueItems": True,
                    "description": "project_out only: names of residual entries whose span is removed"}]},
                "layers": selection, "scale": scale, "positions": positions,
                "mode": {"enum": list(STEER_MODES), "default": "add"},
                "scale_mode": {"enum": list(SCALE_MODES), "default": "absolute",
                               "description": "relative: scale is a fraction of the residual's norm"},
                "value": {**scale, "description": "absolute clamp: the component along the vector"},
            }, allOf=[
                {"if": {"not": {"properties": {"vector": {"type": "object", "required": ["layers"]}}}},
                 "then": {"required": ["layers"]}},
                {"if": {"not": {"required": ["mode"], "properties": {"mode": {"const": "project_out"}}}},
                 "then": {"properties": {"vector": {"not": {"type": "array"}}}}},
                {"if": {"not": {"required": ["mode"], "properties": {"mode": {"enum": ["clamp", "project_out"]}}}},
                 "then": {"required": ["scale"], "not": {"required": ["value"]}}},
                {"if": {"required": ["mode"], "properties": {"mode": {"const": "project_out"}}},
                 "then": {"not": {"anyOf": [{"required": [k]} for k in ("scale", "value", "scale_mode")]}}},
                {"if": {"required": ["mode", "scale_mode"], "properties": {
                    "mode": {"const": "clamp"}, "scale_mode": {"const": "relative"}}},
                 "then": {"required": ["scale"], "not": {"required": ["value"]}}},
                {"if": {"required": ["mode"], "properties": {"mode": {"const": "clamp"}},
                        "not": {"required": ["scale_mode"], "properties": {"scale_mode": {"const": "relative"}}}},
                 "then": {"required": ["value"], "not": {"required": ["scale"]}}},
            ]),
            "inline_vector": obj(["data", "dtype"], {
                "data": {"type": "string", "contentEncoding": "base64",
                         "description": "little-endian values, one [d] row per layer of the item"},
                "dtype": {"enum": list(INLINE_DTYPES)}, "layers": layer_list,
            }),
            "inline_head_vector": obj(["data", "dtype"], {
                "data": {"type": "string", "contentEncoding": "base64",
                         "description": "little-endian values: one [D] row per head of 'heads' "
                                        "(default: the item's heads), or [H, D] for every head"},
                "dtype": {"enum": list(INLINE_DTYPES)}, "heads": layer_list,
            }),
            "head_item": obj(["layer", "head", "mode"], {
                "layer": layer, "head": {"oneOf": [layer, layer_list]},
                "mode": {"enum": list(HEAD_MODES)},
                "vector": {"oneOf": [entry("head [L, H, D]"), {"$ref": "#/$defs/inline_head_vector"}]},
                "scale": scale, "positions": positions,
                "scale_mode": {"enum": list(SCALE_MODES), "default": "absolute",
                               "description": "relative (mode add only): scale is a fraction of "
                                              "the head output's norm, per token"},
            }, allOf=[
                {"if": {"required": ["scale_mode"], "properties": {"scale_mode": {"const": "relative"}}},
                 "then": {"properties": {"mode": {"const": "add"}}}},
                mode_rule("add", ["vector"], []),
                mode_rule("patch", ["vector"], ["scale"]),
                mode_rule("ablate", [], ["vector", "scale"]),
                mode_rule("scale", ["scale"], ["vector"]),
            ]),
            "neurons": obj(["set", "gamma"], {
                "set": entry("neurons [L, I] (0/1 mask)"), "gamma": gain, "positions": positions,
            }),
            "boost": obj(["heads", "beta"], {
                "heads": entry("head_mask [L, H] (0/1 mask)"), "beta": gain,
                "mode": {"enum": list(BOOST_MODES), "default": "weight"},
                "prefill_layers": phase_selection, "decode_layers": phase_selection,
            }, **{"not": {"required": ["prefill_layers", "decode_layers"], "properties": {
                "prefill_layers": {"const": "none"}, "decode_layers": {"const": "none"}}}}),
            "capture": obj([], {
                "heads": selection, "residual": selection, "attn_image": selection,
                "probe": {"type": "boolean", "description": "the gate's probe score (needs when)"},
                "positions": {"enum": list(CAPTURE_POSITIONS), "default": "last"},
            }, anyOf=[{"required": ["heads"]}, {"required": ["residual"]}, {"required": ["attn_image"]},
                      {"required": ["probe"], "properties": {"probe": {"const": True}}}]),
            "when": obj(["probe", "layer"], {
                "probe": entry("probe [L, d+1]"), "layer": layer,
                "above": {"type": "number"}, "below": {"type": "number"},
                "latch": {"type": "boolean", "default": False},
            }, oneOf=[{"required": ["above"]}, {"required": ["below"]}]),
        },
    }  # fmt: skip
