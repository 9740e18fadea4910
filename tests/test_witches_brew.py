"""Witches' Brew: constraint set, clean-label property, the matching objective decreasing, validation."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from deltainf.attacks.base import PoisonResult
from deltainf.attacks.witches_brew import (BrewValidation, WitchesBrew, WitchesBrewResult, differentiable_augment,
                                           select_target, validate_brew, witches_brew_attack)
from deltainf.data import ImageDataset, load_digits_dataset
from deltainf.train import TrainConfig, train_model

EPS = 8 / 255


@pytest.fixture(scope="module")
def data():
    train = load_digits_dataset("train", size=8, channels=1).subset(torch.arange(400))
    test = load_digits_dataset("test", size=8, channels=1)
    return train, test


@pytest.fixture(scope="module")
def surrogate(data):
    train, _ = data
    cfg = TrainConfig.digits(progress=False, epochs=10, lr=1e-2, model_kwargs=dict(width=8, hidden=32))
    return train_model(train, cfg)


@pytest.fixture(scope="module")
def brew(data, surrogate):
    train, test = data
    return witches_brew_attack(train, test, surrogate, num_poisons=12, seed=3, eps=EPS, restarts=2, iterations=12,
                               flip=False, progress=False)


def test_result_is_a_poison_result(brew, data):
    train, test = data
    assert isinstance(brew, WitchesBrewResult) and isinstance(brew, PoisonResult)
    assert brew.name == "witches_brew"
    assert brew.num_poisons == 12 == brew.delta.shape[0]
    assert brew.target_class == brew.intended_class != brew.target_true_class
    assert brew.source_classes == (brew.intended_class,)
    # the target keeps its TRUE label in triggered_test; the adversarial label is separate
    assert brew.triggered_test.labels.tolist() == [brew.target_true_class]
    assert brew.target_y_adv.tolist() == [brew.intended_class]
    idx = int(brew.test_indices[0])
    assert torch.equal(brew.target_x[0], test.images[idx])
    assert int(test.labels[idx]) == brew.target_true_class


def test_poisons_within_eps_clean_label_and_only_intended_class_changed(brew, data):
    train, _ = data
    poisoned = brew.train
    assert len(poisoned) == len(train)
    # labels are untouched (clean-label attack)
    assert torch.equal(poisoned.labels, train.labels)
    assert torch.equal(brew.original_labels, train.labels[brew.poison_indices])
    diff = (poisoned.images - train.images).abs().flatten(1).amax(1)
    changed = torch.nonzero(diff > 0).flatten()
    # only poison rows change, and every poison is an image of the intended class
    assert set(changed.tolist()) <= set(brew.poison_indices.tolist())
    assert changed.numel() > 0
    assert bool((train.labels[brew.poison_indices] == brew.intended_class).all())
    # l_inf budget in pixel space, valid pixel range
    assert float(diff.max()) <= EPS + 1e-6
    assert float(poisoned.images.min()) >= 0.0 and float(poisoned.images.max()) <= 1.0
    torch.testing.assert_close(poisoned.images[brew.poison_indices], train.images[brew.poison_indices] + brew.delta)
    assert float(brew.delta.abs().max()) <= EPS + 1e-6


def test_restarts_keep_the_lowest_loss(brew):
    assert len(brew.restart_losses) == 2
    assert brew.matching_loss == min(brew.restart_losses)
    assert brew.loss_history[-1] == brew.matching_loss


def test_tiny_run_reduces_the_matching_loss(data, surrogate):
    train, test = data
    # without augmentation the objective is deterministic, so the decrease is not masked by sampling noise
    res = witches_brew_attack(train, test, surrogate, num_poisons=10, seed=1, eps=16 / 255, restarts=1,
                              iterations=15, augment=False, progress=False)
    h = res.loss_history
    assert len(h) == 15
    assert 0.0 <= min(h) and max(h) <= 2.0  # 1 - cosine
    assert h[-1] < h[0] - 0.05, h
    # with augmentation (the default) it still goes down over a short run
    res = witches_brew_attack(train, test, surrogate, num_poisons=10, seed=1, eps=16 / 255, restarts=1,
                              iterations=15, flip=False, progress=False)
    assert min(res.loss_history[-3:]) < res.loss_history[0], res.loss_history


def test_craft_is_deterministic(data, surrogate):
    train, test = data
    kw = dict(num_poisons=5, seed=7, eps=EPS, restarts=1, iterations=3, progress=False)
    a = witches_brew_attack(train, test, surrogate, **kw)
    b = witches_brew_attack(train, test, surrogate, **kw)
    assert torch.equal(a.poison_indices, b.poison_indices)
    assert torch.equal(a.delta, b.delta)


def test_intended_class_alone_draws_the_target_from_the_other_classes(data, surrogate):
    """A fixed intended_class with no target_index: the target's class is drawn among the others, so the
    draw never lands on the intended class itself (it used to for about one seed in ten)."""
    train, test = data
    for seed in range(12):
        i, tc, ic = select_target(test, 10, seed=seed, intended_class=4)
        assert ic == 4 and tc != 4 and int(test.labels[i]) == tc
    assert select_target(test, 10, seed=3) == select_target(test, 10, seed=3, intended_class=None)
    with pytest.raises(ValueError, match=r"intended_class: expected an int in \[0, 10\), got 10"):
        select_target(test, 10, intended_class=10)
    for seed in range(3):
        target = select_target(test, 10, seed=seed)[1]  # the class the plain draw picks: now never the target
        res = witches_brew_attack(train, test, surrogate, intended_class=target, num_poisons=2, seed=seed,
                                  restarts=1, iterations=1, progress=False)
        assert res.intended_class == target != res.target_true_class
        assert int(test.labels[int(res.test_indices[0])]) == res.target_true_class


def _dropout_net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)).to(dtype)


def test_dropout_surrogate_is_reproducible_and_leaves_the_global_rng(data):
    """Dropout stays active while crafting and draws from torch's global RNG: seeded from ``seed`` inside the
    call, so the caller's random state neither changes the poisons nor is advanced by them."""
    train, test = data
    model = _dropout_net()
    kw = dict(target_index=0, num_poisons=4, seed=0, restarts=1, iterations=3, progress=False)
    torch.manual_seed(1)
    a = witches_brew_attack(train, test, model, **kw)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = witches_brew_attack(train, test, model, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.delta, b.delta) and float(a.delta.abs().max()) > 0
    c = witches_brew_attack(train, test, model, **{**kw, "seed": 1})
    assert not torch.equal(a.delta, c.delta)


def test_float64_surrogate(data):
    train, test = data
    model = _dropout_net(torch.float64)
    res = witches_brew_attack(train, test, model, target_index=0, num_poisons=4, seed=0, eps=EPS, restarts=1,
                              iterations=3, progress=False)
    assert res.train.images.dtype == torch.float32 and res.delta.dtype == torch.float32
    assert 0 < float(res.delta.abs().max()) <= EPS + 1e-6
    torch.testing.assert_close(res.train.images[res.poison_indices], train.images[res.poison_indices] + res.delta)


@pytest.mark.parametrize("seed, error, match", [
    (1.5, TypeError, "seed must be an int, got 1.5"), (None, TypeError, "seed must be an int, got None"),
    (True, TypeError, "seed must be an int, got True"), ("1", TypeError, "seed must be an int, got '1'"),
])
def test_seed_is_checked_not_cut(data, surrogate, seed, error, match):
    train, test = data
    with pytest.raises(error, match=match):
        witches_brew_attack(train, test, surrogate, target_index=0, num_poisons=2, seed=seed, restarts=1,
                            iterations=1, progress=False)


def test_surrogate_is_left_untouched(data, surrogate):
    train, test = data
    before = {k: v.clone() for k, v in surrogate.state_dict().items()}
    surrogate.train()
    witches_brew_attack(train, test, surrogate, num_poisons=4, eps=EPS, restarts=1, iterations=2, progress=False)
    assert surrogate.training
    surrogate.eval()
    for k, v in surrogate.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_select_target_threat_model(data):
    _, test = data
    for seed in range(5):
        i, tc, ic = select_target(test, 10, seed=seed)
        assert int(test.labels[i]) == tc and tc != ic and 0 <= ic < 10
    assert select_target(test, 10, seed=4) == select_target(test, 10, seed=4)


def test_differentiable_augment():
    x = torch.rand(3, 2, 6, 6, requires_grad=True)
    # no shift, no flip: identity
    torch.testing.assert_close(differentiable_augment(x, max_shift=0, flip=False), x)
    # flip only: exact horizontal mirror for the flipped images, identity for the others
    g = torch.Generator().manual_seed(0)
    out = differentiable_augment(x, max_shift=0, flip=True, generator=g)
    for i in range(3):
        assert torch.allclose(out[i], x[i], atol=1e-6) or torch.allclose(out[i], x[i].flip(-1), atol=1e-6)
    # differentiable w.r.t. the input
    y = differentiable_augment(x, max_shift=1.5, generator=torch.Generator().manual_seed(1))
    y.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    # fill: constant images of the fill value stay constant whatever the shift
    c = torch.full((2, 1, 5, 5), 0.3)
    torch.testing.assert_close(differentiable_augment(c, max_shift=2, fill=torch.tensor([0.3])), c)


class _Constant(nn.Module):
    def __init__(self, k: int, cls: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.k, self.cls = k, cls

    def forward(self, x):
        z = torch.zeros(x.shape[0], self.k) + self.w
        z[:, self.cls] = 1.0
        return z


def test_validate_brew_counts_intended_predictions(brew):
    seen = []

    def fool(ds, seed):
        seen.append((len(ds), seed))
        return _Constant(10, brew.intended_class)

    v = validate_brew(brew, fool, runs=3, seed=5)
    assert isinstance(v, BrewValidation)
    assert v.success_rate == 1.0 and v.predictions.shape == (3, 1)
    assert [s for _, s in seen] == [5, 6, 7] and all(n == len(brew.train) for n, _ in seen)
    v = validate_brew(brew, lambda ds, s: _Constant(10, brew.target_true_class))
    assert v.success_rate == 0.0
    # the default train_fn retrains with deltainf.train
    v = validate_brew(brew, config=TrainConfig.digits(progress=False, epochs=1,
                                                      model_kwargs=dict(width=4, hidden=16)))
    assert v.predictions.shape == (1, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.0), "eps"), (dict(eps=1.5), "eps"), (dict(eps=-0.1), "eps"), (dict(eps=True), "eps"),
    (dict(fraction=0.0), "fraction"), (dict(fraction=1.5), "fraction"), (dict(num_poisons=0), "num_poisons"),
    (dict(num_poisons=10_000), "num_poisons"), (dict(num_poisons=3, fraction=0.1), "num_poisons"),
    (dict(restarts=0), "restarts"), (dict(iterations=0), "iterations"), (dict(init="ones"), "init"),
    (dict(tau=float("inf")), "tau: expected a finite step size > 0, got inf"), (dict(tau=0.0), "tau"),
    (dict(intended_class=10), r"intended_class: expected an int in \[0, 10\)"),
    (dict(target_index=10_000), "target_index"),
])
def test_bad_arguments(data, surrogate, kwargs, match):
    train, test = data
    with pytest.raises(ValueError, match=match):
        witches_brew_attack(train, test, surrogate, **kwargs)


def test_bad_craft_inputs(data, surrogate):
    train, test = data
    wb = WitchesBrew(restarts=1, iterations=1, progress=False)
    c0 = train.indices_of_class(0)
    with pytest.raises(ValueError, match="intended_class"):
        wb.craft(surrogate, train, test.images[0], 0, 0, c0[:2])
    with pytest.raises(ValueError, match="intended_class"):  # poisons must come from the intended class
        wb.craft(surrogate, train, test.images[0], 1, 0, train.indices_of_class(2)[:2])
    with pytest.raises(ValueError, match="target_x"):
        wb.craft(surrogate, train, torch.rand(3, 8, 8), 1, 0, c0[:2])
    with pytest.raises(TypeError, match="model"):
        wb.craft("not a model", train, test.images[0], 1, 0, c0[:2])
    with pytest.raises(ValueError, match="intended_class"):
        witches_brew_attack(train, test, surrogate, target_index=0, intended_class=int(test.labels[0]))


def test_generic_dataset_input(data, surrogate):
    """A plain torch Dataset yielding (x, y) works; the result still holds an ImageDataset."""
    train, test = data

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 60

        def __getitem__(self, i):
            return train.images[i], int(train.labels[i])

    res = witches_brew_attack(Plain(), test, surrogate, num_poisons=2, eps=EPS, restarts=1, iterations=2,
                              progress=False, seed=2)
    assert isinstance(res.train, ImageDataset) and len(res.train) == 60


@pytest.mark.slow
def test_end_to_end_digits_victims_move_towards_intended_class():
    """Craft on a clean digits surrogate, retrain fresh victims from scratch (the reference's validation),
    and check that the poisons push the target towards the intended class far more than clean retraining.
    About 1-2 minutes on 2 CPU cores."""
    train = load_digits_dataset("train")
    test = load_digits_dataset("test")
    cfg = TrainConfig.digits(progress=False)
    surrogate = train_model(train, cfg)
    res = witches_brew_attack(train, test, surrogate, fraction=0.09, seed=2, eps=32 / 255, restarts=1,
                              iterations=250, flip=False, max_shift=1, progress=False)
    assert res.loss_history[-1] < 0.5 * res.loss_history[0]

    def probs(ds):
        out = []
        for s in range(2):
            m = train_model(ds, dataclasses.replace(cfg, seed=100 + s))
            with torch.no_grad():
                out.append(float(m(res.target_x).softmax(1)[0, res.intended_class]))
        return sum(out) / len(out)

    p_poisoned, p_clean = probs(res.train), probs(train)
    assert p_poisoned > 0.1 and p_poisoned > 5 * p_clean, (p_poisoned, p_clean)
