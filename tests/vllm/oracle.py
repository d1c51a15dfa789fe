"""An independent reference for emosteer's request configs: plain transformers + hooks.

Written from the documented semantics only (README "The request config", docs/DESIGN.md
§3-4, docs/steer.schema.json). It shares no code with the engine or with emosteer's own
transformers backend: it imports nothing from ``emosteer.request.spec``, ``emosteer.request.compile``,
``emosteer.hf`` or ``emosteer.vllm``, parses the config JSON itself, and reads bank
vectors straight from the safetensors file (or from a ``VectorBank``'s tensors).

Semantics implemented (``P`` = prompt length, token ``t`` is a prompt token iff t < P):

- ``steer[i]`` acts on the output of decoder layer ``l`` (the residual that leaves the
  layer: what the next layer's input norm, or the final norm, reads) at the item's
  positions. With ``h`` that output as it enters the layer's steering (every item of a
  layer reads this same ``h``; ``h_new = h + sum of the items' deltas``), ``v =
  vector[l]`` and ``u = v / |v|``, by ``mode`` (default "add") and ``scale_mode``
  (default "absolute"): add ``scale * v`` / relative ``scale * |h| * u``; clamp
  ``(value - h.u) * u`` / relative ``(scale * |h| - h.u) * u``; project_out (``vector``
  one name or a list) ``-(h Q^T) Q`` with ``Q`` an orthonormal basis of the span of the
  vectors at ``l`` (from an SVD with a rank check, float64).
- ``when`` (probe gate): ``p_t = w . h_t + b`` with ``w = probe[g, :d]``, ``b = probe[g, d]``
  and ``h_t`` the output of layer ``g`` after its steering. It holds where ``p_t > above``
  (``p_t < below``); the gate is open at ``t`` where it holds, or with ``latch`` where it held
  at some ``t' <= t``. Only tokens some item acts on (the union of every steer, heads
  and neurons item's positions) are scored, and only they count for the latch. The
  interventions of layers ``> g`` act only where the gate is open; those of layers
  ``<= g`` are not gated.
- ``heads[i]`` on the attention output before ``o_proj``, viewed ``[T, H, D]``, at the
  item's positions: add ``z += scale * v[l, h]`` (``scale_mode`` "relative":
  ``z += scale * |z| * v[l, h] / |v[l, h]|``, each token and head its own norm), patch
  ``z = v[l, h]``, ablate ``z = 0``, scale ``z *= scale``. A "head_positions" vector ``[N, L, H, D]`` (one head vector per
  listed position; the item lists N prompt positions) gives the token at the k-th
  listed position, in ascending order, ``v = vector[k, l, h]``.
- ``neurons``: the MLP activation ``act(gate) * up`` (``down_proj``'s input) times
  ``gamma`` where ``mask[l, i] == 1``, at its positions.
- positions: "all", "prompt" (t < P), "generated" (t >= P), "last" (t == P - 1) or a
  list of prompt indices.
- ``capture``: heads = ``o_proj``'s input before the head interventions, residual = the
  layer output after the steering; probe = the gate's score ``p_t`` (NaN where not
  scored); rows at "last" ([P - 1]), "all" (every fed token: prompt and generated except
  the final sampled one) or "generated".
- ``boost`` (VEE) is not implemented: it needs images; nor are inline steer vectors.

Greedy generation recomputes the whole sequence at every step (no KV cache), so nothing
is shared with an incremental engine: a step's logits depend only on the token ids and the
config, applied by absolute position.
"""

from __future__ import annotations

import json
import math
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


GATE_TIE = 1e-4  # |score - threshold| below which the gate's decision is not compared
RANK_RTOL = 1e-6  # singular values below this times the largest add no rank to a span


def _unit(v: torch.Tensor, what: str) -> torch.Tensor:
    v = v.double()
    n = float(v.norm())
    if not n > 0:
        raise OracleConfigError(f"{what}: zero vector, no direction")
    return v / n


def span_basis(vecs: list[torch.Tensor]) -> torch.Tensor:
    """[r, d] float64 orthonormal rows spanning ``vecs`` (r = their numerical rank): the
    left singular vectors whose singular value is above RANK_RTOL times the largest (the
    projection onto the span does not depend on which basis)."""
    V = torch.stack([v.double().flatten() for v in vecs], 1)  # [d, k]
    U, S, _ = torch.linalg.svd(V, full_matrices=False)
    keep = S > RANK_RTOL * float(S.max())
    return U[:, keep].T.contiguous()


@dataclass
class _Gate:
    layer: int
    w: torch.Tensor  # [d] float64
    b: float
    threshold: float
    below: bool
    latch: bool


@dataclass
class _Parsed:
    # layer -> [(mode, arg, coef, relative, positions)]: mode "add" (arg v [d], coef
    # scale), "clamp" (arg u [d] unit, coef value or relative scale), "project_out" (arg
    # Q [r, d] orthonormal rows); all float64
    steer: dict[int, list[tuple[str, torch.Tensor, float, bool, Any]]] = field(default_factory=dict)
    # layer -> [(head, mode, vector [D] | None, scale, positions)]
    heads: dict[int, list[tuple[int, str, torch.Tensor | None, float, Any]]] = field(default_factory=dict)
    # layer -> (mask [I] bool, gamma, positions)
    neurons: dict[int, tuple[torch.Tensor, float, Any]] = field(default_factory=dict)
    cap_heads: list[int] = field(default_factory=list)
    cap_residual: list[int] = field(default_factory=list)
    cap_positions: str | None = None
    cap_probe: bool = False
    gate: _Gate | None = None
    acted: list = field(default_factory=list)  # every item's positions (the gate scores their union)


class Oracle:
    """``Oracle(model_dir, bank)``: ``bank`` is a path to a bank safetensors file, a dict
    name -> tensor, or an object with ``.get(name)`` (a ``VectorBank``)."""

    last_score: torch.Tensor | None = None  # of the latest forward
    last_open: torch.Tensor | None = None

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
        unknown = set(config) - {"steer", "heads", "neurons", "capture", "boost", "when"}
        if unknown:
            raise OracleConfigError(f"unknown keys {sorted(unknown)}")
        if "boost" in config:
            raise OracleConfigError("boost (VEE) is not implemented by the oracle")
        out = _Parsed()
        for i, it in enumerate(config.get("steer", [])):
            mode = it.get("mode", "add")
            rel = it.get("scale_mode", "absolute")
            if mode not in ("add", "clamp", "project_out") or rel not in ("absolute", "relative"):
                raise OracleConfigError(f"steer[{i}]: mode {mode!r}, scale_mode {rel!r}")
            rel = rel == "relative"
            names = it["vector"] if isinstance(it["vector"], list) else [it["vector"]]
            if not all(isinstance(n, str) for n in names):
                raise OracleConfigError(f"steer[{i}].vector: inline vectors are not implemented by the oracle")
            if len(names) != 1 and mode != "project_out":
                raise OracleConfigError(f"steer[{i}].vector: a list needs mode project_out")
            vecs = [self.vector(n) for n in names]
            for vec in vecs:
                if tuple(vec.shape) != (self.L, self.d):
                    raise OracleConfigError(f"steer[{i}].vector: shape {tuple(vec.shape)}")
            if mode == "clamp" and not rel:
                coef = float(it["value"])
            elif mode == "project_out":
                coef = 0.0
            else:
                coef = float(it["scale"])
            pos = it.get("positions", "all")
            out.acted.append(pos)
            for l in _layers(it["layers"], self.L, f"steer[{i}].layers"):
                if mode == "project_out":
                    arg = span_basis([v[l] for v in vecs])
                elif mode == "clamp" or rel:
                    arg = _unit(vecs[0][l], f"steer[{i}] layer {l}")
                else:
                    arg = vecs[0][l].double()
                out.steer.setdefault(l, []).append((mode, arg, coef, rel, pos))
        for i, it in enumerate(config.get("heads", [])):
            l = int(it["layer"])
            if not 0 <= l < self.L:
                raise OracleConfigError(f"heads[{i}].layer out of range")
            heads = it["head"] if isinstance(it["head"], list) else [it["head"]]
            mode = it["mode"]
            pos = it.get("positions", "all")
            if mode in ("add", "patch"):
                vec = self.vector(it["vector"])
                if vec.dim() == 4:  # one vector per listed position, in ascending order
                    if not isinstance(pos, list) or vec.shape[0] != len(pos) or \
                            tuple(vec.shape[1:]) != (self.L, self.H, self.D):
                        raise OracleConfigError(f"heads[{i}].vector: per-position shape {tuple(vec.shape)} "
                                                f"for positions {pos!r}")
                    vec = vec.transpose(0, 1)  # [L, N, H, D]: vec[l, :, h] is [N, D]
                elif tuple(vec.shape) != (self.L, self.H, self.D):
                    raise OracleConfigError(f"heads[{i}].vector: shape {tuple(vec.shape)}")
            elif mode in ("ablate", "scale"):
                vec = None
            else:
                raise OracleConfigError(f"heads[{i}].mode {mode!r}")
            scale = float(it.get("scale", 1.0))
            rel = it.get("scale_mode", "absolute")
            if rel not in ("absolute", "relative") or (rel == "relative" and mode != "add"):
                raise OracleConfigError(f"heads[{i}].scale_mode {rel!r} for mode {mode!r}")
            if rel == "relative":
                if vec.dim() != 3:
                    raise OracleConfigError(f"heads[{i}]: a relative add of a per-position vector")
                mode = "add_relative"
            out.acted.append(pos)
            for h in heads:
                h = int(h)
                if not 0 <= h < self.H:
                    raise OracleConfigError(f"heads[{i}].head out of range")
                out.heads.setdefault(l, []).append(
                    (h, mode, None if vec is None else (vec[l, :, h] if vec.dim() == 4 else vec[l, h]), scale, pos))
        if "neurons" in config:
            n = config["neurons"]
            mask = self.vector(n["set"])
            if tuple(mask.shape) != (self.L, self.I):
                raise OracleConfigError(f"neurons.set: shape {tuple(mask.shape)}")
            gamma = float(n["gamma"])
            pos = n.get("positions", "all")
            out.acted.append(pos)
            for l in range(self.L):
                out.neurons[l] = (mask[l] != 0, gamma, pos)
        cap = config.get("capture")
        if cap is not None:
            if "heads" in cap:
                out.cap_heads = _layers(cap["heads"], self.L, "capture.heads")
            if "residual" in cap:
                out.cap_residual = _layers(cap["residual"], self.L, "capture.residual")
            out.cap_probe = bool(cap.get("probe", False))
            out.cap_positions = cap.get("positions", "last")
            if out.cap_positions not in ("last", "all", "generated"):
                raise OracleConfigError(f"capture.positions {out.cap_positions!r}")
        if "when" in config:
            g = config["when"]
            if ("above" in g) == ("below" in g):
                raise OracleConfigError("when: give exactly one of above / below")
            layer = int(g["layer"])
            if not 0 <= layer < self.L:
                raise OracleConfigError("when.layer out of range")
            probe = self.vector(g["probe"])
            if tuple(probe.shape) != (self.L, self.d + 1):
                raise OracleConfigError(f"when.probe: shape {tuple(probe.shape)}")
            below = "below" in g
            out.gate = _Gate(layer, probe[layer, : self.d].double(), float(probe[layer, self.d]),
                             float(g["below" if below else "above"]), below, bool(g.get("latch", False)))
        elif out.cap_probe:
            raise OracleConfigError("capture.probe needs when")
        return out

    # -- hooks (act only while self._state is set) --------------------------------------
    def _mask(self, st: dict, pos: Any, l: int, T: int) -> torch.Tensor:
        """Tokens an item at layer ``l`` with ``pos`` acts on: its positions, and the open
        gate where ``l`` is after the gate's layer."""
        m = position_mask(pos, st["P"], T)
        g = st["cfg"].gate
        if g is not None and l > g.layer:
            m = m & st["open"][:T]
        return m

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
                m = self._mask(st, pos, l, T)
                if vec is not None and vec.dim() == 2:  # [N, D]: the token's own vector
                    row = {p: k for k, p in enumerate(sorted(pos))}
                    toks = [t for t in range(T) if bool(m[t])]
                    vec = vec[[row[t] for t in toks]] if toks else vec[:0]  # [n, D], token order
                if mode == "add":
                    z[m, h] = z[m, h] + scale * vec
                elif mode == "add_relative":
                    zz = z[m, h].double()
                    u = vec.double() / vec.double().norm()
                    z[m, h] = (zz + scale * zz.norm(dim=-1, keepdim=True) * u).to(z.dtype)
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
            m = self._mask(st, pos, l, T)
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
            T = h.shape[1]
            if items:
                x = h[0].double()  # the residual entering this layer's steering
                norm = x.norm(dim=1)  # [T]
                delta = torch.zeros_like(x)
                for mode, arg, coef, rel, pos in items:
                    m = self._mask(st, pos, l, T)
                    if mode == "add":
                        if rel:
                            delta[m] += (coef * norm[m]).unsqueeze(1) * arg
                        else:
                            delta[m] += coef * arg
                    elif mode == "clamp":
                        target = coef * norm[m] if rel else torch.full_like(norm[m], coef)
                        delta[m] += (target - x[m] @ arg).unsqueeze(1) * arg
                    else:  # project_out: arg = Q [r, d]
                        delta[m] -= (x[m] @ arg.T) @ arg
                h = (x + delta).to(h.dtype).unsqueeze(0)
            g = st["cfg"].gate
            if g is not None and l == g.layer:
                p = h[0].double() @ g.w + g.b  # [T]
                scored = torch.zeros(T, dtype=torch.bool)
                for pos in st["cfg"].acted:
                    scored |= position_mask(pos, st["P"], T)
                hold = (p < g.threshold) if g.below else (p > g.threshold)
                hold &= scored
                st["open"] = torch.cummax(hold.int(), 0).values.bool() if g.latch else hold
                st["score"] = torch.where(scored, p, torch.full_like(p, math.nan))
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
            self.last_score = self._state.get("score")  # [T] float64 probe scores (NaN: not scored)
            self.last_open = self._state.get("open")  # [T] bool: the gate is open (None: no gate)
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
        score = opened = None  # of the last step: every fed position
        for _ in range(max_tokens):
            logits, _, _ = self.forward(ids, P, cfg)
            score, opened = self.last_score, self.last_open
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
                "probe": {cfg.gate.layer: self.last_score[idx].float()} if cfg.cap_probe else {},
                "positions": rows,
            }
        # The first scored position whose probe score is within GATE_TIE of the threshold:
        # an engine computing it in another order may open the gate where we do not.
        gate_tie = None
        if cfg.gate is not None and score is not None:
            near = (score - cfg.gate.threshold).abs() < GATE_TIE  # NaN (not scored): False
            hits = torch.nonzero(near).flatten()
            gate_tie = int(hits[0]) if hits.numel() else None
        gate_open = None if opened is None else [bool(x) for x in opened]
        scores = None if score is None else [float(x) for x in score]
        return OracleResult(gen, lps, margins, captures, P, gate_tie, gate_open, scores)


@dataclass
class OracleResult:
    token_ids: list[int]
    logprobs: list[float]  # chosen-token logprob per step
    margins: list[float]  # top-1 minus top-2 logit per step
    captures: dict | None  # {"heads": {l: [R, H, D]}, "residual": {l: [R, d]}, "probe": {l: [R]}, "positions": [...]}
    prompt_len: int
    gate_tie: int | None = None  # first position whose gate score is a near-tie (see GATE_TIE)
    gate_open: list[bool] | None = None  # per fed position: the gate is open there (None: no gate)
    gate_scores: list[float] | None = None  # per fed position: the probe score (NaN: not scored)
