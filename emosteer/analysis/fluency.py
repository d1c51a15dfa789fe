"""Fluency guards for steered text: repetition, diversity and perplexity under the
unsteered model.

Steering that raises a hit rate can also make a narrative loop ("the smile is
infectious, and the smile is infectious..."). Every steered condition should therefore
be reported beside:

- ``repeated_ngram_share(text, 3)``: the share of word 3-grams that repeat an earlier
  3-gram of the same text. 0 for text that never repeats itself; it rises towards 1 as
  the text loops.
- ``distinct_n(texts, 2)``: unique word 2-grams over all 2-grams of a set of texts (the
  usual distinct-n; low = repetitive or uniform).
- ``perplexities(runner, prompt_ids, narrative_ids)``: the perplexity of each narrative
  under the **unsteered** model, conditioned on its prompt (teacher-forced, one batch of
  requests on the runner). A steered text the plain model finds implausible scores high.

Words are lower-cased runs of letters, digits and apostrophes.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch

__all__ = ["words", "repeated_ngram_share", "distinct_n", "perplexities", "guards"]

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def _ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of the word n-grams of ``text`` already seen earlier in it (0 when the text
    has no n-gram)."""
    grams = _ngrams(words(text), n)
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    rep = 0
    for g in grams:
        if g in seen:
            rep += 1
        seen.add(g)
    return rep / len(grams)


def distinct_n(texts: Sequence[str] | str, n: int = 2) -> float:
    """Unique word n-grams over all word n-grams of ``texts`` (0 when there is none)."""
    if isinstance(texts, str):
        texts = [texts]
    grams = [g for t in texts for g in _ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def perplexities(runner, prompt_ids: Sequence[Sequence[int]], narrative_ids: Sequence[Sequence[int]],
                 desc: str = "fluency: perplexity") -> list[float | None]:
    """Per row: ``exp(-mean log p(narrative token | prompt, earlier tokens))`` under the
    unsteered model (no config), None for an empty narrative."""
    rows = [i for i, nt in enumerate(narrative_ids) if len(nt) > 0]
    out: list[float | None] = [None] * len(narrative_ids)
    if not rows:
        return out
    full = [list(prompt_ids[i]) + list(narrative_ids[i][:-1]) for i in rows]
    pos = [list(range(len(prompt_ids[i]) - 1, len(prompt_ids[i]) - 1 + len(narrative_ids[i]))) for i in rows]
    def mean_logprob(k: int, lg: torch.Tensor) -> float:
        tgt = torch.as_tensor(list(narrative_ids[rows[k]]), dtype=torch.long, device=lg.device)
        return float(torch.log_softmax(lg.float(), dim=-1).gather(1, tgt.view(-1, 1)).mean())

    # Reduced row by row: a study's thousands of narratives never hold their
    # full-vocabulary logits at once.
    means, _ = runner.forward(full, [None] * len(rows), positions=pos, desc=desc, reduce=mean_logprob)
    for i, m in zip(rows, means):
        out[i] = float(math.exp(-m))
    return out


def guards(cond: dict, base: dict, max_ppl_ratio: float = 1.25, max_rep_ratio: float = 2.0) -> dict:
    """Whether a condition's fluency stays within the guards relative to the unsteered
    baseline: mean perplexity at most ``max_ppl_ratio`` x and mean repeated 3-gram share
    at most ``max_rep_ratio`` x the baseline's (a baseline of 0 repetition allows 0.02)."""
    ppl, ppl0 = cond.get("ppl_mean"), base.get("ppl_mean")
    ppl_ratio = ppl / ppl0 if ppl is not None and ppl0 else None
    rep_ratio = (cond.get("rep3_mean") or 0.0) / max(base.get("rep3_mean") or 0.0, 0.01)
    ok = ppl_ratio is not None and ppl_ratio <= max_ppl_ratio and rep_ratio <= max_rep_ratio
    return {"ppl_ratio": ppl_ratio, "rep3_ratio": rep_ratio, "ok": bool(ok)}
