"""Where a worker's memory is: the report behind ``GET /v1/emosteer/status?memory=1``.

A resident set that grows while serving is either memory still in use (a leak: Python
objects, tensors, or C/C++ allocations nothing frees) or memory the C allocator holds
free and does not give back (fragmentation). The report separates the two: glibc's
``mallinfo2`` gives the bytes in use and the bytes held free, the garbage collector's
object list gives Python objects by type and the tensors Python can reach, and, when the
worker was started with ``EMOSTEER_TRACEMALLOC=<frames>``, ``tracemalloc`` gives the
Python allocation sites holding the most memory.

Walking every Python object takes tens of milliseconds and stalls the worker's step
loop for that long: it is asked for explicitly, never part of the plain status.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
from collections import Counter

MiB = 2**20
TRACEMALLOC_ENV = "EMOSTEER_TRACEMALLOC"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def malloc_stats() -> dict | None:
    """glibc's allocator over all arenas, MiB: ``in_use`` (allocated and not freed),
    ``free`` (held in the heap, free), ``mmap`` (large blocks mapped directly, in use);
    None where the C library has no ``mallinfo2`` (glibc < 2.33, musl)."""
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None
    if fn is None:
        return None
    fn.restype = _MallInfo2
    m = fn()
    return {"in_use": round((m.uordblks + m.hblkhd) / MiB, 2), "free": round(m.fordblks / MiB, 2),
            "mmap": round(m.hblkhd / MiB, 2), "heap": round(m.arena / MiB, 2)}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / MiB, 2)


def start_tracing_from_env() -> bool:
    """Start ``tracemalloc`` if ``EMOSTEER_TRACEMALLOC`` names a frame count (call once,
    when the worker is set up). It slows every Python allocation: diagnosis only."""
    import tracemalloc

    frames = os.environ.get(TRACEMALLOC_ENV, "").strip()
    if not frames or tracemalloc.is_tracing():
        return tracemalloc.is_tracing()
    try:
        n = int(frames)
    except ValueError:
        raise ValueError(f"{TRACEMALLOC_ENV} must be a frame count (an integer), got {frames!r}") from None
    tracemalloc.start(max(1, n))
    return True


def _type_name(o) -> str:
    t = type(o)
    name = getattr(t, "__qualname__", None)
    return name if isinstance(name, str) else str(getattr(t, "__name__", t))


def memory_report(top: int = 12) -> dict:
    """This process's memory: RSS, the allocator's in-use/free split, Python objects by
    type (the ``top`` most numerous), tensors Python can reach (count, MiB, by device and
    dtype) and, when tracing, the ``top`` allocation sites by size."""
    import torch

    gc.collect()
    objs = gc.get_objects()
    types = Counter(_type_name(o) for o in objs)
    tensors = Counter()
    tensor_bytes = 0
    n_tensors = 0
    for o in objs:
        if issubclass(type(o), torch.Tensor):  # type(), not isinstance: no lazy __class__
            try:
                nb = o.untyped_storage().nbytes() if o.device.type != "meta" else 0
            except (RuntimeError, NotImplementedError):
                nb = 0
            n_tensors += 1
            tensor_bytes += nb
            tensors[f"{o.device.type}:{str(o.dtype).removeprefix('torch.')}"] += 1
    del objs
    out = {
        "rss_mib": rss_mib(),
        "malloc_mib": malloc_stats(),
        "py_objects": sum(types.values()),
        "py_top_types": types.most_common(top),
        # storages shared by views are counted once per view: an upper bound
        "tensors": {"count": n_tensors, "mib_upper": round(tensor_bytes / MiB, 2),
                    "by_kind": dict(tensors)},
        "tracemalloc": None,
    }
    import tracemalloc

    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__),))
        stats = snap.statistics("lineno")
        out["tracemalloc"] = {
            "traced_mib": round(tracemalloc.get_traced_memory()[0] / MiB, 2),
            "top": [{"site": str(s.traceback[0]), "kib": round(s.size / 1024, 1), "count": s.count}
                    for s in stats[:top]],
        }
    # plain values only: the report crosses vLLM's RPC (pickled) and the HTTP answer (JSON)
    return json.loads(json.dumps(out, default=str))


__all__ = ["TRACEMALLOC_ENV", "malloc_stats", "memory_report", "rss_mib", "start_tracing_from_env"]
