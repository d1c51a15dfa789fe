"""The first-use (JIT) build of emosteer._C (emosteer/ops/_jit.py), where no prebuilt
module imports, as after ``pip install .`` with build isolation.

Every check runs in a subprocess that hides the checkout's in-place module (a meta-path
finder refusing ``emosteer._C``) and points the build cache at a temporary folder:

- without a compiler, with EMOSTEER_NO_JIT=1, with a compiler that fails, or after a
  failed build, the ops fall back to the next implementation with one log line (none
  under EMOSTEER_NO_JIT, the build line first where a compile was tried), and
  ``impl="cpp"`` says why it is unavailable; a failed build is not retried;
- (slow) two processes started together on an empty cache build once, under the lock,
  the portable kernels only (to keep it short), and both get ops bit-identical to the
  torch reference (probe scores: within a reordered sum's bound); a third process loads
  the cached module without compiling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

_PRELUDE = r"""
import json, logging, sys
sys.path.insert(0, sys.argv[1])

class _HidePrebuilt:  # as if no in-place/prebuilt emosteer._C existed
    def find_spec(self, name, path=None, target=None):
        if name in ("emosteer._C", "emosteer._C_cuda"):
            raise ImportError(f"{name} hidden by the test")
        return None

sys.meta_path.insert(0, _HidePrebuilt())
records = []

class _Collect(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())

logging.getLogger("emosteer").addHandler(_Collect())
logging.getLogger("emosteer").propagate = False
"""

_FALLBACK_SCRIPT = _PRELUDE + r"""
import os
from emosteer.ops import _dispatch, _jit, available_impls, resolve_impl
out = {}

def fresh():
    _jit._state.clear(); _dispatch._compiled.cache_clear(); records.clear()

def case(name):
    fresh()
    impls = available_impls("cpu")
    try:
        resolve_impl("cpp", "cpu")
        err = None
    except RuntimeError as e:
        err = str(e)
    out[name] = {"impls": impls, "why": _jit.why_unavailable(), "records": list(records), "error": err}

os.environ["EMOSTEER_NO_JIT"] = "1"
case("no_jit")
del os.environ["EMOSTEER_NO_JIT"]
os.environ["CXX"] = "/nonexistent/c++"
case("no_compiler")
os.environ["CXX"] = "c++"
folder = _jit.build_spec(_jit.sources_root())[2]
folder.mkdir(parents=True)
(folder / "FAILED").write_text("x")
case("failed_before")
out["folder"] = str(folder)
os.environ["EMOSTEER_EXT_CACHE"] = sys.argv[3]
os.environ["CXX"] = sys.argv[2]  # a compiler that fails
case("build_fails")
case("after_failure")
out["failed_folder"] = str(_jit.build_spec(_jit.sources_root())[2])
print(json.dumps(out))
"""

_BUILD_SCRIPT = _PRELUDE + r"""
import time, torch
t0 = time.monotonic()
from emosteer.ops import _jit
module = _jit.load(portable_only=True)
load_s = time.monotonic() - t0
assert module is not None, _jit.why_unavailable()
import emosteer._C as C
import emosteer.ops as ops
from emosteer.ops import reference
from tests.ops.test_csrc_build import _MUTATED, _assert_outputs, _inputs

assert C is module and "cpp" in ops.available_impls("cpu")
gen = torch.Generator().manual_seed(7)
checked = 0
for op in ("head_affine_capture", "residual_steer", "neuron_gain", "probe_gate"):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        args = _inputs(op, dtype, (37, 5, 24), gen)
        want = [a.clone() for a in args]
        getattr(reference, op)(*want)
        getattr(ops, op)(*args, impl="cpp")
        _assert_outputs(op, args, want, f" {dtype}")
        checked += len(_MUTATED[op])
print(json.dumps({"file": C.__file__, "isa": C.cpu_isa(), "records": records,
                  "load_s": load_s, "checked": checked}))
"""


# Mutated arguments the build script compares: 2 + 1 + 1 + 3 per dtype, 3 dtypes.
CHECKED = 21


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "EMOSTEER_IMPL", "EMOSTEER_NO_JIT", "EMOSTEER_CACHE")}
    env["EMOSTEER_EXT_CACHE"] = str(cache)
    return env


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_jit_falls_back_without_compiler(tmp_path):
    bad_cxx = tmp_path / "bad-c++"
    bad_cxx.write_text("#!/bin/sh\necho 'bad-c++: error' >&2\nexit 1\n")
    bad_cxx.chmod(0o755)
    cmd = [sys.executable, "-c", _FALLBACK_SCRIPT, str(ROOT), str(bad_cxx), str(tmp_path / "cache2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(tmp_path / "cache"))
    out = _result(proc)
    # EMOSTEER_NO_JIT: no build, not a word.
    assert out["no_jit"]["impls"] == ["torch"] and out["no_jit"]["records"] == []
    # No compiler: one line saying so and what runs instead; impl="cpp" says why.
    nc = out["no_compiler"]
    assert nc["impls"] == ["torch"] and len(nc["records"]) == 1, nc
    assert "no C++ compiler" in nc["records"][0] and "Triton/torch" in nc["records"][0]
    assert "no C++ compiler" in nc["error"] and "impl='cpp' is not available" in nc["error"]
    # A failed build is not retried by every process; the line says how to retry.
    fb = out["failed_before"]
    assert fb["impls"] == ["torch"] and len(fb["records"]) == 1
    assert "failed before" in fb["why"] and "delete" in fb["why"]
    assert sorted(os.listdir(out["folder"])) == ["FAILED"]  # nothing compiled
    # A compile that fails: the build line, then one line naming the log; the next
    # process does not try again.
    bf, af = out["build_fails"], out["after_failure"]
    assert bf["impls"] == ["torch"] and len(bf["records"]) == 2, bf
    assert "compiling the C++ CPU kernels" in bf["records"][0] and "build.log" in bf["records"][1]
    assert sorted(os.listdir(out["failed_folder"])) == ["FAILED", "build.log"]
    assert "bad-c++" in (Path(out["failed_folder"]) / "build.log").read_text()
    assert len(af["records"]) == 1 and "failed before" in af["records"][0], af


@pytest.mark.slow
def test_jit_builds_once_and_matches_reference(tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-c", _BUILD_SCRIPT, str(ROOT)]
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(cache)) for _ in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        outs.append(_result(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)))
    build_s = time.monotonic() - t0
    compiled = [r for o in outs for r in o["records"] if "compiling the C++ CPU kernels" in r]
    assert len(compiled) == 1, outs  # one process built, the other waited and loaded
    assert all(len(o["records"]) <= 1 for o in outs), outs
    files = {o["file"] for o in outs}
    assert len(files) == 1 and Path(next(iter(files))).is_relative_to(cache), files
    assert all(o["checked"] == CHECKED and o["isa"] == "default" for o in outs), outs
    # A later process loads the cached module: no compile, no log line.
    third = _result(subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(cache)))
    assert third["records"] == [] and third["file"] in files and third["checked"] == CHECKED
    print(f"JIT build (portable kernels, 2 processes): {build_s:.1f} s wall; "
          f"cached load {third['load_s']:.2f} s")
