"""Refcounted slot table: which device slot holds which intervention config.

Each request with an intervention holds one slot, found by its config fingerprint
(``SteerSpec.fingerprint``); requests with the same fingerprint share the slot, and the
slot is freed when the last of them releases it (the multi-LoRA ``max_loras`` design).
The table is pure Python; the plugin owns the device buffers that slot ids index.

Design choice: the table itself never blocks or queues. When every slot is taken,
``acquire`` raises ``SlotsExhausted`` at once. Waiting is the caller's job: the vLLM
scheduler's admission (``emosteer/vllm/admission.py``) checks ``free_count`` first and
leaves a request waiting in vLLM's queue. Keeping the table non-blocking keeps it safe
to call from the engine's scheduling step, where blocking would stall every request.
"""

from __future__ import annotations

import threading


class SlotsExhausted(RuntimeError):
    """Every slot holds a different config; raised instead of waiting."""


class SlotTable:
    """``max_slots`` slots, ids 0..max_slots-1, refcounted by fingerprint.

    Running example, max_slots=2: acquire("a") -> 0, acquire("b") -> 1,
    acquire("a") -> 0 (refcount 2), acquire("c") raises SlotsExhausted,
    release("b") frees slot 1, acquire("c") -> 1.
    """

    def __init__(self, max_slots: int):
        if isinstance(max_slots, bool) or not isinstance(max_slots, int) or max_slots < 1:
            raise ValueError(f"max_slots must be a positive int, got {max_slots!r}")
        self.max_slots = max_slots
        self._lock = threading.Lock()
        self._slot: dict[str, int] = {}  # fingerprint -> slot id
        self._refs: dict[str, int] = {}  # fingerprint -> holders
        self._free: list[int] = list(range(max_slots - 1, -1, -1))  # pop() gives the lowest id

    def acquire(self, fingerprint: str) -> int:
        """Slot id for ``fingerprint`` (refcount + 1), taking a free slot if it holds
        none yet; raises SlotsExhausted when none is free."""
        return self.acquire_new(fingerprint)[0]

    def acquire_new(self, fingerprint: str) -> tuple[int, bool]:
        """Like ``acquire``, and also whether the slot was newly taken (so the caller
        must write the config's tensors into the device buffers at that slot)."""
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
        with self._lock:
            slot = self._slot.get(fingerprint)
            if slot is not None:
                self._refs[fingerprint] += 1
                return slot, False
            if not self._free:
                raise SlotsExhausted(
                    f"all {self.max_slots} slots hold distinct intervention configs; wait for "
                    f"requests to finish, or raise max_slots (emosteer.LLM(..., max_slots=N)) "
                    f"to serve more distinct configs at once"
                )
            slot = self._free.pop()
            self._slot[fingerprint] = slot
            self._refs[fingerprint] = 1
            return slot, True

    def release(self, fingerprint: str) -> bool:
        """Drop one hold; returns True when the slot became free."""
        with self._lock:
            if fingerprint not in self._refs:
                raise KeyError(f"release of unknown fingerprint {fingerprint!r}: it holds no slot")
            self._refs[fingerprint] -= 1
            if self._refs[fingerprint] > 0:
                return False
            del self._refs[fingerprint]
            self._free.append(self._slot.pop(fingerprint))
            self._free.sort(reverse=True)  # reuse low ids first: deterministic layouts
            return True

    def slot_of(self, fingerprint: str) -> int | None:
        with self._lock:
            return self._slot.get(fingerprint)

    def in_use(self) -> dict[str, int]:
        """fingerprint -> slot id of every held slot (a copy)."""
        with self._lock:
            return dict(self._slot)

    def refcount(self, fingerprint: str) -> int:
        """Holders of ``fingerprint`` (0 when it holds no slot)."""
        with self._lock:
            return self._refs.get(fingerprint, 0)

    def free_count(self) -> int:
        with self._lock:
            return len(self._free)

    def __len__(self) -> int:
        with self._lock:
            return len(self._slot)

    def __repr__(self) -> str:
        return f"SlotTable(max_slots={self.max_slots}, in_use={len(self)})"


__all__ = ["SlotTable", "SlotsExhausted"]
