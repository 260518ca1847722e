"""Builds kdkernels._C: the C++ CPU kernels, and the CUDA kernels when a CUDA toolchain and a
CUDA build of torch are present. A failed compile fails the install: the package never
installs without its compiled CPU kernel."""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


def _extension():
    # -fno-trapping-math lets the compiler vectorise the branch-free selects of the kernels; -g0
    # drops the debug information Python's default flags ask for (a large part of the build time).
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math", "-std=c++17"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and bool(cuda_sources)
        and os.environ.get("KDKERNELS_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        # By default H100 (sm_90a), A100 (sm_80) and PTX of the last for later GPUs;
        # KDKERNELS_CUDA_ARCHS (e.g. "90a") narrows the build. No --use_fast_math: the kernels
        # choose their fast intrinsics explicitly (csrc/cuda/kd_loss_kernels.cuh, DeviceMath).
        archs = os.environ.get("KDKERNELS_CUDA_ARCHS", "90a,80").split(",")
        nvcc_flags = ["-O3", "-std=c++17", "-lineinfo"]
        nvcc_flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        nvcc_flags += [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        return CUDAExtension(
            "kdkernels._C",
            sources + cuda_sources,
            define_macros=[("KDKERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("kdkernels._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
