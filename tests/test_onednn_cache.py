"""benchmarks/onednn_cache.py: vLLM's CPU oneDNN matmul keeps a primitive per batch size,
so the allocator's bytes in use grow with each new batch size (the source of a CPU
worker's memory growth under varied load)."""

from __future__ import annotations

import os
import sys

import pytest

_BENCH = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)
import onednn_cache as oc  # noqa: E402


def test_linear_shapes_of_the_default_model():
    shapes = oc.linear_shapes("default")
    (h, qkv), (o_in, o_out), (g_in, gate_up), (inter, d_out) = shapes
    assert h == o_out == g_in == d_out and gate_up == 2 * inter and qkv > h >= o_in > 0


def test_memory_grows_with_new_batch_sizes_only(tmp_path):
    from vllm import _custom_ops as ops

    if not getattr(ops, "_supports_onednn", False):
        pytest.skip("this vLLM build has no oneDNN matmul")
    rows = oc.measure("default", ["default"], 16, str(tmp_path))
    assert [r["distinct_m"] for r in rows] == [0, 8, 16]
    # four weight shapes x 16 batch sizes: well over a MiB of primitives, growing
    assert 1.0 < rows[1]["in_use_mib"] < rows[2]["in_use_mib"], rows
    assert (tmp_path / "onednn_cache.csv").read_text().startswith("run,capacity,distinct_m")
    assert os.path.getsize(oc.plot(str(tmp_path))) > 10000
