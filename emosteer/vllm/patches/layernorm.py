"""Patch ``vllm.model_executor.layers.layernorm.RMSNorm.forward``.

Runs in: each worker process, inside the model's forward (in the compiled graph).
Upstream (vLLM 0.32.0): https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/model_executor/layers/layernorm.py

Replaces: ``RMSNorm.forward(x, residual)``, vLLM's fused residual add + RMSNorm that
decoders (Llama, Qwen2/3, Mistral, Qwen2-VL's text model ...) run at the start of each
layer and as the final norm: ``residual = x + residual; x = norm(residual)``. Its input
``x + residual`` is the output of the previous decoder layer. On norms where emosteer
installed a site, the patched forward first steers the residual ``x + residual`` by
updating its addend ``residual`` (add / clamp / project-out terms of the token's slot,
their norms and components taken over the sum; ``residual_steer``, in place; slot -1 tokens untouched, so unsteered
tokens get vLLM's own fused op bit for bit), runs the original, then copies the rows
asked for capture out of the summed residual (``head_affine_capture`` in capture-only
form, slot -1 everywhere) and runs the probe gate of this layer (``probe_gate``: sets the
slot of tokens whose probe score fails the gate to -1 for the later layers).
Why: steering "at layer l" adds to layer l's output; that sum is formed only here.
When it can go: when vLLM exposes a per-request residual hook in decoder layers.
"""

from __future__ import annotations

import functools

from emosteer.vllm.patches import Swap

_swap: Swap | None = None


def _make(original):
    @functools.wraps(original)
    def forward(self, x, residual=None):
        site = getattr(self, "_emosteer_site", None)
        if site is None or residual is None:
            return original(self, x, residual)
        T = x.shape[0]
        site.residual_steer(
            residual, x, site.token_slot[:T], site.coef, site.rmode, site.urow, site.pool, site.flag
        )
        x_out, res_out = original(self, x, residual)
        site.head_affine_capture(
            res_out.view(T, 1, -1),
            site.no_slot[:T],
            site.one_a,
            site.zero_b,
            site.zero_b,
            site.no_row,
            site.row_off[:T],
            site.zero_pool,
            site.cap_index[:T],
            site.cap_buf,
            site.cap_flag,
        )
        # The probe gate at this layer: closes the slot of tokens whose score fails it,
        # for every op of the later layers (they all read token_slot).
        site.probe_gate(
            res_out, site.token_slot[:T], site.prow, site.probe_pool, site.pbias, site.thresh,
            site.gmode, site.gate_row[:T], site.gate_state, site.score_cap[:T], site.score_buf,
            site.gate_flag,
        )
        return x_out, res_out

    return forward


def apply() -> None:
    global _swap
    from vllm.model_executor.layers.layernorm import RMSNorm

    if _swap is None:
        _swap = Swap(RMSNorm, "forward", _make)
    _swap.apply()


def revert() -> None:
    if _swap is not None:
        _swap.revert()
