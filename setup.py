"""Build of attnmem's compiled extension ``attnmem._C``.

Environment switches (all optional):
  ATTNMEM_CPU_ONLY=1     never build the CUDA kernel
  TORCH_CUDA_ARCH_LIST   GPU architectures (default here: "8.0;9.0")
  MAX_JOBS               parallel compile jobs (ninja)
The CUDA kernel is built when torch was built with CUDA (torch.version.cuda) and a CUDA
toolkit is found (CUDA_HOME); a GPU is not needed to compile it.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("ATTNMEM_CPU_ONLY", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    if not want_cuda():
        return CppExtension(
            "attnmem._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    arch = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cu = sorted(glob.glob("csrc/cuda/*.cu"))
    defs = ["-DATTNMEM_WITH_CUDA", f'-DATTNMEM_CUDA_ARCH_LIST="{arch}"']
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *defs]
    return CUDAExtension(
        "attnmem._C",
        cpp + cu,
        extra_compile_args={"cxx": cxx + defs, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
