"""Builds emosteer's compiled kernels (the CPU C++ twin always, CUDA where possible).

Environment:
  EMOSTEER_SKIP_CUDA_BUILD=TRUE   never build the CUDA extension
  EMOSTEER_SKIP_CPP_BUILD=TRUE    build no extension at all (pure Python + Triton)
  EMOSTEER_CUDA_ARCHS="80;90"     CUDA architectures to build for
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("EMOSTEER_SKIP_CPP_BUILD", "").upper() not in ("1", "TRUE", "YES"):
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    cpu_sources = sorted(glob.glob("csrc/**/*_cpu.cpp", recursive=True))
    if cpu_sources:
        ext_modules.append(
            CppExtension(
                "emosteer._C",
                ["csrc/bindings_cpu.cpp", *cpu_sources],
                include_dirs=[os.path.abspath("csrc")],
                extra_compile_args={"cxx": ["-O3", "-std=c++17"]},
            )
        )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
