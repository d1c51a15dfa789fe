"""The short soak of the real server (benchmarks/soak_server.py's ``run_soak``): a random
mix of plain, steered (3 x max_slots distinct configs), capturing, invalid and cancelled
streamed requests from concurrent clients, every answer equal to its expected one, and
nothing held afterwards. The 10-minute run is the script; its result is in the README."""

from __future__ import annotations

import importlib.util
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
