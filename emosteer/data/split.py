"""Seeded splitting and sampling of pair sets.

Splits are stratified by emotion and, when the records carry a group key in ``meta``
(the built-in set's ``"scene"``), grouped by it, so no scene is seen both when a
steering vector is extracted and when it is evaluated.
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence, TypeVar

from emosteer.data.format import Pair

__all__ = ["split_pairs", "sample_pairs"]

T = TypeVar("T", bound=Pair)


def split_pairs(pairs: Sequence[T], test_fraction: float = 0.2, seed: int = 0,
                group_key: str | None = "scene") -> tuple[list[T], list[T]]:
    """(train, test), per emotion about ``test_fraction`` of the pairs in test (at least
    one when an emotion has two groups or more). Records lacking ``meta[group_key]`` form
    groups of one. Deterministic in ``seed``; input order is kept within each part."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    by_emotion: dict[str, dict[object, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, p in enumerate(pairs):
        key = p.meta.get(group_key) if group_key else None
        by_emotion[p.emotion][key if key is not None else ("#", i)].append(i)
    test_idx: set[int] = set()
    for emotion in sorted(by_emotion):
        groups = by_emotion[emotion]
        keys = sorted(groups, key=repr)
        random.Random(f"{seed}-{emotion}").shuffle(keys)
        total = sum(len(g) for g in groups.values())
        goal = test_fraction * total
        taken = 0
        if len(keys) < 2:          # a single group cannot be split: all of it trains
            continue
        for key in keys[:-1]:      # never move the last group: train keeps >= 1
            if taken >= goal:
                break
            test_idx.update(groups[key])
            taken += len(groups[key])
    train = [p for i, p in enumerate(pairs) if i not in test_idx]
    test = [p for i, p in enumerate(pairs) if i in test_idx]
    return train, test


def sample_pairs(pairs: Sequence[T], n: int, seed: int = 0,
                 emotion: str | None = None) -> list[T]:
    """``n`` pairs drawn without replacement (all of them if fewer), optionally of one
    emotion only; deterministic in ``seed``."""
    pool = [p for p in pairs if emotion is None or p.emotion == emotion]
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return random.Random(seed).sample(pool, min(n, len(pool)))
