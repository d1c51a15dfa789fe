"""Tiny random models built offline, for tests and smoke runs.

No model hub is reachable from where emosteer is tested, so every model the tests use
is built here from a config: random weights, a real byte-level BPE tokenizer trained on
a small built-in corpus, saved with ``save_pretrained`` so that both transformers and
vLLM load it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_CORPUS = [
    "The child laughs with joy at the bright sunny beach.",
    "A man sits alone in the rain, quiet and sad.",
    "She shouts in anger and slams the door.",
    "The dark forest at night makes him afraid.",
    "Describe the scene in the picture. What does the person feel?",
    "A person stands in a room. The table holds a cup of tea.",
    "happy joyful delighted cheerful glad smile love hope proud calm",
    "sad gloomy grief tears lonely hurt sorrow loss cry",
    "angry furious rage hate annoyed bitter hostile mad",
    "afraid scared terror panic anxious nervous dread fear",
    "0 1 2 3 4 5 6 7 8 9 . , ! ? : ; ' \" ( ) - user assistant system",
]


def build_tokenizer(path: str | os.PathLike, vocab_size: int = 384):
    """A byte-level BPE tokenizer with a chat template, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(str(path))
    return fast


def build_tiny_llama(
    path: str | os.PathLike,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 256,
    seed: int = 0,
    state_dict_fn=None,
) -> Path:
    """Build (once) a random fp32 Llama with a working tokenizer in ``path``.

    ``state_dict_fn(model)`` may edit the weights in place before saving (used to
    plant a known circuit). Returns the folder.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
        if state_dict_fn is not None:
            state_dict_fn(model)
    model.save_pretrained(str(path), safe_serialization=True)
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path
