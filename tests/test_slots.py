"""SlotTable: refcounts, sharing by fingerprint, exhaustion, thread safety."""

from __future__ import annotations

import threading

import pytest

from emosteer.request.slots import SlotsExhausted, SlotTable


def test_share_and_refcount():
    table = SlotTable(2)
    assert table.acquire("a") == 0
    assert table.acquire_new("a") == (0, False)
    assert table.refcount("a") == 2 and table.refcount("zz") == 0
    assert table.acquire_new("b") == (1, True)
    assert table.in_use() == {"a": 0, "b": 1} and table.free_count() == 0
    assert table.release("a") is False and table.slot_of("a") == 0
    assert table.release("a") is True and table.slot_of("a") is None
    assert table.free_count() == 1 and len(table) == 1


def test_exhaustion_and_reuse():
    table = SlotTable(2)
    table.acquire("a")
    table.acquire("b")
    with pytest.raises(SlotsExhausted, match="max_slots"):
        table.acquire("c")
    assert table.acquire("a") == 0  # a held config still shares while full
    table.release("b")
    assert table.acquire("c") == 1
    table.release("a")
    table.release("a")
    assert table.acquire("d") == 0  # the lowest free id is reused first


def test_release_unknown_and_bad_args():
    table = SlotTable(1)
    with pytest.raises(KeyError, match="unknown fingerprint 'x'"):
        table.release("x")
    table.acquire("x")
    table.release("x")
    with pytest.raises(KeyError):
        table.release("x")
    with pytest.raises(ValueError, match="max_slots"):
        SlotTable(0)
    with pytest.raises(ValueError, match="fingerprint"):
        table.acquire("")


def test_threads():
    table = SlotTable(4)
    fps = [f"fp{i}" for i in range(4)]
    slots: dict[str, set[int]] = {fp: set() for fp in fps}
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(k: int) -> None:
        start.wait()
        for i in range(500):
            fp = fps[(k + i) % 4]
            slot = table.acquire(fp)
            with lock:
                slots[fp].add(slot)
            table.release(fp)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert table.in_use() == {} and table.free_count() == 4
    assert all(table.refcount(fp) == 0 for fp in fps)

    # concurrent holders of one fingerprint always see one slot
    table.acquire("shared")
    seen: list[int] = []

    def holder() -> None:
        slot = table.acquire("shared")
        with lock:
            seen.append(slot)

    threads = [threading.Thread(target=holder) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(seen) == {table.slot_of("shared")} and table.refcount("shared") == 17
