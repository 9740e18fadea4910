"""Spectral Signatures (Tran, Li, Madry 2018).

Per class y with penultimate representations R (n_y x d): centre, take the top right singular vector v of
the centred matrix, score each example by its projection on v, remove the highest scores. SVDs use
``scipy.linalg.svd``.

Variants:
  * ``"tran"`` (default, the paper): score tau_i = ((R_i - mean R) . v)^2; flag the top
    ceil(eps_multiplier * expected_poison_fraction * n_y) of every class.
  * ``"art"``: IBM ART 1.20.1 ``SpectralSignatureDefense``: score |v . R_i| with UN-centred R_i; flag
    score >= quantile(score, max(1 - eps_multiplier * expected_poison_fraction, 0)) (numpy's linear
    quantile), per class. ART's default expected_pp_poison is 0.33, which flags ~50 % of every class. Where
    eps_multiplier * expected_poison_fraction is 0 nothing is flagged (ART's quantile would take each class's top).
  * ``"paper"``: the Delta-Influence baseline (not Tran et al.): one SVD of all un-centred features
    (no per-class split), keep singular directions with singular value > ``sv_threshold``, flag examples
    whose projection norm ||U_i,keep * S_keep|| > ``norm_threshold`` (7 and 7 in the authors' notebook).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from deltainf.defenses._common import FeatureFn, activation_rows, extract_features
from deltainf.detector import Detector, DetectorResult
from deltainf._util import as_int, check_number

_VARIANTS = ("tran", "art", "paper")
_DEFAULT_FRACTION = {"tran": 0.1, "art": 0.33, "paper": None}


def _top_right_singular_vector(matrix: np.ndarray) -> np.ndarray:
    """First right singular vector (d,) of an (n, d) matrix (scipy LAPACK gesdd)."""
    from scipy.linalg import svd

    _, _, vt = svd(matrix, full_matrices=False)
    return vt[0]


def spectral_scores(features: np.ndarray, centred_score: bool = True) -> np.ndarray:
    """Spectral-signature scores (n,) float64 of one class's features (n, d).

    ``centred_score=True``: Tran et al.'s ((R_i - mean) . v)^2. ``False``: ART's |R_i . v| on the
    un-centred features. v is always the top right singular vector of the *centred* matrix.
    """
    centred = features - features.mean(axis=0, keepdims=True)
    if features.shape[0] < 2 or not np.any(centred):
        # degenerate class (one example, or all identical): no direction to score along
        v = np.zeros(features.shape[1])
    else:
        v = _top_right_singular_vector(centred)
    if centred_score:
        return (centred @ v) ** 2
    return np.abs(features @ v)


def _label(c) -> int:
    value = as_int(c)
    if value is None or value < 0:
        raise ValueError(f"expected_poison_fraction: its keys must be class labels (ints >= 0), got {c!r}")
    return value


class SpectralSignatures(Detector):
    """Spectral Signatures detector.

    Args:
        variant: ``"tran"`` (default), ``"art"`` or ``"paper"`` (module docstring).
        expected_poison_fraction: upper bound on the poisoned fraction *within a class*, in [0, 1]
            ("tran": default 0.1; "art": default 0.33, ART's ``expected_pp_poison``), one for every class, or
            a mapping {label: bound} for each class on its own (a label it leaves out: bound 0, nothing
            removed), as Tran et al. define eps_y. Unused by "paper".
        eps_multiplier: over-removal factor >= 0 (default 1.5, Tran et al. and ART).
        sv_threshold, norm_threshold: the "paper" variant's thresholds (default 7.0 and 7.0).
        feature_fn: optional callable (B,C,H,W) -> (B,D); default
            :func:`deltainf.models.penultimate_features`, for a deltainf model (``normalize``, ``features``,
            ``classifier``); any other model needs one (a clear TypeError says so).
        batch_size, device, progress: for the activation pass.

    ``detect(model, train_dataset)`` returns the variant's outlier score per example (higher = more
    suspicious) and, in ``info["per_class"]``, the number flagged and the cutoff used per class.
    """

    name = "spectral_signatures"

    def __init__(
        self,
        variant: str = "tran",
        *,
        expected_poison_fraction: Optional[Union[float, Mapping[int, float]]] = None,
        eps_multiplier: float = 1.5,
        sv_threshold: float = 7.0,
        norm_threshold: float = 7.0,
        feature_fn: Optional[FeatureFn] = None,
        batch_size: int = 256,
        device=None,
        progress: bool = False,
    ) -> None:
        if variant not in _VARIANTS:
            raise ValueError(f"variant: expected one of {list(_VARIANTS)}, got {variant!r}")
        if expected_poison_fraction is None:
            expected_poison_fraction = _DEFAULT_FRACTION[variant]
        if isinstance(expected_poison_fraction, Mapping):
            expected_poison_fraction = {
                _label(c): check_number(f"expected_poison_fraction[{c!r}]", v, inclusive=True, maximum=1.0)
                for c, v in expected_poison_fraction.items()}
        elif expected_poison_fraction is not None:
            expected_poison_fraction = check_number("expected_poison_fraction", expected_poison_fraction,
                                                    inclusive=True, maximum=1.0)
        self.eps_multiplier = check_number("eps_multiplier", eps_multiplier, inclusive=True)
        self.sv_threshold = check_number("sv_threshold", sv_threshold, inclusive=True)
        self.norm_threshold = check_number("norm_threshold", norm_threshold, inclusive=True)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        self.variant = variant
        self.expected_poison_fraction = expected_poison_fraction
        self.feature_fn = feature_fn
        self.batch_size = batch_size
        self.device = device
        self.progress = progress

    def detect(self, model: nn.Module, train_dataset: Dataset, **kwargs) -> DetectorResult:
        """Run Spectral Signatures on the model's penultimate activations of ``train_dataset``."""
        if kwargs:
            raise TypeError(f"detect: unexpected keyword arguments {sorted(kwargs)}")
        feats, labels, _ = extract_features(model, train_dataset, self.feature_fn, batch_size=self.batch_size,
                                            device=self.device, progress=self.progress)
        return self.detect_from_activations(feats, labels)

    def detect_from_activations(self, activations: torch.Tensor, labels: torch.Tensor) -> DetectorResult:
        """Spectral Signatures on precomputed activations (N, D) and labels (N,) int."""
        acts = activation_rows(activations)
        lab = torch.as_tensor(labels).reshape(-1).long().cpu().numpy()
        if acts.shape[0] != lab.shape[0]:
            raise ValueError(f"labels: expected {acts.shape[0]} entries (one per activation row), got {lab.shape[0]}")
        n = acts.shape[0]
        flagged = np.zeros(n, dtype=bool)
        scores = np.zeros(n, dtype=np.float64)
        info = {"variant": self.variant, "expected_poison_fraction": self.expected_poison_fraction,
                "eps_multiplier": self.eps_multiplier}
        if self.variant == "paper":
            from scipy.linalg import svd

            u, s, _ = svd(acts, full_matrices=False)
            keep = s > self.sv_threshold
            contrib = u[:, keep] * s[keep]
            scores = np.linalg.norm(contrib, axis=1)
            flagged = scores > self.norm_threshold
            info.update(sv_threshold=self.sv_threshold, norm_threshold=self.norm_threshold,
                        num_directions=int(keep.sum()))
        else:
            # a share above 1 removes the whole class either way; capped, a huge finite eps_multiplier cannot
            # overflow removal * n_y to inf (math.ceil's OverflowError)
            per_class = {}
            bounds = self.expected_poison_fraction
            for c in np.unique(lab):
                idx = np.flatnonzero(lab == c)
                sc = spectral_scores(acts[idx], centred_score=self.variant == "tran")
                scores[idx] = sc
                bound = bounds.get(int(c), 0.0) if isinstance(bounds, dict) else bounds
                removal = min(self.eps_multiplier * bound, 1.0)
                if removal == 0.0:  # no poison expected, however it is said (ART's quantile takes the top)
                    per_class[int(c)] = {"n": len(idx), "removed": 0}
                elif self.variant == "tran":
                    # less a hair: 1.5 * 0.1 * 20 is 3.0000000000000004 in floating point, and 3 is meant
                    k = min(len(idx), math.ceil(removal * len(idx) - 1e-9))
                    # stable sort on -score: among tied scores the lower index is removed first
                    top = np.argsort(-sc, kind="stable")[:k]
                    flagged[idx[top]] = True
                    per_class[int(c)] = {"n": len(idx), "removed": int(k)}
                else:
                    cutoff = float(np.quantile(sc, max(1.0 - removal, 0.0)))
                    hit = ~(sc < cutoff)
                    flagged[idx[hit]] = True
                    per_class[int(c)] = {"n": len(idx), "removed": int(hit.sum()), "cutoff": cutoff}
            info["per_class"] = per_class
        return DetectorResult(torch.from_numpy(np.flatnonzero(flagged)), torch.from_numpy(scores).float(), info)
