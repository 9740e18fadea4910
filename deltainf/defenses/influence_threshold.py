"""Influence-score thresholding baselines (EK-FAC and TRAK) from the Delta-Influence paper.

Score every training example against the affected test point(s) with an attribution scorer and flag those
whose score exceeds a threshold (or the top-k). The scorer is anything with
``.score(query_x, query_y, train_loader) -> (Q, N)`` (``deltainf.EKFAC``, the TRAK scorer) or a callable
with that signature, so this module needs no influence internals.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from deltainf.data.loaders import make_loader
from deltainf.data.loaders import check_dataset
from deltainf.detector import Detector, DetectorResult
from deltainf._util import check_number, class_indices

_REDUCE = ("max", "mean", "sum", "min")


def _score_fn(scorer) -> Callable:
    if hasattr(scorer, "score") and callable(scorer.score):
        return scorer.score
    if callable(scorer):
        return scorer
    raise TypeError("scorer: expected an object with .score(query_x, query_y, train_loader) -> (Q, N) "
                    f"(e.g. deltainf.EKFAC) or a callable with that signature, got {type(scorer).__name__}")


def robust_threshold(scores: torch.Tensor, z: float) -> float:
    """median + z * 1.4826 * MAD of a 1-D score vector: a scale-free cut for scores whose units vary.

    1.4826 makes the MAD a consistent estimator of the standard deviation under a normal bulk, so z
    reads as "robust standard deviations above the median"; poisons in the tail barely move it.
    """
    s = scores.double().cpu().numpy()
    med = np.median(s)  # of an even count, the mean of the middle two (torch's median takes the lower one)
    mad = np.median(np.abs(s - med))
    return float(med + z * 1.4826 * mad)


class InfluenceThreshold(Detector):
    """Flag training examples whose influence on the affected query exceeds a threshold.

    Exactly one decision rule applies: ``threshold`` (a number: flag score > threshold; ``"auto"``: flag
    score > median + ``auto_z`` x 1.4826 x MAD of the scores), ``top_k`` (the k highest), or
    ``top_fraction`` (the ceil(f N) highest).

    Args:
        scorer: object with ``.score(query_x, query_y, train_loader) -> (Q, N)`` or such a callable;
            may instead be given to :meth:`detect`. Positive scores must mean "supports the query label".
        threshold: float or ``"auto"``.
        top_k: int in [0, N].
        top_fraction: float in [0, 1].
        auto_z: robust z for ``threshold="auto"`` (default 3.0).
        reduce: how the Q query rows are combined per training example before the rule: ``"max"``
            (default; with a threshold this flags an example that exceeds it on ANY query), ``"mean"``,
            ``"sum"`` or ``"min"`` (exceeds it on every query).
        batch_size: batch size of the (unshuffled) training loader handed to the scorer.

    ``detect(model, train_dataset, query_x=..., query_y=...)``: query_x float32 (Q,C,H,W) or (C,H,W),
    query_y int64 (Q,) or an int: the label the model (wrongly) predicts on the affected point. Returns the
    reduced scores (N,) and ``info["raw_scores"]`` (Q, N), ``info["threshold"]`` (the value applied).
    """

    name = "influence_threshold"
    default_threshold: Union[float, str, None] = None

    inputs = ("query_x", "query_y", "scores")

    def __init__(
        self,
        scorer=None,
        *,
        threshold: Union[float, str, None] = None,
        top_k: Optional[int] = None,
        top_fraction: Optional[float] = None,
        auto_z: float = 3.0,
        reduce: str = "max",
        batch_size: int = 64,
    ) -> None:
        if scorer is not None:
            _score_fn(scorer)
        given = [v is not None for v in (threshold, top_k, top_fraction)]
        if sum(given) > 1:
            raise ValueError("threshold, top_k, top_fraction: give at most one decision rule, got "
                             f"threshold={threshold!r}, top_k={top_k!r}, top_fraction={top_fraction!r}")
        if sum(given) == 0:
            threshold = self.default_threshold
            if threshold is None:
                raise ValueError("threshold, top_k, top_fraction: one decision rule is required")
        if isinstance(threshold, str):
            if threshold != "auto":
                raise ValueError(f"threshold: expected a finite number or 'auto', got {threshold!r}")
        elif threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                    or not math.isfinite(threshold):
                raise ValueError(f"threshold: expected a finite number or 'auto', got {threshold!r}")
            threshold = float(threshold)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k: expected an int >= 0, got {top_k!r}")
        if top_fraction is not None:
            top_fraction = check_number("top_fraction", top_fraction, inclusive=True, maximum=1.0)
        auto_z = check_number("auto_z", auto_z)
        if reduce not in _REDUCE:
            raise ValueError(f"reduce: expected one of {list(_REDUCE)}, got {reduce!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        self.scorer = scorer
        self.threshold = threshold
        self.top_k = top_k
        self.top_fraction = top_fraction
        self.auto_z = auto_z
        self.reduce = reduce
        self.batch_size = batch_size

    def detect(
        self,
        model: Optional[nn.Module],
        train_dataset: Dataset,
        query_x: Optional[torch.Tensor] = None,
        query_y=None,
        *,
        scorer=None,
        scores: Optional[torch.Tensor] = None,
    ) -> DetectorResult:
        """Score ``train_dataset`` on the query and apply the decision rule.

        ``model`` is not used (the scorer already wraps it); it is accepted for the common interface.
        ``scores`` (Q, N) may be passed instead of a scorer to threshold precomputed scores.
        """
        n = check_dataset(train_dataset)
        if scores is None:
            if query_x is None or query_y is None:
                raise ValueError("query_x, query_y: the affected test point(s) and the label the model "
                                 "predicts on them are required (or pass precomputed scores=)")
            qx = _query_batch(torch.as_tensor(query_x), train_dataset)
            qy = class_indices(torch.as_tensor(query_y).reshape(-1), "query_y")  # 2.7 was cut to 2
            if qy.numel() == 1:  # one label for every query (the attack's target)
                qy = qy.expand(qx.shape[0]).clone()
            if qy.numel() != qx.shape[0]:
                raise ValueError(f"query_y: expected {qx.shape[0]} labels (one per query), got {qy.numel()}")
            sc = scorer if scorer is not None else self.scorer
            if sc is None:
                raise ValueError("scorer: none given; pass scorer= to the constructor or to detect()")
            loader = make_loader(train_dataset, self.batch_size, shuffle=False)
            scores = _score_fn(sc)(qx, qy, loader)
        scores = torch.as_tensor(scores).detach().cpu()
        if scores.dim() == 1:
            scores = scores.unsqueeze(0)
        if scores.dim() != 2 or scores.shape[1] != n:
            raise ValueError(f"scores: expected shape (Q, {n}) (one column per training example), "
                             f"got {tuple(scores.shape)}")
        if not bool(torch.isfinite(scores).all()):  # the auto threshold became NaN (nothing flagged), top_k took it
            bad = (~torch.isfinite(scores)).any(0).nonzero().flatten()
            raise ValueError(f"scores: non-finite values for {bad.numel()} training example(s), e.g. position "
                             f"{int(bad[0])}; every example must be scored")
        reduced = {"max": lambda s: s.max(0).values, "min": lambda s: s.min(0).values,
                   "mean": lambda s: s.mean(0), "sum": lambda s: s.sum(0)}[self.reduce](scores.double())
        info = {"reduce": self.reduce, "raw_scores": scores}
        if self.top_k is not None or self.top_fraction is not None:
            # less a hair: 0.07 * 100 is 7.000000000000001 in floating point, and 7 is meant
            k = self.top_k if self.top_k is not None else math.ceil(self.top_fraction * n - 1e-9)
            k = min(k, n)
            flagged = torch.sort(reduced, descending=True, stable=True).indices[:k]
            info.update(top_k=k, threshold=float(reduced[flagged].min()) if k else None)
        else:
            thr = robust_threshold(reduced, self.auto_z) if self.threshold == "auto" else self.threshold
            flagged = torch.nonzero(reduced > thr).reshape(-1)
            info.update(threshold=thr, threshold_rule="auto" if self.threshold == "auto" else "fixed")
        return DetectorResult(flagged, reduced.float(), info)


class EKFACThreshold(InfluenceThreshold):
    """EK-FAC thresholding baseline: flag raw EK-FAC score > 10 by default (the paper's BadNet/CIFAR-10
    value with one query; scores scale with the model and data, so set ``threshold`` for other settings)."""

    name = "ekfac_threshold"
    default_threshold = 10.0


class TRAKThreshold(InfluenceThreshold):
    """TRAK thresholding baseline. The paper does not release its threshold, so the default is
    ``threshold="auto"`` (median + 3 robust standard deviations); the value used is in ``info["threshold"]``."""

    name = "trak_threshold"
    default_threshold = "auto"


def _query_batch(qx: torch.Tensor, train_dataset: Dataset) -> torch.Tensor:
    """``qx`` as a batch (Q, *shape) of inputs shaped as the training examples: one input of their shape is a batch
    of one. (Every 3-D query was taken for one image: a batch of five (T, D) sequences became one query.)"""
    first = train_dataset[0]
    shape = tuple(torch.as_tensor(first[0] if isinstance(first, (tuple, list)) else first).shape)
    if tuple(qx.shape) == shape:
        return qx.unsqueeze(0)
    if tuple(qx.shape[1:]) == shape:
        return qx
    raise ValueError(f"query_x: expected one input of the training examples' shape {shape} or a batch "
                     f"(Q, {', '.join(map(str, shape))}), got shape {tuple(qx.shape)}")
