"""The emosteer vLLM plugin: per-request steering, head patching and capture inside vLLM.

vLLM calls ``register()`` in every process it starts (entry point
``vllm.general_plugins: emosteer = emosteer.vllm:register``). It checks the vLLM version
and applies the patches in ``emosteer/vllm/patches/`` (each one file named after what it
patches, with ``apply()``/``revert()``); the patched code calls emosteer's in-place
custom ops on buffers that ``emosteer.vllm.worker.WorkerSteering`` allocates once per
model. Nothing is imported from vLLM until ``register()`` runs.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("emosteer.vllm")

SUPPORTED_VLLM = ((0, 32), (0, 33))  # [lower, upper): 0.32.x only
_lock = threading.Lock()
_registered = False
_guarded = False  # outside the supported range: only the refusing guard is installed


class UnsupportedVLLMVersion(RuntimeError):
    """The installed vLLM is outside the range whose internals the patches target."""


def check_vllm_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of vLLM; raises UnsupportedVLLMVersion outside SUPPORTED_VLLM."""
    if version is None:
        import vllm

        version = vllm.__version__
    parts = version.split("+")[0].split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise UnsupportedVLLMVersion(f"cannot parse the vLLM version {version!r}") from None
    lo, hi = SUPPORTED_VLLM
    if not lo <= (major, minor) < hi:
        raise UnsupportedVLLMVersion(
            f"emosteer's vLLM plugin supports vLLM {lo[0]}.{lo[1]}.x only; found {version}. "
            "Its patches target vLLM internals (Attention.forward, RMSNorm.forward, "
            "GPUModelRunner._model_forward ...) that change between minor versions. "
            "Install vllm>=0.32,<0.33 or set VLLM_PLUGINS to exclude 'emosteer'."
        )
    return major, minor


V2_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def engine_logger() -> logging.Logger:
    """A logger under vLLM's own ("vllm.emosteer"): its lines appear in the engine's log
    with vLLM's format and level, where an operator reads them."""
    from vllm.logger import init_logger

    return init_logger("vllm.emosteer")


def select_model_runner() -> bool:
    """Select vLLM's V1 model runner unless the user chose one: emosteer's worker hooks
    live in the V1 runners (``GPUModelRunner`` and the CPU runner); vLLM 0.32 picks its
    Model Runner V2 by default wherever Triton imports (every CUDA install), and V2 would
    run steered requests without their interventions. Sets ``VLLM_USE_V2_MODEL_RUNNER=0``
    before vLLM builds its config (plugins load first); a user who forces V2 keeps it,
    and the start-up handshake then refuses steered requests. True if it set the variable."""
    import os

    if V2_ENV in os.environ:
        if os.environ[V2_ENV].strip().lower() in ("1", "true"):
            engine_logger().warning("emosteer: %s=1 forces vLLM's Model Runner V2, which emosteer does not "
                           "patch: steered requests will be refused (plain ones are served)", V2_ENV)
        return False
    os.environ[V2_ENV] = "0"
    try:  # where Triton works vLLM would have picked V2: say so where it is seen
        from vllm.triton_utils import HAS_TRITON
    except Exception:
        HAS_TRITON = False
    (engine_logger().warning if HAS_TRITON else engine_logger().info)("emosteer: selected vLLM's V1 model runner (%s=0): emosteer's hooks live there",
                V2_ENV)
    return True


def register(version: str | None = None) -> None:
    """Apply every patch once per process (idempotent, thread-safe).

    Outside the supported vLLM range nothing of vLLM is patched except one guard: the
    plugin logs a single clear error, plain requests are served by plain vLLM, and a
    request that carries an emosteer config is refused (it is never run unsteered).
    ``version`` overrides the installed version (tests)."""
    global _registered, _guarded
    with _lock:
        if _registered or _guarded:
            return
        try:
            check_vllm_version(version)
        except UnsupportedVLLMVersion as e:
            logger.error("emosteer: the vLLM plugin stays out of the way: %s", e)
            from emosteer.vllm import guard

            guard.apply(str(e))
            _guarded = True
            return
        from emosteer.vllm import patches

        select_model_runner()
        patches.apply_all()
        _registered = True
        logger.debug("emosteer vLLM plugin registered (%d patches)", len(patches.PATCHES))


def unregister() -> None:
    """Revert every patch (tests; a process normally keeps the plugin for its lifetime)."""
    global _registered, _guarded
    with _lock:
        if _guarded:
            from emosteer.vllm import guard

            guard.revert()
            _guarded = False
        if not _registered:
            return
        from emosteer.vllm import patches

        patches.revert_all()
        _registered = False


def is_registered() -> bool:
    return _registered


__all__ = ["register", "unregister", "select_model_runner", "is_registered", "check_vllm_version", "UnsupportedVLLMVersion"]
