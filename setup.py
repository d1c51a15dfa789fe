"""Builds emosteer's compiled kernels where they can be built against the torch that
will run them, and ships their sources for a first-use build everywhere else.

The package imports and runs without either module (Triton or torch path), so every
extension here is optional at run time.

  - ``emosteer._C`` (C++ CPU kernels) is built when torch is importable here, i.e. the
    build runs in the environment that will run it: ``pip install --no-build-isolation``
    (what scripts/install.sh and ``make`` do), ``setup.py build_ext --inplace``.
  - ``emosteer._C_cuda`` is built, in addition, only where that torch is a CUDA build,
    ``$CUDA_HOME/bin/nvcc`` exists with torch's CUDA major version, and the CUDA runtime
    library links.
  - With pip's default build isolation torch is absent, nothing is compiled (a pure
    wheel), and the wheel carries csrc/ as ``emosteer/_csrc``: ``emosteer._C`` is then
    compiled on first use against the installed torch (emosteer/ops/_jit.py).

Whatever is skipped is said in one line on stderr: which module, why, how to get it.

Environment:
  EMOSTEER_SKIP_CPP_BUILD=TRUE    build no extension at all (pure Python + Triton)
  EMOSTEER_SKIP_CUDA_BUILD=TRUE   never build the CUDA extension emosteer._C_cuda
  EMOSTEER_CUDA_ARCHS="80;90"     CUDA architectures (SASS for each, PTX for the last)
"""

import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
# Flags and source lists, shared with the first-use JIT build (stdlib only, loaded by
# path: importing the package here would import torch).
BUILD = runpy.run_path(os.path.join(ROOT, "emosteer", "ops", "_build.py"))
NO_ISOLATION = "pip install --no-build-isolation ."


def _flag(name: str, env=None) -> bool:
    env = os.environ if env is None else env
    return env.get(name, "").strip().upper() in ("1", "TRUE", "YES", "ON")


def _rel(paths):
    # setuptools wants source paths relative to the project root.
    return [os.path.relpath(p, ROOT) for p in paths]


def _cuda_archs() -> list:
    raw = os.environ.get("EMOSTEER_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"EMOSTEER_CUDA_ARCHS={raw!r}: expected e.g. '80;90'")
    return archs


def _gencode_flags(archs) -> list:
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    last = archs[-1]
    flags += ["-gencode", f"arch=compute_{last},code=compute_{last}"]  # PTX for newer GPUs
    return flags


# ------------------------------------------------------------------ the decision
class Probe:
    """What the build environment offers, looked at lazily (nvcc and the link test
    run only when a CUDA build is still possible). Tests pass their own."""

    def torch(self):
        """(torch version, torch.version.cuda) or (None, why torch is not importable)."""
        try:
            import torch
        except ImportError as err:
            return None, f"{type(err).__name__}: {err}"
        return torch.__version__, torch.version.cuda

    def nvcc(self):
        """(path of $CUDA_HOME/bin/nvcc or None, its CUDA release 'X.Y' or None).
        torch's build runs nvcc from CUDA_HOME only, hence no other place counts."""
        from torch.utils import cpp_extension

        home = cpp_extension.CUDA_HOME
        nvcc = os.path.join(home, "bin", "nvcc") if home else None
        if not nvcc or not os.path.exists(nvcc):
            return None, None
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return nvcc, None
        m = re.search(r"release (\d+\.\d+)", out)
        return nvcc, m.group(1) if m else None

    def cudart(self):
        """'' where a program links against -lcudart from the library folders torch's
        CUDAExtension passes (and LIBRARY_PATH), else why not."""
        from torch.utils import cpp_extension

        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            return f"no C++ compiler {cxx!r} to link with"
        dirs = cpp_extension.library_paths(device_type="cuda")
        with tempfile.TemporaryDirectory(prefix="emosteer-cudart-") as tmp:
            src = os.path.join(tmp, "t.cpp")
            with open(src, "w") as f:
                f.write("int main() { return 0; }\n")
            cmd = [cxx, src, "-o", os.path.join(tmp, "t"), *[f"-L{d}" for d in dirs], "-lcudart"]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as err:
                return f"link test failed to run: {err}"
        if res.returncode == 0:
            return ""
        return f"-lcudart does not link from {', '.join(dirs[1:]) or 'the default paths'}"


def plan(env=None, probe=None):
    """(build emosteer._C?, build emosteer._C_cuda?, the one line saying what is skipped
    and why, or None when nothing is)."""
    env = os.environ if env is None else env
    probe = Probe() if probe is None else probe
    if _flag("EMOSTEER_SKIP_CPP_BUILD", env):
        return False, False, ("emosteer: EMOSTEER_SKIP_CPP_BUILD set: not building emosteer._C "
                              "or emosteer._C_cuda (ops use Triton/torch; unset it to build them)")
    torch_version, torch_cuda = probe.torch()
    if torch_version is None:
        return False, False, (
            "emosteer: torch is not importable in the build environment (pip's build "
            "isolation), so emosteer._C and emosteer._C_cuda are not built: the C++ CPU "
            "kernels compile on first use instead (needs a C++ compiler); to build both "
            f"now, install torch first, then `{NO_ISOLATION}`")
    how = f"install the CUDA toolkit matching torch's CUDA and `{NO_ISOLATION}`"
    if _flag("EMOSTEER_SKIP_CUDA_BUILD", env):
        return True, False, ("emosteer: EMOSTEER_SKIP_CUDA_BUILD set: not building "
                             "emosteer._C_cuda (GPU ops use Triton; unset it to build it)")
    if torch_cuda is None:
        return True, False, (
            f"emosteer: torch {torch_version} is a CPU build: not building emosteer._C_cuda "
            f"(only a CUDA torch runs it); to build it, install a CUDA build of torch and "
            f"the CUDA toolkit, then `{NO_ISOLATION}`")
    nvcc, nvcc_cuda = probe.nvcc()
    if nvcc is None:
        return True, False, (
            f"emosteer: nvcc not found in CUDA_HOME: not building emosteer._C_cuda (GPU ops "
            f"use Triton); to build it, {how} (set CUDA_HOME)")
    if nvcc_cuda is not None and nvcc_cuda.split(".")[0] != str(torch_cuda).split(".")[0]:
        return True, False, (
            f"emosteer: {nvcc} is CUDA {nvcc_cuda} but torch {torch_version} is built for "
            f"CUDA {torch_cuda}: not building emosteer._C_cuda (GPU ops use Triton); to "
            f"build it, {how} (set CUDA_HOME)")
    why = probe.cudart()
    if why:
        return True, False, (
            f"emosteer: the CUDA runtime does not link ({why}): not building "
            f"emosteer._C_cuda (GPU ops use Triton); to build it, set CUDA_HOME to a "
            f"toolkit with lib64/libcudart.so and `{NO_ISOLATION}`")
    return True, True, None


# ------------------------------------------------------------------ the build
class BuildPyWithSources(build_py):
    """Also copies csrc/ into the built package as emosteer/_csrc, the sources of the
    first-use build. Not for editable installs, which build from csrc/ itself."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = os.path.join(self.build_lib, "emosteer", "_csrc")
        shutil.rmtree(dest, ignore_errors=True)
        for rel in BUILD["source_tree"](CSRC):
            target = os.path.join(dest, rel)
            self.mkpath(os.path.dirname(target))
            self.copy_file(os.path.join(CSRC, rel), target)


# setuptools commands that only write metadata: pip runs setup.py for those first (with
# the same extensions), and the note is said once, by the run that builds.
_METADATA_COMMANDS = {"egg_info", "dist_info", "sdist", "--name", "--version"}


def _extensions(env=None, argv=None):
    build_cpu, build_cuda, note = plan(env)
    args = sys.argv[1:] if argv is None else argv
    command = next((a for a in args if not a.startswith("-") or a in _METADATA_COMMANDS), None)
    if note and command not in _METADATA_COMMANDS:
        print(note, file=sys.stderr)
    if not build_cpu:
        return [], {}
    from torch.utils import cpp_extension

    ext_modules = [
        cpp_extension.CppExtension(
            "emosteer._C",
            _rel(BUILD["cpu_sources"](CSRC)),
            include_dirs=[CSRC],
            extra_compile_args={"cxx": BUILD["CPU_CXX_FLAGS"]},
        )
    ]
    if build_cuda:
        ext_modules.append(
            cpp_extension.CUDAExtension(
                "emosteer._C_cuda",
                _rel(BUILD["cuda_sources"](CSRC)),
                include_dirs=[CSRC],
                extra_compile_args={
                    "cxx": BUILD["CUDA_CXX_FLAGS"],
                    "nvcc": [*BUILD["CUDA_NVCC_FLAGS"], *_gencode_flags(_cuda_archs())],
                },
            )
        )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return ext_modules, cmdclass


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__ too
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
