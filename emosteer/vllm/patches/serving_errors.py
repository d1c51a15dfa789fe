"""Patch ``vllm.entrypoints.generate.base.serving.GenerateBaseServing._raise_if_error``.

Runs in: the front-end process of the OpenAI server.
Upstream (vLLM 0.32.0): https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/entrypoints/generate/base/serving.py

Replaces: ``_raise_if_error(finish_reason, request_id)``, which the OpenAI server's
completion and chat handlers call for every output and which turns
``finish_reason == "error"`` into ``GenerationError("Internal server error")`` (HTTP 500).
For a request that carried an emosteer config, the error says that emosteer stopped it:
the engine could not apply its interventions, and emosteer fails such a request rather
than answer with text generated without them. Other requests keep vLLM's message.
Why: the client must see that the failure is emosteer's, not a generic engine fault.
When it can go: when vLLM forwards a per-request error message from the engine core.
"""

from __future__ import annotations

import functools

from emosteer.vllm.patches import Swap

_swap: Swap | None = None
MESSAGE = (
    "emosteer: this request's interventions could not be applied in the engine, so it "
    "was stopped instead of being answered without them (the server log names the cause)"
)


def _make(original):
    @functools.wraps(original)
    def _raise_if_error(self, finish_reason, request_id):
        if finish_reason == "error":
            from emosteer.vllm.patches.input_processor import carried_emosteer

            if carried_emosteer(str(request_id)):
                from vllm.exceptions import GenerationError

                raise GenerationError(MESSAGE)
        return original(self, finish_reason, request_id)

    return _raise_if_error


def apply() -> None:
    """Applied only where the server code is already imported (the API server's
    process); ``input_processor`` calls this again on the first steered request, so
    engine processes never import the server for it."""
    global _swap
    import sys

    mod = sys.modules.get("vllm.entrypoints.generate.base.serving")
    GenerateBaseServing = getattr(mod, "GenerateBaseServing", None)
    if GenerateBaseServing is None:
        return
    if _swap is None:
        _swap = Swap(GenerateBaseServing, "_raise_if_error", _make)
    _swap.apply()


def revert() -> None:
    if _swap is not None:
        _swap.revert()
