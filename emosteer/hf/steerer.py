"""HFSteerer: the emosteer interventions and captures on a plain transformers model.

The reference backend. It runs the same operators as the vLLM plugin (``emosteer.ops``
with ``impl="torch"``, one slot per batch row and phase, a per-token ``token_slot``) at
the same places:

- head affine + capture on the input of each layer's ``o_proj`` (forward pre-hook),
- residual add on the output of decoder layer l (forward hook; "residual at layer l"),
- neuron gain on the input of ``down_proj`` (forward pre-hook),
- VEE and attention-to-image captures inside the decoder's attention (emosteer's eager
  attention function, ``emosteer/hf/attention.py``, switched in only for batches that
  use them).

Captures come back per row in the vLLM path's layout: ``{"heads": {l: [P, H, D]},
"residual": {l: [P, d]}, "attn_image": {l: [P, H, images]}, "positions": [p0, p1, ...]}``. Head outputs are captured
before the head intervention (the op's contract); the residual after the steering add
(the stream the next layer reads). Positions count the row's real tokens from 0 (padding
excluded): "last" is the last prompt token, "generated" the tokens fed back during
decoding (the final sampled token is never fed, as in vLLM), "all" both.

``run_grad`` keeps the autograd graph and returns the post-intervention activations
(with ``retain_grad``) for attribution patching.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from emosteer import ops
from emosteer.request.bank import VectorBank
from emosteer.hf import attention as vee
from emosteer.hf.layers import DecoderHandles, find_decoder
from emosteer.hf.plan import Plan
from emosteer.hf.step import Step, collect, finish, prompt_positions
from emosteer.models.chat import format_prompts
from emosteer.ops import reference
from emosteer.request.spec import SteerSpec
from emosteer.request.step import CAPTURE_KINDS

SpecLike = SteerSpec | dict | str | None

__all__ = ["HFSteerer", "GenerateOutput"]


_ON = torch.ones(1, dtype=torch.int32)  # the ops' per-layer flag: always on here


def _own_rows(n: int, device) -> torch.Tensor:
    """Row ids 0..n-1: the plan's dense tables are a pool whose row s is slot s's."""
    return torch.arange(n, dtype=torch.int32, device=device)


@dataclass
class GenerateOutput:
    token_ids: list[list[int]]  # generated ids per row (EOS included when produced)
    texts: list[str] | None  # decoded (special tokens skipped) when a tokenizer is known
    captures: list[dict | None]  # per row, vLLM layout; None where the row captures nothing
    prompt_lens: list[int]


def _uses_mrope(config) -> bool:
    """Multimodal rotary positions (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): 3-d position ids."""
    text = getattr(config, "text_config", None) or config
    for key in ("rope_scaling", "rope_parameters"):
        rope = getattr(text, key, None) or getattr(config, key, None)
        if isinstance(rope, dict) and ("mrope_section" in rope or rope.get("type") == "mrope"):
            return True
    return False


class HFSteerer:
    """Apply one SteerSpec per batch row to a transformers model.

    ``bank``: a VectorBank, a path to one, or None (captures only). ``tokenizer`` is
    optional (``encode`` and decoded texts need it). Usable as a context manager, which
    keeps the hooks installed across calls; otherwise each call installs and removes them.
    """

    def __init__(self, model, bank: VectorBank | str | os.PathLike | None = None, tokenizer=None):
        self.model = model
        self.dec: DecoderHandles = find_decoder(model)
        self.info = self.dec.info
        if bank is not None and not isinstance(bank, VectorBank):
            bank = VectorBank.load(bank)
        if bank is not None:
            bank.validate_against(self.info, check_architecture=False)
        self.bank = bank
        self.tokenizer = tokenizer
        self._handles: list[Any] = []
        self._step: Step | None = None
        self._depth = 0
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self._mrope = _uses_mrope(model.config)
        self._image_ids = vee.image_token_ids(model.config)

    # -------------------------------------------------------------- hook management
    def __enter__(self) -> "HFSteerer":
        self._install()
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._remove()

    def close(self) -> None:
        self._depth = 0
        self._remove()

    def _install(self) -> None:
        if self._handles:
            return
        for l in range(self.dec.num_layers):
            self._handles.append(self.dec.o_proj[l].register_forward_pre_hook(self._hook_heads(l)))
            self._handles.append(self.dec.down_proj[l].register_forward_pre_hook(self._hook_mlp(l)))
            self._handles.append(self.dec.layers[l].register_forward_hook(self._hook_residual(l)))
            reader = self.dec.readers[l] if self.dec.readers else None
            if reader is not None:
                self._handles.append(reader.register_forward_pre_hook(self._hook_residual_capture(l),
                                                                      with_kwargs=True))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def _vee(self, plan: Plan):
        """While ``plan`` boosts or captures attention to images: the decoder's attention
        runs ``emosteer/hf/attention.py`` (the language model's config only)."""
        if not plan.vee:
            yield
            return
        vee.register()
        cfg = self.dec.layers[0].self_attn.config
        old = cfg._attn_implementation
        cfg._attn_implementation = vee.NAME
        try:
            yield
        finally:
            cfg._attn_implementation = old

    def _mrope_next(self, full_mask: torch.Tensor) -> torch.Tensor:
        """[3, B, 1] multimodal rotary positions of the token fed at a decode step: its
        index among the row's real tokens plus the row's rope delta, which the model
        stored at prefill (images take fewer positions than tokens)."""
        B = full_mask.shape[0]
        n = full_mask.long().sum(1) - 1
        deltas = next((m.rope_deltas for m in self.model.modules()
                       if getattr(m, "rope_deltas", None) is not None), None)
        if deltas is not None:
            n = n + deltas.reshape(-1).to(n.device).repeat_interleave(B // deltas.numel())
        return n.view(1, B, 1).expand(3, B, 1)

    def _spans(self, input_ids: torch.Tensor) -> torch.Tensor:
        return vee.key_spans(input_ids, self._image_ids)

    @contextlib.contextmanager
    def _hooks(self):
        self._install()
        try:
            yield
        finally:
            if self._depth == 0:
                self._remove()

    # ------------------------------------------------------------------------ hooks
    def _hook_heads(self, l: int):
        H, D = self.info.num_heads, self.info.head_dim

        def hook(module, args):
            st = self._step
            if st is None:
                return None
            lp = st.plan.layers[l]
            slot, capm = st.slot(lp.head_on), st.cap_mask("heads", l)
            keep = l in st.keep.get("heads", ())
            if slot is None and capm is None and not keep:
                return None
            x = args[0]
            z = x.reshape(-1, H, D)
            if st.grad or not z.is_contiguous() or z.data_ptr() != x.data_ptr():
                z = z.clone()
            n = int(capm.sum()) if capm is not None else 0
            cap_index = torch.full((z.shape[0],), -1, dtype=torch.int32, device=z.device)
            if capm is not None:
                cap_index[capm] = torch.arange(n, dtype=torch.int32, device=z.device)
            cap_buf = torch.empty(max(n, 1), H, D, dtype=z.dtype, device=z.device)
            if slot is None:  # capture only: no slot acts on this layer
                slot = torch.full_like(cap_index, -1)
                a = torch.ones(1, H, dtype=torch.float32, device=z.device)
                b = torch.zeros_like(a)
                c = b
                vrow = torch.full((1, H), -1, dtype=torch.int32, device=z.device)
                v = torch.zeros(1, H, D, dtype=z.dtype, device=z.device)
            else:
                a, b, c, v, vrow = lp.head_a, lp.head_b, lp.head_c, lp.head_v, lp.head_row
            hargs = (z, slot, a, b, c, vrow, st.row_off, v, cap_index, cap_buf, _ON.to(z.device))
            if st.grad:
                reference.head_affine_capture(*hargs)
            else:
                ops.head_affine_capture(*hargs, impl="torch")
            if capm is not None:
                st.caps["heads"][l] = cap_buf[:n].detach().clone()
            if keep:
                z4 = z.view(st.B, st.T, H, D)
                z4.retain_grad()
                st.acts["heads"][l] = z4
                return (z4.reshape(x.shape),) + tuple(args[1:])
            if z.data_ptr() != x.data_ptr():
                return (z.view(x.shape),) + tuple(args[1:])
            return None  # mutated in place

        return hook

    def _hook_mlp(self, l: int):
        def hook(module, args):
            st = self._step
            if st is None:
                return None
            lp = st.plan.layers[l]
            slot = st.slot(lp.gain_on)
            keep = l in st.keep.get("mlp", ())
            if slot is None and not keep:
                return None
            x = args[0]
            m = x.reshape(-1, x.shape[-1])
            if st.grad or m.data_ptr() != x.data_ptr() or not m.is_contiguous():
                m = m.clone()
            if slot is not None:
                nargs = (m, slot, lp.gain_gamma, _own_rows(lp.gain_gamma.shape[0], m.device),
                         lp.gain_mask, _ON.to(m.device))
                if st.grad:
                    reference.neuron_gain(*nargs)
                else:
                    ops.neuron_gain(*nargs, impl="torch")
            if keep:
                m3 = m.view(st.B, st.T, -1)
                m3.retain_grad()
                st.acts["mlp"][l] = m3
                return (m3,) + tuple(args[1:])
            if m.data_ptr() != x.data_ptr():
                return (m.view(x.shape),) + tuple(args[1:])
            return None

        return hook

    def _hook_residual(self, l: int):
        def hook(module, args, output):
            st = self._step
            if st is None:
                return None
            lp = st.plan.layers[l]
            slot, capm = st.slot(lp.res_on), st.cap_mask("residual", l)
            keep = l in st.keep.get("residual", ())
            gate = lp.gate_row is not None and not self._reads(l)
            if slot is None and capm is None and not keep and not gate:
                return None
            h = output[0] if isinstance(output, tuple) else output
            r = h.reshape(-1, h.shape[-1])
            if st.grad or r.data_ptr() != h.data_ptr() or not r.is_contiguous():
                r = r.clone()
            if slot is not None:
                rargs = (r, torch.zeros_like(r), slot, lp.res_coef, lp.res_mode, lp.res_row, lp.res_u, _ON.to(r.device))
                if st.grad:
                    reference.residual_steer(*rargs)
                else:
                    ops.residual_steer(*rargs, impl="torch")
            if capm is not None and not self._reads(l):
                st.caps["residual"][l] = r[capm].detach().clone()
            if gate:
                self._gate(st, l, r)
            new = r.view(h.shape)
            if keep:
                new.retain_grad()
                st.acts["residual"][l] = new
            if new.data_ptr() == h.data_ptr() and not keep:
                return None
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        return hook

    def _reads(self, l: int) -> bool:
        """Whether layer l's residual is captured where the next module reads it."""
        return bool(self.dec.readers) and self.dec.readers[l] is not None

    def _hook_residual_capture(self, l: int):
        """Capture of layer l's residual at the input of what reads it (layer l+1 or the
        final norm): after this request's steering, and after anything the model adds
        between layers (Qwen3-VL's deepstack features), like the vLLM path."""

        def hook(module, args, kwargs):
            st = self._step
            if st is None:
                return None
            capm = st.cap_mask("residual", l)
            gate = st.plan.layers[l].gate_row is not None
            if capm is None and not gate:
                return None
            h = args[0] if args else kwargs.get("hidden_states")
            r = h.reshape(-1, h.shape[-1])
            if capm is not None:
                st.caps["residual"][l] = r[capm].detach().clone()
            if gate:
                self._gate(st, l, r)
            return None

        return hook

    def _gate(self, st, l: int, r: torch.Tensor) -> None:
        """The probe gates at layer l, on the residual the capture reads (as in the vLLM
        path): tokens whose gate stays closed lose their slot for the later layers, and
        captured scores go to ``st.caps["probe"][l]``."""
        plan = st.plan
        slot = st.base_slot.to(torch.int32)
        capm = st.cap_mask("probe", l)
        n = int(capm.sum()) if capm is not None else 0
        score_index = torch.full_like(slot, -1)
        if capm is not None:
            score_index[capm] = torch.arange(n, dtype=torch.int32, device=slot.device)
        scores = torch.full((max(n, 1),), float("nan"), dtype=torch.float32, device=slot.device)
        state_row = st.tok_row.to(torch.int32)
        reference.probe_gate(r.detach(), slot, plan.layers[l].gate_row, plan.probes, plan.gate_bias,
                             plan.gate_thresh, plan.gate_mode, state_row, plan.gate_state, score_index,
                             scores, _ON.to(slot.device))
        st.base_slot = slot.long()
        if capm is not None:
            st.caps["probe"][l] = scores[:n].clone()

    # -------------------------------------------------------------------- helpers
    def _specs(self, specs: SpecLike | Sequence[SpecLike], batch: int) -> list[SteerSpec]:
        if specs is None or isinstance(specs, (SteerSpec, dict, str)):
            specs = [specs] * batch
        specs = [SteerSpec.parse(s) for s in specs]
        if len(specs) != batch:
            raise ValueError(f"got {len(specs)} specs for a batch of {batch} rows (one per row)")
        return specs

    def plan(self, specs: Sequence[SpecLike], batch: int, prompt_lens: Sequence[int] | None = None) -> Plan:
        return Plan.build(self._specs(specs, batch), self.bank, self.info, self.dtype, self.device,
                          prompt_lens)

    @staticmethod
    def _lens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
        if attention_mask is None:
            return [int(input_ids.shape[1])] * int(input_ids.shape[0])
        return [int(n) for n in attention_mask.sum(1).tolist()]

    def encode(self, prompts: Sequence[str], chat: bool = True, system: str | None = None):
        """Left-padded ``(input_ids, attention_mask)``; ``chat`` applies the chat template."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("HFSteerer.encode needs a tokenizer (HFSteerer(model, bank, tokenizer))")
        texts = format_prompts(tok, list(prompts), chat, system)
        old = tok.padding_side
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
        finally:
            tok.padding_side = old
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _positions(self, mask: torch.Tensor) -> torch.Tensor | None:
        if self._mrope:
            return None  # mRoPE models (Qwen2/3-VL) compute their own (3-d) positions
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    @staticmethod
    def _last_index(mask: torch.Tensor) -> torch.Tensor:
        """Column of each row's last real token (left or right padding)."""
        T = mask.shape[1]
        cols = torch.arange(T, device=mask.device).expand_as(mask)
        return torch.where(mask.bool(), cols, torch.full_like(cols, -1)).max(dim=1).values

    # ------------------------------------------------------------------------ API
    def _forward(self, input_ids, attention_mask, plan, grad, keep, logits, model_kwargs):
        B = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.to(input_ids.device)
        st = Step(plan, prompt_positions(mask), grad, keep)
        st.key_span = self._spans(input_ids)
        store = [{k: {} for k in CAPTURE_KINDS} if c is not None else None for c in plan.captures]
        positions: list[list[int]] = [[] for _ in range(B)]
        self._step = st
        token = vee.CURRENT.set((self, st))
        try:
            with self._hooks(), self._vee(plan):
                out = self.model(input_ids=input_ids, attention_mask=mask,
                                 position_ids=self._positions(mask), use_cache=False, **model_kwargs)
        finally:
            self._step = None
            vee.CURRENT.reset(token)
        collect(st, store, positions)
        lg = out.logits
        if logits == "last":
            lg = lg[torch.arange(B, device=lg.device), self._last_index(mask)]
        elif logits != "all":
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        return lg, finish(plan, store, positions, st.key_span), st

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            specs: SpecLike | Sequence[SpecLike] = None, logits: str = "all", **model_kwargs):
        """One forward pass, spec ``specs[i]`` on row i. Returns ``(logits, captures)``:
        logits ``[B, T, V]`` (``logits="last"``: ``[B, V]`` at each row's last real token),
        captures a list (per row) of capture dicts, None where a row captures nothing."""
        plan = self.plan(specs, input_ids.shape[0], self._lens(input_ids, attention_mask))
        with torch.no_grad():
            lg, caps, _ = self._forward(input_ids, attention_mask, plan, False, None, logits,
                                        model_kwargs)
        return lg, caps

    def run_grad(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 specs: SpecLike | Sequence[SpecLike] = None,
                 keep: dict[str, Sequence[int]] | None = None, logits: str = "all",
                 **model_kwargs):
        """Like ``run`` but differentiable. ``keep = {"heads": layers, "mlp": layers,
        "residual": layers}`` names activations returned (post-intervention, as the next
        module reads them, ``retain_grad`` set): heads ``[B, T, H, D]``, mlp ``[B, T, I]``,
        residual ``[B, T, d]``. Returns ``(logits, captures, acts)``; call ``backward`` on a
        function of the logits, then read ``acts[kind][l].grad``."""
        plan = self.plan(specs, input_ids.shape[0], self._lens(input_ids, attention_mask))
        keep_sets = {k: set(v) for k, v in (keep or {}).items()}
        with torch.enable_grad(), self._activation_grads():
            lg, caps, st = self._forward(input_ids, attention_mask, plan, True, keep_sets, logits,
                                         model_kwargs)
        return lg, caps, st.acts

    @contextlib.contextmanager
    def _activation_grads(self):
        """Gradients for activations only: parameters frozen for the call (no weight
        gradients to compute or store), the input embeddings made to require grad."""
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        emb = self.model.get_input_embeddings()
        h = emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        try:
            yield
        finally:
            h.remove()
            for p, f in zip(params, flags):
                p.requires_grad_(f)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 specs: SpecLike | Sequence[SpecLike] = None, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None, **model_kwargs) -> GenerateOutput:
        """Greedy (``temperature=0``) or sampled generation with a KV cache, left-padded
        batch, one spec per row; interventions act on prompt and generated tokens by
        their ``positions``. ``model_kwargs`` (an LVLM's ``pixel_values``,
        ``image_grid_thw``, ...) go to the prefill forward: image-conditioned narratives."""
        from transformers import DynamicCache

        B = input_ids.shape[0]
        plan = self.plan(specs, B, self._lens(input_ids, attention_mask))
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).clone()
        if eos_token_id is None:
            eos_token_id = getattr(self.model.generation_config, "eos_token_id", None)
            if eos_token_id is None and self.tokenizer is not None:
                eos_token_id = self.tokenizer.eos_token_id
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        pad = pad if pad is not None else (next(iter(eos)) if eos else 0)

        store = [{k: {} for k in CAPTURE_KINDS} if c is not None else None for c in plan.captures]
        positions: list[list[int]] = [[] for _ in range(B)]
        spans = self._spans(input_ids)
        prompt_lens = [int(n) for n in mask.sum(1).tolist()]
        out_ids: list[list[int]] = [[] for _ in range(B)]
        alive = [True] * B
        cache = DynamicCache(config=self.model.config)
        pos = self._positions(mask)
        cur_ids = input_ids
        step_pos = prompt_positions(mask)  # positions of the tokens fed this step
        full_mask = mask
        for m in self.model.modules():  # a delta left by an earlier batch must not be reused
            if getattr(m, "rope_deltas", None) is not None:
                m.rope_deltas = None
        with self._hooks(), self._vee(plan):
            for t in range(max_new_tokens):
                st = Step(plan, step_pos, False, None)
                st.key_span = spans
                self._step = st
                token = vee.CURRENT.set((self, st))
                try:
                    out = self.model(input_ids=cur_ids, attention_mask=full_mask,
                                     position_ids=pos, past_key_values=cache, use_cache=True,
                                     **(model_kwargs if t == 0 else {}))
                finally:
                    self._step = None
                    vee.CURRENT.reset(token)
                collect(st, store, positions)
                logits = out.logits[:, -1].float()
                nxt = self._pick(logits, temperature, top_p, gen)
                for row in range(B):
                    if not alive[row]:
                        continue
                    tok = int(nxt[row])
                    out_ids[row].append(tok)
                    if tok in eos:
                        alive[row] = False
                if not any(alive) or t == max_new_tokens - 1:
                    break
                # decode step: feed each live row's token; finished rows feed padding
                alive_t = torch.tensor(alive, device=self.device)
                cur_ids = torch.where(alive_t, nxt.to(self.device), torch.full_like(nxt, pad)).view(B, 1)
                cur_mask = alive_t.long().view(B, 1)
                full_mask = torch.cat([full_mask, torch.ones_like(cur_mask)], dim=1)
                spans = torch.nn.functional.pad(spans, (0, 1), value=-1)
                if pos is not None:
                    pos = pos[:, -1:] + 1
                elif self._mrope:
                    pos = self._mrope_next(full_mask)
                step_pos = torch.tensor([[prompt_lens[r] + len(out_ids[r]) - 1 if alive[r] else -1]
                                         for r in range(B)], device=self.device)
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in out_ids]
        return GenerateOutput(out_ids, texts, finish(plan, store, positions, spans), prompt_lens)

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator):
        if temperature <= 0:
            return logits.argmax(-1).cpu()
        probs = torch.softmax(logits.cpu() / temperature, dim=-1)
        if top_p < 1.0:
            sp, si = probs.sort(dim=-1, descending=True)
            drop = sp.cumsum(-1) - sp > top_p
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, si, sp)
        return torch.multinomial(probs, 1, generator=gen).view(-1)

    def generate_text(self, prompts: Sequence[str], specs: SpecLike | Sequence[SpecLike] = None,
                      chat: bool = True, **kw) -> GenerateOutput:
        """``encode`` + ``generate``: narratives for a list of prompts."""
        ids, mask = self.encode(prompts, chat=chat)
        return self.generate(ids, mask, specs, **kw)
