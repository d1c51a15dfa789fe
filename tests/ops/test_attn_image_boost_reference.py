"""attn_image_boost: the torch reference against an independent dense float64
computation.

Per sequence a dense K / V (scattered into the paged cache by the test itself), plain
softmax attention, and the closed forms of the boost in weight mode
(``o' = (o + (beta-1)*m*o_img) / (1 + (beta-1)*m)`` with ``m`` the plain image mass and
``o_img`` the attention restricted to image keys; span masses
``beta*m_k / (1 + (beta-1)*m)``) and a direct dense computation in logit mode. The fused
implementations are held to this reference in test_attn_image_boost.py.
"""

from __future__ import annotations

import pytest
import torch

from emosteer.ops import reference
from tests.ops.attn_image_boost_cases import CASES, case_id, dense_expected, make_inputs, rewritten
from tests.ops.op_cases import clone_all
from tests.utils import assert_close


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=case_id)
def test_reference_matches_dense_attention(case, gen):
    """The reference against dense float64 attention: weight mode by its closed form,
    logit mode directly; the image mass rises with beta > 1 and falls with beta < 1."""
    args, dense = make_inputs(case, torch.float32, gen)
    want_out, want_mass = dense_expected(args, dense)
    ref = clone_all(args)
    reference.attn_image_boost(**ref)
    rw = rewritten(args)
    assert_close(ref["out"][rw], want_out[rw].float(), torch.float32, "reference out vs dense")
    for t in (args["cap_index"] >= 0).nonzero().flatten().tolist():
        if int(args["token_row"][t]) >= 0:
            row = ref["mass_buf"][int(args["cap_index"][t])]
            assert_close(row, want_mass[t].float(), torch.float32, f"reference mass of token {t}")

    # Monotonicity of the boost: the same heads, plain (beta 1) vs boosted.
    plain = clone_all(args)
    plain["beta"] = torch.ones_like(plain["beta"])
    reference.attn_image_boost(**plain)
    slot = args["token_slot"].long()
    checked = 0
    for t in (args["cap_index"] >= 0).nonzero().flatten().tolist():
        if int(args["token_row"][t]) < 0 or slot[t] < 0:
            continue
        c = int(args["cap_index"][t])
        b = args["beta"][slot[t]]
        if int(args["logit_mode"][slot[t]]) != 0:  # logit mode need not be monotonic
            continue
        boosted, base = ref["mass_buf"][c].sum(-1), plain["mass_buf"][c].sum(-1)
        mixed = rw[t] & (base > 1e-6) & (base < 1 - 1e-6)  # (all-image heads stay at 1)
        up, down = mixed & (b > 1), mixed & (b < 1)
        assert bool((boosted[up] > base[up]).all()) and bool((boosted[down] < base[down]).all())
        checked += int(up.sum() + down.sum())
    assert checked > 0


@pytest.mark.parametrize("case,mode", [(0, 0), (2, 1)], ids=["weight-closed-form", "logit-direct"])
def test_reference_every_slot_in_one_mode(gen, case, mode):
    """Every slot in weight mode: out and masses follow the closed form; every slot in
    logit mode: out = softmax(where(img, beta*l, l)) @ V, computed densely."""
    args, dense = make_inputs(CASES[case], torch.float32, gen)
    args["logit_mode"].fill_(mode)
    want_out, want_mass = dense_expected(args, dense)
    reference.attn_image_boost(**args)
    rw = rewritten(args)
    assert_close(args["out"][rw], want_out[rw].float(), torch.float32, "out")
    cap = args["cap_index"]
    for t in ((cap >= 0) & (args["token_row"] >= 0)).nonzero().flatten().tolist():
        assert_close(args["mass_buf"][int(cap[t])], want_mass[t].float(), torch.float32, "mass")
