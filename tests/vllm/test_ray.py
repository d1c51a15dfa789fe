"""`emosteer generate --ray`: on the local Ray cluster it starts, the same output as the
local path; on a 3-node cluster on loopback (ray.cluster_utils), after the node of one
engine actor is removed mid-run (and the job rerun) every row is in OUT exactly once,
equal to the local run's, with the throughput of each node in the driver's log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from vllm_support import engine_env

pytest.importorskip("ray.data")

from emosteer.apps.generate import GenerateConfig, generate_jsonl  # noqa: E402

pytestmark = pytest.mark.vllm

ROWS = [{"id": f"r{i}", "prompt": f"Describe scene number {i}: a {w} day.", "emotion": "joy",
         **({"steer": {"steer": [{"vector": "joy", "layers": [0, 1], "scale": 0.5 + i}]}} if i % 3 else {})}
        for i, w in enumerate(["sunny", "rainy", "windy", "quiet", "loud", "dark", "bright", "cold"])]
MAX_TOKENS = 12


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def local_rows(engines, tmp_path_factory, tiny_model, bank_path):
    """The local path's output (the eager engine of these tests)."""
    d = tmp_path_factory.mktemp("ray_local")
    _write(d / "in.jsonl", ROWS)
    cfg = GenerateConfig(model=tiny_model, bank=bank_path, max_tokens=MAX_TOKENS, batch_size=3)
    generate_jsonl(d / "in.jsonl", d / "out.jsonl", cfg, llm=engines.get("eager"), progress=False)
    engines.close()  # the Ray actors start their own engines
    return {r["id"]: r for r in _read(d / "out.jsonl")}


def _cli(tmp_path, tiny_model, bank_path, batch_size: int):
    engine_env()
    return [sys.executable, "-m", "emosteer.cli", "generate", str(tmp_path / "in.jsonl"),
            str(tmp_path / "out.jsonl"), "--model", tiny_model, "--bank", bank_path,
            "--max-tokens", str(MAX_TOKENS), "--batch-size", str(batch_size), "--eager", "--ray"]


def assert_same_row(got: dict, want: dict) -> None:
    """Equal rows; the perplexity (a float from a batched teacher-forced pass, whose
    batch may hold other rows here) within 1e-4 relative."""
    g, w = dict(got), dict(want)
    pg, pw = g.pop("perplexity"), w.pop("perplexity")
    assert g == w
    assert (pg is None) == (pw is None) and (pg is None or abs(pg - pw) <= 1e-4 * pw), (pg, pw)


def test_ray_job_equals_the_local_path(tmp_path, tiny_model, bank_path, local_rows):
    _write(tmp_path / "in.jsonl", ROWS)
    got = subprocess.run(_cli(tmp_path, tiny_model, bank_path, 3), capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert got.returncode == 0, got.stderr[-3000:]
    rows = _read(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in ROWS]  # input order
    for r, want in zip(rows, [local_rows[r["id"]] for r in ROWS]):
        assert_same_row(r, want)


@pytest.fixture
def cluster(monkeypatch):
    """A 3-node Ray cluster on loopback (ray.cluster_utils.Cluster): the head and two
    more nodes, one CPU each, so that two engine actors sit on two nodes and a third
    node has room for the actor that replaces a lost one."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    args = dict(num_cpus=1, object_store_memory=100 * 2**20, include_dashboard=False)
    # A lost node is declared dead after 2 missed 1-s health checks (Ray's default is
    # longer, made for real networks): the test waits less for the retry.
    fast = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2}
    c = Cluster(initialize_head=True, head_node_args={**args, "_system_config": fast})
    try:
        nodes = [c.add_node(**args) for _ in range(2)]
        c.wait_for_nodes()
        yield c, nodes
    finally:
        c.shutdown()


def test_a_node_lost_mid_run_loses_and_duplicates_no_row(tmp_path, tiny_model, bank_path, local_rows, cluster):
    """Two engine actors on a 3-node cluster; the node of one of them is removed while
    the job runs. Ray Data restarts that actor on the free node and retries its batch:
    every row is in OUT exactly once, equal to the local run, also after a rerun; the
    driver's log gives the rows and throughput of each node."""
    import psutil

    c, nodes = cluster
    # Many one-row batches, so that the run is still going when its first rows are in OUT.
    many = [{**{k: v for k, v in r.items() if k in ("prompt", "emotion", "steer")}, "id": f"{r['id']}.{j}"}
            for j in range(3) for r in ROWS]
    _write(tmp_path / "in.jsonl", many)
    out = tmp_path / "out.jsonl"
    cmd = _cli(tmp_path, tiny_model, bank_path, 1) + ["--workers", "2", "--ray-address", c.address]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in nodes}
    removed = None
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 2:
                node = _node_of_an_actor(psutil, raylets)
                if node is not None:
                    c.remove_node(node, allow_graceful=False)
                    removed = node
                    break
            time.sleep(0.05)
        assert removed is not None, "the run ended before a node with an actor could be removed"
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
        log.close()
    text = (tmp_path / "run.log").read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]  # the job survives the lost node
    per_node = re.findall(r"node (\w+): (\d+) rows in [\d.]+ s of engine time \(([\d.]+) rows/s\)", text)
    # One line per node that wrote rows (the removed node's actor may have been lost
    # before or after its first batch), together every row of the run.
    assert per_node and sum(int(n) for _, n, _ in per_node) == len(many), text[-3000:]
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    got = _read(out)
    ids = [r["id"] for r in got]
    assert ids == [r["id"] for r in many]  # each row once, in input order (the driver writes)
    # The engines ran inside the actors: none is left behind by the lost node's actor.
    assert not _engine_processes_of_this_test(psutil), "engine processes outlived their actors"
    for r in got:  # each row equals the local run of the same prompt and config
        assert_same_row({**r, "id": r["id"].split(".")[0]}, local_rows[r["id"].split(".")[0]])


def _engine_processes_of_this_test(psutil) -> list[int]:
    """vLLM engine-core processes started under this test (by its PYTEST_CURRENT_TEST)."""
    me = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    found = []
    for p in psutil.process_iter():
        try:
            if "EngineCore" in " ".join(_cmdline(p)) and me and me in p.environ().get("PYTEST_CURRENT_TEST", ""):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def _node_of_an_actor(psutil, raylets: dict):
    """The non-head node whose raylet is an ancestor of a NarrativeWorker actor process."""
    for p in psutil.process_iter():
        if "NarrativeWorker" not in " ".join(_cmdline(p)):
            continue
        try:
            parents = p.parents()
        except psutil.Error:
            continue
        for q in parents:
            if q.pid in raylets:
                return raylets[q.pid]
    return None


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # the process may be gone already
        return []
