"""The two builds of the C++ CPU twins (csrc/cpu_vec.h): the AVX2 build runs where ATen
reports AVX2, the portable one elsewhere (or with ATEN_CPU_CAPABILITY=default), both
bit-exact against the torch reference; and no function outside an ``AVX2`` namespace
of the built module contains an AVX instruction (so the module imports and runs on a
CPU without AVX2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.utils import kernel_impls

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif("cpp" not in kernel_impls("cpu"), reason="emosteer._C is not built")

# Every op, every dtype, odd shapes (tails below one vector step included), pool rows
# -1 and shared, against the reference bit for bit (where the op sums in an order of its
# own -- probe scores, residual terms other than absolute adds -- within a bound);
# prints the build that ran.
_SCRIPT = r"""
import torch
import emosteer._C as C
from emosteer.ops import _dispatch, reference
from tests.ops.test_csrc_build import _assert_outputs, _inputs

def same(x, y):
    ints = {2: torch.int16, 4: torch.int32}[x.element_size()]
    return bool((x.view(ints) == y.view(ints)).all())

def within_bound(op, xs, exact, dt):
    # Argument 0 within 4 ulps of the dtype plus 1e-5 of the reference's result (sums in
    # another order); the arguments `exact` bit for bit.
    want, got = [x.clone() for x in xs], [x.clone() for x in xs]
    getattr(reference, op)(*want)
    _dispatch.backend_fn("cpp", op)(*got)
    ref = want[0].double().abs()
    err = (got[0].double() - want[0].double()).abs()
    assert bool((err <= 4 * torch.finfo(dt).eps * ref + 1e-5 * (1 + ref)).all()), (op, dt, err.max())
    for i in exact:
        assert same(got[i], want[i]), (op, i, dt)

g = torch.Generator().manual_seed(0)
on = torch.ones(1, dtype=torch.int32)
for dt in (torch.float32, torch.float16, torch.bfloat16):
    for T, H, D, S, P in ((97, 13, 80, 7, 5), (5, 3, 7, 3, 2), (3, 2, 37, 2, 3)):
        slot = torch.randint(-1, S, (T,), generator=g, dtype=torch.int32)
        rows = lambda *s: torch.randint(-1, P, s, generator=g, dtype=torch.int32)
        a, b = torch.randn(S, H, generator=g), torch.randn(S, H, generator=g)
        a[0], b[0] = 1.0, 0.0
        cap = torch.full((T,), -1, dtype=torch.int32)
        cap[::2] = torch.arange(0, T, 2, dtype=torch.int32)
        off = torch.randint(0, 3, (T,), generator=g, dtype=torch.int32)  # row_off
        c = torch.zeros(S, H)  # absolute adds: bit-exact (relative ones: below, a bound)
        args = [torch.randn(T, H, D, generator=g).to(dt), slot, a, b, c, rows(S, H), off,
                torch.randn(P + 2, H, D, generator=g).to(dt), cap,
                torch.full((T, H, D), float("nan")).to(dt), on]
        d = H * D
        masks = torch.where(torch.rand(P, d, generator=g) < 0.5, 0.0, torch.rand(P, d, generator=g))
        cases = {
            "head_affine_capture": (args, (0, 9)),
            # Absolute adds and every mode at once (the latter with a bound: sums).
            # x (the other addend of h = x + r) is read-only: index 1.
            "residual_steer": ([torch.randn(T, d, generator=g).to(dt),
                                torch.randn(T, d, generator=g).to(dt), slot,
                                torch.randn(S, 3, generator=g), torch.zeros(S, 3, dtype=torch.int32),
                                rows(S, 3), torch.randn(P, d, generator=g).to(dt), on], (0, 1)),
            "neuron_gain": ([torch.randn(T, d, generator=g).to(dt), slot,
                             torch.rand(S, generator=g) * 3, rows(S), masks, on], (0,)),
        }
        for op, (xs, mutated) in cases.items():
            want = [x.clone() for x in xs]
            got = [x.clone() for x in xs]
            getattr(reference, op)(*want)
            _dispatch.backend_fn("cpp", op)(*got)
            for i in mutated:
                assert same(got[i], want[i]), (op, dt, (T, H, D), i)
        # probe_gate: exact decisions, scores within a reordered sum's bound.
        xs = _inputs("probe_gate", dt, (T, H, D), g)
        want, got = [x.clone() for x in xs], [x.clone() for x in xs]
        reference.probe_gate(*want)
        _dispatch.backend_fn("cpp", "probe_gate")(*got)
        _assert_outputs("probe_gate", got, want, f" {dt} {(T, H, D)}")
        # residual_steer with clamp / project_out / relative terms; x (index 1) read-only.
        xs = cases["residual_steer"][0]
        xs[4] = torch.tensor([0, 1, 2, 4, 5], dtype=torch.int32)[
            torch.randint(0, 5, (S, 3), generator=g)]
        xs[6] = torch.nn.functional.normalize(xs[6].float(), dim=1).to(dt)
        within_bound("residual_steer", xs, (1,), dt)
        # head_affine_capture with relative adds on some heads (a norm); cap_buf exact.
        xs = [x.clone() for x in cases["head_affine_capture"][0]]
        xs[4] = torch.where(torch.rand(S, H, generator=g) < 0.5, torch.randn(S, H, generator=g), 0.0)
        xs[4][0] = 0.0
        within_bound("head_affine_capture", xs, (9,), dt)
print(C.cpu_isa())
"""


def _run(capability: str | None) -> str:
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.split()[-1]


def test_portable_build_is_bit_exact():
    assert _run("default") == "default"


def test_best_build_is_bit_exact_and_chosen_by_aten():
    isa = _run(None)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert isa == "avx2"
    else:
        assert isa == "default"


def test_only_avx2_namespaces_hold_avx_instructions():
    """Every function of emosteer._C with a VEX-encoded (AVX) instruction is one of the
    AVX2 builds of the token loops: nothing the import or the launchers run needs AVX."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not found")
    import emosteer._C as C

    proc = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", C.__file__],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with_avx, name = set(), None
    for line in proc.stdout.splitlines():
        if line.endswith(">:") and " <" in line:
            name = line.split(" <", 1)[1][:-2]
            continue
        parts = line.split("\t")
        if name is not None and len(parts) >= 2 and parts[1].startswith("v"):
            with_avx.add(name)
    if not with_avx:
        pytest.skip("no AVX2 build in this module (not x86-64 / GCC)")
    outside = sorted(n for n in with_avx if "::AVX2::" not in n)
    assert not outside, "AVX instructions outside the AVX2 builds:\n" + "\n".join(outside)
    loops = {n.split("(")[0] for n in with_avx}
    loop_of = {"head_affine_capture": "tokens", "residual_steer": "tokens",
               "neuron_gain": "tokens", "probe_gate": "scores"}
    for ns, fn in loop_of.items():
        for t in ("float", "c10::Half", "c10::BFloat16"):
            assert f"void emosteer::{ns}::AVX2::{fn}<{t}>" in loops, (ns, t, sorted(loops))
