"""Packaging: what setup.py decides to build, the wheel pip builds, and the declared
dependency floors.

- setup.py's decision (which extensions under which conditions) with a fake build
  environment, its real probes on fake CUDA installs, and its one-line notes: no build.
- ``pip wheel .`` with pip's default build isolation, as ``pip install .`` runs it: it
  must succeed on a CPU machine and give a pure wheel with the package, the C++
  sources for the first-use build, the entry points and no compiled module (slow;
  needs the package registry for the build requirements).
- The default model folder (emosteer/models/__init__.py) against the declared transformers
  range: what the installed transformers loads, and (slow, registry) what the
  declared floor loads.
"""

from __future__ import annotations

import configparser
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "setup.py"


def _setup_module():
    """setup.py as a module (its ``setup()`` call runs only as ``__main__``)."""
    spec = importlib.util.spec_from_file_location("emosteer_setup_under_test", SETUP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup_mod():
    return _setup_module()


class FakeProbe:
    """A build environment: torch (version, cuda), nvcc (path, release), cudart ('' =
    links). Probes that the decision must not need raise."""

    def __init__(self, torch=("2.13.0", "12.8"), nvcc=("/cuda/bin/nvcc", "12.8"), cudart=""):
        self._torch, self._nvcc, self._cudart = torch, nvcc, cudart
        self.asked = []

    def torch(self):
        self.asked.append("torch")
        return self._torch

    def nvcc(self):
        self.asked.append("nvcc")
        if self._nvcc == "raise":
            raise AssertionError("nvcc probed although the decision did not need it")
        return self._nvcc

    def cudart(self):
        self.asked.append("cudart")
        if self._cudart == "raise":
            raise AssertionError("cudart probed although the decision did not need it")
        return self._cudart


NO_TORCH = (None, "ModuleNotFoundError: No module named 'torch'")
CPU_TORCH = ("2.13.0+cpu", None)
# (case, env, probe, builds _C, builds _C_cuda, words the note must hold)
PLAN_CASES = [
    ("skip-all", {"EMOSTEER_SKIP_CPP_BUILD": "1"}, FakeProbe(torch="raise"), False, False,
     ["EMOSTEER_SKIP_CPP_BUILD", "emosteer._C ", "emosteer._C_cuda"]),
    ("isolated", {}, FakeProbe(torch=NO_TORCH, nvcc="raise", cudart="raise"), False, False,
     ["not importable", "build isolation", "first use", "--no-build-isolation", "emosteer._C_cuda"]),
    ("cpu-torch", {}, FakeProbe(torch=CPU_TORCH, nvcc="raise", cudart="raise"), True, False,
     ["2.13.0+cpu is a CPU build", "emosteer._C_cuda", "--no-build-isolation"]),
    ("skip-cuda", {"EMOSTEER_SKIP_CUDA_BUILD": "yes"}, FakeProbe(nvcc="raise", cudart="raise"),
     True, False, ["EMOSTEER_SKIP_CUDA_BUILD", "emosteer._C_cuda"]),
    ("no-nvcc", {}, FakeProbe(nvcc=(None, None), cudart="raise"), True, False,
     ["nvcc not found", "CUDA_HOME", "emosteer._C_cuda"]),
    ("nvcc-other-major", {}, FakeProbe(nvcc=("/cuda/bin/nvcc", "13.0"), cudart="raise"), True, False,
     ["CUDA 13.0", "CUDA 12.8", "emosteer._C_cuda"]),
    ("cudart-unlinkable", {}, FakeProbe(cudart="-lcudart does not link from /usr/local/lib"),
     True, False, ["does not link", "/usr/local/lib", "emosteer._C_cuda", "CUDA_HOME"]),
    ("everything", {}, FakeProbe(), True, True, []),
    ("nvcc-release-unknown", {}, FakeProbe(nvcc=("/cuda/bin/nvcc", None)), True, True, []),
    ("nvcc-same-major", {}, FakeProbe(nvcc=("/cuda/bin/nvcc", "12.4")), True, True, []),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_setup_decides_which_extensions_to_build(setup_mod, case):
    _, env, probe, cpu, cuda, words = case
    got_cpu, got_cuda, note = setup_mod.plan(env, probe)
    assert (got_cpu, got_cuda) == (cpu, cuda)
    if cpu and cuda:
        assert note is None
        return
    assert note and "\n" not in note and note.startswith("emosteer: "), note
    for w in words:
        assert w in note, f"{w!r} not in {note!r}"


def test_setup_real_probe_here(setup_mod):
    """On this machine's torch: a CPU torch builds emosteer._C only, and says why."""
    import torch

    cpu, cuda, note = setup_mod.plan({})
    assert cpu
    if torch.version.cuda is None:
        assert not cuda and "CPU build" in note


def test_setup_says_its_note_once_per_build(setup_mod, capsys):
    """pip runs setup.py three times (requirements, metadata, wheel): only the run
    that builds prints the note, one line."""
    for argv in (["egg_info"], ["dist_info", "--output-dir", "/tmp/x"], ["--quiet", "egg_info"]):
        setup_mod._extensions({"EMOSTEER_SKIP_CPP_BUILD": "1"}, argv=argv)
        assert capsys.readouterr().err == "", argv
    for argv in (["bdist_wheel", "--dist-dir", "/tmp/x"], ["build_ext", "--inplace"], ["editable_wheel"]):
        exts, _ = setup_mod._extensions({"EMOSTEER_SKIP_CPP_BUILD": "1"}, argv=argv)
        assert exts == []
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "EMOSTEER_SKIP_CPP_BUILD" in err, (argv, err)


def _fake_cuda_home(tmp_path, name, release, libcudart=None):
    home = tmp_path / name
    (home / "bin").mkdir(parents=True)
    (home / "lib64").mkdir()
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    if libcudart is not None:
        (home / "lib64" / "libcudart.so").symlink_to(libcudart)
    return home


def test_setup_probes_nvcc_and_cudart(setup_mod, tmp_path, monkeypatch):
    """The real probes on fake CUDA installs: nvcc from CUDA_HOME and its release; the
    cudart link test fails where CUDA_HOME's lib64 has no libcudart (the `cannot find
    -lcudart` of an nvcc wrapper in /usr/local/bin, whose CUDA_HOME is /usr/local) and
    passes where it has one."""
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler {cxx!r} for the link test")
    probe = setup_mod.Probe()
    bad = _fake_cuda_home(tmp_path, "bad", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(bad))
    monkeypatch.delenv("LIBRARY_PATH", raising=False)
    assert probe.nvcc() == (str(bad / "bin" / "nvcc"), "12.8")
    why = probe.cudart()
    assert "does not link" in why and str(bad / "lib64") in why, why
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "none"))
    assert probe.nvcc() == (None, None)
    real = sorted(p for pat in ("/usr/local/cuda*/lib*/libcudart.so", "/usr/lib/x86_64-linux-gnu/libcudart.so")
                  for p in glob.glob(pat))
    if not real:
        return  # no CUDA runtime here to link against
    good = _fake_cuda_home(tmp_path, "good", "12.8", libcudart=real[0])
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(good))
    assert probe.cudart() == ""


# ------------------------------------------------------------------ the wheel
def _registry_reachable(tmp_path) -> str | None:
    """None where pip can fetch the build requirements, else why not."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path / "probe"),
           "setuptools>=69", "wheel"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "pip download timed out"
    return None if res.returncode == 0 else (res.stderr.strip().splitlines() or ["?"])[-1]


def _copy_checkout(dest: Path) -> Path:
    """The files a clean checkout has (tracked and untracked, not ignored): no build/,
    no in-place .so, no egg-info leaking into the wheel."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = None
    if files is None:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.so", "*.egg-info", "__pycache__", ".pytest_cache"))
        return dest
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def isolated_wheel(tmp_path_factory):
    """``pip wheel . --no-deps`` with build isolation from a copy of the checkout:
    (wheel path, pip's output)."""
    tmp = tmp_path_factory.mktemp("wheel")
    why = _registry_reachable(tmp)
    if why:
        pytest.skip(f"package registry unreachable (pip cannot fetch setuptools/wheel): {why}")
    src = _copy_checkout(tmp / "src")
    out = tmp / "dist"
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_NO_BUILD_ISOLATION", "PYTHONPATH")}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-v", "-w", str(out)],
                         cwd=src, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, f"pip wheel failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    wheels = sorted(out.glob("emosteer-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], res.stdout + res.stderr


@pytest.mark.slow
def test_isolated_wheel_builds_on_cpu(isolated_wheel):
    path, log = isolated_wheel
    assert path.name.endswith("-py3-none-any.whl"), path.name  # nothing compiled: pure
    notes = [line.strip() for line in log.splitlines() if line.strip().startswith("emosteer:")]
    assert len(notes) == 1 and "build isolation" in notes[0], notes
    assert "building 'emosteer." not in log and "-lcudart" not in log


@pytest.mark.slow
def test_isolated_wheel_contents(isolated_wheel, tmp_path):
    from emosteer.ops import _build, _dispatch, _jit

    path, _ = isolated_wheel
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        dist = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        eps = configparser.ConfigParser()
        eps.read_string(zf.read(f"{dist}/entry_points.txt").decode())
        zf.extractall(tmp_path)
    for mod in ("emosteer/__init__.py", "emosteer/cli/__init__.py", "emosteer/ops/_dispatch.py",
                "emosteer/ops/_jit.py", "emosteer/ops/_build.py", "emosteer/vllm/__init__.py",
                "emosteer/hf/__init__.py", "emosteer/ops/triton/_launch.py",
                *(f"emosteer/ops/triton/{op}.py" for op in _dispatch.OPS)):
        assert mod in names, mod
    assert any(n.startswith("emosteer/data/builtin/") and n.endswith(".jsonl") for n in names)
    # The playground's page (served at /emosteer/): every file of the static folder.
    static = sorted(p.name for p in (ROOT / "emosteer" / "playground" / "static").iterdir())
    assert {"index.html", "app.js", "style.css"} <= set(static), static
    for name in static:
        assert f"emosteer/playground/static/{name}" in names, name
    # The C++ sources of the first-use build: the whole csrc/ tree, nothing else.
    shipped = sorted(n[len("emosteer/_csrc/"):] for n in names if n.startswith("emosteer/_csrc/"))
    assert shipped == _build.source_tree(str(ROOT / "csrc")), shipped
    # ... byte for byte, so the JIT cache key of an installed wheel is the checkout's.
    assert (_jit.build_spec(tmp_path / "emosteer" / "_csrc")[2].name
            == _jit.build_spec(ROOT / "csrc")[2].name)
    # No compiled module at all (in particular no CUDA extension).
    compiled = [n for n in names if n.endswith((".so", ".pyd", ".dylib", ".o"))]
    assert not compiled, compiled
    assert not any("_C_cuda" in n for n in names)
    assert dict(eps["console_scripts"]) == {"emosteer": "emosteer.cli:main"}
    assert dict(eps["vllm.general_plugins"]) == {"emosteer": "emosteer.vllm:register"}
    assert dict(eps["vllm.endpoint_plugins"]) == {"emosteer": "emosteer.vllm.http:EmosteerEndpoints"}


# ------------------------------------------------------------------ dependency floors
def _declared(name: str) -> str:
    """The version specifier pyproject.toml declares for dependency ``name``."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10
        deps = re.findall(r'^\s*"([^"]+)",?\s*$', text, flags=re.M)
    else:
        deps = tomllib.loads(text)["project"]["dependencies"]
    for dep in deps:
        m = re.match(rf"^{re.escape(name)}\s*([<>=!~][^;]*)", dep.strip())
        if m:
            return m.group(1).strip()
    raise AssertionError(f"{name} is not a declared dependency")


def _floor(name: str) -> str:
    m = re.search(r">=\s*([0-9][0-9.]*)", _declared(name))
    assert m, f"{name} has no >= floor"
    return m.group(1)


def _default_model_dir() -> Path:
    from emosteer import models

    path = models.default_model_path()
    if not models.is_model_dir(path):
        pytest.skip(f"the default model is not converted yet ({path}; `emosteer model default`)")
    return path


ROPE_THETA = 100000.0
# What loading the default model's config needs, per transformers major version: the
# folder is written by transformers 5 (rope_parameters, TokenizersBackend), which 4.x
# reads as rope_theta 10000 and cannot tokenize with, hence the floor >= 5.
FORMAT_MAJOR = 5


def test_transformers_floor_reads_the_default_model_format():
    assert int(_floor("transformers").split(".")[0]) >= FORMAT_MAJOR


def test_default_model_config_in_installed_transformers():
    """The converted folder carries rope_theta where every supported transformers (the
    declared range, all 5.x) reads it, and the installed one builds the model's rotary
    embedding with base 100000."""
    import torch
    import transformers
    from packaging.specifiers import SpecifierSet
    from transformers import AutoConfig, AutoTokenizer

    path = _default_model_dir()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["rope_parameters"] == {"rope_theta": ROPE_THETA, "rope_type": "default"}, cfg
    assert "rope_scaling" not in cfg or cfg["rope_scaling"] in (None, cfg["rope_parameters"])
    assert transformers.__version__ in SpecifierSet(_declared("transformers"))
    config = AutoConfig.from_pretrained(str(path))
    assert config.rope_parameters["rope_theta"] == ROPE_THETA
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = LlamaRotaryEmbedding(config=config)
    dim = config.head_dim
    want = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    torch.testing.assert_close(rope.inv_freq.float(), want, rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok("The sea is calm.")["input_ids"]


_FLOOR_SCRIPT = r"""
import json, sys, transformers
from transformers import AutoConfig, AutoTokenizer
path = sys.argv[1]
cfg = AutoConfig.from_pretrained(path)
rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)}
tok = AutoTokenizer.from_pretrained(path)
print(json.dumps({"version": transformers.__version__, "file": transformers.__file__,
                  "rope_theta": rope["rope_theta"], "ids": tok("The sea is calm.")["input_ids"]}))
"""


@pytest.mark.slow
def test_default_model_config_at_transformers_floor(tmp_path):
    """transformers at the declared floor (installed with its own dependencies into a
    --target folder) reads the default model as the installed one does."""
    from transformers import AutoTokenizer

    path = _default_model_dir()
    floor = _floor("transformers")
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--only-binary", ":all:", "--target",
           str(target), f"transformers=={floor}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        why = _registry_reachable(tmp_path)
        if why:
            pytest.skip(f"package registry unreachable: {why}")
        raise AssertionError(f"pip could not install transformers=={floor}:\n{res.stderr[-3000:]}")
    env = {**os.environ, "PYTHONPATH": str(target), "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([sys.executable, "-c", _FLOOR_SCRIPT, str(path)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["version"] == floor and got["file"].startswith(str(target)), got
    assert got["rope_theta"] == ROPE_THETA, got
    assert got["ids"] == AutoTokenizer.from_pretrained(str(path))("The sea is calm.")["input_ids"]
