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
    from emosteer.request.bank import VectorBank

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
        from emosteer.client import Client

        self.client = Client(f"http://127.0.0.1:{self.port}", api_key=API_KEY)

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

    # HTTP calls: emosteer's own client (the one users get)
    def request(self, method: str, path: str, body=None, **kw) -> tuple[int, bytes]:
        return self.client.request(method, path, body, **kw)

    def post(self, path: str, body, **kw):
        return self.client.post(path, body, **kw)

    def get(self, path: str, **kw):
        return self.client.get(path, **kw)

    def complete(self, prompt: str, cfg=None, max_tokens: int = MAX_TOKENS, key: str | None = None,
                 **body):
        return self.client.complete(self.model, prompt, cfg, key=key, max_tokens=max_tokens, **body)

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

