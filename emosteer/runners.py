"""One small interface over the two backends, for extraction and attribution.

A runner takes token-id prompts and one SteerSpec per prompt, and returns captures,
logits at chosen positions, or generated narratives. ``HFRunner`` drives
``emosteer.hf.HFSteerer`` in left-padded batches; ``VLLMRunner`` sends every row as one
request to ``emosteer.LLM`` (a whole sweep is one ``generate`` call) and, since vLLM
returns no full-vocabulary logits, gets them from the captured last-layer residual
through the model's own final norm and LM head (the same weights, read from the folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from emosteer.bank import ModelInfo, VectorBank
from emosteer.spec import SteerSpec

__all__ = ["HFRunner", "VLLMRunner", "make_runner", "format_prompts", "Positions"]

# Per row: "last" (the last prompt token) or explicit 0-based token positions.
Positions = str | Sequence[Sequence[int]]


def format_prompts(tokenizer, texts: Sequence[str], chat: bool = True,
                   system: str | None = None) -> list[str]:
    """Apply the tokenizer's chat template (a user turn + generation prompt) to each text."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return list(texts)
    out = []
    for t in texts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": t}]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def _merge_bank(bank: VectorBank | None, other: VectorBank | None, info: ModelInfo) -> VectorBank:
    if bank is None:
        bank = VectorBank(info)
    if other is not None and other is not bank:
        bank.update(other)
    return bank


def _batches(n: int, size: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    starts = range(0, n, size)
    return tqdm(starts, desc=desc, disable=not progress or len(starts) <= 1, leave=False)


class HFRunner:
    """Backend "hf": a transformers model driven by HFSteerer, ``batch_size`` rows at a time."""

    backend = "hf"

    def __init__(self, model, tokenizer, bank: VectorBank | None = None, batch_size: int = 16,
                 progress: bool = True):
        from emosteer.hf import HFSteerer

        self.steerer = HFSteerer(model, None, tokenizer)
        self.model, self.tokenizer = model, tokenizer
        self.info = self.steerer.info
        self.bank = _merge_bank(None, bank, self.info)
        self.steerer.bank = self.bank
        self.batch_size, self.progress = batch_size, progress
        self.name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)

    def register(self, bank: VectorBank) -> None:
        self.bank.update(bank)

    def encode(self, texts: Sequence[str], chat: bool = True) -> list[list[int]]:
        prompts = format_prompts(self.tokenizer, texts, chat)
        return [self.tokenizer(p, add_special_tokens=not chat)["input_ids"] for p in prompts]

    def _pad(self, rows: Sequence[Sequence[int]]):
        T = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, T - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, T - len(r):] = 1
        return ids.to(self.steerer.device), mask.to(self.steerer.device)

    def forward(self, ids: Sequence[Sequence[int]], specs: Sequence[SteerSpec | dict | None],
                positions: Positions = "last", desc: str = "forward"):
        """``(logits, captures)``: per row, float32 logits ``[len(positions), V]`` (``[V]``
        for "last") and the capture dict (or None)."""
        logits, caps = [], []
        for s in _batches(len(ids), self.batch_size, self.progress, desc):
            rows = ids[s:s + self.batch_size]
            x, mask = self._pad(rows)
            lg, cp = self.steerer.run(x, mask, list(specs[s:s + self.batch_size]),
                                      logits="last" if positions == "last" else "all")
            caps.extend(cp)
            for i, r in enumerate(rows):
                if positions == "last":
                    logits.append(lg[i].float())
                else:
                    off = x.shape[1] - len(r)
                    pos = torch.as_tensor(list(positions[s + i]), dtype=torch.long) + off
                    logits.append(lg[i, pos.to(lg.device)].float())
        return logits, caps

    def forward_grad(self, ids, specs, keep: dict[str, Sequence[int]]):
        """One differentiable batch (no chunking): ``(logits [B,T,V], acts, pad_offsets)``."""
        x, mask = self._pad(ids)
        lg, _, acts = self.steerer.run_grad(x, mask, list(specs), keep=keep, logits="all")
        offs = [x.shape[1] - len(r) for r in ids]
        return lg, acts, offs

    def generate(self, ids: Sequence[Sequence[int]], specs, max_new_tokens: int = 48,
                 temperature: float = 0.0, seed: int | None = 0, desc: str = "generate"):
        """``(token_ids, texts, captures)`` per row."""
        toks, texts, caps = [], [], []
        for s in _batches(len(ids), self.batch_size, self.progress, desc):
            x, mask = self._pad(ids[s:s + self.batch_size])
            out = self.steerer.generate(x, mask, list(specs[s:s + self.batch_size]),
                                        max_new_tokens=max_new_tokens, temperature=temperature,
                                        seed=seed)
            toks.extend(out.token_ids)
            texts.extend(out.texts)
            caps.extend(out.captures)
        return toks, texts, caps


class _LMHead:
    """Final RMSNorm + LM head of a Llama-like model folder, for logits from captures."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        want = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    if k.endswith("norm.weight") and "layers." not in k and "vision" not in k:
                        want["norm"] = st.get_tensor(k)
                    elif k.endswith("lm_head.weight"):
                        want["head"] = st.get_tensor(k)
                    elif k.endswith("embed_tokens.weight") and "head" not in want:
                        want["embed"] = st.get_tensor(k)
        self.norm = want["norm"].float()
        self.head = want.get("head", want.get("embed")).float()

    def __call__(self, resid: torch.Tensor) -> torch.Tensor:
        h = resid.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.norm) @ self.head.T


class VLLMRunner:
    """Backend "vllm": one request per row through ``emosteer.LLM``."""

    backend = "vllm"

    def __init__(self, llm, tokenizer=None, bank: VectorBank | None = None, progress: bool = True,
                 model_path: str | os.PathLike | None = None):
        from transformers import AutoConfig, AutoTokenizer

        self.llm = llm
        path = model_path or llm.llm.llm_engine.model_config.model
        self.path = Path(path)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(path))
        self.info = ModelInfo.from_hf_config(AutoConfig.from_pretrained(str(path)))
        self.bank = _merge_bank(None, bank, self.info)
        llm.register_vectors(self.bank)
        self.progress, self.name = progress, str(path)
        self._head: _LMHead | None = None
        self.model = None

    def register(self, bank: VectorBank) -> None:
        self.bank.update(bank)
        self.llm.register_vectors(self.bank)

    def encode(self, texts: Sequence[str], chat: bool = True) -> list[list[int]]:
        prompts = format_prompts(self.tokenizer, texts, chat)
        return [self.tokenizer(p, add_special_tokens=not chat)["input_ids"] for p in prompts]

    def _generate(self, ids, specs, params):
        prompts = [{"prompt_token_ids": list(r)} for r in ids]
        return self.llm.generate(prompts, params, steer=[SteerSpec.parse(s) for s in specs],
                                 use_tqdm=self.progress)

    @staticmethod
    def _with_capture(spec, layer: int, positions: str) -> SteerSpec:
        from dataclasses import replace

        from emosteer.spec import CaptureItem

        spec = SteerSpec.parse(spec)
        cap = spec.capture
        if cap is not None and cap.residual == "all":
            res = "all"
        else:
            res = tuple(sorted(set(cap.residual or ()) | {layer})) if cap else (layer,)
        heads = cap.heads if cap is not None else None
        if cap is not None and cap.positions != positions:
            raise ValueError("forward() with captures needs the same capture positions")
        return replace(spec, capture=CaptureItem(heads, res, positions))

    def forward(self, ids, specs, positions: Positions = "last", desc: str = "forward"):
        from vllm import SamplingParams

        if self._head is None:
            self._head = _LMHead(self.path)
        last = self.info.num_layers - 1
        mode = "last" if positions == "last" else "all"
        specs2 = [self._with_capture(s, last, mode) for s in specs]
        outs = self._generate(ids, specs2, SamplingParams(max_tokens=1, temperature=0.0))
        logits, caps = [], []
        for i, (o, s) in enumerate(zip(outs, specs)):
            c = o.emosteer_captures
            resid = c["residual"][last]
            if positions == "last":
                logits.append(self._head(resid[-1]))
            else:
                where = {p: k for k, p in enumerate(c["positions"])}
                logits.append(self._head(resid[[where[p] for p in positions[i]]]))
            user = SteerSpec.parse(s).capture
            caps.append(c if user is not None else None)
        return logits, caps

    def generate(self, ids, specs, max_new_tokens: int = 48, temperature: float = 0.0,
                 seed: int | None = 0, desc: str = "generate"):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed)
        outs = self._generate(ids, specs, params)
        toks = [list(o.outputs[0].token_ids) for o in outs]
        texts = [o.outputs[0].text for o in outs]
        caps = [getattr(o, "emosteer_captures", None) for o in outs]
        return toks, texts, caps


def make_runner(model: Any = "default", backend: str = "hf", tokenizer=None,
                bank: VectorBank | None = None, batch_size: int = 16, progress: bool = True,
                **engine_kwargs):
    """A runner for ``backend`` ("hf" | "vllm"). ``model`` is a runner (returned as is), an
    HFSteerer / transformers model (with ``tokenizer``), an ``emosteer.LLM``, or a model
    name/folder ("default" = SmolLM2-135M-Instruct) loaded for the backend."""
    if isinstance(model, (HFRunner, VLLMRunner)):
        if bank is not None:
            model.register(bank)
        return model
    if backend == "hf":
        from emosteer.hf import HFSteerer, load_hf_model

        if isinstance(model, HFSteerer):
            tokenizer = tokenizer or model.tokenizer
            bank = bank if bank is not None else model.bank
            model = model.model
        elif isinstance(model, (str, os.PathLike)):
            model, tok = load_hf_model(model)
            tokenizer = tokenizer or tok
        if tokenizer is None:
            raise ValueError("backend 'hf' with a model object needs its tokenizer")
        return HFRunner(model, tokenizer, bank, batch_size=batch_size, progress=progress)
    if backend == "vllm":
        import emosteer

        if isinstance(model, (str, os.PathLike)):
            from emosteer.models import resolve_model

            path = resolve_model(model)
            engine_kwargs.setdefault("dtype", "float32")
            model = emosteer.LLM(str(path), bank=bank, **engine_kwargs)
        return VLLMRunner(model, tokenizer, bank, progress=progress)
    raise ValueError(f"backend must be 'hf' or 'vllm', got {backend!r}")
