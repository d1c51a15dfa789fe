"""Randomized differential testing of emosteer.LLM against the independent oracle
(tests/vllm/oracle.py): a seeded generator of valid request configs, the comparison of one
engine output with the oracle, and the two runs (a mixed batch; multi-turn conversations
with the prefix cache warm, then cold). Used by tests/vllm/test_compiled_differential.py and by
scripts/differential.py (longer runs).

Nothing here imports emosteer's spec, compiler, HF backend or plugin: configs are plain
dicts, checked only by the engine (which refuses invalid ones) and read by the oracle.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

POSITION_KINDS = ("all", "prompt", "generated", "last", "list")
ITEM_KINDS = ("steer", "add", "patch", "ablate", "scale", "neurons")
CAPTURE_POSITIONS = ("last", "all", "generated")
# position-major: combos[i] and combos[i + 15] never have the same item kind (30 = 5 * 6)
COMBOS = [(kind, pos) for pos in POSITION_KINDS for kind in ITEM_KINDS]

MARGIN_BOUND = 1e-3  # oracle top-2 logit margin below which the rest of a row is not compared
LOGPROB_TOL = 1e-3  # engine vs oracle, chosen-token logprob
CAPTURE_TOL = 1e-4  # engine vs oracle, captured activations (fp32)
WARM_COLD_TOL = 1e-5  # engine warm vs cold prefix cache


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


class _Builder:
    """Builds one config, keeping head items valid (one intervention per head and
    position) and at most one neurons item."""

    def __init__(self, rng: random.Random, shape: Shape, P: int):
        self.rng, self.s, self.P = rng, shape, P
        self.layer0 = False  # items must act on layer 0 (so they change the KV of layer 1 on)
        self.cfg: dict[str, Any] = {}
        self.used: dict[tuple[int, int], list] = {}

    def add(self, kind: str, pos_kind: str) -> bool:
        rng, s, P = self.rng, self.s, self.P
        pos = _positions(rng, pos_kind, P)
        if kind == "steer":
            layers = _layers(rng, s.L)
            if self.layer0 and layers != "all":
                layers = 0 if rng.random() < 0.5 else sorted({0, *([layers] if isinstance(layers, int) else layers)})
            item = {"vector": rng.choice(("joy", "sad")), "layers": layers, "scale": _scale(rng)}
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


def random_config(rng: random.Random, shape: Shape, P: int, combos=(), extra: int | None = None,
                  capture: str | None = None, layer0: bool = False) -> dict:
    """A valid config for a prompt of ``P`` tokens: the (item kind, position kind) pairs of
    ``combos`` first (acting on layer 0 when ``layer0``; a steer item where a head or
    neurons item does not fit), then ``extra`` random items (random 0-2 when None), and a
    capture at ``capture`` positions (None: none)."""
    b = _Builder(rng, shape, P)
    b.layer0 = layer0
    for kind, pos in combos:
        if not b.add(kind, pos):
            assert b.add("steer", pos)
    b.layer0 = False
    n = rng.randint(0, 2) if extra is None else extra
    for _ in range(n):
        b.add(rng.choice(ITEM_KINDS), rng.choice(POSITION_KINDS))
    if capture is not None:
        b.capture(capture)
    return b.cfg


@dataclass
class Case:
    label: str
    prompt_ids: list[int]
    config: dict | None
    max_tokens: int


def batch_cases(seed: int, shape: Shape, prompts: list[list[int]], n_configs: int,
                n_plain: int = 3, n_capture_only: int = 2, max_tokens: int = 12) -> list[Case]:
    """``n_configs`` steered configs (config i carries COMBOS[i % 30] and COMBOS[(i+15) % 30],
    so 24 of them cover every item kind at every position kind; captures cycle through
    none/last/all/generated), capture-only rows and plain rows, over ``prompts``
    (cycled), shuffled."""
    rng = random.Random(seed)
    cases = []
    for i in range(n_configs):
        ids = prompts[i % len(prompts)]
        combos = [COMBOS[i % len(COMBOS)], COMBOS[(i + 15) % len(COMBOS)]]
        cap = (None, *CAPTURE_POSITIONS)[i % 4]
        cfg = random_config(rng, shape, len(ids), combos, capture=cap)
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


def coverage(configs) -> set[tuple[str, str]]:
    """(item kind, position kind) pairs and ("capture", positions) present in configs."""
    seen = set()
    for cfg in configs:
        if not cfg:
            continue
        for it in cfg.get("steer", []):
            seen.add(("steer", _pkind(it.get("positions", "all"))))
        for it in cfg.get("heads", []):
            seen.add((it["mode"], _pkind(it.get("positions", "all"))))
        if "neurons" in cfg:
            seen.add(("neurons", _pkind(cfg["neurons"].get("positions", "all"))))
        if "capture" in cfg:
            seen.add(("capture", cfg["capture"].get("positions", "last")))
    return seen


def _pkind(pos) -> str:
    return "list" if isinstance(pos, list) else pos


# -- comparison ---------------------------------------------------------------------
def engine_summary(out) -> dict:
    """Token ids, chosen-token logprobs, every step's returned logprobs, captures."""
    c = out.outputs[0]
    ids = [int(t) for t in c.token_ids]
    steps = [{int(t): float(lp.logprob) for t, lp in step.items()} for step in (c.logprobs or [])]
    chosen = [steps[j][ids[j]] if j < len(steps) else math.nan for j in range(len(ids))]
    return {"ids": ids, "chosen": chosen, "steps": steps, "captures": getattr(out, "emosteer_captures", None),
            "error": getattr(out, "emosteer_error", None), "cached": int(out.num_cached_tokens or 0)}


@dataclass
class Verdict:
    label: str
    ok: bool
    compared: int  # generated tokens compared
    cut: int | None  # step whose oracle margin fell below MARGIN_BOUND (None: none)
    max_dlp: float
    max_dcap: float
    min_margin: float
    message: str = ""
    config: Any = None
    extra: dict = field(default_factory=dict)


def compare(label: str, eng: dict, orc, config=None, margin_bound: float = MARGIN_BOUND,
            lp_tol: float = LOGPROB_TOL, cap_tol: float = CAPTURE_TOL) -> Verdict:
    """Engine output (``engine_summary``) vs oracle result: tokens equal up to (and, if
    equal there, including) the first step whose oracle top-2 margin is below
    ``margin_bound``; chosen-token logprobs within ``lp_tol`` on the compared steps;
    captured rows fed by compared tokens within ``cap_tol``."""
    msgs = []
    if eng["error"] is not None:
        return Verdict(label, False, 0, None, math.nan, math.nan, math.nan, f"engine error: {eng['error']}", config)
    n = min(len(eng["ids"]), len(orc.token_ids))
    if len(eng["ids"]) != len(orc.token_ids):
        msgs.append(f"lengths differ: engine {len(eng['ids'])}, oracle {len(orc.token_ids)}")
    cut = next((j for j, m in enumerate(orc.margins) if m < margin_bound), None)
    agree = 0  # leading generated tokens equal (within the compared range)
    max_dlp = 0.0
    last = n if cut is None else min(n, cut + 1)
    for j in range(last):
        if eng["ids"][j] != orc.token_ids[j]:
            if j != cut:
                msgs.append(f"step {j}: token {eng['ids'][j]} != oracle {orc.token_ids[j]} "
                            f"(oracle margin {orc.margins[j]:.4g}; engine lp {eng['chosen'][j]:.6f} for its "
                            f"token, {eng['steps'][j].get(orc.token_ids[j], math.nan):.6f} for the oracle's; "
                            f"oracle lp {orc.logprobs[j]:.6f})")
            break
        agree = j + 1
        dlp = abs(eng["chosen"][j] - orc.logprobs[j])
        max_dlp = max(max_dlp, dlp)
        if not dlp <= lp_tol:
            msgs.append(f"step {j}: logprob {eng['chosen'][j]:.6f} vs oracle {orc.logprobs[j]:.6f} (|d| {dlp:.3g})")
    max_dcap = 0.0
    want = orc.captures
    got = eng["captures"]
    if (want is None) != (got is None):
        msgs.append(f"captures: engine {'none' if got is None else 'some'}, oracle {'none' if want is None else 'some'}")
    elif want is not None:
        P = orc.prompt_len
        limit = P + agree  # rows at positions < P + agree were fed identical tokens
        rows_w = [i for i, p in enumerate(want["positions"]) if p < limit]
        full = agree == n and cut is None
        if full and list(got["positions"]) != list(want["positions"]):
            msgs.append(f"capture positions {list(got['positions'])[:6]}... != oracle {want['positions'][:6]}...")
        gpos = {p: i for i, p in enumerate(got["positions"])}
        missing = [want["positions"][i] for i in rows_w if want["positions"][i] not in gpos]
        if missing:
            msgs.append(f"capture positions missing in the engine: {missing[:8]}")
        else:
            rows_g = [gpos[want["positions"][i]] for i in rows_w]
            for kind in ("heads", "residual"):
                if sorted(got.get(kind, {})) != sorted(want[kind]):
                    msgs.append(f"capture {kind} layers {sorted(got.get(kind, {}))} != oracle {sorted(want[kind])}")
                    continue
                for layer, w in want[kind].items():
                    g = got[kind][layer]
                    if tuple(g.shape[1:]) != tuple(w.shape[1:]) or g.shape[0] != len(got["positions"]):
                        msgs.append(f"capture {kind}[{layer}] shape {tuple(g.shape)} vs oracle {tuple(w.shape)}")
                        continue
                    if not rows_w:
                        continue
                    d = (g[rows_g].float() - w[rows_w].float()).abs()
                    md = float(d.max())
                    max_dcap = max(max_dcap, md)
                    if not md <= cap_tol:
                        r = int(d.reshape(len(rows_w), -1).max(1).values.argmax())
                        msgs.append(f"capture {kind}[{layer}]: max |d| {md:.3g} at position {want['positions'][rows_w[r]]}")
    min_margin = min(orc.margins[:max(last, 1)]) if orc.margins else math.nan
    shown = msgs if len(msgs) <= 4 else msgs[:4] + [f"... and {len(msgs) - 4} more"]
    return Verdict(label, not msgs, agree, cut, max_dlp, max_dcap, min_margin, "; ".join(shown), config)


def compare_engines(a: dict, b: dict, tol: float = WARM_COLD_TOL) -> str:
    """'' when two engine outputs have the same tokens and every common returned
    logprob within ``tol``; else what differs."""
    if a["error"] or b["error"]:
        return f"errors: {a['error']!r} / {b['error']!r}"
    if a["ids"] != b["ids"]:
        k = next((j for j, (x, y) in enumerate(zip(a["ids"], b["ids"])) if x != y), min(len(a["ids"]), len(b["ids"])))
        return f"tokens differ from step {k} of {len(a['ids'])}"
    worst = 0.0
    for sa, sb in zip(a["steps"], b["steps"]):
        for t in set(sa) & set(sb):
            worst = max(worst, abs(sa[t] - sb[t]))
    return "" if worst <= tol else f"logprobs differ by {worst:.3g}"


# -- runs ------------------------------------------------------------------------------
def sampling(max_tokens: int, logprobs: int = 2):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs, ignore_eos=True)


def run_batch(llm, oracle, cases: list[Case]) -> list[Verdict]:
    """All cases in ONE generate call (one mixed batch), each compared with the oracle."""
    outs = llm.generate([{"prompt_token_ids": c.prompt_ids} for c in cases],
                        [sampling(c.max_tokens) for c in cases], steer=[c.config for c in cases],
                        use_tqdm=False)
    verdicts = []
    for c, o in zip(cases, outs):
        orc = oracle.generate(c.prompt_ids, c.config, c.max_tokens)
        v = compare(c.label, engine_summary(o), orc, c.config)
        plain = oracle.generate(c.prompt_ids, None, c.max_tokens).token_ids if c.config else None
        v.extra["changed"] = plain is not None and plain != orc.token_ids
        verdicts.append(v)
    return verdicts


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


def conversation_config(rng: random.Random, shape: Shape, P: int, kind: str) -> dict | None:
    """A config for a conversation whose first turn has ``P`` prompt tokens; its items act
    on layer 0 (so they change the KV cache of the layers after it)."""
    if kind == "plain":
        return None
    capture = rng.choice((None, "last", "generated"))
    if kind == "mixed":
        combos = [(rng.choice(ITEM_KINDS), p) for p in rng.sample(POSITION_KINDS, 3)]
        return random_config(rng, shape, P, combos, extra=0, capture=capture, layer0=True)
    combos = [(rng.choice(ITEM_KINDS), p) for p in kind.split("+")]
    if "+" not in kind and rng.random() < 0.5:
        combos.append((rng.choice(ITEM_KINDS), kind))
    return random_config(rng, shape, P, combos, extra=0, capture=capture, layer0=True)


def conversations(seed: int, shape: Shape, vocab: int, n: int, turns: int = 3) -> list[Conversation]:
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
        cfg = conversation_config(rng, shape, len(first), kind)
        news = [random_ids(rng, rng.randint(3, 6), vocab) for _ in range(turns)]
        out.append(Conversation(f"s{seed}-conv{i}-{kind}", first, cfg, rng.randint(24, 32), turns, news))
    return out


@dataclass
class TurnRecord:
    label: str
    conv: Conversation
    turn: int
    prompt_ids: list[int]
    warm: dict
    cold: dict | None = None


def run_conversations(llm, convs: list[Conversation], seed: int = 0) -> list[TurnRecord]:
    """Round k runs turn k of every conversation in one generate call (shuffled), with
    the prefix cache left warm from the earlier rounds (it is reset once, before round 0);
    turn k+1's prompt is turn k's prompt + reply + the conversation's new tokens. Then every
    turn again alone, after ``reset_prefix_cache()`` (cold)."""
    rng = random.Random(seed)
    prompts = {id(c): list(c.first_prompt) for c in convs}
    records: list[TurnRecord] = []
    llm.reset_prefix_cache()
    for k in range(max(c.turns for c in convs)):
        batch = [c for c in convs if k < c.turns]
        rng.shuffle(batch)
        outs = llm.generate([{"prompt_token_ids": prompts[id(c)]} for c in batch],
                            [sampling(c.max_tokens) for c in batch], steer=[c.config for c in batch],
                            use_tqdm=False)
        for c, o in zip(batch, outs):
            s = engine_summary(o)
            records.append(TurnRecord(f"{c.label}-t{k}", c, k, list(prompts[id(c)]), s))
            prompts[id(c)] = prompts[id(c)] + s["ids"] + c.new_tokens[k]
    for r in records:
        llm.reset_prefix_cache()
        o = llm.generate([{"prompt_token_ids": r.prompt_ids}], sampling(r.conv.max_tokens),
                         steer=[r.conv.config], use_tqdm=False)[0]
        r.cold = engine_summary(o)
    return records


def check_turns(oracle, records: list[TurnRecord]) -> list[dict]:
    """Per turn: warm vs cold, warm vs oracle, cold vs oracle."""
    rows = []
    for r in records:
        orc = oracle.generate(r.prompt_ids, r.conv.config, r.conv.max_tokens)
        rows.append({
            "label": r.label, "config": r.conv.config, "P": len(r.prompt_ids), "cached": r.warm["cached"],
            "warm_cold": compare_engines(r.warm, r.cold),
            "warm_oracle": compare(r.label, r.warm, orc, r.conv.config),
            "cold_oracle": compare(r.label, r.cold, orc, r.conv.config),
        })
    return rows


def turn_failures(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        bad = []
        if row["warm_cold"]:
            bad.append(f"warm != cold: {row['warm_cold']}")
        if not row["warm_oracle"].ok:
            bad.append(f"warm != oracle: {row['warm_oracle'].message}")
        if not row["cold_oracle"].ok:
            bad.append(f"cold != oracle: {row['cold_oracle'].message}")
        if bad:
            out.append(f"{row['label']} (P={row['P']}, cached {row['cached']}) {row['config']}: " + " | ".join(bad))
    return out


def verdict_table(verdicts: list[Verdict]) -> str:
    lines = [f"{'case':<18} {'ok':<3} {'cmp':>4} {'cut':>4} {'max|dlp|':>9} {'max|dcap|':>9} {'min margin':>10}  config"]
    for v in verdicts:
        cut = "-" if v.cut is None else str(v.cut)
        lines.append(f"{v.label:<18} {'ok' if v.ok else 'NO':<3} {v.compared:>4} {cut:>4} {v.max_dlp:>9.2e} "
                     f"{v.max_dcap:>9.2e} {v.min_margin:>10.4f}  {v.config}")
        if not v.ok:
            lines.append(f"    -> {v.message}")
    return "\n".join(lines)


def token_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(tokenizer(t)["input_ids"]) for t in texts]
