"""Δ-Influence: trace a misbehaving test prediction back to the poisoned training examples.

For each affected test point (x_t, ŷ_t) (ŷ_t = the adversarial label the model predicts):

1. build n transformed copies, each one random transform from the pool plus a random label ≠ ŷ_t
   (:func:`deltainf.transforms.make_transformed_queries`);
2. score every training example against the original query and the n copies with the influence
   engine: all P * (1 + n) queries of all P points go through ONE ``ekfac.score`` call, i.e. one
   pass over the training set;
3. ΔInfl(i, j) = score(z_i; copy j) - score(z_i; original);
4. vote: z_i gets one vote per copy with ΔInfl(i, j) < threshold and is flagged for this point
   when it has at least ``n - tolerance`` votes (``deltainf.ops.sign_vote``);
5. combine the P points: "pooled" (default) flags z_i when its votes summed over the P points reach
   P * (n - tolerance), i.e. all P * n copies vote as one ballot; or combine per-point flags
   (``deltainf.ops.combine_flags``): any / all / majority / at least m.

Exactly the paper's rule (reference/paper.md §1.4-1.5) for P = 1, whatever the combination. Scores
follow the engine's sign convention: positive = the training example supports the query's label.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import time
from typing import Any, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from deltainf import ops
from deltainf.transforms import DEFAULT_POOL, _resolve_pool, make_transformed_queries

__all__ = [
    "DEFAULT_N_TRANSFORMS",
    "DEFAULT_THRESHOLD",
    "DEFAULT_TOLERANCE_FRACTION",
    "DEFAULT_COMBINE",
    "DEFAULT_N_POINTS",
    "POOLED_TOLERANCE_LIMIT",
    "DEFAULT_DOMAIN",
    "AUTO_THRESHOLD_SCALE",
    "DeltaInfluence",
    "DetectionResult",
    "DeltaSummary",
    "AffectedPoint",
    "pick_affected_point",
    "pick_affected_points",
    "AffectedPoints",
    "default_tolerance",
    "check_affected_prediction",
    "auto_thresholds",
    "resolve_tolerance",
    "resolve_min_points",
]

# Defaults, chosen by measurement (the sweeps below) and confirmed end to end (README, docs/RESULTS.md).
#
# The paper tuned (threshold, tolerance) per setting: (0, 2) BadNet/CIFAR-10, (-40, 0)
# Frequency/CIFAR-100, (0, 1) Witches' Brew/Imagenette, all with n = 50 (paper.md §1.5).
# Measured here (digits 16 px, SmallCNN, N = 1,437, 30 poisons = 2 %, EK-FAC scores from kronfluence
# 1.0.1, n = 50, normalized domain, first 3 affected points, 5 seeds BadNet 7->0, 3 seeds all-to-one
# BadNet, 4 seeds frequency trigger 7->0), recall / FPR for ONE affected point with threshold 0:
#     tolerance 0 (0 %):   0.97 / 1.1 %   0.81 / 0.6 %   0.46 / 0.02 %   (BadNet / all-to-one / freq.)
#     tolerance 2 (4 %):   0.98 / 2.9 %   0.86 / 2.2 %   0.71 / 0.2 %
#     tolerance 5 (10 %):  0.99 / 6.9 %   0.90 / 5.7 %   0.84 / 1.1 %
#     tolerance 10 (20 %): 1.00 / 17 %    0.97 / 15 %    0.96 / 5.5 %
# With deltainf's own EK-FAC (lead's sweep, 2026-11-25: digits, SmallCNN, the library's attacks
# DIGITS_BADNET 8->5 72 poisons and DIGITS_FREQUENCY all-to-one 144 poisons, seeds 0-2, n = 50, one
# affected point, threshold 0), recall / FPR:
#     empirical Fisher, damping 1e-8: tolerance 2: BadNet 1.000 / 1.6 %, frequency 0.52 / 1.1 %
#                                     tolerance 5: BadNet 1.000 / 4.3 %, frequency 0.69 / 3.5 %
#     true Fisher, damping 1e-8:      tolerance 2: BadNet 0.91 / 1.7 %,  frequency 0.38 / 1.2 %
#                                     tolerance 5: BadNet 0.95 / 4.7 %,  frequency 0.52 / 3.9 %
# (three affected points, majority, tolerance 8, empirical: BadNet 1.00 / 3.0 %, frequency 0.87 / 2.7 %).
# With ONE affected point no setting reaches recall >= 0.95 at FPR <= 5 % on the frequency trigger
# on digits; pooling several points does (below). The one-point tolerance is the paper's BadNet
# tolerance, 4 % of n (2 of 50), kept as a fraction so that it carries over to other n: with the
# empirical Fisher it finds every BadNet poison at FPR 1.6 %. Threshold 0 is the paper's choice in two
# of three settings, is scale-free, and had the best recall of every threshold tried (the relative
# thresholds of "auto" trade recall for precision, see below).
DEFAULT_N_TRANSFORMS = 50
DEFAULT_THRESHOLD = 0.0
DEFAULT_TOLERANCE_FRACTION = 0.04
# How several affected points are combined (no paper rule exists, §1.6), and how many the stories use.
# One point cannot find the frequency trigger's poisons on digits (recall ~0.5 above): that attack is
# all-to-one, so a triggered test image of class c mostly implicates the poisons made from class c,
# and its vote on the other poisons is noisy. Several points help only if their votes are pooled:
# per-point flags combined by any / majority / all trade recall for FPR without beating one point
# (lead's sweep 2026-11-25, same setting as above, first 10 triggered test images the victim sends to
# the target, 3 seeds; recall / FPR, means over seeds, worst seed in brackets):
#     BadNet                              frequency
#     P=3 tol 8 majority  1.000 / 3.0 %   0.870 / 2.7 %
#     P=5 tol 8 majority  1.000 / 1.8 %   0.917 / 1.8 %   (worst recall 0.83)
#     P=10 tol 2 any      1.000 / 10 %    0.954 / 11 %
#     pooled, tolerance as a fraction of n per point:
#     P=1  0.04           1.000 / 1.6 %   0.516 / 1.1 %   (the paper's rule)
#     P=3  0.20           0.995 / 2.6 %   0.924 / 1.9 %
#     P=5  0.24           1.000 / 2.7 %   0.979 / 1.9 %   (0.965 / 3.2 %)
#     P=10 0.24           1.000 / 1.6 %   0.986 / 1.4 %   (0.965 / 2.9 %; BadNet worst FPR 3.9 %)
#     P=10 0.28           1.000 / 3.0 %   0.998 / 2.3 %   (0.993 / 4.4 %; BadNet worst FPR 6.5 %)
# Pooling averages each example's vote fraction over the points, so clean examples' fractions
# concentrate and the tolerance can grow with P at the same FPR; the default tolerance therefore
# depends on P (see default_tolerance): 4 % of n for one point, rising to 26 % as P grows.
DEFAULT_COMBINE = "pooled"
DEFAULT_N_POINTS = 10
POOLED_TOLERANCE_LIMIT = 0.26
# The paper transformed mean/std-normalised tensors; "pixel" measured within +-0.02 recall of it.
DEFAULT_DOMAIN = "normalized"
# threshold="auto": per affected point, threshold = -AUTO_THRESHOLD_SCALE * median_{i,j} |ΔInfl(i,j)|.
# Raw influence scores have no fixed scale (they depend on N, damping, model and data: the paper
# needed -40 on CIFAR-100 and 0 elsewhere), so a threshold meant to cut false positives must be
# relative to the run's typical ΔInfl magnitude. Measured (one point, tolerance 5 of 50), scale 0.25
# roughly halves the FPR of threshold 0 (3.6 % / 3.2 % / 0.4 %) at a recall cost (0.99 / 0.77 / 0.84):
# a higher-precision mode, not the default. Scale 1.0 cost more recall (0.96 / 0.66 / 0.83).
AUTO_THRESHOLD_SCALE = 0.25

_AUTO_MAX_SAMPLES = 1 << 22  # median estimated on at most this many ΔInfl values per point


# --------------------------------------------------------------------------------------------------
# small validated helpers


def default_tolerance(n_transforms: int, n_points: int = 1, combine=DEFAULT_COMBINE) -> int:
    """The default tolerance (copies per point allowed to miss the threshold).

    ``round(f * n_transforms)`` with f = DEFAULT_TOLERANCE_FRACTION (0.04) for one point or a per-point
    combination, and for ``combine="pooled"`` f = L - (L - 0.04) / P with L = POOLED_TOLERANCE_LIMIT:
    0.04 at P = 1, 0.19 at P = 3, 0.24 at P = 10 (measured, see the notes above DEFAULT_COMBINE)."""
    frac = DEFAULT_TOLERANCE_FRACTION
    if combine == "pooled" and n_points > 1:
        frac = POOLED_TOLERANCE_LIMIT - (POOLED_TOLERANCE_LIMIT - DEFAULT_TOLERANCE_FRACTION) / n_points
    return min(int(round(frac * n_transforms)), n_transforms - 1)


def resolve_tolerance(tolerance: int | None, n_transforms: int, n_points: int = 1, combine=DEFAULT_COMBINE) -> int:
    """The tolerance to use: ``tolerance`` itself, or :func:`default_tolerance` when None.
    Raises ValueError unless 0 <= tolerance < n_transforms."""
    if tolerance is None:
        tolerance = default_tolerance(n_transforms, n_points, combine)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int):
        raise TypeError(f"tolerance must be an int or None, got {tolerance!r}")
    if not 0 <= tolerance < n_transforms:
        raise ValueError(f"tolerance must satisfy 0 <= tolerance < n_transforms={n_transforms}, got {tolerance}")
    return tolerance


def resolve_min_points(combine, n_points: int) -> int | None:
    """How many of the P affected points must flag an example: "any" -> 1, "all" -> P,
    "majority" -> P // 2 + 1, an int m -> m (1 <= m <= P); None for "pooled" (votes are summed over
    the points instead)."""
    if combine == "pooled":
        return None
    if combine == "any":
        return 1
    if combine == "all":
        return n_points
    if combine == "majority":
        return n_points // 2 + 1
    if isinstance(combine, int) and not isinstance(combine, bool):
        if not 1 <= combine <= n_points:
            raise ValueError(f"combine={combine} must be between 1 and the number of affected points ({n_points})")
        return combine
    raise ValueError(f"combine must be 'pooled', 'any', 'all', 'majority' or an int >= 1, got {combine!r}")


def _check_combine(combine) -> None:
    if combine in ("pooled", "any", "all", "majority"):
        return
    if isinstance(combine, int) and not isinstance(combine, bool) and combine >= 1:
        return
    raise ValueError(f"combine must be 'pooled', 'any', 'all', 'majority' or an int >= 1, got {combine!r}")


def _combine(votes: torch.Tensor, point_flags: torch.Tensor, min_votes: int, min_points: int | None) -> torch.Tensor:
    """(N,) bool: pooled (min_points None) = votes summed over the points >= P * min_votes; otherwise
    at least min_points per-point flags (the combine_flags kernel)."""
    if min_points is None:
        return votes.sum(0, dtype=torch.int64) >= votes.shape[0] * min_votes
    return ops.combine_flags(point_flags, min_points)


def _check_threshold(threshold) -> float | str:
    if threshold == "auto":
        return "auto"
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number or 'auto', got {threshold!r}")
    return float(threshold)


def auto_thresholds(base: torch.Tensor, transformed: torch.Tensor, scale: float = AUTO_THRESHOLD_SCALE) -> torch.Tensor:
    """Per-point automatic thresholds: ``-scale * median_{i,j} |transformed[p,j,i] - base[p,i]|``.

    base (P, N), transformed (P, n, N) -> float64 (P,). The median is taken over at most 2^22
    evenly strided ΔInfl values per point (deterministic)."""
    out = torch.empty(base.shape[0], dtype=torch.float64)
    for p in range(base.shape[0]):
        d = (transformed[p].double() - base[p].double().unsqueeze(0)).abs().flatten()
        d = d[~torch.isnan(d)]
        if d.numel() > _AUTO_MAX_SAMPLES:
            d = d[:: int(math.ceil(d.numel() / _AUTO_MAX_SAMPLES))]
        out[p] = -scale * (float(d.median()) if d.numel() else 0.0)
    return out


# --------------------------------------------------------------------------------------------------
# model helpers (affected point selection / check)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``model`` on x (B, C, H, W) in eval mode, batch by batch; returns float CPU (B, K)."""
    was_training = model.training
    model.eval()
    try:
        device = _model_device(model)
        outs = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, x.shape[0], batch_size)]
    finally:
        model.train(was_training)
    logits = torch.cat(outs)
    if logits.ndim != 2:
        raise ValueError(f"model must return logits of shape (B, K), got shape {tuple(logits.shape)}")
    return logits


def check_affected_prediction(model: torch.nn.Module, test_x: torch.Tensor, test_y_adv: torch.Tensor,
                              batch_size: int = 256) -> torch.Tensor:
    """Check that the model predicts ``test_y_adv[p]`` for every affected point ``test_x[p]``.

    Δ-Influence explains a prediction the model actually makes; a point the model does not send to
    the adversarial label gives meaningless ΔInfl. test_x (P, C, H, W) pixel images, test_y_adv int64
    (P,). Returns the logits (P, K) float32 (CPU). Raises ValueError naming the offending points.
    """
    logits = _predict(model, test_x, batch_size)
    k = logits.shape[1]
    y = test_y_adv.to(torch.int64).cpu()
    if bool((y < 0).any()) or bool((y >= k).any()):
        raise ValueError(f"test_y_adv must be in [0, {k}) (the model has {k} outputs), got {y.tolist()}")
    pred = logits.argmax(1)
    bad = (pred != y).nonzero().flatten().tolist()
    if bad:
        detail = ", ".join(f"point {p}: predicted {int(pred[p])}, test_y_adv {int(y[p])}" for p in bad[:10])
        raise ValueError(f"the model does not predict test_y_adv for {len(bad)} affected point(s) ({detail}); "
                         "Δ-Influence needs test inputs the model actually misclassifies as test_y_adv "
                         "(see pick_affected_point), or pass check_prediction=False")
    return logits


class AffectedPoint(NamedTuple):
    """An affected test input found by :func:`pick_affected_point`."""

    x: torch.Tensor  # (C, H, W) pixel image
    index: int  # position in the triggered test set
    true_label: int | None  # its true label when the set provides labels, else None


def _as_items(data) -> tuple[Any, int]:
    """(indexable, length) for a tensor, a map-style dataset, or a DataLoader (its dataset)."""
    if isinstance(data, torch.utils.data.DataLoader):
        data = data.dataset
    if isinstance(data, torch.Tensor):
        return data, data.shape[0]
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return data, len(data)
    raise TypeError("triggered_test_set must be a tensor (M, C, H, W), a map-style dataset yielding x, (x, y) "
                    f"or (x, y, index), or a DataLoader over one; got {type(data).__name__}")


def _iter_affected(model: torch.nn.Module, triggered_test_set, target: int, batch_size: int):
    """Yield (x (C, H, W), index, true label or None) for every triggered test input, in set order, that
    the model classifies as ``target`` and whose true class is not ``target``."""
    items, m = _as_items(triggered_test_set)
    if m == 0:
        raise ValueError("triggered_test_set is empty")
    for start in range(0, m, batch_size):
        stop = min(m, start + batch_size)
        labels = None
        if isinstance(items, torch.Tensor):
            xb = items[start:stop]
        else:
            rows = [items[i] for i in range(start, stop)]
            if isinstance(rows[0], (tuple, list)):
                xb = torch.stack([torch.as_tensor(r[0]) for r in rows])
                labels = [int(r[1]) for r in rows] if len(rows[0]) > 1 else None
            else:
                xb = torch.stack([torch.as_tensor(r) for r in rows])
        if xb.ndim != 4:
            raise ValueError("triggered_test_set inputs must be images (C, H, W), got a batch of shape "
                             f"{tuple(xb.shape)}")
        logits = _predict(model, xb, batch_size)
        if not 0 <= target < logits.shape[1]:
            raise ValueError(f"target must be in [0, {logits.shape[1]}), got {target}")
        pred = logits.argmax(1)
        for k in range(pred.shape[0]):
            if int(pred[k]) != target:
                continue
            if labels is not None and labels[k] == target:
                continue  # a correctly classified target-class image is no evidence of poisoning
            yield xb[k].clone(), start + k, None if labels is None else labels[k]


def _no_affected_error(triggered_test_set, target: int) -> ValueError:
    return ValueError(f"the model classifies none of the {_as_items(triggered_test_set)[1]} triggered test inputs "
                      f"as target {target} (excluding inputs whose true class is the target): the attack did "
                      "not succeed on this model, so there is no affected point to trace")


def pick_affected_point(model: torch.nn.Module, triggered_test_set, target: int,
                        batch_size: int = 256) -> AffectedPoint:
    """The first triggered test input (in set order) that the model classifies as ``target`` (the
    paper's rule, §1.1), skipping inputs whose true class already is ``target``.

    Args:
        model: the (poisoned) classifier; takes pixel images (B, C, H, W), returns logits (B, K).
        triggered_test_set: tensor (M, C, H, W), or a map-style dataset / DataLoader whose items are
            x, (x, y) or (x, y, index); inputs in pixel space with the trigger applied.
        target: the attack's target (adversarial) label.
        batch_size: inference batch size.

    Returns:
        AffectedPoint(x (C, H, W), index in the set, true label or None).

    Raises:
        ValueError if the set is empty or the model sends none of its inputs to ``target``.
    """
    target = int(target)
    for x, index, label in _iter_affected(model, triggered_test_set, target, batch_size):
        return AffectedPoint(x, index, label)
    raise _no_affected_error(triggered_test_set, target)


class AffectedPoints(NamedTuple):
    """Affected test inputs found by :func:`pick_affected_points`."""

    x: torch.Tensor  # (P, C, H, W) pixel images
    indices: list[int]  # positions in the triggered test set
    true_labels: list[int] | None  # their true labels when the set provides labels, else None


def pick_affected_points(model: torch.nn.Module, triggered_test_set, target: int, count: int = DEFAULT_N_POINTS,
                         batch_size: int = 256) -> AffectedPoints:
    """The first ``count`` triggered test inputs the model classifies as ``target`` (fewer when the set
    has fewer): the paper's rule (:func:`pick_affected_point`) extended to several points, which
    Δ-Influence pools (``combine="pooled"``). Same arguments and errors as :func:`pick_affected_point`;
    ``count`` >= 1."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    target = int(target)
    found = []
    for item in _iter_affected(model, triggered_test_set, target, batch_size):
        found.append(item)
        if len(found) == count:
            break
    if not found:
        raise _no_affected_error(triggered_test_set, target)
    labels = [f[2] for f in found]
    return AffectedPoints(torch.stack([f[0] for f in found]), [f[1] for f in found],
                          None if any(v is None for v in labels) else labels)


def _find_normalization(model) -> tuple[list[float], list[float]] | None:
    """Per-channel (mean, std) of the model's input normalisation: ``model.normalize.mean/.std`` or
    the first submodule named ``Normalize`` holding ``mean``/``std``; None if there is none."""
    if model is None:
        return None
    cands = [getattr(model, "normalize", None)]
    if isinstance(model, torch.nn.Module):
        cands += [m for m in model.modules() if type(m).__name__ == "Normalize"]
    for m in cands:
        mean, std = getattr(m, "mean", None), getattr(m, "std", None)
        if mean is not None and std is not None:
            return (torch.as_tensor(mean).detach().double().flatten().cpu().tolist(),
                    torch.as_tensor(std).detach().double().flatten().cpu().tolist())
    return None


# --------------------------------------------------------------------------------------------------
# result


@dataclasses.dataclass
class DeltaSummary:
    """Per-example summary of ΔInfl over the n copies, for each affected point. All (P, N) float32.

    mean: mean_j ΔInfl(i, j); min / max: extremes over j; frac_negative: fraction of copies with
    ΔInfl < 0 (whatever the threshold)."""

    mean: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    frac_negative: torch.Tensor

    @classmethod
    def from_scores(cls, base: torch.Tensor, transformed: torch.Tensor) -> "DeltaSummary":
        """base (P, N), transformed (P, n, N). Computed in float64 over column blocks, so the
        temporary stays small whatever N."""
        p, _, n_train = transformed.shape
        out = {k: torch.empty(p, n_train, dtype=torch.float32) for k in ("mean", "min", "max", "frac_negative")}
        block = 1 << 16
        for a in range(0, n_train, block):
            b = min(n_train, a + block)
            delta = transformed[:, :, a:b].double() - base[:, a:b].double().unsqueeze(1)
            out["mean"][:, a:b] = delta.mean(1).float().cpu()
            out["min"][:, a:b] = delta.amin(1).float().cpu()
            out["max"][:, a:b] = delta.amax(1).float().cpu()
            out["frac_negative"][:, a:b] = (delta < 0).double().mean(1).float().cpu()
        return cls(**out)


@dataclasses.dataclass
class DetectionResult:
    """What :meth:`DeltaInfluence.detect` found.

    Attributes:
        flagged: int64 (K,) sorted positions in the training dataset of the flagged examples.
        votes: int32 (P, N) number of copies with ΔInfl < threshold, per affected point.
        point_flags: bool (P, N) votes >= min_votes.
        base_scores: float32 (P, N) influence of each training example on the original query.
        delta: :class:`DeltaSummary` of ΔInfl over the copies.
        thresholds: float (P,) threshold used for each point (all equal unless threshold="auto").
        min_votes: n_transforms - tolerance (per point; "pooled" needs P * min_votes in total).
        min_points: how many points must flag an example; None when the votes are pooled.
        test_y_adv: int64 (P,) adversarial labels of the affected points.
        query_labels: int64 (P, n) labels of the copies.
        transforms: P lists of n transform names.
        timings: seconds per stage: "check", "transform", "scoring", "vote", "total".
        settings: the detector's settings (JSON-friendly).
        scores: float32 (P, 1 + n, N) all raw scores (column 0 = original query) when the detector
            kept them (``keep_scores=True``), else None; lets :meth:`revote` try other thresholds
            without scoring again.
    """

    flagged: torch.Tensor
    votes: torch.Tensor
    point_flags: torch.Tensor
    base_scores: torch.Tensor
    delta: DeltaSummary
    thresholds: list[float]
    min_votes: int
    min_points: int
    test_y_adv: torch.Tensor
    query_labels: torch.Tensor
    transforms: list[list[str]]
    timings: dict[str, float]
    settings: dict[str, Any]
    scores: torch.Tensor | None = None

    @property
    def n_train(self) -> int:
        """N, the number of training examples scored."""
        return int(self.votes.shape[1])

    @property
    def n_points(self) -> int:
        """P, the number of affected test points."""
        return int(self.votes.shape[0])

    @property
    def n_transforms(self) -> int:
        """n, the number of transformed copies per point."""
        return int(self.query_labels.shape[1])

    @property
    def tolerance(self) -> int:
        return self.n_transforms - self.min_votes

    @property
    def flag_mask(self) -> torch.Tensor:
        """bool (N,): True at flagged training positions."""
        m = torch.zeros(self.n_train, dtype=torch.bool)
        m[self.flagged] = True
        return m

    def vote_histogram(self) -> torch.Tensor:
        """int64 (P, n + 1): number of training examples with each vote count, per point."""
        n = self.n_transforms
        return torch.stack([torch.bincount(v.long(), minlength=n + 1)[: n + 1] for v in self.votes])

    def revote(self, threshold=None, tolerance: int | None = None, combine=None) -> "DetectionResult":
        """The result the same queries give under other settings, without scoring again.

        Changing ``threshold`` needs the raw scores (``keep_scores=True``); tolerance and combine only
        need the votes. Unspecified arguments keep their current values. Returns a new result (timings
        of the vote stage only)."""
        n = self.n_transforms
        comb = self.settings.get("combine", DEFAULT_COMBINE) if combine is None else combine
        _check_combine(comb)
        tol = self.tolerance if tolerance is None else resolve_tolerance(tolerance, n, self.n_points, comb)
        min_points = resolve_min_points(comb, self.n_points)
        t0 = time.perf_counter()
        votes = self.votes
        thresholds = list(self.thresholds)
        thr_setting = self.settings.get("threshold")
        if threshold is not None:
            thr = _check_threshold(threshold)
            if self.scores is None:
                raise ValueError("revote with a new threshold needs the raw scores; run the detector with "
                                 "keep_scores=True")
            base, transformed = self.scores[:, 0], self.scores[:, 1:]
            thresholds = _resolve_thresholds(thr, base, transformed)
            votes = _vote(base, transformed, thresholds)
            thr_setting = thr
        point_flags = votes >= (n - tol)
        combined = _combine(votes, point_flags, n - tol, min_points)
        settings = dict(self.settings, threshold=thr_setting, tolerance=tol, combine=comb)
        return dataclasses.replace(
            self, flagged=combined.nonzero().flatten().to(torch.int64), votes=votes, point_flags=point_flags,
            thresholds=thresholds, min_votes=n - tol, min_points=min_points, settings=settings,
            timings={"vote": time.perf_counter() - t0})

    def to_dict(self, include_arrays: bool = False) -> dict[str, Any]:
        """JSON-ready summary: settings, timings, flagged indices, vote histograms, per-point counts and
        ΔInfl statistics. ``include_arrays=True`` adds the per-example (P, N) arrays (votes, base
        scores, mean ΔInfl, fraction negative)."""
        d: dict[str, Any] = {
            "n_train": self.n_train,
            "n_points": self.n_points,
            "n_transforms": self.n_transforms,
            "thresholds": [float(t) for t in self.thresholds],
            "tolerance": self.tolerance,
            "min_votes": self.min_votes,
            "min_points": self.min_points,
            "n_flagged": int(self.flagged.numel()),
            "flagged": self.flagged.tolist(),
            "flagged_per_point": self.point_flags.sum(1).tolist(),
            "vote_histogram": self.vote_histogram().tolist(),
            "test_y_adv": self.test_y_adv.tolist(),
            "query_labels": self.query_labels.tolist(),
            "transforms": [list(t) for t in self.transforms],
            "transform_counts": _count_names(self.transforms),
            "delta_stats": {
                "mean_of_mean": [float(v) for v in self.delta.mean.double().mean(1)],
                "median_of_mean": [float(v) for v in self.delta.mean.double().median(1).values],
                "frac_examples_all_negative": [float(v) for v in (self.delta.frac_negative == 1).double().mean(1)],
                "base_score_min": [float(v) for v in self.base_scores.amin(1)],
                "base_score_max": [float(v) for v in self.base_scores.amax(1)],
            },
            "timings": {k: float(v) for k, v in self.timings.items()},
            "settings": _jsonable(self.settings),
        }
        if include_arrays:
            d["votes"] = self.votes.tolist()
            d["base_scores"] = self.base_scores.tolist()
            d["delta_mean"] = self.delta.mean.tolist()
            d["delta_frac_negative"] = self.delta.frac_negative.tolist()
        return d


def _count_names(names: list[list[str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in names:
        for nm in row:
            counts[nm] = counts.get(nm, 0) + 1
    return counts


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)


def _resolve_thresholds(threshold, base: torch.Tensor, transformed: torch.Tensor) -> list[float]:
    if threshold == "auto":
        return auto_thresholds(base, transformed).tolist()
    return [float(threshold)] * base.shape[0]


def _vote(base: torch.Tensor, transformed: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """votes int32 (P, N) on CPU; one sign_vote call when all thresholds agree."""
    n = transformed.shape[1]
    # Column/row slices of the (P, 1 + n, N) score block are strided; the kernels want dense inputs.
    base, transformed = base.contiguous(), transformed.contiguous()
    if all(t == thresholds[0] for t in thresholds):
        votes, _ = ops.sign_vote(base, transformed, threshold=thresholds[0], min_votes=n)
        return votes.cpu()
    rows = [ops.sign_vote(base[p:p + 1], transformed[p:p + 1], threshold=thresholds[p], min_votes=n)[0]
            for p in range(base.shape[0])]
    return torch.cat(rows).cpu()


# --------------------------------------------------------------------------------------------------
# the detector


class DeltaInfluence:
    """Δ-Influence detector over an influence engine.

    Args:
        ekfac: the influence engine; any object with ``score(query_x (Q, C, H, W), query_y int64 (Q,),
            train_loader) -> (Q, N)`` whose column i is the training example at dataset position i and
            whose positive scores mean "supports the query label" (e.g. ``deltainf.EKFAC``).
        n_transforms: copies per affected point, >= 1 (paper: 50).
        threshold: ΔInfl below this counts as a vote (paper: 0 or -40), or "auto" for a per-point
            threshold ``-AUTO_THRESHOLD_SCALE * median |ΔInfl|`` (see :func:`auto_thresholds`).
        tolerance: copies per point allowed to miss the threshold, 0 <= tolerance < n_transforms; None
            means :func:`default_tolerance` for the number of points given to :meth:`detect` (n = 50:
            2 for one point, 12 for ten pooled points).
        seed: seeds transform choices, labels and parameters (point p's copies depend on (seed, p) only).
        domain: "normalized" (the paper's: transform the mean/std-normalised tensor) or "pixel".
        mean, std: per-channel statistics for the normalized domain; by default read from the model's
            ``normalize`` module (``model.normalize.mean/.std``).
        pool: transform names or objects (default: the paper's seven).
        labels: label rule for the copies: "replace" (paper), "distinct" or "keep" (image-only ablation).
        combine: how P affected points combine: "pooled" (votes summed over the points, flagged at
            P * (n - tolerance)), or per-point flags by "any", "all", "majority" or an int m (at least m
            points). All agree for P = 1.
        num_classes: K; by default the model's number of outputs or ``ekfac.num_classes``.
        model: the classifier; by default ``ekfac.model``. Used to check the affected points'
            predictions, to find num_classes and the normalisation statistics.
        check_prediction: raise if the model does not predict test_y_adv for an affected point
            (needs a model; skipped when there is none).
        keep_scores: keep the raw (P, 1 + n, N) scores in the result (for :meth:`DetectionResult.revote`).
        progress: show a progress bar while building the queries.
    """

    def __init__(self, ekfac, n_transforms: int = DEFAULT_N_TRANSFORMS, threshold=DEFAULT_THRESHOLD,
                 tolerance: int | None = None, seed: int = 0, domain: str = DEFAULT_DOMAIN, mean=None, std=None,
                 pool: Sequence = DEFAULT_POOL, labels: str = "replace", combine=DEFAULT_COMBINE,
                 num_classes: int | None = None, model: torch.nn.Module | None = None,
                 check_prediction: bool = True, keep_scores: bool = True, progress: bool = False):
        if not callable(getattr(ekfac, "score", None)):
            raise TypeError("ekfac must have a score(query_x, query_y, train_loader) method, got "
                            f"{type(ekfac).__name__}")
        if isinstance(n_transforms, bool) or not isinstance(n_transforms, int) or n_transforms < 1:
            raise ValueError(f"n_transforms must be an int >= 1, got {n_transforms!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if domain not in ("normalized", "pixel"):
            raise ValueError(f"domain must be 'normalized' or 'pixel', got {domain!r}")
        if labels not in ("replace", "distinct", "keep"):
            raise ValueError(f"labels must be 'replace', 'distinct' or 'keep', got {labels!r}")
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std, or neither")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2 or None, got {num_classes!r}")
        _check_combine(combine)
        self.ekfac = ekfac
        self.n_transforms = n_transforms
        self.threshold = _check_threshold(threshold)
        # None stays None: the default depends on the number of points, known only in detect().
        self.tolerance = None if tolerance is None else resolve_tolerance(tolerance, n_transforms)
        self.seed = seed
        self.domain = domain
        self.pool = _resolve_pool(pool)
        self.labels = labels
        self.combine = combine
        self.num_classes = num_classes
        self.model = model if model is not None else getattr(ekfac, "model", None)
        self.check_prediction = bool(check_prediction)
        self.keep_scores = bool(keep_scores)
        self.progress = bool(progress)
        self.mean = self.std = None
        if mean is not None:
            self.mean = torch.as_tensor(mean, dtype=torch.float64).flatten().tolist()
            self.std = torch.as_tensor(std, dtype=torch.float64).flatten().tolist()
            if any(s <= 0 for s in self.std):
                raise ValueError(f"std must be positive, got {self.std}")
        elif domain == "normalized":
            stats = _find_normalization(self.model)
            if stats is None:
                raise ValueError("domain='normalized' needs the per-channel mean and std of the model's input "
                                 "normalisation: pass mean=..., std=..., or a model with a `normalize` module "
                                 "(model=... or ekfac.model), or use domain='pixel'")
            self.mean, self.std = stats

    def tolerance_for(self, n_points: int) -> int:
        """The tolerance used for ``n_points`` affected points (the setting, or its default)."""
        return resolve_tolerance(self.tolerance, self.n_transforms, n_points, self.combine)

    def settings(self) -> dict[str, Any]:
        """The detector's settings, JSON-friendly."""
        return {
            "n_transforms": self.n_transforms,
            "threshold": self.threshold,
            "tolerance": self.tolerance,  # None = default_tolerance(n, P, combine), resolved in detect()
            "seed": self.seed,
            "domain": self.domain,
            "mean": self.mean,
            "std": self.std,
            "pool": [t.name for t in self.pool],
            "labels": self.labels,
            "combine": self.combine,
            "num_classes": self.num_classes,
            "check_prediction": self.check_prediction,
            "auto_threshold_scale": AUTO_THRESHOLD_SCALE if self.threshold == "auto" else None,
            "engine": type(self.ekfac).__name__,
        }

    def _validate_points(self, test_x, test_y_adv) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(test_x, torch.Tensor):
            raise TypeError(f"test_x must be a tensor (C, H, W) or (P, C, H, W), got {type(test_x).__name__}")
        if not test_x.is_floating_point():
            raise TypeError(f"test_x must be a floating-point pixel image tensor, got dtype {test_x.dtype}")
        if test_x.ndim == 3:
            test_x = test_x.unsqueeze(0)
        if test_x.ndim != 4 or test_x.shape[0] == 0 or min(test_x.shape[1:]) < 1:
            raise ValueError(f"test_x must have shape (C, H, W) or (P, C, H, W) with P >= 1, got {tuple(test_x.shape)}")
        p = test_x.shape[0]
        if isinstance(test_y_adv, bool):
            raise TypeError("test_y_adv must be an int or an int64 tensor, got a bool")
        if isinstance(test_y_adv, numbers.Integral):  # also numpy integers
            y = torch.full((p,), int(test_y_adv), dtype=torch.int64)
        elif isinstance(test_y_adv, torch.Tensor):
            if test_y_adv.is_floating_point() or test_y_adv.dtype == torch.bool or test_y_adv.is_complex():
                raise TypeError(f"test_y_adv must be an integer tensor, got dtype {test_y_adv.dtype}")
            y = test_y_adv.detach().to(torch.int64).cpu().flatten()
            if y.numel() == 1 and p > 1:
                y = y.expand(p).clone()
            if y.numel() != p:
                raise ValueError(f"test_y_adv must hold one label per affected point ({p}), got shape "
                                 f"{tuple(test_y_adv.shape)}")
        elif isinstance(test_y_adv, Sequence) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                      for v in test_y_adv):
            y = torch.as_tensor([int(v) for v in test_y_adv], dtype=torch.int64)
            if y.numel() != p:
                raise ValueError(f"test_y_adv must hold one label per affected point ({p}), got {len(test_y_adv)}")
        else:
            raise TypeError(f"test_y_adv must be an int, a sequence of ints or an int64 tensor, got {test_y_adv!r}")
        if bool((y < 0).any()):
            raise ValueError(f"test_y_adv must be non-negative class indices, got {y.tolist()}")
        if self.mean is not None and len(self.mean) not in (1, test_x.shape[1]):
            raise ValueError(f"mean/std have {len(self.mean)} values but test_x has {test_x.shape[1]} channels")
        return test_x, y

    def build_queries(self, test_x: torch.Tensor, test_y_adv: torch.Tensor, num_classes: int):
        """All P * (1 + n) queries: for each point p, the original (x_p, y_p) followed by its n copies.

        test_x (P, C, H, W), test_y_adv int64 (P,). Returns (qx (P*(1+n), C, H, W), qy int64 (P*(1+n),),
        names: P lists of n transform names, labels int64 (P, n))."""
        p = test_x.shape[0]
        root = torch.Generator().manual_seed(self.seed)
        point_seeds = torch.randint(0, 2**62, (p,), generator=root).tolist()
        qx, qy, names, labels = [], [], [], []
        for k in tqdm(range(p), desc="Δ-Influence queries", disable=not self.progress):
            xs, ys, nm = make_transformed_queries(
                test_x[k], int(test_y_adv[k]), self.n_transforms, num_classes, seed=point_seeds[k],
                domain=self.domain, pool=self.pool, mean=self.mean, std=self.std, labels=self.labels)
            qx += [test_x[k:k + 1], xs]
            qy += [test_y_adv[k:k + 1], ys]
            names.append(nm)
            labels.append(ys)
        return torch.cat(qx), torch.cat(qy), names, torch.stack(labels)

    def detect(self, train_loader, test_x: torch.Tensor, test_y_adv) -> DetectionResult:
        """Find the training examples responsible for the affected prediction(s).

        Args:
            train_loader: the training data as the engine expects it (yielding (x, y) or (x, y, index)).
            test_x: affected test input(s), pixel images (C, H, W) or (P, C, H, W), float.
            test_y_adv: adversarial label(s) the model predicts: an int (same for all points) or (P,) ints.

        Returns:
            :class:`DetectionResult`; ``.flagged`` are positions in the training dataset.
        """
        t_start = time.perf_counter()
        test_x, y = self._validate_points(test_x, test_y_adv)
        p = test_x.shape[0]
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        k = self.num_classes
        if self.model is not None and self.check_prediction:
            logits = check_affected_prediction(self.model, test_x, y)
            k = k or logits.shape[1]
        elif self.model is not None and k is None:
            k = _predict(self.model, test_x[:1]).shape[1]
        if k is None:
            k = getattr(self.ekfac, "num_classes", None)
        if k is None:
            raise ValueError("cannot tell the number of classes: pass num_classes=... or a model")
        k = int(k)
        if bool((y >= k).any()):
            raise ValueError(f"test_y_adv must be in [0, {k}), got {y.tolist()}")
        min_points = resolve_min_points(self.combine, p)
        tolerance = self.tolerance_for(p)
        min_votes = self.n_transforms - tolerance
        timings["check"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        qx, qy, names, labels = self.build_queries(test_x, y, k)
        timings["transform"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        scores = self.ekfac.score(qx, qy, train_loader)  # ONE pass over the training set
        timings["scoring"] = time.perf_counter() - t0
        q = p * (1 + self.n_transforms)
        if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or scores.shape[0] != q:
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"ekfac.score must return a (Q={q}, N) tensor, got {shape}")
        if scores.shape[1] == 0:
            raise ValueError("ekfac.score returned scores for 0 training examples: the training loader is empty")
        if not scores.is_floating_point():
            raise TypeError(f"ekfac.score must return floating-point scores, got dtype {scores.dtype}")

        t0 = time.perf_counter()
        s = scores.reshape(p, 1 + self.n_transforms, scores.shape[1])
        base, transformed = s[:, 0], s[:, 1:]
        thresholds = _resolve_thresholds(self.threshold, base, transformed)
        votes = _vote(base, transformed, thresholds)
        point_flags = votes >= min_votes
        combined = _combine(votes, point_flags, min_votes, min_points)
        flagged = combined.nonzero().flatten().to(torch.int64)
        timings["vote"] = time.perf_counter() - t0

        base_cpu = base.detach().float().cpu()
        summary = DeltaSummary.from_scores(base_cpu, transformed.detach().cpu())
        timings["total"] = time.perf_counter() - t_start
        settings = self.settings()
        settings["num_classes"] = k
        settings["tolerance"] = tolerance
        settings["min_votes"] = min_votes
        return DetectionResult(
            flagged=flagged, votes=votes, point_flags=point_flags, base_scores=base_cpu, delta=summary,
            thresholds=thresholds, min_votes=min_votes, min_points=min_points, test_y_adv=y,
            query_labels=labels, transforms=names, timings=timings, settings=settings,
            scores=s.detach().float().cpu().clone() if self.keep_scores else None)
