"""Build of attnmem's compiled extension ``attnmem._C``.

Environment switches (all optional):
  ATTNMEM_CPU_ONLY=1      never build the CUDA kernel
  ATTNMEM_REQUIRE_CUDA=1  fail the build when the CUDA kernel cannot be built (instead of
                          building the CPU kernel alone)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default here: "8.0;9.0+PTX": machine code for sm_80
                          and sm_90, and sm_90 PTX that newer GPUs (10.x, 12.x) compile at load)
  MAX_JOBS                parallel compile jobs (ninja)

The CUDA kernel is built when torch was built with CUDA (torch.version.cuda) and a CUDA toolkit
is found whose nvcc has torch's CUDA major version and which has libcudart (CUDA_HOME, CUDA_PATH,
the nvcc on PATH, /usr/local/cuda: the first that fits), with the CUDA headers torch's own
headers include: in the toolkit, or in the nvidia-* wheels that ``pip install torch`` brings
(site-packages/nvidia/*/include, added to the include path here). A GPU is not needed to compile
it. When it cannot be built, the CPU kernel is built alone and one line (shown by
``pip install -v``) says why and how to get the CUDA kernel; ``python -m attnmem.info`` says it too.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import torch
from setuptools import setup

# Headers that torch's ATen/cuda/CUDAContext.h (included by the CUDA kernel) pulls in.
CUDA_HEADERS = ("cuda.h", "cuda_runtime_api.h", "cusparse.h", "cublas_v2.h", "cusolverDn.h")


def wheel_cuda_includes() -> list[str]:
    """Include folders of the nvidia-* wheels torch's CUDA build depends on (nvidia/cu13/include,
    nvidia/<library>/include): wherever the ``nvidia`` namespace package is, and next to torch."""
    roots = [os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")]
    try:
        import nvidia  # a namespace package spread over every site folder that has one

        roots += list(nvidia.__path__)
    except ImportError:
        pass
    found = []
    for root in dict.fromkeys(os.path.realpath(r) for r in roots):
        found += sorted(glob.glob(os.path.join(root, "*", "include")))
    return [d for d in found if os.path.isdir(d)]


def toolkit_candidates() -> list[str]:
    """CUDA toolkit roots to consider, in torch's order (CUDA_HOME, CUDA_PATH, the nvcc on PATH,
    /usr/local/cuda). The nvcc on PATH may be a wrapper script in /usr/local/bin, whose "root"
    /usr/local has no CUDA libraries: that is why every candidate is checked."""
    found = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        found.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    found.append("/usr/local/cuda")
    return list(dict.fromkeys(f for f in found if f))


def nvcc_major(root: str) -> int | None:
    try:
        out = subprocess.run(
            [os.path.join(root, "bin", "nvcc"), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else None


def has_cudart(root: str) -> bool:
    return any(os.path.exists(os.path.join(root, d, "libcudart.so")) for d in ("lib64", "lib"))


def cuda_plan() -> tuple[list[str] | None, str]:
    """(extra include folders, "") when the CUDA kernel can be built, else (None, why not).
    Sets CUDA_HOME to the toolkit it chose, for torch's build (which reads it at import)."""
    if os.environ.get("ATTNMEM_CPU_ONLY", "0") == "1":
        return None, "ATTNMEM_CPU_ONLY=1 is set"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} was built without CUDA"
    want = int(torch.version.cuda.split(".")[0])
    roots = [r for r in toolkit_candidates() if os.path.exists(os.path.join(r, "bin", "nvcc"))]
    if not roots:
        return None, f"no CUDA toolkit (nvcc) was found for torch {torch.__version__}"
    usable = [r for r in roots if nvcc_major(r) == want and has_cudart(r)]
    if not usable:
        seen = ", ".join(f"{r} (CUDA {nvcc_major(r)})" for r in roots)
        return None, (
            f"none of the CUDA toolkits {seen} is a CUDA {want} toolkit with nvcc and "
            f"libcudart, as torch {torch.__version__} needs"
        )
    cuda_home = usable[0]
    includes = wheel_cuda_includes()
    folders = [os.path.join(cuda_home, "include"), *includes]
    missing = [
        h for h in CUDA_HEADERS if not any(os.path.isfile(os.path.join(d, h)) for d in folders)
    ]
    if missing:
        return None, (
            f"the CUDA headers {', '.join(missing)} are in neither {cuda_home}/include nor the "
            "nvidia-* wheels"
        )
    os.environ["CUDA_HOME"] = cuda_home
    return includes, ""


INCLUDES, NO_CUDA = cuda_plan()
# Imported after cuda_plan(), which chose CUDA_HOME: torch reads it when imported.
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def cuda_targets() -> str:
    """What nvcc builds for TORCH_CUDA_ARCH_LIST, e.g. "sm_80;sm_90;compute_90" (machine code per
    sm_XY, PTX per compute_XY), read from torch's own translation of the list into -gencode
    flags, so that build_info() states exactly what the extension can run on."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    codes = {m for f in _get_cuda_arch_flags() for m in re.findall(r",code=(\w+)", f)}
    return ";".join(sorted(codes, key=lambda c: (int(re.sub(r"\D", "", c)), c)))


def _define(value: str) -> str:
    """A string fit for a -D value on the compiler command line (no quotes or shell specials)."""
    return re.sub(r"[\"'`$\\]", "", value)


class Build(BuildExtension):
    """torch's BuildExtension, saying once, when it compiles, why CUDA was left out."""

    note = ""

    def run(self):
        if self.note:
            print(self.note, file=sys.stderr)
        super().run()


def extension():
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    includes, why = INCLUDES, NO_CUDA
    if includes is None:
        requested = os.environ.get("ATTNMEM_CPU_ONLY", "0") == "1"
        if os.environ.get("ATTNMEM_REQUIRE_CUDA", "0") == "1":
            sys.exit(f"attnmem: ATTNMEM_REQUIRE_CUDA=1 but the CUDA kernel cannot be built: {why}")
        if not requested and torch.version.cuda is not None:
            Build.note = (
                f"attnmem: building the CPU kernel only: {why}. For the GPU kernel install the "
                f"CUDA {torch.version.cuda} toolkit (or set CUDA_HOME to it) and reinstall; "
                "ATTNMEM_REQUIRE_CUDA=1 makes this an error."
            )
        cxx.append(f'-DATTNMEM_NO_CUDA_REASON="{_define(why)}"')
        return CppExtension(
            "attnmem._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    arch = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    cu = sorted(glob.glob("csrc/cuda/*.cu"))
    # No flag may contain a lowercase "arch": torch then assumes the -gencode flags are given
    # and adds none.
    defs = [
        "-DATTNMEM_WITH_CUDA",
        f'-DATTNMEM_CUDA_ARCH_LIST="{_define(arch)}"',
        f'-DATTNMEM_CUDA_TARGETS="{cuda_targets()}"',
    ]
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *defs]
    return CUDAExtension(
        "attnmem._C",
        cpp + cu,
        include_dirs=includes,
        extra_compile_args={"cxx": cxx + defs, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
