"""The LVLM case, run in its own process by test_lvlm.py (torchvision must be importable
from interpreter start, see vllm_lvlm.py). Prints one JSON line of findings.

``lvlm_case.py MODEL_DIR [KIND [--compiled]]``: KIND is a key of emosteer.models.tiny_lvlm.KINDS
(qwen2_vl, qwen2_5_vl, qwen3_vl, llava, llava_onevision; default qwen2_vl), built in MODEL_DIR once.
``--compiled``: the engine runs vLLM's torch.compile graph (in this process) instead of
eager mode, and the findings add its worker's compile counters before and after the steps.

A tiny random LVLM of that family with an image prompt: empty config == plain; beta = 1 == plain;
a mixed batch (image and text-only prompts, boosted and not) == each request alone;
captures shaped [P + G - 1, H, D]; VEE raises the boosted heads' image mass as the
formula predicts; and the vLLM path equals the HF reference backend (first-step
logprobs, prompt captures, attention-to-image mass, VEE in both modes and phases,
greedy narratives), whose mass equals transformers' own eager attention weights.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vllm_lvlm import KINDS, build_tiny_lvlm, test_image  # noqa: E402
from vllm_support import assert_no_slots_held, engine_env, make_bank  # noqa: E402

TOKENS = 6


def main(model_dir: str, kind: str = "qwen2_vl", compiled: bool = False) -> dict:
    engine_env()
    import transformers
    from transformers import AutoConfig, AutoProcessor
    from vllm import SamplingParams

    import emosteer
    from emosteer.request.bank import ModelInfo
    from emosteer.hf import HFSteerer

    spec = KINDS[kind]
    model_cls = getattr(transformers, spec.model_class)
    path = build_tiny_lvlm(kind, model_dir)
    info = ModelInfo.from_hf_config(AutoConfig.from_pretrained(path))
    bank = make_bank(info)
    vee_mask = torch.zeros(info.num_layers, info.num_heads)
    vee_mask[0, 1] = vee_mask[1, 0] = vee_mask[1, 3] = 1
    bank.add("joy.vee", "head_mask", vee_mask)
    # max_slots=4: the mixed batch below needs more distinct slots than that, so boost
    # configs wait for admission like any other (and still give their solo answers).
    llm = emosteer.LLM(str(path), bank=bank, dtype="float32", enforce_eager=not compiled, max_model_len=256,
                       max_slots=4, enable_prefix_caching=True,
                       block_size=32, limit_mm_per_prompt={"image": 1, "video": 0})
    image = test_image()
    prompt = {"prompt": spec.prompt, "multi_modal_data": {"image": image}}
    sp = SamplingParams(max_tokens=TOKENS, temperature=0.0, logprobs=5, ignore_eos=True)
    cap = {"capture": {"heads": "all", "residual": "all", "attn_image": "all", "positions": "all"}}
    configs = [
        None,
        {"heads": [{"layer": 0, "head": [0, 1], "mode": "ablate"}], **cap},
        {"steer": [{"vector": "joy", "layers": [0, 1], "scale": 4.0}], **cap},
        {"heads": [{"layer": 1, "head": 2, "mode": "add", "vector": "joy.h", "scale": 3.0}],
         "neurons": {"set": "joy.ena", "gamma": 3.0}, **cap},
        {"boost": {"heads": "joy.vee", "beta": 4.0}, **cap},
        {"boost": {"heads": "joy.vee", "beta": 3.0, "mode": "logit", "prefill_layers": [0],
                   "decode_layers": [1]}, **cap},
        {"boost": {"heads": "joy.vee", "beta": 2.5}, "neurons": {"set": "joy.ena", "gamma": 2.0},
         "steer": [{"vector": "joy", "layers": [1], "scale": 2.0}], **cap},
    ]
    VEE = [4, 5, 6]  # configs with a boost
    res: dict = {"compiled": compiled}
    plain = llm.generate([prompt], sp, use_tqdm=False)[0]
    # After start-up (vLLM compiles or loads the model's graph) and a first step (the
    # sampler compiles its logprob op on first use).
    compiles = _compile_counts(llm)
    empty = llm.generate([prompt], sp, steer={}, use_tqdm=False)[0]
    res["empty_equals_plain"] = list(plain.outputs[0].token_ids) == list(empty.outputs[0].token_ids)
    text = {"prompt": "Describe the scene. What does the person feel?"}
    unit = llm.generate([prompt], sp, steer={"boost": {"heads": "joy.vee", "beta": 1.0}}, use_tqdm=False)[0]
    res["beta1_equals_plain"] = (list(unit.outputs[0].token_ids) == list(plain.outputs[0].token_ids) and all(
        abs(a[t].logprob - b[t].logprob) == 0.0 for a, b in zip(unit.outputs[0].logprobs, plain.outputs[0].logprobs)
        for t in a if t in b))
    # A mixed batch: image prompts with every config, text-only prompts plain and boosted.
    text_cases = [(text, None), (text, {"neurons": {"set": "joy.ena", "gamma": 2.0}})]
    batch_all = llm.generate([prompt] * len(configs) + [p for p, _ in text_cases], sp,
                             steer=configs + [c for _, c in text_cases], use_tqdm=False)
    batch, text_out = batch_all[: len(configs)], batch_all[len(configs):]
    solo = [llm.generate([prompt], sp, steer=c, use_tqdm=False)[0] for c in configs]
    text_solo = [llm.generate([p], sp, steer=c, use_tqdm=False)[0] for p, c in text_cases]
    only_cap = llm.generate([prompt], sp, steer={"capture": {"attn_image": "all", "positions": "all"}},
                            use_tqdm=False)[0]
    # The prefix cache is not poisoned: plain after every boosted prefill == plain before.
    res["no_poison"] = list(solo[0].outputs[0].token_ids) == list(plain.outputs[0].token_ids)
    res["isolation"] = all(list(b.outputs[0].token_ids) == list(s.outputs[0].token_ids)
                           for b, s in zip(batch + text_out, solo + text_solo))
    # Text-only: a boost has no image keys to act on (exactly plain), and no image mass.
    # Text-only: a boost or an attention-to-image capture has no image to act on, so the
    # request is refused naming the field (never run as if boosted).
    from emosteer.request.spec import SpecError

    res["text_refused"] = []
    for cfg in (configs[4], {"capture": {"attn_image": [0], "positions": "last"}}):
        try:
            llm.generate([text], sp, steer=cfg, use_tqdm=False)
            res["text_refused"].append(None)
        except SpecError as e:
            res["text_refused"].append(e.field)
    res["errors"] = [o.emosteer_error for o in batch_all if o.emosteer_error]
    # The boosted heads' image mass: the plain mass m becomes beta*m / (1 + (beta-1)*m)
    # at the last prompt token of layer 0 (its inputs are the unboosted embeddings).
    P0 = len(batch[1].prompt_token_ids)
    m = batch[1].emosteer_captures["attn_image"][0][P0 - 1, 1, 0].item()
    got = batch[4].emosteer_captures["attn_image"][0][P0 - 1, 1, 0].item()
    res["vee_mass"] = [m, got, 4.0 * m / (1 + 3.0 * m)]
    res["vee_changed"] = sum(list(batch[i].outputs[0].token_ids) != list(plain.outputs[0].token_ids) for i in VEE)
    res["changed"] = sum(list(b.outputs[0].token_ids) != list(plain.outputs[0].token_ids) for b in batch)
    P = len(batch[1].prompt_token_ids)
    res["prompt_tokens"] = P
    res["capture_shape"] = list(batch[1].emosteer_captures["heads"][0].shape)
    res["residual_shape"] = list(batch[1].emosteer_captures["residual"][1].shape)
    try:
        assert_no_slots_held(llm)
        res["slots_in_use"] = 0
    except AssertionError:
        res["slots_in_use"] = llm.status()

    # Compiled: every step above (boosted pairs changing from step to step: other heads,
    # betas, modes, phases and batch mixes) ran in the graph compiled at start-up.
    res["compiled_graphs"] = compiles
    res["recompiles"] = {k: v - compiles[k] for k, v in _compile_counts(llm).items() if v != compiles[k]}

    # The HF reference on the same inputs (same expanded image tokens and pixels).
    proc = AutoProcessor.from_pretrained(path)
    enc = proc(text=[spec.prompt], images=[image], return_tensors="pt")
    res["same_prompt_ids"] = enc["input_ids"][0].tolist() == list(batch[1].prompt_token_ids)
    model = model_cls.from_pretrained(path, dtype=torch.float32).eval()
    worst_lp, worst_cap = 0.0, 0.0
    by_layer: dict = {}  # "heads.0", "residual.1", ... -> worst |vLLM - HF| over the configs
    # Qwen3-VL deepstack adds visual features to the image rows after the first decoder
    # layers: both paths capture the residual after that add (the stream the next layer
    # reads). Their size shows the capture check would catch a missing add.
    img_rows = enc["input_ids"][0] == proc.tokenizer.convert_tokens_to_ids(spec.image_token)
    deep = spec.deepstack(model, enc) if spec.deepstack is not None else []
    with HFSteerer(model, bank) as hf:
        for cfg, out in zip(configs[1:], batch[1:]):
            extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
            logits, caps = hf.run(enc["input_ids"], enc["attention_mask"], [cfg], logits="last", **extra)
            lp = torch.log_softmax(logits[0].float(), -1)
            for t, v in out.outputs[0].logprobs[0].items():
                worst_lp = max(worst_lp, abs(v.logprob - float(lp[t])))
            got = out.emosteer_captures
            for what in ("heads", "residual", "attn_image"):
                for layer, want in caps[0][what].items():
                    diff = (got[what][layer][:P] - want.float()[:P]).abs().max().item()
                    worst_cap = max(worst_cap, diff)
                    by_layer[f"{what}.{layer}"] = max(by_layer.get(f"{what}.{layer}", 0.0), diff)
        # Image-conditioned greedy narratives on the HF backend == vLLM, boosted or not.
        gen = hf.generate(enc["input_ids"].repeat(len(VEE) + 1, 1), enc["attention_mask"].repeat(len(VEE) + 1, 1),
                          [None] + [configs[i] for i in VEE], max_new_tokens=TOKENS,
                          eos_token_id=[], **{k: torch.cat([v] * (len(VEE) + 1)) for k, v in extra_kw(enc).items()})
        res["hf_generate_equal"] = [list(g) == list(o.outputs[0].token_ids)
                                    for g, o in zip(gen.token_ids, [plain] + [batch[i] for i in VEE])]
    res["hf_max_logprob_diff"] = worst_lp
    res["hf_max_capture_diff"] = worst_cap
    res["hf_capture_diff_by_layer"] = by_layer
    res["deepstack_layers"] = list(range(len(deep)))
    res["deepstack_max_abs"] = max((float(d.abs().max()) for d in deep), default=0.0)
    # transformers' own eager attention weights give the same image mass (no boost).
    eager = model_cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        att = eager(**enc, output_attentions=True).attentions
    res["eager_layers"] = len(att)
    res["image_tokens"] = int(img_rows.sum())
    worst = 0.0
    for layer, a in enumerate(att):
        mass = a[0][:, :, img_rows].sum(-1).transpose(0, 1)  # [P, H]
        worst = max(worst, (only_cap.emosteer_captures["attn_image"][layer][:P, :, 0] - mass).abs().max().item())
    res["eager_mass_diff"] = worst
    llm.llm.llm_engine.engine_core.shutdown()
    return res


def _compile_counts(llm) -> dict:
    """The compile counters of the (one) worker process, from its status."""
    (status,) = llm.status()
    return status["compile"]


def extra_kw(enc) -> dict:
    return {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}


if __name__ == "__main__":
    out = main(sys.argv[1], *sys.argv[2:3], compiled="--compiled" in sys.argv[3:])
    print("LVLM_RESULT " + json.dumps(out, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
