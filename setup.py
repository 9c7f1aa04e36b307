"""Build gradgeom and its native extension ``gradgeom._C``.

The native sources are listed once, in ``csrc/sources.txt`` (CMakeLists.txt reads the same
file). CUDA kernels are compiled when torch is a CUDA build and a CUDA toolkit (nvcc) is found;
otherwise only the CPU kernels are. Environment variables:

``GRADGEOM_CUDA``         ``1`` forces the CUDA kernels (the build fails if it cannot compile
                          them), ``0`` builds the CPU kernels only; unset means "when possible".
``TORCH_CUDA_ARCH_LIST``  target GPU architectures (honoured as torch does). When unset we build
                          for sm_90 (+PTX) and for every GPU visible at build time. A list with
                          9.0 gains 9.0a (Hopper's wgmma, for the r = 128 Gram kernel).
``MAX_JOBS``              parallel compile jobs (torch's ninja builder).
``GRADGEOM_PTXAS_VERBOSE`` ``1`` prints ptxas's resource report (registers, spills) per kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def locate_cuda_home() -> None:
    """Point CUDA_HOME at the real toolkit when `nvcc` on the PATH is a wrapper script.

    torch guesses CUDA_HOME as the parent of the folder holding `nvcc`; a wrapper in
    /usr/local/bin would make that /usr/local, where libcudart is not. nvcc itself knows.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu", "-o", "x.o"], capture_output=True, text=True,
                             timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return
    for line in out.splitlines():
        if line.startswith("#$ TOP="):
            top = Path(line.split("=", 1)[1].strip()).resolve()
            if (top / "bin" / "nvcc").exists():
                os.environ["CUDA_HOME"] = str(top)
            return


locate_cuda_home()


def native_sources() -> tuple[list[str], list[str]]:
    """Return (C++ sources, CUDA sources) from csrc/sources.txt, relative to the root."""
    cpp, cuda = [], []
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        (cuda if line.endswith(".cu") else cpp).append(line)
    return cpp, cuda


def want_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    forced = os.environ.get("GRADGEOM_CUDA", "").strip().lower()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if forced in ("1", "true", "on", "yes"):
        if not possible:
            raise RuntimeError(
                "GRADGEOM_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}. "
                "Install a CUDA build of torch and a CUDA toolkit with nvcc, or unset GRADGEOM_CUDA."
            )
        return True
    if forced in ("0", "false", "off", "no"):
        return False
    return possible


def default_arch_list() -> str:
    """sm_90 with PTX, plus the compute capability of every GPU visible now."""
    import torch

    archs = {"9.0"}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            archs.add(f"{major}.{minor}")
    ordered = sorted(archs, key=lambda a: tuple(int(p) for p in a.split(".")))
    return ";".join(ordered) + "+PTX"


def with_hopper_features(arch_list: str) -> str:
    """The arch list with sm_90a added wherever it names sm_90 without it.

    The r = 128 Gram kernel uses Hopper's wgmma, which only sm_90a code has; sm_90 code stays in
    the build and serves the rest (the extension picks the kernel the loaded binary holds).
    """
    entries = [e for e in arch_list.replace(",", ";").replace(" ", ";").split(";") if e]
    bases = {e.split("+")[0] for e in entries}
    if "9.0" in bases and "9.0a" not in bases:
        entries.append("9.0a")
    return ";".join(entries)


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp, cuda = native_sources()
    include_dirs = [str(ROOT / "csrc" / "include")]
    cxx_flags = ["-O3", "-DGRADGEOM_PYTHON_MODULE"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inlined from torch's headers and only runs in parallel when the
        # including file is compiled with OpenMP (torch's own libgomp serves it at run time).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list())
        os.environ["TORCH_CUDA_ARCH_LIST"] = with_hopper_features(os.environ["TORCH_CUDA_ARCH_LIST"])
        nvcc_flags = ["-O3", "-lineinfo", "-DGRADGEOM_WITH_CUDA"]
        if os.environ.get("GRADGEOM_PTXAS_VERBOSE") == "1":
            nvcc_flags.append("-Xptxas=-v")  # register / shared-memory / spill report per kernel
        return [
            CUDAExtension(
                "gradgeom._C",
                sources=cpp + cuda,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags + ["-DGRADGEOM_WITH_CUDA"], "nvcc": nvcc_flags},
                extra_link_args=link_flags,
            )
        ]
    return [
        CppExtension(
            "gradgeom._C",
            sources=cpp,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    packages=find_packages(include=["gradgeom", "gradgeom.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
)
