"""The measures every attribution stage shares.

**Metrics.** The method's metric is the hit rate of generated narratives
(``emosteer.analysis.emotion.hit_rate``). Tiny or random models name no emotion at all, and
the hit rate of short narratives is coarse, so every step ALSO reports a continuous
proxy: the log-probability mass the model puts on the target emotion's words,

    M = log Σ_{t ∈ T} p(t | context),   T = single-token spellings (" joyful", "Happy", ...)
                                            of lexicon words whose labels all lie in the
                                            target's Mikels categories,

at the next token after the prompt (``proxy="next"``) or averaged over the positions of
the model's own unsteered neutral narrative, teacher-forced (``proxy="narrative"``).
Changes of M are log ratios of that mass.

**Alignment.** Heads and neurons are preselected by the cosine of their write direction
(a slice of o_proj or a column of down_proj) with S_l; those weights come from the HF
model when the runner holds one, else straight from the model folder
(:mod:`emosteer.models.weights`).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["target_token_ids", "target_logmass"]


def target_token_ids(tokenizer, emotion: str, lexicon=None, max_words: int | None = None) -> list[int]:
    """Token ids of single-token spellings of the target's explicit emotion words: the
    word with a leading space (" joyful", " Joyful") or capitalised at the start of a text
    ("Joyful"); bare lower-case forms are skipped (they are mostly word pieces). First
    tokens of multi-token words only when no word is a single token. Default lexicon: the
    curated ``core`` list (NRC's associations such as "government" -> fear would swamp a
    next-token measure)."""
    from emosteer.analysis.emotion import MIKELS, POSITIVE, load_lexicon, target_set

    lex = lexicon if lexicon is not None else load_lexicon(("core",))
    cats = target_set(emotion)
    to_cats = {**{c: {c} for c in MIKELS}, "joy": set(POSITIVE)}
    words = sorted({w for tier in lex.tiers for w, labels in tier.items()
                    if labels and all(lab in to_cats and to_cats[lab] <= cats for lab in labels)})
    words = words[:max_words] if max_words else words
    single, first = set(), set()
    for w in words:
        for form in (" " + w, w.capitalize(), " " + w.capitalize()):
            ids = tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                single.add(ids[0])
            elif ids and form.startswith(" "):
                first.add(ids[0])
    out = sorted(single or first)
    if not out:
        raise ValueError(f"no token of the tokenizer spells a {emotion!r} lexicon word")
    return out


def target_logmass(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log Σ_{t∈ids} softmax(logits)[t]`` over the last dimension."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return torch.logsumexp(lp[..., ids], dim=-1)


def _target_ids(runner, emotion: str, lexicon=None, tids=None) -> torch.Tensor:
    """``tids`` when the caller computed them already, else the target's token ids."""
    return torch.as_tensor(tids if tids is not None else target_token_ids(runner.tokenizer, emotion, lexicon))


def _hit_rates(texts: Sequence[str], emotion: str, lexicon=None) -> list[float]:
    from emosteer.analysis.emotion import hit_rate

    return [hit_rate(t, emotion, lexicon) or 0.0 for t in texts]


def _proxy_rows(runner, ids, tids, specs, narratives=None, desc="proxy"):
    """M per row: at the next token, or averaged over the teacher-forced narrative."""
    def mass(_: int, lg: torch.Tensor) -> torch.Tensor:
        return target_logmass(lg, tids.to(lg.device)).mean()

    if narratives is None:
        return runner.next_token_logmass(ids, specs, tids.tolist(), desc=desc)
    full = [list(i) + list(n[:-1]) for i, n in zip(ids, narratives)]
    pos = [list(range(len(i) - 1, len(i) - 1 + max(1, len(n)))) for i, n in zip(ids, narratives)]
    got, _ = runner.forward(full, specs, positions=pos, desc=desc, reduce=mass)
    return torch.stack(got)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b.expand_as(a), dim=-1, eps=1e-12)


def _weights(runner, name: str) -> list[torch.Tensor]:
    """Per-layer o_proj or down_proj weight [d, H*D] / [d, I] (float32, CPU)."""
    if getattr(runner, "steerer", None) is not None:
        dec = runner.steerer.dec
        mods = dec.o_proj if name == "o_proj" else dec.down_proj
        return [m.weight.detach().float().cpu() for m in mods]
    from emosteer.models.weights import layer_weights

    suffix = "self_attn.o_proj.weight" if name == "o_proj" else "mlp.down_proj.weight"
    return layer_weights(runner.path, suffix, runner.info.num_layers)
