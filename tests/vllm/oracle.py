"""An independent reference for emosteer's request configs: plain transformers + hooks.

Written from the documented semantics only (README "The request config", docs/DESIGN.md
§3-4, docs/steer.schema.json). It shares no code with the engine or with emosteer's own
transformers backend: it imports nothing from ``emosteer.request.spec``, ``emosteer.request.compile``,
``emosteer.hf`` or ``emosteer.vllm``, parses the config JSON itself, and reads bank
vectors straight from the safetensors file (or from a ``VectorBank``'s tensors).

Semantics implemented (``P`` = prompt length, token ``t`` is a prompt token iff t < P):

- ``steer[i]``: ``scale * vector[l]`` is added to the output of decoder layer ``l`` (the
  residual that leaves the layer: what the next layer's input norm, or the final norm,
  reads) at the item's positions. Items on one layer add up.
- ``heads[i]`` on the attention output before ``o_proj``, viewed ``[T, H, D]``, at the
  item's positions: add ``z += scale * v[l, h]``, patch ``z = v[l, h]``, ablate ``z = 0``,
  scale ``z *= scale``.
- ``neurons``: the MLP activation ``act(gate) * up`` (``down_proj``'s input) times
  ``gamma`` where ``mask[l, i] == 1``, at its positions.
- positions: "all", "prompt" (t < P), "generated" (t >= P), "last" (t == P - 1) or a
  list of prompt indices.
- ``capture``: heads = ``o_proj``'s input before the head interventions, residual = the
  layer output after the steering add; rows at "last" ([P - 1]), "all" (every fed token:
  prompt and generated except the final sampled one) or "generated".
- ``boost`` (VEE) is not implemented: it needs images.

Greedy generation recomputes the whole sequence at every step (no KV cache), so nothing
is shared with an incremental engine: a step's logits depend only on the token ids and the
config, applied by absolute position.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

class OracleConfigError(ValueError):
    """A config the oracle does not understand (it does not validate exhaustively)."""


# -- config parsing (our own, deliberately minimal) ------------------------------------
def _layers(sel: Any, L: int, what: str) -> list[int]:
    if sel == "all":
        return list(range(L))
    if isinstance(sel, bool):
        raise OracleConfigError(f"{what}: bad layer selection {sel!r}")
    if isinstance(sel, (int, float)):
        sel = [sel]
    if not isinstance(sel, list) or not sel:
        raise OracleConfigError(f"{what}: bad layer selection {sel!r}")
    out = [int(x) for x in sel]
    if any(x < 0 or x >= L for x in out):
        raise OracleConfigError(f"{what}: layer out of range in {sel!r} (L={L})")
    return out


def position_mask(positions: Any, P: int, T: int) -> torch.Tensor:
    """[T] bool: which of the T tokens (P of them the prompt) ``positions`` selects."""
    t = torch.arange(T)
    if positions == "all":
        return torch.ones(T, dtype=torch.bool)
    if positions == "prompt":
        return t < P
    if positions == "generated":
        return t >= P
    if positions == "last":
        return t == P - 1
    if isinstance(positions, list) and positions:
        m = torch.zeros(T, dtype=torch.bool)
        for p in positions:
            p = int(p)
            if not 0 <= p < P:
                raise OracleConfigError(f"position {p} is not a prompt position (P={P})")
            if p < T:
                m[p] = True
        return m
    raise OracleConfigError(f"bad positions {positions!r}")


@dataclass
class _Parsed:
    # layer -> [(vector [d], scale, positions)]
    steer: dict[int, list[tuple[torch.Tensor, float, Any]]] = field(default_factory=dict)
    # layer -> [(head, mode, vector [D] | None, scale, positions)]
    heads: dict[int, list[tuple[int, str, torch.Tensor | None, float, Any]]] = field(default_factory=dict)
    # layer -> (mask [I] bool, gamma, positions)
    neurons: dict[int, tuple[torch.Tensor, float, Any]] = field(default_factory=dict)
    cap_heads: list[int] = field(default_factory=list)
    cap_residual: list[int] = field(default_factory=list)
    cap_positions: str | None = None


class Oracle:
    """``Oracle(model_dir, bank)``: ``bank`` is a path to a bank safetensors file, a dict
    name -> tensor, or an object with ``.get(name)`` (a ``VectorBank``)."""

    def __init__(self, model_dir: str | os.PathLike, bank: Any):
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()
        cfg = self.model.config
        self.L = cfg.num_hidden_layers
        self.H = cfg.num_attention_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.d = cfg.hidden_size
        self.I = cfg.intermediate_size
        if isinstance(bank, (str, os.PathLike)):
            from safetensors.torch import load_file

            bank = load_file(os.fspath(bank))
        self._bank = bank
        self._state: dict | None = None
        layers = self.model.model.layers
        for l, layer in enumerate(layers):
            layer.self_attn.o_proj.register_forward_pre_hook(self._heads_hook(l))
            layer.mlp.down_proj.register_forward_pre_hook(self._mlp_hook(l))
            layer.register_forward_hook(self._residual_hook(l))

    # -- bank ---------------------------------------------------------------------
    def vector(self, name: str) -> torch.Tensor:
        b = self._bank
        t = b[name] if isinstance(b, dict) else b.get(name)
        return t.detach().to(torch.float32).cpu()

    # -- config -------------------------------------------------------------------
    def parse(self, config: Any) -> _Parsed:
        if config is None:
            return _Parsed()
        if isinstance(config, str):
            config = json.loads(config)
        if not isinstance(config, dict):
            raise OracleConfigError(f"config must be an object, got {type(config).__name__}")
        unknown = set(config) - {"steer", "heads", "neurons", "capture", "boost"}
        if unknown:
            raise OracleConfigError(f"unknown keys {sorted(unknown)}")
        if "boost" in config:
            raise OracleConfigError("boost (VEE) is not implemented by the oracle")
        out = _Parsed()
        for i, it in enumerate(config.get("steer", [])):
            vec = self.vector(it["vector"])
            if tuple(vec.shape) != (self.L, self.d):
                raise OracleConfigError(f"steer[{i}].vector: shape {tuple(vec.shape)}")
            scale = float(it["scale"])
            pos = it.get("positions", "all")
            for l in _layers(it["layers"], self.L, f"steer[{i}].layers"):
                out.steer.setdefault(l, []).append((vec[l], scale, pos))
        for i, it in enumerate(config.get("heads", [])):
            l = int(it["layer"])
            if not 0 <= l < self.L:
                raise OracleConfigError(f"heads[{i}].layer out of range")
            heads = it["head"] if isinstance(it["head"], list) else [it["head"]]
            mode = it["mode"]
            pos = it.get("positions", "all")
            if mode in ("add", "patch"):
                vec = self.vector(it["vector"])
                if tuple(vec.shape) != (self.L, self.H, self.D):
                    raise OracleConfigError(f"heads[{i}].vector: shape {tuple(vec.shape)}")
            elif mode in ("ablate", "scale"):
                vec = None
            else:
                raise OracleConfigError(f"heads[{i}].mode {mode!r}")
            scale = float(it.get("scale", 1.0))
            for h in heads:
                h = int(h)
                if not 0 <= h < self.H:
                    raise OracleConfigError(f"heads[{i}].head out of range")
                out.heads.setdefault(l, []).append((h, mode, None if vec is None else vec[l, h], scale, pos))
        if "neurons" in config:
            n = config["neurons"]
            mask = self.vector(n["set"])
            if tuple(mask.shape) != (self.L, self.I):
                raise OracleConfigError(f"neurons.set: shape {tuple(mask.shape)}")
            gamma = float(n["gamma"])
            pos = n.get("positions", "all")
            for l in range(self.L):
                out.neurons[l] = (mask[l] != 0, gamma, pos)
        cap = config.get("capture")
        if cap is not None:
            if "heads" in cap:
                out.cap_heads = _layers(cap["heads"], self.L, "capture.heads")
            if "residual" in cap:
                out.cap_residual = _layers(cap["residual"], self.L, "capture.residual")
            out.cap_positions = cap.get("positions", "last")
            if out.cap_positions not in ("last", "all", "generated"):
                raise OracleConfigError(f"capture.positions {out.cap_positions!r}")
        return out

    # -- hooks (act only while self._state is set) --------------------------------------
    def _heads_hook(self, l: int):
        def hook(module, args):
            st = self._state
            if st is None:
                return None
            x = args[0]  # [1, T, H*D]
            T = x.shape[1]
            z = x[0].reshape(T, self.H, self.D).clone()
            if l in st["want_heads"]:
                st["heads"][l] = z.clone()
            for h, mode, vec, scale, pos in st["cfg"].heads.get(l, ()):
                m = position_mask(pos, st["P"], T)
                if mode == "add":
                    z[m, h] = z[m, h] + scale * vec
                elif mode == "patch":
                    z[m, h] = vec.expand(int(m.sum()), self.D)
                elif mode == "ablate":
                    z[m, h] = 0.0
                else:  # scale
                    z[m, h] = z[m, h] * scale
            return (z.reshape(1, T, self.H * self.D),) + tuple(args[1:])

        return hook

    def _mlp_hook(self, l: int):
        def hook(module, args):
            st = self._state
            if st is None or l not in st["cfg"].neurons:
                return None
            x = args[0]  # [1, T, I]
            mask, gamma, pos = st["cfg"].neurons[l]
            T = x.shape[1]
            m = position_mask(pos, st["P"], T)
            y = x.clone()
            sel = y[0, m]  # [n, I]
            y[0, m] = torch.where(mask.unsqueeze(0), sel * gamma, sel)
            return (y,) + tuple(args[1:])

        return hook

    def _residual_hook(self, l: int):
        def hook(module, args, output):
            st = self._state
            if st is None:
                return None
            h = output[0] if isinstance(output, tuple) else output  # [1, T, d]
            items = st["cfg"].steer.get(l, ())
            if items:
                h = h.clone()
                T = h.shape[1]
                for vec, scale, pos in items:
                    m = position_mask(pos, st["P"], T)
                    h[0, m] = h[0, m] + scale * vec
            if l in st["want_residual"]:
                st["residual"][l] = h[0].detach().clone()
            if not items:
                return None
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

        return hook

    # -- running -------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, ids: list[int], P: int, cfg: _Parsed, capture: bool = False):
        """Logits [T, V] of the full sequence ``ids`` (first ``P`` = prompt), and the
        captured full-length activations when ``capture``."""
        self._state = {
            "cfg": cfg, "P": P, "heads": {}, "residual": {},
            "want_heads": set(cfg.cap_heads) if capture else set(),
            "want_residual": set(cfg.cap_residual) if capture else set(),
        }
        try:
            x = torch.tensor([ids], dtype=torch.long)
            out = self.model(input_ids=x, position_ids=torch.arange(len(ids)).unsqueeze(0), use_cache=False)
            logits = out.logits[0].float()
            return logits, self._state["heads"], self._state["residual"]
        finally:
            self._state = None

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], config: Any, max_tokens: int,
                 eos_token_id: int | None = None) -> "OracleResult":
        """Greedy decoding, a full forward over prompt + generated ids per step.
        ``eos_token_id`` None: never stops early (like ``ignore_eos``)."""
        cfg = self.parse(config)
        P = len(prompt_ids)
        ids = list(prompt_ids)
        gen: list[int] = []
        lps: list[float] = []
        margins: list[float] = []
        for _ in range(max_tokens):
            logits, _, _ = self.forward(ids, P, cfg)
            last = logits[-1]
            lp = torch.log_softmax(last, dim=-1)
            top = torch.topk(last.double(), 2)
            tok = int(top.indices[0])
            gen.append(tok)
            lps.append(float(lp[tok]))
            margins.append(float(top.values[0] - top.values[1]))
            ids.append(tok)
            if eos_token_id is not None and tok == eos_token_id:
                break
        captures = None
        if cfg.cap_positions is not None:
            fed = ids[:-1]  # the final sampled token is never fed back
            _, heads, residual = self.forward(fed, P, cfg, capture=True)
            n = len(fed)
            rows = {"last": [P - 1], "all": list(range(n)), "generated": list(range(P, n))}[cfg.cap_positions]
            idx = torch.tensor(rows, dtype=torch.long)
            captures = {
                "heads": {l: heads[l][idx] for l in cfg.cap_heads},
                "residual": {l: residual[l][idx] for l in cfg.cap_residual},
                "positions": rows,
            }
        return OracleResult(gen, lps, margins, captures, P)


@dataclass
class OracleResult:
    token_ids: list[int]
    logprobs: list[float]  # chosen-token logprob per step
    margins: list[float]  # top-1 minus top-2 logit per step
    captures: dict | None  # {"heads": {l: [R, H, D]}, "residual": {l: [R, d]}, "positions": [...]}
    prompt_len: int
