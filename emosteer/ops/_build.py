"""What emosteer's compiled kernels are built from, and with which flags.

One definition for both builds of the C++ CPU module ``emosteer._C``: setup.py (which
loads this file by path, without importing the package or torch) and the first-use JIT
build (``emosteer/ops/_jit.py``). Standard library only.
"""

from __future__ import annotations

import glob
import os

# No FMA contraction: the kernels must round like the torch reference. The
# *_avx2_cpu.cpp files get AVX2 from `#pragma GCC target` (csrc/cpu_vec.h), so one set
# of flags serves both builds. ATen's vector headers use `#pragma unroll`.
CPU_CXX_FLAGS = ["-O3", "-ffp-contract=off", "-Wno-unknown-pragmas"]
CUDA_CXX_FLAGS = ["-O3", "-ffp-contract=off"]
CUDA_NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
# Defined for a build of the portable (baseline-ISA) CPU kernels alone, without the
# *_avx2_cpu.cpp files (csrc/common.h): a shorter compile, the same results.
PORTABLE_ONLY_DEFINE = "-DEMOSTEER_HAVE_AVX2_BUILD=0"
# File suffixes of the C++/CUDA sources and headers (what a source tree is made of).
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def cpu_sources(csrc: str, portable_only: bool = False) -> list[str]:
    """The .cpp files of ``emosteer._C`` under ``csrc``, sorted."""
    files = sorted(glob.glob(os.path.join(csrc, "*", "*_cpu.cpp")))
    if portable_only:
        files = [f for f in files if not f.endswith("_avx2_cpu.cpp")]
    return [os.path.join(csrc, "bindings_cpu.cpp"), *files]


def cuda_sources(csrc: str) -> list[str]:
    """The sources of ``emosteer._C_cuda`` under ``csrc``, sorted."""
    return [os.path.join(csrc, "bindings_cuda.cpp"),
            *sorted(glob.glob(os.path.join(csrc, "*", "*_cuda.cu")))]


def source_tree(csrc: str) -> list[str]:
    """Every source and header under ``csrc`` (relative paths, sorted): what a wheel
    ships for the JIT build, and what its cache key hashes."""
    out = []
    for dirpath, _dirs, files in os.walk(csrc):
        for name in files:
            if name.endswith(SOURCE_SUFFIXES):
                out.append(os.path.relpath(os.path.join(dirpath, name), csrc))
    return sorted(out)
