"""One small interface over the two backends, for extraction and attribution.

A runner takes token-id prompts and one SteerSpec per prompt, and returns captures,
logits at chosen positions, or generated narratives. ``HFRunner`` drives
``emosteer.hf.HFSteerer`` in left-padded batches; ``VLLMRunner`` sends every row as one
request to ``emosteer.LLM`` (a whole sweep is one ``generate`` call) and, since vLLM
returns no full-vocabulary logits, gets them from the captured last-layer residual
through the model's own final norm and LM head (the same weights, read from the folder);
the next-token target log-mass of the attribution sweeps (``next_token_logmass``) comes
straight from the engine's log-probabilities of the target ids instead.
``make_runner`` is the one way to get a runner from a model name or folder (backend "hf",
"vllm" or "auto"); every runner says what it runs on (``note``) and stops what it started
(``close``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from emosteer.models.chat import format_image_prompt, format_prompts
from emosteer.request.bank import ModelInfo, VectorBank
from emosteer.request.spec import SteerSpec

__all__ = ["HFRunner", "VLLMRunner", "make_runner", "cpu_engine_env", "Positions",
           "MMPrompt"]

# Per row: "last" (the last prompt token) or explicit 0-based token positions.
Positions = str | Sequence[Sequence[int]]
# forward(reduce=...): (row index, its float32 logits [P, V] or [V]) -> what to keep of them.
Reduce = Callable[[int, torch.Tensor], Any]


class MMPrompt(list):
    """Token ids of one image prompt (image placeholders already expanded by the
    processor), carrying ``text`` (the formatted prompt, placeholders unexpanded),
    ``image`` (a PIL image) and ``mm`` (the processor's model inputs besides the ids:
    ``pixel_values``, ``image_grid_thw``, ...). A plain list everywhere else."""

    def __init__(self, ids, text: str, image, mm: dict):
        super().__init__(ids)
        self.text, self.image, self.mm = text, image, mm


def _load_image(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def _encode_images(processor, tokenizer, images, texts, chat: bool) -> list[MMPrompt]:
    out = []
    for image, text in zip(images, texts):
        img = _load_image(image)
        prompt = format_image_prompt(processor, tokenizer, text, chat)
        enc = processor(text=[prompt], images=[img], return_tensors="pt")
        mm = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        out.append(MMPrompt(enc["input_ids"][0].tolist(), prompt, img, mm))
    return out


def _load_processor(path):
    from transformers import AutoProcessor

    if not path:
        raise ValueError("image prompts need the model's processor: pass processor=...")
    return AutoProcessor.from_pretrained(str(path))


def _merge_bank(bank: VectorBank | None, other: VectorBank | None, info: ModelInfo) -> VectorBank:
    if bank is None:
        bank = VectorBank(info)
    if other is not None and other is not bank:
        bank.update(other)
    return bank


def _batches(n: int, size: int, progress, desc: str):
    """Start offsets of the ``size``-row batches of ``n`` rows. ``progress``: False, True
    (a tqdm bar when there is more than one batch) or a tqdm-like factory, called as
    ``progress(total=n, desc=desc)`` and updated by rows (the demo's stage bar)."""
    from tqdm.auto import tqdm

    starts = range(0, n, size)
    if not callable(progress):
        yield from tqdm(starts, desc=desc, disable=not progress or len(starts) <= 1, leave=False)
        return
    bar = progress(total=n, desc=desc)
    for s in starts:
        yield s
        bar.update(min(size, n - s))
    bar.close()


class HFRunner:
    """Backend "hf": a transformers model driven by HFSteerer, ``batch_size`` rows at a time.
    ``progress``: as ``_batches`` takes it (a bool or a tqdm-like factory)."""

    backend = "hf"

    def __init__(self, model, tokenizer, bank: VectorBank | None = None, batch_size: int = 16,
                 progress: bool = True, processor=None):
        from emosteer.hf import HFSteerer

        self.steerer = HFSteerer(model, None, tokenizer)
        self.model, self.tokenizer = model, tokenizer
        self.info = self.steerer.info
        self.bank = _merge_bank(None, bank, self.info)
        self.steerer.bank = self.bank
        self.batch_size, self.progress = batch_size, progress
        self.name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self._processor = processor
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.note = f"transformers reference backend (HFSteerer, {dtype}, batch {batch_size})"

    def close(self) -> None:
        """Nothing to stop: the model lives in this process and goes with the runner."""

    @property
    def processor(self):
        if self._processor is None:
            self._processor = _load_processor(getattr(self.model.config, "_name_or_path", ""))
        return self._processor

    def register(self, bank: VectorBank) -> None:
        self.bank.update(bank)

    def encode(self, texts: Sequence[str], chat: bool = True) -> list[list[int]]:
        prompts = format_prompts(self.tokenizer, texts, chat)
        return [self.tokenizer(p, add_special_tokens=not chat)["input_ids"] for p in prompts]

    def encode_images(self, images: Sequence[Any], texts: Sequence[str],
                      chat: bool = True) -> list[MMPrompt]:
        """One image (path or PIL image) + text user turn per row, through the processor."""
        return _encode_images(self.processor, self.tokenizer, images, texts, chat)

    def _mm_kwargs(self, rows, T: int) -> dict:
        """Model kwargs of a batch of MMPrompt rows: per-image tensors concatenated in row
        order, per-token ones ([1, len]) left-padded to ``T`` like the ids."""
        if not rows or not isinstance(rows[0], MMPrompt):
            return {}
        out = {}
        for k in rows[0].mm:
            vals = [r.mm[k] for r in rows]
            if isinstance(vals[0], torch.Tensor) and vals[0].dim() == 2 and vals[0].shape[0] == 1 \
                    and all(v.shape[1] == len(r) for v, r in zip(vals, rows)):
                pad = torch.zeros((len(rows), T), dtype=vals[0].dtype)
                for i, v in enumerate(vals):
                    pad[i, T - v.shape[1]:] = v[0]
                out[k] = pad
            elif isinstance(vals[0], torch.Tensor):
                out[k] = torch.cat(vals, dim=0)
            else:
                raise ValueError(f"cannot batch processor output {k!r}")
        dev, dt = self.steerer.device, next(self.model.parameters()).dtype
        return {k: v.to(dev, dt) if v.is_floating_point() else v.to(dev) for k, v in out.items()}

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
                positions: Positions = "last", desc: str = "forward", reduce: Reduce | None = None):
        """``(logits, captures)``: per row, float32 logits ``[len(positions), V]`` (``[V]``
        for "last") and the capture dict (or None). With ``reduce``, per row
        ``reduce(row, logits)`` instead of the logits, computed batch by batch, so that
        full-vocabulary logits are never held for every row at once."""
        logits, caps = [], []
        for s in _batches(len(ids), self.batch_size, self.progress, desc):
            rows = ids[s:s + self.batch_size]
            x, mask = self._pad(rows)
            lg, cp = self.steerer.run(x, mask, list(specs[s:s + self.batch_size]),
                                      logits="last" if positions == "last" else "all",
                                      **self._mm_kwargs(rows, x.shape[1]))
            caps.extend(cp)
            for i, r in enumerate(rows):
                if positions == "last":
                    row = lg[i].float()
                else:
                    off = x.shape[1] - len(r)
                    pos = torch.as_tensor(list(positions[s + i]), dtype=torch.long) + off
                    row = lg[i, pos.to(lg.device)].float()
                logits.append(row if reduce is None else reduce(s + i, row))
        return logits, caps

    def next_token_logmass(self, ids, specs, tids: Sequence[int], desc: str = "forward") -> torch.Tensor:
        """Per row, ``log Σ_{t∈tids} p(t)`` at the token after the prompt ([len(ids)],
        float32), from this backend's logits."""
        return _logmass_via_forward(self, ids, specs, tids, desc)

    def forward_grad(self, ids, specs, keep: dict[str, Sequence[int]]):
        """One differentiable batch (no chunking): ``(logits [B,T,V], acts, pad_offsets)``."""
        x, mask = self._pad(ids)
        lg, _, acts = self.steerer.run_grad(x, mask, list(specs), keep=keep, logits="all",
                                            **self._mm_kwargs(ids, x.shape[1]))
        offs = [x.shape[1] - len(r) for r in ids]
        return lg, acts, offs

    def generate(self, ids: Sequence[Sequence[int]], specs, max_new_tokens: int = 48,
                 temperature: float = 0.0, seed: int | None = 0, desc: str = "generate"):
        """``(token_ids, texts, captures)`` per row (image rows, MMPrompt, too)."""
        if ids and isinstance(ids[0], MMPrompt):
            return self._generate_mm(ids, specs, max_new_tokens, temperature, seed)
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

    def _generate_mm(self, rows, specs, max_new_tokens, temperature, seed):
        """Image rows: batched, steered generation through HFSteerer.generate (the
        processor's pixel tensors go to the prefill)."""
        toks, texts, caps = [], [], []
        for s in _batches(len(rows), self.batch_size, self.progress, "generate (images)"):
            batch = rows[s:s + self.batch_size]
            x, mask = self._pad(batch)
            out = self.steerer.generate(x, mask, list(specs[s:s + self.batch_size]),
                                        max_new_tokens=max_new_tokens, temperature=temperature,
                                        seed=seed, **self._mm_kwargs(batch, x.shape[1]))
            toks.extend(out.token_ids)
            texts.extend(out.texts)
            caps.extend(out.captures)
        return toks, texts, caps


class _LMHead:
    """Final RMSNorm + LM head of a Llama-like model folder, for logits from captures."""

    def __init__(self, folder: str | os.PathLike):
        from emosteer.models.weights import final_norm_and_head

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.norm, self.head = final_norm_and_head(folder)

    def __call__(self, resid: torch.Tensor) -> torch.Tensor:
        h = resid.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.norm) @ self.head.T


class VLLMRunner:
    """Backend "vllm": one request per row through ``emosteer.LLM``. ``progress``: vLLM's
    ``use_tqdm`` (a bool, or a tqdm-like factory such as the demo's stage bar)."""

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
        self._processor = None
        # prompt tokens the prefix cache served in the last engine call (a benchmark
        # checks with it that two conditions computed the same tokens)
        self.last_cached_tokens = 0
        import vllm

        dtype = str(llm.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self.note = (f"vLLM {vllm.__version__} with the emosteer plugin (emosteer.LLM, {dtype}, "
                     f"max_slots={llm.max_slots}; per-request specs in one batch)")

    def close(self) -> None:
        """Stop the engine (its engine-core process). Call it only on a runner that started
        its engine (``make_runner`` from a model name or folder), not on one wrapping an
        ``emosteer.LLM`` someone else still uses."""
        try:
            self.llm.llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # noqa: BLE001 - best effort at the end of a run
            warnings.warn(f"emosteer: engine shutdown failed: {e}")

    @property
    def processor(self):
        if self._processor is None:
            self._processor = _load_processor(self.path)
        return self._processor

    def encode_images(self, images: Sequence[Any], texts: Sequence[str],
                      chat: bool = True) -> list[MMPrompt]:
        """As HFRunner.encode_images; requests send the unexpanded prompt text + image."""
        return _encode_images(self.processor, self.tokenizer, images, texts, chat)

    def register(self, bank: VectorBank) -> None:
        self.bank.update(bank)
        self.llm.register_vectors(self.bank)

    def encode(self, texts: Sequence[str], chat: bool = True) -> list[list[int]]:
        prompts = format_prompts(self.tokenizer, texts, chat)
        return [self.tokenizer(p, add_special_tokens=not chat)["input_ids"] for p in prompts]

    def _generate(self, ids, specs, params, salts: Sequence[str] | None = None):
        prompts = [{"prompt": r.text, "multi_modal_data": {"image": r.image}}
                   if isinstance(r, MMPrompt) else {"prompt_token_ids": list(r)} for r in ids]
        if salts is not None:
            if len(salts) != len(prompts):
                raise ValueError(f"{len(salts)} salts for {len(prompts)} rows")
            prompts = [{**p, "cache_salt": str(s)} for p, s in zip(prompts, salts)]
        # Analysis must never use an answer the engine could not steer: raise instead.
        outs = self.llm.generate(prompts, params, steer=[SteerSpec.parse(s) for s in specs],
                                 use_tqdm=self.progress, raise_on_error=True)
        self.last_cached_tokens = sum(int(getattr(o, "num_cached_tokens", None) or 0) for o in outs)
        return outs

    @staticmethod
    def _with_capture(spec, layer: int, positions: str) -> SteerSpec:
        from dataclasses import replace

        from emosteer.request.spec import CaptureItem

        spec = SteerSpec.parse(spec)
        cap = spec.capture
        if cap is not None and cap.residual == "all":
            res = "all"
        else:
            res = tuple(sorted(set(cap.residual or ()) | {layer})) if cap else (layer,)
        heads = cap.heads if cap is not None else None
        if cap is not None and cap.positions != positions:
            raise ValueError("forward() with captures needs the same capture positions")
        return replace(spec, capture=CaptureItem(heads, res, positions,
                                                 cap.attn_image if cap is not None else None))

    def forward(self, ids, specs, positions: Positions = "last", desc: str = "forward",
                reduce: Reduce | None = None):
        from vllm import SamplingParams

        if self._head is None:
            self._head = _LMHead(self.path)
        last = self.info.num_layers - 1
        mode = "last" if positions == "last" else "all"
        specs2 = [self._with_capture(s, last, mode) for s in specs]
        outs = self._generate(ids, specs2, SamplingParams(max_tokens=1, temperature=0.0))
        rows, caps = [], []
        for i, (o, s) in enumerate(zip(outs, specs)):
            c = o.emosteer_captures
            resid = c["residual"][last]
            if positions == "last":
                rows.append(resid[-1:])
            else:
                where = {p: k for k, p in enumerate(c["positions"])}
                rows.append(resid[[where[p] for p in positions[i]]])
            user = SteerSpec.parse(s).capture if s is not None else None
            caps.append(c if user is not None else None)
        # The LM head over groups of rows of about 512 positions; with ``reduce`` each
        # group's logits are reduced before the next group's are computed.
        logits: list = []
        start = 0
        while start < len(rows):
            end, n = start, 0
            while end < len(rows) and (n == 0 or n + len(rows[end]) <= 512):
                n += len(rows[end])
                end += 1
            lg = self._head(torch.cat(rows[start:end]))
            k = 0
            for i in range(start, end):
                row = lg[k] if positions == "last" else lg[k:k + len(rows[i])]
                k += len(rows[i])
                logits.append(row if reduce is None else reduce(i, row))
            start = end
        return logits, caps

    def next_token_logmass(self, ids, specs, tids: Sequence[int], desc: str = "forward",
                           salts: Sequence[str] | None = None) -> torch.Tensor:
        """Per row, ``log Σ_{t∈tids} p(t)`` at the token after the prompt ([len(ids)],
        float32). The engine's sampler returns the log-probabilities of exactly these ids
        (vLLM's ``logprob_token_ids``, from the raw logits), so no residual leaves the
        worker and no LM head runs here; a whole sweep is one ``generate`` call. More ids
        than vLLM returns per request (128), or an engine whose logprobs are not the raw
        ones, go through ``forward`` and the LM head instead (the same quantity).
        ``salts``: a ``cache_salt`` per row (rows then share no prefix-cache blocks with
        rows of another salt; a benchmark's plain condition uses it to reuse exactly
        what a steered row may); not taken by the LM-head path."""
        from vllm import SamplingParams
        from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS

        tids = [int(t) for t in tids]
        if not tids or len(set(tids)) > MAX_LOGPROB_TOKEN_IDS or self._logprobs_mode() != "raw_logprobs":
            if salts is not None:
                raise ValueError("salts need the engine's log-probabilities (at most "
                                 f"{MAX_LOGPROB_TOKEN_IDS} distinct ids, raw logprobs)")
            return _logmass_via_forward(self, ids, specs, tids, desc)
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=sorted(set(tids)))
        outs = self._generate(ids, specs, params, salts)
        rows = []
        for i, o in enumerate(outs):
            lps = o.outputs[0].logprobs
            if not lps or any(t not in lps[0] for t in tids):
                raise RuntimeError(f"row {i}: the engine returned no log-probability for some "
                                   "of the requested token ids")
            rows.append([lps[0][t].logprob for t in tids])
        return torch.logsumexp(torch.tensor(rows, dtype=torch.float32), dim=-1)

    def _logprobs_mode(self) -> str:
        """What the engine's returned logprobs are ("raw_logprobs": log-softmax of the
        model's logits, vLLM's default)."""
        engine = self.llm.llm.llm_engine
        cfg = getattr(engine, "model_config", None) or engine.vllm_config.model_config
        return str(getattr(cfg, "logprobs_mode", "raw_logprobs"))

    def generate(self, ids, specs, max_new_tokens: int = 48, temperature: float = 0.0,
                 seed: int | None = 0, desc: str = "generate"):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed)
        outs = self._generate(ids, specs, params)
        toks = [list(o.outputs[0].token_ids) for o in outs]
        texts = [o.outputs[0].text for o in outs]
        caps = [getattr(o, "emosteer_captures", None) for o in outs]
        return toks, texts, caps


def _logmass_via_forward(runner, ids, specs, tids, desc) -> torch.Tensor:
    """``next_token_logmass`` from the runner's next-token logits, reduced row by row."""
    from emosteer.analysis.attribution.metrics import target_logmass

    t = torch.as_tensor(list(tids), dtype=torch.long)
    got, _ = runner.forward(ids, specs, positions="last", desc=desc,
                            reduce=lambda _i, lg: target_logmass(lg, t.to(lg.device)))
    return torch.stack(got).float()


def cpu_engine_env() -> None:
    """vLLM-on-CPU defaults for this process and the engine processes it starts (set before
    the engine starts; the user's own settings win): a 1 GiB KV cache (plenty for a small
    model, where vLLM's default would take a large share of the memory), every core for
    the model (vLLM reserves one otherwise: half of a 2-core machine), and no tokenizer
    threads competing with the model's."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _engine_defaults(path: Path, kwargs: dict) -> dict:
    """``kwargs`` for ``emosteer.LLM`` with the analysis defaults filled in where the caller
    set none: float32, seed 0, a context of at most 1024 tokens (the prompts here are
    short; a smaller context is a smaller KV cache), and on the CPU 32-token KV blocks
    (its default, 128, holds no full block of these prompts): a last-token patch then
    reuses the unsteered prompt's earlier blocks (its salt sits in the block of the last
    token), so a head sweep computes the shared prompt once rather than once per head."""
    cfg = json.loads((path / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    kwargs = dict(kwargs)
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("max_model_len", min(1024, int(cfg.get("max_position_embeddings") or 1024)))
    if not torch.cuda.is_available():
        kwargs.setdefault("block_size", 32)
    return kwargs


def make_runner(model: Any = "default", backend: str = "hf", tokenizer=None,
                bank: VectorBank | None = None, batch_size: int = 16, progress: Any = True,
                processor=None, **engine_kwargs):
    """A runner for ``backend``: "hf", "vllm", or "auto" (vLLM when its engine starts, else
    the transformers reference backend, with a warning that says why; the runner's
    ``note`` says it too). ``model`` is a runner (returned as is), an HFSteerer /
    transformers model (with ``tokenizer``), an ``emosteer.LLM``, or a model name/folder
    ("default" = SmolLM2-135M-Instruct) loaded for the backend; a vLLM engine started here
    gets ``engine_kwargs`` over the analysis defaults (``_engine_defaults``) and is stopped
    by ``runner.close()``. ``progress``: a bool, or a tqdm-like factory that every batch
    of the runner reports to."""
    if isinstance(model, (HFRunner, VLLMRunner)):
        if bank is not None:
            model.register(bank)
        return model
    if backend not in ("auto", "hf", "vllm"):
        raise ValueError(f"backend must be 'auto', 'hf' or 'vllm', got {backend!r}")
    if backend == "auto":
        if not isinstance(model, (str, os.PathLike)):
            raise ValueError("backend 'auto' takes a model name or folder; pass a model object "
                             "with backend 'hf' or 'vllm'")
        try:
            return make_runner(model, "vllm", tokenizer, bank, batch_size, progress, processor,
                               **engine_kwargs)
        except Exception as e:  # noqa: BLE001 - any start-up failure falls back
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            warnings.warn(f"emosteer: vLLM backend unavailable ({reason}); using the transformers "
                          "reference backend")
        runner = make_runner(model, "hf", tokenizer, bank, batch_size, progress, processor)
        runner.note += f"; vLLM was not used because: {reason}"
        return runner
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
        return HFRunner(model, tokenizer, bank, batch_size=batch_size, progress=progress,
                        processor=processor)
    import emosteer

    if isinstance(model, (str, os.PathLike)):
        from emosteer.models import resolve_model

        cpu_engine_env()
        path = resolve_model(model)
        model = emosteer.LLM(str(path), bank=bank, **_engine_defaults(path, engine_kwargs))
    runner = VLLMRunner(model, tokenizer, bank, progress=progress)
    runner._processor = processor
    return runner
