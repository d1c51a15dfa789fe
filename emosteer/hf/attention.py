"""VEE and attention-to-image captures on a transformers model: emosteer's own eager attention.

transformers picks each attention module's kernel by name from ``ALL_ATTENTION_FUNCTIONS``
(``config._attn_implementation``). While a batch with a boost or an ``attn_image``
capture runs, ``HFSteerer`` switches the *decoder's* config (the language model's; a
vision tower keeps its own) to ``"emosteer_vee"``, registered here with the eager 4-d
additive mask, and back afterwards. The function computes plain eager attention in
float32 with the same rule as the fused kernel (``emosteer.ops.reference.attn_image_boost``):

- at a (token, head) whose slot has ``beta != 1`` at this layer, the raw scaled logit of
  every image key becomes ``l + log(beta)`` (mode 0: the softmax weight times beta, then
  renormalised) or ``beta * l`` (mode 1), before the padding/causal mask is added;
- the attention mass on each image's keys is what ``attn_image`` captures.

Image keys are the prompt's image / video placeholder tokens (``image_token_id`` /
``video_token_id`` / ``image_token_index`` of the model config), one span per
contiguous run, numbered in prompt order like vLLM's placeholder ranges.
"""

from __future__ import annotations

import contextvars
from typing import Any

import torch

from emosteer.request.spec import MAX_IMAGES

NAME = "emosteer_vee"
# (steerer, step) of the forward running now; None outside HFSteerer calls.
CURRENT: contextvars.ContextVar = contextvars.ContextVar("emosteer_vee_step", default=None)

__all__ = ["NAME", "CURRENT", "image_token_ids", "key_spans", "register", "vee_attention"]


def image_token_ids(config: Any) -> list[int]:
    """Token ids whose positions are image (or video) keys, from a model config."""
    out = []
    for key in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        for cfg in (config, getattr(config, "text_config", None)):
            v = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(v, int) and v >= 0 and v not in out:
                out.append(v)
    return out


def key_spans(input_ids: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """[B, T] int64: the image index of each prompt position (contiguous runs of image
    tokens, 0, 1, ... per row), -1 elsewhere. Raises ValueError past ``MAX_IMAGES``."""
    is_img = torch.zeros_like(input_ids, dtype=torch.bool)
    for t in token_ids:
        is_img |= input_ids == t
    start = is_img & ~torch.nn.functional.pad(is_img, (1, 0))[:, :-1]
    idx = start.long().cumsum(1) - 1
    if is_img.any() and int(idx.max()) >= MAX_IMAGES:
        raise ValueError(f"a prompt holds more than {MAX_IMAGES} images; VEE and attn_image handle "
                         f"up to {MAX_IMAGES} per request")
    return torch.where(is_img, idx, torch.full_like(idx, -1))


def vee_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as ``"emosteer_vee"``; query ``[B, H, Q, D]``,
    key/value ``[B, KVH, K, D]``. Returns ``([B, Q, H, D], weights [B, H, Q, K])``."""
    got = CURRENT.get()
    layer = getattr(module, "layer_idx", None)
    B, H, Q, D = query.shape
    K = key.shape[2]
    if scaling is None:
        scaling = D ** -0.5
    group = H // key.shape[1]
    k = key.repeat_interleave(group, dim=1) if group > 1 else key
    v = value.repeat_interleave(group, dim=1) if group > 1 else value
    logits = torch.matmul(query.float(), k.float().transpose(2, 3)) * scaling
    st = got[1] if got is not None else None
    lp = st.plan.layers[layer] if st is not None and layer is not None else None
    span = st.key_span[:, :K] if st is not None else None
    if lp is not None and lp.boost_on is not None:
        slot = st.slot(lp.boost_on)
        if slot is not None:
            s = slot.view(B, Q).long()
            on = (s >= 0).unsqueeze(-1)
            beta = torch.where(on, lp.boost_beta[s.clamp(min=0)], 1.0).permute(0, 2, 1).unsqueeze(-1)
            mode = lp.boost_mode[s.clamp(min=0)].view(B, 1, Q, 1)
            boosted = torch.where(mode == 1, logits * beta, logits + torch.log(beta))
            img = (span >= 0).view(B, 1, 1, K)
            logits = torch.where(img & (beta != 1), boosted, logits)
    if attention_mask is not None:
        logits = logits + attention_mask[:, :, :, :K].float()
    w = torch.softmax(logits, dim=-1)
    if lp is not None:
        capm = st.cap_mask("attn_image", layer)
        if capm is not None:
            onehot = torch.nn.functional.one_hot((span + 1).clamp(min=0), MAX_IMAGES + 1)[..., 1:]
            mass = torch.einsum("bhqk,bkn->bqhn", w, onehot.float())  # [B, Q, H, NS]
            st.caps["attn_image"][layer] = mass.reshape(B * Q, H, MAX_IMAGES)[capm].detach().clone()
    if dropout and module.training:
        w = torch.nn.functional.dropout(w, p=dropout)
    out = torch.matmul(w, v.float()).to(query.dtype).transpose(1, 2).contiguous()
    return out, w


_registered = False


def register() -> None:
    """Register ``"emosteer_vee"`` with transformers (attention function + eager mask)."""
    global _registered
    if _registered:
        return
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, vee_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    _registered = True
