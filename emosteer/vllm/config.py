"""Plugin settings: ``additional_config={"emosteer": {...}}`` of the vLLM engine, then
environment variables, then defaults.

``additional_config`` is part of vLLM's config hash, so engines with different buffer
sizes never share a compile cache. Keys: ``max_slots`` (distinct intervention configs
resident at once, default 256; a slot is a few small index tables), ``pool_mib`` (device
memory of the vector pool, default 64: rows of residual vectors, head vectors and neuron
masks, one per vector and layer), ``pool_rows`` (rows per pool kind, overriding
``pool_mib``: small pools for tests of eviction), ``capture_rows`` (rows of the per-step capture
buffers, default 8192; capturing requests are admitted while their rows fit, so a step
never overflows), ``bank`` (a bank file loaded at start-up; env ``EMOSTEER_BANK``),
``impl`` (force an op implementation; env ``EMOSTEER_IMPL``), ``keep_captures``
(finished requests whose captures wait to be fetched, default 4096), ``capture_ttl_s``
(how long they wait, default 600 s), ``upload_mib`` (largest vector upload over HTTP,
default 64), ``inline_mib`` (largest total of the inline vectors one request carries,
decoded, default 16; at most ``inline.MAX_INLINE_BYTES``, 256 MiB).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

CONFIG_KEY = "emosteer"
DEFAULT_CAPTURE_ROWS = 8192  # at least a request's own limit (spec.MAX_CAPTURE_ROWS, 4096)
_INT_KEYS = ("max_slots", "capture_rows", "keep_captures", "pool_mib", "pool_rows", "capture_ttl_s",
             "upload_mib", "inline_mib")


@dataclass(frozen=True)
class PluginSettings:
    max_slots: int = 256
    pool_mib: int = 64
    pool_rows: int | None = None
    capture_rows: int | None = None
    bank: str | None = None
    impl: str | None = None
    keep_captures: int = 4096
    capture_ttl_s: int = 600
    upload_mib: int = 64
    inline_mib: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


def settings_from_additional(additional: Any) -> PluginSettings:
    """Settings from a vLLM ``additional_config`` (dict or None) and the environment."""
    raw = {}
    if isinstance(additional, dict) and isinstance(additional.get(CONFIG_KEY), dict):
        raw = dict(additional[CONFIG_KEY])
    unknown = sorted(set(raw) - set(PluginSettings.__dataclass_fields__))
    if unknown:
        raise ValueError(
            f"additional_config.{CONFIG_KEY} has unknown key(s) {unknown}; "
            f"allowed: {sorted(PluginSettings.__dataclass_fields__)}"
        )
    for key in _INT_KEYS:
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"additional_config.{CONFIG_KEY}.{key} must be a positive int, got {value!r}")
    from emosteer.request.inline import MAX_INLINE_BYTES

    if raw.get("inline_mib", 0) > MAX_INLINE_BYTES // 2**20:
        raise ValueError(f"additional_config.{CONFIG_KEY}.inline_mib must be at most "
                         f"{MAX_INLINE_BYTES // 2**20}, got {raw['inline_mib']}")
    if raw.get("bank") is None and os.environ.get("EMOSTEER_BANK"):
        raw["bank"] = os.environ["EMOSTEER_BANK"]
    if raw.get("impl") is None and os.environ.get("EMOSTEER_IMPL"):
        raw["impl"] = os.environ["EMOSTEER_IMPL"]
    return PluginSettings(**raw)


def settings_from_vllm_config(vllm_config: Any) -> PluginSettings:
    return settings_from_additional(getattr(vllm_config, "additional_config", None))


def capacity_for(settings: PluginSettings, info: Any, dtype: Any, tp_size: int = 1):
    """Slots and pool rows of an engine; the front end, the scheduler and every worker
    compute the same numbers from the same settings.

    The pool's bytes are split so that each kind gets the same number of rows: a row of
    each kind costs ``d`` (residual) + ``H/tp * D`` (head) elements of the model dtype and
    ``I/tp`` float32 (neuron mask) and ``d`` float32 (probe).
    """
    import torch

    from emosteer.vllm.admission import Capacity

    el = torch.empty((), dtype=dtype).element_size()
    per = info.hidden_size * el + (info.num_heads // tp_size) * info.head_dim * el
    per += (info.intermediate_size // tp_size) * 4 + info.hidden_size * 4  # + a probe row
    rows = settings.pool_rows or max(1, (settings.pool_mib * 2**20) // per)
    return Capacity(max_slots=settings.max_slots,
                    rows={"res": rows, "head": rows, "neu": rows, "probe": rows},
                    capture_rows=settings.capture_rows or DEFAULT_CAPTURE_ROWS)
