"""Activation Clustering (Chen et al. 2018, arXiv 1811.03728).

Per class: last-hidden-layer activations -> dimensionality reduction (FastICA or PCA) -> 2-means; a
cluster is judged poisonous by a decision rule on its size (and optionally the silhouette score).
Every numerical step uses scikit-learn (FastICA, PCA, KMeans, silhouette_score).

Presets (``variant``):
  * ``"chen"`` (default): FastICA to 10 dims, flag the smaller cluster only when it holds < 35 % of its
    class ("relative size"), so an unpoisoned class can come out clean.
  * ``"art"``: IBM ART 1.20.1 ``ActivationDefence`` instance defaults: PCA to 10 dims, flag the smaller
    cluster of every class (``cluster_analysis="smaller"``).
  * ``"paper"``: the Delta-Influence baseline: PCA to 3 dims, ``KMeans(2, random_state=3407)``, flag the
    smaller cluster of every class.
Any explicit argument overrides the preset.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from deltainf.defenses._common import FeatureFn, activation_rows, extract_features
from deltainf.detector import Detector, DetectorResult
from deltainf._util import check_int, check_number

_PRESETS = {
    "chen": dict(reduce="FastICA", nb_dims=10, analysis="relative-size", seed=0),
    "art": dict(reduce="PCA", nb_dims=10, analysis="smaller", seed=0),
    "paper": dict(reduce="PCA", nb_dims=3, analysis="smaller", seed=3407),
}
_REDUCE = ("FastICA", "PCA", "none")
_ANALYSIS = ("relative-size", "smaller", "silhouette")
_GROUP_BY = ("label", "prediction")


def reduce_activations(activations: np.ndarray, nb_dims: int, reduce: str, seed: int) -> np.ndarray:
    """Reduce (n, d) activations to (n, min(nb_dims, n, d)) with scikit-learn FastICA or PCA.

    Like ART, no reduction happens when ``d <= nb_dims`` (or ``reduce == "none"``). FastICA uses ART's
    settings (``max_iter=1000, tol=0.005``). float64 numpy in, float64 numpy out.
    """
    from sklearn.decomposition import PCA, FastICA

    n, d = activations.shape
    if reduce == "none" or d <= nb_dims:
        return activations
    if reduce == "FastICA":
        # Dead units (columns constant within the class, e.g. a ReLU that never fires) carry no signal, and
        # scikit-learn's whitening fixes component signs with the first feature's loadings: when that
        # feature is constant the sign is 0 and FastICA returns NaN (ART crashes the same way). Dropping
        # constant columns leaves the ICA problem unchanged.
        live = np.ptp(activations, axis=0) > 0
        if not live.any():
            return np.zeros((n, 1))
        activations = activations[:, live]
        d = activations.shape[1]
    k = min(nb_dims, n, d)
    if reduce == "FastICA":
        projector = FastICA(n_components=k, max_iter=1000, tol=0.005, random_state=seed)
    else:
        projector = PCA(n_components=k, random_state=seed)
    with warnings.catch_warnings():
        # FastICA on few, nearly collinear activations warns about convergence; the clustering
        # that follows is still meaningful, so keep the output quiet.
        warnings.simplefilter("ignore", category=UserWarning)
        from sklearn.exceptions import ConvergenceWarning

        warnings.simplefilter("ignore", category=ConvergenceWarning)
        return projector.fit_transform(activations)


def two_means(reduced: np.ndarray, seed: int, n_init: int = 10) -> np.ndarray:
    """KMeans(k=2) labels (n,) int64 of reduced activations (n, k); one cluster when n < 2."""
    from sklearn.cluster import KMeans

    if reduced.shape[0] < 2:
        return np.zeros(reduced.shape[0], dtype=np.int64)
    with warnings.catch_warnings():
        from sklearn.exceptions import ConvergenceWarning

        # Fewer distinct points than clusters: KMeans warns and returns one cluster; that is the answer.
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        return KMeans(n_clusters=2, n_init=n_init, random_state=seed).fit_predict(reduced).astype(np.int64)


class ActivationClustering(Detector):
    """Activation Clustering detector.

    Args:
        variant: ``"chen"`` (default), ``"art"`` or ``"paper"``; sets the defaults below (module docstring).
        reduce: ``"FastICA"``, ``"PCA"`` or ``"none"``.
        nb_dims: target dimensionality of the reduction (> 0).
        analysis: ``"relative-size"`` (smaller cluster poisonous iff its fraction of the class is
            < ``size_threshold``), ``"smaller"`` (smaller cluster of every class is poisonous) or
            ``"silhouette"`` (relative size < ``size_threshold`` AND silhouette > ``silhouette_threshold``).
        size_threshold: in (0, 1); default 0.35 (Chen et al., ART).
        silhouette_threshold: in [-1, 1]; default 0.10 (ART).
        group_by: ``"label"`` (given, possibly poisoned label; ART and Delta-Influence) or ``"prediction"``
            (the model's predicted class, as in Chen et al.'s Algorithm 1).
        feature_fn: optional callable (B,C,H,W) -> (B,D); default
            :func:`deltainf.models.penultimate_features`, for a deltainf model (``normalize``, ``features``,
            ``classifier``); any other model needs one (a clear TypeError says so).
        seed: random_state for the reduction and KMeans (the same data in the same order give the same result,
            unlike ART's unseeded KMeans; another seed or another order of the same examples can move a
            hundred or more of them: FastICA's and KMeans' starts are drawn per row order).
        n_init: KMeans restarts (the best inertia is kept).
        batch_size, device, progress: for the activation pass.

    ``detect(model, train_dataset)`` returns scores = 1 - (fraction of its class that shares the example's
    cluster), so members of small clusters score high; ``info["per_class"]`` holds cluster sizes,
    fractions, the poisonous cluster (or None) and, for "silhouette", the silhouette score.
    """

    name = "activation_clustering"

    def __init__(
        self,
        variant: str = "chen",
        *,
        reduce: Optional[str] = None,
        nb_dims: Optional[int] = None,
        analysis: Optional[str] = None,
        size_threshold: float = 0.35,
        silhouette_threshold: float = 0.10,
        group_by: str = "label",
        feature_fn: Optional[FeatureFn] = None,
        seed: Optional[int] = None,
        n_init: int = 10,
        batch_size: int = 256,
        device=None,
        progress: bool = False,
    ) -> None:
        if variant not in _PRESETS:
            raise ValueError(f"variant: expected one of {sorted(_PRESETS)}, got {variant!r}")
        preset = _PRESETS[variant]
        self.variant = variant
        self.reduce = preset["reduce"] if reduce is None else reduce
        self.nb_dims = preset["nb_dims"] if nb_dims is None else nb_dims
        self.analysis = preset["analysis"] if analysis is None else analysis
        # scikit-learn's random_state takes an int in [0, 2**32 - 1]
        self.seed = check_int("seed", preset["seed"] if seed is None else seed, minimum=0, maximum=2 ** 32 - 1)
        self.size_threshold = check_number("size_threshold", size_threshold, maximum=1.0, max_inclusive=False)
        self.silhouette_threshold = check_number("silhouette_threshold", silhouette_threshold, minimum=-1.0,
                                                 inclusive=True, maximum=1.0)
        self.group_by = group_by
        self.feature_fn = feature_fn
        self.n_init = n_init
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        if self.reduce not in _REDUCE:
            raise ValueError(f"reduce: expected one of {list(_REDUCE)}, got {self.reduce!r}")
        if isinstance(self.nb_dims, bool) or not isinstance(self.nb_dims, int) or self.nb_dims <= 0:
            raise ValueError(f"nb_dims: expected a positive int, got {self.nb_dims!r}")
        if self.analysis not in _ANALYSIS:
            raise ValueError(f"analysis: expected one of {list(_ANALYSIS)}, got {self.analysis!r}")
        if group_by not in _GROUP_BY:
            raise ValueError(f"group_by: expected one of {list(_GROUP_BY)}, got {group_by!r}")
        if not isinstance(n_init, int) or n_init < 1:
            raise ValueError(f"n_init: expected an int >= 1, got {n_init!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")

    def detect(self, model: nn.Module, train_dataset: Dataset, **kwargs) -> DetectorResult:
        """Run AC on the model's penultimate activations of ``train_dataset`` (see class docstring)."""
        if kwargs:
            raise TypeError(f"detect: unexpected keyword arguments {sorted(kwargs)}")
        feats, labels, logits = extract_features(
            model, train_dataset, self.feature_fn, batch_size=self.batch_size, device=self.device,
            with_logits=self.group_by == "prediction", progress=self.progress,
        )
        groups = labels if self.group_by == "label" else logits.argmax(1)
        return self.detect_from_activations(feats, groups)

    def detect_from_activations(self, activations: torch.Tensor, groups: torch.Tensor) -> DetectorResult:
        """AC on precomputed activations.

        Args:
            activations: (N, D) float (flattened last-hidden-layer activations), Tensor or ndarray.
            groups: (N,) int class of each example (label or prediction).
        """
        acts = activation_rows(activations)
        grp = torch.as_tensor(groups).reshape(-1).long().cpu().numpy()
        if acts.shape[0] != grp.shape[0]:
            raise ValueError(f"groups: expected {acts.shape[0]} entries (one per activation row), got {grp.shape[0]}")
        n = acts.shape[0]
        flagged = np.zeros(n, dtype=bool)
        scores = np.zeros(n, dtype=np.float64)
        per_class = {}
        for c in np.unique(grp):
            idx = np.flatnonzero(grp == c)
            reduced = reduce_activations(acts[idx], self.nb_dims, self.reduce, self.seed)
            clusters = two_means(reduced, self.seed, self.n_init)
            sizes = np.bincount(clusters, minlength=2)
            fractions = sizes / sizes.sum()
            scores[idx] = 1.0 - fractions[clusters]
            # ties go to cluster 0, as np.argmin does in ART
            smaller = int(np.argmin(sizes))
            entry = {"sizes": sizes.tolist(), "fractions": fractions.tolist(), "poison_cluster": None}
            if sizes.min() == 0:
                # a single cluster: nothing separates, nothing is flagged
                per_class[int(c)] = entry
                continue
            poisonous = False
            if self.analysis == "smaller":
                poisonous = True
            else:
                poisonous = fractions[smaller] < self.size_threshold
                if self.analysis == "silhouette":
                    from sklearn.metrics import silhouette_score

                    sil = float(silhouette_score(reduced, clusters)) if len(idx) > 2 else 0.0
                    entry["silhouette"] = sil
                    poisonous = poisonous and sil > self.silhouette_threshold
            if poisonous:
                entry["poison_cluster"] = smaller
                flagged[idx[clusters == smaller]] = True
            per_class[int(c)] = entry
        info = {
            "variant": self.variant, "reduce": self.reduce, "nb_dims": self.nb_dims, "analysis": self.analysis,
            "size_threshold": self.size_threshold, "silhouette_threshold": self.silhouette_threshold,
            "group_by": self.group_by, "seed": self.seed, "per_class": per_class,
        }
        return DetectorResult(torch.from_numpy(np.flatnonzero(flagged)), torch.from_numpy(scores).float(), info)
