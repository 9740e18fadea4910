"""Influence engines: EK-FAC (kronfluence-compatible) and TRAK-style projected-gradient scoring.

Public names:
- :class:`Scorer`: the contract both engines meet (``fit(train_loader)``, ``score(query_x, query_y,
  train_loader) -> (Q, N)``, ``model``).
- :class:`EKFAC` (``.fit``, ``.score``, ``.save``, ``EKFAC.load``) and its :class:`EKFACConfig`.
- :class:`TRAKScorer`: TRAK-style scores from JL-projected per-example gradients.
- :class:`TRAKProjector`: a ``trak.projectors.AbstractProjector`` on ``deltainf.ops.jl_project``, defined in
  :mod:`deltainf.integrations.trak` (imported lazily; needs the ``traker`` package).
- measurements :func:`negative_margin`, :func:`cross_entropy`; :func:`sample_fisher_labels` (true-Fisher draws).
"""
from deltainf.influence._batches import cross_entropy, negative_margin, sample_fisher_labels
from deltainf.influence.ekfac import EKFAC, EKFACConfig, LayerFactors
from deltainf.influence.scorer import Scorer
from deltainf.influence.trak import TRAKScorer

__all__ = ["EKFAC", "EKFACConfig", "LayerFactors", "Scorer", "TRAKScorer", "TRAKProjector", "negative_margin",
           "cross_entropy", "sample_fisher_labels"]


def __getattr__(name):
    if name == "TRAKProjector":  # depends on the optional `traker` package
        from deltainf.integrations.trak import TRAKProjector

        return TRAKProjector
    raise AttributeError(f"module 'deltainf.influence' has no attribute {name!r}")
