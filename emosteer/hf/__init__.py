"""The reference backend: emosteer's interventions and captures on plain transformers models.

Same operators (torch implementation), same places and same capture layout as the vLLM
plugin, plus what vLLM cannot give: gradients (``HFSteerer.run_grad``) and models vLLM
does not serve. Decoder layers are found generically (Llama-like LMs and the language
model inside Qwen2-VL / Qwen3-VL / LLaVA).
"""

from emosteer.hf.layers import DecoderHandles, find_decoder, load_hf_model
from emosteer.hf.plan import Plan
from emosteer.hf.steerer import GenerateOutput, HFSteerer

__all__ = ["HFSteerer", "GenerateOutput", "Plan", "DecoderHandles", "find_decoder", "load_hf_model"]
