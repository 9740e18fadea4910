"""deltainf as dattri attributors (dattri's ``BaseAttributor`` contract: ``cache(full_train_dataloader)``, then
``attribute(train_dataloader, test_dataloader) -> (n_train, n_test)``).

* :class:`EKFACAttributor`: EK-FAC influence through :class:`deltainf.EKFAC` (one pass over the training data for
  all test points), for the model of a dattri ``AttributionTask``.
* :class:`DeltaInfluenceAttributor`: Δ-Influence's per-example evidence: for each test point, the fraction of its
  transformed, relabelled copies under which the training example's influence collapses (``votes / n``), so
  poisons behind a test point's label score near 1.

Batches are ``(x, y)`` (or ``(x, y, index)``); the test labels are the labels traced. Needs the ``dattri``
package.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Union

import torch
import torch.nn.functional as F
from dattri.algorithm.base import BaseAttributor

from deltainf._util import class_indices, named_as, restore_modes, training_modes
from deltainf.data.loaders import in_dataset_order

__all__ = ["EKFACAttributor", "DeltaInfluenceAttributor"]


def _test_points(test_dataloader) -> tuple[torch.Tensor, torch.Tensor]:
    """The test points in dataset order (the result's columns, as dattri's attributors give them): a shuffling
    loader is read in its dataset's order, and (x, y, index) batches are put in the order of their index."""
    xs, ys, index = [], [], []
    for batch in in_dataset_order(test_dataloader):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("test_dataloader: each batch must be (x, y) or (x, y, index)")
        xs.append(batch[0])
        label = torch.as_tensor(batch[1])
        ys.append(label if label.ndim == 2 else label.reshape(-1))  # one-hot rows stay rows
        index.append(torch.as_tensor(batch[2]).reshape(-1) if len(batch) > 2 else None)
    if not xs:
        raise ValueError("test_dataloader: yielded no test points")
    x, y = torch.cat(xs), class_indices(torch.cat(ys), "test_dataloader (its labels)")
    if all(i is not None and not i.is_floating_point() for i in index):
        order = torch.cat(index).argsort(stable=True)
        if order.numel() == x.shape[0]:
            x, y = x[order.to(x.device)], y[order.to(y.device)]
    return x, y


class EKFACAttributor(BaseAttributor):
    """dattri attributor on deltainf's EK-FAC.

    Args:
        task: a dattri ``AttributionTask`` with one checkpoint (its model, with that checkpoint loaded, is scored).
        module_name: the ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Conv1d`` / ``nn.Embedding`` modules to track (names of
            ``model.named_modules()``); None = all of them.
        device: where the model runs.
        damping, measurement: :class:`deltainf.EKFAC`'s (measurement "margin" (default), "ce" for the
            cross-entropy, or a callable (logits, labels) -> (B,)).
        **options: further :class:`deltainf.EKFAC` options (fisher, low_rank, ...).
    """

    def __init__(self, task, module_name: Union[str, list[str], None] = None, device: str = "cpu",
                 damping: Union[float, str, None] = 1e-8, measurement: Union[str, Callable] = "margin",
                 **options) -> None:
        checkpoints = task.get_checkpoints()
        if len(checkpoints) != 1:
            raise ValueError(f"task: expected one checkpoint, got {len(checkpoints)} (EK-FAC scores one model)")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device: {device!r} is not a torch device ({str(err).splitlines()[0]})") from err
        modes = training_modes(task.get_model())
        try:  # loads the checkpoint into the task's model; dattri's default loader also switches it to eval mode
            task.get_param(ckpt_idx=0)
        finally:
            restore_modes(modes)
        self.task = task
        self.model = task.get_model().to(device)  # its mode is the user's: every pass sets eval mode and restores it
        names = [module_name] if isinstance(module_name, str) else module_name
        if names is not None:
            present = dict(self.model.named_modules())
            missing = [n for n in names if not isinstance(n, str) or n not in present]
            if missing:
                raise ValueError(f"module_name: no module {missing[0]!r} in the task's model (names as in "
                                 "model.named_modules())")
        self.module_name = module_name
        self.options = {"damping": damping, "measurement": measurement, "progress": False, **options}
        from deltainf.influence import EKFAC

        with named_as({"modules": "module_name"}):  # made now, so a typo or a bad value fails here, not at cache()
            self._engine = EKFAC(self.model, modules=module_name, **self.options)
        self.ekfac = None  # the engine once cache() has fitted it
        if getattr(task, "original_target_func", None) is not getattr(task, "original_loss_func", None) and \
                isinstance(measurement, str):
            warnings.warn(f"task: its target_func is not what is attributed: deltainf differentiates its "
                          f"measurement {measurement!r} of the logits and the test labels; pass measurement=... "
                          "(logits, labels) -> (B,) computing your target", stacklevel=2)

    def cache(self, full_train_dataloader) -> None:
        """Fit EK-FAC on the full training data (two passes)."""
        if "loss" not in self.options:
            self._check_loss(full_train_dataloader)
        with named_as({"modules": "module_name", "train_loader": "full_train_dataloader"}):
            self.ekfac = self._engine.fit(full_train_dataloader)

    def _check_loss(self, loader) -> None:
        """Warn when the task's training loss is not the cross-entropy EK-FAC's fit differentiates (compared on the
        first training example; a loss that cannot run on it is not checked)."""
        loss_func = getattr(self.task, "original_loss_func", None)
        batch = next(iter(loader), None)
        if loss_func is None or not isinstance(batch, (tuple, list)) or len(batch) < 2:
            return
        device = next(self.model.parameters()).device
        x, y = batch[0][:1].to(device), torch.as_tensor(batch[1])[:1].to(device)
        params = {k: p.detach() for k, p in self.model.named_parameters()}
        modes = training_modes(self.model)
        self.model.eval()  # as the fit reads the model
        try:
            with torch.no_grad():
                theirs = float(loss_func(params, (x, y)))
                ours = float(F.cross_entropy(self.model(x), y.long()))
        except Exception:  # a loss written for other data: nothing to compare
            return
        finally:
            restore_modes(modes)
        if not math.isclose(theirs, ours, rel_tol=1e-4, abs_tol=1e-6):
            warnings.warn(f"task: its loss_func gives {theirs:.6g} on the first training example where the "
                          f"cross-entropy EK-FAC's fit differentiates gives {ours:.6g}; pass loss=... (logits, "
                          "labels) -> the batch's summed loss (a scalar) for your training loss", stacklevel=3)

    def _require_cache(self):
        if self.ekfac is None:
            raise RuntimeError("call .cache(full_train_dataloader) before .attribute(...)")

    def attribute(self, train_dataloader, test_dataloader) -> torch.Tensor:
        """(n_train, n_test) influence of each training example on each test point's measurement (positive: the
        example supports the test label)."""
        self._require_cache()
        qx, qy = _test_points(test_dataloader)
        with named_as({"train_loader": "train_dataloader"}):
            return self.ekfac.score(qx, qy, train_dataloader).T


class DeltaInfluenceAttributor(EKFACAttributor):
    """dattri attributor with Δ-Influence's evidence (module docstring); ``settings`` are
    :class:`deltainf.DeltaInfluence`'s keyword arguments (n_transforms, domain, ...). The test points are traced one
    by one (the paper's one-point protocol) with their test labels; :attr:`results` keeps each point's
    :class:`deltainf.DetectionResult` (with its flagged set and verdict)."""

    def __init__(self, task, module_name: Union[str, list[str], None] = None, device: str = "cpu",
                 damping: Union[float, str, None] = 1e-8, settings: dict | None = None, **options) -> None:
        from deltainf.delta import DeltaInfluence

        super().__init__(task, module_name, device, damping, **options)
        self.settings = {"check_prediction": False, **(settings or {})}
        try:  # a typo or a bad value now, not after the fit
            DeltaInfluence.check_settings(**self.settings)
        except (TypeError, ValueError) as err:
            raise type(err)(f"settings: {err}") from None
        self.results: list = []

    def attribute(self, train_dataloader, test_dataloader) -> torch.Tensor:
        from deltainf.delta import DeltaInfluence

        self._require_cache()
        qx, qy = _test_points(test_dataloader)
        detector = DeltaInfluence(self.ekfac, model=self.model, **self.settings)
        with named_as({"train_loader": "train_dataloader"}):
            self.results = [detector.detect(train_dataloader, qx[q:q + 1], int(qy[q])) for q in range(qx.shape[0])]
        return torch.stack([r.votes[0].float() / detector.n_transforms for r in self.results], 1)
