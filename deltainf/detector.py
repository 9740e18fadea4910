"""The common detector interface every poison detector meets, Δ-Influence and the baselines alike:
``Detector.detect(model, train_dataset, **inputs) -> DetectorResult``."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Dict

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class DetectorResult:
    """What a poison detector found.

    Attributes:
        flagged: int64 (K,) sorted training indices judged poisonous (positions in the training dataset).
        scores: float (N,) per-example suspicion score, higher = more suspicious. Its meaning depends on
            the detector (documented on each); ``flagged`` is the decision, ``scores`` is for ranking/plots.
        info: detector-specific details (settings used, per-class statistics, the threshold applied...).
    """

    flagged: torch.Tensor
    scores: torch.Tensor
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.flagged = torch.as_tensor(self.flagged, dtype=torch.long).reshape(-1).sort().values
        self.scores = torch.as_tensor(self.scores).reshape(-1)

    @property
    def num_flagged(self) -> int:
        """Number of flagged training examples."""
        return int(self.flagged.numel())

    def mask(self) -> torch.Tensor:
        """bool (N,) with True at flagged indices (N = len(scores))."""
        m = torch.zeros(self.scores.numel(), dtype=torch.bool)
        m[self.flagged] = True
        return m


class Detector(abc.ABC):
    """Base class of every poison detector.

    Subclasses take their settings in ``__init__`` and implement :meth:`detect`. ``detect`` never
    modifies ``model`` (its train/eval mode is restored) or ``train_dataset``.
    """

    #: registry name (see :func:`deltainf.defenses.get_detector`)
    name: str = ""
    #: the keyword inputs :meth:`detect` takes besides the model and the training data (e.g. the affected
    #: queries); :meth:`run` passes a detector exactly these out of what a caller has
    inputs: tuple = ()

    @abc.abstractmethod
    def detect(self, model: nn.Module, train_dataset: Dataset, **kwargs) -> DetectorResult:
        """Flag suspicious training examples.

        Args:
            model: the (possibly poisoned) trained model, taking pixel-space images (B,C,H,W) float32.
            train_dataset: map-style dataset yielding ``(x, y)`` or ``(x, y, index)``; x (C,H,W) float32
                in [0,1], y int. Flagged indices are positions in this dataset.
            **kwargs: detector-specific inputs (e.g. the affected query for influence thresholding).
        """

    def run(self, model: nn.Module, train_dataset: Dataset, **available) -> DetectorResult:
        """:meth:`detect` with the inputs this detector takes picked out of ``available`` (the others are
        ignored), so that one caller can drive every detector the same way."""
        return self.detect(model, train_dataset, **{k: v for k, v in available.items() if k in self.inputs})

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
