"""Where a worker's memory is: the report behind ``GET /v1/emosteer/status?memory=1``.

A resident set that grows while serving is either memory still in use (a leak: Python
objects, tensors, or C/C++ allocations nothing frees) or memory the C allocator holds
free and does not give back (fragmentation). The report separates the two: glibc's
``mallinfo2`` gives the bytes in use and the bytes held free, the garbage collector's
object list gives Python objects by type and size (containers only: strings, bytes and
numbers are not tracked; Python's allocator block count covers them) and the tensors
Python can reach, and, when the worker was started with
``EMOSTEER_TRACEMALLOC=<frames>``, ``tracemalloc`` gives the Python allocation sites
holding the most memory and those that grew since the first report.

Walking every Python object takes a fraction of a second (0.2-0.5 s measured on a
2-core CPU) and stalls the worker's step loop for that long: it is asked for
explicitly, never part of the plain status.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import sys
from collections import Counter

MiB = 2**20
TRACEMALLOC_ENV = "EMOSTEER_TRACEMALLOC"
_first_snapshot = None  # tracemalloc's snapshot at this process's first report


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
    dtype) and, when tracing, the ``top`` allocation sites by size and the ``top`` sites
    that grew most since the first report."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    objs = gc.get_objects()
    types, sizes, tensors = Counter(), Counter(), Counter()
    tensor_bytes = n_tensors = 0
    for o in objs:
        t = type(o)  # type(), not isinstance: no lazy __class__ is touched
        name = _type_name(o)
        types[name] += 1
        if issubclass(t, torch.UntypedStorage):
            continue  # getsizeof reports its data: counted with the tensors
        if not issubclass(t, torch.Tensor):
            try:
                sizes[name] += sys.getsizeof(o)
            except (TypeError, ValueError, RuntimeError):
                pass
        elif issubclass(t, FakeTensor) or o.device.type == "meta":
            tensors["fake/meta"] += 1  # the compiler's shape-only tensors: no storage
        else:
            try:
                nb = o.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):
                nb = 0
            n_tensors += 1
            tensor_bytes += nb if isinstance(nb, int) else 0  # symbolic sizes: not real storage
            tensors[f"{o.device.type}:{str(o.dtype).removeprefix('torch.')}"] += 1
    del objs
    out = {
        "rss_mib": rss_mib(),
        "malloc_mib": malloc_stats(),
        "py_objects": sum(types.values()),
        # blocks in use in Python's own allocator: every Python object, tracked by the
        # collector or not (strings, bytes, numbers too); flat while in_use grows means
        # the growth is below Python (torch, oneDNN, C++ extensions)
        "py_blocks": sys.getallocatedblocks(),
        "py_top_types": types.most_common(top),
        # the same containers by their own size (a dict or list that grows keeps its count)
        "py_top_sizes_kib": [(k, round(v / 1024, 1)) for k, v in sizes.most_common(top)],
        # storages shared by views are counted once per view: an upper bound
        "tensors": {"count": n_tensors, "mib_upper": round(tensor_bytes / MiB, 2),
                    "by_kind": dict(tensors)},
        # vLLM's CPU linear layers (oneDNN matmul) build one primitive per batch size and
        # weight shape; oneDNN keeps up to this many, so a CPU worker's memory grows with
        # each new batch size until the cache is full (docs/MEMORY.md)
        "onednn_primitive_cache_capacity": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                                                          "1024 (default)"),
        "tracemalloc": None,
    }
    import tracemalloc

    if tracemalloc.is_tracing():
        global _first_snapshot
        snap = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__),))
        stats = snap.statistics("lineno")
        if _first_snapshot is None:
            _first_snapshot = snap
        grown = [s for s in snap.compare_to(_first_snapshot, "lineno") if s.size_diff > 0]
        out["tracemalloc"] = {
            "traced_mib": round(tracemalloc.get_traced_memory()[0] / MiB, 2),
            "top": [{"site": str(s.traceback[0]), "kib": round(s.size / 1024, 1), "count": s.count}
                    for s in stats[:top]],
            # since this process's first report: the sites whose memory grew most
            "grown": [{"site": str(s.traceback[0]), "kib": round(s.size_diff / 1024, 1),
                       "count": s.count_diff} for s in grown[:top]],
        }
    # plain values only: the report crosses vLLM's RPC (pickled) and the HTTP answer (JSON)
    return json.loads(json.dumps(out, default=str))


__all__ = ["TRACEMALLOC_ENV", "malloc_stats", "memory_report", "rss_mib", "start_tracing_from_env"]
