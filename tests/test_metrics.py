"""Tests for deltainf.metrics."""
import math

import numpy as np
import pytest
import torch

from deltainf import metrics as M


def test_detection_metrics_hand_computed():
    # N = 20, poisons {0..4}, flagged {3, 4, 5, 6, 7, 8}: TP 2, FP 4, FN 3, TN 11
    m = M.detection_metrics([3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4], 20)
    assert (m["flagged"], m["tp"], m["fp"], m["fn"], m["tn"]) == (6, 2, 4, 3, 11)
    assert m["n_poisons"] == 5 and m["n_train"] == 20
    assert m["precision"] == pytest.approx(2 / 6)
    assert m["recall"] == m["tpr"] == pytest.approx(2 / 5)
    assert m["fpr"] == pytest.approx(4 / 15)
    p, r = 2 / 6, 2 / 5
    assert m["f1"] == pytest.approx(2 * p * r / (p + r))


def test_detection_metrics_paper_badnet_example():
    # paper §3: Δ-Influence flags 3,265 of 50,000 with all 500 poisons
    flagged = torch.cat([torch.arange(500), torch.arange(10_000, 12_765)])
    m = M.detection_metrics(flagged, torch.arange(500), 50_000)
    assert m["tp"] == 500 and m["fp"] == 2765 and m["recall"] == 1.0
    assert m["precision"] == pytest.approx(500 / 3265)
    assert m["fpr"] == pytest.approx(2765 / 49_500)


def test_detection_metrics_forms_and_duplicates():
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 2]] = True
    a = M.detection_metrics(mask, torch.tensor([2, 3]), 10)
    b = M.detection_metrics([1, 2, 2, 1], (2, 3), 10)
    assert a == b and a["tp"] == 1 and a["flagged"] == 2


def test_detection_metrics_undefined_ratios_are_nan():
    m = M.detection_metrics([], [1, 2], 10)
    assert math.isnan(m["precision"]) and m["recall"] == 0.0 and m["fpr"] == 0.0
    m = M.detection_metrics([1], [], 10)
    assert math.isnan(m["recall"]) and m["precision"] == 0.0
    m = M.detection_metrics([0, 1], [0, 1], 2)
    assert math.isnan(m["fpr"]) and m["precision"] == 1.0
    m = M.detection_metrics([5], [1], 10)
    assert m["f1"] == 0.0
    assert M.detection_metrics([], [1, 2], 10)["f1"] == 0.0  # 2 TP / (flagged + poisons): defined (it was nan)
    assert math.isnan(M.detection_metrics([], [], 10)["f1"])


def test_detection_metrics_bad_inputs():
    with pytest.raises(ValueError, match=r"flagged must lie in \[0, 10\)"):
        M.detection_metrics([10], [1], 10)
    with pytest.raises(ValueError, match="poison_indices"):
        M.detection_metrics([1], [-1], 10)
    with pytest.raises(TypeError, match="integer"):
        M.detection_metrics(torch.tensor([1.0]), [1], 10)
    with pytest.raises(TypeError, match="integer"):
        M.detection_metrics([1.5], [1], 10)
    with pytest.raises(ValueError, match="n_train"):
        M.detection_metrics([1], [1], -3)
    with pytest.raises(ValueError, match="bool mask"):
        M.detection_metrics(torch.zeros(5, dtype=torch.bool), [1], 10)


def test_detection_metrics_take_masks_and_arrays_in_every_form():
    mask = np.zeros(10, dtype=bool)
    mask[[2, 7]] = True
    expected = M.detection_metrics(torch.tensor([2, 7]), [7], 10)
    for flagged in (mask, mask.tolist(), torch.from_numpy(mask), np.array([7, 2, 2])):
        assert M.detection_metrics(flagged, np.array([7]), 10) == expected
    assert M.detection_metrics(torch.tensor([]), [], 10)["flagged"] == 0  # an empty float tensor is no position


def test_poison_success_rate_excludes_target_class():
    pred = torch.tensor([5, 5, 1, 5, 5])
    true = torch.tensor([8, 8, 8, 5, 8])  # the 4th input is a real class-5 image: not counted
    assert M.poison_success_rate(pred, true, 5) == pytest.approx(3 / 4)
    assert M.poison_success_rate([1], [1], 1) != M.poison_success_rate([1], [1], 1)  # nan: nothing eligible
    assert M.poison_success_rate([1], [0], 1) == 1.0  # Witches' Brew: one target, 0 or 1
    with pytest.raises(ValueError, match="same length"):
        M.poison_success_rate([1, 2], [1], 1)


def test_clean_accuracy():
    assert M.clean_accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 0.75
    assert math.isnan(M.clean_accuracy([], []))
    with pytest.raises(TypeError, match="integer"):
        M.clean_accuracy(torch.tensor([0.5]), torch.tensor([1]))


class ByFirstPixel(torch.nn.Module):
    """Predicts the class stored in the first pixel (x[0, 0, 0] * 10)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 10).round().long()
        return torch.nn.functional.one_hot(cls, 10).float() * self.w


def images(classes):
    x = torch.zeros(len(classes), 1, 4, 4)
    x[:, 0, 0, 0] = torch.tensor(classes, dtype=torch.float32) / 10
    return x


def test_predict_and_evaluate_from_tensor_dataset_loader():
    model = ByFirstPixel()
    x = images([5, 5, 3, 5, 2])
    y = torch.tensor([8, 8, 8, 5, 8])
    pred, lab = M.predict(model, x, batch_size=2)
    assert pred.tolist() == [5, 5, 3, 5, 2] and lab is None
    data = [(x[i], int(y[i]), i) for i in range(5)]
    pred2, lab2 = M.predict(model, data, batch_size=2)
    assert torch.equal(pred, pred2) and lab2.tolist() == y.tolist()
    loader = torch.utils.data.DataLoader(data, batch_size=3)
    pred3, lab3 = M.predict(model, loader)
    assert torch.equal(pred, pred3) and torch.equal(lab2, lab3)
    assert M.evaluate_poison_success(model, data, 5) == pytest.approx(2 / 4)
    assert M.evaluate_poison_success(model, x, 5) == pytest.approx(3 / 5)  # no labels: all eligible
    assert M.evaluate_poison_success(model, x, 5, true_labels=y) == pytest.approx(2 / 4)
    assert M.evaluate_clean_accuracy(model, loader) == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="needs labels"):
        M.evaluate_clean_accuracy(model, x)
    assert model.training  # predict restores the mode
    # labels= beside data that carry their own: they must agree (a shuffling loader's predictions were scored
    # against labels in another order: 0.075 where the accuracy was 0.967, in a probe); a shuffling loader is read
    # in its dataset's order, so labels given for unlabelled inputs line up
    with pytest.raises(ValueError, match="^labels: the data carry labels of their own, which differ from these"):
        M.evaluate_clean_accuracy(model, loader, labels=y.flip(0))
    assert M.evaluate_clean_accuracy(model, loader, labels=y) == pytest.approx(1 / 5)
    shuffled = torch.utils.data.DataLoader(x, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert M.evaluate_clean_accuracy(model, shuffled, labels=[5, 5, 3, 5, 2]) == 1.0
    with pytest.raises(ValueError, match="^target must be a class index"):  # 3.7 was cut to 3
        M.evaluate_poison_success(model, x, 3.7)
