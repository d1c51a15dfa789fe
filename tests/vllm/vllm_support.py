"""Constants and helpers shared by the vLLM plugin tests (imported by conftest and the
check functions; a plain module, since tests/vllm must not be a package named vllm).

Engines are expensive (tens of seconds to start on a CPU) and the test machine is small,
so ``Engines.get(kind)`` keeps at most one alive: asking for another kind shuts the
current one down first. Kinds: ``plain`` (vLLM with the plugin excluded through
``VLLM_PLUGINS``), ``eager`` and ``compiled`` (``emosteer.LLM``).
"""


from __future__ import annotations

import gc
import os

import torch

MAX_SLOTS = 16
MAX_TOKENS = 8
PROMPTS = [
    "The child laughs with joy at the bright sunny beach.",
    "A man sits alone in the rain, quiet and sad.",
    "She shouts in anger and slams the door.",
    "The dark forest at night makes him afraid.",
    "Describe the scene in the picture.",
    "A person stands in a room.",
    "happy joyful delighted cheerful glad",
    "sad gloomy grief tears lonely hurt",
]
# Long enough to fill two 32-token KV blocks (prefix-cache tests).
LONG_PROMPT = " ".join(PROMPTS)


def engine_env() -> None:
    """Environment every engine of these tests needs (set in the test process, so the
    engine processes it spawns inherit it)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # tests/ops sets TRITON_INTERPRET per test; an engine must never inherit it (it
    # would make interpreted Triton kernels available) nor a forced implementation.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("EMOSTEER_IMPL", None)


def make_bank(info, seed: int = 0):
    """Random non-zero vectors of every kind the plugin executes."""
    from emosteer.bank import VectorBank

    g = torch.Generator().manual_seed(seed)
    bank = VectorBank(info)
    L, d, H, D, I = info.num_layers, info.hidden_size, info.num_heads, info.head_dim, info.intermediate_size
    bank.add("joy", "residual", torch.randn(L, d, generator=g) * 0.5)
    bank.add("sad", "residual", torch.randn(L, d, generator=g) * 0.5)
    bank.add("joy.h", "head", torch.randn(L, H, D, generator=g) * 0.5)
    bank.add("joy.ena", "neurons", (torch.rand(L, I, generator=g) < 0.25).float())
    return bank


class Engines:
    def __init__(self, model: str, bank_path: str):
        self.model, self.bank_path = model, bank_path
        self.kind: str | None = None
        self.llm = None

    def get(self, kind: str):
        if self.kind == kind:
            return self.llm
        self.close()
        engine_env()
        common = dict(dtype="float32", max_model_len=256, block_size=32, seed=0, enable_prefix_caching=True)
        if kind == "plain":
            import emosteer.vllm as plugin

            # Not loaded in the engine processes (VLLM_PLUGINS), and no patch of this
            # process carried into them if they are forked.
            plugin.unregister()
            saved = os.environ.get("VLLM_PLUGINS")
            os.environ["VLLM_PLUGINS"] = "none-but-not-emosteer"
            try:
                import vllm

                self.llm = vllm.LLM(self.model, enforce_eager=True, **common)
            finally:
                if saved is None:
                    os.environ.pop("VLLM_PLUGINS", None)
                else:
                    os.environ["VLLM_PLUGINS"] = saved
        else:
            import emosteer

            # Both ways of giving the bank: the eager engine's workers load it at
            # start-up from EMOSTEER_BANK, the compiled one gets it registered by RPC.
            by_env = kind == "eager"
            if by_env:
                os.environ["EMOSTEER_BANK"] = self.bank_path
            try:
                # The eager engine has few slots (requests must wait for them); the
                # compiled one runs at emosteer's default settings.
                slots = {"max_slots": MAX_SLOTS} if kind == "eager" else {}
                self.llm = emosteer.LLM(
                    self.model,
                    bank=None if by_env else self.bank_path,
                    enforce_eager=(kind == "eager"),
                    **slots,
                    **common,
                )
            finally:
                os.environ.pop("EMOSTEER_BANK", None)
        self.kind = kind
        return self.llm

    def close(self) -> None:
        if self.llm is None:
            return
        llm = getattr(self.llm, "llm", self.llm)
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        self.llm = None
        self.kind = None
        del llm
        gc.collect()


def summarize(out) -> dict:
    """Token ids and every step's top-k logprobs of one RequestOutput."""
    c = out.outputs[0]
    lps = [{int(t): float(lp.logprob) for t, lp in step.items()} for step in (c.logprobs or [])]
    return {"ids": list(c.token_ids), "logprobs": lps}


def greedy(max_tokens: int = MAX_TOKENS, logprobs: int | None = 5, **kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs, **kw)


def assert_no_slots_held(llm, wait_s: float = 5.0) -> None:
    """Every slot and request state freed. vLLM tells workers that requests finished
    one engine step after the client sees them finish, so poll briefly."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        states = llm.status()
        if all(st["admission"]["slots_in_use"] == 0 and st["admission"]["admitted_requests"] == 0
               and st["requests"] == 0 for st in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"slots or requests still held: {states}")
        time.sleep(0.05)


# -- the OpenAI server ---------------------------------------------------------------
SERVER_SLOTS = 4
API_KEY = "emosteer-test-key"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``emosteer serve`` (vLLM's OpenAI server, the plugin and its HTTP routes) on
    loopback, with an API key. Every call has a timeout."""

    def __init__(self, model: str, bank_path: str | None, prefix_caching: bool, log_path: str,
                 max_slots: int = SERVER_SLOTS, extra: tuple = ()):
        import json
        import subprocess
        import sys

        engine_env()
        self.port = free_port()
        self.model = model
        cmd = [
            sys.executable, "-m", "emosteer.cli", "serve", model,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
            "--max-model-len", "256", "--block-size", "32", "--seed", "0",
            "--max-slots", str(max_slots), "--api-key", API_KEY,
            "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
            *extra,
        ]
        if bank_path is not None:
            cmd += ["--bank", bank_path]
        env = dict(os.environ)
        env.pop("VLLM_PLUGINS", None)
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._json = json

    def wait_ready(self, timeout: float = 600.0) -> None:
        import time
        import urllib.request

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

    def request(self, method: str, path: str, body=None, *, ctype: str | None = None,
                api_key: str | None = API_KEY, timeout: float = 120.0) -> tuple[int, bytes]:
        import urllib.error
        import urllib.request

        if body is not None and not isinstance(body, (bytes, bytearray)):
            body, ctype = self._json.dumps(body).encode(), ctype or "application/json"
        headers = {"Content-Type": ctype or "application/octet-stream"}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key}"
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body,
                                     method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, body, **kw) -> tuple[int, dict]:
        status, raw = self.request("POST", path, body, **kw)
        return status, _loads(raw)

    def get(self, path: str, **kw) -> tuple[int, dict]:
        status, raw = self.request("GET", path, **kw)
        return status, _loads(raw)

    def complete(self, prompt: str, cfg: dict | str | None, max_tokens: int = MAX_TOKENS,
                 key: str | None = None, **body) -> tuple[int, dict]:
        req = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
               "temperature": 0.0, **body}
        if cfg is not None or key is not None:
            xargs = dict(req.pop("vllm_xargs", {}) or {})
            if cfg is not None:
                xargs["emosteer"] = cfg if isinstance(cfg, str) else self._json.dumps(cfg)
            if key is not None:
                xargs["emosteer_key"] = key
            req["vllm_xargs"] = xargs
        return self.post("/v1/completions", req)

    def admission(self) -> dict:
        status, body = self.get("/v1/emosteer/status")
        assert status == 200, body
        return body["admission"]

    def close(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        self.log.close()


def _loads(raw: bytes):
    import json

    try:
        return json.loads(raw or b"{}")
    except ValueError:
        return {"raw": raw[:200].decode("latin-1")}
