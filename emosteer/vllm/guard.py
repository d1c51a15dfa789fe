"""The guard installed instead of the patches when vLLM's version is outside the range
the patches target (``emosteer/vllm/__init__.py``).

It wraps the one public entry every request passes, ``vllm.LLM``'s and the OpenAI
server's input processing, as loosely as possible (any signature): a request whose
``SamplingParams.extra_args`` carries an ``"emosteer"`` config is refused with a
``ValueError`` naming the version problem; every other request is untouched. If even
that entry point cannot be found, nothing is patched and the error logged at start-up
is all there is (no request can then reach emosteer's code: steered configs are simply
not read by this vLLM, which the log says).
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("emosteer.vllm")
_target = None
_original = None


def _carried(args, kwargs) -> bool:
    for value in list(args) + list(kwargs.values()):
        extra = getattr(value, "extra_args", None)
        if isinstance(extra, dict) and "emosteer" in extra:
            return True
    return False


def apply(reason: str) -> None:
    global _target, _original
    if _target is not None:
        return
    try:
        from vllm.v1.engine.input_processor import InputProcessor
    except Exception:  # noqa: BLE001  an unknown vLLM layout: stay fully out
        logger.error("emosteer: no request guard could be installed on this vLLM")
        return
    original = getattr(InputProcessor, "process_inputs", None)
    if original is None:
        logger.error("emosteer: no request guard could be installed on this vLLM")
        return

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        if _carried(args, kwargs):
            raise ValueError(f"emosteer: this request carries an emosteer config, but {reason}")
        return _original(self, *args, **kwargs)

    InputProcessor.process_inputs = process_inputs
    _target, _original = InputProcessor, original


def revert() -> None:
    global _target, _original
    if _target is not None:
        _target.process_inputs = _original
        _target = _original = None


def is_active() -> bool:
    return _target is not None
