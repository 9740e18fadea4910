"""Builds deltainf._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Environment switches (printed at build time):
  FORCE_CUDA=1            build the CUDA kernels even when no GPU is visible (needs CUDA_HOME/nvcc)
  FORCE_CPU=1             never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    respected as given; when unset, defaults to "8.0;9.0" (A100, H100/H200)
  MAX_JOBS, NVCC_FLAGS, DEBUG=1   parallel compile jobs, extra nvcc flags, -O0 -g builds
Install with `pip install --no-build-isolation -e .` so the extension is built against the torch
already in your environment (an isolated build may fetch another torch and break the ABI).
"""

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys

from setuptools import setup


def locate_cuda_home():
    """The toolkit folder nvcc belongs to. torch guesses it as the parent of `which nvcc`'s folder,
    which is wrong when nvcc on PATH is a wrapper script (e.g. /usr/local/bin/nvcc that execs
    /usr/local/cuda-13.0/bin/nvcc): its headers would then be looked for in /usr/local/include.
    nvcc's dry run names the folder it really runs from."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None  # the user's choice wins
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry_run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True,
                                 text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (dry_run.stdout + dry_run.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            home = os.path.dirname(line.split("=", 1)[1].strip())
            if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
                return home
    return None


# Must run before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
_cuda_home = locate_cuda_home()
if _cuda_home is not None:
    os.environ["CUDA_HOME"] = _cuda_home

try:
    import torch  # noqa: E402
except ImportError:  # typically an isolated build (plain `pip install .`), which cannot see your torch
    sys.exit("deltainf: building needs the torch it will run with; install torch, then run: "
             "pip install --no-build-isolation .")
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCH_LIST = "8.0;9.0"


def want_cuda() -> bool:
    if os.environ.get("FORCE_CPU", "0") == "1":
        print("deltainf: FORCE_CPU=1, building the CPU kernels only")
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        print("deltainf: FORCE_CUDA=1, building the CPU and CUDA kernels")
        return True
    has_toolkit = CUDA_HOME is not None and torch.version.cuda is not None
    if has_toolkit and (torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST")):
        print(f"deltainf: CUDA {torch.version.cuda} found at {CUDA_HOME}, building the CPU and CUDA kernels")
        return True
    print(
        "deltainf: building the CPU kernels only "
        f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}, no GPU visible and "
        "TORCH_CUDA_ARCH_LIST unset; set FORCE_CUDA=1 to build the CUDA kernels anyway)"
    )
    return False


def wheel_cuda_include_dirs() -> list:
    """The CUDA build of torch ships headers (cusparse.h, ...) under nvidia/cu*/include that a
    system toolkit may lack; ATen's CUDA headers need them."""
    try:
        import nvidia  # the namespace package of torch's CUDA wheels
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    return dirs


def _relative(paths) -> list:
    # setuptools wants sources relative to the project root (they end up in the sdist's manifest)
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def make_extension(with_cuda: bool):
    sources = _relative(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -std flag: torch's BuildExtension picks the standard its headers need (C++17 up to 2.13, C++20 from 2.14).
    # -fno-math-errno (as torch itself is built) lets the compiler vectorise loops that call sqrt/log.
    cxx = ["-fopenmp", "-fno-math-errno", *opt]
    macros = [
        ("DELTAINF_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    include_dirs = [os.path.join(CSRC, "include")]
    if not with_cuda:
        return CppExtension("deltainf._C", sources, include_dirs=include_dirs, define_macros=macros,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch_list:
        arch_list = DEFAULT_ARCH_LIST
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # unset before: fill in our default, never override
    print(f"deltainf: TORCH_CUDA_ARCH_LIST={arch_list}")
    sources += _relative(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")) + glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    macros += [
        ("DELTAINF_CUDA_VERSION", f'"{torch.version.cuda}"'),
        ("DELTAINF_CUDA_ARCH_LIST", f'"{arch_list}"'),
    ]
    nvcc = ["-O3" if not debug else "-G", "--expt-relaxed-constexpr", "-lineinfo"]
    nvcc += shlex.split(os.environ.get("NVCC_FLAGS", ""))
    return CUDAExtension("deltainf._C", sources, include_dirs=include_dirs + wheel_cuda_include_dirs(),
                         define_macros=macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


class BuildWithMetadata(BuildExtension):
    """Records what the extension was built against; deltainf checks it at import."""

    def run(self):
        super().run()
        meta = {
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda if WITH_CUDA else None,
            "with_cuda": WITH_CUDA,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if WITH_CUDA else None,
        }
        targets = {os.path.join(ROOT, "deltainf")}
        if not self.inplace and self.build_lib:
            targets.add(os.path.join(self.build_lib, "deltainf"))
        for folder in targets:
            if os.path.isdir(folder):
                with open(os.path.join(folder, "_build_info.json"), "w") as f:
                    json.dump(meta, f, indent=2)


WITH_CUDA = want_cuda()

# Metadata, dependencies and entry points live in pyproject.toml; this file only builds the extension.
setup(
    ext_modules=[make_extension(WITH_CUDA)],
    cmdclass={"build_ext": BuildWithMetadata.with_options(use_ninja=True)},
    zip_safe=False,
)
