"""The LVLM case, run in its own process by test_lvlm.py (torchvision must be importable
from interpreter start, see vllm_lvlm.py). Prints one JSON line of findings.

A tiny random Qwen2-VL with an image prompt: empty config == plain; a mixed batch ==
each request alone; captures shaped [P + G - 1, H, D]; and the vLLM path equals the
HF reference backend (first-step logprobs and prompt captures) with the image.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vllm_lvlm import IMAGE_PROMPT, build_tiny_qwen2_vl, test_image  # noqa: E402
from vllm_support import assert_no_slots_held, engine_env, make_bank  # noqa: E402

TOKENS = 6


def main(model_dir: str) -> dict:
    engine_env()
    from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration
    from vllm import SamplingParams

    import emosteer
    from emosteer.bank import ModelInfo
    from emosteer.hf import HFSteerer

    path = build_tiny_qwen2_vl(model_dir)
    info = ModelInfo.from_hf_config(AutoConfig.from_pretrained(path))
    bank = make_bank(info)
    llm = emosteer.LLM(str(path), bank=bank, dtype="float32", enforce_eager=True, max_model_len=256,
                       block_size=32, limit_mm_per_prompt={"image": 1, "video": 0})
    image = test_image()
    prompt = {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": image}}
    sp = SamplingParams(max_tokens=TOKENS, temperature=0.0, logprobs=5, ignore_eos=True)
    cap = {"capture": {"heads": "all", "residual": "all", "positions": "all"}}
    configs = [
        None,
        {"heads": [{"layer": 0, "head": [0, 1], "mode": "ablate"}], **cap},
        {"steer": [{"vector": "joy", "layers": [0, 1], "scale": 4.0}], **cap},
        {"heads": [{"layer": 1, "head": 2, "mode": "add", "vector": "joy.h", "scale": 3.0}],
         "neurons": {"set": "joy.ena", "gamma": 3.0}, **cap},
    ]
    res: dict = {}
    plain = llm.generate([prompt], sp, use_tqdm=False)[0]
    empty = llm.generate([prompt], sp, steer={}, use_tqdm=False)[0]
    res["empty_equals_plain"] = list(plain.outputs[0].token_ids) == list(empty.outputs[0].token_ids)
    batch = llm.generate([prompt] * len(configs), sp, steer=configs, use_tqdm=False)
    solo = [llm.generate([prompt], sp, steer=c, use_tqdm=False)[0] for c in configs]
    res["isolation"] = all(list(b.outputs[0].token_ids) == list(s.outputs[0].token_ids)
                           for b, s in zip(batch, solo))
    res["changed"] = sum(list(b.outputs[0].token_ids) != list(plain.outputs[0].token_ids) for b in batch)
    P = len(batch[1].prompt_token_ids)
    res["prompt_tokens"] = P
    res["capture_shape"] = list(batch[1].emosteer_captures["heads"][0].shape)
    res["residual_shape"] = list(batch[1].emosteer_captures["residual"][1].shape)
    try:
        assert_no_slots_held(llm)
        res["slots_in_use"] = 0
    except AssertionError:
        res["slots_in_use"] = sum(s["slots_in_use"] for s in llm.status())

    # The HF reference on the same inputs (same expanded image tokens and pixels).
    proc = AutoProcessor.from_pretrained(path)
    enc = proc(text=[IMAGE_PROMPT], images=[image], return_tensors="pt")
    res["same_prompt_ids"] = enc["input_ids"][0].tolist() == list(batch[1].prompt_token_ids)
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    worst_lp, worst_cap = 0.0, 0.0
    with HFSteerer(model, bank) as hf:
        for cfg, out in zip(configs[1:], batch[1:]):
            extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
            logits, caps = hf.run(enc["input_ids"], enc["attention_mask"], [cfg], logits="last", **extra)
            lp = torch.log_softmax(logits[0].float(), -1)
            for t, v in out.outputs[0].logprobs[0].items():
                worst_lp = max(worst_lp, abs(v.logprob - float(lp[t])))
            got = out.emosteer_captures
            for kind in ("heads", "residual"):
                for layer, want in caps[0][kind].items():
                    diff = (got[kind][layer][:P] - want.float()[:P]).abs().max().item()
                    worst_cap = max(worst_cap, diff)
    res["hf_max_logprob_diff"] = worst_lp
    res["hf_max_capture_diff"] = worst_cap
    llm.llm.llm_engine.engine_core.shutdown()
    return res


if __name__ == "__main__":
    out = main(sys.argv[1])
    print("LVLM_RESULT " + json.dumps(out, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
