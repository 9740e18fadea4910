"""Δ-Influence: trace a misbehaving test prediction back to the poisoned training examples.

For each affected test point (x_t, ŷ_t) (ŷ_t = the adversarial label the model predicts):

1. build n transformed copies, each one random transform from the pool plus a random label ≠ ŷ_t
   (:func:`deltainf.transforms.make_transformed_queries`);
2. score every training example against the original query and the n copies with the influence
   engine: all P * (1 + n) queries of all P points go through ONE ``ekfac.score`` call, i.e. one
   pass over the training set;
3. ΔInfl(i, j) = score(z_i; copy j) - score(z_i; original);
4. vote (``deltainf.ops.sign_vote``): z_i gets a vote from every copy with ΔInfl(i, j) < threshold
   (its influence collapses), and a *mirror* vote from every copy with ΔInfl(i, j) > -threshold;
5. combine the P points (with controls, those of one affected label: "Several affected labels" below) into one
   statistic per example (``combine``): the votes summed over the points ("pooled", default), or the k-th largest
   per-point vote count ("any" = the largest, "all" = the smallest, "majority", or an int m = the m-th largest);
   the mirror votes are combined alike;
6. decide. With a fixed ``tolerance`` (the paper's rule) z_i is flagged when its statistic reaches
   n - tolerance per point. By default the decision is calibrated on the run itself (below): a poison set
   is claimed only when the coherence test finds one at the false-discovery rate ``fdr``; otherwise the
   answer is "no coherent poison set found".

Candidates. A poison makes the model predict the adversarial label through its own label: dirty-label
poisons are relabelled to it, clean-label poisons are images of that class. By default
(``candidates="label"``) only training examples labelled with an affected point's label are candidates;
``candidates="all"`` lets every example be one (for an attack whose poisons carry other labels).

Controls. Relabelling the copies makes every example that supports the affected label in general (for
example most of the training examples of that class) lose influence on every copy: the vote alone cannot
tell them from poisons. The detector therefore also scores correctly classified inputs of each affected
label (controls, one base query each: held-out reference data when detect() is given it, else training
examples, whose influence on themselves is left out; for a label whose held-out inputs run out too few for the
outranking test below to reach its level with that label's points, training examples where those find nothing)
and measures how much more each example supports the
affected points than the controls: support_i = mean over (point, control) pairs of sign(score(z_i; point) -
score(z_i; control)), in [-1, 1]. A training control can be a poison (a dirty-label poison carries the
affected label), i.e. an affected point in disguise, so the training examples that look like the affected
points to the classifier head are set aside first when they form a population of their own
(:func:`training_controls`), and once scored (twice as many as are needed), those whose influence profile is
the points' (:func:`screen_training_controls`): the group that supports the points supports them too. A poison
control that looks like neither (one point of an all-to-one attack resembles the poisons of its own source class
only) is still a candidate inside the group: the candidates that rank the points above every control, grown in the
head inputs, name the controls to set aside before those screens run (:func:`grown_controls`; with
``boundary="representation"``, which reads the head inputs). A population like the points is a poison group only
where such a population is the exception: when most of the other labels are two populations themselves
(:func:`labels_in_modes`: the kinds of input a CIFAR class or a superclass is made of), it is as likely a mode of
the label that the points resemble, and no training control is set aside (without held-out data one affected point
of a poisoned model is then rarely enough).

The coherence test. If the affected points were ordinary predictions of their label, they would be
exchangeable with the controls: re-splitting each label's points and controls at random gives the null
distribution of the support (:func:`coherence_curve`, ``permutations`` re-splits, no new scores). For every
support cut s the expected number of candidates at or above s under that null, against the number observed,
estimates the false-discovery rate of the set {support >= s}: (1 + null(s)) / observed(s) (the +1 means a set
of fewer than 1/fdr examples is never claimed). A backdoor or targeted poison gives a large group of
candidates that support the affected points far more than any ordinary input of the label is supported; a
genuinely misclassified clean input does not (its label's examples support it less than they support typical
inputs of the label), and the answer is "no coherent poison set found". That same fact makes the estimate
conservative for an affected input: it counts as many ordinary examples at the top as an ordinary input gets,
1 / (1 + C) of the candidates for one point, which an affected input does not get. So a group is also claimed
when the points outrank every control: more candidates rank the points above all controls (support 1) than
rank the pseudo-points so in all but ``OUTRANK_LEVEL`` of the re-splits (with one point and 32 controls, every
one of the 33 splits is enumerated, and the point must come first). With several points of a label the test also
runs point by point, each of the two at half the level: a poison of an all-to-one backdoor can support only the
triggered inputs of its own source class, so it ranks its own point above every control and the others not, and
the candidates that put SOME point first, weighed by how far, are compared with the re-splits'. When it passes,
those candidates join the group, and where nothing else claimed one they are the group (the pooled support, which
did not separate it, then draws no boundary in it). There an input whose scores all run wider than the label's
typical input's is compared in units of its own size, since by its width alone it would put a point first for
ordinary candidates; narrower ones, as a triggered input's are, stay as they are (:func:`coherence_curve`).

The set. When the test finds a cut, the flagged set is the candidates at or above it, or at or above the group's
boundary where that is lower (the candidates are then two populations, the group and the ordinary examples of the
label, which support the affected points less than the controls; a two-component mixture fit on their support places
the boundary where the local false-discovery rate, the posterior of the ordinary population, reaches ``fdr``:
:func:`mixture_cut`; but no lower than the support at which the candidates above it outnumber the permutation null's
count the most, :func:`largest_excess`), together with the candidates that support the points more than the controls
(support > 0) and whose votes pass the mirror cut: the largest set {statistic >= c} whose (1 +
#{mirror statistic >= c}) / #{statistic >= c} is at most ``fdr``, the mirror side being the candidates with support
< 0 (its count scaled up to as many candidates as the vote side has, where that has more; not with two classes,
where every copy is relabelled to the same class: :func:`_mirror_cut_applies`). Last (``boundary="representation"``,
the default but with two classes), the candidates whose representation lies with the group's: a poison the model
fits to zero loss has almost no gradient, so influence cannot see it, but what the classifier head reads of it still
carries the trigger; the same two-population mixture, fit on the candidates' scores along the direction from the
ordinary candidates' mean to the flagged group's and along the linear discriminant between them, delimits the group
there (:func:`representation_cut`). Those fits cannot say how ordinary their additions are (a tail of the label's
own variety passes for a population), so with held-out controls the additions are held to ``fdr`` by them: scored
along the same directions, the controls estimate how many ordinary candidates lie as high, and the additions are cut
back to where that is at most ``fdr`` of them (:func:`decoy_cut`).

Traced again. One point supports mostly the poisons made like itself, and where their representation does not reach
the rest (a warping or a blend on a ViT) the set ends there. The members it found are training inputs that carry the
trigger, and each supports its own: a group found from fewer than ``retrace`` points of a label is traced again with
its members of the highest support (classified as the label) as further points, up to ``retrace`` in all, in a second
scoring pass whose training controls are drawn outside the first group, and the flagged set is both passes'.

Several affected labels. Points of different labels ask different questions: an attack makes the model predict
its target label through examples of that label (dirty-label poisons are relabelled to it, clean-label poisons are
its images). With controls, each affected label is therefore decided on its own, as if it had been traced alone:
its points' votes, its controls, its candidates, the same score pass (``DetectionResult.per_label``); the flagged
set is the union. (A point's transformed copies are drawn by its place among all the points, so a label whose
points are not the first ones gets other copies than when traced alone: the same decision, other draws.) Decided
together, a label's candidates would be compared on pairs of other labels' points and controls, and a group
claimed for one label would be delimited with the others' votes (poison-free models traced from misclassified
inputs of 3-4 labels had 14-165 examples flagged so). Each label is one more chance of a false
claim, so the outranking test, a test at a level, runs at ``OUTRANK_LEVEL`` / (the number of affected labels)
(Bonferroni: with two labels or more, a single point against 32 controls, p >= 1/33, is never claimed by it
alone). Without controls the mirror decides over all the points at once.

Why the mirror. If the original query were just one more copy, z_i's base score would be exchangeable with
its n copy scores, and its vote count distributed like its mirror count: counting mirror examples beyond the
cut estimates how many flagged examples are there by chance (target-decoy competition). Among the candidates
of one label every example tends to collapse under relabelling, so the mirror alone is no null there: it
delimits the set once the coherence test has said that a set exists. Without controls (``n_controls=0``) the
mirror over all examples decides alone, as in the paper's setting. The defaults were chosen from the attack x
architecture x protocol zoo in docs/RESULTS.md and must hold on all of it.

Scores follow the engine's sign convention: positive = the training example supports the query's label.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
import numbers
import os
import time
import warnings
from collections import Counter
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from deltainf import ops
from deltainf.detector import Detector, DetectorResult
from deltainf.influence.scorer import Scorer
from deltainf._util import (check_bool, first_line, keeps_global_rng, named_as, plain_number, progress_bar,
                            to_jsonable, unwrapped)
from deltainf._util import logits as model_logits
from deltainf.transforms import (DEFAULT_POOL, PixelMap, Transform, is_image_pool, make_transformed_queries,
                                 resolve_pool, transform_name)

__all__ = [
    "DEFAULT_N_TRANSFORMS",
    "DEFAULT_THRESHOLD",
    "DEFAULT_FDR",
    "DEFAULT_COMBINE",
    "DEFAULT_N_POINTS",
    "DEFAULT_N_CONTROLS",
    "DEFAULT_PERMUTATIONS",
    "DEFAULT_CANDIDATES",
    "DEFAULT_BOUNDARY",
    "DEFAULT_BOUNDARY_TWO_CLASSES",
    "resolve_boundary",
    "DEFAULT_DOMAIN",
    "AUTO_THRESHOLD_SCALE",
    "DeltaInfluence",
    "DeltaInfluenceDetector",
    "DetectionResult",
    "DeltaSummary",
    "AffectedPoint",
    "pick_affected_point",
    "pick_affected_points",
    "AffectedPoints",
    "check_affected_prediction",
    "pick_controls",
    "training_controls",
    "screen_training_controls",
    "grown_controls",
    "control_support",
    "coherence_curve",
    "Coherence",
    "PointOutranking",
    "OUTRANK_LEVEL",
    "mixture_cut",
    "largest_excess",
    "representation_cut",
    "grown_group",
    "candidate_features",
    "decoy_cut",
    "decoy_scores",
    "training_labels",
    "auto_thresholds",
    "resolve_tolerance",
    "combine_votes",
    "calibrated_cut",
]

# Defaults, chosen from the zoo of docs/RESULTS.md (attacks x architectures x 1 or 10 points x 3 seeds).
DEFAULT_N_TRANSFORMS = 50  # the paper's n
DEFAULT_THRESHOLD = 0.0  # the paper's choice in two of its three settings; scale-free
DEFAULT_FDR = 0.2
DEFAULT_COMBINE = "pooled"
DEFAULT_N_POINTS = 10  # how many affected points the stories trace when the attack offers them
DEFAULT_RETRACE = DEFAULT_N_POINTS  # a group found from fewer points of a label is traced again from this many
# Held-out inputs per affected label used as controls when detect() is given reference data: only their
# base queries are scored (one query each), so they are cheap.
DEFAULT_N_CONTROLS = 32
# Permutations of (affected points, controls) behind the coherence test's null (coherence_curve); every split is
# enumerated instead when there are no more than this many (one point and its controls: 1 + C splits).
DEFAULT_PERMUTATIONS = 100
_MIN_PERMUTATIONS = 20
# The level of the outranking test (coherence_curve's top_p): the conventional 5 %, not fitted to any run. With
# one point it needs at least 19 controls, and then the point must come first among the 1 + C inputs.
OUTRANK_LEVEL = 0.05
DEFAULT_CANDIDATES = "label"
DEFAULT_BOUNDARY = "representation"
# With two classes each label is made of several kinds of input (modes), and the boundaries that extend a group
# past its permutation cut take whole modes of it: on the two-class study (docs/RESULTS.md, "The two-class task:
# where the group ends") they flagged 2.3-45x the clean examples of the permutation cut alone
DEFAULT_BOUNDARY_TWO_CLASSES = "coherence"
_BOUNDARIES = ("representation", "mixture", "coherence")


def resolve_boundary(boundary: str | None, num_classes: int | None) -> str:
    """The boundary a run uses: ``boundary``, or by default (None) DEFAULT_BOUNDARY, or
    DEFAULT_BOUNDARY_TWO_CLASSES for a model of two classes."""
    if boundary is not None:
        return boundary
    return DEFAULT_BOUNDARY_TWO_CLASSES if num_classes == 2 else DEFAULT_BOUNDARY
# Training controls are drawn from this many times n_controls correctly classified examples of a label, so that
# when up to half a label's examples are poisons (and set aside) there are still several times enough.
_CONTROL_POOL = 8
# Training controls are scored this many times n_controls per label, so that after the influence screen
# (screen_training_controls) sets aside up to half of them as poisons the test still has n_controls.
_CONTROL_DRAW = 2
_RETRACE_POOL = 4  # flagged members read per member to trace (some are not predicted as the label)
# Training controls that look like the points are set aside as possible poisons only where a label of two populations
# is the exception in the training set: when at least this share of the other labels are two populations themselves,
# a population like the points is read as a mode of the label. Measured (docs/RESULTS.md, "Labels of several
# modes"): on single digits at most 57 % of the other labels split on the zoo's models, and 78 % (7 of 9) on 2 of
# the 126 poisoned victims of the other digits studies examined; where every label is two digits, 7-10 of 10 (one
# digit at two sizes: 2-10, as low where a network gives both sizes one representation). A few labels examined are
# taken at the share too: asking more of them (a binomial test of more than half, at 0.1) found the poisons of one
# mixed run and of some all-to-all runs, but switched the screens on where every label is two digits, and poison-free
# models claimed a mode (5 of 18 superclass runs from 10 points, 11-32 % of the training set; docs/RESULTS.md).
_MODES_SHARE = 0.75
_MODES_LABELS = 32  # other labels examined for two populations, at most (evenly spread over the label ids)
# The influence screen sets aside at most the (1 - _SCREEN_LEVEL) binomial quantile of the controls for a label
# half poisons: the conventional 1 %, not fitted.
_SCREEN_LEVEL = 0.01
_SCREEN_COLUMNS = 1 << 16  # candidates (evenly strided) behind the influence screen's rank correlations
_SCREEN_ROUNDS = 6  # the influence screen's confirmations (a poison group is stable after one)
_MIXTURE_MIN = 10  # values below which no mixture is fitted (the coherence cut stands alone), and the fewest the
# lower component of a two-population fit must hold to be the ordinary population
_MIXTURE_STARTS = 10  # starts of every two-component fit, the best kept
_REPRESENTATION_ROUNDS = 10  # the representation boundary's fits growing a group from its core, at most
_DISCRIMINANT_FOLDS = 5  # the representation boundary's discriminant is cross-fitted over this many folds
# Head inputs wider than this get no discriminant: each of its fits takes a few M x D^2 multiply-adds (5,000
# candidates of 2,048 features, ResNet-50's head: about a minute on one core; docs/RESULTS.md).
_DISCRIMINANT_MAX_DIM = 2048
_BLOCK = 1 << 16  # training examples per column block when reading the (Q, N) scores, at most
_BLOCK_BYTES = 1 << 26  # a block's float64 temporary, at most: many queries get narrower blocks


def _columns(rows: int) -> int:
    """Columns per block of a read of ``rows`` score rows: :data:`_BLOCK`, fewer when the block's float64 copy
    would pass :data:`_BLOCK_BYTES` (816 queries in blocks of 65,536: 1.3 GB for a 0.6 GB score file)."""
    return max(1, min(_BLOCK, _BLOCK_BYTES // (8 * max(rows, 1))))
# Transforms act on pixel images: colour jitter clamps to the valid range, invert is a negative, fills
# are black. The paper transformed mean/std-normalised tensors ("normalized"), kept as an option.
DEFAULT_DOMAIN = "pixel"
# threshold="auto": per affected point, threshold = -AUTO_THRESHOLD_SCALE * median_{i,j} |ΔInfl(i,j)|, a
# threshold relative to the run's own ΔInfl scale (raw influence scores have none: the paper needed -40
# on CIFAR-100 and 0 elsewhere). A higher-precision mode, not the default.
AUTO_THRESHOLD_SCALE = 0.25

_AUTO_MAX_SAMPLES = 1 << 22  # median estimated on at most this many ΔInfl values per point
_RANGE_SAMPLE = 4096  # training inputs read to find the pixel range when it has to be estimated
_COMBINE_NAMES = ("pooled", "any", "all", "majority")


# --------------------------------------------------------------------------------------------------
# the decision


def resolve_tolerance(tolerance, n_transforms: int) -> int | None:
    """``tolerance`` validated: None (calibrated cut) or an int with 0 <= tolerance < n_transforms."""
    if tolerance is None:
        return None
    if isinstance(tolerance, bool) or not isinstance(tolerance, int):
        raise TypeError(f"tolerance must be an int or None, got {tolerance!r}")
    if not 0 <= tolerance < n_transforms:
        raise ValueError(f"tolerance must satisfy 0 <= tolerance < n_transforms={n_transforms}, got {tolerance}")
    return tolerance


def _check_combine(combine) -> None:
    if combine in _COMBINE_NAMES:
        return
    if isinstance(combine, int) and not isinstance(combine, bool) and combine >= 1:
        return
    raise ValueError(f"combine must be 'pooled', 'any', 'all', 'majority' or an int >= 1, got {combine!r}")


def _rank(combine, n_points: int) -> int | None:
    """Which order statistic of the P per-point counts a combination uses (1 = the largest); None = pooled."""
    if combine == "pooled":
        return None
    if combine == "any":
        return 1
    if combine == "all":
        return n_points
    if combine == "majority":
        return n_points // 2 + 1
    if not 1 <= combine <= n_points:
        raise ValueError(f"combine: {combine} must be between 1 and the number of affected points ({n_points})")
    return combine


def combine_votes(votes: torch.Tensor, combine=DEFAULT_COMBINE) -> torch.Tensor:
    """One statistic per training example from per-point vote counts (P, N): int64 (N,).

    "pooled": the sum over the points (0..P*n); "any" / "all" / "majority" / int m: the largest /
    smallest / (P//2+1)-th / m-th largest per-point count (0..n)."""
    _check_combine(combine)
    k = _rank(combine, votes.shape[0])
    v = votes.to(torch.int64)
    if k is None:
        return v.sum(0)
    return v.topk(k, dim=0).values[-1]


def _cut_of_tolerance(tolerance: int, n_transforms: int, n_points: int, combine) -> int:
    per_point = n_transforms - tolerance
    return n_points * per_point if combine == "pooled" else per_point


def calibrated_cut(statistic: torch.Tensor, mirror: torch.Tensor, fdr: float) -> int | None:
    """The lowest cut c whose set {statistic >= c} has an estimated false-discovery rate
    ``(1 + #{mirror >= c}) / #{statistic >= c}`` of at most ``fdr``; None when no cut does.

    statistic, mirror: int64 (N,); negative values are never counted (outside the control gate). Every
    distinct non-negative value of ``statistic`` is tried (O(N log N))."""
    if statistic.numel() == 0:
        return None
    cuts, at_or_above, mirror_above = _counts(statistic, mirror)
    ok = (1 + mirror_above.double()) <= fdr * at_or_above.double()
    if not bool(ok.any()):
        return None
    return int(cuts[ok.nonzero()[0, 0]])


def _counts(statistic: torch.Tensor, mirror: torch.Tensor):
    """(every distinct non-negative statistic value c ascending, #{statistic >= c}, #{mirror >= c})."""
    stat = statistic.to(torch.int64).sort().values
    mir = mirror.to(torch.int64).sort().values
    cuts = torch.unique(stat)
    cuts = cuts[cuts >= 0]  # negative statistics mark examples outside the control gate
    at_or_above = stat.numel() - torch.searchsorted(stat, cuts, side="left")
    mirror_above = mir.numel() - torch.searchsorted(mir, cuts, side="left")
    return cuts, at_or_above, mirror_above


def _check_fdr(fdr) -> float:
    if isinstance(fdr, bool) or not isinstance(fdr, (int, float)) or not 0.0 < float(fdr) < 1.0:
        raise ValueError(f"fdr must be a number in (0, 1), got {fdr!r}")
    return float(fdr)


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


def _resolve_thresholds(threshold, base: torch.Tensor, transformed: torch.Tensor) -> list[float]:
    if threshold == "auto":
        return auto_thresholds(base, transformed).tolist()
    return [float(threshold)] * base.shape[0]


def _count(base: torch.Tensor, transformed: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """#{j : transformed[p, j, i] - base[p, i] < thresholds[p]}: int32 (P, N) on the CPU (dense inputs)."""
    n = transformed.shape[1]
    if all(t == thresholds[0] for t in thresholds):
        return ops.sign_vote(base, transformed, threshold=thresholds[0], min_votes=n)[0].cpu()
    rows = [ops.sign_vote(base[p:p + 1], transformed[p:p + 1], threshold=thresholds[p], min_votes=n)[0]
            for p in range(base.shape[0])]
    return torch.cat(rows).cpu()


def _vote(base: torch.Tensor, transformed: torch.Tensor, thresholds: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(votes, mirror votes), int32 (P, N): copies with ΔInfl < threshold, and copies with ΔInfl > -threshold
    (the same count on the negated scores). Read in column blocks: the scores may be a memory-mapped file
    larger than memory, and the kernels want dense inputs (slices of the (P, 1 + n, N) block are strided)."""
    P, N = base.shape
    votes, mirror = (torch.empty(P, N, dtype=torch.int32) for _ in range(2))
    step = _columns(transformed.shape[0] * (1 + transformed.shape[1]))
    for a in range(0, N, step):
        b = min(N, a + step)
        bb, tt = base[:, a:b].contiguous(), transformed[:, :, a:b].contiguous()
        votes[:, a:b] = _count(bb, tt, thresholds)
        mirror[:, a:b] = _count(-bb, -tt, thresholds)
    return votes, mirror


# --------------------------------------------------------------------------------------------------
# model helpers (affected point selection / check)


def check_affected_prediction(model: torch.nn.Module, test_x: torch.Tensor, test_y_adv: torch.Tensor,
                              batch_size: int = 256) -> torch.Tensor:
    """Check that the model predicts ``test_y_adv[p]`` for every affected point ``test_x[p]``.

    Δ-Influence explains a prediction the model actually makes; a point the model does not send to
    the adversarial label gives meaningless ΔInfl. test_x (P, ...) model inputs, test_y_adv int64
    (P,). Returns the logits (P, K) float32 (CPU). Raises ValueError naming the offending points.
    """
    logits = model_logits(model, test_x, batch_size, where="test_x")
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
                         "(see pick_affected_point), or build DeltaInfluence(..., check_prediction=False)")
    return logits


def _reference_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y int64 (B,) CPU) of one batch of a reference DataLoader, which yields (x, y, ...): checked as training
    batches are, whatever follows the label."""
    from deltainf.data.loaders import unpack_batch

    x, y, _ = unpack_batch(tuple(batch[:2]) if isinstance(batch, (tuple, list)) else batch, "reference")
    return x, y.cpu()


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
    """Yield (x, index, true label or None) for every triggered test input, in set order, that the model
    classifies as ``target`` and whose true class is not ``target``."""
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
        logits = model_logits(model, xb, batch_size, where="triggered_test_set inputs")
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


class AffectedPoint(NamedTuple):
    """An affected test input found by :func:`pick_affected_point`."""

    x: torch.Tensor  # one model input, e.g. (C, H, W)
    index: int  # position in the triggered test set
    true_label: int | None  # its true label when the set provides labels, else None


def pick_affected_point(model: torch.nn.Module, triggered_test_set, target: int,
                        batch_size: int = 256) -> AffectedPoint:
    """The first triggered test input (in set order) that the model classifies as ``target`` (the
    paper's rule, §1.1), skipping inputs whose true class already is ``target``.

    Args:
        model: the (poisoned) classifier; maps inputs (B, ...) to logits (B, K).
        triggered_test_set: tensor (M, C, H, W), or a map-style dataset / DataLoader whose items are
            x, (x, y) or (x, y, index); model inputs with the trigger applied.
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

    x: torch.Tensor  # (P, ...) model inputs
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



def _stacked_inputs(reference):
    """A reference given as (a list of equally shaped input tensors or arrays, one label each) as (x, y) tensors;
    anything else as it is."""
    if not isinstance(reference, (tuple, list)) or len(reference) != 2:
        return reference
    inputs, labels = reference
    if not isinstance(inputs, (tuple, list)) or not inputs or \
            not all(isinstance(v, (torch.Tensor, np.ndarray)) for v in inputs) or \
            len({tuple(v.shape) for v in inputs}) != 1:
        return reference
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        count = labels.shape[0] if labels.ndim else -1
    elif isinstance(labels, (tuple, list)) and all(isinstance(v, numbers.Integral) for v in labels):
        count = len(labels)
    else:
        return reference  # e.g. a list of two (x, y) pairs
    return (torch.stack([torch.as_tensor(v) for v in inputs]), labels) if count == len(inputs) else reference


def pick_controls(model: torch.nn.Module | None, reference, labels: torch.Tensor, count: int = DEFAULT_N_CONTROLS,
                  exclude: torch.Tensor | None = None, batch_size: int = 256,
                  train_range: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out controls: for every label in ``labels``, the first ``count`` reference inputs (in order)
    carrying that label that the model classifies correctly (any, without a model), skipping inputs
    equal to one in ``exclude`` (the affected points, whose input shape the reference must have). Integer inputs
    (uint8 images) are read as floats, as the affected points are (unless those hold integers: token ids); given the
    training inputs' value range ``train_range`` (lo, hi), inputs on another scale are refused (:func:`check_scale`).

    reference: (x, y) tensors or numpy arrays, a map-style dataset yielding (x, y, ...) items, or a DataLoader
    yielding (x, y, ...) batches (read through them: its sampler and collate function apply). Returns (x (C, ...),
    y int64 (C,)), grouped by label in the order of ``sorted(set(labels))``; C = 0 when the reference holds no
    usable control at all (a label without one gets none)."""
    reference = _stacked_inputs(reference)
    if isinstance(reference, (tuple, list)) and len(reference) == 2 and \
            isinstance(reference[0], (torch.Tensor, np.ndarray)):
        ref_x, ref_y = (torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in reference)
        ref_y = torch.as_tensor(ref_y)
        if ref_y.ndim != 1 or ref_y.shape[0] != ref_x.shape[0] or ref_y.is_floating_point():
            raise ValueError(f"reference: labels must be integers of shape ({ref_x.shape[0]},), got "
                             f"{tuple(ref_y.shape)} {ref_y.dtype}")
        m = ref_x.shape[0]
        raw = ((ref_x[a:a + batch_size], ref_y[a:a + batch_size].to(torch.int64)) for a in range(0, m, batch_size))
    elif isinstance(reference, torch.utils.data.DataLoader):
        # its own batches: its sampler (a held-out split of a dataset) and collate function (a standardisation)
        # decide what the controls are; one that shuffles its whole dataset is read in order, for the same controls
        # on every run
        from deltainf.data.loaders import batches_of, in_dataset_order

        raw = (_reference_batch(batch) for batch in batches_of(in_dataset_order(reference), "reference"))
    else:
        try:
            items, m = _as_items(reference)
        except TypeError:
            raise TypeError("reference must be (x, y) tensors, a map-style dataset yielding (x, y, ...) items or a "
                            f"DataLoader over one, got {type(reference).__name__}") from None

        def rows(a, b):
            got = [items[i] for i in range(a, b)]
            if not got or not isinstance(got[0], (tuple, list)) or len(got[0]) < 2:
                raise TypeError("reference items must be (x, y, ...) with a label")
            try:
                return (torch.stack([torch.as_tensor(r[0]) for r in got]),
                        torch.as_tensor([int(r[1]) for r in got], dtype=torch.int64))
            except (TypeError, RuntimeError, ValueError) as err:  # PIL images, file names, labels that are no ints
                raise TypeError(f"reference: its items must be (x, y, ...) with x a tensor or array of the model's "
                                f"input and y an int ({first_line(err)}); images need a transform to tensors") from None
        raw = (rows(a, min(m, a + batch_size)) for a in range(0, m, batch_size))

    def checked(batches):
        start = 0
        for x, y in batches:
            x = x.detach()
            if exclude is not None and tuple(x.shape[1:]) != tuple(exclude.shape[1:]):  # before the model sees them
                raise ValueError(f"reference: its inputs have shape {tuple(x.shape[1:])}, but the affected inputs "
                                 f"have shape {tuple(exclude.shape[1:])}")
            if not x.is_floating_point() and x.dtype != torch.bool and not x.is_complex() and \
                    (exclude is None or exclude.is_floating_point()):
                x = x.float()
            check_scale("reference", x, train_range)
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):  # its NaN logits read as class 0
                bad = (start + (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten()).tolist()
                raise ValueError(f"reference: input(s) {bad[:8]} hold NaN or infinite values")
            yield x, y, torch.arange(start, start + y.shape[0])
            start += y.shape[0]
    batches = checked(raw)
    chosen = _first_correct(model, batches, labels, count, exclude, "reference inputs")
    ys = torch.tensor([c for _, c, _ in chosen], dtype=torch.int64)
    if not chosen:
        return torch.empty(0), ys
    return torch.stack([x for x, _, _ in chosen]), ys


def training_controls(model: torch.nn.Module, train_loader, labels: torch.Tensor, count: int = DEFAULT_N_CONTROLS,
                      points: tuple[torch.Tensor, torch.Tensor] | None = None, read: list[tuple] | None = None):
    """Controls from the training data when no held-out reference is given: for every label in
    ``labels``, ``count`` training examples (in loader order) with that label that the model classifies
    correctly. Returns ((x (C, ...), y int64 (C,)), dataset positions int64 (C,), how many were set aside).

    Poisons can be among them: a dirty-label poison carries the affected label and is classified as it, so
    the first examples of the label can be a third or more poisons, and a poison control is an affected point
    in disguise (the other poisons support it as they support the points, which hides them). Given the affected
    ``points`` (x as the model takes them, y int64 (P,)), the controls of a label are drawn from its first
    ``_CONTROL_POOL * count`` such examples, leaving out those that look like the points to the classifier
    head: each is projected on the direction from the pool's median head input to the mean head input of the
    label's points, and when the projections are two populations (the test of :func:`representation_cut`)
    the upper one is set aside. An ordinary label is one population and keeps its first examples. A clean-label
    attack that poisons the whole class still hides in its controls; held-out reference data does not.
    ``read``: what :func:`_first_correct` already read of ``train_loader`` for these labels (and maybe others), at
    least the pool of each, used in place of reading it again."""
    pool = count if points is None else _CONTROL_POOL * count
    chosen = _first_correct(model, _positioned(train_loader), labels, pool, None, "train_loader inputs") \
        if read is None else _first_of(read, labels, pool)
    if points is not None:
        chosen, set_aside = _screen_controls(model, chosen, points, count)
    else:
        set_aside = 0
    if not chosen:
        return (torch.empty(0), torch.empty(0, dtype=torch.int64)), torch.empty(0, dtype=torch.int64), set_aside
    return ((torch.stack([c[0] for c in chosen]), torch.tensor([c[1] for c in chosen], dtype=torch.int64)),
            torch.tensor([c[2] for c in chosen], dtype=torch.int64), set_aside)


def _screen_controls(model: torch.nn.Module, chosen: list[tuple], points, count: int) -> tuple[list[tuple], int]:
    """``chosen`` ([(x, label, position)] grouped by label) with the examples that look like the affected
    ``points`` set aside (:func:`training_controls`), ``count`` per label: (the kept, how many were set aside)."""
    px, py = points
    kept, set_aside, screen = [], 0, True
    for label in dict.fromkeys(c[1] for c in chosen):
        group = [c for c in chosen if c[1] == label]
        if screen:
            try:
                phi = _head_inputs(model, torch.stack([c[0] for c in group])).double()
                target = _head_inputs(model, px[py.to(px.device) == label]).double().mean(0)
            except TypeError as err:  # no nn.Linear / nn.Conv2d head to read
                warnings.warn(f"controls: {err}; the training controls are not screened for poisons", stacklevel=4)
                screen = False
            else:
                like_points = _like_points(phi, target)
                set_aside += int(like_points.sum())
                group = [c for c, out in zip(group, like_points.tolist()) if not out]
        kept += group[:count]
    return kept, set_aside


def _like_points(phi: torch.Tensor, target: torch.Tensor, rounds: int = 5) -> torch.Tensor:
    """bool (M,): the examples whose head inputs ``phi`` (M, D) form a second population on the side of the
    affected points' mean head input ``target`` (D,), or none. The first direction is from the median example to
    the points; a few points carry their own noise, so the direction is then refitted from the ordinary
    examples' mean to the population found, until the population stops changing."""
    centre = phi.median(0).values
    upper = torch.zeros(phi.shape[0], dtype=torch.bool)
    for _ in range(rounds):
        found = _separated_upper((phi - centre) @ (target - centre))
        if torch.equal(found, upper) or int(found.sum()) < 1 or int((~found).sum()) < 2:
            break
        upper = found
        centre, target = phi[~upper].mean(0), phi[upper].mean(0)
    return upper


def _first_of(chosen: list[tuple], labels, count: int) -> list[tuple]:
    """Of ``chosen`` ([(x, label, position)] of :func:`_first_correct`, grouped by label), the first ``count`` of
    each label in ``labels``."""
    wanted, taken, out = set(int(v) for v in torch.as_tensor(labels).flatten().tolist()), {}, []
    for c in chosen:
        if c[1] in wanted and taken.get(c[1], 0) < count:
            taken[c[1]] = taken.get(c[1], 0) + 1
            out.append(c)
    return out


def _examined_labels(num_classes: int, skip) -> list[int]:
    """The labels :func:`labels_in_modes` examines: those not in ``skip``, at most ``_MODES_LABELS`` of them spread
    over the label ids."""
    skipped = set(int(v) for v in skip)
    others = [c for c in range(num_classes) if c not in skipped]
    if len(others) > _MODES_LABELS:
        others = [others[round(i * (len(others) - 1) / (_MODES_LABELS - 1))] for i in range(_MODES_LABELS)]
    return others


def labels_in_modes(model: torch.nn.Module, train_loader, num_classes: int, skip, count: int,
                    read: list[tuple] | None = None) -> tuple[int, int]:
    """How many labels of the training set are two populations themselves: (split, examined).

    Examined are the labels other than ``skip`` (the affected ones, which an attack makes two populations), at most
    ``_MODES_LABELS`` of them spread over the label ids, each with at least ``_MIXTURE_MIN`` examples the model
    classifies correctly: of each, the first ``count`` such examples in loader order. A label is split when its
    head inputs, projected on their first principal direction, are two separated populations (the test of
    :func:`_separated_upper`). The screens of training controls read a population like the affected points as
    poisons; where most labels are two populations (the kinds of input a label is made of: breeds, poses, a
    superclass's classes), such a population is as likely a mode of the label, and is not set aside. ``read``:
    what :func:`_first_correct` already read of ``train_loader`` for these labels, used in place of reading it."""
    others = _examined_labels(num_classes, skip)
    if not others:
        return 0, 0
    chosen = _first_correct(model, _positioned(train_loader), torch.tensor(others), count, None,
                            "train_loader inputs") if read is None else _first_of(read, others, count)
    labels = torch.tensor([c[1] for c in chosen], dtype=torch.int64)
    enough = [label for label in others if int((labels == label).sum()) >= _MIXTURE_MIN]
    if not enough:
        return 0, 0
    rows = torch.isin(labels, torch.tensor(enough))
    try:  # one read of every examined label's head inputs
        phi = _head_inputs(model, torch.stack([c[0] for c, keep in zip(chosen, rows.tolist()) if keep])).double()
    except TypeError:  # no nn.Linear / nn.Conv2d head to read: no evidence either way (the screen warns)
        return 0, 0
    labels = labels[rows]
    split = examined = 0
    for label in enough:
        mine = phi[labels == label]
        mine = mine - mine.mean(0)
        if float(mine.abs().max()) == 0.0:
            continue
        direction = torch.linalg.svd(mine, full_matrices=False).Vh[0]
        examined += 1
        split += bool(_separated_upper(mine @ direction).any())
    return split, examined


def _modal_labels(modes: tuple[int, int] | None) -> bool:
    """Whether the (split, examined) labels of :func:`labels_in_modes` say that a label of two populations is the
    rule here, not the exception (at least ``_MODES_SHARE`` of those examined)."""
    return modes is not None and modes[1] > 0 and modes[0] >= _MODES_SHARE * modes[1]


def _head_inputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float32 (B, D) on the CPU: :func:`deltainf.models.head_inputs` of ``x`` in eval mode (the model's mode is
    restored), in batches on the model's device."""
    from deltainf._util import in_eval_mode
    from deltainf.models.common import head_inputs

    return in_eval_mode(model, lambda b: head_inputs(model, b), x)


def _most_poisons(controls: int) -> float:
    """The most of a label's ``controls`` training controls a screen sets aside: the (1 - ``_SCREEN_LEVEL``)
    binomial quantile of a label with as many poisons as ordinary examples. An attack is assumed not to outnumber the
    label's own examples; a larger majority like the points is a trait of the label, not a poison group."""
    from scipy.stats import binom

    return float(binom.ppf(1.0 - _SCREEN_LEVEL, controls, 0.5))


def screen_training_controls(base: torch.Tensor, labels: torch.Tensor, control_scores: torch.Tensor,
                             control_labels: torch.Tensor, own: torch.Tensor, eligible: torch.Tensor | None,
                             count: int | None = None):
    """The controls to keep once scored: (bool (C,) kept, how many training controls were set aside as poisons).

    A poison among the training controls is an affected point in disguise: the group that supports the points
    supports it as well, so its influence profile over the candidates is the points'. For every affected label whose
    controls come from the training set, each control's likeness to the points is the correlation of its ranks over
    the candidates with the points' mean ranks (the controls' own columns left out, at most ``_SCREEN_COLUMNS``
    candidates evenly strided). When the likenesses are two populations (the test of :func:`representation_cut`:
    two components better than one by BIC, Ashman's D >= 2) the upper one is the suspect group, unless it is more
    of the controls than a label with as many poisons as ordinary examples would give in all but ``_SCREEN_LEVEL``
    of draws (the binomial quantile): an attack is assumed not to outnumber the label's own examples, and a larger
    majority that resembles the point is a trait of the label (a style of digit, say), not a poison group.

    Every control shares the label's common profile (its ordinary examples support all its inputs), which can hide
    the likeness in a plain correlation; so the suspects are then confirmed relative to the label's profile: the
    median ranks of the controls not suspected. Each control's and the points' ranks are taken relative to it, the
    likenesses recomputed and the suspects found again, until the same group stands apart (a poison group stands
    out the more once it no longer blurs the profile; a mode of the label that a misclassified clean input happens
    to resemble dissolves into one population) or none does. The plain correlation gives the first suspects (it
    sees a group of half the controls, which blurs the median profile itself), the profile of all the controls when
    it finds none. Then the first ``count`` remaining controls of the label are kept (every one: None). Held-out
    controls are kept as they are.
    base (P, N), labels (P,), control_scores (C, N), control_labels (C,), own int64 (C,): each control's dataset
    position (-1 = held out), eligible bool (N,) or None (every example a candidate)."""
    keep = own < 0
    set_aside = 0
    cols = torch.ones(control_scores.shape[1], dtype=torch.bool) if eligible is None else eligible.cpu().clone()
    cols[own[own >= 0]] = False
    cols = cols.nonzero().flatten()
    cols = cols[:: max(1, -(-cols.numel() // _SCREEN_COLUMNS))].to(control_scores.device)
    for label in sorted(set(control_labels[own >= 0].tolist())):
        rows = ((control_labels == label) & (own >= 0)).nonzero().flatten()
        points = (labels == label).nonzero().flatten()
        out = torch.zeros(rows.shape, dtype=torch.bool)
        if points.numel() and rows.numel() >= _MIXTURE_MIN and cols.numel() > 2:
            point_ranks = _standard_ranks(base[points.to(base.device)][:, cols.to(base.device)]).mean(0)
            control_ranks = _standard_ranks(control_scores[rows.to(control_scores.device)[:, None], cols])
            most = _most_poisons(rows.numel())
            previous = out
            # the first suspects come from the plain likeness, the confirmation from the likeness to the profile
            out = _separated_upper(_row_correlation(control_ranks, point_ranks), most)
            for _ in range(_SCREEN_ROUNDS):
                profile = control_ranks[~out].median(0).values
                suspects = _separated_upper(_row_correlation(control_ranks - profile, point_ranks - profile), most)
                if not bool(suspects.any()) or torch.equal(suspects, out):
                    out = suspects
                    break
                previous, out = out, suspects
            else:
                out = out & previous  # no fixed point: only the controls suspected in the last two rounds
        set_aside += int(out.sum())
        keep[rows[~out][:count]] = True  # [:None]: all
    return keep, set_aside


def grown_controls(support: torch.Tensor, own: torch.Tensor, eligible: torch.Tensor, features: torch.Tensor,
                   fdr: float = DEFAULT_FDR) -> torch.Tensor:
    """bool (C,): the training controls inside the group that supports the points, grown in representation space.

    The screens (:func:`_screen_controls`, :func:`screen_training_controls`) look for controls like the points;
    with one point of an all-to-one attack they find only the poisons of its own source class, yet every other
    poison among the controls is a pseudo-point with a group of its own (a plain MLP on 8 or 16 px digits: 3-17 of
    the 32 kept controls were poisons; the point's group at support 1 shrank from 20-70 to 2-18 and the outranking
    test lost it). Training controls are candidates themselves, so the group can point them out: the candidates
    whose ``support`` (against the controls the screens kept) is 1, ranking the points above every control, are
    the core, the core is grown in the candidates' head inputs (:func:`grown_group`, as the representation boundary
    does), and the controls inside the grown group (the core included) are returned, to be set aside. Fewer than two
    candidates at support 1: none. A poison-free label's few candidates at support 1 grow into no group, or into a
    mode of the label that the screens would miss as well. None either when the group holds more of the training
    controls than the influence screen would set aside (:func:`_most_poisons`): such a group is the label's
    majority, not an attack (a frequency trigger on a LayerNorm MLP, traced with two mistakes of another label:
    their core grew into 46 of its 64 controls, the 18 left could not stand for the label, and a group of 103 clean
    examples was claimed).
    support float (N,), own int64 (C,) the controls' dataset positions (-1 held out), eligible bool (N,),
    features (M, D) the eligible candidates' head inputs."""
    out = torch.zeros(own.shape, dtype=torch.bool)
    candidates = eligible.nonzero().flatten()
    core = support.double().cpu()[candidates] >= 1.0
    if int(core.sum()) < 2:
        return out
    grown = grown_group(features, core, fdr)
    members = torch.zeros(eligible.shape, dtype=torch.bool)
    members[candidates[core if grown is None else grown[0]]] = True
    training = own >= 0
    out[training] = members[own[training]]
    if int(out.sum()) > _most_poisons(int(training.sum())):
        return torch.zeros_like(out)
    return out


def _first_training(keep: torch.Tensor, own: torch.Tensor, count: int) -> torch.Tensor:
    """bool (C,): of the controls in ``keep``, every held-out one (``own`` < 0) and the first ``count`` training
    ones."""
    training = keep & (own >= 0)
    return (keep & (own < 0)) | (training & (training.cumsum(0) <= count))


def _kept_controls(control_scores: torch.Tensor, control_labels: torch.Tensor, own: torch.Tensor,
                   kept: torch.Tensor):
    """The ``kept`` rows of the controls: (scores, a copy, so the score file or the engine's tensor is never
    written, with each training control's influence on itself NaN, which says nothing about the others; labels;
    dataset positions)."""
    scores, labels, own = control_scores[kept.to(control_scores.device)], control_labels[kept], own[kept]
    rows = (own >= 0).nonzero().flatten()
    scores[rows.to(scores.device), own[rows].to(scores.device)] = float("nan")
    return scores, labels, own


def _standard_ranks(scores: torch.Tensor) -> torch.Tensor:
    """The ranks of every row of ``scores`` (R, M) (ties averaged), standardised per row: float64 (R, M) on the
    CPU."""
    from scipy.stats import rankdata

    r = torch.from_numpy(rankdata(scores.double().cpu().numpy(), axis=1))
    return (r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True)


def _row_correlation(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of every row of ``rows`` (float64 (R, M)) with ``target`` (float64 (M,)): (R,), 0 where
    a row or the target is constant."""
    a = rows - rows.mean(1, keepdim=True)
    b = target - target.mean()
    norm = a.norm(dim=1) * b.norm()
    return torch.where(norm > 0, (a @ b) / norm.clamp_min(1e-300), torch.zeros_like(norm))


def _separated_upper(values: torch.Tensor, most: float = math.inf) -> torch.Tensor:
    """bool (M,): the members of the upper of two separated populations of ``values`` (float64 (M,);
    :func:`_two_populations`), those above the lower component's mean; none when there is one population, or when
    the upper one has more than ``most`` members."""
    fit = _two_populations(values, seed=0, separated=True)
    if fit is None:
        return torch.zeros(values.shape, dtype=torch.bool)
    upper = (fit[0] > 0.5) & (values > fit[1])
    return upper if int(upper.sum()) <= most else torch.zeros_like(upper)


def training_labels(train_loader, n_train: int) -> torch.Tensor | None:
    """The label of every training example by dataset position: int64 (N,), -1 at a position the loader never
    yields (a loader over a subset: those examples are never candidates), or None when the loader cannot tell
    (not a loader, or a position beyond N). Read from the dataset when its items are its stored
    labels by construction (a ``TensorDataset``, an :class:`~deltainf.data.ImageDataset`), else from one pass over
    the loader (no model): a ``.targets`` or ``.labels`` attribute is not trusted, since a dataset may yield other
    labels than it keeps there (a ``target_transform``, a wrapper that relabels its poisons)."""
    if train_loader is None or isinstance(train_loader, (str, bytes)) or not hasattr(train_loader, "__iter__"):
        return None
    from deltainf.data.dataset import ImageDataset
    from deltainf.data.loaders import in_dataset_order, reads_every_position, yields_stored_items

    dataset = getattr(train_loader, "dataset", None)
    kept = None
    # a subset's labels come from what it yields, and a collate function of the user's may relabel
    if reads_every_position(in_dataset_order(train_loader)) and yields_stored_items(train_loader):
        if type(dataset) is torch.utils.data.TensorDataset and len(dataset.tensors) >= 2:
            t = dataset.tensors
            # a third tensor is each example's position: the stored labels hold only when it is the storage order
            if len(t) < 3 or torch.equal(t[2].flatten().cpu(), torch.arange(len(dataset)).to(t[2].dtype)):
                kept = t[1]
        elif type(dataset) is ImageDataset:
            kept = dataset.labels
    if kept is not None:
        kept = torch.as_tensor(kept)
        if kept.ndim == 1 and kept.numel() == n_train and not kept.is_floating_point():
            return kept.to(torch.int64).cpu()
    out = torch.full((n_train,), -1, dtype=torch.int64)
    for _, y, where in _positioned(train_loader):
        if where.numel() and int(where.max()) >= n_train:
            return None
        out[where] = y
    return out


def _positioned(train_loader):
    """Yield (x, y int64 (B,) CPU, dataset positions int64 (B,) CPU) for every batch of a training loader."""
    from deltainf.data.loaders import positioned_batches

    for x, y, idx, _ in positioned_batches(train_loader, "train_loader"):
        yield x, y.cpu(), idx


def check_scale(name: str, x: torch.Tensor, train_range: tuple[float, float] | None) -> None:
    """Refuse images ``x`` whose values lie four training ranges or more beyond the training images' range (lo,
    hi; read from the first training batches, which may be darker or paler than the rest): 0-255 images for a
    model trained on [0, 1] ones. The model still predicts something on them, and
    their influence ranks clean examples with the poisons (57 clean examples flagged with 72 poisons, against 1
    at the right scale), without a word. ValueError naming ``name``."""
    beyond = _beyond_scale(x, train_range)
    if beyond is not None:
        what, hint = ("images", " (0-255 images divided by 255 for a model trained on [0, 1] ones?)") if x.ndim == 4 \
            else ("inputs", " (standardised as the training inputs were?)")
        raise ValueError(f"{name}: its {what} range over [{beyond[0]:.4g}, {beyond[1]:.4g}], the training {what} "
                         f"over [{train_range[0]:.4g}, {train_range[1]:.4g}]: pass them on the scale of the training "
                         f"data{hint}")


def _beyond_scale(x: torch.Tensor, train_range: tuple[float, float] | None) -> tuple[float, float] | None:
    """The range (lo, hi) of ``x`` when it lies four training ranges or more beyond ``train_range``, else None."""
    if train_range is None or x.numel() == 0 or not x.is_floating_point():
        return None
    lo, hi = train_range
    width = hi - lo
    x_lo, x_hi = float(x.min()), float(x.max())
    return (x_lo, x_hi) if width > 0 and (x_hi > hi + 4 * width or x_lo < lo - 4 * width) else None


def _check_reproducible(pool: list, x: torch.Tensor) -> None:
    """Warn, naming ``pool``, when a transform of the user's gives two different copies of ``x`` for generators
    seeded alike: it draws from another random source (torch's global one), so the same seed gives other queries,
    votes and flagged sets on every run. A transform that fails is left to the query step to name."""
    for t in pool:
        if isinstance(t, Transform):
            continue
        try:
            a = t(x.clone(), torch.Generator().manual_seed(0))  # a CPU generator, as the queries' transforms get
            b = t(x.clone(), torch.Generator().manual_seed(0))
            same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
                bool(torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True)))
        except Exception:  # noqa: BLE001 - named where the queries are made
            continue
        if not same:
            warnings.warn(f"pool: transform {transform_name(t)!r} gives different copies for generators seeded "
                          "alike: it draws from another random source, so runs with the same seed differ; draw "
                          "from the generator it is given (torch.randn(..., generator=g))", stacklevel=4)


def _check_copies_scale(qx: torch.Tensor, p: int, n: int, pool: list, train_range) -> None:
    """ValueError naming ``pool`` when a transform of the user's returns copies on another scale than the training
    inputs (four training ranges beyond them, as :func:`check_scale` refuses affected inputs): a callable returning
    ``x * 10`` gave copies in [0, 10] for [0, 1] data, scored without a word. The built-in transforms keep the
    range. qx: the P * (1 + n) queries, each point followed by its n copies."""
    if all(isinstance(t, Transform) for t in pool):
        return
    beyond = _beyond_scale(qx.reshape(p, 1 + n, *qx.shape[1:])[:, 1:], train_range)
    if beyond is not None:
        what = "images" if qx.ndim == 4 else "inputs"
        raise ValueError(f"pool: a transform returns copies on another scale than the training inputs (its {what} "
                         f"range over [{beyond[0]:.4g}, {beyond[1]:.4g}], the training {what} over "
                         f"[{train_range[0]:.4g}, {train_range[1]:.4g}])")


def _train_range(peek) -> tuple[float, float] | None:
    """The value range (lo, hi) of the training inputs :func:`_peek_inputs` read, or None (none read)."""
    if peek is None or peek[1] is None or peek[1].numel() == 0:
        return None
    return float(peek[1].min()), float(peek[2].max())


_DUPLICATE = 1e-2  # relative L2 distance below which two images count as one (copies, or copies with faint noise)


def _copies(rows: torch.Tensor, of: torch.Tensor) -> torch.Tensor:
    """bool (len(rows), len(of)): which of the inputs ``rows`` (M, ...) repeat which of ``of`` (K, ...). Images
    (C, H, W) within :data:`_DUPLICATE` of each other in relative L2 distance are copies (one made with faint noise
    too); other inputs only when equal (a token id or an unstandardised tabular column differs by less than 1 %
    between distinct inputs). A repeated affected input or control is not a second, independent one: the coherence
    test's null treats the points and the controls as exchangeable draws, and ten copies of one ordinary
    misclassified input made a poison-free model claim a group of 117 (estimate 0.16)."""
    a, b = rows.detach().flatten(1).to("cpu", torch.float64), of.detach().flatten(1).to("cpu", torch.float64)
    if not a.shape[0] or not b.shape[0] or a.shape[1] != b.shape[1]:
        return torch.zeros(a.shape[0], b.shape[0], dtype=torch.bool)
    distance = torch.cdist(a, b)
    if rows.ndim != 4 or not rows.is_floating_point():
        return distance == 0
    norms = torch.maximum(a.norm(dim=1)[:, None], b.norm(dim=1)[None, :]).clamp_min(1e-30)
    return distance <= _DUPLICATE * norms


def _distinct_points(test_x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The affected points less those that repeat an earlier one with the same label (:func:`_copies`), with a
    warning: copies of one input are one piece of evidence, not several."""
    if test_x.shape[0] < 2:
        return test_x, y
    same = _copies(test_x, test_x) & (y[:, None] == y[None, :])
    repeated = torch.tril(same, diagonal=-1).any(1)  # equal to an earlier point
    if not bool(repeated.any()):
        return test_x, y
    keep = (~repeated).nonzero().flatten()
    warnings.warn(f"test_x: {int(repeated.sum())} of the {test_x.shape[0]} affected inputs repeat an earlier one "
                  f"(copies, or copies with faint noise); each is traced once ({keep.numel()} points)", stacklevel=3)
    return test_x[keep.to(test_x.device)], y[keep]


def _first_correct(model, batches, labels: torch.Tensor, count: int, exclude, where: str) -> list[tuple]:
    """For every label in ``labels`` (ascending), the first ``count`` inputs of ``batches`` ((x, y, positions)
    in order) with that label that ``model`` classifies correctly (any, without a model), skipping inputs
    (nearly) equal to one in ``exclude`` or to one already chosen (:func:`_copies`): [(x, label, position)],
    grouped by label. Stops reading once every label has its count."""
    wanted = sorted(set(int(v) for v in labels.tolist()))
    found: dict[int, list] = {c: [] for c in wanted}
    classes, outside, appeared = None, None, set()
    for x, y, positions in batches:
        if all(len(v) >= count for v in found.values()):
            break
        if model is not None and y.numel() and outside is None:
            classes = model_logits(model, x[:1], where=where).shape[1] if classes is None else classes
            if int(y.max()) >= classes:  # (a negative label is the usual mark of an unlabelled input)
                outside = int(y.max())
        appeared.update(set(y.tolist()) & set(wanted))
        keep = torch.isin(y, torch.tensor(wanted))
        if not bool(keep.any()):
            continue
        pred = model_logits(model, x[keep], where=where).argmax(1) if model is not None else y[keep]
        x = x[keep.to(x.device)]
        repeats_point = _copies(x, exclude).any(1) if exclude is not None else torch.zeros(x.shape[0], dtype=torch.bool)
        for k, (yi, pi, pr) in enumerate(zip(y[keep].tolist(), positions[keep].tolist(), pred.tolist())):
            if pr != yi or len(found[yi]) >= count or bool(repeats_point[k]):
                continue
            if found[yi] and bool(_copies(x[k:k + 1], torch.stack([c for c, _ in found[yi]])).any()):
                continue  # a copy of a control already chosen
            found[yi].append((x[k], pi))
    absent = [c for c in wanted if c not in appeared]
    if outside is not None and absent:
        # labels shifted or counted from 1: no input carries an affected label, and labels beyond the model's classes
        # say why (the run fell back to other controls, with a warning about the reference's classification)
        raise ValueError(f"{where.split()[0]}: label {outside} is not a class of the model, which gives {classes} "
                         f"logits (labels 0..{classes - 1}), and no input is labelled {absent}")
    return [(x, c, p) for c in wanted for x, p in found[c]]


def control_support(base: torch.Tensor, labels: torch.Tensor, control_scores: torch.Tensor,
                    control_labels: torch.Tensor) -> torch.Tensor:
    """support_i = mean over pairs (point p, control c with c's label == p's) of sign(base[p, i] -
    control_scores[c, i]): float64 (N,) in [-1, 1]. Pairs with a NaN score are left out (a training
    control's influence on itself is passed as NaN); an example with no pair left gets NaN, which is
    outside the gate on both sides. base (P, N), labels (P,), control_scores (C, N)."""
    control_labels = control_labels.to(control_scores.device)
    total = torch.zeros(base.shape[1], dtype=torch.float64, device=base.device)
    pairs = torch.zeros_like(total)
    groups = [(label, (control_labels == label).nonzero().flatten(), (labels == label).nonzero().flatten().tolist())
              for label in set(labels.tolist())]
    if not any(rows.numel() for _, rows, _ in groups):
        raise ValueError("no control shares a label with the affected points")
    step = _columns(control_scores.shape[0] + base.shape[0])
    for a in range(0, base.shape[1], step):  # column blocks: the temporaries stay small whatever N
        b = min(base.shape[1], a + step)
        for _, rows, points in groups:  # the controls of a label are gathered once for all its points
            block = control_scores[rows, a:b].double()
            for p in points:
                diff = base[p, a:b].double().unsqueeze(0) - block
                valid = ~torch.isnan(diff)
                total[a:b] += torch.sign(diff).nan_to_num_(0.0).sum(0)
                pairs[a:b] += valid.sum(0)
    return (total / pairs).cpu()  # 0 / 0 = NaN where no pair is left


def _rank_margins(pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a (m, B) block of scores: (#{j: v_j < v_i} - #{j: v_j > v_i} per entry, float64 (m, B); valid
    entries, bool (m, B)). NaN entries are left out of every comparison and get margin 0. Summed over a
    subset A of rows, the margin is the sum of sign(v_i - v_j) over the pairs i in A, j outside A (the
    pairs inside A cancel), which is what a split of the pool into points A and controls needs."""
    pool = pool.double()
    valid = ~torch.isnan(pool)
    margin = torch.zeros_like(pool)
    for i in range(pool.shape[0]):
        margin[i] = torch.sign(pool[i].unsqueeze(0) - pool).nan_to_num_(0.0).sum(0)
    return margin.masked_fill_(~valid, 0.0), valid


class PointOutranking(NamedTuple):
    """The outranking test point by point (:func:`coherence_curve`, with several points of a label): its p-value,
    the candidates that rank one of the points above every control of its label (bool (N,)), and how many
    candidates rank one of the pseudo-points so on average over the re-splits."""

    p: float
    first: torch.Tensor
    null: float


class Coherence(NamedTuple):
    """:func:`coherence_curve`'s output: the support cuts, the candidates observed at or above each, their
    permutation null, the outranking test's p-value, and the test point by point (None with one point per
    label)."""

    cuts: torch.Tensor
    observed: torch.Tensor
    null: torch.Tensor
    top_p: float
    by_point: PointOutranking | None = None


def _splits(groups, permutations: int, seed: int) -> tuple[list[torch.Tensor], bool]:
    """(per label, (K, points + controls) float64 rows with 1 for the inputs playing the points; whether they are
    every split): every split when there are at most ``permutations`` of them (each label's splits crossed with
    the others'), else ``permutations`` random ones (seeded)."""
    sizes = [(points.numel(), points.numel() + rows.numel()) for points, rows in groups]
    exhaustive = math.prod(math.comb(m, p) for p, m in sizes) <= permutations
    if exhaustive:  # each label's splits crossed with the others'
        chosen = list(itertools.product(*[itertools.combinations(range(m), p) for p, m in sizes]))
    else:
        gen = torch.Generator().manual_seed(seed)
        per_label = [[torch.randperm(m, generator=gen)[:p].tolist() for _ in range(permutations)] for p, m in sizes]
        chosen = list(zip(*per_label))  # drawn label by label, as the seed has always laid them out
    splits = [torch.zeros(len(chosen), m, dtype=torch.float64) for _, m in sizes]
    for k, per_label in enumerate(chosen):
        for split, inputs in zip(splits, per_label):
            split[k, list(inputs)] = 1.0
    return splits, exhaustive


def coherence_curve(base: torch.Tensor, labels: torch.Tensor, control_scores: torch.Tensor,
                    control_labels: torch.Tensor, eligible: torch.Tensor | None = None,
                    permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0,
                    support: torch.Tensor | None = None, weigh_lead: bool = True) -> Coherence:
    """Does a group of training examples support the affected points more than ordinary inputs of their
    label get supported? The observed :func:`control_support` against its permutation null.

    If the affected points were ordinary predictions of their labels, they would be exchangeable with
    the controls of the same labels, and re-splitting each label's points and controls at random
    (as many pseudo-points as there are points) would give supports distributed like the observed
    ones. Returns a :class:`Coherence`: cuts float64 (K,) ascending: every distinct positive support of an
    eligible example; observed int64 (K,): #{eligible i : support_i >= cut}; null float64 (K,): the same count
    averaged over the re-splits (every one when there are at most ``permutations``, else ``permutations``
    random ones seeded by ``seed``); top_p: the outranking test, the share of re-splits whose candidates that rank
    every pseudo-point above every pseudo-control lead the pseudo-controls by at least as much in all as the
    candidates at support 1 lead the controls (the lead: an example's lowest point score minus its highest control
    score, in units of its scores' spread over points and controls, :func:`_leads`), counting the observed split
    as one of them: a p-value that needs no estimate of how many ordinary examples reach the top; by_point, with
    several points of a label, the same test for the candidates that rank ONE of the points above every control
    (each example's lead of its highest pseudo-point over its highest pseudo-control), below. ``eligible``
    bool (N,) or None = all. ``weigh_lead=False``: the candidates at support 1 are counted, not weighed (for
    controls drawn from the training set, below).

    Why both. The estimate (1 + null) / observed counts, as false members of a group at the top, as many
    ordinary examples as would put an ordinary input of the label there; but the examples of a label rank an
    affected input (a triggered one, a misclassified one) first LESS often than they rank its controls, so with
    one point the estimate stays above ``fdr`` even where every example at the top is a poison (1 / (1 + C) of
    the candidates are expected there, ~1/33 of a label with 32 controls). The outranking test asks only whether
    the points come out ahead of every ordinary input, which an affected input without a poison group behind it
    does not. It weighs the candidates at the top by their lead, not only counts them: every input has a few
    examples that rank it first (near copies of it), a triggered input has its poisons, which put it first by far
    more; counted alone, a small group (14 poisons on the digits) ties with the near copies of a control or two.
    Weighing needs controls exchangeable with an ordinary point: held-out inputs are. Training controls screened for
    poisons are not (the screen sets aside the controls that look like the points), and on a two-class task the
    lead of a misclassified input over the controls left claimed whole modes of its label; they are counted.

    Point by point. An all-to-one backdoor's poisons are made from every source class, and a model can tie each
    poison to the triggered inputs of its own source class: a poison then ranks its own point above every control
    and the others not, its support pooled over ten points of several sources is modest, and no candidate puts
    every point first (a plain MLP on 8 px digits: the poisons' pooled support had median 0.18, while 74-101 of
    the 115 put one of the points first, against 1-6 of the 146 clean candidates). An ordinary candidate puts one
    of several pseudo-points first by chance far more often (about P / (P + C) of them) than it puts a
    misclassified input first; weighed by the lead, a triggered input's poisons still stand out.

    Wide rows. The test point by point sets the highest of several points against the highest control, so an input
    whose scores all run larger than the others' puts one of the points first for ordinary candidates by its width
    alone. A row wider than the label's typical row is compared in units of its own size, the median absolute score
    over the candidates (an influence score's zero, no effect on the input, is kept); narrower rows are left as they
    are (:func:`_row_scales`). Left, not widened: a triggered input's scores are its controls' scaled down, which
    keeps the ordinary candidates behind the controls, and brought up to the controls' size it would be exchangeable
    with them and about P / (P + C) of the ordinary candidates would put it first. The pooled support compares raw
    scores, since standardised there it made poison-free models claim groups (the measurements: docs/RESULTS.md,
    "Wide rows in the test point by point").
    base (P, N), labels (P,), control_scores (C, N) (NaN = a pair left out), control_labels (C,); ``support``:
    their :func:`control_support` when the caller has it already (computed otherwise)."""
    n = base.shape[1]
    groups = []
    for label in sorted(set(labels.tolist())):
        rows = (control_labels == label).nonzero().flatten()
        points = (labels == label).nonzero().flatten()
        if rows.numel():
            groups.append((points, rows))
    if not groups:
        raise ValueError("no control shares a label with the affected points")
    splits, exhaustive = _splits(groups, permutations, seed)  # per label: 1 for the inputs playing the points
    n_splits = splits[0].shape[0]
    if support is None:
        support = control_support(base, labels, control_scores, control_labels)
    observed_support = support.double()
    keep = ~torch.isnan(observed_support) & (observed_support > 0)
    if eligible is not None:
        keep &= eligible.to(keep.device)
    cuts = torch.unique(observed_support[keep])
    observed = keep.sum() - torch.searchsorted(observed_support[keep].sort().values, cuts, side="left")
    above = torch.zeros(cuts.numel() + 1, dtype=torch.float64)  # above[k]: examples with exactly k cuts <= s
    # per split, the observed one first: the candidates at support 1, weighed by their lead or counted
    top = torch.zeros(1 + n_splits, dtype=torch.float64)
    by_point = any(points.numel() > 1 for points, _ in groups)
    top_point, first_count = torch.zeros(1 + n_splits, dtype=torch.float64), torch.zeros(n_splits, dtype=torch.float64)
    first = torch.zeros(n, dtype=torch.bool)
    # each label's splits for the leads: the observed one (its points first in the pool) before the re-splits
    lead_splits = [torch.cat([(torch.arange(split.shape[1]) < points.numel()).double().unsqueeze(0), split])
                   for (points, _), split in zip(groups, splits)]
    step = _columns(2 * (1 + n_splits) + base.shape[0] + control_scores.shape[0])
    scales = [_row_scales(torch.cat([_row_sizes(base, points, eligible), _row_sizes(control_scores, rows, eligible)]))
              for points, rows in groups] if by_point else None
    for a in range(0, n, step):
        b = min(n, a + step)
        cols = torch.ones(b - a, dtype=torch.bool) if eligible is None else eligible[a:b].cpu()
        total = torch.zeros(n_splits, int(cols.sum()), dtype=torch.float64)
        pairs = torch.zeros_like(total)
        block_lead = block_point = None
        for g, ((points, rows), split, with_observed) in enumerate(zip(groups, splits, lead_splits)):
            pool = torch.cat([base[points.to(base.device), a:b], control_scores[rows.to(control_scores.device), a:b]])
            pool = pool.cpu()[:, cols].double()  # once, for the margins and the leads
            margin, valid = _rank_margins(pool)
            valid = valid.double()
            total += split @ margin  # (permutations, examples)
            in_a = split @ valid
            pairs += in_a * (valid.sum(0) - in_a)
            if weigh_lead or by_point:  # point by point, wide rows in units of their own size (docstring)
                group_lead, group_point = _leads(pool, with_observed, every=weigh_lead, some=by_point,
                                                 scales=scales[g] if by_point else None)
                if weigh_lead:
                    block_lead = group_lead if block_lead is None else torch.minimum(block_lead, group_lead)
                if by_point:
                    block_point = group_point if block_point is None else torch.maximum(block_point, group_point)
        support = total / pairs  # NaN where no pair is left: compares False below
        if weigh_lead:
            top += block_lead.clamp_min(0.0).sum(1)  # only the candidates that put every point first
        else:
            top[1:] += (support >= 1.0).sum(1).double()  # every pair won: total == pairs exactly
        if by_point:
            ahead_somewhere = block_point > 0.0
            top_point += block_point.clamp_min(0.0).sum(1) if weigh_lead else ahead_somewhere.sum(1).double()
            first_count += ahead_somewhere[1:].sum(1).double()
            first[torch.arange(a, b)[cols]] = ahead_somewhere[0]
        k = torch.searchsorted(cuts, support.nan_to_num(-2.0).flatten(), right=True)
        above += torch.bincount(k, minlength=cuts.numel() + 1).double()
    null = above.flip(0).cumsum(0).flip(0)[1:] / n_splits
    if not weigh_lead and cuts.numel() and float(cuts[-1]) >= 1.0:
        top[0] = float(observed[-1])
    point = PointOutranking(_split_p(top_point, exhaustive), first, float(first_count.mean())) if by_point else None
    return Coherence(cuts, observed.to(torch.int64), null, _split_p(top, exhaustive), point)


def _row_sizes(scores: torch.Tensor, rows: torch.Tensor, eligible: torch.Tensor | None) -> torch.Tensor:
    """float64 (len(rows),): the median absolute score of each of ``scores``' ``rows`` (int64 indices) over the
    ``eligible`` columns (bool (N,), None = all), NaN scores left out; NaN for a row with none. Row by row, read in
    place: the temporaries stay (N,), and one transfer brings the sizes back."""
    keep = None if eligible is None else eligible.to(scores.device)
    if not rows.numel() or (keep is not None and not bool(keep.any())):
        return torch.full((rows.numel(),), math.nan, dtype=torch.float64)
    sizes = [(scores[r] if keep is None else scores[r][keep]).double().abs().nanmedian() for r in rows.tolist()]
    return torch.stack(sizes).cpu()


def _row_scales(sizes: torch.Tensor) -> torch.Tensor:
    """float64 (m,): the unit each row of one label's points and controls is compared in point by point, from their
    :func:`_row_sizes`: a row's own size where that is above the rows' median size, else that median (one unit for
    every narrower row, which leaves them as they are); all 1 where the median size is 0 or undefined."""
    typical = float(sizes.nanmedian()) if sizes.numel() else math.nan
    if not typical > 0.0:  # False for NaN
        return torch.ones(sizes.shape, dtype=torch.float64)
    return sizes.nan_to_num(typical).clamp_min(typical)


def _split_p(top: torch.Tensor, exhaustive: bool) -> float:
    """The p-value of the observed split's ``top[0]`` among the re-splits' ``top[1:]``: the share at least as high
    (a weighed sum compared within round-off; enumerated, the observed split is summed again as a re-split and is
    one of them; sampled, it is added to them)."""
    ahead = float((top[1:] >= float(top[0]) * (1.0 - 1e-12)).sum())
    n_splits = top.numel() - 1
    return ahead / n_splits if exhaustive else (1.0 + ahead) / (1.0 + n_splits)


def _leads(pool: torch.Tensor, splits: torch.Tensor, every: bool = True, some: bool = False,
           scales: torch.Tensor | None = None):
    """Each example's lead over the controls in every split: two float64 (S, B), or None where not asked.

    ``pool``: (m, B) scores of m inputs (points, then controls) on B examples; ``splits``: (S, m) 0/1, 1 for the
    inputs that play the points. ``every``: an example's lowest pseudo-point score minus its highest pseudo-control
    score; ``some``: its highest pseudo-point score minus the same. Both are divided by the example's standard
    deviation over the pool, a unit that does not depend on the split, so that every split is measured alike.
    ``scales``: float64 (m,), a unit per row; for ``some`` the rows are divided by their units first, so that a row
    wider than the rest cannot lead by its width alone. NaN scores are ignored; an example with no valid score on
    one side, or no spread, gets -inf."""
    pool = pool.double()
    scaled = pool if scales is None else pool / scales[:, None]
    lowest_of, highest_of = pool.nan_to_num(math.inf), pool.nan_to_num(-math.inf)  # a NaN is neither
    highest_scaled = highest_of if scales is None else scaled.nan_to_num(-math.inf)
    leads = [torch.empty(splits.shape[0], pool.shape[1], dtype=torch.float64) if asked else None
             for asked in (every, some)]
    for s, playing in enumerate(splits.bool()):  # one pass over the splits for both leads
        control = highest_of[~playing].max(0).values if every or scales is None else None
        if every:
            leads[0][s] = lowest_of[playing].min(0).values - control
        if some:
            rival = control if scales is None else highest_scaled[~playing].max(0).values
            leads[1][s] = highest_scaled[playing].max(0).values - rival
    spreads = (_column_spread(pool) if every else None, _column_spread(scaled) if some else None)
    return tuple(None if lead is None else (lead / spread).nan_to_num_(nan=-math.inf, posinf=-math.inf)
                 for lead, spread in zip(leads, spreads))


def _column_spread(pool: torch.Tensor) -> torch.Tensor:
    """float64 (B,): each column's standard deviation over the valid (non-NaN) rows of a float64 (m, B) block."""
    count = (~torch.isnan(pool)).sum(0)
    mean = pool.nan_to_num(0.0).sum(0) / count.clamp_min(1)
    return ((pool - mean).nan_to_num(0.0).square().sum(0) / (count - 1).clamp_min(1)).sqrt()


def _two_populations(values: torch.Tensor, seed: int, separated: bool = False):
    """A two-component Gaussian mixture on ``values`` (float64 (M,)): (the posterior of the upper component
    float64 (M,), the lower component's mean), or None (fewer than ``_MIXTURE_MIN`` values, a single value, or
    an upper component with a mean <= 0).

    ``separated``: also None unless the values are two populations at all: two components must fit better than
    one by BIC, and be apart by Ashman's D = sqrt(2) |mu_1 - mu_2| / sqrt(var_1 + var_2) >= 2 (the usual bar for
    a clean split; a mixture fit on one skewed population passes one of the two, not both).

    Either way None when the lower component holds fewer than ``_MIXTURE_MIN`` values: the lower one stands for
    the ordinary values, and a few values far below the rest (examples with an unusual head input, scored by a
    direction fitted without them) are a component of their own, which passes both tests and puts every other value
    in the upper "population" (a blended trigger on a LayerNorm MLP from one point: the discriminant's one outlier
    of 286 candidates put the whole label above the boundary, 141 clean examples flagged; a BadNet trigger there
    traced with mistakes of other labels: two outliers of 217, 144 clean examples flagged). The more starts the
    fit tries, the likelier it finds such a component, as it has the higher likelihood. The upper one may be a
    single value: one poison among the controls is a group of one to set aside."""
    from sklearn.mixture import GaussianMixture

    if values.numel() < _MIXTURE_MIN or float(values.max() - values.min()) == 0.0:
        return None
    column = values.numpy().reshape(-1, 1)
    # fitted on the sorted values: the seeded starts draw values by position, and the training set's order (a
    # shuffled copy of the same data) must not move the boundary. The best of several starts: with one, whether
    # two populations were found at all depended on where it fell
    ordered = np.sort(column, axis=0)
    fit = GaussianMixture(2, random_state=seed, n_init=_MIXTURE_STARTS).fit(ordered)
    means = fit.means_.ravel()
    upper = int(means.argmax())
    if means[upper] <= 0.0:
        return None
    posterior = fit.predict_proba(column)[:, upper]
    if int((posterior <= 0.5).sum()) < _MIXTURE_MIN:  # before the one-component fit the test below needs
        return None
    if separated:
        one = GaussianMixture(1, random_state=seed).fit(ordered)
        ashman = math.sqrt(2.0) * abs(means[0] - means[1]) / math.sqrt(float(fit.covariances_.sum()))
        if fit.bic(column) >= one.bic(column) or ashman < 2.0:
            return None
    return torch.from_numpy(posterior), float(means[1 - upper])


def _upper_population(values: torch.Tensor, fdr: float, seed: int, separated: bool = False, floor=None):
    """The upper of :func:`_two_populations` on ``values``: (the lowest value above the lower component's mean
    whose local false-discovery rate, the posterior of the lower component, is at most ``fdr``, raised to
    ``floor(value)`` where that callable is given; the expected share of the lower component among the values at or
    above it), or None (no two populations, or no value that qualifies)."""
    fit = _two_populations(values, seed, separated)
    if fit is None:
        return None
    posterior, lower_mean = fit
    inside = (1.0 - posterior <= fdr) & (values > lower_mean)  # the upper tail only: a wide upper
    if not bool(inside.any()):                                  # component also wins far below
        return None
    cut = float(values[inside].min())
    if floor is not None:
        cut = max(cut, floor(cut))
    members = values >= cut
    return cut, float(1.0 - posterior[members].mean())


def mixture_cut(support: torch.Tensor, eligible: torch.Tensor | None = None, fdr: float = DEFAULT_FDR,
                seed: int = 0, floor=None):
    """The support at which the candidates' group begins, from a two-component Gaussian mixture fit on their
    support: (the lowest support above the lower component's mean whose local false-discovery rate, the
    posterior of the lower component, is at most ``fdr``; the expected share of the lower component among the
    candidates at or above it), or None when there is no group to delimit (fewer than ``_MIXTURE_MIN``
    candidates with a support, an upper component that does not support the points more than the controls on
    average, or supports that are not two populations at all: :func:`_two_populations` with ``separated``).

    Once the coherence test has established that a group exists, the candidates are two populations: the
    group, and the ordinary examples of the label, which support the affected points LESS than the controls
    (support well below 0). The permutation null is calibrated for the ordinary examples of a label whose
    points are ordinary, so its cut leaves out the group's lower tail; the mixture places the boundary between
    the two populations the run actually has, provided it has two: a mixture fitted to one skewed population puts
    a boundary inside it (a poison-free LayerNorm MLP traced from five misclassified inputs: a group of 20 at the
    permutation cut grew to 211 of the 574 candidates). support (N,) float (NaN = no pair), eligible bool (N,) or
    None; ``floor``: a callable raising the boundary (:func:`largest_excess` in the decision), applied before the
    share is counted, so the share is that of the boundary returned."""
    keep = ~torch.isnan(support)
    if eligible is not None:
        keep &= eligible.to(keep.device)
    return _upper_population(support[keep].double(), fdr, seed, separated=True, floor=floor)


def representation_cut(features: torch.Tensor, members: torch.Tensor, fdr: float = DEFAULT_FDR, seed: int = 0):
    """The candidates whose representation lies with the flagged group's: (bool (M,) the candidates it adds, the
    largest expected share of ordinary examples above either boundary), or None when there is nothing to add.

    Influence sees a training example through its loss gradient, and a poison the model fits to zero loss has
    almost none: it supports nothing, and its control support is that of an ordinary example. Its
    representation (what the classifier head reads) still carries the trigger. Every candidate is scored on two
    directions between the ordinary candidates and the group, both fitted without the candidate itself (a
    direction fitted to its own side would push it away from the other; the ordinary candidates then sit about 0):

    - the direction between the two means (:func:`_mean_direction`), which needs no estimate of the spread;
    - the linear discriminant (:func:`_discriminant`), which also weighs each direction of the head input by how
      little the ordinary candidates vary along it: where the label's own variety is large along the group's mean
      direction, a trigger shows on the directions where the label hardly varies.

    On each score the same two-population mixture as :func:`mixture_cut` places a boundary, provided the scores
    are two populations at all (a direction fitted to split any subset from the rest makes a skew of one
    population look like a second); the candidates above either boundary join the group. One fit: see
    :func:`grown_group` for the group grown from its core. features float (M, D): the candidates' head inputs;
    members bool (M,): the candidates already flagged (at least 2, and 2 not)."""
    members = members.to(torch.bool).cpu()
    found = _above_boundaries(features, members, fdr, seed)
    if found is None or not bool((found[0] & ~members).any()):
        return None
    return found[0] & ~members, found[1]


def grown_group(features: torch.Tensor, core: torch.Tensor, fdr: float = DEFAULT_FDR, seed: int = 0):
    """The group grown from its ``core`` in representation space: (bool (M,) the grown group, the core included;
    the largest expected share of ordinary examples above a boundary), or None when nothing joins the core.

    One affected point supports most the poisons made from inputs like itself (on a plain MLP, those of its own
    source class); the others share the trigger in the head input but support nothing. The boundary of
    :func:`representation_cut` is refitted on the grown group until no candidate joins (at most
    ``_REPRESENTATION_ROUNDS`` fits): started from the core (the candidates at the claimed support cut), which
    holds almost no ordinary example, and not from the whole flagged set, whose support-mixture tail can hold many
    and bend the directions (a plain MLP from one point: 20-37 poisons left out). Each refit can also take in
    the few ordinary candidates just above its boundary, so the grown members are kept only where the final
    group's own boundaries put them (refitting the whole flagged set instead once ran away into its label, 11 %
    of the clean examples flagged; docs/RESULTS.md). core bool (M,)."""
    features = features.double().cpu()  # once for every refit (each would copy it again)
    core = core.to(torch.bool).cpu()
    grown = core.clone()
    shares = []
    for _ in range(_REPRESENTATION_ROUNDS):
        step = representation_cut(features, grown, fdr, seed)
        if step is None:
            break
        grown |= step[0]
        shares.append(step[1])
    if not shares:
        return None
    final = _above_boundaries(features, grown, fdr, seed)
    if final is not None:
        grown &= final[0] | core
        shares.append(final[1])
    if not bool((grown & ~core).any()):
        return None
    return grown, max(shares)


def _above_boundaries(features: torch.Tensor, members: torch.Tensor, fdr: float, seed: int):
    """(bool (M,) the candidates, members or not, above either boundary of :func:`representation_cut` for the
    group ``members``, the largest expected share of ordinary examples above one), or None when neither direction
    shows two populations."""
    members = members.to(torch.bool).cpu()
    if int(members.sum()) < 2 or int((~members).sum()) < 2:
        return None
    phi = features.double().cpu()
    above, shares = torch.zeros_like(members), []
    for score in (_mean_direction(phi, members), _discriminant(phi, members, seed)):
        found = None if score is None else _upper_population(score, fdr, seed, separated=True)
        if found is not None:
            above |= score >= found[0]
            shares.append(found[1])
    return (above, max(shares)) if shares else None


def decoy_cut(features: torch.Tensor, before: torch.Tensor, added: torch.Tensor, decoys: torch.Tensor | None,
              fdr: float = DEFAULT_FDR, seed: int = 0):
    """The representation step's additions held to ``fdr`` by the label's held-out controls: (bool (M,) the additions
    kept, the estimated share of ordinary candidates among them), or None when there is no control to compare.

    The two-population fits of :func:`representation_cut` report a share of ordinary examples above their
    boundary that stays near 0 even where every candidate they add is clean: a direction fitted to split a group
    from the rest finds a tail of the label's own variety and calls it a population. Held-out controls are
    inputs of the label that cannot be poisons; scored along the same two directions as the candidates
    (:func:`decoy_scores`), the share of them at or above a score t estimates the share of the label's ordinary
    candidates there, so #(candidates outside ``before``) x that share is the count of ordinary candidates expected
    among the additions at or above t. The additions are cut back to the lowest t where that count is at most
    ``fdr`` times the additions kept, and dropped where none is (one control above every addition already expects
    more ordinary candidates than a handful of additions holds). Training controls cannot serve: their screens set
    aside the poisons influence sees, and the step exists for those it does not, which then pass for ordinary
    (docs/RESULTS.md, "The decoy cut in the library").

    features float (M, D): the candidates' head inputs (:func:`candidate_features`); before bool (M,): the group
    before the step; added bool (M,): the step's additions; decoys float (C, D): the held-out controls' head
    inputs, centred as ``features`` (None or no row: nothing to compare)."""
    before, added = before.to(torch.bool).cpu(), added.to(torch.bool).cpu()
    if decoys is None or not decoys.shape[0] or not bool(added.any()) or int((~(before | added)).sum()) < 2:
        return None  # (fewer than 2 candidates outside the group: no direction to score on)
    own, other = decoy_scores(features, before | added, decoys, seed)  # float64 on the CPU
    control = other.sort().values
    ts = own[added].sort().values
    kept_at = added.sum() - torch.arange(ts.numel())  # the additions at or above each ts (ties: the first counts)
    above = control.numel() - torch.searchsorted(control, ts)
    expected = above / control.numel() * int((~before).sum())
    ok = (expected <= fdr * kept_at).nonzero().flatten()
    if not ok.numel():
        return torch.zeros_like(added), float(min(1.0, expected[0] / kept_at[0]))
    first = int(ok[0])
    return added & (own >= ts[first]), float(expected[first] / kept_at[first])


def decoy_scores(phi: torch.Tensor, group: torch.Tensor, decoys: torch.Tensor,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 (M,) the candidates' scores, float64 (C,) the decoys'): each the larger of the two directions of
    :func:`representation_cut` between ``group`` and the other candidates, the candidates' cross-fitted (as the
    step fits them), rows ``decoys`` (C, D) not among the candidates on the fit to every candidate. Each direction
    is in units of the median absolute score of the candidates outside the group, so that the two are compared on
    the label's own spread (the discriminant's raw scale is arbitrary)."""
    phi, decoys, group = phi.double().cpu(), decoys.double().cpu(), group.to(torch.bool).cpu()
    ordinary = ~group
    mean_group, mean_ordinary = phi[group].mean(0), phi[ordinary].mean(0)
    own = [_mean_direction(phi, group)]
    other = [(decoys - mean_ordinary) @ (mean_group - mean_ordinary)]
    crossed = _discriminant(phi, group, seed)
    if crossed is not None:
        start, direction = _shrunk_discriminant(phi.numpy(), group.numpy().astype(np.int64))
        own.append(crossed)
        other.append(torch.from_numpy((decoys.numpy() - start) @ direction))
    units = [score[ordinary].abs().median().clamp_min(torch.finfo(torch.float64).tiny) for score in own]
    return (torch.stack([s / u for s, u in zip(own, units)]).amax(0),
            torch.stack([s / u for s, u in zip(other, units)]).amax(0))


def _mean_direction(phi: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """float64 (M,): each row of ``phi`` projected on the direction from the non-members' mean to the members'
    mean, both means without the row itself (cross-fitting)."""
    n_in, n_out = int(members.sum()), int((~members).sum())
    group, ordinary = phi[members].mean(0), phi[~members].mean(0)
    side = members.unsqueeze(1)
    group_i = torch.where(side, (n_in * group - phi) / (n_in - 1), group)
    ordinary_i = torch.where(side, ordinary, (n_out * ordinary - phi) / (n_out - 1))
    return ((phi - ordinary_i) * (group_i - ordinary_i)).sum(1)


def _discriminant(phi: torch.Tensor, members: torch.Tensor, seed: int, folds: int = _DISCRIMINANT_FOLDS):
    """float64 (M,): the linear discriminant of members against non-members (:func:`_shrunk_discriminant`), each
    row scored by the discriminant fitted on the other ``folds`` - 1 folds (stratified, seeded), from the
    non-members' mean of those folds (so that, as along the mean direction, the ordinary candidates sit about 0
    and the group above); None when either side has fewer than ``folds`` rows or the rows have more than
    ``_DISCRIMINANT_MAX_DIM`` columns."""
    from sklearn.model_selection import StratifiedKFold

    side = members.numpy().astype(np.int64)
    if int(side.sum()) < folds or int((1 - side).sum()) < folds or phi.shape[1] > _DISCRIMINANT_MAX_DIM:
        return None
    # the folds are drawn over the rows in an order of their own values, so that they hold the same candidates
    # whatever order the training data came in
    order = np.lexsort(phi.numpy().T[::-1])
    x, side = phi.numpy()[order], side[order]
    out = np.zeros(len(side))
    for fit_rows, score_rows in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, side):
        ordinary, direction = _shrunk_discriminant(x[fit_rows], side[fit_rows])
        out[order[score_rows]] = (x[score_rows] - ordinary) @ direction
    return torch.from_numpy(out)


def _shrunk_discriminant(x: np.ndarray, side: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the non-members' mean, the discriminant direction) of rows ``x`` (M, D) with ``side`` 1 for members, 0
    for the others: scikit-learn's ``LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")`` (the pooled
    covariance of the two classes, each standardised per column, shrunk by the Ledoit-Wolf estimate and scaled
    back, weighed by the class shares), its direction sigma^-1 (mean_1 - mean_0) solved by Cholesky: the shrunk
    covariance is positive definite, and scikit-learn's least-squares solve of the D x D system, three quarters of
    the fit's time, made the representation step of a detection take 25 s where the scores took 0.15 (a CNN whose
    head reads 1,024 features; docs/RESULTS.md). A singular covariance (no shrinkage and fewer rows than columns)
    falls back to the least-squares solve."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve, lstsq
    from sklearn.covariance import ledoit_wolf
    from sklearn.preprocessing import StandardScaler

    means, pooled = [], np.zeros((x.shape[1], x.shape[1]))
    for k in (0, 1):
        rows = x[side == k]
        scaler = StandardScaler()
        standardised = scaler.fit_transform(rows)
        scale = scaler.scale_
        pooled += (rows.shape[0] / x.shape[0]) * (scale[:, None] * ledoit_wolf(standardised)[0] * scale)
        means.append(scaler.mean_)  # the class mean the scaler took already
    gap = means[1] - means[0]
    try:
        return means[0], cho_solve(cho_factor(pooled), gap)
    except LinAlgError:
        return means[0], lstsq(pooled, gap)[0]


def candidate_features(model: torch.nn.Module, train_loader, eligible: torch.Tensor) -> torch.Tensor:
    """float32 (#candidates, D): :func:`deltainf.models.head_inputs` of the ``eligible`` (bool (N,)) training
    examples in position order, read in eval mode (the model's mode is restored) on the model's device, each minus
    the mean of its label's candidates.

    Centred per label so that :func:`representation_cut` compares a candidate with the others of its own label:
    with affected points of several labels, what separates one label's head inputs from another's is the
    strongest direction between a group and the rest, and a group drawn more from one label than from the others
    would take that label's ordinary examples with it (a poison-free LayerNorm MLP traced from five misclassified
    inputs of four labels: 211 examples flagged became 365). With one label the centring is a shift, which the
    projection does not see."""
    return _label_features(model, train_loader, eligible)[0]


def _label_features(model: torch.nn.Module, train_loader, eligible: torch.Tensor):
    """(:func:`candidate_features`, {label: float64 (D,) the mean its label's candidates were centred by}), the
    means to centre other inputs of the label (its held-out controls) the same way."""
    eligible = eligible.cpu()
    row = eligible.cumsum(0) - 1  # a candidate's row among the candidates
    out = labels = None
    for x, y, where in _positioned(train_loader):
        keep = eligible[where]
        if not bool(keep.any()):
            continue
        f = _head_inputs(model, x[keep])
        if out is None:
            out = torch.zeros(int(eligible.sum()), f.shape[1])
            labels = torch.zeros(int(eligible.sum()), dtype=torch.int64)
        out[row[where[keep]]] = f
        labels[row[where[keep]]] = y[keep]
    if out is None:
        return torch.zeros(0, 0), {}
    centred, means = out.double(), {}
    for label in labels.unique():
        rows = labels == label
        means[int(label)] = centred[rows].mean(0)
        centred[rows] -= means[int(label)]
    return centred.float(), means


def coherence_estimate(cuts: torch.Tensor, observed: torch.Tensor, null: torch.Tensor, fdr: float):
    """(the lowest support cut whose estimated false-discovery rate (1 + null) / observed is at most
    ``fdr``, and that estimate; or None and the lowest estimate over all cuts, 1.0 without any). An estimate is a
    rate, capped at 1 (where the null count exceeds the observed one the ratio would not be)."""
    if cuts.numel() == 0:
        return None, 1.0
    estimate = (1.0 + null) / observed.double()
    ok = (estimate <= fdr).nonzero().flatten()
    if not ok.numel():
        return None, min(1.0, float(estimate.min()))
    return float(cuts[ok[0]]), float(estimate[ok[0]])


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
        p, n, n_train = transformed.shape
        out = {k: torch.empty(p, n_train, dtype=torch.float32) for k in ("mean", "min", "max", "frac_negative")}
        step = _columns(2 * p * (1 + n))  # the copy and the difference
        for a in range(0, n_train, step):
            b = min(n_train, a + step)
            delta = transformed[:, :, a:b].double() - base[:, a:b].double().unsqueeze(1)
            out["mean"][:, a:b] = delta.mean(1).float().cpu()
            out["min"][:, a:b] = delta.amin(1).float().cpu()
            out["max"][:, a:b] = delta.amax(1).float().cpu()
            out["frac_negative"][:, a:b] = (delta < 0).double().mean(1).float().cpu()
        return cls(**out)


_KEEP = object()  # revote(): "keep the current setting" (None is a setting: the calibrated cut)
# DetectionResult fields with one row or entry per affected point
_POINT_FIELDS = ("votes", "mirror_votes", "base_scores", "delta", "thresholds", "test_y_adv", "query_labels",
                 "transforms")
# the settings of one affected label's decision (DetectionResult.per_label)
_LABEL_SETTINGS = ("n_controls", "controls_set_aside", "outrank_level")
# what DetectionResult.to_dict() reports of each label's own decision
_DECISION_KEYS = ("found", "verdict", "n_points", "test_y_adv", "cut", "support_cut", "mixture_cut", "mixture_fdr",
                  "representation_added", "representation_fdr", "mirror_added", "mirror_fdr", "outrank_p",
                  "coherence_top_p", "by_point_p", "by_point_added", "by_point_claimed", "n_candidates",
                  "fdr_estimate", "n_mirror", "n_controls", "n_flagged", "flagged")


@dataclasses.dataclass(kw_only=True)
class DetectionResult(DetectorResult):
    """What :meth:`DeltaInfluence.detect` found: a :class:`deltainf.detector.DetectorResult` (``flagged``,
    ``scores`` = the decision statistic per example, ``info``) with everything behind the decision.

    Attributes:
        flagged: int64 (K,) sorted positions in the training dataset of the flagged examples.
        scores: float32 (N,) the decision statistic (votes combined over the points; -1 outside the
            control gate): higher = more suspicious, as for every detector. A group's members claimed point by
            point or by their representation can lie outside the gate (-1): the decision is ``flagged``, not a cut
            on it.
        votes: int32 (P, N) copies with ΔInfl < threshold, per affected point.
        mirror_votes: int32 (P, N) copies with ΔInfl > -threshold (the null's side), per point.
        statistic, mirror_statistic: int64 (N,) the votes and the mirror votes combined over the points.
        cut: examples with ``statistic >= cut`` are flagged; None when nothing is (no cut qualified).
        fdr_estimate: the estimated false-discovery rate behind the claim. With controls, that of the candidates
            at or above ``support_cut`` (the permutation estimate; a claim of the outranking test reports it as it
            is, above the target): the boundaries that extend the set beyond it (the support mixture, the mirror
            cut, the representation) have their own expected shares, in ``mixture``, ``representation`` and the
            verdict, which it does not cover. Without controls, ``(1 + #{mirror_statistic >= cut}) / #flagged``.
            For an empty set, the lowest estimate any cut reached (why nothing was flagged).
        base_scores: float32 (P, N) influence of each training example on the original query.
        delta: :class:`DeltaSummary` of ΔInfl over the copies.
        thresholds: float (P,) threshold used for each point (all equal unless threshold="auto").
        test_y_adv: int64 (P,) adversarial labels of the affected points.
        query_labels: int64 (P, n) labels of the copies.
        transforms: P lists of n transform names.
        timings: seconds per stage: "check", "transform", "scoring", "vote", "total"; when the group was traced
            again (``retrace``) also "retrace" and the second pass's stages as "retrace_<stage>".
        settings: the detector's settings (JSON-friendly), with the resolved fdr / tolerance / pixel map; with
            training controls also ``labels_split`` ([split, examined] of :func:`labels_in_modes`) and
            ``controls_screened`` (whether controls that look like the points were screened out as poisons); when
            the group was traced again, ``retraced`` (the members' dataset positions) and ``first_flagged`` (how many
            the first pass flagged), or ``retraced_found_nothing`` where the second pass found no group.
        raw_scores: (P, 1 + n, N) all influence scores in the scorer's dtype (float32, float64 for a float64
            model; column 0 = original query) when the detector kept them (``keep_scores=True``), else None;
            lets :meth:`revote` try other thresholds without scoring again.
        control_support: float64 (N,) in [-1, 1] (NaN for an example with no control to compare: a training
            example alone in its label, its own control), how much more each example supports the affected
            points than the controls of the same labels (the gate of the decision), or None without controls.
        eligible: bool (N,) the candidates (training examples labelled with an affected label, for
            ``candidates="label"``), or None when every example is one.
        coherence: (cuts, observed, null, top_p) of :func:`coherence_curve`, the test that decides whether a
            poison set is claimed at all, or None without controls.
        support_cut: the lowest control support at which the coherence test reached ``fdr`` (examples at or
            above it are flagged, beside those at or above ``cut``), or None.
        mixture: (support boundary, expected share of ordinary examples above it) of :func:`mixture_cut`, the
            group's boundary among the candidates once the coherence test has found a group (candidates at or
            above it are flagged too), or None.
        representation: (how many candidates it added, the expected share of ordinary examples among them) of
            :func:`representation_cut` and :func:`grown_group` (the group grown from its core), held to the fdr by the
            label's held-out controls (:func:`decoy_cut`, whose estimate the share is; without them, the largest share
            the fits expect above a boundary), when they added candidates whose representation lies with the group's
            (``boundary="representation"``), or None.
        features: float32 (#candidates, D) the candidates' head inputs, centred per label
            (:func:`candidate_features`), read once a group was found with ``boundary="representation"`` (kept for
            :meth:`revote`), else None.
        control_features: float32 (C, D) the head inputs of the held-out controls the decision used, centred as
            ``features`` (they hold the representation step's additions to the fdr: :func:`decoy_cut`), read with
            ``features`` where there are any, else None.
        outrank_p: the outranking test's p-value (:class:`Coherence`'s top_p) when the group was claimed by it
            (the points come first among their label's inputs while the estimate stays above ``fdr``), else None.
        by_point: (p-value, candidates it added, whether it claimed the group) of the outranking test point by
            point (:class:`PointOutranking`) when it passed: the candidates that rank one of the affected points
            above every control join the group (and are the group when nothing else claimed one); else None.
        per_label: with controls and affected points of several labels, each label's own result (its points,
            controls and candidates: the module docstring), keyed by label; this result is then their union
            (:func:`_merged`): ``flagged`` every label's, ``statistic`` and ``control_support`` the largest any
            label gave (``scores`` the largest share of its top value any label's statistic reached, in [0, 1] or
            -1: a label's pooled statistic counts over its own points, so their scales differ), ``fdr_estimate``
            that of the labels' groups at their support cuts (what each label's estimate covers; the members added
            past the mirror cut, point by point or by representation are not), and the fields of one decision
            (``cut``, ``coherence``, ``support_cut``, the boundaries, ``features``) are None here and set in each
            label's. None otherwise.
    """

    scores: torch.Tensor = None  # set from the statistic in __post_init__
    votes: torch.Tensor
    mirror_votes: torch.Tensor
    statistic: torch.Tensor
    mirror_statistic: torch.Tensor
    cut: int | None
    fdr_estimate: float
    base_scores: torch.Tensor
    delta: DeltaSummary
    thresholds: list[float]
    test_y_adv: torch.Tensor
    query_labels: torch.Tensor
    transforms: list[list[str]]
    timings: dict[str, float]
    settings: dict[str, Any]
    raw_scores: torch.Tensor | None = None
    control_support: torch.Tensor | None = None
    eligible: torch.Tensor | None = None
    coherence: tuple | None = None
    support_cut: float | None = None
    mixture: tuple[float, float] | None = None
    representation: tuple[int, float] | None = None
    mirror_added: tuple[int, float] | None = None
    by_point: tuple[float, int, bool] | None = None
    features: torch.Tensor | None = None
    control_features: torch.Tensor | None = None
    outrank_p: float | None = None
    per_label: dict[int, "DetectionResult"] | None = None

    def __post_init__(self) -> None:
        if self.per_label is None:
            self.scores = self.statistic.to(torch.float32)
        else:  # the labels' statistics count over their own points: each is read as a share of its largest value
            self.scores = torch.stack([part._share_of_top() for part in self.per_label.values()]).amax(0)
        super().__post_init__()

    def _share_of_top(self) -> torch.Tensor:
        """float32 (N,): ``statistic`` over the largest value it can take (P * n pooled, else n), -1 kept."""
        top = self.n_transforms * (self.n_points if self.settings.get("combine", DEFAULT_COMBINE) == "pooled" else 1)
        return torch.where(self.statistic < 0, -1.0, self.statistic / max(top, 1)).to(torch.float32)

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
    def tolerance(self) -> int | None:
        """The fixed tolerance used, or None for the calibrated cut."""
        return self.settings.get("tolerance")

    @property
    def found(self) -> bool:
        """Whether a poison set was found (anything flagged)."""
        return bool(self.flagged.numel())

    @property
    def claimed_by_point(self) -> bool:
        """Whether the outranking test point by point claimed the group (``by_point``'s third field)."""
        return self.by_point is not None and bool(self.by_point[2])

    @property
    def n_mirror(self) -> int:
        """Mirror examples at or beyond the cut (the estimated number of chance members, minus the +1)."""
        if self.per_label is not None:
            return sum(part.n_mirror for part in self.per_label.values())
        if self.cut is None:
            return 0
        return int((self.mirror_statistic >= self.cut).sum())

    @property
    def verdict(self) -> str:
        """One line a user can act on: what was found, and how sure the run is of it."""
        line = self._verdict()
        traced = self.settings.get("retraced")
        if self.found and traced:
            line += (f"; the group found from {self.n_points - len(traced)} point(s) was traced again with "
                     f"{len(traced)} of its members as further affected points (settings['retraced'])")
        if self.found and self.settings.get("candidates") == "all":
            line += ("; candidates='all': examples of the points' source classes break the permutation null, so the "
                     "estimate is not calibrated and a large share of other labels can be flagged")
        if self.found and self.settings.get("num_classes") == 2:
            # measured (docs/RESULTS.md, "The two-class task: where the group ends"): a label of several kinds of
            # input (modes) is compared with controls of every mode at once
            if self.settings.get("boundary") == "coherence":
                line += ("; two classes: the group ends at its permutation cut, as the boundaries that extend it took "
                         "whole modes of the label; on two-class models this still flagged up to a third of the "
                         "label's clean examples in some runs and left most poisons in others: check the set "
                         "(boundary='representation' takes more poisons, with many clean examples)")
            else:
                line += ("; two classes: boundary=" + repr(self.settings.get("boundary")) + " extends the group by "
                         "whole modes of the label; the flagged sets of two-class models held up to half of the "
                         "label's clean examples as well as the poisons: read this set as a superset of the poisons")
        return line

    def _verdict(self) -> str:
        if self.per_label is not None:
            each = "; ".join(f"label {label} ({part.n_points} point(s)): {part._verdict()}"
                             for label, part in self.per_label.items())
            if not self.found:
                return (f"no coherent poison set found for any affected label (each decided on its own points and "
                        f"controls; the lowest estimate was {self.fdr_estimate:.3f}) -- {each}")
            covered = sum(_estimated_group(part) for part in self.per_label.values() if part.found)
            return (f"{self.flagged.numel()} training example(s) flagged as the poison set in all (estimated "
                    f"false-discovery rate {self.fdr_estimate:.3f} over the {covered} of them in the labels' groups at "
                    f"their support cuts, which the estimates cover; each affected label decided on its own points "
                    f"and controls) -- {each}")
        if self.found and self.support_cut is not None:
            if self.claimed_by_point:
                line = (f"{self.flagged.numel()} training example(s) flagged as the poison set: each affected point "
                        "has its own group of candidates that rank it above every control, leading by far more than "
                        "in the re-splits of points and controls (the outranking test point by point, "
                        f"p = {self.by_point[0]:.3f}), while their support pooled over the points does not stand out "
                        "(the estimate, which counts as many ordinary candidates ranking a point first as ordinary "
                        f"inputs get, is {self.fdr_estimate:.3f})")
            else:
                line = (f"{self.flagged.numel()} training example(s) flagged as the poison set: a coherent group "
                        "supports the affected points far more than ordinary inputs of their label get supported "
                        f"(estimated false-discovery rate {self.fdr_estimate:.3f} at support {self.support_cut:.2f}, "
                        "from permutations of points and controls)")
            if self.outrank_p is not None:
                line += (f"; claimed by the outranking test: as many candidates rank the affected points above every "
                         f"control in only {self.outrank_p:.3f} of the re-splits of points and controls, while the "
                         "estimate, which counts as many ordinary examples at the top as an ordinary input would get, "
                         "stays above the target")
            if self.by_point is not None and not self.by_point[2] and self.by_point[1]:
                line += (f"; {self.by_point[1]} more rank one of the affected points above every control (the "
                         f"outranking test point by point, p = {self.by_point[0]:.3f})")
            if self.mirror_added is not None and self.mirror_added[0]:
                line += (f"; {self.mirror_added[0]} more past the mirror cut, whose own estimated false-discovery rate "
                         f"is {self.mirror_added[1]:.3f} (the estimate above covers the group at its support cut)")
            if self.mixture is not None and self.mixture[0] < self.support_cut:
                line += (f"; the group's boundary from a two-population fit of the candidates' support is "
                         f"{self.mixture[0]:.2f} (local false-discovery rate <= {self.settings.get('fdr')} there, "
                         f"expected share of ordinary examples above it {self.mixture[1]:.3f})")
            if self.representation is not None:
                estimate = self.representation[1]
                share = (f"expected share of ordinary examples among them {estimate:.3f}, from the label's held-out "
                         "controls scored along the same directions" if self.control_features is not None else
                         f"expected share of ordinary examples above a boundary at most {estimate:.3f}")
                line += ("; candidates whose last-layer representation lies with the group's are flagged too "
                         f"({self.representation[0]} of them, from two-population fits along the group's mean "
                         f"direction and its linear discriminant, refitted as the group grows from its core; {share})")
            return line + self._training_controls_note(found=True)
        if self.found:
            line = (f"{self.flagged.numel()} training example(s) flagged as the poison set; estimated "
                    f"false-discovery rate {self.fdr_estimate:.3f} ({self.n_mirror} mirror example(s) at the cut)")
            if self.control_support is None and self.settings.get("controls_wanted"):
                line += ("; no controls: no input of the affected label(s) that the model classifies correctly, in "
                         "the reference or the training set, so the mirror alone decided and nothing rules out the "
                         "label's own examples (a label the model never gets right is no evidence of poison)")
            elif self.control_support is None:
                line += "; no controls (pass reference=..., with n_controls > 0) to rule out examples that support " \
                        "every prediction of the label"
            return line
        target = self.settings.get("fdr")
        why = f"no cut reaches an estimated false-discovery rate of {target}" if target is not None else \
            "no example reaches the fixed tolerance"
        if self.coherence is not None and self.tolerance is None:
            why = ("no group of training examples supports the affected points more than ordinary inputs of their "
                   f"label get supported, at an estimated false-discovery rate of {target}")
        line = f"no coherent poison set found: {why} (the lowest estimate was {self.fdr_estimate:.3f})"
        if self.coherence is None or self.tolerance is not None:  # the votes decided: influence collapse is the test
            line += "; the prediction is not explained by a group of training examples that collapses under the " \
                    "transforms"
        return line + self._resolution_note() + self._training_controls_note(found=False)

    def _resolution_note(self) -> str:
        """When ordinary examples reach the top support by chance (few points, few controls), the smallest group the
        estimate could claim, even with every member at the top: what a user can change to see a smaller one."""
        c, target = self.coherence, self.settings.get("fdr")
        if c is None or target is None or c.cuts.numel() == 0 or float(c.cuts[-1]) < 1.0 or float(c.null[-1]) < 1.0:
            return ""
        smallest = math.ceil((1.0 + float(c.null[-1])) / target - 1e-9)
        top_p = getattr(c, "top_p", None)
        level = _outrank_test_level(c, self.settings.get("outrank_level") or OUTRANK_LEVEL)
        if top_p is not None and top_p <= level:  # the test passed; the claim needs 1 / fdr candidates at the top
            outranking = (f"the outranking test found the points ahead of their controls (p = {top_p:.3f}), but a "
                          f"claim at this false-discovery rate needs at least {_smallest_claim(target)} "
                          f"candidates at the top, and {int(c.observed[-1])} are there")
        else:
            outranking = "the outranking test found the points no further ahead than chance puts a control"
        return (f"; with {self.n_points} affected point(s) and {self.settings.get('n_controls')} controls, "
                f"{float(c.null[-1]):.1f} ordinary candidates outrank every control by chance, so a group of fewer "
                f"than {smallest} examples cannot reach the estimate's target, and {outranking}: more affected points "
                "of the label (or more controls, n_controls=..., from enough held-out data) make a smaller group "
                "visible")

    def _training_controls_note(self, found: bool) -> str:
        """What the verdict says of controls drawn from the training set ("" when there are none); when nothing
        was found without any held-out data, that such data would help."""
        source = self.settings.get("controls") or ""
        if "training set" not in source:
            return ""
        split = self.settings.get("labels_split")
        if self.settings.get("controls_screened", True):
            note = (f"; controls from the training set, {self.settings.get('controls_set_aside', 0)} example(s) "
                    "that look like the affected points set aside as possible poisons")
        else:
            note = (f"; controls from the training set, none set aside: {split[0]} of the {split[1]} other labels "
                    "examined are two populations themselves, so training examples that look like the affected "
                    "points may be a mode of their label, not poisons, and stay among the controls (poisons among "
                    "them hide their group, above all from one affected point)")
        if not found and "reference" not in source:
            note += "; held-out data (reference=...) gives the test more power, above all for one affected point"
        if found and source.startswith("training set"):
            # measured: the poison-free models' one-point claims without held-out data that were examined were the
            # outranking test's; correctly classified test inputs traced without held-out data had groups of 73-212
            # examples claimed by the estimate in most runs
            if self.outrank_p is not None or self.claimed_by_point:
                note += ("; a claim of the outranking test on training controls is the weakest this detector makes: "
                         "the controls the screen leaves are not exchangeable with the affected input, and a mode "
                         "of the label that a misclassified input resembles can pass it")
            else:
                note += ("; a claim on training controls is unconfirmed: the controls the screen leaves are not "
                         "exchangeable with a test input, and ordinary inputs of a poison-free model had such groups "
                         "claimed")
            note += "; confirm with held-out inputs of the label (reference=...)"
        return note

    def per_point_votes_histogram(self) -> torch.Tensor:
        """int64 (P, n + 1): number of training examples with each vote count, per point."""
        n = self.n_transforms
        return torch.stack([torch.bincount(v.long(), minlength=n + 1)[: n + 1] for v in self.votes])

    def revote(self, threshold=None, tolerance=_KEEP, combine=None, fdr=None) -> "DetectionResult":
        """The result the same queries give under other settings, without scoring again.

        Changing ``threshold`` needs the raw scores (``keep_scores=True``); tolerance (an int, or None
        for the calibrated cut), combine and fdr only need the votes. The representation boundary needs the
        candidates' ``features``, which :meth:`DeltaInfluence.detect` reads only when it found a group; without
        them the group ends at the support boundary. Unspecified arguments keep their
        current values. Returns a new result (timings of the vote stage only).

        A smaller ``fdr`` need not give a subset: where the estimate no longer reaches it, an outranking test can
        still claim the group at its own level, with the estimate reported as it is (above the target;
        ``to_dict()``'s ``outrank_p`` and ``by_point_claimed`` say which test claimed it), and the boundaries are
        drawn again at the new target."""
        n = self.n_transforms
        comb = self.settings.get("combine", DEFAULT_COMBINE) if combine is None else combine
        _check_combine(comb)
        tol = self.tolerance if tolerance is _KEEP else resolve_tolerance(tolerance, n)
        target = self.settings.get("fdr") or self.settings.get("fdr_setting") or DEFAULT_FDR
        target = target if fdr is None else _check_fdr(fdr)
        t0 = time.perf_counter()
        votes, mirror = self.votes, self.mirror_votes
        thresholds = list(self.thresholds)
        thr_setting = self.settings.get("threshold")
        if threshold is not None:
            thr = _check_threshold(threshold)
            if self.raw_scores is None:
                raise ValueError("revote with a new threshold needs the raw scores; run the detector with "
                                 "keep_scores=True")
            base, transformed = self.raw_scores[:, 0], self.raw_scores[:, 1:]
            thresholds = _resolve_thresholds(thr, base, transformed)
            votes, mirror = _vote(base, transformed, thresholds)
            thr_setting = thr
        settings = dict(self.settings, threshold=thr_setting, tolerance=tol, combine=comb,
                        fdr=None if tol is not None else target, fdr_setting=target,
                        auto_threshold_scale=AUTO_THRESHOLD_SCALE if thr_setting == "auto" else None)
        result = self._redecided(votes, mirror, thresholds, settings)
        return dataclasses.replace(result, timings={"vote": time.perf_counter() - t0})

    def _redecided(self, votes: torch.Tensor, mirror: torch.Tensor, thresholds: list[float],
                   settings: dict[str, Any]) -> "DetectionResult":
        """This result decided again on ``votes`` and ``mirror`` (P, N) under ``settings`` (each label on its own
        when there are several)."""
        if self.per_label is not None:
            per_label = {}
            for label, part in self.per_label.items():
                rows = _rows_of(self.test_y_adv, label)
                per_label[label] = part._redecided(_take(votes, rows), _take(mirror, rows), _take(thresholds, rows),
                                                   {**settings, **{k: part.settings.get(k) for k in _LABEL_SETTINGS}})
            points = {k: getattr(self, k) for k in _POINT_FIELDS}
            merged = _merged(per_label, {**points, "votes": votes, "mirror_votes": mirror, "thresholds": thresholds},
                             settings)
            return dataclasses.replace(merged, raw_scores=self.raw_scores)
        tol, comb = settings.get("tolerance"), settings.get("combine", DEFAULT_COMBINE)
        target = settings.get("fdr") or DEFAULT_FDR
        boundary = settings.get("boundary", DEFAULT_BOUNDARY)
        decision = _decide(votes, mirror, self.n_transforms, comb, tol, target, self.control_support, self.eligible,
                           self.coherence, boundary, settings.get("outrank_level") or OUTRANK_LEVEL,
                           _mirror_cut_applies(settings.get("num_classes")))
        if boundary == "representation":
            if self.features is None and decision["flagged"].numel() and decision["support_cut"] is not None:
                warnings.warn("revote: the representation step needs the candidates' features, which detect reads "
                              "only when it finds a group; this group ends at its support boundary (run detect with "
                              "these settings for the whole step)", stacklevel=4)
            decision = _add_representation(decision, self.features, self.eligible, target, self.control_support,
                                           self.coherence, self.control_features)
        return dataclasses.replace(self, votes=votes, mirror_votes=mirror, thresholds=thresholds, settings=settings,
                                   **decision)

    def to_dict(self, include_arrays: bool = False) -> dict[str, Any]:
        """JSON-ready summary: the verdict, settings, timings, flagged indices, vote histograms and
        ΔInfl statistics. ``include_arrays=True`` adds the per-example (P, N) arrays (votes, mirror
        votes, base scores, mean ΔInfl, fraction negative)."""
        d: dict[str, Any] = {
            "found": self.found,
            "verdict": self.verdict,
            "n_train": self.n_train,
            "n_points": self.n_points,
            "n_transforms": self.n_transforms,
            "thresholds": [float(t) for t in self.thresholds],
            "tolerance": self.tolerance,
            "fdr": self.settings.get("fdr"),
            "cut": self.cut,
            "support_cut": self.support_cut,
            "mixture_cut": None if self.mixture is None else self.mixture[0],
            "mixture_fdr": None if self.mixture is None else self.mixture[1],
            "representation_added": None if self.representation is None else self.representation[0],
            "representation_fdr": None if self.representation is None else self.representation[1],
            "mirror_added": None if self.mirror_added is None else self.mirror_added[0],
            "mirror_fdr": None if self.mirror_added is None else self.mirror_added[1],
            "outrank_p": self.outrank_p,
            "coherence_top_p": None if self.coherence is None else getattr(self.coherence, "top_p", None),
            "by_point_p": None if self.by_point is None else self.by_point[0],
            "by_point_added": None if self.by_point is None else self.by_point[1],
            "by_point_claimed": None if self.by_point is None else self.by_point[2],
            "n_candidates": self.n_train if self.eligible is None else int(self.eligible.sum()),
            "fdr_estimate": float(self.fdr_estimate),
            "n_mirror": self.n_mirror,
            "n_controls": self.settings.get("n_controls", 0),
            "n_flagged": int(self.flagged.numel()),
            "flagged": self.flagged.tolist(),
            "vote_histogram": self.per_point_votes_histogram().tolist(),
            "test_y_adv": self.test_y_adv.tolist(),
            "query_labels": self.query_labels.tolist(),
            "transforms": [list(t) for t in self.transforms],
            "transform_counts": _count_names(self.transforms),
            # over the scored examples (an example the loader never visited has NaN scores); None for none
            "delta_stats": {
                "mean_of_mean": to_jsonable(self.delta.mean.double().nanmean(1)),
                "median_of_mean": to_jsonable(self.delta.mean.double().nanmedian(1).values),
                "frac_examples_all_negative": to_jsonable((self.delta.frac_negative == 1).double().mean(1)),
                "base_score_min": to_jsonable(self.base_scores.double().nan_to_num(nan=math.inf).amin(1)),
                "base_score_max": to_jsonable(self.base_scores.double().nan_to_num(nan=-math.inf).amax(1)),
            },
            "timings": {k: float(v) for k, v in self.timings.items()},
            "settings": to_jsonable(self.settings),
        }
        if self.per_label is not None:
            d["per_label"] = {str(label): {k: v for k, v in part.to_dict().items() if k in _DECISION_KEYS}
                              for label, part in self.per_label.items()}
        if include_arrays:  # NaN (an unscored example) as None: JSON has no NaN
            d["votes"] = self.votes.tolist()
            d["mirror_votes"] = self.mirror_votes.tolist()
            d["base_scores"] = to_jsonable(self.base_scores)
            d["delta_mean"] = to_jsonable(self.delta.mean)
            d["delta_frac_negative"] = to_jsonable(self.delta.frac_negative)
            if self.control_support is not None:
                d["control_support"] = to_jsonable(self.control_support)
        return d


def _decide(votes: torch.Tensor, mirror: torch.Tensor, n: int, combine, tolerance: int | None,
            fdr: float, support: torch.Tensor | None = None, eligible: torch.Tensor | None = None,
            coherence=None, boundary: str = DEFAULT_BOUNDARY, outrank_level: float = OUTRANK_LEVEL,
            mirror_cut: bool = True) -> dict[str, Any]:
    """The DetectionResult fields of the decision: flagged, statistic, mirror_statistic, cut, support_cut,
    fdr_estimate, mixture, representation.

    ``support`` (N,): the control gate (module docstring); examples outside the gate, or not ``eligible``
    (bool (N,)), get statistic -1, below every cut. ``coherence``: :func:`coherence_curve`'s output, which
    then decides whether anything is flagged (the calibrated cut only); ``boundary``: where the group ends once
    it has ("coherence": the permutation cut; "mixture" and "representation": also the candidates above
    :func:`mixture_cut`; the representation's members are added by :func:`_add_representation`). ``mirror_cut``:
    whether a found group also takes the candidates that pass the mirror cut (:func:`_mirror_cut_applies`)."""
    stat, mstat = combine_votes(votes, combine), combine_votes(mirror, combine)
    vote_side = mirror_side = torch.ones(stat.shape, dtype=torch.bool) if eligible is None else eligible
    if support is not None:
        vote_side, mirror_side = vote_side & (support > 0), mirror_side & (support < 0)
    stat, mstat = torch.where(vote_side, stat, -1), torch.where(mirror_side, mstat, -1)
    out = {"statistic": stat, "mirror_statistic": mstat, "support_cut": None, "mixture": None, "representation": None,
           "outrank_p": None, "mirror_added": None, "by_point": None}
    # the mirror side stands for the ordinary examples on the vote side, as many of them as there are candidates
    # there: the gate can put most candidates on one side (with none on the mirror side nothing is estimated)
    scale = float(vote_side.sum()) / max(1, int(mirror_side.sum())) if support is not None else 1.0
    if tolerance is not None or coherence is None:
        cut = _cut_of_tolerance(tolerance, n, votes.shape[0], combine) if tolerance is not None else \
            calibrated_cut(stat, mstat, fdr)
        if cut is None:
            return {**out, "flagged": torch.empty(0, dtype=torch.int64), "cut": None,
                    "fdr_estimate": _lowest_estimate(stat, mstat, scale)}
        flagged = (stat >= cut).nonzero().flatten().to(torch.int64)
        return {**out, "flagged": flagged, "cut": cut,
                "fdr_estimate": min(1.0, (1 + int((mstat >= cut).sum())) * scale / max(1, flagged.numel()))}
    cuts, observed, null = coherence[:3]
    support_cut, estimate = coherence_estimate(cuts, observed, null, fdr)
    top_p, by_point = getattr(coherence, "top_p", None), getattr(coherence, "by_point", None)
    level = _outrank_test_level(coherence, outrank_level)
    if support_cut is None and _outranks(cuts, observed, top_p, fdr, level):
        # the points come first among all the label's inputs: the group at the top is claimed, with the
        # (conservative) estimate of the top cut reported as it is
        support_cut, estimate = 1.0, min(1.0, float((1.0 + null[-1]) / observed[-1]))
        out["outrank_p"] = top_p
    first = by_point.first if by_point is not None and by_point.p <= level and \
        int(by_point.first.sum()) >= _smallest_claim(fdr) else None
    claimed_by_point = support_cut is None and first is not None
    if claimed_by_point:
        # each point comes first for its own candidates: they are the group, with the (conservative) estimate of
        # their count against the re-splits' reported as it is
        support_cut, estimate = 1.0, min(1.0, (1.0 + by_point.null) / int(first.sum()))
    if support_cut is None:
        return {**out, "flagged": torch.empty(0, dtype=torch.int64), "cut": None, "fdr_estimate": estimate}
    # a group claimed point by point is what the pooled support did not separate: no boundary is drawn in it
    mixture = None
    if boundary != "coherence" and not claimed_by_point:  # no lower than the permutation null backs the group
        mixture = mixture_cut(support, eligible, fdr,
                              floor=functools.partial(largest_excess, cuts, observed, null, high=support_cut))
    lowest = support_cut if mixture is None else min(support_cut, mixture[0])
    members = (support.double() >= lowest) & (eligible if eligible is not None else True)
    if first is not None:
        out["by_point"] = (by_point.p, int((first & ~members).sum()), claimed_by_point)
        members |= first
    # the cut is held to the estimate it reports (where the vote side holds more candidates than the mirror side, the
    # mirror count is scaled up to it), never to less than the plain count: at the plain count the added set's
    # reported estimate rose to 0.25-0.44 on a shallow CNN, past the fdr it was chosen at
    cut = calibrated_cut(stat, mstat, fdr / max(scale, 1.0)) if mirror_cut else None
    if cut is not None:
        past = stat >= cut
        out["mirror_added"] = (int((past & ~members).sum()),
                               min(1.0, (1 + int((mstat >= cut).sum())) * scale / max(1, int(past.sum()))))
        members |= past
    return {**out, "flagged": members.nonzero().flatten().to(torch.int64), "cut": cut, "support_cut": support_cut,
            "fdr_estimate": estimate, "mixture": mixture}


def largest_excess(cuts: torch.Tensor, observed: torch.Tensor, null: torch.Tensor, low: float, high: float) -> float:
    """The support in [``low``, ``high``] at which the candidates at or above it outnumber the permutation null's
    count by the most (the highest such support on a tie; ``high`` when no cut of :func:`coherence_curve` lies in the
    range): the lowest boundary of a group that the null still backs.

    The support mixture (:func:`mixture_cut`) extends the group below the permutation cut where the candidates look
    like a second population. Each candidate it takes in below this level is one that the re-splits expect of an
    ordinary input's supporters, so there the extension rests on the Gaussian fit alone. With one affected point
    the null of an ordinary candidate's support is even over [-1, 1], and a two-component fit splits such a spread
    in two: on a BatchNorm CNN of a user's, with 15-30 poisons from every class (``benchmarks/zoo/user_net.py``),
    the mixture's boundary fell to supports of -0.7-0.4 and flagged 2-3 clean examples per poison (docs/RESULTS.md,
    "A user's network and attack"). Where the group's tail stands above what the null expects, the excess still
    grows down to the mixture's boundary, and the extension stands. cuts float64 (K,) ascending, observed int64
    (K,), null float64 (K,): :class:`Coherence`'s."""
    inside = (cuts >= low) & (cuts <= high)
    if not bool(inside.any()):
        return high
    excess = observed.double()[inside] - null[inside]
    best = (excess == excess.max()).nonzero().flatten()[-1]
    return float(cuts[inside][best])


def _mirror_cut_applies(num_classes: int | None) -> bool:
    """Whether a found group also takes the candidates that pass the mirror cut: not with two classes. There every
    copy is relabelled to the one other class, so every example of the affected label loses influence under every
    copy, an ordinary one as much as a poison, and the mirror votes of the label's ordinary examples are no null
    (measured in docs/RESULTS.md, "The two-class task on every zoo model")."""
    return num_classes is None or num_classes > 2


def _outrank_test_level(coherence, level: float) -> float:
    """The level each outranking test runs at: ``level``, or half of it when the test also runs point by point
    (several points of a label: two tests, Bonferroni)."""
    return level if getattr(coherence, "by_point", None) is None else level / 2


def _outranks(cuts: torch.Tensor, observed: torch.Tensor, top_p: float | None, fdr: float,
              level: float = OUTRANK_LEVEL) -> bool:
    """Whether the outranking test claims the candidates at support 1: its p-value at most ``level``, and at least
    1 / ``fdr`` of them (the size below which the estimate never claims a set either)."""
    if top_p is None or cuts.numel() == 0 or float(cuts[-1]) < 1.0:
        return False
    return top_p <= level and int(observed[-1]) >= _smallest_claim(fdr)


def _smallest_claim(fdr: float) -> int:
    """The fewest candidates an outranking test claims: 1 / ``fdr``, the size below which the estimate never claims a
    set either ((1 + null) / observed > fdr)."""
    return math.ceil(1.0 / fdr - 1e-9)


def _add_representation(decision: dict[str, Any], features: torch.Tensor | None, eligible: torch.Tensor | None,
                        fdr: float, support: torch.Tensor | None = None, coherence=None,
                        control_features: torch.Tensor | None = None) -> dict[str, Any]:
    """``decision`` (of :func:`_decide`) with the candidates whose representation lies with its group, given the
    candidates' ``features`` (rows in the order of the ``eligible`` positions): those the whole flagged set's
    :func:`representation_cut` adds, and, given the candidates' ``support``, those of the group grown from its core
    (:func:`grown_group`; the core: the candidates at or above the claimed support cut, and those the test point by
    point in ``coherence`` joined). Each finds poisons the other misses (the whole set's fit: poisons in the
    support mixture's tail that the core's directions do not reach; the core's: the other source classes' poisons,
    where that tail bends the whole set's directions). Given the label's held-out controls (``control_features``,
    their head inputs centred as ``features``), the additions are then held to ``fdr`` by them (:func:`decoy_cut`),
    whose estimate is the share reported. Unchanged when no group was found or there are no features."""
    if decision["support_cut"] is None or features is None or eligible is None:
        return decision
    candidates = eligible.nonzero().flatten()
    members = torch.zeros(eligible.shape, dtype=torch.bool)
    members[decision["flagged"]] = True
    added, shares = torch.zeros(candidates.shape, dtype=torch.bool), []
    features = features.double().cpu()  # once for both fits
    found = [representation_cut(features, members[candidates], fdr)]
    if support is not None:
        core = (support.double().cpu() >= decision["support_cut"]) & eligible
        if decision.get("by_point") is not None and getattr(coherence, "by_point", None) is not None:
            core |= coherence.by_point.first.cpu() & eligible
        found.append(grown_group(features, core[candidates], fdr))
    for group, share in filter(None, found):
        added |= group & ~members[candidates]
        shares.append(share)
    held = decoy_cut(features, members[candidates], added, control_features, fdr)
    if held is not None:
        added, shares = held[0], [held[1]]
    if not bool(added.any()):
        return decision
    members[candidates[added]] = True
    return {**decision, "flagged": members.nonzero().flatten().to(torch.int64),
            "representation": (int(added.sum()), max(shares))}


def _lowest_estimate(stat: torch.Tensor, mstat: torch.Tensor, scale: float = 1.0) -> float:
    if not bool((stat >= 0).any()):
        return 1.0
    _, above, mirror_above = _counts(stat, mstat)
    return min(1.0, float(((1 + mirror_above.double()) * scale / above.double()).min()))


def _count_names(names: list[list[str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in names:
        for nm in row:
            counts[nm] = counts.get(nm, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------------
# the detector


def _channel_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (min, max) of a batch (B, C, ...): float64 CPU (C,) each."""
    flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
    return flat.amin(1).cpu(), flat.amax(1).cpu()


def _peek_inputs(loader, limit: int = _RANGE_SAMPLE):
    """(shape of one input, per-channel min (C,), per-channel max (C,), the first batch's first 8 inputs as they
    come) over the first ``limit`` training inputs (for inputs that are not images (C, H, W): one channel, the range
    of every value), or None when the loader cannot be read that way (the engine may take something else). Integer
    inputs (token ids, uint8 images) count as their values."""
    if loader is None or isinstance(loader, (str, bytes)) or not hasattr(loader, "__iter__"):
        return None
    from deltainf.data.loaders import in_dataset_order

    loader = in_dataset_order(loader)  # a shuffling loader's first inputs would differ from run to run
    lo = hi = shape = first = None
    seen = 0
    try:
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor) or x.is_complex() or x.dtype == torch.bool or x.ndim < 2:
                return None
            shape = tuple(x.shape[1:])
            first = x[:8] if first is None else first
            if x.numel():
                blo, bhi = _channel_range(x if x.ndim >= 4 else x.reshape(1, 1, -1))
                lo = blo if lo is None else torch.minimum(lo, blo)
                hi = bhi if hi is None else torch.maximum(hi, bhi)
            seen += x.shape[0]
            if seen >= limit:
                break
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return None if shape is None else (shape, lo, hi, first)


def _label_source(own: torch.Tensor, source: str, thin: bool = False) -> str:
    """Where one label's controls came from (``own``: their training positions, -1 for held-out inputs), when the
    run's ``source`` mixes held-out and training controls: a reference can cover one label and not another, or hold
    too few of it for the outranking test (``thin``: its held-out controls decided first)."""
    if not own.numel():
        return "none"
    if "+" not in source:
        return source
    if bool((own >= 0).all()):
        return ("training set (the reference held too few of this label for the outranking test, and they found no "
                "group)" if thin else "training set (the reference held none of this label)")
    return "reference" if bool((own < 0).all()) else source


def _labelled_some(train_labels: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor | None:
    """``train_labels``, after a warning when no training example carries an affected label (any one of several):
    nothing can then be flagged for it (with candidates="label"), and the verdict's "no coherent poison set" would
    not say why."""
    if train_labels is not None:
        absent = sorted(set(y.tolist()) - set(torch.unique(train_labels).tolist()))
        if absent:
            some = "" if len(absent) == len(set(y.tolist())) else f" of the affected labels {sorted(set(y.tolist()))}"
            warnings.warn(f"train_loader: no training example is labelled {absent}{some} (the affected label(s)), so "
                          "none can be flagged for it; were the training labels remapped?", stacklevel=4)
    return train_labels


def _check_integer_images(model: torch.nn.Module, x: torch.Tensor) -> None:
    """ValueError when the training images ``x`` (a few, as the loader yields them) are integers (uint8) and the
    model gives other outputs for them than for the same values as floats (a model that rescales integer inputs
    only, as torchvision's ToDtype(scale=True) does): the transformed copies and the controls reach it as floats, so
    the influence would compare two scales (a reference of uint8 images: 44 clean examples flagged where 33 were, and
    a misleading "does not predict")."""
    if x.ndim != 4 or x.is_floating_point() or not x.shape[0]:  # _peek_inputs took no bool or complex inputs
        return
    try:
        as_integers = model_logits(model, x, where="train_loader images")
    except ValueError:  # a model that cannot take integers does not rescale them (an engine converts the batches)
        return
    as_floats, again = (model_logits(model, x.float(), where="train_loader images") for _ in range(2))
    scale = float(as_integers.abs().max().clamp_min(1e-12))
    if not torch.allclose(as_floats, again, rtol=1e-3, atol=1e-4 * scale):
        return  # a model that answers at random (dropout kept on): the two kinds of input cannot be compared
    if not torch.allclose(as_integers, as_floats, rtol=1e-3, atol=1e-4 * scale):
        raise ValueError(f"train_loader: its images are {str(x.dtype).removeprefix('torch.')}, and the model gives "
                         "other outputs for them than for the same values as floats (it rescales integer inputs "
                         "itself?); the transformed copies and the controls reach it as floats: give the training "
                         "images as floats (ToDtype(torch.float32, scale=True) in the dataset), or a model that "
                         "treats both alike")


def _warn_other_model(model, scored) -> None:
    """Warn when ``model`` (checks, controls, representations) shares no parameter with the model the engine scores
    with: the two halves of a detection would then describe different networks."""
    if not isinstance(model, torch.nn.Module) or not isinstance(scored, torch.nn.Module) or model is scored:
        return
    ours = {p.data_ptr() for p in model.parameters()}
    if ours and ours.isdisjoint(p.data_ptr() for p in unwrapped(scored).parameters()):
        warnings.warn("model: not the model the engine was fitted on (no parameter in common); influence comes from "
                      "the engine's model, the prediction check, controls and representations from this one",
                      stacklevel=3)


class DeltaInfluence:
    """Δ-Influence detector over an influence engine.

    Args:
        ekfac: the influence engine, fitted: a :class:`deltainf.influence.Scorer` (``deltainf.EKFAC``,
            ``TRAKScorer``), or any object whose ``score(query_x (Q, ...), query_y int64 (Q,), train_loader)
            -> (Q, N)`` has column i = dataset position i and positive = "supports the query label".
        n_transforms: copies per affected point, >= 1 (paper: 50).
        threshold: ΔInfl below this counts as a vote (paper: 0 or -40), or "auto" for a per-point
            threshold ``-AUTO_THRESHOLD_SCALE * median |ΔInfl|`` (see :func:`auto_thresholds`).
        tolerance: None (default) calibrates the cut on the run itself (module docstring); an int
            0 <= tolerance < n_transforms applies the paper's fixed rule instead (flag at n - tolerance
            votes per point; pooled: P * (n - tolerance) in total).
        fdr: the false-discovery rate the calibrated cut may not exceed, in (0, 1).
        seed: seeds transform choices, labels and parameters (point p's copies depend on (seed, p) only).
        domain: "pixel" (transforms act on pixel images in [0, 1]) or "normalized" (the paper's: on the
            mean/std-standardised image).
        mean, std: per-channel statistics for the normalized domain; by default read from the model's
            normalisation module (``model.normalize`` or a module named ``Normalize``), else from
            ``pixel_map`` when it is a standardisation.
        pixel_map: how the model's inputs relate to pixel images: None (default) = inputs within [0, 1]
            are pixels and others are mapped back from their per-channel range; ``(mean, std)`` = your
            data pipeline feeds the model ``(pixel - mean) / std``; or a ``transforms.PixelMap``.
        pool: transform names or callables ``t(x, generator) -> x'`` (default: the paper's seven), or one
            callable. Transforms receive pixel images, your callables too (through ``pixel_map``: pass
            ``transforms.PixelMap.identity(C)`` for 4-D inputs that are not pixels, e.g. spectrograms, to give
            them the inputs as the model takes them); for inputs that are not images (C, H, W) pass your own
            callables, which then receive the inputs as the model takes them (integers, e.g. token ids, too).
        labels: label rule for the copies: "replace" (paper), "distinct" or "keep" (image-only ablation).
        combine: how P affected points combine: "pooled" (votes summed over the points), or the
            per-point counts' "any" (largest), "all" (smallest), "majority" or an int m (m-th largest).
            All agree for P = 1.
        n_controls: controls per affected label (module docstring): held-out inputs when :meth:`detect`
            gets reference data, else training examples (twice as many are scored, and those the points'
            group supports set aside: :func:`screen_training_controls`); 0 = no controls (the mirror alone
            decides).
        num_classes: K; by default the model's number of outputs.
        model: the classifier; by default the scorer's ``model``. Used to check the affected points'
            predictions, to find num_classes and the normalisation statistics.
        check_prediction: raise if the model does not predict test_y_adv for an affected point
            (needs a model; skipped when there is none).
        keep_scores: keep the raw (P, 1 + n, N) scores in the result (for :meth:`DetectionResult.revote`).
        progress: show a progress bar while building the queries.
        score_file: for large training sets, a .npy path the engine writes the (Q, N) scores to as a
            memory-mapped file (``deltainf.EKFAC.score(out=...)``); the vote and the summaries then read it
            in column blocks and the kept raw scores are a view of it, so memory does not grow with Q x N.
        candidates: "label" (default): only training examples labelled with an affected label can be
            flagged (module docstring); "all": any example (the labels are then never read). With "all" the
            estimated false-discovery rate is not calibrated: the affected points differ from their controls in
            their source images as well as in the trigger, so the examples of the source classes are not
            exchangeable under the null (a 40-poison BadNet on digits: estimate 0.17 for a true rate of 0.71
            among 126 flagged in one seed, 0.10 for 0.15 in another).
        permutations: re-splits of points and controls behind the coherence test's null (at least 20).
        boundary: where the flagged group ends once the coherence test has found one: "representation"
            flags the candidates above :func:`mixture_cut` and those whose representation lies with
            the group's (:func:`representation_cut`; needs the model, and one forward pass over the training
            set); "mixture" the former only; "coherence" keeps the permutation cut (fewer false positives, a
            lower recall where the group has a tail of modest support). With each, the candidates past the mirror
            cut of the votes are flagged too (``mirror_added``). None (default): "representation", or "coherence"
            for a model of two classes, whose labels are made of several modes that the other two take whole
            (:func:`resolve_boundary`; the result's settings hold the one used).
        retrace: when a group is found from fewer affected points of a label than this, its flagged members that
            support the points most (by control support, and classified as the label) are traced as further
            affected points, up to this many points in all, and the detection is run again on them with the
            user's points, its training controls drawn outside the first group. When it finds a group, its result
            replaces the first (``settings["retraced"]``: the members' dataset positions) and the flagged set is
            both passes' (a :meth:`DetectionResult.revote` redecides the second's votes alone). One point reaches
            the poisons made like itself, and with a warping or a blend on a ViT-like model their representation
            does not reach the rest; the members found are inputs carrying the trigger, and each reaches its own.
            0 or 1: never (the detection then costs one scoring pass, not two).
    """

    def __init__(self, ekfac, n_transforms: int = DEFAULT_N_TRANSFORMS, threshold=DEFAULT_THRESHOLD,
                 tolerance: int | None = None, fdr: float = DEFAULT_FDR, seed: int = 0, domain: str = DEFAULT_DOMAIN,
                 mean=None, std=None, pixel_map=None, pool: Sequence = DEFAULT_POOL, labels: str = "replace",
                 combine=DEFAULT_COMBINE, n_controls: int = DEFAULT_N_CONTROLS, num_classes: int | None = None,
                 model: torch.nn.Module | None = None, check_prediction: bool = True, keep_scores: bool = True,
                 progress: bool = False, score_file: str | os.PathLike | None = None,
                 candidates: str = DEFAULT_CANDIDATES, permutations: int = DEFAULT_PERMUTATIONS,
                 boundary: str | None = None, retrace: int = DEFAULT_RETRACE):
        n_transforms, tolerance, fdr, threshold, seed, n_controls, num_classes, permutations, retrace = (
            plain_number(v) for v in (n_transforms, tolerance, fdr, threshold, seed, n_controls, num_classes,
                                      permutations, retrace))
        self._check_settings(n_transforms=n_transforms, seed=seed, domain=domain, mean=mean, std=std, labels=labels,
                             combine=combine, n_controls=n_controls, num_classes=num_classes, candidates=candidates,
                             permutations=permutations, boundary=boundary, retrace=retrace)
        if not callable(getattr(ekfac, "score", None)):
            raise TypeError("ekfac must have a score(query_x, query_y, train_loader) method, got "
                            f"{type(ekfac).__name__}")
        if score_file is not None:
            if not isinstance(score_file, (str, os.PathLike)) or not os.fspath(score_file).endswith(".npy"):
                raise ValueError(f"score_file: expected a path ending in .npy, got {score_file!r}")
            from deltainf._files import output_file

            output_file(score_file, "score_file")
            if "out" not in inspect.signature(ekfac.score).parameters:
                raise TypeError(f"score_file: the engine {type(ekfac).__name__} cannot write its scores to a file "
                                "(its score() has no `out` argument, as deltainf.EKFAC's has)")
        self.ekfac = ekfac
        self.n_transforms = n_transforms
        self.threshold = _check_threshold(threshold)
        self.tolerance = resolve_tolerance(tolerance, n_transforms)
        self.fdr = _check_fdr(fdr)
        self.seed = seed
        self.domain = domain
        self.pool = resolve_pool(pool)
        # distinct callables of the user's under one name (a built-in named twice is a weighting, not a clash)
        names = Counter(transform_name(t) for t in {id(t): t for t in self.pool
                                                   if not isinstance(t, Transform)}.values())
        shared = sorted(name for name, count in names.items() if count > 1)
        if shared:  # the result's transform names and counts would merge them
            warnings.warn(f"pool: several transforms share the name(s) {shared}; the result reports them as one "
                          "(give each a name: a def, or a .name attribute)", stacklevel=2)
        self.labels = labels
        self.combine = combine
        self.n_controls = n_controls
        self.num_classes = num_classes
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected the classifier (an nn.Module) or None, got {type(model).__name__}")
        self.model = unwrapped(model) if model is not None else (ekfac.model if isinstance(ekfac, Scorer) else None)
        _warn_other_model(self.model, getattr(ekfac, "model", None))
        self.check_prediction = check_bool("check_prediction", check_prediction)
        self.keep_scores = check_bool("keep_scores", keep_scores)
        self.progress = check_bool("progress", progress)
        self.score_file = score_file
        self.candidates = candidates
        self.permutations = permutations
        self.boundary = boundary
        self.retrace = retrace
        self.pixel_map = _as_pixel_map(pixel_map)
        self.mean = self.std = None
        if mean is not None:
            try:
                self.mean = torch.as_tensor(mean, dtype=torch.float64).flatten().tolist()
                self.std = torch.as_tensor(std, dtype=torch.float64).flatten().tolist()
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"mean, std: expected per-channel numbers, got {mean!r} and {std!r}") from None
            if any(not s > 0 for s in self.std):
                raise ValueError(f"std must be positive, got {self.std}")
            # NaN was blamed on the first transform, an infinite std on the queries' measurement
            if not all(math.isfinite(v) for v in self.mean + self.std):
                raise ValueError(f"mean, std: expected finite numbers, got {self.mean} and {self.std}")
            if domain == "pixel" and self.pixel_map is None:
                warnings.warn("mean, std: they set the domain='normalized' transforms' standardisation, not how your "
                              "inputs relate to pixels; for inputs your pipeline standardised pass pixel_map=(mean, "
                              "std)", stacklevel=2)
        elif domain == "normalized":
            stats = _find_normalization(self.model)
            if stats is None and self.pixel_map is not None and self.pixel_map.source != "identity":
                stats = (list(self.pixel_map.offset), list(self.pixel_map.scale))
            if stats is None:
                raise ValueError("domain='normalized' needs the per-channel mean and std of the input "
                                 "normalisation: pass mean=..., std=..., pixel_map=(mean, std) for a pipeline that "
                                 "standardises, or a model with a `normalize` module, or use domain='pixel'")
            self.mean, self.std = stats

    @staticmethod
    def _check_settings(*, n_transforms, seed, domain, mean, std, labels, combine, n_controls, num_classes,
                        candidates, permutations, boundary, retrace) -> None:
        """The checks of the settings that need no engine and are not normalised on the way (threshold, tolerance
        and fdr are, by the constructor and by :meth:`check_settings`): ValueError / TypeError naming the
        parameter."""
        if candidates not in ("label", "all"):
            raise ValueError(f"candidates must be 'label' or 'all', got {candidates!r}")
        if boundary is not None and boundary not in _BOUNDARIES:
            raise ValueError(f"boundary must be one of {_BOUNDARIES} or None, got {boundary!r}")
        # the null's re-splits: a few give an estimate resting on a handful of draws (one re-split claimed a group),
        # and fewer than 19 cannot take the outranking test's p-value down to its level, 0.05
        if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < _MIN_PERMUTATIONS:
            raise ValueError(f"permutations must be an int >= {_MIN_PERMUTATIONS}, got {permutations!r}")
        if isinstance(n_transforms, bool) or not isinstance(n_transforms, int) or n_transforms < 1:
            raise ValueError(f"n_transforms must be an int >= 1, got {n_transforms!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
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
        if isinstance(n_controls, bool) or not isinstance(n_controls, int) or n_controls < 0:
            raise ValueError(f"n_controls must be an int >= 0, got {n_controls!r}")
        if isinstance(retrace, bool) or not isinstance(retrace, int) or retrace < 0:
            raise ValueError(f"retrace must be an int >= 0, got {retrace!r}")

    @classmethod
    def check_settings(cls, n_points: int | None = None, **settings) -> None:
        """Check ``settings`` (keyword arguments of the constructor, engine aside) as the constructor would, before
        there is an engine to build a detector on (the command line checks its flags before any training), and
        ``combine`` against ``n_points`` affected inputs when that is known. ValueError / TypeError naming the
        parameter."""
        params = inspect.signature(cls.__init__).parameters
        settings = {k: plain_number(v) for k, v in settings.items()}
        unknown = sorted(set(settings) - set(params) - {"self", "ekfac"})
        if unknown:
            raise TypeError(f"{', '.join(unknown)}: not a setting of DeltaInfluence")
        needed = inspect.signature(cls._check_settings).parameters
        cls._check_settings(**{k: settings.get(k, params[k].default) for k in needed})
        resolve_tolerance(settings.get("tolerance"), settings.get("n_transforms", params["n_transforms"].default))
        _check_threshold(settings.get("threshold", params["threshold"].default))
        _check_fdr(settings.get("fdr", params["fdr"].default))
        if n_points is not None:
            _rank(settings.get("combine", params["combine"].default), n_points)

    def settings(self) -> dict[str, Any]:
        """The detector's settings, JSON-friendly."""
        return {
            "n_transforms": self.n_transforms,
            "threshold": self.threshold,
            "tolerance": self.tolerance,
            "fdr": None if self.tolerance is not None else self.fdr,
            "fdr_setting": self.fdr,  # what the calibrated cut would use (a revote to tolerance=None)
            "seed": self.seed,
            "domain": self.domain,
            "mean": self.mean,
            "std": self.std,
            "pixel_map": None if self.pixel_map is None else self.pixel_map.as_dict(),
            "pool": [transform_name(t) for t in self.pool],
            "labels": self.labels,
            "combine": self.combine,
            "n_controls": self.n_controls,
            "num_classes": self.num_classes,
            "check_prediction": self.check_prediction,
            "auto_threshold_scale": AUTO_THRESHOLD_SCALE if self.threshold == "auto" else None,
            "engine": type(self.ekfac).__name__,
            "candidates": self.candidates,
            "boundary": self.boundary,
            "permutations": self.permutations,
            "retrace": self.retrace,
        }

    def _agree_across_ranks(self) -> None:
        """Under torchrun, a ValueError on every rank unless every rank runs with the same settings: the decision
        ones (fdr, threshold, tolerance, combine, candidates, boundary) act after the scores are gathered, so ranks
        that differed returned different flagged sets without a word."""
        from deltainf import _dist

        params = [] if self.model is None else list(self.model.parameters())
        _, world = _dist.group(params[0].device if params else None)
        _dist.agree(to_jsonable(self.settings()), world, "every rank must run Δ-Influence with the same settings")

    @property
    def _image_pool(self) -> bool:
        return is_image_pool(self.pool) or self.domain == "normalized"

    def _validate_points(self, test_x, test_y_adv, example_shape) -> tuple[torch.Tensor, torch.Tensor]:
        test_x, test_y_adv = (torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in (test_x, test_y_adv))
        if not isinstance(test_x, torch.Tensor):
            raise TypeError(f"test_x must be a tensor or a numpy array (one input, e.g. (C, H, W), or P inputs), got "
                            f"{type(test_x).__name__}")
        test_x = test_x.detach()
        given = tuple(test_x.shape)
        if test_x.dtype == torch.bool or test_x.is_complex():
            raise TypeError(f"test_x must be a floating-point or integer tensor, got dtype {test_x.dtype}")
        if example_shape is not None and tuple(test_x.shape) == tuple(example_shape):
            test_x = test_x.unsqueeze(0)
        elif example_shape is None and test_x.ndim == 3:
            test_x = test_x.unsqueeze(0)
        if not test_x.is_floating_point() and (self._image_pool or test_x.ndim == 4):
            test_x = test_x.float()  # integer images (uint8 0-255): the transforms work on their values as floats
        # else integers (token ids) reach the user's own transforms, and the model, as integers
        if example_shape is not None and tuple(test_x.shape[1:]) != tuple(example_shape):
            raise ValueError(f"test_x has shape {tuple(test_x.shape)}, but the training inputs have shape "
                             f"{tuple(example_shape)}: pass one input of that shape or (P, *shape)")
        if self._image_pool and test_x.ndim != 4:
            builtin = [transform_name(t) for t in self.pool if is_image_pool([t])]
            why = f"the built-in image transforms in pool ({', '.join(builtin)})" if builtin else "domain='normalized'"
            hint = "; images without a channel dimension need one: (P, 1, H, W)" if test_x.ndim == 3 else ""
            raise ValueError(f"test_x must have shape (C, H, W) or (P, C, H, W) for {why}, got {given}; for inputs "
                             f"that are not images pass pool=... with your own transforms t(x, generator) -> x' "
                             f"only{hint}")
        if test_x.ndim < 2 or test_x.shape[0] == 0 or min(test_x.shape[1:]) < 1:
            raise ValueError(f"test_x must hold at least one non-empty input, got shape {given}")
        if test_x.is_floating_point() and not bool(torch.isfinite(test_x).all()):
            bad = (~torch.isfinite(test_x)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(f"test_x: affected input(s) {bad[:8]} hold NaN or infinite values")
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
            if y.numel() == 1 and p > 1:  # as a one-element tensor is
                y = y.expand(p).clone()
            if y.numel() != p:
                raise ValueError(f"test_y_adv must hold one label per affected point ({p}), got {len(test_y_adv)}")
        else:
            raise TypeError(f"test_y_adv must be an int, a sequence of ints or an int64 tensor, got {test_y_adv!r}")
        if bool((y < 0).any()):
            raise ValueError(f"test_y_adv must be non-negative class indices, got {y.tolist()}")
        if self.mean is not None and test_x.ndim == 4 and len(self.mean) not in (1, test_x.shape[1]):
            raise ValueError(f"mean/std have {len(self.mean)} values but test_x has {test_x.shape[1]} channels")
        return test_x, y

    def _resolve_pixel_map(self, test_x: torch.Tensor, peek) -> PixelMap | None:
        """The map to pixel images for image inputs (None for other inputs: the pool gets them as they are)."""
        if test_x.ndim != 4:
            if self.pixel_map is not None:
                warnings.warn(f"pixel_map: ignored for inputs of shape {tuple(test_x.shape[1:])}, which are not "
                              "images (C, H, W); the pool gets them as they are", stacklevel=4)
            return None
        c = test_x.shape[1]
        if self.pixel_map is not None:
            if len(self.pixel_map.offset) not in (1, c):
                raise ValueError(f"pixel_map has {len(self.pixel_map.offset)} channels but test_x has {c}")
            pixels = self.pixel_map.to_pixel(test_x)
            lo, hi = float(pixels.min()), float(pixels.max())
            if (lo < -0.5 or hi > 1.5) and self._image_pool:  # half the pixel range beyond black or white
                warnings.warn(f"pixel_map: it takes the affected inputs to values in [{lo:.3g}, {hi:.3g}], far "
                              "outside pixel images [0, 1]; check the (mean, std) given (of the [0, 1] pixels the "
                              "pipeline standardised?)", stacklevel=4)
            elif peek is not None and peek[1] is not None and peek[1].numel() == c and self._image_pool:
                # images reach near black and near white: a map under which the training images span a small
                # part of [0, 1] is not theirs (a model's own normalisation given as the pipeline's: [0.31, 0.63])
                train = self.pixel_map.to_pixel(torch.stack([peek[1], peek[2]]).view(2, c, 1, 1).to(test_x.dtype))
                t_lo, t_hi = float(train.amin()), float(train.amax())
                if t_hi - t_lo < 0.5:
                    warnings.warn(f"pixel_map: it takes the training images to values in [{t_lo:.3g}, {t_hi:.3g}], "
                                  "a small part of pixel images [0, 1]; the transformed copies will not look like "
                                  "the data. Pass the (mean, std) the data pipeline standardised with, or leave "
                                  "pixel_map out (inputs in [0, 1], or a model that normalises inside itself)",
                                  stacklevel=4)
            return self.pixel_map
        lo, hi = _channel_range(test_x)
        if peek is not None and peek[1] is not None and peek[1].numel() == c:
            lo, hi = torch.minimum(lo, peek[1]), torch.maximum(hi, peek[2])
        return PixelMap.estimate(lo, hi)

    def build_queries(self, test_x: torch.Tensor, test_y_adv: torch.Tensor, num_classes: int,
                      pixel_map: PixelMap | None = None):
        """All P * (1 + n) queries: for each point p, the original (x_p, y_p) followed by its n copies.

        test_x (P, ...) model inputs, test_y_adv int64 (P,); ``pixel_map`` takes image inputs to pixel
        images for the transforms and back (None: identity). Returns (qx (P*(1+n), ...), qy int64
        (P*(1+n),), names: P lists of n transform names, labels int64 (P, n))."""
        p = test_x.shape[0]
        root = torch.Generator().manual_seed(self.seed)
        point_seeds = torch.randint(0, 2**62, (p,), generator=root).tolist()
        qx, qy, names, labels = [], [], [], []
        for k in progress_bar(range(p), self.progress, desc="Δ-Influence queries"):
            x = test_x[k] if pixel_map is None else pixel_map.to_pixel(test_x[k])
            xs, ys, nm = make_transformed_queries(
                x, int(test_y_adv[k]), self.n_transforms, num_classes, seed=point_seeds[k],
                domain=self.domain, pool=self.pool, mean=self.mean, std=self.std, labels=self.labels)
            if pixel_map is not None:
                xs = pixel_map.from_pixel(xs).to(test_x.dtype)
            qx += [test_x[k:k + 1], xs]
            qy += [test_y_adv[k:k + 1], ys]
            names.append(nm)
            labels.append(ys)
        return torch.cat(qx), torch.cat(qy), names, torch.stack(labels)

    @keeps_global_rng
    def detect(self, train_loader, test_x: torch.Tensor, test_y_adv, reference=None) -> DetectionResult:
        """Find the training examples responsible for the affected prediction(s).

        Args:
            train_loader: the training data as the engine expects it (yielding (x, y) or (x, y, index)).
            test_x: affected test input(s) as the model takes them: one input (e.g. (C, H, W)) or P of them.
            test_y_adv: adversarial label(s) the model predicts: an int (same for all points) or (P,) ints.
            reference: held-out labelled inputs the model was not trained on (e.g. the test set): a tuple
                (x, y) of tensors, a map-style dataset yielding (x, y, ...) or a DataLoader over one. For
                each affected label the first ``n_controls`` of them the model classifies correctly
                become controls (module docstring; where too few are left for the outranking test and they
                find nothing, training examples decide, with a warning); recommended, since without them a model
                whose whole predicted class loses influence under relabelling cannot be told from a poisoned one.

        Returns:
            :class:`DetectionResult`; ``.flagged`` are positions in the training dataset, ``.verdict``
            says whether a poison set was found and how sure the run is. When it was traced again from the group's
            members (``retrace``), its per-point fields hold the user's points first, then the members'.
        """
        # every warning is the caller's, said once: the second pass of a detection traced again meets the same
        # conditions as the first, and its warnings would repeat them from inside the library
        said = []
        try:
            with warnings.catch_warnings(record=True) as said:
                return self._detect(train_loader, test_x, test_y_adv, reference, retrace=True, shared={})
        finally:
            for message in dict.fromkeys((w.category, str(w.message)) for w in said):
                warnings.warn(message[1], message[0], stacklevel=3)

    def _detect(self, train_loader, test_x, test_y_adv, reference, retrace: bool,
                suspects: torch.Tensor | None = None, shared: dict | None = None) -> DetectionResult:
        """:meth:`detect`, traced again from the group's members when ``retrace``; ``suspects``: dataset positions
        that may not be training controls (the group a first pass flagged); ``shared``: the candidates' head inputs
        the passes of one detection share (:meth:`_features`)."""
        t_start = time.perf_counter()
        self._agree_across_ranks()
        peek = _peek_inputs(train_loader)
        if self._image_pool and self.model is not None and peek is not None:
            _check_integer_images(self.model, peek[3])
        test_x, y = self._validate_points(test_x, test_y_adv, None if peek is None else peek[0])
        test_x, y = _distinct_points(test_x, y)
        check_scale("test_x", test_x, _train_range(peek))
        p = test_x.shape[0]
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        k = self._num_classes(test_x, y)
        _rank(self.combine, p)  # an int combine must not exceed the number of points
        pixel_map = self._resolve_pixel_map(test_x, peek)
        controls, own, source, set_aside, modes, thin = self._controls(train_loader, reference, test_x, y, peek, k,
                                                                       suspects)
        screen = not _modal_labels(modes)
        if controls is not None:  # each label is decided on its own points
            fewest = min(int((y == label).sum()) for label in set(y.tolist()))
            if isinstance(self.combine, int) and self.combine > fewest:
                raise ValueError(f"combine={self.combine}: with controls each affected label is decided on its own "
                                 f"points, and one label has only {fewest}")
        timings["check"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        _check_reproducible(self.pool, test_x[0] if pixel_map is None else pixel_map.to_pixel(test_x[:1])[0])
        qx, qy, names, labels = self.build_queries(test_x, y, k, pixel_map)
        _check_copies_scale(qx, p, self.n_transforms, self.pool, _train_range(peek))
        if controls is not None:
            qx, qy = torch.cat([qx, controls[0].to(qx.dtype)]), torch.cat([qy, controls[1]])
        timings["transform"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        to_file = {"out": self.score_file} if self.score_file is not None else {}
        with named_as({"out:": "score_file:"}):
            scores = _checked_scores(self.ekfac.score(qx, qy, train_loader, **to_file), qx.shape[0])  # ONE pass
        timings["scoring"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        n_query = p * (1 + self.n_transforms)
        s = scores[:n_query].reshape(p, 1 + self.n_transforms, scores.shape[1])
        base, transformed = s[:, 0], s[:, 1:]
        thresholds = _resolve_thresholds(self.threshold, base, transformed)
        votes, mirror = _vote(base, transformed, thresholds)
        base_cpu = base.detach().float().cpu().clone()  # not a view of a score file the raw scores map
        summary = DeltaSummary.from_scores(base_cpu, transformed.detach().cpu())
        boundary = resolve_boundary(self.boundary, k)
        settings = {**self.settings(), "num_classes": k, "controls": source, "boundary": boundary,
                    "pixel_map": None if pixel_map is None else pixel_map.as_dict()}
        if modes is not None:
            settings.update(labels_split=list(modes), controls_screened=screen)
        points = dict(votes=votes, mirror_votes=mirror, base_scores=base_cpu, delta=summary, thresholds=thresholds,
                      test_y_adv=y, query_labels=labels, transforms=names)
        if controls is None:  # the mirror alone decides, over all the points at once
            train_labels = _labelled_some(self._training_labels(train_loader, scores.shape[1]), y)
            eligible = None if train_labels is None else torch.isin(train_labels, y.cpu())
            decision = _decide(votes, mirror, self.n_transforms, self.combine, self.tolerance, self.fdr,
                               eligible=eligible)
            result = DetectionResult(**points, **decision, eligible=eligible, timings=timings, raw_scores=self._kept(s),
                                     settings={**settings, "n_controls": 0, "controls_set_aside": set_aside,
                                               "controls_wanted": self.n_controls})
        else:
            train_labels = _labelled_some(self._training_labels(train_loader, scores.shape[1]), y)
            # the influence screen reads the controls over the candidates of every affected label: over its own
            # label's alone, a mode of a poison-free label that misclassified inputs resemble passes for a poison
            # group (docs/RESULTS.md, "Several affected labels")
            screen_columns = None if train_labels is None else torch.isin(train_labels, y.cpu())
            outrank_level = _label_level(y)
            decisions, label_settings = {}, {}
            point_rows = {label: _rows_of(y, label) for label in sorted(set(y.tolist()))}
            # with training controls the candidates' head inputs are read before the decision, to set aside the
            # controls inside the group (grown_controls): once for every affected label, reused by the
            # representation step
            read = screen and screen_columns is not None and bool((own >= 0).any())
            features = self._features(train_loader, screen_columns, shared) if read else None
            held_out = {}  # label -> the inputs of the held-out controls its decision used
            for label, chosen in point_rows.items():
                eligible = None if train_labels is None else train_labels == label
                tries = [_rows_of(controls[1], label)]
                if label in thin:  # held-out controls first; too few for the test, training controls where they fail
                    rows = (controls[1] == label).nonzero().flatten()
                    tries = [rows[own[rows] < 0], rows[own[rows] >= 0]]
                for rows in tries:
                    label_own = _take(own, rows)
                    mine = None if features is None or not bool((label_own >= 0).any()) else \
                        features[0][eligible[screen_columns]]
                    decisions[label], label_settings[label] = self._decide_label(
                        _take(base, chosen), _take(votes, chosen), _take(mirror, chosen), _take(y, chosen),
                        _take(scores[n_query:], rows), _take(controls[1], rows), label_own, eligible, screen_columns,
                        boundary, outrank_level, _mirror_cut_applies(k), mine, screen)
                    label_settings[label]["controls"] = _label_source(label_own, source, label in thin)
                    held_out[label] = _take(controls[0], rows)[label_own < 0]
                    if decisions[label]["flagged"].numel():
                        break
            self._add_representations(train_loader, decisions, boundary, held_out,
                                      (screen_columns, features) if read else None, shared)
            per_label = {label: DetectionResult(**_points_of(points, point_rows[label]), **decision, timings={},
                                                settings={**settings, **label_settings[label]})
                         for label, decision in decisions.items()}
            set_aside += sum(part.settings["controls_set_aside"] for part in per_label.values())
            settings.update(n_controls=sum(part.settings["n_controls"] for part in per_label.values()),
                            controls_set_aside=set_aside, outrank_level=outrank_level)
            result = _merged(per_label, points, settings) if len(per_label) > 1 else next(iter(per_label.values()))
            result = dataclasses.replace(result, raw_scores=self._kept(s), settings=settings, timings=timings)
        timings["vote"] = time.perf_counter() - t0
        members = self._members_to_trace(train_loader, result, y) if retrace else None
        if members is not None:
            t0 = time.perf_counter()
            again = self._detect(train_loader, torch.cat([test_x, members[0].to(test_x.device, test_x.dtype)]),
                                 torch.cat([y, members[1].to(y.device)]), reference, retrace=False,
                                 suspects=result.flagged, shared=shared)
            timings["retrace"] = time.perf_counter() - t0
            if again.found:  # else the first group stands: the members traced support no group of their own
                # the second pass adds members: its training controls, drawn outside the first group, can hold
                # poisons the first pass's screens set aside, which hide those poisons again
                result = dataclasses.replace(again, flagged=torch.cat([result.flagged, again.flagged]).unique(),
                                             settings={**again.settings, "retraced": members[2].tolist(),
                                                       "first_flagged": int(result.flagged.numel())},
                                             timings={**timings, **{f"retrace_{k}": v
                                                                    for k, v in again.timings.items()}})
            else:
                result.settings["retraced_found_nothing"] = members[2].tolist()
        result.timings["total"] = time.perf_counter() - t_start  # (a second pass's result has timings of its own)
        return result

    def _members_to_trace(self, train_loader, result: DetectionResult, y: torch.Tensor):
        """The flagged training examples to trace as further affected points (``retrace``): for every label whose
        group was found from fewer than ``retrace`` points, its flagged members in descending order of control
        support that the model classifies as the label, up to ``retrace`` points with the label's own. (x as the
        loader yields them, labels int64, dataset positions int64), or None when there is none to add."""
        from deltainf._util import in_eval_mode

        parts = result.per_label if result.per_label is not None else {int(y[0]): result}
        needs = {label: self.retrace - int((y == label).sum()) for label in parts}
        wanted: dict[int, list[int]] = {}
        for label, part in parts.items():
            need = needs[label]
            if need <= 0 or not part.found or part.control_support is None:
                continue
            flagged = part.flagged.cpu()
            support = part.control_support.double().cpu()[flagged]
            keep = ~torch.isnan(support)
            # descending support, ties by position (flagged is sorted): a stable sort of the negated support
            order = torch.sort(-support[keep], stable=True).indices
            wanted[label] = flagged[keep][order].tolist()[:_RETRACE_POOL * need]
        if not wanted:
            return None
        positions = {p for rows in wanted.values() for p in rows}
        inputs = {}
        for x, _, idx in _positioned(train_loader):  # stops once every member is read
            for k, p in enumerate(idx.tolist()):
                if p in positions:
                    inputs[p] = x[k].detach()
            if len(inputs) == len(positions):
                break
        xs, ys, ps = [], [], []
        for label, rows in wanted.items():
            rows = [p for p in rows if p in inputs]
            if not rows:
                continue
            x = torch.stack([inputs[p] for p in rows])
            if self.model is not None:  # a member the model does not predict as the label is no affected point
                pred = in_eval_mode(self.model, lambda b: model_logits(self.model, b, where="train_loader inputs"),
                                    x).argmax(1).cpu()
                rows, x = [p for p, ok in zip(rows, (pred == label).tolist()) if ok], x[pred == label]
            xs.append(x[:needs[label]])
            ys += [label] * min(needs[label], len(rows))
            ps += rows[:needs[label]]
        if not ps:
            return None
        return torch.cat(xs), torch.tensor(ys, dtype=torch.int64), torch.tensor(ps, dtype=torch.int64)

    def _decide_label(self, base: torch.Tensor, votes: torch.Tensor, mirror: torch.Tensor, y: torch.Tensor,
                      control_scores: torch.Tensor, control_labels: torch.Tensor, own: torch.Tensor,
                      eligible: torch.Tensor | None, screen_columns: torch.Tensor | None, boundary: str,
                      outrank_level: float = OUTRANK_LEVEL, mirror_cut: bool = True,
                      features: torch.Tensor | None = None, screen: bool = True
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The decision on the affected points of one label, against that label's controls and candidates (``eligible``,
        None = every example): (the :class:`DetectionResult` fields of the decision, the label's ``n_controls`` and
        ``controls_set_aside``). base (P, N), votes and mirror (P, N), y (P,) of the label; control_scores (C, N),
        control_labels (C,), own (C,) its controls (C may be 0: then the mirror decides); ``screen_columns``: the
        candidates the influence screen compares training controls over (None = all); ``outrank_level``: the outranking
        test's level; ``mirror_cut``: see :func:`_mirror_cut_applies`; ``features``: the ``eligible`` candidates' head
        inputs, for :func:`grown_controls` (None: not run); ``screen``: whether training controls that look like the
        points are set aside at all (not where the labels are several populations: :func:`labels_in_modes`). The
        representation boundary is added afterwards, for every label at once (:meth:`_add_representations`)."""
        set_aside = 0
        support = coherence = None
        if control_labels.numel():
            from_training = bool((own >= 0).any())
            if from_training:
                pool, drawn = (control_scores, control_labels, own), own  # every training control scored
                clear, set_aside = screen_training_controls(base, y, *pool, screen_columns) if screen else \
                    (torch.ones(drawn.shape, dtype=torch.bool), 0)
                control_scores, control_labels, own = _kept_controls(
                    *pool, _first_training(clear, drawn, self.n_controls))
                if screen and features is not None and eligible is not None:
                    support = control_support(base, y, control_scores, control_labels)
                    inside = grown_controls(support, drawn, eligible, features, self.fdr) & clear
                    if bool(inside.any()) and int((clear & ~inside & (drawn >= 0)).sum()) > 2:
                        set_aside += int(inside.sum())
                        control_scores, control_labels, own = _kept_controls(
                            *pool, _first_training(clear & ~inside, drawn, self.n_controls))
                        support = None  # against other controls now
            if support is None:
                support = control_support(base, y, control_scores, control_labels)
            coherence = coherence_curve(base, y, control_scores, control_labels, eligible, self.permutations,
                                        self.seed, support=support, weigh_lead=not from_training)
        decision = _decide(votes, mirror, self.n_transforms, self.combine, self.tolerance, self.fdr, support,
                           eligible, coherence, boundary, outrank_level, mirror_cut)
        fields = {**decision, "eligible": eligible, "coherence": coherence, "features": None,
                  "control_features": None,
                  # float64, as the cuts taken on it: in float32 an example on a cut fell below it when revoted
                  "control_support": support}
        return fields, {"n_controls": int(control_labels.numel()), "controls_set_aside": set_aside,
                        "outrank_level": outrank_level}

    def _add_representations(self, train_loader, decisions: dict[int, dict[str, Any]], boundary: str,
                             held_out: dict[int, torch.Tensor], read=None, shared: dict | None = None) -> None:
        """Adds to each label's decision (``decisions``: label -> the fields of :meth:`_decide_label`, changed in place)
        the candidates whose representation lies with its group (:func:`_add_representation`), held to the fdr by the
        label's held-out controls (:func:`decoy_cut`; ``held_out`` {label: the inputs of those its decision used}), with
        their ``features`` and the controls' ``control_features``. The head inputs of every label that found a group are
        read in one pass over the training set, unless ``read`` (bool (N,) candidates, the :meth:`_features` of them or
        None where they could not be read, which was said) holds them already (``shared``: of :meth:`_features`);
        :func:`candidate_features` centres them per label, so a label's rows are those it would get alone. Only with
        ``boundary="representation"``."""
        if boundary != "representation":
            return
        found = {label: d for label, d in decisions.items()
                 if d["support_cut"] is not None and d["eligible"] is not None}
        union = functools.reduce(torch.logical_or, (d["eligible"] for d in found.values())) if found else None
        if read is not None and union is not None and not bool((union & ~read[0]).any()):
            union, features = read
        else:
            features = self._features(train_loader, union, shared)
        if features is None:
            return
        features, means = features
        positions = union.nonzero().flatten()
        for label, d in found.items():
            mine = features[d["eligible"][positions]]
            x = held_out[label]
            controls = (_head_inputs(self.model, x).double() - means[label]).float() if x.shape[0] else None
            decisions[label] = {**_add_representation(d, mine, d["eligible"], self.fdr, d["control_support"],
                                                       d["coherence"], controls),
                                "features": mine, "control_features": controls}

    def _features(self, train_loader, eligible: torch.Tensor | None, shared: dict | None = None):
        """The head inputs of the ``eligible`` candidates and the label means they were centred by
        (:func:`_label_features`; None: no group was found, nothing to read), for the representation boundary and
        the screen of training controls inside the group; None when they cannot be read (a warning says why).
        ``shared``: a dict that keeps the last read for the same candidates, so that the second pass of a detection
        traced again (``retrace``) does not read the training set for them once more."""
        if eligible is None:
            return None
        if shared is not None and "eligible" in shared and torch.equal(shared["eligible"], eligible):
            return shared["features"]
        features = self._read_features(train_loader, eligible)
        if shared is not None:
            shared.update(eligible=eligible.clone(), features=features)
        return features

    def _read_features(self, train_loader, eligible: torch.Tensor):
        """:meth:`_features`, read from the training set."""
        if self.model is None:  # (training controls need the model: only the representation boundary gets here)
            warnings.warn("boundary='representation' needs the model to read the candidates' representations: pass "
                          "model=...; the group ends at the support mixture", stacklevel=5)
            return None
        try:
            return _label_features(self.model, train_loader, eligible)
        except TypeError as err:  # a model with no nn.Linear / nn.Conv2d head to read
            warnings.warn(f"the candidates' representations cannot be read ({err}): no representation boundary, and "
                          "no training control inside the group set aside by them", stacklevel=5)
            return None

    def _training_labels(self, train_loader, n_train: int) -> torch.Tensor | None:
        """The training labels that make an example a candidate (``candidates="label"``), or None when every
        example is one ("all", or labels that cannot be read: a warning says so)."""
        if self.candidates == "all":
            return None
        labels = training_labels(train_loader, n_train)
        if labels is None and train_loader is not None:  # None: an engine of the user's reads its own data
            warnings.warn("candidates='label': the training labels cannot be read from train_loader; every "
                          "example is a candidate", stacklevel=3)
        return labels

    def _kept(self, s: torch.Tensor) -> torch.Tensor | None:
        """The raw (P, 1 + n, N) scores the result keeps: none, a view of the score file, or a copy."""
        if not self.keep_scores:
            return None
        return s if self.score_file is not None else s.detach().cpu().clone()

    def _num_classes(self, test_x: torch.Tensor, y: torch.Tensor) -> int:
        """K, after checking that the model predicts test_y_adv (when it should) and that the labels fit."""
        k = self.num_classes
        n_logits = None
        if self.model is not None and self.check_prediction:
            n_logits = check_affected_prediction(self.model, test_x, y).shape[1]
        elif self.model is not None:
            n_logits = model_logits(self.model, test_x[:1], where="test_x").shape[1]
        if k is not None and n_logits is not None and k != n_logits:
            raise ValueError(f"num_classes={k}, but the model gives {n_logits} logits")
        k = k or n_logits
        if k is None:
            raise ValueError("cannot tell the number of classes: pass num_classes=... or a model")
        if bool((y >= k).any()):
            raise ValueError(f"test_y_adv must be in [0, {k}), got {y.tolist()}")
        return int(k)

    def _controls(self, train_loader, reference, test_x: torch.Tensor, y: torch.Tensor, peek,
                  num_classes: int, suspects: torch.Tensor | None = None) -> "_Controls":
        """The controls of the affected labels (:class:`_Controls`; ``inputs`` None when there are none: n_controls=0,
        or no model); training controls are not drawn from the dataset positions ``suspects``."""
        if not self.n_controls or (reference is None and (self.model is None or peek is None)):
            if reference is not None:
                warnings.warn("reference: not read, as n_controls=0 scores no controls; the mirror alone decides",
                              stacklevel=3)
            return _Controls(None, None, None, 0, None, {})
        parts = {}  # source -> (x, y, dataset positions)
        set_aside, modes = 0, None
        if reference is not None and (reference is train_loader or reference is getattr(train_loader, "dataset", 0)):
            warnings.warn("reference: it is the training data; the controls should be held-out inputs the model was "
                          "not trained on (a poison among them is an affected point in disguise): pass your test set, "
                          "or leave reference out for screened training controls", stacklevel=3)
        thin: dict[int, int] = {}
        if reference is not None:
            x, labels = pick_controls(self.model, reference, y, self.n_controls, exclude=test_x,
                                      train_range=_train_range(peek))  # which checks their shape against test_x
            if self.model is not None and peek is not None:
                thin = _too_few_to_test(labels, y, self.n_controls)
            if labels.numel():
                parts["reference"] = (x, labels, torch.full_like(labels, -1))
        missing = sorted(_uncovered(y, parts) + list(thin))
        if missing and self.model is not None and peek is not None:
            # e.g. a clean-label attack can leave the model misclassifying every held-out input of its class
            count = _CONTROL_DRAW * self.n_controls
            # one read of the training set for the controls' labels and those labels_in_modes examines
            examined = _examined_labels(num_classes, y.tolist())
            # an affected point that is a training example (a member traced again: ``retrace``) is no control of
            # its own label: its scores would be the point's
            read = _first_correct(self.model, _positioned(train_loader), torch.tensor(sorted(set(missing + examined))),
                                  _CONTROL_POOL * count, test_x, "train_loader inputs")
            if suspects is not None:  # a group found already: the screens need not find its members again
                flagged = set(suspects.tolist())
                read = [c for c in read if c[2] not in flagged]
            modes = labels_in_modes(self.model, train_loader, num_classes, y.tolist(), _CONTROL_POOL * count, read)
            (x, labels), positions, set_aside = training_controls(
                self.model, train_loader, torch.tensor(missing), count,
                points=None if _modal_labels(modes) else (test_x, y), read=read)
            if labels.numel():
                none = [label for label in missing if label not in thin]
                if reference is not None and none:
                    warnings.warn(f"controls: no correctly classified input of label(s) {none} in the reference; "
                                  "their controls come from the training set, where the poisons of a clean-label "
                                  "attack can be among them", stacklevel=3)
                if thin:
                    counts = ", ".join(f"{c} of label {label}" for label, c in thin.items())
                    warnings.warn(f"controls: the reference holds too few correctly classified inputs ({counts}) for "
                                  "the outranking test to reach its level with so few affected points of the label; "
                                  "where they find no group, training controls decide (pass more held-out data)",
                                  stacklevel=3)
                parts["training set"] = (x, labels, positions)
            missing = _uncovered(y, parts)
        if missing:
            warnings.warn(f"controls: no correctly classified input of label(s) {missing}; the affected points with "
                          "those labels are decided without controls", stacklevel=3)
        if not parts:
            return _Controls(None, None, None, 0, None, {})
        drawn = parts["training set"][1] if "training set" in parts else torch.empty(0, dtype=torch.int64)
        alone = sorted(label for label in set(y.tolist()) if int((drawn == label).sum()) == 1)
        if alone:  # a training control is not compared with itself: the label's example has no pair, NaN support
            warnings.warn(f"controls: one training control only for label(s) {alone} (a training control is not "
                          "compared with itself, so that example is compared with nothing): too few to tell a group "
                          "apart; pass reference=... with held-out inputs of the label", stacklevel=3)
        xs, labels, own = zip(*parts.values())
        # where the controls were looked for: the reference when given, the training set for what it lacked
        looked = (["reference"] if reference is not None else []) + [k for k in parts if k == "training set"]
        source = " + ".join(looked)
        return _Controls((torch.cat([x.to(xs[0].dtype) for x in xs]), torch.cat(labels)), torch.cat(own), source,
                         set_aside, modes if "training set" in parts else None, thin if "training set" in parts else {})


class _Controls(NamedTuple):
    """The controls :meth:`DeltaInfluence._controls` chose: ``inputs`` (x, y) of them; ``own`` (C,) the dataset
    positions of training controls, -1 for held-out ones; ``source`` where they were looked for ("reference",
    "training set" or both joined by " + "); ``set_aside`` how many training examples were set aside as poison-like;
    ``modes`` the (split, examined) labels of :func:`labels_in_modes` when controls came from the training set, else
    None; ``thin`` {label: held-out controls} for the labels whose held-out controls are too few for the outranking
    test (:func:`_too_few_to_test`), decided first with those and then, where they find nothing, with training ones."""
    inputs: tuple[torch.Tensor, torch.Tensor] | None
    own: torch.Tensor | None
    source: str | None
    set_aside: int
    modes: tuple[int, int] | None
    thin: dict[int, int]


def _too_few_to_test(control_labels: torch.Tensor, y: torch.Tensor, wanted: int) -> dict[int, int]:
    """The affected labels whose held-out controls ran out below ``wanted`` and are too few for the outranking test to
    reach its level, {label: controls}. P points and C controls split in comb(P + C, P) ways, so the test's smallest
    p-value is one over that: one point needs 19 controls at the level 0.05 (three backdoors on digits traced from one
    point against 10 held-out controls each found nothing; against training controls, every poison). The level is
    the test's share of ``OUTRANK_LEVEL`` over the affected labels (:func:`_label_level`)."""
    level = _label_level(y)
    thin = {}
    for label in sorted(set(y.tolist())):
        points, controls = int((y == label).sum()), int((control_labels == label).sum())
        if 0 < controls < wanted and math.comb(points + controls, points) * level < 1.0:
            thin[label] = controls
    return thin


def _label_level(y: torch.Tensor) -> float:
    """The level of each affected label's outranking test: one test per label, together at the family-wise
    ``OUTRANK_LEVEL`` (Bonferroni)."""
    return OUTRANK_LEVEL / len(set(y.tolist()))


def _rows_of(labels: torch.Tensor, label: int):
    """The rows of ``labels`` equal to ``label``: a slice when they are consecutive (the controls are grouped by
    label, and the points of a single-label run are all of them, so their rows stay views: of a memory-mapped
    score file too), else an index tensor."""
    rows = (labels == label).nonzero().flatten()
    if rows.numel() and int(rows[-1] - rows[0]) + 1 == rows.numel():
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


def _take(value, rows):
    """The ``rows`` (of :func:`_rows_of`) of a tensor (on its device), a :class:`DeltaSummary` or a list."""
    if isinstance(value, DeltaSummary):
        return DeltaSummary(**{f.name: _take(getattr(value, f.name), rows) for f in dataclasses.fields(value)})
    if isinstance(value, torch.Tensor):
        return value[rows if isinstance(rows, slice) else rows.to(value.device)]
    return value[rows] if isinstance(rows, slice) else [value[i] for i in rows.tolist()]


def _points_of(points: dict[str, Any], rows) -> dict[str, Any]:
    """The per-point fields of a :class:`DetectionResult` (``_POINT_FIELDS``) for the points at ``rows``."""
    return {k: _take(points[k], rows) for k in _POINT_FIELDS}


def _estimated_group(part: "DetectionResult") -> int:
    """How many of a label's flagged examples its ``fdr_estimate`` covers: those at or above its support cut (0 for a
    group the outranking test point by point claimed, whose estimate is the pooled one's)."""
    if part.support_cut is None or part.control_support is None or part.claimed_by_point:
        return 0
    return int((part.control_support[part.flagged] >= part.support_cut).sum())


def _merged(per_label: dict[int, "DetectionResult"], points: dict[str, Any], settings: dict[str, Any]):
    """One :class:`DetectionResult` for affected points of several labels, each label decided on its own
    (``per_label``): the union of the flagged sets; per example the largest statistic, mirror statistic and control
    support any label gave it; the estimate over the labels' groups at their support cuts, the expected false
    members of each group over all of them (the largest estimate of a label that found a group its estimate does
    not cover; the lowest estimate of any label when nothing was flagged). The per-label decision fields (cut,
    coherence, boundaries) stay in ``per_label``."""
    parts = list(per_label.values())
    n = parts[0].n_train
    statistic, mirror_statistic = torch.full((n,), -1, dtype=torch.int64), torch.full((n,), -1, dtype=torch.int64)
    support = torch.full((n,), float("nan"), dtype=torch.float64)
    eligible = torch.zeros(n, dtype=torch.bool)
    for part in parts:
        statistic = torch.maximum(statistic, part.statistic)
        mirror_statistic = torch.maximum(mirror_statistic, part.mirror_statistic)
        if part.control_support is not None:
            support = torch.fmax(support, part.control_support)  # NaN only where no label has a pair
        eligible = None if eligible is None or part.eligible is None else eligible | part.eligible
    found = [part for part in parts if part.found]
    flagged = torch.unique(torch.cat([part.flagged for part in parts]))
    covered = {id(part): _estimated_group(part) for part in found}
    if sum(covered.values()):
        # over what the labels' estimates cover, their groups at the support cut (each label's mirror-cut,
        # point-by-point and representation members have no share in it: counted in, the union's rate read 0.16
        # where 0.41 of it was clean)
        estimate = min(1.0, sum(part.fdr_estimate * covered[id(part)] for part in found) / sum(covered.values()))
    elif found:
        estimate = max(part.fdr_estimate for part in found)
    else:
        estimate = min(part.fdr_estimate for part in parts)
    return DetectionResult(**points, statistic=statistic, mirror_statistic=mirror_statistic, flagged=flagged,
                           cut=None, fdr_estimate=estimate, timings={}, settings=settings, control_support=support,
                           eligible=eligible, per_label=per_label)


def _uncovered(y: torch.Tensor, parts: dict) -> list[int]:
    """The affected labels no control part holds an input of, ascending."""
    have = set().union(*(set(part[1].tolist()) for part in parts.values()))
    return sorted(set(y.tolist()) - have)


def _checked_scores(scores, q: int) -> torch.Tensor:
    """The engine's (Q, N) scores, checked; a warning names the examples it could not score (NaN)."""
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or scores.shape[0] != q:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"ekfac.score must return a (Q={q}, N) tensor, got {shape}")
    if scores.shape[1] == 0:
        raise ValueError("ekfac.score returned scores for 0 training examples: the training loader is empty")
    if not scores.is_floating_point():
        raise TypeError(f"ekfac.score must return floating-point scores, got dtype {scores.dtype}")
    missing, scored, nonzero = 0, False, False
    low = high = None  # per query, the lowest and highest score read so far (NaN aside)
    step = _columns(scores.shape[0])
    for a in range(0, scores.shape[1], step):  # one read of each block (the scores may be a file on disk)
        block = scores[:, a:a + step]
        nan = torch.isnan(block)
        missing += int(nan.any(0).sum())
        scored = scored or not bool(nan.all())
        nonzero = nonzero or bool(((block != 0) & ~nan).any())
        block_low = block.masked_fill(nan, math.inf).amin(1)
        block_high = block.masked_fill(nan, -math.inf).amax(1)
        low = block_low if low is None else torch.minimum(low, block_low)
        high = block_high if high is None else torch.maximum(high, block_high)
    # (every example scored alike on each query, tied rows: a group of them was claimed with estimates of 0.05)
    if not scored or not nonzero or not bool((high > low).any()):
        what = "NaN" if not scored else "exactly 0" if not nonzero else "the same on each query"
        raise ValueError(f"ekfac.score: every training example's score is {what}, so nothing can be told apart "
                         "(a damping far outside the eigenvalues' range, e.g. 1e-100 or 1e40, or a model whose "
                         "gradients vanish); refit with the default damping")
    if missing:
        warnings.warn(f"ekfac.score returned NaN for {missing} training example(s) (positions the loader never "
                      "visited, or non-finite gradients); they get no votes", stacklevel=3)
    return scores


def _as_pixel_map(pixel_map) -> PixelMap | None:
    if pixel_map is None or isinstance(pixel_map, PixelMap):
        return pixel_map
    if isinstance(pixel_map, (tuple, list)) and len(pixel_map) == 2:
        try:
            return PixelMap.standardized(pixel_map[0], pixel_map[1], source="given (mean, std) of the data pipeline")
        except (TypeError, ValueError) as err:
            raise type(err)(f"pixel_map: {err}") from None
    raise TypeError(f"pixel_map must be None, a (mean, std) pair or a deltainf.transforms.PixelMap, got {pixel_map!r}")


class DeltaInfluenceDetector(Detector):
    """Δ-Influence behind the common detector interface (registered as ``"delta_influence"``):
    ``detect(model, train_dataset, query_x=..., query_y=..., reference=None, scorer=None)``.

    Fits EK-FAC on ``train_dataset`` (in dataset order, batches of ``batch_size``) unless a fitted
    ``scorer`` is given, then runs :class:`DeltaInfluence` with ``settings`` (its keyword arguments) on the
    affected queries; returns its :class:`DetectionResult`, which is a ``DetectorResult``."""

    name = "delta_influence"
    inputs = ("query_x", "query_y", "reference", "scorer")

    def __init__(self, batch_size: int = 256, **settings):
        self.batch_size = batch_size
        self.settings = settings

    def detect(self, model: torch.nn.Module, train_dataset, query_x: torch.Tensor | None = None, query_y=None,
               reference=None, scorer=None) -> DetectionResult:
        from deltainf.data.loaders import check_dataset, make_loader
        from deltainf.influence import EKFAC

        if query_x is None or query_y is None:
            raise ValueError("detect: Δ-Influence needs the affected input(s) query_x and their label(s) query_y")
        check_dataset(train_dataset)
        loader = make_loader(train_dataset, batch_size=self.batch_size, shuffle=False)
        if scorer is None:
            scorer = EKFAC(model, progress=self.settings.get("progress", False)).fit(loader)
        from deltainf._util import named_as

        with named_as({"test_y_adv": "query_y", "test_x": "query_x"}):  # DeltaInfluence's names for them
            return DeltaInfluence(scorer, model=model, **self.settings).detect(loader, query_x, query_y,
                                                                                reference=reference)
