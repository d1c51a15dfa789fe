"""The position model: what every position name means, in one place.

An item acts at a set of token positions of its request, counted from 0 over the prompt
and then the generated tokens (``P`` = the prompt length)::

    "all"        every token                      0 .. P-1, P, P+1, ...
    "prompt"     every prompt token               0 .. P-1
    "generated"  every generated token            P, P+1, ...
    "last"       the last prompt token            P-1
    [3, 7, 8]    listed prompt tokens             3, 7, 8

A capture names its tokens with ``"last"``, ``"all"`` or ``"generated"`` (same meaning).

Everything that asks a question about positions asks this module: the parser and the
overlap check of the spec (``spec.py``), the compiler's position groups
(``compile.py``), the per-step token tables of both backends (``step.py``), the capture
row budget of the front end and the prefix-cache identity of a KV block (vLLM's block
hasher, ``emosteer/vllm/patches/prefix_cache.py``). The one rule that picks what acts at
a position is ``choose``: a position group ("last" or listed) wins over the phase,
then ``pos < P`` is the prompt phase and the rest the generated phase. The step
tables (token → slot) are ``choose``; the prefix cache's position → program map is
``program_at``, the same rule for one position (a test holds the two equal).
"""

from __future__ import annotations

from typing import Any, Iterable, Union

import numpy as np

from emosteer.request import fields as F
from emosteer.request.fields import SpecError

POSITIONS = ("all", "prompt", "generated", "last")
CAPTURE_POSITIONS = ("last", "all", "generated")
PHASES = ("prompt", "generated")
MAX_POSITIONS = 4096  # explicit prompt positions per item

# "all" | "prompt" | "generated" | "last" | explicit prompt token indices (a sorted tuple
# of ints; the JSON form is a list)
Positions = Union[str, tuple[int, ...]]

__all__ = [
    "POSITIONS", "CAPTURE_POSITIONS", "PHASES", "MAX_POSITIONS", "Positions",
    "parse", "to_json", "kinds", "overlap", "in_phase", "last_of", "covers", "groups",
    "past_prompt", "captured", "capture_only_at", "capture_tokens", "capture_tokens_per_step",
    "computes_every_prompt_token", "choose", "program_at", "block_identity",
]  # fmt: skip


# -- names ----------------------------------------------------------------------------
def parse(value: Any, field: str) -> Positions:
    """An item's ``positions`` from JSON: a name, or a non-empty list of distinct prompt
    token indices (returned sorted)."""
    if isinstance(value, str):
        return F.choice(value, field, POSITIONS)
    if not isinstance(value, list) or not value:
        raise SpecError(field, f"must be one of {list(POSITIONS)} or a non-empty list of prompt "
                        f"token indices, got {F.type_name(value)}")
    if len(value) > MAX_POSITIONS:
        raise SpecError(field, f"lists {len(value)} positions; the limit is {MAX_POSITIONS}")
    out = [F.integer(v, f"{field}[{i}]") for i, v in enumerate(value)]
    if len(set(out)) != len(out):
        raise SpecError(field, "lists a position twice")
    return tuple(sorted(out))


def to_json(positions: Positions):
    return list(positions) if isinstance(positions, tuple) else positions


def kinds(positions: Positions) -> set[str]:
    """Which token classes ``positions`` touch: "P" (every prompt token), "G" (generated
    tokens), "L" (the last prompt token), "X" (listed prompt tokens)."""
    if isinstance(positions, tuple):
        return {"X"}
    return {"all": {"P", "G"}, "prompt": {"P"}, "generated": {"G"}, "last": {"L"}}[positions]


def overlap(p: Positions, q: Positions) -> bool:
    """Whether two items' positions can share a token, before the prompt length is known
    (a listed position and "last" are checked by ``groups`` once it is)."""
    a, b = kinds(p), kinds(q)
    if "P" in a and b & {"P", "L", "X"} or "P" in b and a & {"P", "L", "X"}:
        return True
    if a & b & {"G", "L"}:
        return True
    if isinstance(p, tuple) and isinstance(q, tuple):
        return bool(set(p) & set(q))
    return False


def in_phase(positions: Positions, phase: str) -> bool:
    """Whether ``positions`` act on *every* token of ``phase`` ("prompt" or "generated");
    "last" and listed positions act only in their position groups."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    return isinstance(positions, str) and positions in ("all", phase)


def last_of(num_prompt: int | None) -> int:
    """The position of the last prompt token; -1 while the prompt length is unknown."""
    return num_prompt - 1 if num_prompt is not None else -1


def covers(positions: Positions, p: int, num_prompt: int | None) -> bool:
    """Whether ``positions`` act at prompt position ``p``."""
    if isinstance(positions, tuple):
        return p in positions
    return positions in ("all", "prompt") or (positions == "last" and p == last_of(num_prompt))


def groups(items: Iterable[Positions], num_prompt: int | None) -> list[int]:
    """The prompt positions that form a position group: every listed position and the
    last prompt token where an item says "last" (sorted)."""
    out: set[int] = set()
    for positions in items:
        if isinstance(positions, tuple):
            out.update(positions)
        elif positions == "last":
            out.add(last_of(num_prompt))
    return sorted(out)


def past_prompt(positions: Positions, num_prompt: int) -> int | None:
    """The first listed position at or past the end of the prompt, or None."""
    if isinstance(positions, tuple) and positions[-1] >= num_prompt:
        return positions[-1]
    return None


# -- captures -------------------------------------------------------------------------
def captured(which: str, pos: np.ndarray, num_prompt: np.ndarray | int) -> np.ndarray:
    """Which of the tokens at positions ``pos`` a capture at ``which`` records."""
    if which == "last":
        return pos == np.asarray(num_prompt) - 1
    if which == "all":
        return np.ones(np.shape(pos), dtype=bool)
    if which == "generated":
        return pos >= np.asarray(num_prompt)
    raise ValueError(f"capture positions must be one of {CAPTURE_POSITIONS}, got {which!r}")


def capture_only_at(which: str, num_prompt: int | None) -> int:
    """The one position a capture at ``which`` records, or -1 when it records more."""
    return last_of(num_prompt) if which == "last" else -1


def capture_tokens(which: str, num_prompt: int | None, max_new: int | None) -> int | None:
    """How many tokens a capture at ``which`` records over the whole request (None when
    a length it depends on is unknown)."""
    if which == "last":
        return 1
    if which == "generated":
        return max_new
    return None if num_prompt is None else num_prompt + (max_new or 0)


def capture_tokens_per_step(which: str, num_prompt: int | None) -> int:
    """The most tokens a capture at ``which`` records in one engine step: the whole
    prompt for "all" (one prefill step can hold it), else one."""
    return (num_prompt or 1) if which == "all" else 1


def computes_every_prompt_token(which: str | None) -> bool:
    """A capture at every position must run every prompt token through the model, so
    its request never reads the prefix cache."""
    return which == "all"


# -- what acts where --------------------------------------------------------------------
def choose(pos: np.ndarray, num_prompt: np.ndarray, prompt: np.ndarray, generated: np.ndarray,
           group_pos: np.ndarray | None = None, group_val: np.ndarray | None = None) -> np.ndarray:
    """The value in effect at each position (vectorised over tokens): ``group_val[k]``
    where ``pos == group_pos[k]`` (a sorted array), else ``prompt`` before
    ``num_prompt`` and ``generated`` from there on. The arguments broadcast per token."""
    out = np.where(pos < num_prompt, prompt, generated)
    if group_pos is not None and group_pos.size:
        k = np.searchsorted(group_pos, pos)
        kc = np.minimum(k, group_pos.size - 1)
        hit = (k < group_pos.size) & (group_pos[kc] == pos)
        out = np.where(hit, group_val[kc], out)
    return out


def program_at(identity: dict | None, position: int) -> str | None:
    """The fingerprint of the program a request applies at ``position`` (None: nothing),
    from its cache identity (``RequestProgram.cache_identity``): ``choose`` for one
    position, in plain Python because the block hasher asks it for every block of every
    steered request on the engine core's admission path, where numpy's per-call cost is
    ten times the work (tests/test_positions.py holds the two equal)."""
    if identity is None:
        return None
    for pos, fp in identity["at"]:
        if pos == position:
            return fp
    return identity["prompt"] if position < identity["P"] else identity["generated"]


def block_identity(identity: dict | None, start: int, end: int) -> str | None:
    """The prefix-cache key of the KV block of positions ``[start, end)``: the program at
    each of its positions, run-length encoded (``"<offset>+<length>=<fp or ->"``), or
    None when no position of the block is intervened on (its KV is the plain model's,
    shared with everyone). Earlier positions are covered by the parent block's hash
    (vLLM chains them); later ones cannot change this block's KV (attention is causal).

    So a block is shared exactly when every one of its positions was computed under the
    same program: blocks inside the prompt of a config that acts the same on every
    prompt token are shared between prompts of different lengths; the block holding the
    end of the prompt (where "prompt" items stop, "generated" ones start and "last"
    acts) is shared only with a request whose prompt ends at the same place."""
    if identity is None:
        return None
    cuts = {start, end}
    P = identity["P"]
    if start < P < end:
        cuts.add(P)
    for pos, _ in identity["at"]:
        if start <= pos < end:
            cuts.update((pos, pos + 1))
    edges = sorted(cuts)
    runs, any_fp = [], False
    for lo, hi in zip(edges, edges[1:]):
        fp = program_at(identity, lo)
        any_fp = any_fp or fp is not None
        if runs and runs[-1][2] == fp:
            runs[-1][1] += hi - lo
        else:
            runs.append([lo - start, hi - lo, fp])
    if not any_fp:
        return None
    return ",".join(f"{off}+{n}={fp or '-'}" for off, n, fp in runs)
