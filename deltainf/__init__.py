"""deltainf: find and remove poisoned training data with Delta-Influence.

Kernels: ``deltainf.ops`` (C++/CUDA) with plain-PyTorch twins in ``deltainf.reference``.
Influence: ``deltainf.EKFAC`` (EK-FAC scores, kronfluence-compatible). Detection:
``deltainf.DeltaInfluence``. The CLI (``deltainf demo | detect | evaluate | bench``) runs the stories
in :mod:`deltainf.stories`.
"""

from deltainf import ops, reference
from deltainf._dist import one_process
from deltainf._extension import build_info, has_cuda_kernels
from deltainf.delta import DeltaInfluence, DetectionResult
from deltainf.influence import EKFAC
from deltainf.version import __version__

__all__ = ["__version__", "build_info", "has_cuda_kernels", "ops", "reference", "EKFAC", "DeltaInfluence",
           "DetectionResult", "one_process"]
