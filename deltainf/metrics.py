"""Detection and unlearning metrics.

Detection (flagged set S against the ground-truth poison set, N training examples):
``precision = TP / |S|``, ``recall = TPR = TP / #poisons``, ``FPR = FP / (N - #poisons)``.
Unlearning: poison success rate (triggered test inputs classified as the attack target, excluding
inputs whose true class is the target) and clean accuracy.

Undefined ratios (nothing flagged for precision, no poisons for recall, no clean examples for FPR,
no eligible inputs for the success rate) are ``float("nan")``; :mod:`deltainf.report` writes them as
JSON ``null``.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from deltainf._util import as_int, logits

__all__ = [
    "detection_metrics",
    "poison_success_rate",
    "clean_accuracy",
    "predict",
    "evaluate_poison_success",
    "evaluate_clean_accuracy",
]


def index_tensor(indices, n_train: int, name: str) -> torch.Tensor:
    """Unique int64 positions in [0, n_train), ascending, from integer positions or a bool mask of length n_train
    (:func:`deltainf.data.as_index_tensor`; out of range is a ValueError here)."""
    from deltainf.data.dataset import as_index_tensor

    try:
        return torch.unique(as_index_tensor(indices, n_train, name, unique=False))
    except IndexError as err:
        raise ValueError(str(err)) from None


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else float("nan")


def detection_metrics(flagged, poison_indices, n_train: int) -> dict[str, Any]:
    """Detection quality of a flagged set.

    Args:
        flagged: flagged training positions (int sequence / int64 tensor, or a bool mask of length N);
            duplicates are counted once.
        poison_indices: ground-truth poison positions (same forms).
        n_train: N, the training-set size.

    Returns:
        dict with ints ``n_train``, ``n_poisons``, ``flagged``, ``tp``, ``fp``, ``fn``, ``tn`` and floats
        ``precision`` (TP / flagged), ``recall`` and ``tpr`` (TP / poisons), ``fpr`` (FP / clean),
        ``f1``; nan where undefined.
    """
    n = as_int(n_train)
    if n is None or n < 0:
        raise ValueError(f"n_train must be a non-negative int, got {n_train!r}")
    n_train = n
    f = index_tensor(flagged, n_train, "flagged")
    p = index_tensor(poison_indices, n_train, "poison_indices")
    tp = int(torch.isin(f, p).sum())
    fp = int(f.numel()) - tp
    fn = int(p.numel()) - tp
    tn = n_train - int(p.numel()) - fp
    precision = _ratio(tp, int(f.numel()))
    recall = _ratio(tp, int(p.numel()))
    # = 2PR / (P + R) = 2 TP / (flagged + poisons): 0 when TP = 0 (nothing flagged among poisons included), nan when
    # there is neither a poison nor a flagged example
    f1 = _ratio(2 * tp, int(f.numel()) + int(p.numel()))
    return {
        "n_train": n_train,
        "n_poisons": int(p.numel()),
        "flagged": int(f.numel()),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "precision": precision,
        "recall": recall,
        "tpr": recall,
        "fpr": _ratio(fp, n_train - int(p.numel())),
        "f1": f1,
    }


def _labels(t, name: str) -> torch.Tensor:
    t = torch.as_tensor(t).detach().cpu()
    if t.numel() == 0:
        return t.to(torch.int64).flatten()  # an empty list comes out as float32
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype {t.dtype}")
    return t.to(torch.int64).flatten()


def poison_success_rate(predictions, true_labels, target: int) -> float:
    """Fraction of triggered test inputs predicted as ``target``, over the inputs whose true class is
    not ``target`` (those would count as successes without any attack).

    predictions, true_labels: int (M,) (tensors or sequences). Returns a float in [0, 1]; nan when no
    input is eligible. For Witches' Brew (one target image) this is 0 or 1.
    """
    pred = _labels(predictions, "predictions")
    true = _labels(true_labels, "true_labels")
    if pred.shape != true.shape:
        raise ValueError("predictions and true_labels must have the same length, got "
                         f"{pred.numel()} and {true.numel()}")
    label = as_int(target)
    if label is None or label < 0:  # 3.7 was cut to 3
        raise ValueError(f"target must be a class index (an int >= 0), got {target!r}")
    keep = true != label
    return _ratio(int((pred[keep] == label).sum()), int(keep.sum()))


def clean_accuracy(predictions, labels) -> float:
    """Fraction of predictions equal to labels; int (M,) each. nan for M = 0."""
    pred = _labels(predictions, "predictions")
    lab = _labels(labels, "labels")
    if pred.shape != lab.shape:
        raise ValueError(f"predictions and labels must have the same length, got {pred.numel()} and {lab.numel()}")
    return _ratio(int((pred == lab).sum()), int(lab.numel()))


def predict(model: torch.nn.Module, data, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predicted classes of ``model`` (eval mode) on ``data``.

    data: a tensor (M, C, H, W), a map-style dataset yielding x / (x, y) / (x, y, index), or a
    DataLoader yielding batches (x, y[, index]). Returns (pred int64 (M,), labels int64 (M,) or None
    when the data carry no labels), both on CPU.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    preds, labels = [], []
    for xb, yb in _batches(data, batch_size):
        preds.append(logits(model, xb, batch_size, where="data").argmax(1))
        if yb is not None:
            labels.append(torch.as_tensor(yb).to(torch.int64).cpu().flatten())
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)
    lab = torch.cat(labels) if labels and len(labels) == len(preds) else None
    return pred, lab


def _given_labels(given, carried: torch.Tensor | None, name: str) -> torch.Tensor:
    """``given`` labels (in the data's order) where the data may carry their own: those must agree (a loader read in
    another order than the labels were given in scored the predictions against other inputs' labels)."""
    given = _labels(given, name)
    if carried is not None and (carried.shape != given.shape or not torch.equal(carried, given)):
        differ = int((carried != given).sum()) if carried.shape == given.shape else \
            f"{carried.numel()} vs {given.numel()}"
        raise ValueError(f"{name}: the data carry labels of their own, which differ from these ({differ}); leave "
                         f"{name} out to use the data's")
    return given


def _batches(data, batch_size: int):
    if isinstance(data, torch.Tensor):
        if data.ndim != 4:
            raise ValueError(f"data as a tensor must have shape (M, C, H, W), got {tuple(data.shape)}")
        for i in range(0, data.shape[0], batch_size):
            yield data[i:i + batch_size], None
        return
    if isinstance(data, torch.utils.data.DataLoader):
        from deltainf.data.loaders import in_dataset_order

        for batch in in_dataset_order(data):  # a shuffling loader in its dataset's order: labels given line up
            if isinstance(batch, (tuple, list)):
                yield batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                yield batch, None
        return
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        m = len(data)
        for i in range(0, m, batch_size):
            rows = [data[j] for j in range(i, min(m, i + batch_size))]
            if isinstance(rows[0], (tuple, list)):
                xb = torch.stack([torch.as_tensor(r[0]) for r in rows])
                yb = torch.as_tensor([int(r[1]) for r in rows]) if len(rows[0]) > 1 else None
            else:
                xb, yb = torch.stack([torch.as_tensor(r) for r in rows]), None
            yield xb, yb
        return
    raise TypeError(f"data must be a tensor, a map-style dataset or a DataLoader, got {type(data).__name__}")


def evaluate_poison_success(model: torch.nn.Module, triggered_data, target: int, true_labels=None,
                            batch_size: int = 256) -> float:
    """:func:`poison_success_rate` of ``model`` on triggered test inputs. The true labels come from
    the data (datasets / loaders yielding (x, y, ...)) or ``true_labels``; a plain tensor of inputs
    with no labels counts every input as eligible."""
    pred, lab = predict(model, triggered_data, batch_size)
    if true_labels is not None:
        lab = _given_labels(true_labels, lab, "true_labels")
    if lab is None:
        lab = torch.full_like(pred, -1)  # no labels: nothing is excluded
    return poison_success_rate(pred, lab, target)


def evaluate_clean_accuracy(model: torch.nn.Module, test_data, labels=None, batch_size: int = 256) -> float:
    """:func:`clean_accuracy` of ``model`` on clean test data (labels from the data or ``labels``)."""
    pred, lab = predict(model, test_data, batch_size)
    if labels is not None:
        lab = _given_labels(labels, lab, "labels")
    if lab is None:
        raise ValueError("evaluate_clean_accuracy needs labels: pass a labelled dataset/loader or labels=...")
    return clean_accuracy(pred, lab)
