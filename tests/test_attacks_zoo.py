"""The zoo's attacks: blended, WaNet (with noise mode), SIG and label-consistent — exact bookkeeping,
trigger formulas, and whether each takes on digits with its digits setting."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deltainf.attacks import (DIGITS_BLENDED, DIGITS_LABEL_CONSISTENT, DIGITS_SIG, DIGITS_WANET, BlendTrigger,
                              CornerTrigger, SinusoidTrigger, WarpTrigger, blended_attack, label_consistent_attack,
                              pgd_away, sig_attack, wanet_attack)
from deltainf.data import load_digits_dataset
from deltainf.train import TrainConfig, accuracy, train_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset("train"), load_digits_dataset("test")


@pytest.fixture(scope="module")
def clean_model(digits):
    return train_model(digits[0], TrainConfig.digits(epochs=6, progress=False))


def changed_rows(clean, poisoned):
    diff = (clean.images != poisoned.images).flatten(1).any(1) | (clean.labels != poisoned.labels)
    return diff.nonzero().flatten()


def test_blend_trigger_formula_and_seed():
    t = BlendTrigger((3, 8, 8), alpha=0.25, seed=3)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(t(x), 0.75 * x + 0.25 * t.pattern)
    assert torch.equal(t.pattern, BlendTrigger((3, 8, 8), alpha=0.5, seed=3).pattern)
    assert not torch.equal(t.pattern, BlendTrigger((3, 8, 8), seed=4).pattern)
    with pytest.raises(ValueError, match="alpha"):
        BlendTrigger((3, 8, 8), alpha=0.0)
    with pytest.raises(ValueError, match="shape"):
        BlendTrigger((3, 8, 8), pattern=torch.rand(3, 4, 4))


def test_blended_changes_exactly_the_reported_indices(digits):
    train, test = digits
    p = blended_attack(train, test, seed=1, **DIGITS_BLENDED)
    assert p.num_poisons == round(0.1 * len(train)) and p.name == "blended"
    assert torch.equal(changed_rows(train, p.train), p.poison_indices)
    assert bool((p.train.labels[p.poison_indices] == 0).all())
    assert bool((p.triggered_test.labels != 0).all()) and len(p.triggered_test) == int((test.labels != 0).sum())


def test_warp_trigger_is_the_wanet_grid():
    t = WarpTrigger((1, 16, 16), k=4, s=0.5, seed=0)
    gen = torch.Generator().manual_seed(0)
    ins = torch.rand((1, 2, 4, 4), generator=gen, dtype=torch.float64) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=(16, 16), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    lin = torch.linspace(-1, 1, 16, dtype=torch.float64)
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    grid = (torch.stack((gx, gy), -1).unsqueeze(0) + 0.5 * noise / 16).clamp(-1, 1)
    torch.testing.assert_close(t.grid, grid)
    x = torch.rand(3, 1, 16, 16)
    expect = F.grid_sample(x, grid.float().expand(3, -1, -1, -1), align_corners=True).clamp(0, 1)
    torch.testing.assert_close(t(x), expect)
    tiny = WarpTrigger((1, 16, 16), k=4, s=1e-6, seed=0)
    torch.testing.assert_close(tiny(x), x, atol=1e-4, rtol=0)  # no warp: the identity grid


def test_wanet_noise_mode_bookkeeping(digits):
    train, test = digits
    p = wanet_attack(train, test, target_class=0, fraction=0.05, s=2.0, cross_ratio=2.0, seed=0)
    cross = torch.tensor(p.params["cross_indices"])
    assert cross.numel() == 2 * p.num_poisons and not set(cross.tolist()) & set(p.poison_indices.tolist())
    changed = set(changed_rows(train, p.train).tolist())
    assert set(p.poison_indices.tolist()) <= changed and changed <= set(p.poison_indices.tolist()) | set(cross.tolist())
    assert torch.equal(p.train.labels[cross], train.labels[cross])  # noise-mode copies keep their labels
    assert bool((p.train.labels[p.poison_indices] == 0).all())


def test_sinusoid_and_corner_triggers():
    t = SinusoidTrigger((3, 4, 12), delta=0.1, frequency=3)
    x = torch.full((3, 4, 12), 0.5)
    j = torch.arange(12, dtype=torch.float64)
    torch.testing.assert_close(t(x)[1, 2], (0.5 + 0.1 * torch.sin(2 * math.pi * j * 3 / 12)).float())
    c = CornerTrigger((1, 10, 10), size=3)
    y = c(torch.full((1, 10, 10), 0.5))
    for r, col in ((0, 0), (0, 7), (7, 0), (7, 7)):
        assert float(y[0, r, col]) == 1.0  # each corner patch starts with a white pixel
    assert float(y[0, 5, 5]) == 0.5


def test_clean_label_attacks_keep_labels(digits, clean_model):
    train, test = digits
    sig = sig_attack(train, test, seed=0, **DIGITS_SIG)
    target = DIGITS_SIG["target_class"]
    assert torch.equal(sig.train.labels, train.labels) and bool((train.labels[sig.poison_indices] == target).all())
    assert torch.equal(changed_rows(train, sig.train), sig.poison_indices)
    assert sig.num_poisons == int((train.labels == target).sum())  # fraction 1.0 of the class
    assert bool((sig.triggered_test.labels != target).all())
    lc = label_consistent_attack(train, test, clean_model, seed=0, target_class=7, fraction=0.5, eps=16 / 255, steps=5)
    assert torch.equal(lc.train.labels, train.labels)
    inner = lc.train.images[lc.poison_indices][:, :, 4:12, 4:12] - train.images[lc.poison_indices][:, :, 4:12, 4:12]
    assert float(inner.abs().max()) <= 16 / 255 + 1e-6  # the PGD budget away from the corner patches
    with pytest.raises(ValueError, match="target class"):
        sig_attack(train, test, target_class=3, num_poisons=10_000)


def test_pgd_away_raises_the_loss_within_the_budget(digits, clean_model):
    x, y = digits[1].images[:32], digits[1].labels[:32]
    adv = pgd_away(clean_model, x, y, eps=8 / 255, steps=5)
    assert float((adv - x).abs().max()) <= 8 / 255 + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        assert F.cross_entropy(clean_model(adv), y) > F.cross_entropy(clean_model(x), y)


@pytest.mark.parametrize("name", ["blended", "wanet", "sig", "label-consistent"])
def test_the_digits_settings_take(digits, clean_model, name):
    """Each digits setting makes a SmallCNN victim send most triggered test inputs to the target (the zoo's
    victims are trained the same way; docs/RESULTS.md has every architecture and seed)."""
    train, test = digits
    make = {"blended": lambda: blended_attack(train, test, seed=0, **DIGITS_BLENDED),
            "wanet": lambda: wanet_attack(train, test, seed=0, **DIGITS_WANET),
            "sig": lambda: sig_attack(train, test, seed=0, **DIGITS_SIG),
            "label-consistent": lambda: label_consistent_attack(train, test, clean_model, seed=0,
                                                                **DIGITS_LABEL_CONSISTENT)}[name]
    p = make()
    victim = train_model(p.train, TrainConfig.digits(seed=0, progress=False))
    assert p.poison_success(victim) >= 0.8
    assert accuracy(victim, test) >= 0.85
