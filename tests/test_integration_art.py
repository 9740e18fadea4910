"""deltainf.integrations.art: Δ-Influence as an ART PoisonFilteringDefence, tested the way ART tests its poison
defences (detect_poison -> (report, is_clean_lst); evaluate_defence -> the JSON confusion matrix per class)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("art")
from art.defences.detector.poison import PoisonFilteringDefence  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402

from deltainf.attacks import DIGITS_BADNET, badnet_attack  # noqa: E402
from deltainf.data import load_digits_dataset  # noqa: E402
from deltainf.delta import pick_affected_points  # noqa: E402
from deltainf.integrations.art import DeltaInfluenceDefence  # noqa: E402
from deltainf.train import TrainConfig, train_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def poisoned_art():
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    poison = badnet_attack(train, test, seed=0, **DIGITS_BADNET)
    victim = train_model(poison.train, TrainConfig.digits(epochs=6, progress=False))
    classifier = PyTorchClassifier(victim, loss=nn.CrossEntropyLoss(), input_shape=tuple(train.image_shape),
                                   nb_classes=10, clip_values=(0.0, 1.0))
    points = pick_affected_points(victim, poison.triggered_test, poison.target_class, count=5)
    return poison, test, classifier, points


def test_detect_poison_and_evaluate_defence(poisoned_art):
    poison, test, classifier, points = poisoned_art
    x_train = poison.train.images.numpy()
    y_train = np.eye(10)[poison.train.labels.numpy()]  # ART's usual one-hot labels
    defence = DeltaInfluenceDefence(classifier, x_train, y_train, x_reference=test.images.numpy(),
                                    y_reference=test.labels.numpy(), n_transforms=20)
    assert isinstance(defence, PoisonFilteringDefence)
    report, is_clean_lst = defence.detect_poison(x_affected=points.x.numpy(), y_affected=poison.target_class)
    assert len(is_clean_lst) == len(x_train) and set(is_clean_lst) <= {0, 1}
    flagged = {i for i, c in enumerate(is_clean_lst) if c == 0}
    assert flagged == set(report["flagged"]) and report["found"]
    poisons = set(poison.poison_indices.tolist())
    assert len(flagged & poisons) >= 0.9 * len(poisons) and len(flagged - poisons) <= 0.02 * len(x_train)

    is_clean = np.ones(len(x_train), dtype=int)
    is_clean[list(poisons)] = 0
    matrix = json.loads(defence.evaluate_defence(is_clean))
    target = matrix[f"class_{poison.target_class}"]  # the poisons carry the target label
    assert target["TruePositive"]["rate"] >= 90  # ART's rates are percentages
    false_pos = sum(m["FalsePositive"]["numerator"] for m in matrix.values())
    clean = sum(m["FalsePositive"]["denominator"] for m in matrix.values())
    assert clean == len(x_train) - len(poisons) and false_pos == len(flagged - poisons) <= 0.02 * clean


def test_the_fit_follows_the_classifier(poisoned_art):
    """ART trains a classifier in place (classifier.fit): the defence refits EK-FAC when the weights changed since
    its fit, and reuses it otherwise."""
    import copy

    poison, test, classifier, points = poisoned_art
    classifier = copy.deepcopy(classifier)
    x_train, y_train = poison.train.images.numpy()[:300], poison.train.labels.numpy()[:300]
    defence = DeltaInfluenceDefence(classifier, x_train, y_train, x_affected=points.x.numpy()[:1],
                                    y_affected=poison.target_class, n_transforms=4)
    defence.detect_poison()
    first = defence._ekfac
    defence.detect_poison()
    assert defence._ekfac is first
    with torch.no_grad():
        next(classifier.model.parameters()).mul_(1.01)
    defence.detect_poison()
    assert defence._ekfac is not first and not defence._ekfac.weights_changed
    # Δ-Influence's settings through detect_poison (ART's set_params keeps only its own), ART's one-hot label
    defence.detect_poison(n_transforms=6, y_affected=np.eye(10)[poison.target_class])
    assert defence.result.settings["n_transforms"] == 6 and defence.result.n_transforms == 6
    with pytest.raises(ValueError, match="n_transform: not a setting of this defence"):
        defence.detect_poison(n_transform=6)


def test_defence_names_what_is_missing(poisoned_art):
    poison, _, classifier, _ = poisoned_art
    x, y = poison.train.images.numpy(), poison.train.labels.numpy()
    with pytest.raises(ValueError, match="x_affected, y_affected"):
        DeltaInfluenceDefence(classifier, x, y).detect_poison()
    with pytest.raises(TypeError, match="classifier: expected an ART PyTorchClassifier"):
        DeltaInfluenceDefence(object(), x, y)
    with pytest.raises(ValueError, match="x_train, y_train"):
        DeltaInfluenceDefence(classifier, x, y[:-1])
    with pytest.raises(ValueError, match="is_clean"):
        DeltaInfluenceDefence(classifier, x, y).evaluate_defence(np.ones(3))


def test_a_rejected_setting_is_not_kept(poisoned_art):
    """detect_poison(fdr=2) fails; the defence keeps its earlier settings, so the next call (and evaluate_defence)
    work (before, fdr=2 was stored and every later call failed with it)."""
    poison, _, classifier, points = poisoned_art
    x, y = poison.train.images.numpy()[:300], poison.train.labels.numpy()[:300]
    defence = DeltaInfluenceDefence(classifier, x, y, x_affected=points.x.numpy()[:1], y_affected=poison.target_class,
                                    n_transforms=4)
    with pytest.raises(ValueError, match="^fdr must be a number in \\(0, 1\\)"):
        defence.detect_poison(fdr=2)
    assert defence.settings == {"n_transforms": 4}
    defence.detect_poison()
    assert defence.result.n_transforms == 4


def test_a_rejected_batch_size_is_not_kept_and_the_network_keeps_its_mode(poisoned_art):
    """ART's set_params stores a value before it checks it: detect_poison(batch_size="64") failed, and so did every
    later call; detect_poison left the user's network in eval mode."""
    poison, _, classifier, points = poisoned_art
    x, y = poison.train.images.numpy()[:300], poison.train.labels.numpy()[:300]
    defence = DeltaInfluenceDefence(classifier, x, y, x_affected=points.x.numpy()[:1], y_affected=poison.target_class,
                                    n_transforms=4, batch_size=100)
    with pytest.raises(ValueError, match="^batch_size: expected an int >= 1, got '64'"):
        defence.detect_poison(batch_size="64")
    assert defence.batch_size == 100
    classifier.model.train()
    try:
        defence.detect_poison()
        assert classifier.model.training
    finally:
        classifier.model.eval()


def test_inputs_outside_the_clip_values_are_named(poisoned_art):
    """0-255 images for a classifier whose clip_values are (0, 1) ended in "every training example's score is exactly
    0", blamed on the damping."""
    poison, _, classifier, points = poisoned_art
    defence = DeltaInfluenceDefence(classifier, poison.train.images.numpy()[:300] * 255,
                                    poison.train.labels.numpy()[:300], x_affected=points.x.numpy()[:1],
                                    y_affected=poison.target_class)
    with pytest.raises(ValueError, match="^x_train: values in \\[0, 255\\] lie outside the classifier's clip_values "
                                         "\\(0, 1\\)"):
        defence.detect_poison()


@pytest.mark.parametrize("y_train, message", [
    (np.zeros((300, 10)), "^y_train: row 0 of the one-hot / score rows has no single largest entry"),
    (np.eye(9)[np.arange(300) % 9], "^y_train: one-hot rows of 9 columns, but there are 10 classes")])
def test_one_hot_labels_are_checked(poisoned_art, y_train, message):
    """An all-zero row was read as class 0, and 9-column one-hot rows for 10 classes turned every 9 into a 0: the
    detection ran on the wrong labels ("nothing found") without a word."""
    poison, _, classifier, points = poisoned_art
    defence = DeltaInfluenceDefence(classifier, poison.train.images.numpy()[:300], y_train,
                                    x_affected=points.x.numpy()[:1], y_affected=poison.target_class)
    with pytest.raises(ValueError, match=message):
        defence.detect_poison()


@pytest.mark.parametrize("settings, message", [({"n_transform": 6}, "n_transform: not a setting of this defence"),
                                               ({"fdr": 2}, "fdr must be a number in")])
def test_the_constructor_checks_its_settings(poisoned_art, settings, message):
    poison, _, classifier, _ = poisoned_art
    with pytest.raises(ValueError, match=message):
        DeltaInfluenceDefence(classifier, poison.train.images.numpy(), poison.train.labels.numpy(), **settings)


@pytest.mark.parametrize("is_clean", [np.full(300, 0.5), np.full(300, 2), -np.ones(300, dtype=int)])
def test_is_clean_must_be_zeros_and_ones(poisoned_art, is_clean):
    """0.5 gave a confusion matrix built from it, 2 or -1 ART's bare 'wrong class' error after the whole detection."""
    poison, _, classifier, points = poisoned_art
    defence = DeltaInfluenceDefence(classifier, poison.train.images.numpy()[:300], poison.train.labels.numpy()[:300],
                                    x_affected=points.x.numpy()[:1], y_affected=poison.target_class)
    with pytest.raises(ValueError, match="^is_clean: expected one 0/1 entry per training example \\(300\\)"):
        defence.evaluate_defence(is_clean)
    assert defence._ekfac is None  # refused before any work


@pytest.mark.parametrize("change, message", [
    ({"y_affected": 10}, "^y_affected: class indices must lie in \\[0, 10\\), got 10"),
    ({"y_affected": 2.7}, "^y_affected: expected class indices \\(whole numbers\\), got 2.7"),
    ({"y_affected": [5, 5, 5]}, "^y_affected must hold one label per affected point \\(2\\)"),
    ({"x_affected": "flat"}, "^x_affected has shape \\(2, 768\\), but the training inputs"),
    ({"y_train": 10}, "^y_train: class indices must lie in \\[0, 10\\)"),
    ({"y_train": 2.5}, "^y_train: expected class indices \\(whole numbers\\)")])
def test_errors_name_the_defence_arguments(poisoned_art, change, message):
    """Named as the defence's arguments, not DeltaInfluence's test_x / test_y_adv / train_loader, and a float label
    is refused instead of cut to an int."""
    poison, _, classifier, points = poisoned_art
    x, y = poison.train.images.numpy()[:300], poison.train.labels.numpy()[:300]
    x_affected = points.x.numpy()[:2]
    if change.get("x_affected") == "flat":
        x_affected = x_affected.reshape(2, -1)
    if "y_train" in change:
        y = np.full(len(x), change["y_train"])
    defence = DeltaInfluenceDefence(classifier, x, y, x_affected=x_affected,
                                    y_affected=change.get("y_affected", poison.target_class), n_transforms=4)
    with pytest.raises(ValueError, match=message):
        defence.detect_poison()



def test_keras_style_labels_and_a_channels_last_classifier(poisoned_art):
    """(N, 1) integer labels (Keras' load_data) were read as one-hot rows of one class: every label 0, and the
    defence found nothing; a channels-last classifier's images reached the transforms as (H, W, C); one one-hot row
    for several affected inputs is their shared label; a reference without labels is named."""
    poison, test, classifier, points = poisoned_art
    x_train, labels = poison.train.images.numpy(), poison.train.labels.numpy()
    column = DeltaInfluenceDefence(classifier, x_train, labels[:, None], x_reference=test.images.numpy(),
                                   y_reference=test.labels.numpy()[:, None], n_transforms=20)
    flat = DeltaInfluenceDefence(classifier, x_train, labels, x_reference=test.images.numpy(),
                                 y_reference=test.labels.numpy(), n_transforms=20)
    target = np.eye(10)[poison.target_class]  # one row for the 5 points
    found = [d.detect_poison(x_affected=points.x.numpy(), y_affected=target)[0]["flagged"] for d in (column, flat)]
    assert found[0] == found[1] and len(set(found[0]) & set(poison.poison_indices.tolist())) >= 60

    class ChannelsLast(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):  # (B, H, W, C) as a channels-last classifier's network takes it
            return self.inner(x.permute(0, 3, 1, 2))

    nhwc = PyTorchClassifier(ChannelsLast(classifier.model), loss=nn.CrossEntropyLoss(),
                             input_shape=tuple(np.moveaxis(x_train[0], 0, -1).shape), nb_classes=10,
                             clip_values=(0.0, 1.0), channels_first=False)
    last = DeltaInfluenceDefence(nhwc, np.moveaxis(x_train, 1, -1), labels, x_reference=np.moveaxis(
        test.images.numpy(), 1, -1), y_reference=test.labels.numpy(), n_transforms=20)
    report, _ = last.detect_poison(x_affected=np.moveaxis(points.x.numpy(), 1, -1), y_affected=poison.target_class)
    assert report["flagged"] == found[1]
    # the pixels are the classifier's own (clip_values and its mean/std preprocessing), not a range estimate
    pixel_map = last.result.settings["pixel_map"]
    assert pixel_map["source"] == "the classifier's clip_values and mean/std preprocessing"
    assert pixel_map["offset"] == [0.0] * x_train.shape[1] and pixel_map["scale"] == [1.0] * x_train.shape[1]
    with pytest.raises(ValueError, match="^x_reference, y_reference: pass both"):
        DeltaInfluenceDefence(classifier, x_train, labels, x_reference=test.images.numpy(), n_transforms=4
                              ).detect_poison(x_affected=points.x.numpy(), y_affected=poison.target_class)
