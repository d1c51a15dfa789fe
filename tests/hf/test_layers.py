"""The decoder is found generically: in plain LMs and inside vision-language models."""

from __future__ import annotations

import pytest
import torch

from emosteer.hf import HFSteerer, find_decoder

TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300)


def qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=1, embed_dim=64, hidden_size=128, num_heads=2),
        vocab_size=300, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return Qwen2VLForConditionalGeneration(cfg)


def llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(text_config=LlamaConfig(**TEXT),
                      vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128,
                                                     num_hidden_layers=1, num_attention_heads=2,
                                                     image_size=32, patch_size=8))
    return LlavaForConditionalGeneration(cfg)


@pytest.mark.parametrize("build", [qwen2_vl, llava])
def test_language_model_of_lvlm(build):
    torch.manual_seed(0)
    model = build().eval()
    dec = find_decoder(model)
    assert dec.path.endswith("language_model.layers") and dec.num_layers == 2
    assert (dec.info.num_heads, dec.info.head_dim, dec.info.hidden_size) == (4, 32, 128)
    ids = torch.randint(3, 250, (2, 7))
    st = HFSteerer(model)
    plain, _ = st.run(ids, None, None)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert torch.equal(plain, ref)  # unpadded: explicit positions (or mRoPE's own) agree
    _, caps = st.run(ids, None, {"capture": {"heads": "all", "residual": [1], "positions": "all"}})
    assert caps[0]["heads"][0].shape == (7, 4, 32) and caps[1]["residual"][1].shape == (7, 128)


def test_no_decoder_is_a_clear_error():
    with pytest.raises(ValueError, match="no decoder layer list"):
        find_decoder(torch.nn.Sequential(torch.nn.Linear(2, 2)))
