"""Sustained load on the real server: throughput, latency, memory and the plugin's
counters minute by minute, then time-to-first-token at a fixed request rate.

    python benchmarks/bench_sustained.py                       # 30 + 5 minutes, default model
    python benchmarks/bench_sustained.py --minutes 2 --latency-minutes 1 --model tiny

Starts ``emosteer serve`` on loopback (``soak_server.served``; or ``--url``) and
registers two random vectors. Every request is streamed (``/v1/completions``), so each
one gives its time to first token (TTFT) and its inter-token gaps (ITL).

Phase 1, sustained (``--minutes``, closed loop): ``--clients`` threads send a random
mix without pause: plain; ``distinct`` (a config no other request has: residual steer
on a random third of the layers at a random scale + a head ``add`` at a random head);
``capture`` (residual + heads at the last prompt token, fetched by key afterwards);
``sweep`` (8 requests at once on one prompt, each patching one random head at the last
token, as an attribution sweep sends them); ``cancel`` (a steered stream dropped after
its first chunk). Plain answers must equal the answer the prompt got alone (greedy),
every other answer must be 200 with tokens; anything else is counted as unexpected.
Each minute: completed requests, generated tokens per second, TTFT and ITL p50 / p99
(per kind and all), the server's resident memory (all its processes) and the plugin's
counters (slots, pool rows, capture rows in use, requests known to and results parked
in the workers), and the CPU seconds the host's hypervisor took (``steal_s``). Targets:
the last 5 minutes' throughput within 5 % of the first 5 minutes', memory flat, counters
back at idle at the end.

Phase 2, latency (``--latency-minutes``, open loop): requests arrive at ``--rate`` per
second (Poisson, seeded), kinds plain / distinct / capture drawn at random per request,
so the three share one load. TTFT and ITL p50 / p99 per kind; target: distinct TTFT p50
<= 1.1x plain.

Phase 3, paired latency (``--paired-rounds``): the server otherwise idle, one request at
a time; each round sends plain, distinct and capture in a random order, each with
``--paired-tokens`` new tokens. TTFT per kind with no queueing at all: the cost a
config adds to one request. Reported per kind: TTFT p50 / p90 and the ratio of its
median TTFT to plain's with a 95 % bootstrap interval over rounds (rounds resampled
whole, so the pairing is kept).

Rows go to ``benchmarks/results/sustained.csv`` (one per minute),
``benchmarks/results/latency.csv`` (one per kind) and
``benchmarks/results/latency_paired.csv`` (one per kind), the plot to
``benchmarks/results/sustained_<machine>.png``. Exit 1 if any answer was unexpected
or the counters did not return to idle. The requests themselves (streaming, the kinds,
the checks of their answers) are in ``load_mix.py``.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import random
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _common import RESULTS_DIR, append_csv, git_commit, host_counters, machine_info, pyplot, save_figure  # noqa: E402
from load_mix import KINDS, LATENCY_KINDS, WEIGHTS, Done, Mix, ms, pct  # noqa: E402
from soak_server import rss_mib, rss_parts, served, write_memory  # noqa: E402

SAMPLE_S = 20.0                          # the counters are read this often
MEMORY_EVERY = round(60.0 / SAMPLE_S)    # a memory report every this many samples: one a minute

MINUTE_COLUMNS = (
    "run", "phase", "minute", "requests", "tokens", "tok_per_s", "ttft_p50_ms", "ttft_p99_ms",
    "itl_p50_ms", "itl_p99_ms", "plain_ttft_p50_ms", "distinct_ttft_p50_ms", "capture_ttft_p50_ms",
    "rss_mib", "rss_api_mib", "rss_engine_mib", "rss_workers_mib", "kinds", "slots_in_use",
    "pool_rows_in_use", "capture_rows_in_use", "worker_requests",
    "worker_malloc_in_use_mib", "worker_malloc_free_mib", "worker_py_objects", "worker_py_blocks",
    "worker_tensors", "steal_s",
    "parked", "unexpected", "model", "clients", "max_tokens", "max_slots", "machine", "cores",
    "vllm", "git_commit", "timestamp",
)
PAIRED_COLUMNS = (
    "run", "kind", "rounds", "ttft_p50_ms", "ttft_p90_ms", "vs_plain", "vs_plain_lo", "vs_plain_hi",
    "model", "max_tokens", "max_slots", "machine", "cores", "vllm", "git_commit", "timestamp",
)
LATENCY_COLUMNS = (
    "run", "kind", "requests", "rate_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
    "itl_p99_ms", "ttft_p50_vs_plain", "model", "max_tokens", "max_slots", "machine", "cores",
    "vllm", "git_commit", "timestamp",
)


# ----------------------------------------------------------------------- phases
def counters(client, server_pid, memory=None) -> dict:
    """The server's counters and memory by process; with ``memory`` (a list), also the
    workers' allocator and heap report (``status?memory=1``), appended to it."""
    st = client.status(memory=memory is not None)
    adm = st["admission"]
    workers = st.get("workers") or [{}]
    parts = rss_parts(server_pid)
    extra = {}
    if memory is not None:
        reps = st["memory"]["workers"]
        memory.append({"t": time.time(), **st["memory"]})
        extra = {"worker_malloc_in_use_mib": sum((r["malloc_mib"] or {}).get("in_use", 0) for r in reps),
                 "worker_malloc_free_mib": sum((r["malloc_mib"] or {}).get("free", 0) for r in reps),
                 "worker_py_objects": sum(r["py_objects"] for r in reps),
                 "worker_py_blocks": sum(r["py_blocks"] for r in reps),
                 "worker_tensors": sum(r["tensors"]["count"] for r in reps)}
    return {**extra,
        "host_steal_s": host_counters().get("steal_s"),  # cumulative; minute_rows takes deltas
        "rss_mib": round(rss_mib(server_pid), 1),
        "rss_api_mib": parts["api"], "rss_engine_mib": parts["engine"], "rss_workers_mib": parts["workers"],
        "slots_in_use": adm["slots_in_use"],
        "pool_rows_in_use": sum(adm["pool_rows_in_use"].values()),
        "capture_rows_in_use": adm["capture_rows_in_use"],
        "worker_requests": sum(int(w.get("requests", 0)) for w in workers),
        "parked": sum(int(w.get("parked", 0)) for w in workers),
    }


def sustained(mix: Mix, seconds: float, clients: int, seed: int, server_pid, progress=True,
              kinds: tuple[str, ...] = KINDS, memory=None):
    """Closed loop for ``seconds`` over ``kinds`` (KINDS' weights); (finished requests,
    counter samples [(t, dict)]); with ``memory`` (a list) the workers' memory reports,
    one a minute, are appended to it."""
    weights = [WEIGHTS[KINDS.index(k)] for k in kinds]
    t0 = time.monotonic()
    deadline = t0 + seconds
    done: list[Done] = []
    lock = threading.Lock()

    def worker(i):
        r = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            got = mix.run(r.choices(kinds, weights)[0], r, t0)
            with lock:
                done.extend(got)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    samples = []
    next_sample = t0
    while any(t.is_alive() for t in threads):
        if time.monotonic() >= next_sample:
            each_minute = memory is not None and len(samples) % MEMORY_EVERY == 0
            samples.append((time.monotonic() - t0,
                            counters(mix.client, server_pid, memory if each_minute else None)))
            next_sample += SAMPLE_S
            if progress:
                with lock:
                    n, bad = len(done), sum(d.problem is not None for d in done)
                print(f"  {samples[-1][0]:6.0f} s  {n} requests, {bad} unexpected, "
                      f"rss {samples[-1][1]['rss_mib']} MiB", flush=True)
        for t in threads:
            t.join(timeout=0.5)
        if time.monotonic() > deadline + 600:
            raise SystemExit("clients did not finish within 600 s of the deadline")
    return done, samples


def open_loop(mix: Mix, seconds: float, rate: float, seed: int):
    """Poisson arrivals at ``rate``/s for ``seconds``, kinds of LATENCY_KINDS at random."""
    r = random.Random(seed)
    t0 = time.monotonic()
    done: list[Done] = []
    lock = threading.Lock()
    threads = []
    t_next = t0

    def fire(kind, rr):
        got = mix.run(kind, rr, t0)
        with lock:
            done.extend(got)

    while True:
        t_next += r.expovariate(rate)
        if t_next > t0 + seconds:
            break
        time.sleep(max(0.0, t_next - time.monotonic()))
        th = threading.Thread(target=fire, args=(r.choice(LATENCY_KINDS), random.Random(r.random())),
                              daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(timeout=600)
    return done


def paired(mix: Mix, rounds: int, seed: int, progress=True) -> tuple[dict[str, list], list[Done]]:
    """``rounds`` rounds of plain, distinct and capture one at a time (random order per
    round); per kind the TTFTs in round order (None where a request failed), and all."""
    r = random.Random(seed)
    t0 = time.monotonic()
    ttft: dict[str, list] = {k: [] for k in LATENCY_KINDS}
    done: list[Done] = []
    for i in range(rounds):
        order = list(LATENCY_KINDS)
        r.shuffle(order)
        for kind in order:
            (d,) = mix.run(kind, random.Random(r.random()), t0)
            done.append(d)
            ttft[kind].append(d.ttft if d.problem is None else None)
        if progress and (i + 1) % max(1, rounds // 10) == 0:
            print(f"  paired: {i + 1}/{rounds} rounds", flush=True)
    return ttft, done


def paired_rows(ttft: dict[str, list], base: dict, seed: int, boot: int = 2000) -> list[dict]:
    """Per kind: p50 / p90 TTFT and median(kind) / median(plain) with a 95 % bootstrap
    interval (``emosteer.report.stats.bootstrap``, rounds resampled whole; rounds where
    either request failed left out; no interval under 2 rounds)."""
    import torch

    from emosteer.report.stats import bootstrap

    rows = []
    for kind in LATENCY_KINDS:
        keep = [(a, b) for a, b in zip(ttft["plain"], ttft[kind]) if a is not None and b is not None]
        xs = [b for _, b in keep]
        row = dict(base, kind=kind, rounds=len(keep), ttft_p50_ms=ms(pct(xs, 0.5)), ttft_p90_ms=ms(pct(xs, 0.9)))
        if keep:
            ratio = statistics.median(xs) / statistics.median([a for a, _ in keep])
            row["vs_plain"] = round(ratio, 4)
        if len(keep) >= 2:
            t = torch.tensor(keep, dtype=torch.float64)  # [rounds, (plain, kind)]
            _, ci = bootstrap(lambda idx: t[idx, 1].quantile(0.5, dim=-1) / t[idx, 0].quantile(0.5, dim=-1),
                              len(keep), boot, seed=seed)
            row.update(vs_plain_lo=round(float(ci[0]), 4), vs_plain_hi=round(float(ci[1]), 4))
        rows.append(row)
    return rows


def wait_idle(client, tries: int = 100) -> tuple[bool, dict]:
    for _ in range(tries):
        adm = client.status()["admission"]
        idle = (adm["slots_in_use"] == 0 and adm["waiting_for_slots"] == 0
                and adm["capture_rows_in_use"] == 0 and not any(adm["pool_rows_in_use"].values()))
        if idle:
            return True, adm
        time.sleep(0.1)
    return False, adm


# ----------------------------------------------------------------------- tables
def minute_rows(done: list[Done], samples, seconds: float, base: dict) -> list[dict]:
    rows = []
    n_min = max(1, int(round(seconds / 60.0)))
    for m in range(n_min):
        lo, hi = 60.0 * m, 60.0 * (m + 1)
        final = m == n_min - 1  # also takes the requests that finished after the deadline
        ds = [d for d in done if lo <= d.t_end and (final or d.t_end < hi)]
        ok = [d for d in ds if d.problem is None]
        span = hi - lo
        if final:
            span = max(min(seconds, hi) - lo, max((d.t_end for d in ds), default=lo) - lo)
        ttfts = [d.ttft for d in ok if d.ttft is not None]
        gaps = [g for d in ok for g in d.gaps]
        within = [smp for t, smp in samples if lo <= t < hi or (final and t >= hi)]
        last = {}  # each counter from the minute's latest sample that has it
        for smp in (within or [smp for _, smp in samples][-1:]):
            last.update(smp)
        row = dict(base, minute=m + 1, requests=len(ds), tokens=sum(d.tokens for d in ok),
                   tok_per_s=round(sum(d.tokens for d in ok) / max(span, 1e-9), 2),
                   ttft_p50_ms=ms(pct(ttfts, 0.5)), ttft_p99_ms=ms(pct(ttfts, 0.99)),
                   itl_p50_ms=ms(pct(gaps, 0.5)), itl_p99_ms=ms(pct(gaps, 0.99)),
                   unexpected=len(ds) - len(ok), **last)
        for kind in LATENCY_KINDS:
            row[f"{kind}_ttft_p50_ms"] = ms(pct([d.ttft for d in ok if d.kind == kind and d.ttft], 0.5))
        rows.append(row)
    # steal_s: CPU seconds other guests took since the previous minute's last sample
    prev = samples[0][1].get("host_steal_s") if samples else None
    for row in rows:
        cum = row.pop("host_steal_s", None)
        row["steal_s"] = round(cum - prev, 2) if cum is not None and prev is not None else None
        prev = cum if cum is not None else prev
    return rows


def latency_rows(done: list[Done], rate: float, base: dict) -> list[dict]:
    rows = []
    for kind in LATENCY_KINDS:
        ok = [d for d in done if d.kind == kind and d.problem is None]
        ttfts = [d.ttft for d in ok if d.ttft is not None]
        gaps = [g for d in ok for g in d.gaps]
        rows.append(dict(base, kind=kind, requests=len(ok), rate_per_s=rate,
                         ttft_p50_ms=ms(pct(ttfts, 0.5)), ttft_p99_ms=ms(pct(ttfts, 0.99)),
                         itl_p50_ms=ms(pct(gaps, 0.5)), itl_p99_ms=ms(pct(gaps, 0.99))))
    plain = rows[0]["ttft_p50_ms"]
    for row in rows:
        if plain and row["ttft_p50_ms"] is not None:
            row["ttft_p50_vs_plain"] = round(row["ttft_p50_ms"] / plain, 3)
    return rows


def summary(minutes: list[dict], lat: list[dict]) -> dict:
    tps = [float(r["tok_per_s"]) for r in minutes]
    k = min(5, max(1, len(tps) // 2))
    first, last = statistics.median(tps[:k]), statistics.median(tps[-k:])
    out = {"first_tok_per_s": first, "last_tok_per_s": last,
           "last_vs_first": round(last / first, 3) if first else None,
           "rss_first_mib": minutes[0]["rss_mib"], "rss_last_mib": minutes[-1]["rss_mib"],
           "window_minutes": k}
    for row in lat:
        out[f"{row['kind']}_ttft_p50_vs_plain"] = row.get("ttft_p50_vs_plain")
    return out


def plot(minutes: list[dict], lat: list[dict], path: str, title: str) -> None:
    """Throughput, latency, each process's resident memory as growth since the first
    minute (so a few MiB show against GiBs), the plugin's counters, and the open-loop
    TTFT per kind (or a note that the open-loop phase did not run)."""
    plt = pyplot()
    minutes = [r for r in minutes if int(r.get("requests") or 0) > 0]
    if not minutes:  # the open-loop phase alone
        import textwrap

        fig, one = plt.subplots(1, 1, figsize=(6.5, 4.4))
        ax = [None] * 4 + [one]
        title = textwrap.fill(title, 80)
    else:
        fig, ax = plt.subplots(1, 5, figsize=(21, 3.8))
    x = [int(r["minute"]) for r in minutes]
    if minutes:
        _plot_minutes(ax, x, minutes)
    _plot_latency(ax[4], lat)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def _plot_minutes(ax, x, minutes: list[dict]) -> None:
    ax[0].plot(x, [float(r["tok_per_s"]) for r in minutes], marker="o")
    ax[0].set(xlabel="minute", ylabel="generated tok/s", title="throughput (closed loop)")
    ax[0].set_ylim(bottom=0)
    if all(r.get("steal_s") not in (None, "") for r in minutes):  # runs since steal was read
        tw = ax[0].twinx()
        tw.bar(x, [float(r["steal_s"]) for r in minutes], color="0.75", alpha=0.6)
        tw.set_ylabel("CPU s stolen by the host (bars)", fontsize=7)
        ax[0].set_zorder(tw.get_zorder() + 1)
        ax[0].patch.set_visible(False)
    for key, style in (("ttft_p50_ms", "-o"), ("ttft_p99_ms", "--o"), ("itl_p50_ms", "-s"), ("itl_p99_ms", "--s")):
        ax[1].plot(x, [float(r[key]) if r[key] not in (None, "") else float("nan") for r in minutes],
                   style, label=key.replace("_ms", ""))
    ax[1].set(xlabel="minute", ylabel="ms", title="latency, all kinds")
    ax[1].legend(fontsize=7)
    for key, style, name in (("rss_mib", "k-o", "server (all)"), ("rss_api_mib", "b-", "API process"),
                             ("rss_engine_mib", "g-", "engine core"), ("rss_workers_mib", "r-", "workers"),
                             ("worker_malloc_in_use_mib", "r:", "workers, malloc in use (--memory)"),
                             ("worker_malloc_free_mib", "m:", "workers, malloc held free (--memory)")):
        if minutes and all(r.get(key) not in (None, "") for r in minutes):
            v = [float(r[key]) for r in minutes]
            ax[2].plot(x, [y - v[0] for y in v], style, label=f"{name} ({v[0]:.0f} MiB at minute {x[0]})")
    ax[2].set(xlabel="minute", ylabel="MiB since the first minute", title="resident memory growth")
    ax[2].legend(fontsize=6, loc="upper left")
    for key in ("slots_in_use", "pool_rows_in_use", "capture_rows_in_use", "worker_requests", "parked"):
        ax[3].plot(x, [float(r[key]) for r in minutes], "-", label=key)
    ax[3].set(xlabel="minute", title="plugin counters (end of minute)")
    ax[3].legend(fontsize=6)


def _plot_latency(ax, lat: list[dict]) -> None:
    lat = [r for r in lat if int(r.get("requests") or 0) > 0]
    if not lat:
        ax.axis("off")
        ax.text(0.5, 0.5, "open-loop phase not run", ha="center", va="center")
        return
    kinds = [r["kind"] for r in lat]
    for i, key in enumerate(("ttft_p50_ms", "ttft_p99_ms")):
        ax.bar([j + 0.4 * i for j in range(len(kinds))], [float(r[key] or 0) for r in lat], 0.4,
               label=key.replace("_ms", ""))
    ax.set_xticks([j + 0.2 for j in range(len(kinds))],
                  [f"{k}\n{r['requests']} requests" for k, r in zip(kinds, lat)])
    ax.set(ylabel="ms", title=f"TTFT at {lat[0]['rate_per_s']} req/s (open loop)")
    ax.legend(fontsize=7)


def replot(out_dir: str = RESULTS_DIR) -> str:
    """Draw the plot of the latest run in ``out_dir`` again from its CSVs."""
    from _common import read_csv

    spath, lpath = os.path.join(out_dir, "sustained.csv"), os.path.join(out_dir, "latency.csv")
    mins = read_csv(spath) if os.path.exists(spath) else []
    lat = read_csv(lpath) if os.path.exists(lpath) else []
    run_id = (mins or lat)[-1]["run"]
    mins = [r for r in mins if r["run"] == run_id]
    lat = [r for r in lat if r["run"] == run_id]
    mach = machine_info()
    r0 = {"kinds": "", **(mins or lat)[0]}
    png = os.path.join(out_dir, f"sustained_{mach['tag']}.png")
    kinds = f"; kinds {r0['kinds']}" if r0.get("kinds") and r0["kinds"] != "+".join(KINDS) else ""
    clients = f"{r0['clients']} clients, " if mins else "open loop only, "
    plot(mins, lat, png, f"{r0['model']}, {clients}max_tokens {r0['max_tokens']}, "
         f"max_slots {r0['max_slots']}; {r0['machine']} ({r0['cores']} cores); vLLM {r0['vllm']}; "
         f"run {run_id}{kinds}")
    return png


def table(out_dir: str = RESULTS_DIR) -> str:
    """The README's tables of the latest run in ``out_dir`` (sustained.csv + latency.csv)."""
    from _common import read_csv

    # the full mix's latest run (a control run with --kinds is in the CSV, not in this table)
    mins = [r for r in read_csv(os.path.join(out_dir, "sustained.csv"))
            if r.get("kinds", "") in ("", "+".join(KINDS))]
    run_id = mins[-1]["run"]
    mins = [r for r in mins if r["run"] == run_id]
    lat = [r for r in read_csv(os.path.join(out_dir, "latency.csv")) if r["run"] == run_id]
    s = summary([{**r, "tok_per_s": float(r["tok_per_s"])} for r in mins], lat)
    k = s["window_minutes"]

    def med(key, rows):
        xs = [float(r[key]) for r in rows if r[key] not in ("", None)]
        return statistics.median(xs) if xs else float("nan")

    first, last = mins[:k], mins[-k:]
    out = [f"| over {len(mins)} minutes | first {k} min (median) | last {k} min (median) | last / first |",
           "|---|---:|---:|---:|"]
    for label, key, fmt in (("generated tok/s", "tok_per_s", "{:.1f}"), ("TTFT p50 (ms)", "ttft_p50_ms", "{:.0f}"),
                            ("TTFT p99 (ms)", "ttft_p99_ms", "{:.0f}"), ("ITL p50 (ms)", "itl_p50_ms", "{:.0f}"),
                            ("server RSS (MiB)", "rss_mib", "{:.0f}")):
        a, b = med(key, first), med(key, last)
        out.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.3f} |")
    end = mins[-1]
    out += ["", "| kind (open loop, " + f"{lat[0]['rate_per_s']} req/s)" + " | requests | TTFT p50 (ms) | TTFT p99 (ms) "
            "| ITL p50 (ms) | ITL p99 (ms) | TTFT p50 vs plain |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in lat:
        out.append(f"| {r['kind']} | {r['requests']} | {r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['itl_p50_ms']} "
                   f"| {r['itl_p99_ms']} | {r['ttft_p50_vs_plain']} |")
    m0 = mins[0]
    out += ["", f"{m0['model']}, {m0['clients']} closed-loop clients, max_tokens {m0['max_tokens']}, max_slots "
            f"{m0['max_slots']}; {sum(int(r['requests']) for r in mins)} requests, "
            f"{sum(int(r['unexpected']) for r in mins)} unexpected; at the end: slots {end['slots_in_use']}, "
            f"pool rows {end['pool_rows_in_use']}, capture rows {end['capture_rows_in_use']}, worker requests "
            f"{end['worker_requests']}, parked {end['parked']}; {m0['machine']} ({m0['cores']} cores), vLLM "
            f"{m0['vllm']}, commit {m0['git_commit']}, run {run_id}."]
    out += paired_table(out_dir)
    return "\n".join(out)


def paired_table(out_dir: str = RESULTS_DIR) -> list[str]:
    """The README lines of the latest paired-latency run (none if it never ran)."""
    from _common import read_csv

    path = os.path.join(out_dir, "latency_paired.csv")
    if not os.path.exists(path):
        return []
    rows = read_csv(path)
    rows = [r for r in rows if r["run"] == rows[-1]["run"]]
    r0 = rows[0]
    out = ["", f"| kind (one request at a time, {r0['max_tokens']} tokens each) | rounds | TTFT p50 (ms) "
           "| TTFT p90 (ms) | TTFT p50 vs plain (95 % CI) |", "|---|---:|---:|---:|---:|"]
    def ratio(r) -> str:
        if r.get("vs_plain") in ("", None):
            return "—"
        if r.get("vs_plain_lo") in ("", None):
            return f"{float(r['vs_plain']):.3f}"
        return f"{float(r['vs_plain']):.3f} [{float(r['vs_plain_lo']):.3f}, {float(r['vs_plain_hi']):.3f}]"

    for r in rows:
        out.append(f"| {r['kind']} | {r['rounds']} | {r['ttft_p50_ms']} | {r['ttft_p90_ms']} | {ratio(r)} |")
    out += ["", f"Paired: the server otherwise idle, each round plain, distinct and capture one after another "
            f"in a random order; interval: rounds resampled whole; run {r0['run']}, commit {r0['git_commit']}."]
    return out


# ----------------------------------------------------------------------- main
def run(client, model: str, *, minutes: float, latency_minutes: float, clients: int, rate: float,
        max_tokens: int, seed: int, server_pid, max_slots: int, out_dir: str, progress=True,
        paired_rounds: int = 0, paired_tokens: int = 4, kinds: tuple[str, ...] = KINDS,
        memory: bool = False) -> dict:
    """The phases against ``client`` (phases 1 and 2 unless both their lengths are 0,
    phase 3 when ``paired_rounds`` > 0); rows appended under ``out_dir``; the summary."""
    import torch

    from emosteer.request.bank import ModelInfo, VectorBank

    info = ModelInfo.from_dict(client.vectors()["model"])
    g = torch.Generator().manual_seed(seed)
    bank = VectorBank(info)
    bank.add("soak.res", "residual", torch.randn(info.num_layers, info.hidden_size, generator=g))
    bank.add("soak.head", "head", torch.randn(info.num_layers, info.num_heads, info.head_dim, generator=g))
    st, body = client.upload(bank)
    if st != 201:
        raise RuntimeError(f"could not register the benchmark vectors: {st} {body}")
    try:
        mix = Mix(client, model, info, max_tokens, seed)
        mach = machine_info()
        vllm_version = getattr(__import__("vllm"), "__version__", "?")
        run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        base = dict(run=run_id, model=os.path.basename(model.rstrip("/")), clients=clients,
                    max_tokens=max_tokens, max_slots=max_slots, machine=mach["machine"],
                    cores=mach["cores"], vllm=vllm_version, git_commit=git_commit(),
                    timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        mbase = dict(base, phase="sustained", kinds="+".join(kinds))
        loaded = minutes > 0 or latency_minutes > 0
        done, ldone, pdone, mrows, lrows, prows, idle, idle2, adm2 = [], [], [], [], [], [], True, True, None
        if loaded:
            if progress:
                print(f"sustained: {minutes} min, {clients} clients", flush=True)
            reports = [] if memory else None
            done, samples = sustained(mix, minutes * 60.0, clients, seed, server_pid, progress, kinds,
                                      reports)
            idle, adm = wait_idle(client)
            samples.append((minutes * 60.0 + 1e-6, counters(client, server_pid, reports)))
            if reports:
                write_memory(reports, os.path.join(out_dir, "memory.jsonl"), run_id)
            mrows = minute_rows(done, samples, minutes * 60.0, mbase)
            if progress:
                print(f"latency: {latency_minutes} min at {rate} req/s", flush=True)
            ldone = open_loop(mix, latency_minutes * 60.0, rate, seed + 1)
            lrows = latency_rows(ldone, rate, dict(base, max_slots=max_slots))
            idle2, adm2 = wait_idle(client)
        if paired_rounds > 0:
            if progress:
                print(f"paired latency: {paired_rounds} rounds, {paired_tokens} tokens a request", flush=True)
            pmix = Mix(client, model, info, paired_tokens, seed + 2)
            ttft, pdone = paired(pmix, paired_rounds, seed + 2, progress)
            prows = paired_rows(ttft, dict(base, max_tokens=paired_tokens), seed + 3)
            idle3, adm2 = wait_idle(client)
            idle2 = idle2 and idle3
    finally:
        for name in ("soak.res", "soak.head"):
            client.delete(name)
    png = None
    if loaded:
        if minutes > 0:
            append_csv(mrows, os.path.join(out_dir, "sustained.csv"), MINUTE_COLUMNS)
        if latency_minutes > 0:
            append_csv(lrows, os.path.join(out_dir, "latency.csv"), LATENCY_COLUMNS)
        if minutes > 0 or latency_minutes > 0:
            png = replot(out_dir)  # drawn from the rows just written
    if prows:
        append_csv(prows, os.path.join(out_dir, "latency_paired.csv"), PAIRED_COLUMNS)
    problems = [f"{d.kind}: {d.problem}" for d in (*done, *ldone, *pdone) if d.problem]
    by_kind = collections.Counter(d.kind for d in done)
    return {"summary": summary(mrows, lrows) if loaded else {}, "minutes": mrows, "latency": lrows,
            "paired": prows, "by_kind": dict(by_kind), "unexpected": problems, "idle_after": idle and idle2,
            "admission_after": adm2, "plot": png}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--latency-minutes", type=float, default=5.0)
    ap.add_argument("--model", default="default", help="model folder, 'default' or 'tiny'")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rate", type=float, default=1.0, help="requests per second in the latency phase")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-slots", type=int, default=16)
    ap.add_argument("--paired-rounds", type=int, default=100,
                    help="rounds of the paired latency phase (0: skip it)")
    ap.add_argument("--paired-tokens", type=int, default=4, help="new tokens a paired request")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"the sustained phase's request kinds (of {','.join(KINDS)}; weights "
                         f"{WEIGHTS}); e.g. 'plain' for a control run of the same server unsteered")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--url", default=None, help="a running server instead of starting one")
    ap.add_argument("--api-key", default="bench-key")
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    ap.add_argument("--memory", action="store_true",
                    help="once a minute, ask the workers where their memory is (allocator in-use/"
                         "free, Python objects, tensors; each report stalls a worker ~0.3 s)")
    ap.add_argument("--table", action="store_true", help="print the README tables of the latest run")
    ap.add_argument("--plot", action="store_true", help="draw the latest run's plot again from the CSVs")
    args = ap.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or any(k not in KINDS for k in kinds):
        ap.error(f"--kinds: choose from {','.join(KINDS)}, got {args.kinds!r}")
    if args.table:
        print(table(args.out_dir))
        return 0
    if args.plot:
        print("plot:", replot(args.out_dir))
        return 0

    from emosteer.client import Client

    with served(args.model, url=args.url, max_slots=args.max_slots, api_key=args.api_key,
                log_name="emosteer-sustained-server.log") as (url, model, pid):
        res = run(Client(url, api_key=args.api_key, timeout=600), model, minutes=args.minutes,
                  latency_minutes=args.latency_minutes, clients=args.clients, rate=args.rate,
                  max_tokens=args.max_tokens, seed=args.seed, server_pid=pid,
                  max_slots=args.max_slots, out_dir=args.out_dir, paired_rounds=args.paired_rounds,
                  paired_tokens=args.paired_tokens, kinds=kinds, memory=args.memory)
    print(json.dumps({"summary": res["summary"], "by_kind": res["by_kind"], "idle_after": res["idle_after"]},
                     indent=1))
    for row in (r for r in res["latency"] if r["requests"]):
        print(f"  {row['kind']:9s} TTFT p50 {row['ttft_p50_ms']} ms p99 {row['ttft_p99_ms']} ms, "
              f"ITL p50 {row['itl_p50_ms']} ms p99 {row['itl_p99_ms']} ms ({row['requests']} requests)")
    for row in res["paired"]:
        print(f"  paired {row['kind']:9s} TTFT p50 {row['ttft_p50_ms']} ms p90 {row['ttft_p90_ms']} ms, "
              f"vs plain {row.get('vs_plain')} [{row.get('vs_plain_lo')}, {row.get('vs_plain_hi')}] "
              f"({row['rounds']} rounds)")
    for u in res["unexpected"][:20]:
        print("UNEXPECTED", u)
    print("plot:", res["plot"])
    return 0 if not res["unexpected"] and res["idle_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
