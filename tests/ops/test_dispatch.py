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

T, H, D, S, C, P = 5, 3, 8, 2, 4, 3


def head_args(**over):
    """Valid head_affine_capture arguments; ``over`` replaces some."""
    args = dict(
        z=randn_nonzero(T, H, D),
        token_slot=torch.tensor([0, -1, 1, 0, -1], dtype=torch.int32),
        a=randn_nonzero(S, H),
        b=randn_nonzero(S, H),
        c=torch.tensor([[0.0, 0.3, 0.0], [0.0, 0.0, -0.2]]),
        vrow=torch.tensor([[0, -1, 2], [2, 2, 1]], dtype=torch.int32),
        row_off=torch.zeros(T, dtype=torch.int32),
        pool=randn_nonzero(P, H, D),
        cap_index=torch.tensor([-1, 3, -1, 0, -1], dtype=torch.int32),
        cap_buf=torch.zeros(C, H, D),
        flag=torch.ones(1, dtype=torch.int32),
    )
    args.update(over)
    return args


def i32(*values):
    return torch.tensor(values, dtype=torch.int32)


BAD_HEAD_ARGS = [
    ("z", dict(z=randn_nonzero(T, H * D)), ValueError, "z must have 3 dimensions"),
    ("z", dict(z=randn_nonzero(T, H, D).double()), TypeError, "z must have dtype"),
    ("z", dict(z=randn_nonzero(T, D, H).transpose(1, 2)), ValueError, "z must be contiguous"),
    ("a", dict(a=randn_nonzero(S, H + 1)), ValueError, "a has shape"),
    ("a", dict(a=randn_nonzero(S, H).half()), TypeError, "a must have dtype"),
    ("a", dict(a=torch.empty(S, H, device="meta")), ValueError, "a is on meta"),
    ("b", dict(b=randn_nonzero(S + 1, H)), ValueError, "b has shape"),
    ("c", dict(c=randn_nonzero(S, H + 1)), ValueError, "c has shape"),
    ("c", dict(c=randn_nonzero(S, H).double()), TypeError, "c must have dtype"),
    ("vrow", dict(vrow=torch.zeros(S, H, dtype=torch.int64)), TypeError, "vrow must have dtype"),
    ("vrow", dict(vrow=torch.zeros(S + 1, H, dtype=torch.int32)), ValueError, "vrow has shape"),
    ("vrow", dict(vrow=torch.zeros(S, dtype=torch.int32)), ValueError,
     "vrow must have 2 dimensions"),
    ("vrow", dict(vrow=torch.zeros(H, S, dtype=torch.int32).t()), ValueError,
     "vrow must be contiguous"),
    ("vrow", dict(vrow=torch.tensor([[0, -1, P], [0, 0, 0]], dtype=torch.int32)), IndexError,
     "vrow holds values in [-1, 3] but must be -1 or in [0, 3) (3 pool rows)"),
    ("vrow", dict(vrow=torch.tensor([[0, -2, 1], [0, 0, 0]], dtype=torch.int32)), IndexError,
     "vrow holds values in [-2, 1]"),
    ("vrow", dict(pool=torch.empty(0, H, D)), IndexError, "vrow holds values in [-1, 2]"),
    ("row_off", dict(row_off=torch.zeros(T, dtype=torch.int64)), TypeError, "row_off must have dtype"),
    ("row_off", dict(row_off=torch.zeros(T + 1, dtype=torch.int32)), ValueError, "row_off has shape"),
    ("row_off", dict(row_off=torch.tensor([0, 0, 1, 0, 0], dtype=torch.int32)), IndexError,
     "row_off[2] = 1 takes token 2 past the pool"),
    ("pool", dict(pool=randn_nonzero(P, H, D).half()), TypeError, "pool must have dtype"),
    ("pool", dict(pool=randn_nonzero(P, H, D + 1)), ValueError, "pool has shape"),
    ("pool", dict(pool=randn_nonzero(P, H + 1, D)), ValueError, "pool has shape"),
    ("pool", dict(pool=randn_nonzero(P, H * D)), ValueError, "pool must have 3 dimensions"),
    ("pool", dict(pool=torch.empty(P, H, D, device="meta")), ValueError, "pool is on meta"),
    ("cap_buf", dict(cap_buf=torch.zeros(C, H, D - 1)), ValueError, "cap_buf has shape"),
    ("cap_index", dict(cap_index=torch.zeros(T, dtype=torch.int64)), TypeError,
     "cap_index must have dtype"),
    ("cap_index", dict(cap_index=torch.zeros(T + 1, dtype=torch.int32)), ValueError,
     "cap_index has shape"),
    ("token_slot", dict(token_slot=torch.zeros(T, dtype=torch.int64)), TypeError,
     "token_slot must have dtype"),
    ("token_slot", dict(token_slot=torch.zeros(T - 1, dtype=torch.int32)), ValueError,
     "token_slot has shape"),
    ("token_slot", dict(token_slot=i32(0, S, -1, 0, 0)), IndexError,
     "token_slot holds values in [-1, 2]"),
    ("token_slot", dict(token_slot=i32(0, -2, -1, 0, 0)), IndexError,
     "token_slot holds values in [-2, 0]"),
    ("cap_index", dict(cap_index=i32(-1, C, -1, 0, -1)), IndexError,
     "cap_index holds values in [-1, 4]"),
    ("flag", dict(flag=torch.ones(1, dtype=torch.int64)), TypeError, "flag must have dtype"),
    ("flag", dict(flag=torch.ones(2, dtype=torch.int32)), ValueError, "flag has shape"),
    ("flag", dict(flag=torch.ones((), dtype=torch.int32)), ValueError,
     "flag must have 1 dimensions"),
    ("flag", dict(flag=torch.ones(1, dtype=torch.bool)), TypeError, "flag must have dtype"),
    ("flag", dict(flag=torch.ones(1, dtype=torch.int32, device="meta")), ValueError,
     "flag is on meta"),
    ("flag", dict(flag=1), TypeError, "flag must be a torch.Tensor"),
    ("z", dict(z=randn_nonzero(T, H, D).tolist()), TypeError, "z must be a torch.Tensor"),
]


@pytest.mark.parametrize("arg,over,exc,msg", BAD_HEAD_ARGS,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_HEAD_ARGS)])
def test_head_affine_bad_arguments(arg, over, exc, msg):
    args = head_args(**over)
    before = args["cap_buf"].clone()
    z_before = args["z"].clone() if isinstance(args["z"], torch.Tensor) else None
    with pytest.raises(exc, match=re.escape(msg)) as e:
        ops.head_affine_capture(**args, impl="torch")
    assert arg in str(e.value)
    assert_equal(args["cap_buf"], before, "cap_buf after a rejected call")
    if z_before is not None:
        assert_equal(args["z"], z_before, "z after a rejected call")


def steer_args(**over):
    args = dict(
        r=randn_nonzero(3, 6),
        x=randn_nonzero(3, 6),
        token_slot=i32(0, -1, 1),
        coef=torch.ones(2, 2),
        mode=torch.tensor([[0, 1], [2, 4]], dtype=torch.int32),
        urow=torch.tensor([[1, -1], [0, 2]], dtype=torch.int32),
        pool=randn_nonzero(P, 6),
        flag=torch.ones(1, dtype=torch.int32),
    )
    args.update(over)
    return args


def i32_2d(*rows):
    return torch.tensor(rows, dtype=torch.int32)


BAD_STEER_ARGS = [
    ("r", dict(r=randn_nonzero(6, 3).t()), ValueError, "r must be contiguous"),
    ("r", dict(r=randn_nonzero(3, 6).long()), TypeError, "r must have dtype"),
    ("x", dict(x=randn_nonzero(6, 3).t()), ValueError, "x must be contiguous"),
    ("x", dict(x=randn_nonzero(3, 6).half()), TypeError, "x must have dtype"),
    ("x", dict(x=randn_nonzero(3, 7)), ValueError, "x has shape"),
    ("x", dict(x=randn_nonzero(2, 6)), ValueError, "x has shape"),
    ("x", dict(x=randn_nonzero(18)), ValueError, "x must have 2 dimensions"),
    ("x", dict(x=torch.empty(3, 6, device="meta")), ValueError, "x is on meta"),
    ("coef", dict(coef=torch.ones(2, 2).double()), TypeError, "coef must have dtype"),
    ("coef", dict(coef=torch.ones(2)), ValueError, "coef must have 2 dimensions"),
    ("mode", dict(mode=i32_2d([0, 0, 0], [0, 0, 0])), ValueError, "mode has shape"),
    ("mode", dict(mode=torch.zeros(2, 2, dtype=torch.int64)), TypeError, "mode must have dtype"),
    ("mode", dict(mode=i32_2d([0, 3], [0, 0])), ValueError, "mode holds values"),
    ("mode", dict(mode=i32_2d([0, 8], [0, 0])), ValueError, "mode holds values"),
    ("mode", dict(mode=i32_2d([0, -1], [0, 0])), ValueError, "mode holds values"),
    ("urow", dict(urow=i32_2d([1, -1, 0], [0, 0, 0])), ValueError, "urow has shape"),
    ("urow", dict(urow=i32(1, -1)), ValueError, "urow must have 2 dimensions"),
    ("urow", dict(urow=torch.zeros(2, 2, dtype=torch.int64)), TypeError, "urow must have dtype"),
    ("urow", dict(urow=i32_2d([P, 0], [0, 0])), IndexError,
     "urow holds values in [0, 3] but must be -1 or in [0, 3) (3 pool rows)"),
    ("urow", dict(urow=i32_2d([-2, 0], [0, 0])), IndexError, "urow holds values in [-2, 0]"),
    ("pool", dict(pool=randn_nonzero(P, 7)), ValueError, "pool has shape"),
    ("pool", dict(pool=randn_nonzero(P, 6).half()), TypeError, "pool must have dtype"),
    ("pool", dict(pool=randn_nonzero(P, 6, 1)), ValueError, "pool must have 2 dimensions"),
    ("token_slot", dict(token_slot=i32(0, 2, 1)), IndexError, "token_slot holds values"),
    ("flag", dict(flag=torch.zeros(1, 1, dtype=torch.int32)), ValueError,
     "flag must have 1 dimensions"),
    ("flag", dict(flag=torch.zeros(1)), TypeError, "flag must have dtype"),
]


@pytest.mark.parametrize("arg,over,exc,msg", BAD_STEER_ARGS,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_STEER_ARGS)])
def test_residual_steer_bad_arguments(arg, over, exc, msg):
    args = steer_args(**over)
    before = args["r"].clone()
    with pytest.raises(exc, match=re.escape(msg)) as e:
        ops.residual_steer(**args, impl="torch")
    assert arg in str(e.value)
    assert_equal(args["r"], before, "r after a rejected call")


def gate_args(**over):
    args = dict(
        h=randn_nonzero(3, 6),
        token_slot=i32(0, -1, 1),
        prow=i32(1, -1),
        probes=randn_nonzero(P, 6),
        bias=torch.zeros(2),
        thresh=torch.zeros(2),
        gmode=i32(2, 0),
        state_row=i32(0, -1, 1),
        state=i32(0, 0),
        score_index=i32(-1, 0, 1),
        score_buf=torch.zeros(2),
        flag=torch.ones(1, dtype=torch.int32),
    )
    args.update(over)
    return args


BAD_GATE_ARGS = [
    ("h", dict(h=randn_nonzero(6, 3).t()), ValueError, "h must be contiguous"),
    ("h", dict(h=randn_nonzero(3, 6).double()), TypeError, "h must have dtype"),
    ("prow", dict(prow=torch.zeros(2, dtype=torch.int64)), TypeError, "prow must have dtype"),
    ("prow", dict(prow=i32(P, 0)), IndexError,
     "prow holds values in [0, 3] but must be -1 or in [0, 3) (3 probe rows)"),
    ("probes", dict(probes=randn_nonzero(P, 6).half()), TypeError, "probes must have dtype"),
    ("probes", dict(probes=randn_nonzero(P, 5)), ValueError, "probes has shape"),
    ("bias", dict(bias=torch.zeros(3)), ValueError, "bias has shape"),
    ("thresh", dict(thresh=torch.zeros(2).double()), TypeError, "thresh must have dtype"),
    ("gmode", dict(gmode=i32(0)), ValueError, "gmode has shape"),
    ("state_row", dict(state_row=i32(0, 2, 0)), IndexError,
     "state_row holds values in [0, 2] but must be -1 or in [0, 2) (2 state rows)"),
    ("state_row", dict(state_row=i32(0, 0)), ValueError, "state_row has shape"),
    ("state", dict(state=torch.zeros(2)), TypeError, "state must have dtype"),
    ("score_index", dict(score_index=i32(-1, 2, 0)), IndexError, "score_index holds values"),
    ("score_buf", dict(score_buf=torch.zeros(2, 1)), ValueError,
     "score_buf must have 1 dimensions"),
    ("token_slot", dict(token_slot=i32(0, 2, 1)), IndexError, "token_slot holds values"),
    ("flag", dict(flag=torch.ones(2, dtype=torch.int32)), ValueError, "flag has shape"),
]


@pytest.mark.parametrize("arg,over,exc,msg", BAD_GATE_ARGS,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_GATE_ARGS)])
def test_probe_gate_bad_arguments(arg, over, exc, msg):
    args = gate_args(**over)
    before = clone_args(args)
    with pytest.raises(exc, match=re.escape(msg)) as e:
        ops.probe_gate(**args, impl="torch")
    assert arg in str(e.value)
    for name in ("token_slot", "state", "score_buf"):
        assert_equal(args[name], before[name], f"{name} after a rejected call")


def clone_args(args):
    return {k: v.clone() for k, v in args.items()}


def gain_args(**over):
    args = dict(
        m=randn_nonzero(3, 6),
        token_slot=i32(0, -1, 1),
        gamma=torch.full((2,), 2.0),
        nrow=i32(1, -1),
        masks=torch.ones(P, 6),
        flag=torch.ones(1, dtype=torch.int32),
    )
    args.update(over)
    return args


BAD_GAIN_ARGS = [
    ("m", dict(m=randn_nonzero(3, 6, 1)), ValueError, "m must have 2 dimensions"),
    ("gamma", dict(gamma=torch.ones(2).half()), TypeError, "gamma must have dtype"),
    ("nrow", dict(nrow=i32(0)), ValueError, "nrow has shape"),
    ("nrow", dict(nrow=torch.zeros(2, dtype=torch.int16)), TypeError, "nrow must have dtype"),
    ("nrow", dict(nrow=i32(0, P)), IndexError,
     "nrow holds values in [0, 3] but must be -1 or in [0, 3) (3 mask rows)"),
    ("masks", dict(masks=torch.ones(P, 5)), ValueError, "masks has shape"),
    ("masks", dict(masks=torch.ones(P, 6).half()), TypeError, "masks must have dtype"),
    ("masks", dict(masks=torch.ones(6, P).t()), ValueError, "masks must be contiguous"),
    ("token_slot", dict(token_slot=i32(0, 2, 1)), IndexError, "token_slot holds values"),
    ("flag", dict(flag=torch.ones(3, dtype=torch.int32)), ValueError, "flag has shape"),
]


@pytest.mark.parametrize("arg,over,exc,msg", BAD_GAIN_ARGS,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_GAIN_ARGS)])
def test_neuron_gain_bad_arguments(arg, over, exc, msg):
    args = gain_args(**over)
    before = args["m"].clone()
    with pytest.raises(exc, match=re.escape(msg)) as e:
        ops.neuron_gain(**args, impl="torch")
    assert arg in str(e.value)
    assert_equal(args["m"], before, "m after a rejected call")


@pytest.mark.skipif("cpp" not in kernel_impls("cpu"), reason="emosteer._C is not built")
def test_cpp_launchers_check_row_values():
    """Called directly (no wrapper), the C++ launchers still refuse out-of-range indices
    before writing anything (Triton and CUDA leave value checks to the wrappers)."""
    ns = torch.ops.emosteer_C
    args = head_args(vrow=torch.tensor([[0, -1, P], [0, 0, 0]], dtype=torch.int32))
    before = args["z"].clone(), args["cap_buf"].clone()
    with pytest.raises(RuntimeError, match=re.escape("vrow[2] = 3 but must be -1 or in [0, 3)")):
        ns.head_affine_capture(*args.values())
    assert_equal(args["z"], before[0], "z")
    assert_equal(args["cap_buf"], before[1], "cap_buf")
    with pytest.raises(RuntimeError, match=re.escape("urow[2] = 3")):
        ns.residual_steer(*steer_args(urow=i32_2d([0, -1], [P, 0])).values())
    for bad, msg in ((randn_nonzero(3, 7), "x has shape"), (randn_nonzero(2, 6), "x has shape"),
                     (randn_nonzero(3, 6).half(), "x must have dtype"),
                     (randn_nonzero(6, 3).t(), "x must be contiguous")):
        with pytest.raises(RuntimeError, match=re.escape(msg)):
            ns.residual_steer(*steer_args(x=bad).values())
    gate = gate_args(state_row=i32(0, -1, 2))
    before = clone_args(gate)
    with pytest.raises(RuntimeError, match=re.escape("state_row[2] = 2")):
        ns.probe_gate(*gate.values())
    for name in ("token_slot", "state", "score_buf"):
        assert_equal(gate[name], before[name], name)
    with pytest.raises(RuntimeError, match=re.escape("prow[0] = -3")):
        ns.probe_gate(*gate_args(prow=i32(-3, 0)).values())
    with pytest.raises(RuntimeError, match=re.escape("nrow[1] = -2")):
        ns.neuron_gain(*gain_args(nrow=i32(0, -2)).values())
    with pytest.raises(RuntimeError, match="flag has shape"):
        ns.neuron_gain(*gain_args(flag=torch.ones(2, dtype=torch.int32)).values())
    # flag 0: nothing is read, not even the (bad) indices.
    off = head_args(vrow=torch.tensor([[0, -1, P], [0, 0, 0]], dtype=torch.int32),
                    flag=torch.zeros(1, dtype=torch.int32))
    ns.head_affine_capture(*off.values())


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
def _steer_block(h, z, r, m_in, slot, prow, probes, bias, thresh, gmode, state_row, state,
                 score_index, score_buf, a, b, c, vrow, row_off, hpool, cap, cap_buf, coef, mode, urow,
                 rpool, gamma, nrow, masks, flag, impl: str):
    """A tiny 'layer': the probe gate (which closes slots for what follows), head steering
    with capture, the residual terms, MLP gains."""
    ops.probe_gate(h, slot, prow, probes, bias, thresh, gmode, state_row, state, score_index,
                   score_buf, flag, impl=impl)
    ops.head_affine_capture(z, slot, a, b, c, vrow, row_off, hpool, cap, cap_buf, flag, impl=impl)
    r.add_(z.view(z.shape[0], -1))
    ops.residual_steer(r, h, slot, coef, mode, urow, rpool, flag, impl=impl)
    m = torch.nn.functional.silu(m_in * r.sum(-1, keepdim=True))
    ops.neuron_gain(m, slot, gamma, nrow, masks, flag, impl=impl)
    return m * 2


@pytest.mark.parametrize("on", [True, False], ids=["flag_on", "flag_off"])
@pytest.mark.parametrize("impl", ["torch", *kernel_impls("cpu")])
def test_ops_inside_torch_compile(impl, on, gen):
    T_, H_, D_, I = 6, 2, 8, 8
    d = H_ * D_
    slot = torch.tensor([0, -1, 1, 1, -1, 0], dtype=torch.int32)
    probes = torch.zeros(1, d)
    probes[0, 0] = 1.0
    h = randn_nonzero(T_, d, gen=gen)
    h[:, 0] = torch.tensor([2.0, 2.0, -1.0, 2.0, 2.0, -1.0])  # the scores
    inputs = dict(
        h=h, z=randn_nonzero(T_, H_, D_, gen=gen), r=randn_nonzero(T_, d, gen=gen),
        m_in=randn_nonzero(T_, I, gen=gen), slot=slot,
        # Slot 0 gated without latch (token 5 closes), slot 1 latched (token 3 opens it).
        prow=torch.tensor([0, 0], dtype=torch.int32), probes=probes, bias=torch.zeros(2),
        thresh=torch.zeros(2), gmode=torch.tensor([0, 2], dtype=torch.int32),
        state_row=torch.tensor([0, -1, 1, 1, -1, 0], dtype=torch.int32),
        state=torch.zeros(2, dtype=torch.int32),
        score_index=torch.tensor([-1, -1, 0, 1, -1, 2], dtype=torch.int32),
        score_buf=torch.zeros(3),
        a=randn_nonzero(2, H_, gen=gen), b=randn_nonzero(2, H_, gen=gen),
        c=torch.tensor([[0.0, 0.0], [0.4, 0.0]]),  # slot 1 head 0: a relative add
        vrow=torch.tensor([[1, -1], [0, 1]], dtype=torch.int32),
        row_off=torch.tensor([0, 1, 0, 0, 2, 0], dtype=torch.int32),
        hpool=randn_nonzero(4, H_, D_, gen=gen),
        cap=torch.tensor([-1, 0, -1, -1, 1, -1], dtype=torch.int32),
        cap_buf=torch.zeros(2, H_, D_),
        coef=randn_nonzero(2, 2, gen=gen),
        mode=torch.tensor([[0, 1], [2, 0]], dtype=torch.int32),
        urow=torch.tensor([[2, 0], [1, -1]], dtype=torch.int32),
        rpool=torch.nn.functional.normalize(randn_nonzero(3, d, gen=gen), dim=1),
        gamma=torch.tensor([1.5, 0.25]), nrow=torch.tensor([0, 0], dtype=torch.int32),
        masks=(torch.arange(I) % 2).float().unsqueeze(0),
        flag=torch.tensor([1 if on else 0], dtype=torch.int32),
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
    for op in ("probe_gate", "head_affine_capture", "residual_steer", "neuron_gain"):
        assert f"emosteer.{op}" in dynamo_graphs[0], f"{op} missing from the Dynamo graph"
        assert f"emosteer.{op}" in aot_graphs[0], f"{op} missing from the AOT graph"
    # Mutations happened in place on the caller's tensors, as in eager mode.
    for name in ("z", "r", "cap_buf", "slot", "state", "score_buf"):
        torch.testing.assert_close(got[name], eager[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(out, out_eager, rtol=0, atol=0)
    if on:  # the gate closed tokens 2 and 5 before the other ops ran
        assert got["slot"].tolist() == [0, -1, -1, 1, -1, -1]
        assert got["state"].tolist() == [0, 1]
    else:  # the flag is data: the same graph, and nothing steered or captured
        for name in ("z", "cap_buf", "slot", "state", "score_buf"):
            assert_equal(got[name], inputs[name], f"{name} with flag 0")
