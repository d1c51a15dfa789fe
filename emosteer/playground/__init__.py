"""The browser playground that ``emosteer serve`` serves at ``/emosteer/``.

``static/`` holds the page (index.html, app.js, style.css: no build step, no CDN). The
page is public, like any static file; every API call it makes goes to ``/v1/...`` with
the API key the user enters, so ``--api-key`` guards what it does. The emotion words it
highlights and the numbers under each answer come from the server
(``POST /v1/emosteer/score``, :func:`score_texts`): one implementation of the lexicon,
the hit rate and the repeated 3-gram share, the analysis package's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["STATIC", "score_targets", "score_texts"]

STATIC = Path(__file__).resolve().parent / "static"


def score_targets() -> list[str]:
    """The emotion names a hit rate can target: Mikels' categories, then basic names."""
    from emosteer.analysis.emotion import BASIC_TO_MIKELS, MIKELS

    return list(MIKELS) + [n for n in BASIC_TO_MIKELS if n not in MIKELS and BASIC_TO_MIKELS[n]]


def score_texts(texts: Sequence[str], target: str) -> list[dict]:
    """Per text: its emotion words (``[start, end, labels]``, the words
    :func:`emosteer.analysis.emotion.hit_rate` counts), the hit rate of ``target`` (None
    without emotion words) and the repeated word-3-gram share
    (:func:`emosteer.analysis.fluency.repeated_ngram_share`). ValueError for an unknown
    target."""
    from emosteer.analysis.emotion import emotion_spans, hit_rate, normalize_category
    from emosteer.analysis.fluency import repeated_ngram_share

    normalize_category(target)
    return [{"words": [[s, e, list(labels)] for s, e, _w, labels in emotion_spans(t)],
             "hit_rate": hit_rate(t, target), "rep3": repeated_ngram_share(t, 3)} for t in texts]
