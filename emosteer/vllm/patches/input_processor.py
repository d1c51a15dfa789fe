"""Patch ``vllm.v1.engine.input_processor.InputProcessor.process_inputs``.

Runs in: the front-end process (the API server, or the process that made ``vllm.LLM``).
Upstream (vLLM 0.32.0): https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/v1/engine/input_processor.py

Replaces: ``process_inputs`` (turns a prompt + params into the ``EngineCoreRequest``
sent to the engine). After the original, a request whose ``extra_args`` hold an
``"emosteer"`` config is checked (``SpecError`` naming the field, raised before the
request reaches the engine, as a ``VLLMValidationError`` too so that the server answers
400) and, when the config changes
the prompt's activations, gets its admission plan, which carries its prefix-cache
identity (see ``emosteer/vllm/frontend.py``). Every request, plain or not, whose
``cache_salt`` holds the reserved prefix ``emosteer@`` is refused (400 naming
``cache_salt``): no client string may look like the plugin's.
Why: it is the one function both ``vllm.LLM`` and the OpenAI server call for every
request, in the front-end process, with the tokenized prompt at hand.
When it can go: when vLLM offers a request-validation plugin hook.
"""

from __future__ import annotations

import collections
import copy
import functools

from emosteer.vllm.patches import Swap

_swap: Swap | None = None
_error_class = None


def validation_error_class():
    """``EmosteerValidationError``: a ``SpecError`` that is also vLLM's
    ``VLLMValidationError``, so the OpenAI server answers 400 naming the field (a plain
    ValueError raised while adding a request becomes a 500 there)."""
    global _error_class
    if _error_class is None:
        from vllm.exceptions import VLLMValidationError

        from emosteer.request.spec import SpecError

        class EmosteerValidationError(SpecError, VLLMValidationError):
            def __init__(self, field: str, message: str):
                SpecError.__init__(self, field, message)
                self.parameter = f"emosteer.{field}" if field else "emosteer"
                self.value = None

        _error_class = EmosteerValidationError
    return _error_class


_salt_error_class = None


def salt_error_class():
    """``CacheSaltError``: vLLM's ``VLLMValidationError`` (400 naming ``cache_salt`` on
    the server) that is also a ``ValueError`` (offline callers catch bad input so)."""
    global _salt_error_class
    if _salt_error_class is None:
        from vllm.exceptions import VLLMValidationError

        class CacheSaltError(VLLMValidationError, ValueError):
            pass

        _salt_error_class = CacheSaltError
    return _salt_error_class


def check_images(spec, req) -> None:
    """VEE boosts and attention-to-image captures act on the prompt's image tokens: a
    prompt without images is refused (naming the field) instead of running unboosted."""
    field = ("boost" if spec.boost is not None
             else "capture.attn_image" if spec.capture is not None and spec.capture.attn_image else None)
    if field is None:
        return
    mm = getattr(req, "mm_features", None) or ()
    if not any(getattr(f, "modality", None) in ("image", "video") for f in mm):
        from emosteer.request.spec import SpecError

        raise SpecError(field, "the prompt holds no image: VEE boosts and attention-to-image "
                               "captures act on image tokens; send an image, or drop this field")


def check_client_salt(salt) -> None:
    """A client's ``cache_salt`` may not contain the plugin's reserved prefix."""
    from emosteer.request.spec import SALT_PREFIX

    if isinstance(salt, str) and SALT_PREFIX in salt:
        raise salt_error_class()(
            f"cache_salt may not contain {SALT_PREFIX!r}: that prefix is reserved for the "
            "emosteer plugin's prefix-cache keys; choose another salt",
            parameter="cache_salt",
        )


_recent: "collections.deque[str]" = collections.deque(maxlen=65536)


def remember_request(request_id: str) -> None:
    """Ids of recent requests that carried an emosteer config (error messages)."""
    _recent.append(request_id)


def carried_emosteer(request_id: str) -> bool:
    return any(r == request_id or r.startswith(request_id + "-") for r in _recent)


def _make(original):
    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        req = original(self, request_id, prompt, params, *args, **kwargs)
        check_client_salt(getattr(req, "cache_salt", None))
        sp = getattr(req, "sampling_params", None)
        extra = getattr(sp, "extra_args", None) if sp is not None else None
        if not extra:
            return req
        from emosteer.vllm.frontend import PRIVATE_KEYS, frontend_for

        private = [k for k in PRIVATE_KEYS if k in extra]
        if private:
            raise validation_error_class()(
                "", f"extra_args key(s) {private} are set by emosteer itself and cannot be sent"
            )
        if "emosteer" not in extra:
            return req

        fe = frontend_for(self, self.vllm_config)
        if req.prompt_token_ids is not None:
            n_prompt = len(req.prompt_token_ids)
        elif getattr(req, "prompt_embeds", None) is not None:
            n_prompt = int(req.prompt_embeds.shape[0])
        else:
            n_prompt = None
        from emosteer.request.spec import SpecError

        try:
            spec = fe.check(extra["emosteer"], n_prompt, sp.max_tokens)
            check_images(spec, req)
            if spec.capture is not None and "emosteer_key" not in extra:
                # Captures are handed out by result key (emosteer.LLM sets one); without
                # one they could never be fetched.
                raise SpecError(
                    "capture",
                    "a capture needs a result key to be fetched by: set extra_args "
                    "(vllm_xargs over HTTP) 'emosteer_key' to a fresh UUID and fetch "
                    "GET /v1/emosteer/captures/<key> after the answer",
                )
            plan = fe.plan(spec, n_prompt) if (spec.intervenes() or spec.capture is not None) else None
        except SpecError as e:
            msg = str(e)[len(e.field) + 2 :] if e.field and str(e).startswith(e.field + ": ") else str(e)
            raise validation_error_class()(e.field, msg) from None
        n = int(getattr(sp, "n", 1) or 1)
        claim = None
        if "emosteer_key" in extra:
            try:
                claim = fe.claim_key(extra["emosteer_key"], n, str(request_id))
            except SpecError as e:
                raise validation_error_class()(e.field, str(e)[len(e.field) + 2 :]) from None
        skip = fe.skips_prefix_cache(spec)
        if plan or n > 1 or skip or claim:
            # A private copy. vLLM's process_inputs has already cloned the caller's
            # parameters (deep, or shallow with skip_clone), and only attributes are set
            # here, a new extra_args dict among them: a shallow copy keeps the caller's
            # object untouched without a second deep copy.
            sp = copy.copy(sp)
            sp.extra_args = dict(extra)
            if plan:
                sp.extra_args[PRIVATE_KEYS[0]] = plan
            if n > 1:  # vLLM forks n child requests "<i>_<id>"; each keeps its own results
                sp.extra_args[PRIVATE_KEYS[2]] = n
            if claim:  # results are filed under the key bound to this claim
                sp.extra_args[PRIVATE_KEYS[3]] = claim
            if skip:
                sp.skip_reading_prefix_cache = True
            req.sampling_params = sp
        remember_request(str(request_id))
        from emosteer.vllm.patches import serving_errors

        serving_errors.apply()
        return req

    return process_inputs


def apply() -> None:
    global _swap
    from vllm.v1.engine.input_processor import InputProcessor

    if _swap is None:
        _swap = Swap(InputProcessor, "process_inputs", _make)
    _swap.apply()


def revert() -> None:
    if _swap is not None:
        _swap.revert()
