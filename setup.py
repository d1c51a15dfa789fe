"""Builds emosteer's compiled kernels: the CPU C++ twin always, CUDA where it can.

The package imports and runs without either module (Triton or torch path), so every
extension here is optional at run time.

Environment:
  EMOSTEER_SKIP_CPP_BUILD=TRUE    build no extension at all (pure Python + Triton)
  EMOSTEER_SKIP_CUDA_BUILD=TRUE   never build the CUDA extension emosteer._C_cuda
  EMOSTEER_CUDA_ARCHS="80;90"     CUDA architectures (SASS for each, PTX for the last)

The CUDA extension is built only where torch is a CUDA build (torch.version.cuda) and
nvcc is found (CUDA_HOME, or nvcc on PATH); on a CPU torch it is skipped with a note.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "TRUE", "YES", "ON")


def _rel(paths):
    # setuptools wants source paths relative to the project root.
    return [os.path.relpath(p, ROOT) for p in sorted(paths)]


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


def _nvcc_found(cuda_home) -> bool:
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None


def _extensions():
    if _flag("EMOSTEER_SKIP_CPP_BUILD"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    ext_modules = [
        cpp_extension.CppExtension(
            "emosteer._C",
            _rel([os.path.join(CSRC, "bindings_cpu.cpp"), *glob.glob(f"{CSRC}/*/*_cpu.cpp")]),
            include_dirs=[CSRC],
            # No FMA contraction: the kernels must round like the torch reference. The
            # *_avx2_cpu.cpp files get AVX2 from `#pragma GCC target` (csrc/cpu_vec.h), so
            # one set of flags serves both builds. ATen's vector headers use `#pragma unroll`.
            extra_compile_args={"cxx": ["-O3", "-ffp-contract=off", "-Wno-unknown-pragmas"]},
        )
    ]
    if _flag("EMOSTEER_SKIP_CUDA_BUILD"):
        print("emosteer: EMOSTEER_SKIP_CUDA_BUILD set, not building emosteer._C_cuda", file=sys.stderr)
    elif torch.version.cuda is None:
        print("emosteer: torch is a CPU build, not building emosteer._C_cuda", file=sys.stderr)
    elif not _nvcc_found(cpp_extension.CUDA_HOME):
        print("emosteer: nvcc not found (set CUDA_HOME), not building emosteer._C_cuda", file=sys.stderr)
    else:
        ext_modules.append(
            cpp_extension.CUDAExtension(
                "emosteer._C_cuda",
                _rel([os.path.join(CSRC, "bindings_cuda.cpp"), *glob.glob(f"{CSRC}/*/*_cuda.cu")]),
                include_dirs=[CSRC],
                extra_compile_args={
                    "cxx": ["-O3", "-ffp-contract=off"],
                    "nvcc": ["-O3", "--expt-relaxed-constexpr", *_gencode_flags(_cuda_archs())],
                },
            )
        )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return ext_modules, cmdclass


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
