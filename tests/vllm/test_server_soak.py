"""The short soak of the real server (benchmarks/soak_server.py's ``run_soak``): a random
mix of plain, steered (3 x max_slots distinct configs), capturing, invalid and cancelled
streamed requests from concurrent clients, every answer equal to its expected one, and
nothing held afterwards. The 10-minute run is the script; its result is in the README."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "soak_server.py")
_spec = importlib.util.spec_from_file_location("soak_server", _PATH)
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak_server"] = soak  # dataclasses look their module up there
_spec.loader.exec_module(soak)


def test_short_soak_every_answer_expected_nothing_leaks(servers):
    cached, _ = servers
    res = soak.run_soak(cached.client, cached.model, seconds=45, clients=6, seed=1, max_requests=400,
                        server_pid=cached.proc.pid)
    assert not res.unexpected, res.unexpected[:10]
    assert res.idle_after, res.admission_after
    assert res.requests >= 30, res
    assert {"plain", "steered", "capture", "invalid", "cancel"} <= set(res.by_kind), res.by_kind
    # Resident memory of the server's processes: a bound, not a measurement (the
    # 10-minute script records the growth).
    assert res.rss_start_mib > 0 and res.rss_end_mib - res.rss_start_mib < 256, res


def test_sustained_benchmark_short_run(servers, tmp_path):
    """benchmarks/bench_sustained.py's two phases for seconds (the 30-minute run is the
    script): every answer as expected, the counters back at idle, a row per minute with
    throughput, latency, memory and counters, a row per kind with TTFT / ITL, the plot."""
    sys.path.insert(0, os.path.dirname(_PATH))
    import bench_sustained as bs

    cached, _ = servers
    res = bs.run(cached.client, cached.model, minutes=0.2, latency_minutes=0.12, clients=3, rate=4.0,
                 max_tokens=4, seed=3, server_pid=cached.proc.pid, max_slots=4, out_dir=str(tmp_path),
                 progress=False, paired_rounds=3, paired_tokens=2, memory=True)
    assert not res["unexpected"], res["unexpected"][:10]
    assert res["idle_after"], res["admission_after"]
    assert {"plain", "distinct"} <= set(res["by_kind"]), res["by_kind"]
    (row,) = res["minutes"]
    assert row["requests"] >= 5 and row["tok_per_s"] > 0 and row["ttft_p50_ms"] > 0, row
    assert row["rss_mib"] > 0 and row["slots_in_use"] == 0 and row["parked"] == 0, row
    assert row["steal_s"] is not None and row["steal_s"] >= 0 and "host_steal_s" not in row, row
    # --memory: the workers' allocator and heap, a report at the start and at the end
    assert row["worker_malloc_in_use_mib"] > 0 and row["worker_py_objects"] > 1000, row
    *reports, diff = [json.loads(x) for x in (tmp_path / "memory.jsonl").read_text().splitlines()]
    assert len(reports) == 2 and diff["diff"] == "last - first", diff
    (w,) = reports[-1]["workers"]
    assert w["rss_mib"] > 0 and w["malloc_mib"]["in_use"] > 0 and len(w["py_top_types"]) == 40, w
    assert w["tensors"]["count"] > 0 and reports[-1]["api"]["py_objects"] > 0
    assert set(diff["workers"][0]) >= {"rss_mib", "malloc_mib", "py_objects", "py_top_types"}
    st, body = cached.client.get("/v1/emosteer/status?memory=2")
    assert st == 400 and body["error"]["param"] == "memory", body
    lat = {r["kind"]: r for r in res["latency"]}
    assert set(lat) == {"plain", "distinct", "capture"}
    assert all(r["requests"] > 0 and r["ttft_p50_ms"] > 0 for r in lat.values()), lat
    assert lat["plain"]["ttft_p50_vs_plain"] == 1.0
    rows = (tmp_path / "sustained.csv").read_text().splitlines()
    assert rows[0].startswith("run,phase,minute") and len(rows) == 2
    assert len((tmp_path / "latency.csv").read_text().splitlines()) == 4
    assert os.path.getsize(res["plot"]) > 10000
    paired = {r["kind"]: r for r in res["paired"]}
    assert set(paired) == {"plain", "distinct", "capture"}
    assert all(r["rounds"] == 3 and r["ttft_p50_ms"] > 0 for r in paired.values()), paired
    assert paired["plain"]["vs_plain"] == 1.0
    assert all(r["vs_plain_lo"] <= r["vs_plain"] <= r["vs_plain_hi"] for r in paired.values()), paired
    assert len((tmp_path / "latency_paired.csv").read_text().splitlines()) == 4
    text = bs.table(str(tmp_path))
    assert "generated tok/s" in text and "| distinct |" in text and "0 unexpected" in text, text
    assert "one request at a time" in text, text
    os.remove(res["plot"])  # --plot draws it again from the CSVs alone
    assert bs.replot(str(tmp_path)) == res["plot"] and os.path.getsize(res["plot"]) > 10000


def test_sigterm_stops_the_server_gracefully(servers):
    """Last test of the server modules: SIGTERM to `emosteer serve` (it is vLLM's own
    process) ends it and all its engine processes, with exit status 0."""
    import signal

    import psutil

    _, reference = servers
    procs = psutil.Process(reference.proc.pid).children(recursive=True)
    assert procs, "the server should have engine processes"
    reference.proc.send_signal(signal.SIGTERM)
    assert reference.proc.wait(timeout=90) == 0
    gone, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, [p.pid for p in alive]
