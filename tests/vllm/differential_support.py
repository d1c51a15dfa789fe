"""Randomized differential testing of emosteer.LLM against the independent oracle
(tests/vllm/oracle.py): the comparison of one engine output with the oracle, and the two
runs (a mixed batch; multi-turn conversations with the prefix cache warm, then cold).
The configs come from tests/vllm/differential_configs.py, whose names this module
re-exports, so callers import one module. Used by tests/vllm/test_compiled_differential.py
and by scripts/differential.py (longer runs).

Nothing here imports emosteer's spec, compiler, HF backend or plugin.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

# The generator, re-exported: callers use ``differential_support`` for both.
from differential_configs import (CAPTURE_POSITIONS, COMBOS, CONVERSATION_KINDS, GATE_VARIANTS,
                                  ITEM_KINDS, MAX_RES_TERMS, POSITION_KINDS, PROJECT_NAMES,
                                  STEER_VARIANTS, Case, Conversation, Shape, add_gate_entries,
                                  batch_cases, conversation_config, conversations, coverage,
                                  gate_variant, random_config, random_ids, steer_variant)

__all__ = [  # the generator's names (re-exported) and this module's
    "CAPTURE_POSITIONS", "COMBOS", "CONVERSATION_KINDS", "GATE_VARIANTS", "ITEM_KINDS", "MAX_RES_TERMS",
    "POSITION_KINDS", "PROJECT_NAMES", "STEER_VARIANTS", "Case", "Conversation", "Shape",
    "add_gate_entries", "batch_cases", "conversation_config", "conversations", "coverage",
    "gate_variant", "random_config", "random_ids", "steer_variant",
    "MARGIN_BOUND", "LOGPROB_TOL", "CAPTURE_TOL", "WARM_COLD_TOL", "engine_summary", "Verdict",
    "compare", "compare_engines", "sampling", "run_batch", "gate_open_fraction", "TurnRecord",
    "run_conversations", "check_turns", "turn_failures", "verdict_table", "token_prompts",
]

MARGIN_BOUND = 1e-3  # oracle top-2 logit margin below which the rest of a row is not compared
LOGPROB_TOL = 1e-3  # engine vs oracle, chosen-token logprob
CAPTURE_TOL = 1e-4  # engine vs oracle, captured activations (fp32)
WARM_COLD_TOL = 1e-5  # engine warm vs cold prefix cache


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
    captured rows fed by compared tokens within ``cap_tol`` (probe scores: NaN at the
    same rows). A gate whose probe score is within ``oracle.GATE_TIE`` of its threshold
    at position q (``orc.gate_tie``) may go either way: steps whose logits read q and
    captured rows from q on are not compared."""
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
    tie = getattr(orc, "gate_tie", None)
    if tie is not None:  # step j's logits are those of position P + j - 1
        gate_cut = max(0, tie - orc.prompt_len + 1)
        last = min(last, gate_cut)
        cut = gate_cut if cut is None else min(cut, gate_cut)
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
        if tie is not None:
            limit = min(limit, tie)
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
            for kind in ("heads", "residual", "probe"):
                if sorted(got.get(kind, {})) != sorted(want.get(kind, {})):
                    msgs.append(f"capture {kind} layers {sorted(got.get(kind, {}))} != oracle {sorted(want[kind])}")
                    continue
                for layer, w in want[kind].items():
                    g = got[kind][layer]
                    if tuple(g.shape[1:]) != tuple(w.shape[1:]) or g.shape[0] != len(got["positions"]):
                        msgs.append(f"capture {kind}[{layer}] shape {tuple(g.shape)} vs oracle {tuple(w.shape)}")
                        continue
                    if not rows_w:
                        continue
                    gw, ww = g[rows_g].float(), w[rows_w].float()
                    if kind == "probe":  # NaN = not scored: at the same rows, compared as 0
                        if not bool((gw.isnan() == ww.isnan()).all()):
                            r = int((gw.isnan() != ww.isnan()).int().argmax())
                            msgs.append(f"capture probe[{layer}]: scored at other positions (first at "
                                        f"{want['positions'][rows_w[r]]}: engine {float(gw[r])}, oracle {float(ww[r])})")
                            continue
                        gw, ww = gw.nan_to_num(0.0), ww.nan_to_num(0.0)
                    d = (gw - ww).abs()
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
        v.extra["gate_open"] = gate_open_fraction(orc)
        verdicts.append(v)
    return verdicts


def gate_open_fraction(orc) -> float | None:
    """Of the positions the oracle's gate scored, the fraction where it was open (None:
    no gate, or nothing scored)."""
    if orc.gate_open is None:
        return None
    opened = [o for o, p in zip(orc.gate_open, orc.gate_scores) if not math.isnan(p)]
    return sum(opened) / len(opened) if opened else None


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
