"""Patch ``vllm.model_executor.layers.activation.SiluAndMul.forward``.

Runs in: each worker process, inside the model's forward (in the compiled graph).
Upstream (vLLM 0.32.0): https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/model_executor/layers/activation.py

Replaces: ``SiluAndMul.forward`` (``silu(gate) * up``, the MLP activation whose output
is the input of ``down_proj``: the "neurons"). On MLPs where emosteer installed a site,
the patched forward runs the original and then scales each token's neurons by its slot's
gains in place (``neuron_gain``, masks gathered from the neuron pool;
slot -1 tokens untouched, so they keep vLLM's activation bit for bit). There is no fused
SiluAndMul variant: its slot -1 output could not be guaranteed bit-equal to each
platform's own SiluAndMul kernel, so the gain runs as a separate in-place op.
Why: ENA (emotional neuron augmentation) multiplies chosen neurons per request.
When it can go: when vLLM exposes per-request MLP activation hooks.
"""

from __future__ import annotations

import functools

from emosteer.vllm.patches import Swap

_swap: Swap | None = None


def _make(original):
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        site = getattr(self, "_emosteer_site", None)
        if site is None:
            return out
        m = out.view(-1, out.shape[-1])
        site.neuron_gain(m, site.token_slot[: m.shape[0]], site.gamma, site.nrow, site.pool, site.flag)
        return out

    return forward


def apply() -> None:
    global _swap
    from vllm.model_executor.layers.activation import SiluAndMul

    if _swap is None:
        _swap = Swap(SiluAndMul, "forward", _make)
    _swap.apply()


def revert() -> None:
    if _swap is not None:
        _swap.revert()
