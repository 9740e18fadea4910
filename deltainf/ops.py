"""Typed wrappers over torch.ops.deltainf.* (temporary: routes to reference until _C lands)."""
from __future__ import annotations

import torch

from deltainf import reference as _ref

kron_project = _ref.kron_project
kron_project_square_sum = _ref.kron_project_square_sum
kron_project_score = _ref.kron_project_score
jl_project = _ref.jl_project
kron_ihvp = _ref.kron_ihvp
sign_vote = _ref.sign_vote
combine_flags = _ref.combine_flags
