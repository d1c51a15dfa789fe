"""The position model and the per-step builder both backends call."""

from __future__ import annotations

import numpy as np
import pytest

from emosteer.request import positions as P
from emosteer.request.spec import CaptureItem, SpecError
from emosteer.request.step import BatchTables, StepRow, capture_layout, token_positions, token_slots


def test_parse_and_kinds():
    assert P.parse("last", "f") == "last"
    assert P.parse([5, 1, 3], "f") == (1, 3, 5)
    for bad in ("first", [], [1, 1], [-1], "x"):
        with pytest.raises(SpecError) as e:
            P.parse(bad, "steer[0].positions")
        assert e.value.field.startswith("steer[0].positions")
    assert P.kinds("all") == {"P", "G"} and P.kinds((1,)) == {"X"}
    assert P.overlap("prompt", "last") and P.overlap("all", "generated")
    assert not P.overlap("prompt", "generated") and not P.overlap((1, 2), (3,))


def test_groups_and_covers():
    assert P.groups(["last", (2, 7), "all"], 10) == [2, 7, 9]
    assert P.groups(["last"], None) == [-1]  # the prompt length is not known yet
    assert P.covers("last", 9, 10) and not P.covers("last", 8, 10)
    assert P.covers("prompt", 3, 10) and not P.covers("generated", 3, 10)
    assert P.past_prompt((1, 12), 10) == 12 and P.past_prompt((1, 9), 10) is None


def test_choose_groups_win_over_the_phase():
    pos = np.arange(6)
    got = P.choose(pos, 4, 10, 20, np.array([1, 3]), np.array([31, 33]))
    assert got.tolist() == [10, 31, 10, 33, 20, 20]


def test_program_at_and_token_slots_follow_one_rule():
    """The prefix cache's position -> program map and the step tables' token -> slot
    map come from the same rule: for random requests, the slot a token gets names
    the program ``program_at`` reports for its position."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        n_prompt = int(rng.integers(1, 12))
        fps = {"prompt": "p" if rng.random() < 0.7 else None,
               "generated": "g" if rng.random() < 0.7 else None}
        listed = sorted(set(rng.integers(0, n_prompt, size=int(rng.integers(0, 4))).tolist()))
        ident = {"P": n_prompt, "prompt": fps["prompt"], "generated": fps["generated"],
                 "at": [[p, f"at{p}"] for p in listed]}
        slot_of = {"p": 0, "g": 1, None: -1, **{f"at{p}": 2 + i for i, p in enumerate(listed)}}
        row = StepRow(n_prompt, slot_of[fps["prompt"]], slot_of[fps["generated"]],
                      np.array(listed, dtype=np.int64), np.array([slot_of[f"at{p}"] for p in listed], dtype=np.int32))
        t = BatchTables.build([row])
        total = n_prompt + 5
        qs = np.array([0, total])
        r, pos = token_positions(qs, np.array([0]))
        slots = token_slots(t, r, pos, qs)
        for p in range(total):
            assert slots[p] == slot_of[P.program_at(ident, p)], (ident, p)


def test_docstring_example():
    rows = [StepRow(3, 0, -1, np.array([2]), np.array([2], dtype=np.int32)), StepRow(2)]
    t = BatchTables.build(rows)
    qs = np.array([0, 3, 5])
    row, pos = token_positions(qs, np.array([0, 0]))
    assert row.tolist() == [0, 0, 0, 1, 1] and pos.tolist() == [0, 1, 2, 0, 1]
    assert token_slots(t, row, pos, qs).tolist() == [0, 0, 2, -1, -1]
    assert t.used_slots().tolist() == [0, 2]


def test_capture_layout_rows_records_and_overflow():
    last = CaptureItem(heads=(0, 2), positions="last")
    every = CaptureItem(residual=(1,), positions="all")
    gen = CaptureItem(heads=(1,), positions="generated")
    rows = [StepRow(3, capture=last), StepRow(2, capture=every), StepRow(1, capture=gen)]
    t = BatchTables.build(rows)
    # a prefill of A (3 tokens) and B (2 tokens), and C's first generated token
    qs = np.array([0, 3, 5, 6])
    computed = np.array([0, 0, 1])
    _, pos = token_positions(qs, computed)
    lay = capture_layout(t, pos, qs, computed, num_layers=3)
    assert lay.rows == {"heads": 3, "residual": 2, "attn_image": 0, "probe": 0}
    assert lay.index["heads"][0].tolist() == [-1, -1, 0, -1, -1, -1]
    assert lay.index["heads"][2].tolist() == [-1, -1, 1, -1, -1, -1]
    assert lay.index["heads"][1].tolist() == [-1, -1, -1, -1, -1, 2]
    assert lay.index["residual"][1].tolist() == [-1, -1, -1, 0, 1, -1]
    recs = {(e, k, layer): (p.tolist(), r.tolist()) for e, k, layer, p, r in lay.records}
    assert recs[(0, "heads", 2)] == ([2], [1]) and recs[(2, "heads", 1)] == ([1], [2])
    assert lay.local_rows("heads", 1, np.array([2])).tolist() == [0]
    # a decode step: A's "last" capture has nothing to do and is skipped
    qs2, comp2 = np.array([0, 1, 2, 3]), np.array([3, 2, 2])
    _, pos2 = token_positions(qs2, comp2)
    lay2 = capture_layout(t, pos2, qs2, comp2, num_layers=3)
    assert {e for e, *_ in lay2.records} == {1, 2}
    # capacity: B's two prompt rows do not fit after A's two; only B is refused
    lay3 = capture_layout(t, pos, qs, computed, num_layers=3, capacity=3)
    assert lay3.overflow == [1] and lay3.index["residual"] is None and lay3.rows["heads"] == 3
