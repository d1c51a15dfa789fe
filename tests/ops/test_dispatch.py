"""The dispatcher: argument checks with messages that name the argument, implementation
choice (``impl=``, ``EMOSTEER_IMPL``, availability), and the custom ops inside
torch.compile (kept in the graph as mutating calls, same results as eager).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

import emosteer.ops as ops
from emosteer.ops import available_impls, reference, resolve_impl
from tests.utils import assert_equal, kernel_impls, randn_nonzero

T, H, D, S, C = 5, 3, 8, 2, 4


def head_args(**over):
    """Valid head_affine_capture arguments; ``over`` replaces some."""
    args = dict(
        z=randn_nonzero(T, H, D),
        token_slot=torch.tensor([0, -1, 1, 0, -1], dtype=torch.int32),
        a=randn_nonzero(S, H),
        b=randn_nonzero(S, H),
        v=randn_nonzero(S, H, D),
        cap_index=torch.tensor([-1, 3, -1, 0, -1], dtype=torch.int32),
        cap_buf=torch.zeros(C, H, D),
    )
    args.update(over)
    return args


BAD_HEAD_ARGS = [
    ("z", dict(z=randn_nonzero(T, H * D)), ValueError, "z must have 3 dimensions"),
    ("z", dict(z=randn_nonzero(T, H, D).double()), TypeError, "z must have dtype"),
    ("z", dict(z=randn_nonzero(T, D, H).transpose(1, 2)), ValueError, "z must be contiguous"),
    ("a", dict(a=randn_nonzero(S, H + 1)), ValueError, "a has shape"),
    ("a", dict(a=randn_nonzero(S, H).half()), TypeError, "a must have dtype"),
    ("a", dict(a=torch.empty(S, H, device="meta")), ValueError, "a is on meta"),
    ("b", dict(b=randn_nonzero(S + 1, H)), ValueError, "b has shape"),
    ("v", dict(v=randn_nonzero(S, H, D).half()), TypeError, "v must have dtype"),
    ("v", dict(v=randn_nonzero(S, H, D + 1)), ValueError, "v has shape"),
    ("cap_buf", dict(cap_buf=torch.zeros(C, H, D - 1)), ValueError, "cap_buf has shape"),
    ("cap_index", dict(cap_index=torch.zeros(T, dtype=torch.int64)), TypeError,
     "cap_index must have dtype"),
    ("cap_index", dict(cap_index=torch.zeros(T + 1, dtype=torch.int32)), ValueError,
     "cap_index has shape"),
    ("token_slot", dict(token_slot=torch.zeros(T, dtype=torch.int64)), TypeError,
     "token_slot must have dtype"),
    ("token_slot", dict(token_slot=torch.zeros(T - 1, dtype=torch.int32)), ValueError,
     "token_slot has shape"),
    ("token_slot", dict(token_slot=torch.tensor([0, S, -1, 0, 0], dtype=torch.int32)),
     IndexError, "token_slot holds values in [-1, 2]"),
    ("token_slot", dict(token_slot=torch.tensor([0, -2, -1, 0, 0], dtype=torch.int32)),
     IndexError, "token_slot holds values in [-2, 0]"),
    ("cap_index", dict(cap_index=torch.tensor([-1, C, -1, 0, -1], dtype=torch.int32)),
     IndexError, "cap_index holds values in [-1, 4]"),
    ("z", dict(z=randn_nonzero(T, H, D).tolist()), TypeError, "z must be a torch.Tensor"),
]


@pytest.mark.parametrize("arg,over,exc,msg", BAD_HEAD_ARGS,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_HEAD_ARGS)])
def test_head_affine_bad_arguments(arg, over, exc, msg):
    args = head_args(**over)
    before = args["cap_buf"].clone()
    with pytest.raises(exc, match=re.escape(msg)) as e:
        ops.head_affine_capture(**args, impl="torch")
    assert arg in str(e.value)
    assert_equal(args["cap_buf"], before, "cap_buf after a rejected call")


def test_other_ops_bad_arguments():
    slot = torch.tensor([0, -1, 1], dtype=torch.int32)
    alpha = torch.ones(2)
    r = randn_nonzero(3, 6)
    with pytest.raises(ValueError, match="u has shape"):
        ops.residual_add(r, slot, alpha, randn_nonzero(2, 7))
    with pytest.raises(TypeError, match="alpha must have dtype"):
        ops.residual_add(r, slot, alpha.double(), randn_nonzero(2, 6))
    with pytest.raises(IndexError, match="token_slot holds values"):
        ops.residual_add(r, torch.tensor([0, 2, 1], dtype=torch.int32), alpha, randn_nonzero(2, 6))
    with pytest.raises(ValueError, match="r must be contiguous"):
        ops.residual_add(randn_nonzero(6, 3).t(), slot, alpha, randn_nonzero(2, 6))
    x, res, w = randn_nonzero(3, 6), randn_nonzero(3, 6), randn_nonzero(6)
    with pytest.raises(ValueError, match="eps must be a positive float"):
        ops.fused_add_rms_norm_steer(x, res, w, -1.0, slot, alpha, randn_nonzero(2, 6))
    with pytest.raises(TypeError, match="residual must have dtype"):
        ops.fused_add_rms_norm_steer(x, res.half(), w, 1e-6, slot, alpha, randn_nonzero(2, 6))
    with pytest.raises(ValueError, match="weight has shape"):
        ops.fused_add_rms_norm_steer(x, res, randn_nonzero(5), 1e-6, slot, alpha,
                                     randn_nonzero(2, 6))
    with pytest.raises(ValueError, match="g has shape"):
        ops.neuron_gain(r, slot, torch.ones(2, 5))
    with pytest.raises(ValueError, match="x must have an even last dimension"):
        ops.silu_and_mul_gain(torch.empty(3, 3), randn_nonzero(3, 7), slot, torch.ones(2, 3))
    with pytest.raises(ValueError, match="out has shape"):
        ops.silu_and_mul_gain(torch.empty(3, 4), randn_nonzero(3, 6), slot, torch.ones(2, 3))


# ------------------------------------------------------------------ implementations
def test_impl_choice(monkeypatch):
    with pytest.raises(ValueError, match="impl='fast' is not one of"):
        ops.head_affine_capture(**head_args(), impl="fast")
    with pytest.raises(RuntimeError, match="impl='cuda' is not available for device cpu"):
        ops.head_affine_capture(**head_args(), impl="cuda")
    assert available_impls("cpu")[-1] == "torch"
    assert resolve_impl("torch", "cpu") == "torch"
    assert resolve_impl(None, "cpu") == available_impls("cpu")[0]
    # Triton runs on CPU tensors only through its interpreter.
    assert "triton" in available_impls("cpu")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "triton" not in available_impls("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_impl("triton", "cpu")


def test_emosteer_impl_env(monkeypatch):
    monkeypatch.setenv("EMOSTEER_IMPL", "torch")
    assert resolve_impl(None, "cpu") == "torch"
    assert resolve_impl("triton", "cpu") == "triton"  # an explicit impl wins
    monkeypatch.setenv("EMOSTEER_IMPL", "triton")
    assert resolve_impl(None, "cpu") == "triton"
    args = head_args()
    want = {k: v.clone() for k, v in args.items()}
    reference.head_affine_capture(**want)
    ops.head_affine_capture(**args)
    torch.testing.assert_close(args["z"], want["z"])
    assert_equal(args["cap_buf"], want["cap_buf"], "cap_buf")
    monkeypatch.setenv("EMOSTEER_IMPL", "nonsense")
    with pytest.raises(ValueError, match="impl='nonsense'"):
        ops.head_affine_capture(**head_args())


def test_custom_ops_registered_with_fake_impl():
    """The custom ops exist and trace under fake tensors (what torch.compile needs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = {k: torch.empty_like(v) for k, v in head_args().items()}
        torch.ops.emosteer.head_affine_capture(*args.values(), "torch")
    schema = torch.ops.emosteer.head_affine_capture.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write]
    assert mutated == ["z", "cap_buf"]


# ----------------------------------------------------------------------- compile
def _steer_block(x, res, w, slot, alpha, u, m_in, g, impl: str):
    """A tiny 'layer': steer the residual at the norm, MLP activation with gains."""
    ops.fused_add_rms_norm_steer(x, res, w, 1e-6, slot, alpha, u, impl=impl)
    out = torch.empty(x.shape[0], m_in.shape[1] // 2, dtype=x.dtype)
    ops.silu_and_mul_gain(out, m_in * x.sum(-1, keepdim=True), slot, g, impl=impl)
    ops.neuron_gain(out, slot, g, impl=impl)
    ops.residual_add(res, slot, alpha, u, impl=impl)
    return out * 2


@pytest.mark.parametrize("impl", ["torch", *kernel_impls("cpu")])
def test_ops_inside_torch_compile(impl, gen):
    T_, d, I = 6, 16, 8
    slot = torch.tensor([0, -1, 1, 1, -1, 0], dtype=torch.int32)
    inputs = dict(
        x=randn_nonzero(T_, d, gen=gen), res=randn_nonzero(T_, d, gen=gen),
        w=randn_nonzero(d, gen=gen), slot=slot, alpha=randn_nonzero(2, gen=gen),
        u=randn_nonzero(2, d, gen=gen), m_in=randn_nonzero(T_, 2 * I, gen=gen),
        g=1 + randn_nonzero(2, I, gen=gen).abs(),
    )
    eager = {k: v.clone() for k, v in inputs.items()}
    out_eager = _steer_block(**eager, impl=impl)

    dynamo_graphs, aot_graphs = [], []

    def fw_compiler(gm, _):
        aot_graphs.append(gm.code)
        return gm

    def backend(gm, example_inputs):
        dynamo_graphs.append(gm.code)
        return aot_autograd(fw_compiler=fw_compiler)(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(_steer_block, backend=backend, fullgraph=True)
    got = {k: v.clone() for k, v in inputs.items()}
    out = compiled(**got, impl=impl)

    # One graph (fullgraph), every op in it, also after functionalization (AOT).
    assert len(dynamo_graphs) == 1 and len(aot_graphs) == 1
    for op in ("fused_add_rms_norm_steer", "silu_and_mul_gain", "neuron_gain", "residual_add"):
        assert f"emosteer.{op}" in dynamo_graphs[0], f"{op} missing from the Dynamo graph"
        assert f"emosteer.{op}" in aot_graphs[0], f"{op} missing from the AOT graph"
    # Mutations happened in place on the caller's tensors, as in eager mode.
    for name in ("x", "res"):
        torch.testing.assert_close(got[name], eager[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(out, out_eager, rtol=0, atol=0)
