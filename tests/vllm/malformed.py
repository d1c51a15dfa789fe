"""Malformed request configs and uploads for the reliability tests against the real server.

Written for the tiny Llama of these tests (2 layers, 4 heads of 32, hidden 128,
intermediate 256) and the bank of ``vllm_support.make_bank`` (``joy``, ``sad``:
residual; ``joy.h``: head; ``joy.ena``: neurons). Each entry is
``(what, vllm_xargs, words the 400 message must contain)``; the words name the field.
"""

from __future__ import annotations

import json

import torch


def _x(cfg) -> dict:
    """vllm_xargs carrying ``cfg`` (a dict, or a raw JSON string)."""
    return {"emosteer": cfg if isinstance(cfg, str) else json.dumps(cfg)}


def _steer(**kw) -> dict:
    item = {"vector": "joy", "layers": [0], "scale": 1.0}
    item.update(kw)
    return {"steer": [item]}


def _head(**kw) -> dict:
    item = {"layer": 0, "head": 1, "mode": "add", "vector": "joy.h"}
    item.update(kw)
    return {"heads": [item]}


def _nested(depth: int) -> str:
    return '{"steer": ' + "[" * depth + "]" * depth + "}"


CONFIGS: list[tuple[str, dict, list[str]]] = [
    # types
    ("config not JSON", _x("{steer: joy"), ["not valid JSON"]),
    ("config a list", _x("[1, 2]"), ["object"]),
    ("config a number", _x("42"), ["object"]),
    ("unknown top-level key", _x({"stear": []}), ["stear"]),
    ("steer not a list", _x({"steer": {"vector": "joy"}}), ["steer", "list"]),
    ("steer item not an object", _x({"steer": ["joy"]}), ["steer[0]"]),
    ("steer item missing scale", _x({"steer": [{"vector": "joy", "layers": [0]}]}), ["steer[0]", "scale"]),
    ("steer unknown key", _x(_steer(strength=2)), ["steer[0]", "strength"]),
    ("scale a string", _x(_steer(scale="2")), ["steer[0].scale"]),
    ("scale a bool", _x(_steer(scale=True)), ["steer[0].scale"]),
    ("layers a string", _x(_steer(layers="0,1")), ["steer[0].layers"]),
    ("layer a float", _x(_steer(layers=[0.5])), ["steer[0].layers"]),
    ("vector a number", _x(_steer(vector=7)), ["steer[0].vector"]),
    # unknown vectors, kinds
    ("unknown vector", _x(_steer(vector="nope")), ["steer[0].vector", "nope"]),
    ("head vector as residual", _x(_steer(vector="joy.h")), ["steer[0].vector"]),
    ("residual vector as head", _x(_head(vector="joy")), ["heads[0].vector"]),
    ("unknown neuron set", _x({"neurons": {"set": "nope", "gamma": 2.0}}), ["neurons.set"]),
    ("neuron set of wrong kind", _x({"neurons": {"set": "joy", "gamma": 2.0}}), ["neurons.set"]),
    # ranges
    ("layer out of range", _x(_steer(layers=[2])), ["steer[0].layers"]),
    ("negative layer", _x(_steer(layers=[-1])), ["steer[0].layers"]),
    ("huge layer", _x(_steer(layers=[10**12])), ["steer[0].layers"]),
    ("head out of range", _x(_head(head=4)), ["heads[0].head"]),
    ("head layer out of range", _x(_head(layer=9)), ["heads[0].layer"]),
    ("unknown head mode", _x(_head(mode="swap")), ["heads[0].mode"]),
    ("patch without vector", _x({"heads": [{"layer": 0, "head": 0, "mode": "patch"}]}), ["heads[0].vector"]),
    ("scale mode without scale", _x({"heads": [{"layer": 0, "head": 0, "mode": "scale"}]}), ["heads[0].scale"]),
    ("same head twice", _x({"heads": [{"layer": 0, "head": 0, "mode": "ablate"},
                                      {"layer": 0, "head": 0, "mode": "ablate"}]}), ["heads[1].head"]),
    ("gamma zero", _x({"neurons": {"set": "joy.ena", "gamma": 0}}), ["neurons.gamma"]),
    ("gamma too large", _x({"neurons": {"set": "joy.ena", "gamma": 1e6}}), ["neurons.gamma"]),
    ("unknown positions", _x(_steer(positions="middle")), ["steer[0].positions"]),
    ("position past the prompt", _x(_steer(positions=[10**6])), ["steer[0].positions"]),
    # non-finite, huge
    ("NaN scale", _x('{"steer": [{"vector": "joy", "layers": [0], "scale": NaN}]}'), ["steer[0].scale"]),
    ("inf scale", _x('{"steer": [{"vector": "joy", "layers": [0], "scale": Infinity}]}'), ["steer[0].scale"]),
    ("huge scale", _x(_steer(scale=1e30)), ["steer[0].scale"]),
    ("huge scale in head add", _x(_head(scale=-1e9)), ["heads[0].scale"]),
    # captures
    ("capture nothing", _x({"capture": {}}), ["capture"]),
    ("capture bad positions", _x({"capture": {"heads": [0], "positions": "first"}}), ["capture.positions"]),
    ("capture layer out of range", _x({"capture": {"residual": [5]}}), ["capture.residual"]),
    ("capture without a key", _x({"capture": {"heads": "all"}}), ["capture", "emosteer_key"]),
    ("capture positions a list", {**_x({"capture": {"heads": [0], "positions": [0, 1]}}),
                                  "emosteer_key": "k-positions"}, ["capture.positions"]),
    ("oversized capture layer list", {**_x({"capture": {"heads": list(range(100000))}}),
                                      "emosteer_key": "k-oversized"}, ["capture.heads"]),
    # result keys and private keys
    ("path-like result key", {**_x({"capture": {"heads": [0]}}), "emosteer_key": "../../etc/passwd"},
     ["emosteer_key"]),
    ("markup result key", {**_x({"capture": {"heads": [0]}}), "emosteer_key": "<script>alert(1)</script>"},
     ["emosteer_key"]),
    ("empty result key", {**_x({"capture": {"heads": [0]}}), "emosteer_key": ""}, ["emosteer_key"]),
    ("private grant key", {"emosteer_grant": "{}"}, ["emosteer_grant"]),
    ("private plan key", {**_x(_steer()), "emosteer_plan": "{}"}, ["emosteer_plan"]),
    # injection-style and path-like strings where names go
    ("path-like vector", _x(_steer(vector="../../bank.safetensors")), ["steer[0].vector"]),
    ("injection-style vector", _x(_steer(vector="joy'; DROP TABLE vectors; --")), ["steer[0].vector"]),
    ("python in a vector name", _x(_steer(vector="__import__('os').system('id')")), ["steer[0].vector"]),
    # boost (VEE) is not executed yet: refused, never dropped
    ("boost", _x({"boost": {"heads": "joy.ena", "beta": 2.0}}), ["boost"]),
    # deeply nested, huge
    ("deeply nested JSON", _x(_nested(5000)), ["spec"]),
    ("too many steer items", _x({"steer": [{"vector": "joy", "layers": [0], "scale": 0.1}] * 1100}), ["steer"]),
    ("huge layer list", _x(_steer(layers=list(range(100000)))), ["steer[0].layers"]),
]


def uploads(info) -> list[tuple[str, dict, bytes, list[str]]]:
    """Malformed uploads: ``(what, query params, body, words the 4xx must contain)``."""
    from emosteer.request.bank import ModelInfo, VectorBank

    L, d = info.num_layers, info.hidden_size
    other = ModelInfo(info.architecture, L, d * 2, info.num_heads, info.head_dim,
                      info.intermediate_size, info.num_kv_heads)
    good = VectorBank(info)
    good.add("fine", "residual", torch.ones(L, d))
    wrong_model = VectorBank(other)
    wrong_model.add("big", "residual", torch.ones(L, d * 2))
    two = VectorBank(info)
    two.add("a", "residual", torch.ones(L, d))
    two.add("b", "residual", torch.ones(L, d))
    bad_name = VectorBank(info)
    bad_name.add("../evil", "residual", torch.ones(L, d))
    wrong_arch = VectorBank(ModelInfo("Qwen2ForCausalLM", L, d, info.num_heads, info.head_dim,
                                      info.intermediate_size, info.num_kv_heads))
    wrong_arch.add("q", "residual", torch.ones(L, d))
    blob = good.to_bytes()
    return [
        ("empty body", {}, b"", ["empty"]),
        ("random bytes", {}, bytes(range(256)) * 4, ["safetensors"]),
        ("truncated bank", {}, blob[: len(blob) // 2], ["safetensors"]),
        ("another model's vectors", {}, wrong_model.to_bytes(), ["hidden_size"]),
        ("another architecture", {}, wrong_arch.to_bytes(), ["architecture"]),
        ("path-like name", {"name": "../../etc/passwd"}, blob, ["name"]),
        ("path-like entry name", {}, bad_name.to_bytes(), ["name"]),
        ("rename of a two-entry bank", {"name": "x"}, two.to_bytes(), ["name", "single-entry"]),
        ("unknown format", {"format": "pickle"}, blob, ["format"]),
        ("gguf claimed, not gguf", {"format": "gguf", "name": "x"}, blob, ["GGUF"]),
        ("gguf without a name", {}, b"GGUF" + bytes(60), ["name"]),
        ("broken gguf", {"name": "cv"}, b"GGUF" + bytes(60), ["GGUF"]),
        ("unknown query parameter", {"nam": "x"}, blob, ["nam"]),
        ("non-numeric scale", {"scale": "big", "name": "x", "format": "gguf"}, b"GGUF" + bytes(8), ["scale"]),
        ("scale on a bank", {"scale": "2"}, blob, ["scale"]),
    ]
