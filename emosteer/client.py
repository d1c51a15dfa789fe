"""A small client for a server started by ``emosteer serve`` (standard library only).

    from emosteer.client import Client
    c = Client("http://127.0.0.1:8000", api_key="...")
    c.upload("bank.safetensors")                      # or a VectorBank, or GGUF bytes + name=
    status, body = c.complete(model, "Describe the picture.",
                              {"steer": [{"vector": "joy", "layers": [12], "scale": 4.0}]})
    caps = c.captures(key, wait=10)                   # tensors by layer

For completions the ``openai`` package works as well: put the config in
``extra_body={"vllm_xargs": {"emosteer": json.dumps(cfg), "emosteer_key": key}}``.
Every call has a timeout; errors come back as ``(status, body)`` (``ClientError`` from
the helpers that return data only).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class ClientError(RuntimeError):
    def __init__(self, status: int, body: Any):
        msg = body.get("error", {}).get("message") if isinstance(body, dict) else None
        super().__init__(f"HTTP {status}: {msg or body}")
        self.status, self.body = status, body


def inline_vector(tensor, dtype: str = "float32", layers=None, heads=None) -> dict:
    """A ``"vector"`` carried inline, as base64 little-endian ``dtype`` ("float32" or
    "bfloat16"). On a steer item ``tensor`` is ``[n, d]``, one row per layer of the item
    (ascending), e.g. ``{"steer": [{"vector": inline_vector(v[[12, 14]]), "layers": [12, 14],
    "scale": 4}]}``. On a heads item it is ``[n, D]``, one row per head of the item (or of
    ``heads``), or ``[H, D]`` for every head of the item's layer, e.g. ``{"heads":
    [{"layer": 9, "head": [3, 7], "mode": "patch", "vector": inline_vector(z[[3, 7]])}]}``."""
    from emosteer.request.inline import encode

    return encode(tensor, dtype, layers, heads)


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"{}")
    except ValueError:
        return {"raw": raw[:200].decode("latin-1")}


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    # -- raw ---------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, ctype: str | None = None,
                api_key: Any = "default", timeout: float | None = None) -> tuple[int, bytes]:
        """(status, raw body). ``body``: bytes (sent as is) or JSON-able."""
        if body is not None and not isinstance(body, (bytes, bytearray)):
            body, ctype = json.dumps(body).encode(), ctype or "application/json"
        headers = {"Content-Type": ctype or "application/octet-stream"}
        key = self.api_key if api_key == "default" else api_key
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, body: Any, **kw) -> tuple[int, Any]:
        status, raw = self.request("POST", path, body, **kw)
        return status, _loads(raw)

    def get(self, path: str, **kw) -> tuple[int, Any]:
        status, raw = self.request("GET", path, **kw)
        return status, _loads(raw)

    # -- completions -------------------------------------------------------------------
    def complete(self, model: str, prompt: str, cfg: Any = None, *, key: str | None = None,
                 max_tokens: int = 16, temperature: float = 0.0, **body: Any) -> tuple[int, Any]:
        """``/v1/completions`` with ``cfg`` (dict or JSON string) in ``vllm_xargs``."""
        req = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
               "temperature": temperature, **body}
        if cfg is not None or key is not None:
            xargs = dict(req.pop("vllm_xargs", None) or {})
            if cfg is not None:
                xargs["emosteer"] = cfg if isinstance(cfg, str) else json.dumps(cfg)
            if key is not None:
                xargs["emosteer_key"] = key
            req["vllm_xargs"] = xargs
        return self.post("/v1/completions", req)

    # -- vectors -----------------------------------------------------------------------
    def upload(self, source: Any, **params: Any) -> tuple[int, Any]:
        """Register a bank (a ``VectorBank``, a file path, or a file's bytes) or a GGUF
        control vector (path or bytes, with ``name=``). Params: name, format, convention,
        scale."""
        if hasattr(source, "to_bytes"):
            data = source.to_bytes()
        elif isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        else:
            with open(os.fspath(source), "rb") as f:
                data = f.read()
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        status, raw = self.request("POST", "/v1/emosteer/vectors" + query, data)
        return status, _loads(raw)

    def vectors(self) -> dict:
        return self._ok(self.get("/v1/emosteer/vectors"))

    def delete(self, name: str) -> tuple[int, Any]:
        status, raw = self.request("DELETE", "/v1/emosteer/vectors/" + urllib.parse.quote(name, safe=""))
        return status, _loads(raw)

    # -- captures, status --------------------------------------------------------------
    def captures(self, key: str, wait: float = 10.0) -> dict:
        """The captures of the request that set ``emosteer_key=key``, as tensors:
        ``{"positions", "error", "heads": {layer: [P, H, D]}, "residual": {layer: [P, d]},
        "attn_image": {layer: [P, H, images]}, "probe": {gate layer: [P]}}``
        (``{"samples": [...]}`` for n > 1)."""
        import torch

        body = self._ok(self.get(f"/v1/emosteer/captures/{urllib.parse.quote(key, safe='')}?wait={wait}"))

        def tensors(one: dict) -> dict:
            return {"positions": one["positions"], "error": one["error"],
                    "heads": {int(k): torch.tensor(v) for k, v in one["heads"].items()},
                    "residual": {int(k): torch.tensor(v) for k, v in one["residual"].items()},
                    "attn_image": {int(k): torch.tensor(v) for k, v in one.get("attn_image", {}).items()},
                    "probe": {int(k): torch.tensor(v) for k, v in one.get("probe", {}).items()}}

        if "samples" in body:
            return {"samples": [tensors(s) for s in body["samples"]]}
        return tensors(body)

    def status(self, memory: bool = False) -> dict:
        """The plugin's state; ``memory=True`` adds where each process's memory is (RSS,
        allocator in-use/free, Python objects by type, tensors; slow: diagnosis only)."""
        return self._ok(self.get("/v1/emosteer/status" + ("?memory=1" if memory else "")))

    @staticmethod
    def _ok(status_body: tuple[int, Any]) -> Any:
        status, body = status_body
        if status != 200:
            raise ClientError(status, body)
        return body


__all__ = ["Client", "ClientError"]
