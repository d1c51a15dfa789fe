"""The request configs of the randomized differential tests (tests/vllm/
differential_support.py runs and compares them): a seeded generator of valid configs
over every item kind x position kind (``random_config``, ``batch_cases``), the coverage
they reach, the probe entries the gate variants read (``add_gate_entries``), and
multi-turn conversations (``conversations``).

With ``features=True`` the generator also draws the residual modes (relative adds,
clamps, project-outs of one vector or a list) and probe gates (``when``, above / below,
latched or not, with ``capture.probe``) over the probes ``add_gate_entries`` puts in the
test bank.

Nothing here imports emosteer's spec, compiler, HF backend or plugin: configs are plain
dicts, checked only by the engine (which refuses invalid ones) and read by the oracle.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

POSITION_KINDS = ("all", "prompt", "generated", "last", "list")
ITEM_KINDS = ("steer", "add", "patch", "ablate", "scale", "neurons")
CAPTURE_POSITIONS = ("last", "all", "generated")
# position-major: combos[i] and combos[i + 15] never have the same item kind (30 = 5 * 6)
COMBOS = [(kind, pos) for pos in POSITION_KINDS for kind in ITEM_KINDS]

# Residual-mode variants a steer item can take ("mode:scale_mode"; project_out of one
# vector or of a list), and the gate variants (probe, below, latch, capture.probe).
STEER_VARIANTS = ("add:relative", "clamp:absolute", "clamp:relative", "project_out:one", "project_out:list")
PROJECT_NAMES = ("joy", "sad", "joy.neg2")  # joy.neg2 = -2 * joy: a list with it has rank < its length
GATE_VARIANTS = tuple((probe, below, latch, cap) for below in (False, True) for latch in (False, True)
                      for probe, cap in (("joy.probe", True), ("sad.probe", bool(below) != bool(latch))))
MAX_RES_TERMS = 8  # residual terms per layer the engine takes (adds fold into one per scale mode)


@dataclass(frozen=True)
class Shape:
    L: int
    H: int
    D: int
    d: int
    I: int

    @classmethod
    def of(cls, info) -> "Shape":
        return cls(info.num_layers, info.num_heads, info.head_dim, info.hidden_size, info.intermediate_size)


# -- the test bank's extra entries --------------------------------------------------
def add_gate_entries(bank, info, seed: int = 1):
    """Add what the ``features`` configs read to a test bank (``vllm_support.make_bank``'s):
    ``joy.neg2`` = -2 * joy (exactly, so a project-out list holding it and joy has rank
    one less than its length), and two probes [L, d + 1]: ``joy.probe`` (random unit w
    per layer, bias 0.1) and ``sad.probe`` (w = the unit sad vector, bias -0.2), whose
    scores on the tiny model's residual spread around 0 (std ~0.6 at layer 0), so
    thresholds drawn in [-0.6, 0.6] open the gate at some tokens and not at others (in
    about 2 of 3 gated configs; a latch, with its threshold further out, often opens
    mid-sequence); the sad probe also moves with steering along sad."""
    import torch

    g = torch.Generator().manual_seed(seed)
    L, d = info.num_layers, info.hidden_size
    bank.add("joy.neg2", "residual", -2.0 * bank.get("joy").float())
    w = torch.randn(L, d, generator=g)
    w = w / w.norm(dim=1, keepdim=True)
    bank.add("joy.probe", "probe", torch.cat([w, torch.full((L, 1), 0.1)], 1))
    sad = bank.get("sad").float()
    bank.add("sad.probe", "probe", torch.cat([sad / sad.norm(dim=1, keepdim=True), torch.full((L, 1), -0.2)], 1))
    return bank


# -- the generator ------------------------------------------------------------------
def _scale(rng: random.Random, lo: float = 0.5, hi: float = 4.0) -> float:
    return round(rng.choice((-1, 1)) * rng.uniform(lo, hi), 3)


def _positions(rng: random.Random, kind: str, P: int):
    if kind == "list":
        k = rng.randint(1, min(4, P))
        return sorted(rng.sample(range(P), k))
    return kind


def _token_set(pos, P: int) -> tuple[set[int], bool]:
    """(prompt indices, touches generated tokens) of an item's positions."""
    if isinstance(pos, list):
        return set(pos), False
    return {"all": (set(range(P)), True), "prompt": (set(range(P)), False),
            "generated": (set(), True), "last": ({P - 1}, False)}[pos]


def _overlap(p, q, P: int) -> bool:
    a, ga = _token_set(p, P)
    b, gb = _token_set(q, P)
    return bool(a & b) or (ga and gb)


def _layers(rng: random.Random, L: int):
    r = rng.random()
    if r < 0.3:
        return "all"
    if r < 0.6:
        return rng.randrange(L)
    return sorted(rng.sample(range(L), rng.randint(1, L)))


def _layer_list(layers, L: int) -> list[int]:
    return list(range(L)) if layers == "all" else [layers] if isinstance(layers, int) else list(layers)


class _Builder:
    """Builds one config, keeping head items valid (one intervention per head and
    position), at most one neurons item and (``features``) at most MAX_RES_TERMS residual
    terms per layer."""

    def __init__(self, rng: random.Random, shape: Shape, P: int, features: bool = False):
        self.rng, self.s, self.P = rng, shape, P
        self.features = features
        self.layer0 = False  # items must act on layer 0 (so they change the KV of layer 1 on)
        self.cfg: dict[str, Any] = {}
        self.used: dict[tuple[int, int], list] = {}
        self.terms: dict[int, set] = {}  # layer -> its residual terms ("abs", "rel", clamp and basis ids)

    def _variant(self, item: dict, variant: str | None) -> None:
        """Make steer ``item`` the residual-mode ``variant`` (None: keep the absolute add)
        where its layers have room for the terms; else it stays an absolute add."""
        rng = self.rng
        layers = _layer_list(item["layers"], self.s.L)
        new: dict[str, Any] = {}
        if variant == "add:relative":
            new = {"scale": _scale(rng, 0.1, 1.0), "scale_mode": "relative"}
        elif variant == "clamp:absolute":
            new = {"mode": "clamp", "value": round(rng.uniform(-6.0, 6.0), 3)}
        elif variant == "clamp:relative":
            new = {"mode": "clamp", "scale": round(rng.uniform(-0.8, 0.8), 3), "scale_mode": "relative"}
        elif variant == "project_out:one":
            new = {"mode": "project_out"}
        elif variant == "project_out:list":
            new = {"mode": "project_out", "vector": rng.sample(PROJECT_NAMES, rng.randint(2, 3))}
        self.n_items = getattr(self, "n_items", 0) + 1
        n = self.n_items
        if variant == "add:relative" or variant is None:
            tags = ["rel" if variant else "abs"]
        else:
            tags = [(n, j) for j in range(len(new["vector"]) if isinstance(new.get("vector"), list) else 1)]
        if any(len(self.terms.get(layer, set()) | set(tags)) > MAX_RES_TERMS for layer in layers):
            new, tags = {}, ["abs"]
        for layer in layers:
            self.terms.setdefault(layer, set()).update(tags)
        if new.get("mode") in ("clamp", "project_out"):
            del item["scale"]
        item.update(new)

    def steer_item(self, pos, layers, variant: str | None) -> None:
        rng = self.rng
        item = {"vector": rng.choice(("joy", "sad")), "layers": layers, "scale": _scale(rng)}
        self._variant(item, variant)
        if pos != "all" or rng.random() < 0.5:
            item["positions"] = pos
        self.cfg.setdefault("steer", []).append(item)

    def add(self, kind: str, pos_kind: str) -> bool:
        rng, s, P = self.rng, self.s, self.P
        pos = _positions(rng, pos_kind, P)
        if kind == "steer":
            layers = _layers(rng, s.L)
            if self.layer0 and layers != "all":
                layers = 0 if rng.random() < 0.5 else sorted({0, *([layers] if isinstance(layers, int) else layers)})
            item = {"vector": rng.choice(("joy", "sad")), "layers": layers, "scale": _scale(rng)}
            if self.features:
                self._variant(item, rng.choice(STEER_VARIANTS) if rng.random() < 0.5 else None)
            if pos != "all" or rng.random() < 0.5:
                item["positions"] = pos
            self.cfg.setdefault("steer", []).append(item)
            return True
        if kind == "neurons":
            if "neurons" in self.cfg:
                return False
            item = {"set": "joy.ena", "gamma": round(rng.uniform(0.2, 4.0), 3)}
            if pos != "all" or rng.random() < 0.5:
                item["positions"] = pos
            self.cfg["neurons"] = item
            return True
        # a head item: pick a layer and 1-3 heads that are free at these positions
        for _ in range(20):
            layer = 0 if self.layer0 else rng.randrange(s.L)
            heads = sorted(rng.sample(range(s.H), rng.randint(1, min(3, s.H))))
            if all(not _overlap(pos, q, P) for h in heads for q in self.used.get((layer, h), ())):
                break
        else:
            return False
        for h in heads:
            self.used.setdefault((layer, h), []).append(pos)
        item: dict[str, Any] = {"layer": layer, "head": heads[0] if len(heads) == 1 and rng.random() < 0.5 else heads,
                                "mode": kind}
        if kind in ("add", "patch"):
            item["vector"] = "joy.h"
        if kind == "add":
            item["scale"] = _scale(rng)
            if self.features and rng.random() < 0.4:  # a fraction of the head's own norm
                item["scale"], item["scale_mode"] = _scale(rng, 0.2, 1.5), "relative"
        elif kind == "scale":
            item["scale"] = round(rng.uniform(-1.5, 3.0), 3)
        if pos != "all" or rng.random() < 0.5:
            item["positions"] = pos
        self.cfg.setdefault("heads", []).append(item)
        return True

    def capture(self, positions: str) -> None:
        s, rng = self.s, self.rng
        cap: dict[str, Any] = {"positions": positions}
        r = rng.random()
        if r < 0.4:
            cap["heads"], cap["residual"] = _layers(rng, s.L), _layers(rng, s.L)
        elif r < 0.7:
            cap["heads"] = _layers(rng, s.L)
        else:
            cap["residual"] = _layers(rng, s.L)
        if positions == "last" and rng.random() < 0.3:
            del cap["positions"]  # the default
        self.cfg["capture"] = cap

    def _acts_after(self, layer: int) -> bool:
        cfg = self.cfg
        if "neurons" in cfg or any(h["layer"] > layer for h in cfg.get("heads", [])):
            return True
        return any(max(_layer_list(it["layers"], self.s.L)) > layer for it in cfg.get("steer", []))

    def gate(self, probe: str, below: bool, latch: bool, capture_probe: bool) -> None:
        """A probe gate at a layer before the last (a steer item after it is added when
        nothing acts there), threshold in [-0.6, 0.6] (latched: +-[0.2, 1.2]); with
        ``capture_probe`` the capture (made at "all" positions with the gate layer's
        residual if there is none) returns its scores."""
        rng, L = self.rng, self.s.L
        layer = rng.randrange(max(1, L - 1))
        if not self._acts_after(layer):
            later = sorted(rng.sample(range(layer + 1, L), rng.randint(1, L - layer - 1)))
            self.steer_item(rng.choice(("all", "prompt", "generated")), later,
                            rng.choice((None, *STEER_VARIANTS)))
        # a latch stays open from the first token where the gate holds: its threshold is
        # drawn further out, so that it opens later (or never)
        thr = round(rng.uniform(0.2, 1.2) * (-1 if below else 1) if latch else rng.uniform(-0.6, 0.6), 3)
        when: dict[str, Any] = {"probe": probe, "layer": layer, ("below" if below else "above"): thr}
        if latch or rng.random() < 0.5:
            when["latch"] = latch
        self.cfg["when"] = when
        if capture_probe:
            # a new capture also takes the gate layer's residual: a probe-only capture is
            # tested on its own (test_steer_modes.py)
            self.cfg.setdefault("capture", {"positions": "all", "residual": [layer]})["probe"] = True


def random_config(rng: random.Random, shape: Shape, P: int, combos=(), extra: int | None = None,
                  capture: str | None = None, layer0: bool = False, features: bool = False,
                  variant: str | None = None, gate: tuple | None = None) -> dict:
    """A valid config for a prompt of ``P`` tokens: the (item kind, position kind) pairs of
    ``combos`` first (acting on layer 0 when ``layer0``; a steer item where a head or
    neurons item does not fit), then ``extra`` random items (random 0-2 when None), and a
    capture at ``capture`` positions (None: none). ``features``: steer items draw
    residual modes too; ``variant`` (of STEER_VARIANTS) adds one steer item of that
    mode at random layers and positions; ``gate`` (of GATE_VARIANTS) adds a probe gate."""
    b = _Builder(rng, shape, P, features)
    b.layer0 = layer0
    for kind, pos in combos:
        if not b.add(kind, pos):
            assert b.add("steer", pos)
    b.layer0 = False
    n = rng.randint(0, 2) if extra is None else extra
    for _ in range(n):
        b.add(rng.choice(ITEM_KINDS), rng.choice(POSITION_KINDS))
    if variant is not None:
        b.steer_item(_positions(rng, rng.choice(POSITION_KINDS), P), _layers(rng, shape.L), variant)
    if capture is not None:
        b.capture(capture)
    if gate is not None:
        b.gate(*gate)
    return b.cfg


@dataclass
class Case:
    label: str
    prompt_ids: list[int]
    config: dict | None
    max_tokens: int


def batch_cases(seed: int, shape: Shape, prompts: list[list[int]], n_configs: int,
                n_plain: int = 3, n_capture_only: int = 2, max_tokens: int = 12,
                features: bool = False) -> list[Case]:
    """``n_configs`` steered configs (config i carries COMBOS[i % 30] and COMBOS[(i+15) % 30],
    so 24 of them cover every item kind at every position kind; captures cycle through
    none/last/all/generated), capture-only rows and plain rows, over ``prompts``
    (cycled), shuffled. ``features``: steer items draw residual modes, config i adds a
    steer item of STEER_VARIANTS[i % 5], and every third config (i % 3 == 1) a gate of
    GATE_VARIANTS[(i // 3) % 8] (so 24 configs hold every variant; their captures cycle
    through none/last/all/generated as well)."""
    rng = random.Random(seed)
    cases = []
    for i in range(n_configs):
        ids = prompts[i % len(prompts)]
        combos = [COMBOS[i % len(COMBOS)], COMBOS[(i + 15) % len(COMBOS)]]
        cap = (None, *CAPTURE_POSITIONS)[i % 4]
        more = {}
        if features:
            more = {"features": True, "variant": STEER_VARIANTS[i % len(STEER_VARIANTS)],
                    "gate": GATE_VARIANTS[(i // 3) % len(GATE_VARIANTS)] if i % 3 == 1 else None}
        cfg = random_config(rng, shape, len(ids), combos, capture=cap, **more)
        cases.append(Case(f"s{seed}-c{i}", ids, cfg, max_tokens))
    for i in range(n_capture_only):
        ids = prompts[(n_configs + i) % len(prompts)]
        b = _Builder(rng, shape, len(ids))
        b.capture(CAPTURE_POSITIONS[i % 3])
        cases.append(Case(f"s{seed}-cap{i}", ids, b.cfg, max_tokens))
    for i in range(n_plain):
        cases.append(Case(f"s{seed}-plain{i}", prompts[i % len(prompts)], None, max_tokens))
    rng.shuffle(cases)
    return cases


def steer_variant(item: dict) -> str:
    """The STEER_VARIANTS name of a steer item ("add:absolute" for a plain add)."""
    mode = item.get("mode", "add")
    if mode == "project_out":
        return "project_out:list" if isinstance(item["vector"], list) else "project_out:one"
    return f"{mode}:{item.get('scale_mode', 'absolute')}"


def gate_variant(when: dict) -> str:
    return ("below" if "below" in when else "above") + ("+latch" if when.get("latch") else "")


def coverage(configs) -> set[tuple[str, str]]:
    """(item kind, position kind) pairs and ("capture", positions) present in configs;
    ("mode", STEER_VARIANTS name), ("gate", "above" | "below" [+ "+latch"]), ("gate
    probe", probe name) and ("capture", "probe") where the features are drawn."""
    seen = set()
    for cfg in configs:
        if not cfg:
            continue
        for it in cfg.get("steer", []):
            seen.add(("steer", _pkind(it.get("positions", "all"))))
            seen.add(("mode", steer_variant(it)))
        if "when" in cfg:
            seen.add(("gate", gate_variant(cfg["when"])))
            seen.add(("gate probe", cfg["when"]["probe"]))
            if cfg.get("capture", {}).get("probe"):
                seen.add(("capture", "probe"))
        for it in cfg.get("heads", []):
            seen.add((it["mode"], _pkind(it.get("positions", "all"))))
            if it.get("scale_mode") == "relative":
                seen.add(("head mode", "add:relative"))
        if "neurons" in cfg:
            seen.add(("neurons", _pkind(cfg["neurons"].get("positions", "all"))))
        if "capture" in cfg:
            seen.add(("capture", cfg["capture"].get("positions", "last")))
    return seen


def _pkind(pos) -> str:
    return "list" if isinstance(pos, list) else pos


@dataclass
class Conversation:
    label: str
    first_prompt: list[int]
    config: dict | None
    max_tokens: int
    turns: int
    new_tokens: list[list[int]]  # appended after each turn's reply


def random_ids(rng: random.Random, n: int, vocab: int, low: int = 4) -> list[int]:
    return [rng.randrange(low, vocab) for _ in range(n)]


# Position kinds of a conversation's config ("a+b": one item at each). A turn's prompt
# holds the earlier turns' replies (generated there, prompt now) and their last prompt
# tokens (the "last" there, not now): "prompt", "last+all" and "generated+all" are the
# configs whose KV differs between turns over the same tokens.
CONVERSATION_KINDS = ("prompt", "last", "last+all", "generated", "generated+all", "list", "mixed", "all",
                      "plain")


def conversation_config(rng: random.Random, shape: Shape, P: int, kind: str,
                        features: bool = False) -> dict | None:
    """A config for a conversation whose first turn has ``P`` prompt tokens; its items act
    on layer 0 (so they change the KV cache of the layers after it). ``features``: steer
    items draw residual modes, and half the configs get a probe gate (latched or not)."""
    if kind == "plain":
        return None
    capture = rng.choice((None, "last", "generated"))
    more: dict[str, Any] = {}
    if features:
        more = {"features": True,
                "gate": rng.choice(GATE_VARIANTS) if rng.random() < 0.5 else None}
    if kind == "mixed":
        combos = [(rng.choice(ITEM_KINDS), p) for p in rng.sample(POSITION_KINDS, 3)]
        return random_config(rng, shape, P, combos, extra=0, capture=capture, layer0=True, **more)
    combos = [(rng.choice(ITEM_KINDS), p) for p in kind.split("+")]
    if "+" not in kind and rng.random() < 0.5:
        combos.append((rng.choice(ITEM_KINDS), kind))
    return random_config(rng, shape, P, combos, extra=0, capture=capture, layer0=True, **more)


def conversations(seed: int, shape: Shape, vocab: int, n: int, turns: int = 3,
                  features: bool = False) -> list[Conversation]:
    """``n`` conversations, first prompts of 40-48 tokens, 24-32 new tokens per turn, 3-6
    user tokens between turns (prompts stay <= ~125 tokens); their configs cycle through
    CONVERSATION_KINDS. Conversations 2k and 2k+1 start from the same prompt (different
    configs): they share the unsteered prefix, never each other's steered blocks."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2 == 1:
            first = out[-1].first_prompt
        else:
            first = random_ids(rng, rng.randint(40, 48), vocab)
        kind = CONVERSATION_KINDS[i % len(CONVERSATION_KINDS)]
        cfg = conversation_config(rng, shape, len(first), kind, features)
        news = [random_ids(rng, rng.randint(3, 6), vocab) for _ in range(turns)]
        out.append(Conversation(f"s{seed}-conv{i}-{kind}", first, cfg, rng.randint(24, 32), turns, news))
    return out
