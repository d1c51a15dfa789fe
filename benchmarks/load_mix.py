"""The request side of ``bench_sustained.py``: one streamed completion (``stream``,
which times its first token and the gaps after it), the request kinds of the mix
(``Mix``: plain, distinct configs, captures fetched by key, head-patch sweeps, cancelled
streams; plain answers checked against the prompt's answer alone) and ``Done``, one
finished request."""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

from soak_server import PROMPTS

KINDS = ("plain", "distinct", "capture", "sweep", "cancel")
WEIGHTS = (3, 4, 2, 1, 1)
LATENCY_KINDS = ("plain", "distinct", "capture")
SWEEP_WIDTH = 8


@dataclass
class Done:
    """One finished request."""
    kind: str
    t_end: float  # seconds since the phase started
    tokens: int
    ttft: float | None  # seconds
    gaps: list = field(default_factory=list)  # inter-token gaps, seconds
    problem: str | None = None


def pct(xs, q: float) -> float | None:
    """The q-quantile (0..1) of xs, nearest rank; None for no values."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def ms(x: float | None) -> float | None:
    return None if x is None else round(1000.0 * x, 2)


# ----------------------------------------------------------------------- requests
def stream(base_url: str, api_key: str | None, body: dict, timeout: float,
           cancel_after: int | None = None) -> tuple[int, float | None, list, str, str | None]:
    """POST a streamed completion; (tokens, ttft, gaps, text, problem). Tokens are the
    usage count of the final chunk (chunks when it is absent); ``cancel_after`` chunks
    drops the connection."""
    host, port = base_url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    ttft, last, gaps, text, chunks, usage = None, None, [], [], 0, None
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        if resp.status != 200:
            return 0, None, [], "", f"HTTP {resp.status}: {resp.read()[:200]!r}"
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            msg = json.loads(data)
            if msg.get("usage"):
                usage = msg["usage"].get("completion_tokens")
            piece = "".join(c.get("text") or "" for c in msg.get("choices") or ())
            if not msg.get("choices"):
                continue
            now = time.monotonic()
            if ttft is None:
                ttft = now - t0
            else:
                gaps.append(now - last)
            last = now
            text.append(piece)
            chunks += 1
            if cancel_after is not None and chunks >= cancel_after:
                return chunks, ttft, gaps, "".join(text), None
    except (OSError, ValueError) as e:
        return 0, None, [], "", f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return (usage if usage is not None else chunks), ttft, gaps, "".join(text), None


class Mix:
    """The request kinds against one server: configs, expected plain answers, calls."""

    def __init__(self, client, model: str, info, max_tokens: int, seed: int):
        self.client, self.model, self.info, self.max_tokens = client, model, info, max_tokens
        self.layers, self.heads = info.num_layers, info.num_heads
        self._serial = iter(range(10**9))
        self._lock = threading.Lock()
        self.plain = {}  # each prompt's answer alone, streamed like every request
        for p in PROMPTS:
            n, _, _, text, problem = stream(client.base_url, client.api_key, self.body(p, None), client.timeout)
            if problem or n < 1:
                raise RuntimeError(f"plain request failed: {problem or 'no tokens'}")
            self.plain[p] = text

    def distinct_cfg(self, r: random.Random) -> dict:
        with self._lock:
            k = next(self._serial)
        layers = sorted(r.sample(range(self.layers), max(1, self.layers // 3)))
        # The serial number in the scale makes every config's fingerprint new.
        return {"steer": [{"vector": "soak.res", "layers": layers, "scale": 0.5 + 1e-4 * k}],
                "heads": [{"layer": r.randrange(self.layers), "head": r.randrange(self.heads),
                           "mode": "add", "vector": "soak.head", "scale": 1.0}]}

    def body(self, prompt: str, cfg: dict | None, key: str | None = None, max_tokens=None) -> dict:
        b = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens or self.max_tokens,
             "temperature": 0.0, "ignore_eos": True}
        xargs = {}
        if cfg is not None:
            xargs["emosteer"] = json.dumps(cfg)
        if key is not None:
            xargs["emosteer_key"] = key
        if xargs:
            b["vllm_xargs"] = xargs
        return b

    def run(self, kind: str, r: random.Random, t0: float) -> list[Done]:
        """``one``, with a client-side failure recorded as an unexpected result."""
        try:
            return self.one(kind, r, t0)
        except Exception as e:  # noqa: BLE001 - any failure is an unexpected result
            return [Done(kind, time.monotonic() - t0, 0, None, [], f"{type(e).__name__}: {e}")]

    def one(self, kind: str, r: random.Random, t0: float) -> list[Done]:
        c = self.client
        p = r.choice(PROMPTS)

        def call(body, cancel_after=None, check_plain=False):
            n, ttft, gaps, text, problem = stream(c.base_url, c.api_key, body, c.timeout, cancel_after)
            if problem is None and cancel_after is None and n < 1:
                problem = "no tokens"
            if problem is None and check_plain and text != self.plain[p]:
                problem = "plain answer differs from the prompt's answer alone"
            return Done(kind, time.monotonic() - t0, n, ttft, gaps, problem)

        if kind == "plain":
            return [call(self.body(p, None), check_plain=True)]
        if kind == "distinct":
            return [call(self.body(p, self.distinct_cfg(r)))]
        if kind == "capture":
            key = uuid.uuid4().hex
            cfg = {"capture": {"residual": [self.layers - 1], "heads": [self.layers // 2],
                               "positions": "last"}}
            d = call(self.body(p, cfg, key))
            if d.problem is None:
                try:
                    got = c.captures(key)
                    if self.layers - 1 not in got.get("residual", {}):
                        d.problem = "capture fetched without the residual layer"
                except Exception as e:  # noqa: BLE001 - any failure is an unexpected result
                    d.problem = f"capture fetch: {e}"
            return [d]
        if kind == "sweep":
            out: list[Done] = []
            heads = [(r.randrange(self.layers), r.randrange(self.heads)) for _ in range(SWEEP_WIDTH)]

            def patch(lh):
                cfg = {"heads": [{"layer": lh[0], "head": lh[1], "mode": "ablate", "positions": "last"}]}
                out.append(call(self.body(p, cfg, max_tokens=2)))

            ts = [threading.Thread(target=patch, args=(lh,), daemon=True) for lh in heads]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return out
        if kind == "cancel":
            return [call(self.body(p, self.distinct_cfg(r), max_tokens=4 * self.max_tokens), cancel_after=1)]
        raise ValueError(kind)
