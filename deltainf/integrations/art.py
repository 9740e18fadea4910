"""Δ-Influence as an IBM ART poison filtering defence.

:class:`DeltaInfluenceDefence` is an ``art.defences.detector.poison.PoisonFilteringDefence``: built from an ART
PyTorch classifier and its (possibly poisoned) training data, ``detect_poison(x_affected=..., y_affected=...)``
returns ART's pair ``(report, is_clean_lst)`` and ``evaluate_defence(is_clean)`` ART's JSON confusion matrix
per class (its ``GroundTruthEvaluator``). Unlike ART's clustering defences, Δ-Influence traces given affected
predictions: the test inputs the model gets wrong the attacker's way and the label it gives them. Needs the
``adversarial-robustness-toolbox`` package.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from art.defences.detector.poison import PoisonFilteringDefence
from art.utils import segment_by_class

__all__ = ["DeltaInfluenceDefence"]

# DeltaInfluence's names for what this defence calls otherwise
_NAMES = {"test_y_adv": "y_affected", "test_x": "x_affected", "train_loader": "x_train, y_train",
          "reference": "x_reference, y_reference"}


class _ChannelsLast(torch.nn.Module):
    """A channels-last classifier's network taking channels-first images (Δ-Influence transforms (C, H, W))."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.movedim(-3, -1))


class DeltaInfluenceDefence(PoisonFilteringDefence):
    """Δ-Influence behind ART's ``PoisonFilteringDefence``.

    Args:
        classifier: an ART ``PyTorchClassifier`` (its ``model`` is scored; its preprocessing is applied to the
            inputs first, as ART does before the model).
        x_train, y_train: the training data as the classifier takes it; labels as indices or one-hot.
        x_affected, y_affected: the affected test input(s) and the adversarial label(s) (also accepted by
            :meth:`detect_poison`).
        x_reference, y_reference: held-out labelled inputs (e.g. the test set) for Δ-Influence's controls.
        batch_size: batch size of the EK-FAC passes.
        **settings: keyword arguments of :class:`deltainf.DeltaInfluence` (n_transforms, fdr, ...).
    """

    defence_params = ["classifier", "x_affected", "y_affected", "x_reference", "y_reference", "batch_size",
                      "settings"]

    def __init__(self, classifier, x_train: np.ndarray, y_train: np.ndarray, x_affected=None, y_affected=None,
                 x_reference=None, y_reference=None, batch_size: int = 256, **settings) -> None:
        super().__init__(classifier, x_train, y_train)
        self.x_affected, self.y_affected = x_affected, y_affected
        self.x_reference, self.y_reference = x_reference, y_reference
        self.batch_size = batch_size
        self.settings: dict[str, Any] = {}
        self.result = None  # the last DetectionResult, with everything behind the decision
        self._ekfac = None
        self.set_params(**settings)  # checked as detect_poison's are: a typo or a bad value fails here, not after a fit

    def _check_params(self) -> None:
        model = getattr(self.classifier, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"classifier: expected an ART PyTorchClassifier (whose .model is an nn.Module), got "
                            f"{type(self.classifier).__name__}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {self.batch_size!r}")
        if len(self.x_train) != len(self.y_train):
            raise ValueError(f"x_train, y_train: {len(self.x_train)} inputs but {len(self.y_train)} labels")

    def set_params(self, **kwargs) -> None:
        """ART's ``set_params``, which also takes :class:`deltainf.DeltaInfluence`'s settings (``n_transforms``,
        ``fdr``, ...; ART's own drops every key outside ``defence_params``); an unknown key or a bad value is an
        error, and then nothing is changed."""
        import inspect

        from deltainf.delta import DeltaInfluence

        known = set(inspect.signature(DeltaInfluence.__init__).parameters) - {"self", "ekfac"}
        detector = {k: v for k, v in kwargs.items() if k in known and k not in self.defence_params}
        unknown = sorted(set(kwargs) - set(self.defence_params) - set(detector))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a setting of this defence ({', '.join(self.defence_params)}) "
                             "nor of deltainf.DeltaInfluence")
        settings = {**getattr(self, "settings", {}), **detector}
        DeltaInfluence.check_settings(**settings)  # before it is kept: a rejected value must not stick
        own = {k: v for k, v in kwargs.items() if k not in detector}
        before = {k: getattr(self, k) for k in own if hasattr(self, k)}
        try:  # ART's set_params assigns before it checks: a rejected value of the defence's own must not stick either
            super().set_params(**own)
        except Exception:
            for k, v in before.items():
                setattr(self, k, v)
            raise
        self.settings = settings

    def _affected_labels(self):
        """The adversarial label(s): one int, indices (one per affected input), or one-hot rows, as ART gives labels;
        a single one-hot vector (K,) for a single affected input is its label too."""
        y = np.asarray(self.y_affected)
        if y.ndim == 0:
            return int(self._labels(y.reshape(1), "y_affected")[0])
        x = np.asarray(self.x_affected)
        points = 1 if x.ndim == len(self.classifier.input_shape) else len(x)
        one_hot = y.ndim == 1 and len(y) == self.classifier.nb_classes > 1 and np.isin(y, (0, 1)).all() and \
            y.sum() == 1
        if one_hot and points != len(y):
            return int(y.argmax())  # one one-hot row (ART's np.eye(K)[target]) for every affected input
        if one_hot and points > 1:
            raise ValueError(f"y_affected: {y.tolist()} is ambiguous for {points} affected inputs of "
                             f"{self.classifier.nb_classes} classes: one one-hot row, or one class index per input? "
                             "pass the target class as an int, or (P, K) one-hot rows")
        return self._labels(y, "y_affected")

    def _inputs(self, x, name: str) -> torch.Tensor:
        """ART's preprocessing applied, then channels first: Δ-Influence's transforms act on (C, H, W) images, and the
        model of a channels-last classifier gets them back through :class:`_ChannelsLast`. Raw values outside the
        classifier's ``clip_values`` are a ValueError naming ``name`` (0-255 images for a [0, 1] classifier ended in
        all-zero scores, blamed on the damping)."""
        x = np.asarray(x, dtype=np.float32)
        clip = getattr(self.classifier, "clip_values", None)
        if clip is not None and x.size:
            lo, hi = float(np.min(clip[0])), float(np.max(clip[1]))
            slack = 1e-4 * max(hi - lo, 1e-12)
            if float(x.min()) < lo - slack or float(x.max()) > hi + slack:
                raise ValueError(f"{name}: values in [{float(x.min()):g}, {float(x.max()):g}] lie outside the "
                                 f"classifier's clip_values ({lo:g}, {hi:g})")
        x, _ = self.classifier._apply_preprocessing(x, y=None, fit=False)
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        return x.movedim(-1, -3) if self._channels_last() else x

    def _pixel_map(self, channels: int):
        """How the preprocessed inputs relate to pixels in [0, 1], from what the classifier knows: its scalar
        ``clip_values`` (the raw range) and its mean/std standardisation, ``p = (x * std + mean - lo) / (hi - lo)``;
        None (the range estimate decides) for per-channel clip values or any other preprocessing."""
        from art.preprocessing.standardisation_mean_std import StandardisationMeanStd, StandardisationMeanStdPyTorch

        from deltainf.transforms import PixelMap

        clip = getattr(self.classifier, "clip_values", None)
        if clip is None or np.asarray(clip[0]).size != 1 or np.asarray(clip[1]).size != 1:
            return None
        lo, hi = float(np.asarray(clip[0])), float(np.asarray(clip[1]))
        mean, std = np.zeros(1), np.ones(1)
        for op in getattr(self.classifier, "preprocessing_operations", None) or []:
            if not isinstance(op, (StandardisationMeanStd, StandardisationMeanStdPyTorch)):
                return None
            mean = np.asarray(op.mean, dtype=np.float64).reshape(-1)
            std = np.asarray(op.std, dtype=np.float64).reshape(-1)
        if not hi > lo or mean.size not in (1, channels) or std.size not in (1, channels) or not (std > 0).all():
            return None
        mean, std = np.broadcast_to(mean, (channels,)), np.broadcast_to(std, (channels,))
        return PixelMap(tuple(((mean - lo) / (hi - lo)).tolist()), tuple((std / (hi - lo)).tolist()),
                        "the classifier's clip_values and mean/std preprocessing")

    def _channels_last(self) -> bool:
        return not getattr(self.classifier, "channels_first", True) and len(self.classifier.input_shape) == 3

    def _labels(self, y, name: str) -> torch.Tensor:
        from deltainf._util import class_indices

        return class_indices(y, name, self.classifier.nb_classes)

    def detect_poison(self, **kwargs) -> tuple[dict, list[int]]:
        """Run Δ-Influence on the affected input(s). Returns ``(report, is_clean_lst)``: ``is_clean_lst[i]`` is 0
        for a flagged training example and 1 otherwise; the report holds the flagged indices, the verdict, the
        estimated false-discovery rate and per-example votes."""
        from deltainf._util import restore_modes, training_modes

        self.set_params(**kwargs)
        if self.x_affected is None or self.y_affected is None:
            raise ValueError("x_affected, y_affected: Δ-Influence traces affected predictions; pass the affected "
                             "test input(s) and the adversarial label(s) to the defence or to detect_poison")
        modes = training_modes(self.classifier.model)
        try:
            return self._detect()
        finally:
            restore_modes(modes)  # the user's network as it was (ART's fit and predict set their own modes)

    def _detect(self) -> tuple[dict, list[int]]:
        """:meth:`detect_poison` once its settings are taken, with the network in eval mode."""
        from torch.utils.data import DataLoader, TensorDataset

        from deltainf._util import named_as, unwrapped
        from deltainf.delta import DeltaInfluence
        from deltainf.influence import EKFAC

        model = self.classifier.model.eval()
        if self._channels_last():  # one wrapper per network, so the fit is kept across calls
            if getattr(self, "_wrapped", None) is None or self._wrapped.inner is not model:
                self._wrapped = _ChannelsLast(model)
            model = self._wrapped
        train = TensorDataset(self._inputs(self.x_train, "x_train"), self._labels(self.y_train, "y_train"))
        loader = DataLoader(train, batch_size=self.batch_size, shuffle=False)
        # the fit depends on the model and the training data only: refitted when the classifier was trained since
        if self._ekfac is None or self._ekfac.weights_changed or self._ekfac.model is not unwrapped(model):
            self._ekfac = EKFAC(model, progress=False).fit(loader)
        reference = None
        if (self.x_reference is None) != (self.y_reference is None):
            raise ValueError("x_reference, y_reference: pass both (held-out inputs and their labels) or neither")
        if self.x_reference is not None:
            reference = (self._inputs(self.x_reference, "x_reference"), self._labels(self.y_reference, "y_reference"))
        y_adv = self._affected_labels()
        settings = dict(self.settings)
        if settings.get("pixel_map") is None and len(self.classifier.input_shape) == 3:
            channels = self.classifier.input_shape[-1 if self._channels_last() else 0]
            settings["pixel_map"] = self._pixel_map(channels)
        detector = DeltaInfluence(self._ekfac, model=model, **settings)
        with named_as(_NAMES):
            x_affected = self._inputs(self.x_affected, "x_affected")
            self.result = detector.detect(loader, x_affected, y_adv, reference=reference)
        flagged = self.result.flagged.tolist()
        is_clean = np.ones(len(train), dtype=int)
        is_clean[flagged] = 0
        report: dict[str, Any] = {"flagged": flagged, "found": self.result.found, "verdict": self.result.verdict,
                                  "fdr_estimate": self.result.fdr_estimate}
        return report, is_clean.tolist()

    def evaluate_defence(self, is_clean: np.ndarray, **kwargs) -> str:
        """ART's evaluation: the JSON confusion matrix per class of the detection against ``is_clean`` (1 = clean,
        0 = poison, per training example), from ART's ``GroundTruthEvaluator``."""
        from art.defences.detector.poison.ground_truth_evaluator import GroundTruthEvaluator

        truth = None if is_clean is None else np.asarray(is_clean)
        if truth is None or truth.ndim != 1 or len(truth) != len(self.x_train) or not np.isin(truth, (0, 1)).all():
            raise ValueError(f"is_clean: expected one 0/1 entry per training example ({len(self.x_train)})")
        _, predicted_clean = self.detect_poison(**kwargs)
        nb_classes = self.classifier.nb_classes
        labels = self._labels(self.y_train, "y_train").numpy()
        predicted = segment_by_class(np.asarray(predicted_clean), labels, nb_classes)
        _, conf_matrix_json = GroundTruthEvaluator().analyze_correctness(predicted,
                                                                         segment_by_class(truth, labels, nb_classes))
        return conf_matrix_json
