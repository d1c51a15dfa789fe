"""Extraction on image pairs (hf backend, tiny random Qwen2-VL) equals a hand computation
with the plain model + processor: per pair, last-prompt-token decoder-layer outputs and
o_proj inputs read with hand-written hooks, for every layer.

The Qwen2-VL processor's video part needs torchvision, whose PyPI build cannot load
beside the CPU torch: the case runs in a child process with the torchvision shim of
emosteer.models.tiny_lvlm on PYTHONPATH (skipped without torchvision).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUERY = "Describe the scene. What does the person feel?"


def by_hand(model, proc, tok, image_path, query):
    """Last-token residual [L, d] and head outputs [L, H, D] of one plain run."""
    import torch
    from PIL import Image

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>" + query}],
        tokenize=False, add_generation_prompt=True)
    with Image.open(image_path) as im:
        enc = proc(text=[prompt], images=[im.convert("RGB")], return_tensors="pt")
    layers = model.model.language_model.layers
    res, heads, hooks = {}, {}, []
    for l, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(
            lambda m, a, o, l=l: res.__setitem__(l, (o[0] if isinstance(o, tuple) else o)[0, -1])))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, l=l: heads.__setitem__(l, a[0][0, -1].view(4, 32))))
    try:
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    L = len(layers)
    # hidden_states[l + 1] is decoder layer l's output, except the last entry (final norm)
    hs = torch.stack([out.hidden_states[l + 1][0, -1] for l in range(L - 1)])
    n_img = int((enc["input_ids"] == model.config.image_token_id).sum())
    return (torch.stack([res[l] for l in range(L)]), torch.stack([heads[l] for l in range(L)]),
            hs, int(enc["input_ids"].shape[1]), n_img)


def build_case(work: str):
    """The tiny Qwen2-VL and 4 synthetic joy pairs under ``work``."""
    from dataclasses import replace

    from PIL import Image

    from emosteer.data import build_synthetic_pairs, read_pairs
    from emosteer.models.tiny_lvlm import build_tiny_qwen2vl

    work = Path(work)
    path = build_tiny_qwen2vl(work / "qwen2vl")
    pairs = build_synthetic_pairs(work / "pairs", emotions=("joy",), n_per_emotion=4, size=64,
                                  query=QUERY)
    assert [p.id for p in read_pairs(work / "pairs" / "pairs.jsonl")] == [p.id for p in pairs]
    # ragged batches: queries of different lengths, and pair 1 at 112x112 (16 image tokens
    # instead of 4), so that rows are left-padded and image grids differ within a batch
    pairs = [replace(p, query=QUERY + " Be brief." * i) for i, p in enumerate(pairs)]
    for side in (pairs[1].emotional, pairs[1].neutral):
        with Image.open(side.image) as im:
            im.convert("RGB").resize((112, 112)).save(side.image)
    return path, pairs


def case(work: str) -> dict:
    import warnings

    import torch
    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    from emosteer.analysis.extract import extract_vectors

    path, pairs = build_case(work)
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    proc = AutoProcessor.from_pretrained(str(path))
    rates = iter([0.9, 0.2, None, 0.5])  # tau 0.5 keeps pairs 0 and 3
    seen: list[str] = []

    def rate(text, emo):
        seen.append(text)
        return next(rates)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the filter ran
        res = extract_vectors(model, pairs, tokenizer=tok, tau=0.5, max_new_tokens=3,
                              batch_size=3, progress=False, hit_rate_fn=rate)
    keep = [True, False, False, True]
    s, t, hs_err, n_img, n_tok = [], [], 0.0, [], []
    for p, k in zip(pairs, keep):
        hp, zp, hsp, P, I = by_hand(model, proc, tok, p.emotional.image, p.query)
        hn, zn, hsn, _, _ = by_hand(model, proc, tok, p.neutral.image, p.query)
        hs_err = max(hs_err, float((hsp - hp[:-1]).abs().max()), float((hsn - hn[:-1]).abs().max()))
        n_tok.append(P)
        n_img.append(I)
        if k:
            s.append(hp - hn)
            t.append(zp - zn)
    S, Sh = torch.stack(s).mean(0), torch.stack(t).mean(0)
    # a fallback run (nothing passes): every pair, the plain mean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res_all = extract_vectors(model, pairs, tokenizer=tok, max_new_tokens=2, batch_size=4,
                                  progress=False, processor=proc,
                                  hit_rate_fn=lambda text, emo: None)
    all_s = []
    for p in pairs:
        all_s.append(by_hand(model, proc, tok, p.emotional.image, p.query)[0]
                     - by_hand(model, proc, tok, p.neutral.image, p.query)[0])
    meta = res.bank.meta("joy")
    return {
        "residual_err": float((res.bank.get("joy", "residual") - S).abs().max()),
        "head_err": float((res.bank.get("joy.h", "head") - Sh).abs().max()),
        "S_norm": float(S.norm()),
        "hidden_states_vs_hooks": hs_err,
        "fallback_err": float((res_all.bank.get("joy") - torch.stack(all_s).mean(0)).abs().max()),
        "fallback_filter": res_all.bank.meta("joy")["filter"],
        "filter": meta["filter"], "n_kept": meta["n_kept"], "kept": res.kept["joy"],
        "narratives": len(seen), "narrative_lens": [len(x) for x in res.narratives["joy"]],
        "prompt_tokens": n_tok, "image_tokens": n_img,
    }


def case_vllm(work: str) -> dict:
    """extract_vectors on backend "vllm" (image prompts as multi_modal_data) vs "hf"."""
    import warnings

    import torch
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    import emosteer
    from emosteer.analysis.extract import extract_vectors

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("EMOSTEER_IMPL", None)
    path, pairs = build_case(work)
    warnings.simplefilter("ignore")  # fallback_all_pairs on both backends
    llm = emosteer.LLM(str(path), dtype="float32", enforce_eager=True, max_model_len=256,
                       block_size=32, limit_mm_per_prompt={"image": 1, "video": 0})
    try:
        rv = extract_vectors(llm, pairs, backend="vllm", max_new_tokens=2, progress=False,
                             hit_rate_fn=lambda t, e: None)
    finally:
        llm.llm.llm_engine.engine_core.shutdown()
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    rh = extract_vectors(model, pairs, tokenizer=tok, max_new_tokens=2, progress=False,
                         hit_rate_fn=lambda t, e: None)
    return {"residual_diff": float((rv.bank.get("joy") - rh.bank.get("joy")).abs().max()),
            "head_diff": float((rv.bank.get("joy.h") - rh.bank.get("joy.h")).abs().max()),
            "norm": float(rh.bank.get("joy").norm()), "backend": rv.meta["joy"]["backend"]}


def _run_child(tmp_path, mode: str, timeout: int) -> dict:
    from emosteer.models.tiny_lvlm import torchvision_env

    env = torchvision_env(tmp_path / "tv_shim", str(ROOT))
    if env is None:
        pytest.skip("torchvision not installed (pip install --no-deps torchvision==0.28.0)")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), mode, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_image_extraction_equals_hand_computation(tmp_path):
    r = _run_child(tmp_path, "hf", 300)
    assert r["image_tokens"][0] > 0 and r["S_norm"] > 0, r
    assert len(set(r["prompt_tokens"])) == 4 and len(set(r["image_tokens"])) == 2, r  # ragged
    assert r["hidden_states_vs_hooks"] < 1e-5, r  # hooks == hidden_states[l+1] (l < L-1)
    assert r["residual_err"] < 1e-5 and r["head_err"] < 1e-5, r
    assert r["filter"] == "hit_rate" and r["n_kept"] == 2, r
    assert r["kept"] == [True, False, False, True] and r["narratives"] == 4, r
    assert r["fallback_filter"] == "fallback_all_pairs" and r["fallback_err"] < 1e-5, r


@pytest.mark.vllm
@pytest.mark.slow
def test_image_extraction_vllm_equals_hf(tmp_path):
    r = _run_child(tmp_path, "vllm", 600)
    assert r["backend"] == "vllm" and r["norm"] > 0, r
    assert r["residual_diff"] < 1e-4 and r["head_diff"] < 1e-4, r


if __name__ == "__main__":
    fn = {"hf": case, "vllm": case_vllm}[sys.argv[1]]
    print("RESULT " + json.dumps(fn(sys.argv[2])))
