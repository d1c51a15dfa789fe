"""Position-aligned head patches as runs of pool rows, without an engine: the compiler's
grouping (one slot when every vector-reading head item of a group reads the same listed
positions, else one per position), the per-token row offsets of the step builder, and
the scheduler's placement of run keys in consecutive pool rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emosteer.request.bank import ModelInfo, VectorBank
from emosteer.request.compile import ALIGNED, compile_request, key_rows, materialize
from emosteer.request.spec import SteerSpec
from emosteer.request.step import BatchTables, StepRow, token_positions, token_row_offsets, token_slots
from emosteer.vllm.admission import Admission, Capacity, PoolTable

INFO = ModelInfo("LlamaForCausalLM", num_layers=3, hidden_size=16, num_heads=4, head_dim=8,
                 intermediate_size=32, num_kv_heads=4)
L, H, D = INFO.num_layers, INFO.num_heads, INFO.head_dim


@pytest.fixture(scope="module")
def bank() -> VectorBank:
    g = torch.Generator().manual_seed(3)
    b = VectorBank(INFO)
    b.add("a5", "head_positions", torch.randn(5, L, H, D, generator=g))
    b.add("b5", "head_positions", torch.randn(5, L, H, D, generator=g))
    b.add("c3", "head_positions", torch.randn(3, L, H, D, generator=g))
    b.add("h", "head", torch.randn(L, H, D, generator=g))
    b.add("joy", "residual", torch.randn(L, INFO.hidden_size, generator=g))
    return b


def _compile(cfg, bank, P=12):
    spec = SteerSpec.parse(cfg).resolve(INFO)
    spec.validate(bank, INFO, P)
    return compile_request(spec, bank, INFO, P)


def _groups(req) -> dict[str, str]:
    return {p: prog.fingerprint for p, prog in req.phases.items() if p.startswith("@") and prog is not None}


def test_one_slot_when_every_vector_item_reads_the_same_list(bank):
    pos = [2, 3, 5, 8, 9]  # not contiguous: the offset is the index in the list
    req = _compile({"heads": [{"layer": 0, "head": 1, "mode": "patch", "vector": "a5", "positions": pos},
                              {"layer": 2, "head": 3, "mode": "add", "vector": "b5", "scale": 2.0,
                               "positions": pos},
                              {"layer": 1, "head": 0, "mode": "ablate", "positions": pos}],
                    "steer": [{"vector": "joy", "layers": [1], "scale": 1.0}]}, bank)
    assert len(set(_groups(req).values())) == 1
    assert req.row_off == {p: k for k, p in enumerate(pos)}
    prog = req.phases["@5"]
    key0 = prog.heads[(0, 1)][3]
    assert key_rows(key0) == 5 and torch.equal(materialize(key0, bank, INFO), bank.get("a5")[:, 0])
    assert prog.heads[(1, 0)] == (0.0, 0.0, 0.0, None)
    assert 1 in prog.res  # the every-prompt-token steer holds there too
    spec = SteerSpec.parse({"heads": [{"layer": 0, "head": 1, "mode": "patch", "vector": "a5",
                                       "positions": pos}]})
    assert all(h.at is None for h in spec.heads)  # ALIGNED is the compiler's, never parsed
    assert ALIGNED == -1


@pytest.mark.parametrize("other", [
    {"layer": 1, "head": 0, "mode": "add", "vector": "h", "scale": 1.0, "positions": "prompt"},
    {"layer": 1, "head": 0, "mode": "patch", "vector": "c3", "positions": [2, 3, 4]},
])
def test_a_group_mixing_other_vectors_keeps_one_slot_per_position(bank, other):
    """Where another vector-reading item shares the group (a plain head vector, or a
    per-position vector over other positions), one offset per token cannot serve both:
    those positions read their own rows (one slot each), as before."""
    req = _compile({"heads": [{"layer": 0, "head": 1, "mode": "patch", "vector": "a5",
                               "positions": [2, 3, 5, 8, 9]}, other]}, bank)
    groups = _groups(req)
    mixed = [p for p in (2, 3) if f"@{p}" in groups]
    assert len({groups[f"@{p}"] for p in mixed}) == len(mixed) == 2
    assert not any(p in req.row_off for p in mixed)
    for p in mixed:
        key = req.phases[f"@{p}"].heads[(0, 1)][3]
        assert key_rows(key) == 1
        k = [2, 3, 5, 8, 9].index(p)
        assert torch.equal(materialize(key, bank, INFO), bank.get("a5")[k, 0])


def test_step_builder_gives_each_token_its_row_offset():
    """Two requests in one prefill step: A's positions 2..4 are an aligned group (slot 5,
    offsets 0..2), B has no offsets; a decode step of A is all zeros."""
    rows = [StepRow(6, 0, 1, np.array([2, 3, 4]), np.array([5, 5, 5], dtype=np.int32),
                    group_off=np.array([0, 1, 2], dtype=np.int32)), StepRow(3, 2, -1)]
    t = BatchTables.build(rows)
    qs = np.array([0, 6, 9])
    r, pos = token_positions(qs, np.array([0, 0]))
    assert token_slots(t, r, pos, qs).tolist() == [0, 0, 5, 5, 5, 0, 2, 2, 2]
    assert token_row_offsets(t, pos, qs).tolist() == [0, 0, 0, 1, 2, 0, 0, 0, 0]
    qs = np.array([0, 2, 3])  # a chunk from A's position 3, and B
    r, pos = token_positions(qs, np.array([3, 2]))
    assert token_row_offsets(t, pos, qs).tolist() == [1, 2, 0]
    assert token_row_offsets(BatchTables.build([StepRow(3, 2, -1)]), pos, qs) is None


def test_pool_places_runs_in_consecutive_rows_evicting_few_idle_rows():
    from emosteer.vllm.admission import PoolFull

    run = lambda name, n: f'["head","{name}","h",0,"run",{n}]'  # noqa: E731
    pool = PoolTable(10)
    singles = [pool.ref(f'["head","s{i}","h",0]') for i in range(3)]
    assert singles == [0, 1, 2]  # singles from the bottom
    r = pool.ref(run("a", 4))
    assert r == 6  # runs from the top: rows 6..9
    assert pool.in_use() == 7 and pool.resident() == 7
    with pytest.raises(PoolFull):
        pool.ref(run("b", 4))  # 3 free rows (3..5), nothing idle
    pool.unref(run("a", 4))
    pool.unref('["head","s1","h",0]')
    snap = pool.snapshot()
    # Windows of 5 free-or-idle rows: 3..7 (2 idle rows of "a"), 4..8 (3), 5..9 (4); 1..5
    # holds s2 (in use). The one with the fewest idle rows wins; "a" is evicted.
    assert pool.ref(run("b", 5)) == 3
    assert pool.row_of(run("a", 4)) is None and pool.row_of('["head","s1","h",0]') == 1
    assert pool.ref('["head","s3","h",0]') in (8, 9)  # a single row in a's freed rows
    pool.restore(snap)
    assert pool.row_of(run("a", 4)) == 6 and pool.row_of(run("b", 5)) is None
    assert pool.ref(run("a", 4)) == 6  # still resident: no rewrite
    # Every row is accounted for once: free + held == rows.
    assert len(pool._free) + pool.resident() == pool.rows


def test_admission_waits_while_no_run_fits_and_leaves_the_pool_as_it_was():
    def plan(fp, *keys):
        return {"slots": {"@0": {"fp": fp, "keys": list(keys)}}, "capture_rows": 0}

    run = lambda name, n: f'["head","{name}","h",0,"run",{n}]'  # noqa: E731
    adm = Admission(Capacity(4, {"res": 1, "head": 8, "neu": 1, "probe": 1}))
    assert adm.try_admit("a", plan("A", run("a", 3), '["head","x","h",1]')) is not None
    assert adm.try_admit("s", plan("S", '["head","y","h",1]', '["head","z","h",1]')) is not None
    before = adm.status()
    # 8 rows: x, y, z at the bottom, a's run at the top (5..7): 2 rows left, a run of 3
    # cannot be placed: the request waits, the tables unchanged.
    assert adm.try_admit("b", plan("B", run("b", 3))) is None
    assert adm.status() == {**before, "waiting_for_slots": 1}
    assert Admission.fits(plan("C", run("c", 9)), adm.capacity) is not None  # never fits
    adm.release("a")  # a's rows go idle: b may evict them
    g = adm.try_admit("b", plan("B", run("b", 3)))
    assert g is not None and g["rows"][run("b", 3)] == 3  # rows 3, 4 free + one of a's
    st = adm.status()
    assert st["pool_rows_in_use"]["head"] == 5 and st["slots_in_use"] == 2


def test_an_add_of_scale_0_reads_no_row_and_holds_one_slot(bank):
    req = _compile({"heads": [{"layer": 0, "head": 1, "mode": "add", "scale": 0.0, "vector": "a5",
                               "positions": [1, 2, 3, 4, 5]}]}, bank)
    assert len(set(_groups(req).values())) == 1 and req.row_off == {}
    assert req.phases["@3"].heads[(0, 1)] == (1.0, 0.0, 0.0, None)
