"""deltainf: find and remove poisoned training data with Delta-Influence.

Kernels: ``deltainf.ops`` (C++/CUDA) with plain-PyTorch twins in ``deltainf.reference``.
"""

from deltainf import ops, reference
from deltainf._extension import build_info, has_cuda_kernels
from deltainf.version import __version__

__all__ = ["__version__", "build_info", "has_cuda_kernels", "ops", "reference"]
