"""Poison detectors: Δ-Influence and the baselines it is compared with.

Every detector implements ``detect(model, train_dataset, ...) -> DetectorResult`` (``flagged`` int64
training indices, ``scores`` (N,) suspicion; :mod:`deltainf.detector`). Build one by name with
:func:`get_detector`:

>>> det = get_detector("spectral_signatures", expected_poison_fraction=0.1)
>>> res = det.detect(model, train_set)           # doctest: +SKIP
"""
from __future__ import annotations

from typing import Dict, Type

from deltainf._registry import lookup
from deltainf.defenses.activation_clustering import ActivationClustering
from deltainf.delta import DeltaInfluenceDetector
from deltainf.detector import Detector, DetectorResult
from deltainf.defenses.frequency import FrequencyDetector, dct2, synthesize_triggers
from deltainf.defenses.influence_threshold import EKFACThreshold, InfluenceThreshold, TRAKThreshold
from deltainf.defenses.spectral_signatures import SpectralSignatures

DETECTORS: Dict[str, Type[Detector]] = {
    "delta_influence": DeltaInfluenceDetector,
    "activation_clustering": ActivationClustering,
    "spectral_signatures": SpectralSignatures,
    "frequency": FrequencyDetector,
    "ekfac_threshold": EKFACThreshold,
    "trak_threshold": TRAKThreshold,
}
_ALIASES = {"delta": "delta_influence", "ac": "activation_clustering", "ss": "spectral_signatures", "freq": "frequency",
            "ekfac": "ekfac_threshold", "trak": "trak_threshold"}


def get_detector(name: str, **kwargs) -> Detector:
    """Instantiate a detector by registry name (or short alias), forwarding ``kwargs`` to its constructor.

    Names: ``delta_influence`` (delta), ``activation_clustering`` (ac), ``spectral_signatures`` (ss), ``frequency`` (freq),
    ``ekfac_threshold`` (ekfac), ``trak_threshold`` (trak). Raises ValueError for unknown names.
    """
    return lookup(name, DETECTORS, _ALIASES, "detector")(**kwargs)


__all__ = [
    "ActivationClustering", "DeltaInfluenceDetector", "Detector", "DetectorResult", "DETECTORS", "EKFACThreshold", "FrequencyDetector",
    "InfluenceThreshold", "SpectralSignatures", "TRAKThreshold", "dct2", "get_detector", "synthesize_triggers",
]
