"""Randomized differential run: emosteer.LLM (compiled engine) against the independent
oracle of tests/vllm/oracle.py, with many more configs than the test suite.

    .venv/bin/python scripts/differential.py --configs 300 --seed 1 --conversations 14

Builds the tiny test Llama and bank exactly as tests/vllm/conftest.py does (same path, so
vLLM's compile cache is reused), runs the random configs in mixed batches (each batch one
generate call: steered, capture-only and plain rows over the test prompts and random-token
prompts of 5-100 tokens), then multi-turn conversations with the prefix cache warm and
again cold, compares everything with the oracle, prints a summary and exits 1 on any
mismatch. The configs draw the residual modes (relative adds, clamps, project-outs of one
vector or a list) and probe gates (above / below, latched or not, capture.probe) over the
bank's extra entries (``differential_support.add_gate_entries``); ``--no-features`` draws
only the plain steer / heads / neurons items.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model() -> str:
    """The tiny Llama at tests/vllm/conftest.py's path (keyed by the builder's source)."""
    import hashlib
    import inspect
    import tempfile

    from emosteer.models import tiny as testing

    tag = hashlib.sha256(inspect.getsource(testing).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / "emosteer-test-models" / f"tiny_llama-{tag}"
    return str(testing.build_tiny_llama(path))


def kinds_of(cfg) -> str:
    if not cfg:
        return "plain"
    import differential_support as ds

    parts = []
    for it in cfg.get("steer", []):
        parts.append(f"steer:{_pk(it.get('positions', 'all'))}")
        if ds.steer_variant(it) != "add:absolute":
            parts.append(f"mode:{ds.steer_variant(it)}")
    if "when" in cfg:
        parts.append(f"gate:{ds.gate_variant(cfg['when'])}")
    for it in cfg.get("heads", []):
        parts.append(f"{it['mode']}:{_pk(it.get('positions', 'all'))}")
    if "neurons" in cfg:
        parts.append(f"neurons:{_pk(cfg['neurons'].get('positions', 'all'))}")
    if "capture" in cfg:
        parts.append(f"capture:{cfg['capture'].get('positions', 'last')}")
        if cfg["capture"].get("probe"):
            parts.append("capture:probe")
    return " ".join(sorted(set(parts)))


def _pk(p) -> str:
    return "list" if isinstance(p, list) else p


def main(argv=None) -> int:
    t_start = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", type=int, default=300, help="random steered configs (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--conversations", type=int, default=14, help="multi-turn conversations (default 14)")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--batch", type=int, default=48, help="steered configs per generate call (default 48)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--eager", action="store_true", help="run the eager engine instead of the compiled one")
    ap.add_argument("--verbose", action="store_true", help="print every row, not only the mismatches")
    ap.add_argument("--no-features", dest="features", action="store_false",
                    help="no residual modes or probe gates in the random configs")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT / "tests" / "vllm"))
    import differential_support as ds
    from oracle import Oracle
    from vllm_support import LONG_PROMPT, PROMPTS, engine_env, make_bank
    from transformers import AutoConfig

    import emosteer
    from emosteer.request.bank import ModelInfo

    model = build_model()
    info = ModelInfo.from_hf_config(AutoConfig.from_pretrained(model))
    bank = ds.add_gate_entries(make_bank(info), info)  # as tests/vllm/conftest.py's bank
    bank_path = f"{model}.bank.safetensors"
    bank.save(bank_path)
    shape = ds.Shape.of(info)
    engine_env()
    t0 = time.monotonic()
    llm = emosteer.LLM(model, bank=bank_path, enforce_eager=args.eager, dtype="float32", max_model_len=256,
                       block_size=32, seed=0, enable_prefix_caching=True)
    print(f"engine up in {time.monotonic() - t0:.0f} s ({'eager' if args.eager else 'compiled'})", flush=True)
    oracle = Oracle(model, bank_path)
    tok = llm.get_tokenizer()
    vocab = len(tok)
    rng = random.Random(args.seed)
    prompts = ds.token_prompts(tok, PROMPTS + [LONG_PROMPT])
    prompts += [ds.random_ids(rng, rng.randint(5, 100), vocab) for _ in range(8)]

    failures: list[str] = []
    by_kind: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])  # rows, failed, changed
    stats = {"rows": 0, "tokens": 0, "compared": 0, "cuts": 0, "max_dlp": 0.0, "max_dcap": 0.0}
    t1 = time.monotonic()
    done, b = 0, 0
    while done < args.configs:
        n = min(args.batch, args.configs - done)
        sub = prompts[:]
        random.Random(args.seed * 1000 + b).shuffle(sub)
        cases = ds.batch_cases(args.seed * 1000 + b, shape, sub, n, n_plain=max(1, n // 12),
                               n_capture_only=max(1, n // 16), max_tokens=args.max_tokens,
                               features=args.features)
        verdicts = ds.run_batch(llm, oracle, cases)
        for c, v in zip(cases, verdicts):
            stats["rows"] += 1
            stats["tokens"] += c.max_tokens
            stats["compared"] += v.compared
            stats["cuts"] += v.cut is not None
            stats["max_dlp"] = max(stats["max_dlp"], v.max_dlp)
            stats["max_dcap"] = max(stats["max_dcap"], v.max_dcap)
            for k in kinds_of(c.config).split():
                by_kind[k][0] += 1
                by_kind[k][1] += not v.ok
                by_kind[k][2] += bool(v.extra.get("changed"))
            if not v.ok:
                failures.append(f"[batch {b}] {v.label} P={len(c.prompt_ids)}: {v.message}\n    config: {c.config}")
        if args.verbose:
            print(ds.verdict_table(verdicts))
        bad = sum(not v.ok for v in verdicts)
        print(f"batch {b}: {len(cases)} rows ({n} steered configs), {bad} mismatches, "
              f"{time.monotonic() - t1:.0f} s", flush=True)
        done += n
        b += 1

    conv_rows = []
    if args.conversations:
        convs = ds.conversations(args.seed, shape, vocab, n=args.conversations, turns=args.turns,
                                 features=args.features)
        records = ds.run_conversations(llm, convs, seed=args.seed)
        conv_rows = ds.check_turns(oracle, records)
        conv_fail = ds.turn_failures(conv_rows)
        failures += [f"[conversation] {f}" for f in conv_fail]
        print(f"conversations: {len(convs)} x {args.turns} turns, {len(conv_fail)} turns differ, "
              f"{sum(r['cached'] for r in conv_rows)} prompt tokens read from the prefix cache", flush=True)

    print("\n== summary ==")
    print(f"mixed batches: {stats['rows']} rows, {stats['compared']} of {stats['tokens']} generated tokens "
          f"compared ({stats['cuts']} rows cut at an oracle near-tie < {ds.MARGIN_BOUND:g}); "
          f"max |d logprob| {stats['max_dlp']:.2e} (tol {ds.LOGPROB_TOL:g}), "
          f"max |d capture| {stats['max_dcap']:.2e} (tol {ds.CAPTURE_TOL:g})")
    print(f"{'item:positions':<22} {'rows':>5} {'failed':>6} {'changed':>7}")
    for k in sorted(by_kind):
        r, f, c = by_kind[k]
        print(f"{k:<22} {r:>5} {f:>6} {c:>7}")
    if conv_rows:
        print(f"\n{'conversation turn':<32} {'P':>4} {'cached':>6}  warm==cold  warm==oracle  cold==oracle")
        for r in conv_rows:
            print(f"{r['label']:<32} {r['P']:>4} {r['cached']:>6}  {'yes' if not r['warm_cold'] else 'NO':<10}  "
                  f"{'yes' if r['warm_oracle'].ok else 'NO':<12}  {'yes' if r['cold_oracle'].ok else 'NO'}")
    print(f"total {time.monotonic() - t_start:.0f} s")
    try:  # the engine's processes go with the run (they would outlive os._exit)
        llm.llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    if failures:
        print(f"\n== {len(failures)} mismatches ==")
        for f in failures:
            print(f)
        return 1
    print("\nno mismatches")
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)  # do not wait for vLLM's engine processes to wind down on their own
