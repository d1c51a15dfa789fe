"""Admission: slots and vector-pool rows granted in the scheduler, before a request runs.

vLLM's scheduler walks its waiting queue each step; for LoRA it skips a request whose
adapter would exceed ``max_loras`` (the request stays waiting). emosteer does the same
with steering: ``patches/scheduler.py`` asks ``Admission.try_admit`` for every waiting
request that carries a config; a request that cannot get its slots (and the pool rows
its slots read) stays waiting until a running request finishes. It is never scheduled
without its interventions.

The scheduler is the single owner of both tables. It hands the ids it grants to the
workers inside the request's ``SamplingParams.extra_args[GRANT_KEY]``; a worker only
writes what it is told into its device buffers (``emosteer/vllm/worker/``)::

    front end    compile_request(spec)  -> extra_args["emosteer_plan"]
                 = {"slots": {"prompt": {"fp": "3a..", "keys": ['["res",[["joy","9f..",1.0]],3]', ...]}},
                    "capture_rows": 2}   # capture rows the request may need in one step
    scheduler    try_admit(req, plan)   -> {"slots": {"prompt": 7}, "rows": {key: 12, ...}}
    worker       slot 7 <- scalars + row ids; pool row 12 <- the vector (if not there yet)

Slots are refcounted by fingerprint (requests with the same config share one); pool rows
are refcounted by the slots that read them and, once unreferenced, stay resident and are
evicted least-recently-used first when a new row is needed. Captures are admitted the same
way: a capturing request holds the rows of the per-step capture buffer it can fill in one
step (captured layers x the tokens one step can hold for it), so a step never overflows
the buffer; a request waits while the buffer is spoken for. A slot is released when the
scheduler frees the request (finished, aborted or failed); a preempted request keeps its
slots, so its re-run prompt is steered again with the same rows.

Ordering: a slot or row freed in step N is given to another request in step N+1 at the
earliest; the worker processes step N+1's finished requests before its new ones, so it
never sees two live owners of one id.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from emosteer.request.compile import POOL_KINDS, key_kind, key_rows
from emosteer.request.slots import SlotTable

PLAN_KEY = "emosteer_plan"  # extra_args: what the front end compiled (fingerprints, pool keys)
GRANT_KEY = "emosteer_grant"  # extra_args: what the scheduler granted (slot ids, pool rows)


class PoolFull(RuntimeError):
    """No room for a run key's consecutive rows (``Admission.try_admit`` checks first)."""


class PoolTable:
    """Rows of one pool kind: key -> row id, refcounted by slots, LRU among unreferenced.

    Running example, 2 rows: ref("a") -> 0, ref("b") -> 1, unref("a") (row 0 stays
    resident: a later ref("a") finds it without a rewrite), ref("c") evicts "a" -> 0.

    A run key (``compile.key_rows(key) = N > 1``: a position-aligned head vector, one
    row per listed position) takes N consecutive rows and is known by the first; it is
    placed from the top of the pool down (single rows fill from the bottom up, so runs
    find room): in the highest window of N rows that are free or idle holding the fewest
    idle rows, whose idle keys are evicted. ``try_admit`` places a request's new run keys in a dry run first
    (``snapshot`` / ``restore``), so a request it cannot place keeps waiting.
    """

    def __init__(self, rows: int):
        self.rows = int(rows)
        self._row: dict[str, int] = {}
        self._size: dict[str, int] = {}  # run keys only: rows held
        self._refs: dict[str, int] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # resident, unreferenced, LRU first
        self._free = list(range(self.rows - 1, -1, -1))  # a stack: pops the lowest row first
        self._held = 0  # rows held by resident keys

    def row_of(self, key: str) -> int | None:
        return self._row.get(key)

    def available(self, exclude: set[str]) -> int:
        """Rows a new key could take: free ones plus idle ones not in ``exclude``."""
        return len(self._free) + sum(self._size.get(k, 1) for k in self._idle if k not in exclude)

    def _evict(self, key: str) -> None:
        """Drop the idle ``key``: its rows go back to the free list (its first row on
        top, so a single row taken next reuses it)."""
        del self._idle[key]
        row = self._row.pop(key)
        self._refs.pop(key, None)
        n = self._size.pop(key, 1)
        self._held -= n
        self._free.extend(range(row + n - 1, row - 1, -1))

    def _place_run(self, key: str, n: int) -> int:
        """The first of n consecutive rows for ``key``: the highest window of rows that are
        free or held by idle keys, holding the fewest idle rows (all free if there is such
        a window); the idle keys it overlaps are evicted. One vectorised pass over the pool."""
        if n > self.rows:
            raise PoolFull(f"{key} needs {n} rows; the pool holds {self.rows}")
        free = np.zeros(self.rows, dtype=bool)
        free[self._free] = True
        idle = np.zeros(self.rows, dtype=bool)
        for k in self._idle:
            r0 = self._row[k]
            idle[r0:r0 + self._size.get(k, 1)] = True
        bad = np.concatenate(([0], np.cumsum(~(free | idle))))
        cost = np.concatenate(([0], np.cumsum(idle)))
        starts = np.arange(self.rows - n + 1)
        ok = (bad[starts + n] - bad[starts]) == 0
        if not ok.any():
            raise PoolFull(f"no {n} consecutive free or idle pool rows for {key}")
        c = np.where(ok, cost[starts + n] - cost[starts], np.iinfo(np.int64).max)
        best = np.flatnonzero(c == c.min())
        start = int(best[-1])  # the highest such window
        for k in [k for k in self._idle
                  if self._row[k] < start + n and start < self._row[k] + self._size.get(k, 1)]:
            self._evict(k)
        taken = set(range(start, start + n))
        self._free = [r for r in self._free if r not in taken]
        self._size[key] = n
        return start

    def snapshot(self) -> tuple:
        """The table's state, for a dry run of ``ref`` calls undone by ``restore``."""
        return (dict(self._row), dict(self._size), dict(self._refs), OrderedDict(self._idle),
                list(self._free), self._held)

    def restore(self, snap: tuple) -> None:
        (self._row, self._size, self._refs, self._idle, self._free, self._held) = (
            snap[0], snap[1], snap[2], snap[3], snap[4], snap[5])

    def ref(self, key: str) -> int:
        """Take a reference on ``key``, placing it if it is not resident (``PoolFull``
        when it cannot be: only a run key, whose N rows must be consecutive)."""
        row = self._row.get(key)
        if row is not None:
            self._idle.pop(key, None)
            self._refs[key] = self._refs.get(key, 0) + 1
            return row
        n = key_rows(key)
        if n > 1:
            row = self._place_run(key, n)
        else:
            if not self._free:
                self._evict(next(iter(self._idle)))  # least recently used
            row = self._free.pop()
        self._row[key] = row
        self._refs[key] = 1
        self._held += n
        return row

    def unref(self, key: str) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self._idle[key] = None

    def in_use(self) -> int:
        """Rows held by referenced keys."""
        return sum(self._size.get(k, 1) for k in self._refs)

    def resident(self) -> int:
        """Rows held by resident keys (referenced or idle)."""
        return self._held


@dataclass
class Capacity:
    max_slots: int
    rows: dict[str, int]  # pool kind -> rows
    capture_rows: int = 8192  # rows of the per-step capture buffer


class Admission:
    """The scheduler's slot and pool accounting (one per engine core)."""

    def __init__(self, capacity: Capacity):
        self.capacity = capacity
        self.slots = SlotTable(capacity.max_slots)
        self.pools = {k: PoolTable(capacity.rows[k]) for k in POOL_KINDS}
        self._keys: dict[str, list[str]] = {}  # fingerprint -> pool keys its slot reads
        self._grants: dict[str, dict] = {}  # request id -> grant
        self._fps: dict[str, list[str]] = {}  # request id -> fingerprints it holds
        self._cap: dict[str, int] = {}  # request id -> capture rows it holds
        self.capture_in_use = 0
        self.waiting_for_slots: set[str] = set()
        # Fail closed: no steered request is admitted until every worker has confirmed
        # that its model runner carries emosteer's hooks (the start-up handshake run by
        # the EngineCore patch, ``patches/scheduler.py``); until then, or if a worker
        # cannot, ``refusal`` says why and steered requests are finished with that error.
        self.refusal: str | None = "the engine has not completed emosteer's start-up handshake"
        self.handshake_done = False
        self._refused: dict[str, str] = {}  # request id -> why, to finish at the next update
        self._lock = threading.Lock()
        global _scheduler_here
        _scheduler_here = True

    @staticmethod
    def fits(plan: dict, capacity: Capacity) -> str | None:
        """Why ``plan`` could never be admitted (None if it can, given an idle engine)."""
        phases = plan.get("slots", {})
        slots = len({ph["fp"] for ph in phases.values()})
        if slots > capacity.max_slots:
            return f"the config needs {slots} slots and max_slots is {capacity.max_slots}"
        cap = int(plan.get("capture_rows", 0))
        if cap > capacity.capture_rows:
            return (
                f"the capture needs {cap} rows in one step and the capture buffer holds "
                f"{capacity.capture_rows}; raise additional_config.emosteer.capture_rows"
            )
        need: dict[str, set[str]] = {k: set() for k in POOL_KINDS}
        for ph in phases.values():
            for key in ph["keys"]:
                need[key_kind(key)].add(key)
        for kind, keys in need.items():
            rows = sum(key_rows(k) for k in keys)
            if rows > capacity.rows[kind]:
                return (
                    f"the config needs {rows} {kind!r} pool rows and the pool holds "
                    f"{capacity.rows[kind]}; raise additional_config.emosteer.pool_mib"
                )
        return None

    def set_ready(self, refusal: str | None) -> None:
        """The handshake's outcome: None = every worker carries emosteer's hooks."""
        self.refusal = refusal
        self.handshake_done = True

    def refuse(self, req_id: str) -> None:
        """``req_id`` carries a config this engine cannot apply (``refusal``): it stays
        out of the batch and is finished with an error at the next scheduler update."""
        with self._lock:
            self._refused.setdefault(req_id, str(self.refusal))

    def take_refused(self) -> dict[str, str]:
        with self._lock:
            out, self._refused = self._refused, {}
            return out

    def try_admit(self, req_id: str, plan: dict) -> dict | None:
        """The grant for ``req_id`` (the same one on every call once admitted), or None
        when its slots or rows are not available now (the request keeps waiting)."""
        with self._lock:
            got = self._grants.get(req_id)
            if got is not None:
                return got
            cap = int(plan.get("capture_rows", 0))
            if cap and self.capture_in_use + cap > self.capacity.capture_rows:
                self.waiting_for_slots.add(req_id)
                return None
            plan = plan.get("slots", {})
            new_fps = {ph["fp"]: ph["keys"] for ph in plan.values() if self.slots.slot_of(ph["fp"]) is None}
            if len(new_fps) > self.slots.free_count():
                self.waiting_for_slots.add(req_id)
                return None
            need: dict[str, set[str]] = {k: set() for k in POOL_KINDS}
            for keys in new_fps.values():
                for key in keys:
                    kind = key_kind(key)
                    if self.pools[kind].row_of(key) is None:
                        need[kind].add(key)
            pinned = {k for keys2 in new_fps.values() for k in keys2}
            for kind, keys in need.items():
                if not keys:
                    continue
                if sum(key_rows(k) for k in keys) > self.pools[kind].available(pinned):
                    self.waiting_for_slots.add(req_id)
                    return None
            # Resident rows first, so that making room for the missing ones can never
            # evict a row this request is about to read; then runs, largest first.
            pairs = [key for keys in new_fps.values() for key in keys]
            pairs.sort(key=lambda k: (0 if self.pools[key_kind(k)].row_of(k) is not None else 1,
                                      -key_rows(k)))  # stable
            if any(key_rows(k) > 1 for keys in need.values() for k in keys) and not self._dry_run(pairs):
                self.waiting_for_slots.add(req_id)
                return None
            slots: dict[str, int] = {}
            held: list[str] = []
            taken: list[str] = []
            for phase, ph in plan.items():
                fp = ph["fp"]
                slot, new = self.slots.acquire_new(fp)
                slots[phase] = slot
                held.append(fp)
                if new:
                    self._keys[fp] = list(ph["keys"])
                    taken.append(fp)
            # (``taken`` is ``new_fps`` in order: ``pairs`` are the keys of the new slots.)
            for key in pairs:
                self.pools[key_kind(key)].ref(key)
            rows = {
                key: self.pools[key_kind(key)].row_of(key)
                for ph in plan.values()
                for key in ph["keys"]
            }
            grant = {"slots": slots, "rows": rows, "capture_rows": cap}
            self._grants[req_id] = grant
            self._fps[req_id] = held
            if cap:
                self._cap[req_id] = cap
                self.capture_in_use += cap
            self.waiting_for_slots.discard(req_id)
            return grant

    def _dry_run(self, keys: list[str]) -> bool:
        """Whether ``ref`` can place every key in this order (runs need consecutive
        rows); the pools are left as they were."""
        snaps = {kind: pool.snapshot() for kind, pool in self.pools.items()}
        try:
            for key in keys:
                self.pools[key_kind(key)].ref(key)
            return True
        except PoolFull:
            return False
        finally:
            for kind, snap in snaps.items():
                self.pools[kind].restore(snap)

    def release(self, req_id: str) -> None:
        """The request is gone (finished, aborted, failed): drop its slot holds."""
        with self._lock:
            self.waiting_for_slots.discard(req_id)
            self._grants.pop(req_id, None)
            self.capture_in_use -= self._cap.pop(req_id, 0)
            for fp in self._fps.pop(req_id, ()):
                if self.slots.release(fp):
                    for key in self._keys.pop(fp, ()):
                        self.pools[key_kind(key)].unref(key)

    def status(self) -> dict:
        with self._lock:
            return {
                "ready": self.refusal is None,
                "refusal": self.refusal,
                "slots_in_use": len(self.slots),
                "max_slots": self.capacity.max_slots,
                "admitted_requests": len(self._grants),
                "waiting_for_slots": len(self.waiting_for_slots),
                "capture_rows_in_use": self.capture_in_use,
                "capture_rows": self.capacity.capture_rows,
                "pool_rows": dict(self.capacity.rows),
                "pool_rows_in_use": {k: p.in_use() for k, p in self.pools.items()},
                "pool_rows_resident": {k: p.resident() for k, p in self.pools.items()},
            }


__all__ = ["Admission", "Capacity", "PoolFull", "PoolTable", "PLAN_KEY", "GRANT_KEY", "report_failure",
           "take_failures", "discard_failures"]


# -- worker -> scheduler: requests a worker could not apply -----------------------------
# With vLLM's in-process executor (one worker, the engine core's own process) the worker
# and the scheduler share this table; with separate worker processes the worker also
# attaches its failures to the ModelRunnerOutput it returns (``_emosteer_failed``).
_failed: dict[str, str] = {}
_failed_lock = threading.Lock()


def report_failure(req_id: str, message: str) -> None:
    with _failed_lock:
        _failed.setdefault(req_id, message)


_scheduler_here = False  # an Admission (hence a scheduler) lives in this process


def discard_failures(req_ids) -> None:
    """The worker also attached these to its step output. In a worker process of its
    own nobody would ever take them from the table, so drop them there; beside the
    scheduler the table stays the channel (an output object may be rebuilt on the way)."""
    if _scheduler_here:
        return
    with _failed_lock:
        for rid in req_ids:
            _failed.pop(rid, None)


def take_failures() -> dict[str, str]:
    with _failed_lock:
        out = dict(_failed)
        _failed.clear()
        return out
