"""Device memory of emosteer's slot tables and vector pool for common model shapes.

Computed from the real buffer classes (allocated on the ``meta`` device, so nothing is
allocated): ``python benchmarks/memory_table.py`` prints the README's table.
"""

from __future__ import annotations

import torch

from emosteer.request.bank import ModelInfo
from emosteer.vllm.buffers import Shape, SteerBuffers
from emosteer.vllm.config import PluginSettings, capacity_for

SHAPES = {  # name: (layers, hidden, heads, kv heads, head_dim, intermediate)
    "0.5B (Qwen2.5-0.5B shape)": (24, 896, 14, 2, 64, 4864),
    "4B (Qwen3-4B / Qwen3-VL-4B text)": (36, 2560, 32, 8, 128, 9728),
    "8B (Qwen3-8B / Qwen3-VL-8B text)": (36, 4096, 32, 8, 128, 12288),
}


def rows(max_slots: int = 256, pool_mib: int = 64, dtype=torch.bfloat16) -> list[dict]:
    out = []
    for name, (L, d, H, kv, D, I) in SHAPES.items():
        info = ModelInfo(architecture="LlamaForCausalLM", num_layers=L, hidden_size=d, num_heads=H, num_kv_heads=kv, head_dim=D,
                         intermediate_size=I)
        cap = capacity_for(PluginSettings(max_slots=max_slots, pool_mib=pool_mib), info, dtype)
        shape = Shape(num_layers=L, max_slots=max_slots, heads=H, head_dim=D, hidden=d, neurons=I,
                      max_tokens=1, capture_rows=1, pool_rows=cap.rows)
        bufs = SteerBuffers(shape, dtype, torch.device("meta"))
        out.append({
            "model": name,
            "slots": max_slots,
            "slot_tables_mib": bufs.nbytes("slots") / 2**20,
            "pool_mib": bufs.nbytes("pool") / 2**20,
            "pool_rows_per_kind": cap.rows["res"],
            "full_depth_vectors": cap.rows["res"] // L,
            # The first version kept a private copy of every vector in each slot.
            "private_copies_mib": L * max_slots * ((H * D + d) * 2 + I * 4 + 2 * H * 4 + 4) / 2**20,
        })
    return out


if __name__ == "__main__":
    print("| model shape | slots | slot tables | pool (default 64 MiB) | rows per kind | full-depth vectors per kind | private copies per slot (old layout) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows():
        print(f"| {r['model']} | {r['slots']} | {r['slot_tables_mib']:.2f} MiB | {r['pool_mib']:.1f} MiB "
              f"| {r['pool_rows_per_kind']:,} | {r['full_depth_vectors']} | {r['private_copies_mib']:.0f} MiB |")
