"""Benchmark P2: the full head-patching sweep of a model as one batch of requests.

Every (layer, head) of the model is patched on every neutral prompt of N pairs with its
output on the paired emotional prompt at the last prompt token, each (head, pair) its
own request; the measured quantity is the target emotion's log-mass at the next token
(what ``emosteer.analysis.attribution.head_map`` computes). Two variants (``--variant``):

    last       each patch at the last prompt token ("positions": "last")
    aligned    each patch position-aligned over the prompt (what ``head_attribution``
               does for pairs of one layout): a "head_positions" vector of the emotional
               run's head outputs at every position from the pair's first differing token
               to the end of the shorter prompt, patched at the same positions of the
               neutral prompt; one slot per request (its vectors one run of pool rows)

Three conditions per variant, interleaved in rounds inside one process (rotated order,
medians over rounds):

    emosteer_vllm   every patch its own request, all L*H*N rows in one engine call
                    (compiled vLLM engine with the plugin)
    plain_vllm      the same rows, same engine, no config and no capture: plain vLLM
                    on the same tokens, one generated token each (plugin loaded, idle)
    hf_hooks        transformers with a forward pre-hook on o_proj, one (layer, head)
                    configuration at a time, the N prompts batched (what TransformerLens
                    / pyvene-style sweeps do)

The two vLLM conditions are interleaved in rounds inside the engine's process (rotated
order, medians). The engine runs with prefix caching (vLLM's default) and 32-token blocks
(the CPU backend's default is 128, which holds no full block of these prompts): every
condition sends the same prompts, and a last-token patch salts only the block holding the
last prompt token, so the patched requests share the prompt's earlier blocks exactly as
plain vLLM's identical prompts do: the same tokens are computed in both. An aligned
patch keys every block from its first patched position on, so each request computes
its prompt from the block holding that position: in the aligned variant each plain
request carries its own ``cache_salt`` (the same every round), so after the warm-up it
finds its own earlier full blocks cached and computes the rest, as the patched requests
do (the default model's joy pair: 52 prompt tokens, first difference at 32, 32 of them
cached per request in both conditions). The engine's KV cache is 4 GiB unless
``VLLM_CPU_KVCACHE_SPACE`` says otherwise, room for both conditions' cached blocks at once;
each round records ``cached_tokens`` (prompt tokens the prefix cache served) and the
table says whether both conditions had the same every round (with 1 GiB, two pairs'
salted plain rows were partly evicted between rounds and plain vLLM computed up to 5.4 %
more tokens than the sweep). The hook sweep runs afterwards in a child
process, with the engine shut down: vLLM's CPU worker keeps its threads spinning while it idles, which would slow
anything timed beside it on a small machine. The emosteer and HF results are checked
equal (max |ΔM| difference, float32). The headline is the sweep's tokens/s as a fraction
of plain vLLM on the same tokens (target >= 0.9) and its speed-up over the hook sweep.

    python benchmarks/bench_sweep.py                 # default model, 4 pairs, 5 rounds (hooks: 3)
    python benchmarks/bench_sweep.py --pairs 2 --rounds 3 --model /path/to/model
    python benchmarks/bench_sweep.py --variant aligned

Rows go to benchmarks/results/sweep.csv (variant "last") and sweep_aligned.csv (variant
"aligned"), one per condition and round, the plots to sweep.png / sweep_aligned.png;
``--table`` prints the README table of the latest run (``--variant`` picks the file).

One run of 5 rounds says little about single rounds on a noisy host; ``--pool`` pools
the paired per-round ratios of the latest run in each CSV it is given (the variant is
read from the file's name) into benchmarks/results/sweep_pooled.csv, one row per variant:
the median with a 95 % bootstrap interval, the spread, the rounds below 0.95 and how
often 5 rounds drawn from the pooled ones would all reach 0.95:

    python benchmarks/bench_sweep.py --pool benchmarks/results/sweep.csv \
        benchmarks/results/sweep_rerun/sweep.csv benchmarks/results/sweep_aligned.csv ...
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import (  # noqa: E402
    RESULTS_DIR,
    append_csv,
    host_counters,
    host_delta,
    host_disturbed,
    machine_info,
    pyplot,
    read_csv,
    save_figure,
    version_string,
)

CSV = os.path.join(RESULTS_DIR, "sweep.csv")
VARIANTS = ("last", "aligned")


def csv_name(variant: str) -> str:
    return "sweep.csv" if variant == "last" else f"sweep_{variant}.csv"


COLUMNS = ("run", "method", "round", "seconds", "requests", "tokens", "tok_per_s", "frac_of_plain",
           "max_abs_diff", "model", "layers", "heads", "pairs", "block_size", "machine", "version",
           "timestamp", "max_slots", "steal_s", "iowait_s", "major_faults", "disturbed", "max_steal",
           "score", "cached_tokens")
METHODS = ("emosteer_vllm", "plain_vllm", "hf_hooks")


def machine() -> str:
    """The sweep's machine column: architecture, core count and torch version."""
    mach = machine_info()
    return f"{mach['arch']} {mach['ncpu']} cores, torch {torch.__version__}"


def hf_sweep(model, dec, ids_neg, z_pos, cands, tids, pad_id, aligned=None):
    """ΔM-ready log-masses [cands, N] with one hook configuration at a time.
    ``aligned`` (the aligned variant): per pair ``(positions, z [n, L, H, D])``, the
    head's outputs patched at those prompt positions instead of the last token's."""
    from emosteer.analysis.attribution import target_logmass

    N = len(ids_neg)
    T = max(len(r) for r in ids_neg)
    x = torch.full((N, T), pad_id, dtype=torch.long)
    mask = torch.zeros((N, T), dtype=torch.long)
    for i, r in enumerate(ids_neg):
        x[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    D = z_pos.shape[3]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = torch.zeros(len(cands), N)
    if aligned is not None:  # (row, column) of every patched token, left padding
        at_row = torch.cat([torch.full((len(p),), i) for i, (p, _) in enumerate(aligned)])
        at_col = torch.cat([T - len(ids_neg[i]) + torch.as_tensor(p) for i, (p, _) in enumerate(aligned)])
        at_z = torch.cat([z for _, z in aligned])  # [M, L, H, D]
    for k, (l, h) in enumerate(cands):
        def hook(module, args, l=l, h=h):
            a = args[0].clone()
            if aligned is None:
                a[:, -1, h * D:(h + 1) * D] = z_pos[:, l, h].to(a.dtype)
            else:
                a[at_row, at_col, h * D:(h + 1) * D] = at_z[:, l, h].to(a.dtype)
            return (a,) + tuple(args[1:])
        handle = dec.o_proj[l].register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                lg = model(input_ids=x, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        finally:
            handle.remove()
        out[k] = torch.stack([target_logmass(lg[i], tids) for i in range(N)])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="rounds of the two vLLM conditions")
    p.add_argument("--hf-rounds", type=int, default=3, help="rounds of the (slow) hook sweep")
    p.add_argument("--emotion", default="joy")
    p.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    p.add_argument("--block-size", type=int, default=32, help="KV cache block size (tokens)")
    p.add_argument("--max-slots", type=int, default=256,
                   help="emosteer's max_slots: distinct patch configs resident at once (every "
                        "request of the sweep is its own config; more wait for a slot)")
    p.add_argument("--variant", choices=(*VARIANTS, "both"), default="both",
                   help="last-token patches, position-aligned patches, or both (default)")
    p.add_argument("--max-steal", type=float, default=0.02,
                   help="a round in which the hypervisor took more than this fraction of the "
                        "machine's CPU time (steal, /proc/stat) is kept in the CSV marked "
                        "disturbed, left out of the medians and run again; 0: keep every round")
    p.add_argument("--max-reruns", type=int, default=5, help="disturbed rounds run again at most")
    p.add_argument("--table", action="store_true", help="print the README table of the latest run")
    p.add_argument("--out-dir", default=RESULTS_DIR, help="where sweep*.csv / sweep*.png go")
    p.add_argument("--pool", nargs="+", default=None, metavar="CSV",
                   help="pool the per-round ratios of these CSVs' latest runs into sweep_pooled.csv")
    p.add_argument("--hf-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.hf_child:
        return hf_child(a.hf_child)
    variants = VARIANTS if a.variant == "both" else (a.variant,)
    if a.pool:
        rows = pooled(a.pool)
        append_csv(rows, os.path.join(a.out_dir, "sweep_pooled.csv"), POOLED_COLUMNS)
        for r in rows:
            print(pooled_line(r))
        return 0
    if a.table:
        for v in variants:
            print(table(read_rows(os.path.join(a.out_dir, csv_name(v))), v))
        return 0
    # Room for every condition's cached prompt blocks at once (with two pairs, plain
    # vLLM's salted rows alone keep 540 blocks), so no round finds its blocks evicted by
    # the other condition's: the CSV's cached_tokens shows it, and the table says so.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from emosteer.analysis.attribution import _pair_captures, target_token_ids
    from emosteer.analysis.attribution.heads import _first_difference
    from emosteer.request.bank import VectorBank
    from emosteer.data import load_builtin
    from emosteer.models import resolve_model
    from emosteer.analysis.runners import make_runner

    path = resolve_model(a.model)
    runner = make_runner(str(path), "vllm", progress=False, max_slots=a.max_slots, seed=0, max_model_len=512,
                         enforce_eager=a.eager, block_size=a.block_size)
    info = runner.info
    L, H = info.num_layers, info.num_heads
    pairs = load_builtin(a.emotion)[:a.pairs]
    ids_pos, ids_neg, (_, z_pos), _ = _pair_captures(runner, pairs)
    N = len(ids_neg)
    bank = VectorBank(info)
    for i in range(N):
        bank.add(f"_sweep.zpos.{i}", "head", z_pos[i])
    aligned = None
    if "aligned" in variants:
        # The emotional run's head outputs at every position (all layers), patched from
        # the first token where the pair differs to the end of the shorter prompt.
        cap = {"capture": {"heads": "all", "positions": "all"}}
        _, caps = runner.forward(ids_pos, [cap] * N, positions=[[len(r) - 1] for r in ids_pos])
        aligned = []
        for i, c in enumerate(caps):
            P = min(len(ids_pos[i]), len(ids_neg[i]))
            first = min(_first_difference(ids_pos[i], ids_neg[i]), P - 1)
            where = {q: k for k, q in enumerate(c["positions"])}
            z = torch.stack([torch.stack([c["heads"][l][where[q]].float() for l in range(L)])
                             for q in range(first, P)])  # [n, L, H, D]
            aligned.append((list(range(first, P)), z))
            bank.add(f"_sweep.zpos_at.{i}", "head_positions", z)
    runner.register(bank)
    tids = torch.as_tensor(target_token_ids(runner.tokenizer, a.emotion))
    cands = [(l, h) for l in range(L) for h in range(H)]
    rows = [r for _ in cands for r in ids_neg]
    tokens = sum(len(r) + 1 for r in rows)  # prefill + the one generated token

    def specs_of(variant):
        if variant == "last":
            return [{"heads": [{"layer": l, "head": h, "mode": "patch", "vector": f"_sweep.zpos.{i}",
                                "positions": "last"}]} for (l, h) in cands for i in range(N)]
        return [{"heads": [{"layer": l, "head": h, "mode": "patch", "vector": f"_sweep.zpos_at.{i}",
                            "positions": aligned[i][0]}]} for (l, h) in cands for i in range(N)]

    # Both vLLM conditions ask the engine for the same output through the same call: one
    # token and the log-probabilities of the target ids (what the sweep's score is made of).
    salts = [f"sweep-{k}" for k in range(len(rows))]
    plain = [None] * len(rows)

    def run(method, variant, specs):
        host0 = host_counters()
        t0 = time.perf_counter()
        if method == "emosteer_vllm":
            res = runner.next_token_logmass(rows, specs, tids.tolist()).view(len(cands), N)
        else:  # aligned: each request its own salt, so it reuses its own blocks only
            runner.next_token_logmass(rows, plain, tids.tolist(),
                                      salts=salts if variant == "aligned" else None)
            res = None
        sec = time.perf_counter() - t0
        # prompt tokens the prefix cache served: equal in both conditions when they compute
        # the same tokens (a condition whose cached blocks were evicted computes more)
        return sec, res, dict(host_delta(host0, host_counters()), cached_tokens=runner.last_cached_tokens)

    got: dict[str, dict[str, torch.Tensor]] = {v: {} for v in variants}
    times: dict[str, dict[str, list[float]]] = {v: {m: [] for m in METHODS} for v in variants}
    # per round: CPU time the hypervisor took, I/O wait, major page faults (host_counters)
    hosts: dict[str, dict[str, list[dict]]] = {v: {m: [] for m in METHODS} for v in variants}
    disturbed: dict[str, list[bool]] = {v: [] for v in variants}  # per round, both conditions
    vllm_methods = METHODS[:2]
    for v in variants:
        specs = specs_of(v)
        # warm-up (not counted): one whole round of each condition
        run("emosteer_vllm", v, specs)
        run("plain_vllm", v, specs)
        rnd = kept = 0
        while kept < a.rounds and rnd < a.rounds + a.max_reruns:
            order = vllm_methods if rnd % 2 == 0 else vllm_methods[::-1]
            bad = False
            for m in order:
                sec, res, host = run(m, v, specs)
                times[v][m].append(sec)
                hosts[v][m].append(host)
                bad |= host_disturbed(host, sec, a.max_steal)
                if res is not None and m not in got[v]:
                    got[v][m] = res
                print(f"{v:7s} round {rnd} {m:14s} {sec:8.2f} s  {tokens / sec:9.1f} tok/s  "
                      + "  ".join(f"{k} {x:g}" for k, x in host.items()), flush=True)
            disturbed[v].append(bad)
            if bad:
                print(f"{v:7s} round {rnd} disturbed: the hypervisor took more than "
                      f"{a.max_steal:.0%} of the CPU time; run again", flush=True)
            kept += not bad
            rnd += 1
    status = runner.llm.admission_status()
    runner.llm.llm.llm_engine.engine_core.shutdown()
    # The hook sweeps in their own process, the engine gone.
    import subprocess
    import tempfile

    for v in variants:
        with tempfile.TemporaryDirectory() as tmp:
            job = os.path.join(tmp, "job.pt")
            torch.save({"model": str(path), "ids_neg": ids_neg, "z_pos": z_pos, "cands": cands,
                        "tids": tids, "rounds": a.hf_rounds, "aligned": aligned if v == "aligned" else None},
                       job)
            subprocess.run([sys.executable, os.path.abspath(__file__), "--hf-child", job], check=True)
            back = torch.load(job + ".out")
        times[v]["hf_hooks"] = back["times"]
        got[v]["hf_hooks"] = back["result"]
        for rnd, sec in enumerate(back["times"]):
            print(f"{v:7s} round {rnd} {'hf_hooks':14s} {sec:8.2f} s  {tokens / sec:9.1f} tok/s", flush=True)
    run_id = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    print(f"admission at the end: {status}")
    for v in variants:
        diff = float((got[v]["emosteer_vllm"] - got[v]["hf_hooks"]).abs().max())
        print(f"{v}: max |M(emosteer) - M(hf hooks)| over {len(cands)} heads x {N} pairs: {diff:.3g}")
        kept_plain = [t for t, bad in zip(times[v]["plain_vllm"], disturbed[v]) if not bad]
        plain_med = statistics.median(kept_plain or times[v]["plain_vllm"])
        out = []
        for m in METHODS:
            for rnd, sec in enumerate(times[v][m]):
                host = hosts[v][m][rnd] if rnd < len(hosts[v][m]) else {}
                bad = m != "hf_hooks" and disturbed[v][rnd]
                out.append(dict(**host, disturbed=int(bad), max_steal=a.max_steal, run=run_id, method=m, round=rnd, seconds=f"{sec:.4g}", requests=len(rows),
                                tokens=tokens, tok_per_s=f"{tokens / sec:.5g}",
                                frac_of_plain=f"{plain_med / sec:.4g}", max_abs_diff=f"{diff:.3g}",
                                model=str(a.model), layers=L, heads=H, pairs=N, block_size=a.block_size,
                                machine=machine(), version=version_string(), timestamp=run_id,
                                max_slots=a.max_slots, score="logprobs"))
        append_csv(out, os.path.join(a.out_dir, csv_name(v)), COLUMNS)
        plot(out, os.path.join(a.out_dir, csv_name(v)[:-4] + ".png"), v)
        print(table(out, v))
    return 0


def hf_child(job_path: str) -> int:
    """Time the transformers hook sweep (``rounds`` times) on the job's inputs."""
    from emosteer.hf import load_hf_model
    from emosteer.hf.layers import find_decoder

    job = torch.load(job_path)
    model, tok = load_hf_model(job["model"])
    dec = find_decoder(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    args = (model, dec, job["ids_neg"], job["z_pos"], job["cands"], job["tids"], pad)
    al = job.get("aligned")
    hf_sweep(*args[:2], args[2][:1], args[3][:1], args[4][:2], *args[5:], aligned=al and al[:1])  # warm-up
    times, res = [], None
    for _ in range(job["rounds"]):
        t0 = time.perf_counter()
        res = hf_sweep(*args, aligned=al)
        times.append(time.perf_counter() - t0)
    torch.save({"times": times, "result": res}, job_path + ".out")
    return 0


def read_rows(path: str = CSV) -> list[dict]:
    """The rows of the latest run in ``path`` (sweep.csv: the last-token variant)."""
    rows = read_csv(path)
    last = rows[-1]["run"]
    return [r for r in rows if r["run"] == last]


def _bad(r: dict) -> bool:
    """A round the host disturbed (rows fresh from a run hold ints, rows read back strings)."""
    return str(r.get("disturbed", "0")) == "1"


def _medians(rows):
    med = {}
    for m in METHODS:
        mine = [r for r in rows if r["method"] == m]
        secs = [float(r["seconds"]) for r in mine if not _bad(r)]
        secs = secs or [float(r["seconds"]) for r in mine]  # every round disturbed: all of them
        med[m] = statistics.median(secs) if secs else None
    return med


def _rounds_note(rows) -> str:
    """"5 rounds" or "5 rounds (2 more disturbed by the host, left out)"."""
    plain = [r for r in rows if r["method"] == "plain_vllm"]
    bad = sum(_bad(r) for r in plain)
    note = f"{len(plain) - bad} rounds"
    if bad:
        limit = float(plain[0].get("max_steal") or 0)
        note += (f" ({bad} more run again: the hypervisor took over {limit:.0%} of the CPU "
                 f"time in them, steal; in the CSV marked disturbed, left out)")
    return note


def _round_ratios(rows) -> list[float]:
    """Plain vLLM's seconds over the sweep's, round by round (rounds the host disturbed
    left out): paired, so a slower hour slows both sides of a ratio alike."""
    by = {(r["method"], str(r["round"])): r for r in rows}
    out = []
    for (m, rnd), e in sorted(by.items(), key=lambda kv: int(kv[0][1])):
        pl = by.get(("plain_vllm", rnd))
        if m == "emosteer_vllm" and pl is not None and not _bad(pl):
            out.append(float(pl["seconds"]) / float(e["seconds"]))
    return out


POOLED_COLUMNS = ("variant", "runs", "rounds", "median", "median_lo", "median_hi", "mean", "sd",
                  "lowest", "highest", "below_095", "p_all5_ge_095", "files", "timestamp")


def pooled(paths: list[str], target: float = 0.95, boot: int = 4000, seed: int = 0) -> list[dict]:
    """Per variant, the paired per-round ratios of the latest run of each CSV in
    ``paths``, pooled: median with a 95 % bootstrap interval (rounds resampled), mean and
    standard deviation, rounds below ``target``, and ``p_all5_ge_095``: the share of
    5-round draws (with replacement) from the pooled rounds whose every round reaches
    ``target``, what "every round of 5" can expect at this spread."""
    from emosteer.report.stats import bootstrap

    by: dict[str, list[tuple[str, list[float]]]] = {}
    for path in paths:
        variant = {csv_name(v): v for v in VARIANTS}.get(os.path.basename(path))
        if variant is None:
            raise SystemExit(f"--pool {path}: not a sweep CSV (its name says the variant: "
                             f"{', '.join(csv_name(v) for v in VARIANTS)})")
        by.setdefault(variant, []).append((path, _round_ratios(read_rows(path))))
    out = []
    for variant, runs in by.items():
        vals = [x for _, rs in runs for x in rs]
        t = torch.tensor(vals, dtype=torch.float64)
        _, ci = bootstrap(lambda idx: t[idx].quantile(0.5, dim=-1), len(vals), n_boot=boot, seed=seed)
        g = torch.Generator().manual_seed(seed)
        draws = t[torch.randint(0, len(vals), (boot, 5), generator=g)]
        out.append({"variant": variant, "runs": len(runs), "rounds": len(vals),
                    "median": round(statistics.median(vals), 4), "median_lo": round(float(ci[0]), 4),
                    "median_hi": round(float(ci[1]), 4), "mean": round(statistics.mean(vals), 4),
                    "sd": round(statistics.stdev(vals), 4), "lowest": round(min(vals), 4),
                    "highest": round(max(vals), 4), "below_095": sum(x < target for x in vals),
                    "p_all5_ge_095": round(float((draws >= target).all(dim=1).double().mean()), 3),
                    "files": ";".join(os.path.relpath(p_, os.path.dirname(HERE)) for p_, _ in runs),
                    "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    return out


def pooled_line(r: dict) -> str:
    return (f"{r['variant']}: {r['rounds']} rounds of {r['runs']} runs, per-round ratio median "
            f"{r['median']:.3f} [{r['median_lo']:.3f}, {r['median_hi']:.3f}], mean {r['mean']:.3f} "
            f"± {r['sd']:.3f} (sd), {r['lowest']:.3f}–{r['highest']:.3f}; {r['below_095']} rounds "
            f"below 0.95; 5 rounds drawn from these all reach 0.95 in {r['p_all5_ge_095']:.0%} of draws")


def _cached_note(rows) -> str:
    """Whether both vLLM conditions had the same prompt tokens served from the prefix
    cache in every counted round (then they computed the same tokens), from the CSV's
    ``cached_tokens``; empty for runs before it was recorded."""
    got = {m: [int(r["cached_tokens"]) for r in rows if r["method"] == m and not _bad(r)
               and str(r.get("cached_tokens", "")) not in ("", "None")] for m in METHODS[:2]}
    if not all(got.values()):
        return ""
    if len(set(got["emosteer_vllm"]) | set(got["plain_vllm"])) == 1:
        return (f"the prefix cache served both conditions the same {got['plain_vllm'][0]} prompt "
                "tokens every round (they computed the same tokens); ")
    span = {m: f"{min(v)}–{max(v)}" if min(v) != max(v) else str(v[0]) for m, v in got.items()}
    return (f"prefix-cache hits differed between rounds or conditions (sweep {span['emosteer_vllm']}, "
            f"plain {span['plain_vllm']} prompt tokens a round): the one with fewer computed more; ")


def table(rows, variant: str = "last") -> str:
    med = _medians(rows)
    r0 = rows[0]
    tok = int(r0["tokens"])
    lines = ["| method | seconds (median) | tok/s | vs plain vLLM on the same tokens | speed-up over hooks |",
             "| --- | --- | --- | --- | --- |"]
    al = variant == "aligned"
    names = {"emosteer_vllm": "emosteer on vLLM: every patch its own request, one call"
                              + (" (position-aligned, one slot each)" if al else ""),
             "plain_vllm": "vLLM, same rows, no config (same engine)"
                           + (", each request its own cache_salt" if al else ""),
             "hf_hooks": "transformers + o_proj hook, one (layer, head) at a time, prompts batched"}
    for m in METHODS:
        s = med[m]
        lines.append(f"| {names[m]} | {s:.2f} | {tok / s:.0f} | {med['plain_vllm'] / s:.3f} | "
                     f"{med['hf_hooks'] / s:.1f}× |")
    per = _round_ratios(rows)
    lines.append("")
    lines.append((f"Per round (plain seconds ÷ sweep seconds, each round's two conditions paired): "
                  f"{', '.join(f'{x:.3f}' for x in per)}; median {statistics.median(per):.3f}, "
                  f"lowest {min(per):.3f}. ") if per else "")
    lines[-1] += (f"{r0['layers']} layers × {r0['heads']} heads × {r0['pairs']} pairs = {r0['requests']} "
                 f"requests, {tok} tokens; {_rounds_note(rows)}, "
                 f"the two vLLM conditions interleaved in the engine's process (compiled, max_slots "
                 f"{r0.get('max_slots') or 256}), the hook "
                 f"sweep in its own process afterwards; prefix caching on, {r0.get('block_size') or 32}-token "
                 + ("blocks (an aligned patch keys every block from its first patched position, so "
                    "each request computes its prompt from that block on; each plain request has its "
                    "own cache_salt, the same every round, and reuses its own earlier blocks: both "
                    "compute the same tokens); " if al else
                    "blocks (a last-token patch shares the prompt's earlier blocks, as plain vLLM's "
                    "identical prompts do); ")
                 + ("both conditions' requests return one token and the engine's log-probabilities "
                    "of the target ids (the score is their log-sum-exp); "
                    if r0.get("score") == "logprobs" else
                    "the sweep's requests also return their last-layer residual (the score's logits "
                    "come from it), plain vLLM returns one sampled token; ")
                 + _cached_note(rows)
                 + f"results equal to the hook sweep within "
                 f"{float(r0['max_abs_diff']):.2g} (max |Δ log-mass|); {r0['machine']}; run {r0['run']}.")
    return "\n".join(lines)


def plot(rows, path: str, variant: str = "last") -> None:
    """Left: bars of tokens/s per method (medians over the kept rounds), each with its
    ratio to plain. Right: the sweep's time over plain vLLM's, round by round, rounds the
    host disturbed (steal) drawn hollow with the CPU seconds it took."""
    plt = pyplot()
    med = _medians(rows)
    tok = int(rows[0]["tokens"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    vals = [tok / med[m] for m in METHODS]
    bars = ax.bar(["emosteer sweep\n(one call)", "plain vLLM\n(same tokens)", "HF hooks\n(one head at a time)"],
                  vals, color=["#2a7", "#888", "#c64"])
    for b, m in zip(bars, METHODS):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{med['plain_vllm'] / med[m]:.2f}× plain",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("tokens / s (median over rounds)")
    r0 = rows[0]
    what = "position-aligned" if variant == "aligned" else "last-token"
    ax.set_title(f"Full {what} head-patching sweep: {r0['layers']}×{r0['heads']} heads × {r0['pairs']} "
                 f"pairs ({r0['model']})", fontsize=9)
    by = {(r["method"], str(r["round"])): r for r in rows}
    for rnd in sorted({int(r["round"]) for r in rows if r["method"] == "plain_vllm"}):
        e, pl = by.get(("emosteer_vllm", str(rnd))), by[("plain_vllm", str(rnd))]
        if e is None:
            continue
        ratio = float(pl["seconds"]) / float(e["seconds"])
        bad = _bad(pl)
        ax2.plot([rnd], [ratio], "o", color="#2a7", mfc="none" if bad else "#2a7")
        if bad:
            steal = float(e.get("steal_s") or 0) + float(pl.get("steal_s") or 0)
            ax2.annotate(f"steal {steal:.1f} s", (rnd, ratio), fontsize=7, xytext=(4, -3),
                         textcoords="offset points")
    ax2.axhline(0.95, color="#c64", lw=0.8, ls="--")
    ax2.axhline(1.0, color="#888", lw=0.8)
    ax2.set_xlabel("round (hollow: disturbed by the host, run again)")
    ax2.set_ylabel("plain seconds / sweep seconds")
    ax2.set_title("per round (dashed: target 0.95)", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
