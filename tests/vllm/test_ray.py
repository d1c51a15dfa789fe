"""`emosteer generate --ray` on a local Ray cluster: the same output as the local path,
and after an engine actor is killed mid-run (and the job rerun) every row is in OUT
exactly once, equal to the local run's."""

from __future__ import annotations

import json
import os
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


def test_killed_actor_then_rerun_loses_and_duplicates_nothing(tmp_path, tiny_model, bank_path, local_rows):
    import psutil

    # Many one-row batches, so that the run is still going when its first rows are in OUT.
    many = [{**{k: v for k, v in r.items() if k in ("prompt", "emotion", "steer")}, "id": f"{r['id']}.{j}"}
            for j in range(4) for r in ROWS]
    _write(tmp_path / "in.jsonl", many)
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen(_cli(tmp_path, tiny_model, bank_path, 1), env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed = None
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 2:
                try:
                    tree = psutil.Process(proc.pid).children(recursive=True)
                except psutil.Error:  # the run just ended
                    tree = []
                actors = [p for p in tree if "NarrativeWorker" in " ".join(_cmdline(p))]
                if actors:
                    killed = actors[0].pid
                    actors[0].kill()
                    break
            time.sleep(0.02)
        assert killed is not None, "the run ended before an actor could be killed"
        proc.wait(timeout=600)  # Ray restarts the actor and retries, or the run fails
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
        log.close()
    rerun = subprocess.run(_cli(tmp_path, tiny_model, bank_path, 1), capture_output=True, text=True,
                           timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    got = _read(out)
    ids = [r["id"] for r in got]
    assert sorted(ids) == sorted(r["id"] for r in many) and len(ids) == len(set(ids))
    for r in got:  # each row equals the local run of the same prompt and config
        assert_same_row({**r, "id": r["id"].split(".")[0]}, local_rows[r["id"].split(".")[0]])


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # the process may be gone already
        return []
