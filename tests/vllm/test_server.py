"""The real OpenAI server on loopback, under a flood of distinct configs.

Two servers of the tiny Llama with the plugin: ``cached`` (prefix caching on,
``max_slots`` 4) and ``reference`` (prefix caching off, the answer a config must get).
4 x max_slots distinct configs with prompts of several KV blocks are sent at once: every
answer equals the reference's, none is the unsteered text; afterwards each config alone
equals it too (nothing unsteered was cached under a steering salt) and every slot is
free. Bounded: every request and wait has a timeout.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from vllm_support import LONG_PROMPT, engine_env

SERVER_SLOTS = 4
MAX_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict, timeout: float = 120.0) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class Server:
    def __init__(self, model: str, bank_path: str, prefix_caching: bool, log_path: str):
        engine_env()
        self.port = _free_port()
        self.model = model
        env = dict(os.environ, EMOSTEER_BANK=bank_path)
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
            "--max-model-len", "256", "--block-size", "32", "--seed", "0",
            "--additional-config", json.dumps({"emosteer": {"max_slots": SERVER_SLOTS}}),
            "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
        ]
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"server not ready after {timeout} s; see {self.log.name}")

    def complete(self, prompt: str, cfg: dict | None) -> tuple[int, dict]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0}
        if cfg is not None:
            body["vllm_xargs"] = {"emosteer": json.dumps(cfg)}
        return _post(self.port, body)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def servers(tiny_model, bank_path, tmp_path_factory, engines):
    engines.close()  # one engine at a time on this small machine, besides these two
    logs = tmp_path_factory.mktemp("servers")
    cached = Server(tiny_model, bank_path, True, str(logs / "cached.log"))
    reference = Server(tiny_model, bank_path, False, str(logs / "reference.log"))
    try:
        cached.wait_ready()
        reference.wait_ready()
        yield cached, reference
    finally:
        cached.close()
        reference.close()


def _text(status_body) -> str:
    status, body = status_body
    assert status == 200, body
    return body["choices"][0]["text"]


def test_flood_of_distinct_configs_waits_never_unsteered(servers):
    cached, reference = servers
    n = 4 * SERVER_SLOTS
    cfgs = [{"steer": [{"vector": "joy", "layers": [0, 1], "scale": 1.5 + 0.5 * i}],
             "heads": [{"layer": i % 2, "head": i % 4, "mode": "add", "vector": "joy.h", "scale": 1.0}]}
            for i in range(n)]
    prompts = [f"{LONG_PROMPT} ({i % 2})" for i in range(n)]  # 3+ KV blocks of 32 tokens
    want = [_text(reference.complete(p, c)) for p, c in zip(prompts, cfgs)]
    plain = {p: _text(reference.complete(p, None)) for p in set(prompts)}
    assert all(w != plain[p] for w, p in zip(want, prompts)), "the test's configs must change the text"
    with cf.ThreadPoolExecutor(max_workers=n) as pool:
        got = list(pool.map(lambda pc: cached.complete(*pc), zip(prompts, cfgs)))
    assert [_text(g) for g in got] == want
    # Alone afterwards, with the flood's blocks in the prefix cache: still the same.
    assert [_text(cached.complete(p, c)) for p, c in zip(prompts, cfgs)] == want
    # Plain requests after the flood: bit-identical text to the reference's.
    assert {p: _text(cached.complete(p, None)) for p in set(prompts)} == plain


def test_bad_config_is_400_naming_the_field_and_server_goes_on(servers):
    cached, _ = servers
    status, body = cached.complete("Hello", {"steer": [{"vector": "nope", "layers": [0], "scale": 1.0}]})
    assert status == 400 and "steer[0].vector" in json.dumps(body)
    status, body = _post(cached.port, {"model": cached.model, "prompt": "Hi", "max_tokens": 2,
                                       "vllm_xargs": {"emosteer_grant": "{}"}})
    assert status == 400 and "emosteer_grant" in json.dumps(body)
    status, body = cached.complete("Hello", {"capture": {"heads": [0]}})
    assert status == 400 and "capture" in json.dumps(body) and "HTTP" in json.dumps(body)
    assert _text(cached.complete("Hello", None))
