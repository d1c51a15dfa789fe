"""Soak of the real server: concurrent clients, a random mix of requests, every answer checked.

    python benchmarks/soak_server.py                 # 10 minutes on the default model
    python benchmarks/soak_server.py --minutes 1 --model tiny

Starts ``emosteer serve`` on loopback (or uses ``--url``), registers two random vectors
over HTTP, then computes each request's expected answer alone (greedy): plain text per
prompt, steered text per (prompt, config) for more distinct configs than the server has
slots, and captured residual rows per prompt. Then ``--clients`` threads send a random
mix until the time is up: plain, steered, capture (+ fetch by key), invalid (must be
400), and streamed requests cancelled after the first chunk. Every answer must equal
its expected one; afterwards no slot, pool row or capture row may be held, and the
server's resident memory (all its processes) is sampled for growth.

Writes ``benchmarks/results/soak.json`` (with ``--out``) and prints a summary. The short
version runs in ``make test`` (tests/vllm/test_server_soak.py) through ``run_soak``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info  # noqa: E402

PROMPTS = [
    "The child laughs with joy at the bright sunny beach.",
    "A man sits alone in the rain, quiet and sad.",
    "She shouts in anger and slams the door.",
    "Describe the scene in the picture.",
]
INVALID = [
    {"steer": [{"vector": "nope", "layers": [0], "scale": 1.0}]},
    {"steer": [{"vector": "soak.res", "layers": [10**6], "scale": 1.0}]},
    '{"steer": [{"vector": "soak.res", "layers": [0], "scale": NaN}]}',
    {"heads": [{"layer": 0, "head": 10**4, "mode": "ablate"}]},
    "{not json",
]


@dataclass
class SoakResult:
    seconds: float = 0.0
    requests: int = 0
    by_kind: dict = field(default_factory=dict)
    unexpected: list = field(default_factory=list)
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    idle_after: bool = False
    admission_after: dict = field(default_factory=dict)
    configs: int = 0
    clients: int = 0

    @property
    def ok(self) -> bool:
        return not self.unexpected and self.idle_after


def rss_mib(pid: int | None) -> float:
    """Resident memory of a process and all its children, MiB (0 if unknown)."""
    if pid is None:
        return 0.0
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def rss_parts(pid: int | None) -> dict[str, float]:
    """Resident memory by role, MiB: the server's own process (``api``: vLLM's OpenAI
    front end with emosteer's), vLLM's engine core (scheduler, emosteer's admission) and
    the model workers (``workers``: weights, KV cache, emosteer's pools); 0 if unknown."""
    out = {"api": 0.0, "engine": 0.0, "workers": 0.0}
    if pid is None:
        return out
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            name = " ".join(p.cmdline()[:1]) + " " + p.name()
            rss = p.memory_info().rss / 2**20
        except psutil.Error:
            continue
        role = "api" if p.pid == pid else "engine" if "EngineCore" in name else "workers"
        out[role] += rss
    return {k: round(v, 1) for k, v in out.items()}


def write_memory(reports: list[dict], path: str, run_id: str) -> None:
    """The memory reports as JSON lines, then one line comparing the last to the first:
    the Python object types and allocation sites that grew most."""
    def grown(first: list, last: list) -> list:
        a = dict((k, v) for k, v in first)
        return sorted(((k, v - a.get(k, 0)) for k, v in last if v != a.get(k, 0)), key=lambda kv: -abs(kv[1]))

    first, last = reports[0], reports[-1]
    diff = {"run": run_id, "diff": "last - first", "workers": []}
    for w0, w1 in zip(first["workers"], last["workers"]):
        entry = {"rss_mib": round(w1["rss_mib"] - w0["rss_mib"], 2),
                 "malloc_mib": {k: round(w1["malloc_mib"][k] - w0["malloc_mib"][k], 2)
                                for k in (w1["malloc_mib"] or {})},
                 "py_objects": w1["py_objects"] - w0["py_objects"],
                 "py_blocks": w1["py_blocks"] - w0["py_blocks"],
                 "py_top_types": grown(w0["py_top_types"], w1["py_top_types"]),
                 "py_top_sizes_kib": grown(w0["py_top_sizes_kib"], w1["py_top_sizes_kib"]),
                 "tensors": w1["tensors"]["count"] - w0["tensors"]["count"]}
        if w1.get("tracemalloc"):  # the worker's own diff since its first report
            entry["tracemalloc_grown"] = w1["tracemalloc"]["grown"]
        diff["workers"].append(entry)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        for r in reports:
            f.write(json.dumps({"run": run_id, **r}) + "\n")
        f.write(json.dumps(diff) + "\n")


def _configs(n: int, layers: int, heads: int) -> list[dict]:
    return [{"steer": [{"vector": "soak.res", "layers": [k % layers], "scale": 1.0 + 0.25 * k}],
             "heads": [{"layer": (k // 2) % layers, "head": k % heads, "mode": "add",
                        "vector": "soak.head", "scale": 1.0}]}
            for k in range(n)]


def _capture_cfg(layer: int) -> dict:
    return {"capture": {"residual": [layer], "positions": "last"}}


def _stream_and_cancel(base_url: str, api_key: str | None, body: dict, timeout: float) -> None:
    """Send a streamed completion, read its first chunk, drop the connection."""
    host, port = base_url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), headers)
        resp = conn.getresponse()
        resp.read1(64) if hasattr(resp, "read1") else resp.read(64)
    finally:
        conn.close()


def run_soak(client, model: str, *, seconds: float, clients: int = 6, seed: int = 0,
             max_requests: int = 100000, max_tokens: int = 8, num_configs: int | None = None,
             server_pid: int | None = None, progress: bool = False) -> SoakResult:
    """Soak ``client`` (an ``emosteer.client.Client``) for ``seconds``; see the module doc."""
    import torch

    from emosteer.request.bank import ModelInfo, VectorBank

    listing = client.vectors()
    info = ModelInfo.from_dict(listing["model"])
    status = client.status()
    slots = status["admission"]["max_slots"]
    n_cfg = num_configs or 3 * slots
    g = torch.Generator().manual_seed(seed)
    bank = VectorBank(info)
    bank.add("soak.res", "residual", torch.randn(info.num_layers, info.hidden_size, generator=g) * 2.0)
    bank.add("soak.head", "head",
             torch.randn(info.num_layers, info.num_heads, info.head_dim, generator=g) * 2.0)
    st, body = client.upload(bank)
    if st != 201:
        raise RuntimeError(f"could not register the soak vectors: {st} {body}")
    cfgs = _configs(n_cfg, info.num_layers, info.num_heads)
    cap_layer = info.num_layers - 1

    def text(sb) -> str:
        st, body = sb
        if st != 200:
            raise RuntimeError(f"expected-answer request failed: {st} {body}")
        return body["choices"][0]["text"]

    # Expected answers, each request alone.
    plain = {p: text(client.complete(model, p, None, max_tokens=max_tokens)) for p in PROMPTS}
    steered = {}
    for k, cfg in enumerate(cfgs):
        for p in PROMPTS:
            steered[(p, k)] = text(client.complete(model, p, cfg, max_tokens=max_tokens))
    if sum(steered[(p, k)] != plain[p] for p in PROMPTS for k in range(n_cfg)) < n_cfg:
        raise RuntimeError("the soak configs barely change the text; the soak would prove little")
    captured = {}
    for p in PROMPTS:
        key = uuid.uuid4().hex
        text(client.complete(model, p, _capture_cfg(cap_layer), key=key, max_tokens=max_tokens))
        captured[p] = client.captures(key)["residual"][cap_layer]

    result = SoakResult(configs=n_cfg, clients=clients)
    result.rss_start_mib = rss_mib(server_pid)
    lock = threading.Lock()
    counts: collections.Counter = collections.Counter()
    deadline = time.monotonic() + seconds
    issued = [0]

    def record(kind: str, problem: str | None) -> None:
        with lock:
            counts[kind] += 1
            if problem:
                result.unexpected.append(f"{kind}: {problem}")

    def one(r: random.Random) -> None:
        kind = r.choices(["plain", "steered", "capture", "invalid", "cancel"], [3, 6, 2, 1, 1])[0]
        p = r.choice(PROMPTS)
        if kind == "plain":
            st, body = client.complete(model, p, None, max_tokens=max_tokens)
            ok = st == 200 and body["choices"][0]["text"] == plain[p]
            record(kind, None if ok else f"{st} {str(body)[:200]}")
        elif kind == "steered":
            k = r.randrange(n_cfg)
            st, body = client.complete(model, p, cfgs[k], max_tokens=max_tokens)
            ok = st == 200 and body["choices"][0]["text"] == steered[(p, k)]
            record(kind, None if ok else f"config {k}: {st} {str(body)[:200]}")
        elif kind == "capture":
            key = uuid.uuid4().hex
            st, body = client.complete(model, p, _capture_cfg(cap_layer), key=key, max_tokens=max_tokens)
            if st != 200 or body["choices"][0]["text"] != plain[p]:
                record(kind, f"{st} {str(body)[:200]}")
                return
            got = client.captures(key)["residual"][cap_layer]
            ok = got.shape == captured[p].shape and bool((got - captured[p]).abs().max() <= 1e-4)
            record(kind, None if ok else "captured rows differ from the request alone")
        elif kind == "invalid":
            bad = r.choice(INVALID)
            st, body = client.complete(model, p, bad, max_tokens=max_tokens)
            record(kind, None if st == 400 else f"expected 400, got {st} {str(body)[:200]}")
        else:
            k = r.randrange(n_cfg)
            body = {"model": model, "prompt": p, "max_tokens": max_tokens * 4, "temperature": 0.0,
                    "vllm_xargs": {"emosteer": json.dumps(cfgs[k])}}
            try:
                _stream_and_cancel(client.base_url, client.api_key, body, client.timeout)
                record(kind, None)
            except OSError as e:
                record(kind, f"stream failed: {e}")

    def worker(i: int) -> None:
        r = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= max_requests:
                    return
                issued[0] += 1
            try:
                one(r)
            except Exception as e:  # a client-side failure is an unexpected result too
                record("error", f"{type(e).__name__}: {e}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    last = t0
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=1.0)
        if progress and time.monotonic() - last > 30:
            last = time.monotonic()
            print(f"  {last - t0:6.0f} s  {sum(counts.values())} requests, "
                  f"{len(result.unexpected)} unexpected", flush=True)
        if time.monotonic() > deadline + 300:
            result.unexpected.append("clients did not finish within 300 s of the deadline")
            break
    result.seconds = time.monotonic() - t0
    result.requests = sum(counts.values())
    result.by_kind = dict(counts)
    # Nothing may stay held (cancelled requests are aborted a moment later).
    for _ in range(100):
        adm = client.status()["admission"]
        idle = (adm["slots_in_use"] == 0 and adm["waiting_for_slots"] == 0
                and adm["capture_rows_in_use"] == 0 and not any(adm["pool_rows_in_use"].values()))
        if idle:
            break
        time.sleep(0.1)
    result.idle_after, result.admission_after = idle, adm
    result.rss_end_mib = rss_mib(server_pid)
    for name in ("soak.res", "soak.head"):
        client.delete(name)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--model", default="default", help="model folder, 'default' or 'tiny'")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-slots", type=int, default=8)
    ap.add_argument("--url", default=None, help="soak a running server instead of starting one")
    ap.add_argument("--api-key", default="soak-key")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)

    from emosteer.client import Client

    with served(args.model, url=args.url, max_slots=args.max_slots, api_key=args.api_key) as (url, model, pid):
        client = Client(url, api_key=args.api_key)
        print(f"soaking {url} for {args.minutes} min with {args.clients} clients", flush=True)
        res = run_soak(client, model, seconds=args.minutes * 60, clients=args.clients,
                       server_pid=pid, progress=True)
    mach = machine_info()
    out = asdict(res)
    out.update(ok=res.ok, model=os.path.basename(model.rstrip("/")), max_slots=args.max_slots,
               machine=f"{mach['arch']} {mach['ncpu']} cores", python=platform.python_version(),
               date=time.strftime("%Y-%m-%d %H:%M"))
    print(json.dumps({k: v for k, v in out.items() if k != "unexpected"}, indent=1))
    for u in res.unexpected[:20]:
        print("UNEXPECTED", u)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if res.ok else 1


def model_path(model: str) -> str:
    """A model folder for ``model``: a path, "default" / a built-in name, or "tiny" (the
    test model, built in the temp folder)."""
    if model == "tiny":
        import tempfile

        from emosteer.models.tiny import build_tiny_llama

        return str(build_tiny_llama(os.path.join(tempfile.gettempdir(), "emosteer-soak-tiny")))
    from emosteer.models import resolve_model

    return str(resolve_model(model))


@contextlib.contextmanager
def served(model: str, *, url: str | None = None, max_slots: int = 8, api_key: str | None = None,
           extra: tuple = (), log_name: str = "emosteer-soak-server.log"):
    """``emosteer serve <model>`` on a free loopback port (float32, 512-token context,
    seed 0), up and healthy, stopped on exit; yields (url, model path, server pid).
    With ``url`` a running server is used as is (pid None)."""
    if url is not None:
        yield url, model, None
        return
    import socket
    import tempfile

    path = model_path(model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(tempfile.gettempdir(), log_name), "wb")
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    cmd = [sys.executable, "-m", "emosteer.cli", "serve", path, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
           "--max-slots", str(max_slots), "--seed", "0", *extra]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t_end = time.monotonic() + 900
        while not _up(url):
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
            if time.monotonic() > t_end:
                raise SystemExit(f"server not up after 900 s; see {log.name}")
            time.sleep(2)
        yield url, path, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def _up(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
