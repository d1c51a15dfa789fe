"""Plugin settings: ``additional_config={"emosteer": {...}}`` of the vLLM engine, then
environment variables, then defaults.

``additional_config`` is part of vLLM's config hash, so engines with different buffer
sizes never share a compile cache. Keys: ``max_slots`` (distinct intervention configs
resident at once, default 32), ``capture_rows`` (rows of the per-step capture buffers,
default 4096), ``bank`` (a bank file loaded at start-up; env ``EMOSTEER_BANK``),
``impl`` (force an op implementation; env ``EMOSTEER_IMPL``), ``keep_captures``
(finished requests whose captures wait to be fetched, default 4096).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

CONFIG_KEY = "emosteer"
_INT_KEYS = ("max_slots", "capture_rows", "keep_captures")


@dataclass(frozen=True)
class PluginSettings:
    max_slots: int = 32
    capture_rows: int = 4096
    bank: str | None = None
    impl: str | None = None
    keep_captures: int = 4096

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
    if raw.get("bank") is None and os.environ.get("EMOSTEER_BANK"):
        raw["bank"] = os.environ["EMOSTEER_BANK"]
    if raw.get("impl") is None and os.environ.get("EMOSTEER_IMPL"):
        raw["impl"] = os.environ["EMOSTEER_IMPL"]
    return PluginSettings(**raw)


def settings_from_vllm_config(vllm_config: Any) -> PluginSettings:
    return settings_from_additional(getattr(vllm_config, "additional_config", None))
