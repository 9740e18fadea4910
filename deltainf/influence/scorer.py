"""The scorer contract every influence engine meets (``EKFAC``, ``TRAKScorer``) and every consumer relies on
(``DeltaInfluence``, the influence-threshold baselines)."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Scorer"]


@runtime_checkable
class Scorer(Protocol):
    """An influence engine over one model.

    ``fit(train_loader)`` does the work that depends on the training data only (EK-FAC's factors, TRAK's
    projected features) and returns the scorer; ``score(query_x, query_y, train_loader)`` returns the
    (Q, N) influence of every training example (column i = dataset position i) on every query, positive
    meaning "supports the query's label", reading ``train_loader`` once when the engine needs it
    (EK-FAC) or not at all (TRAK).
    """

    model: nn.Module

    def fit(self, train_loader) -> "Scorer":
        ...

    def score(self, query_x: torch.Tensor, query_y: torch.Tensor, train_loader) -> torch.Tensor:
        ...
