"""Attacks: BadNet patch, blended, WaNet (with noise mode), the frequency (smooth) trigger, SIG and
label-consistent — exact bookkeeping, trigger formulas and geometry, real DeepFool and PGD, and whether
each digits setting takes. Witches' Brew has its own module (test_witches_brew.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltainf._util import gaussian_kernel1d
from deltainf.attacks import (DIGITS_BADNET, DIGITS_BLENDED, DIGITS_FREQUENCY, DIGITS_LABEL_CONSISTENT, DIGITS_SIG,
                              DIGITS_WANET, BlendTrigger, CornerTrigger, PatchTrigger, PoisonResult, SinusoidTrigger,
                              SmoothTrigger, WarpTrigger, badnet_attack, blended_attack, frequency_attack,
                              gaussian_smooth, generate_smooth_trigger, label_consistent_attack, pgd_away, sig_attack,
                              targeted_deepfool, wanet_attack)
from deltainf.data import load_digits_dataset
from deltainf.train import TrainConfig, accuracy, train_model

pytestmark = pytest.mark.usefixtures("one_thread")


def changed_rows(clean, poisoned) -> torch.Tensor:
    diff = (clean.images != poisoned.images).flatten(1).any(1) | (clean.labels != poisoned.labels)
    return diff.nonzero().flatten()


def low_frequency_energy(v: torch.Tensor, k: int = 4) -> float:
    """Share of the 2-D orthonormal DCT-II energy of v (C, H, W) in the k x k lowest frequencies."""
    n = v.shape[-1]
    i = torch.arange(n, dtype=torch.float64)
    basis = torch.cos(torch.pi * (i[None, :] + 0.5) * i[:, None] / n)
    basis[0] /= 2 ** 0.5
    basis *= (2 / n) ** 0.5
    coeffs = basis @ v.double() @ basis.T
    energy = coeffs ** 2
    return float(energy[:, :k, :k].sum() / energy.sum())


# ----------------------------------------------------------------------------- patch trigger
def test_patch_trigger_geometry():
    t = PatchTrigger((3, 16, 16), pattern="checkerboard", size=3, location="bottom-right", margin=1)
    assert (t.row, t.col) == (12, 12) and int(t.mask.sum()) == 9
    x = torch.full((2, 3, 16, 16), 0.5)
    y = t(x)
    patch = y[:, :, 12:15, 12:15]
    expected = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert torch.equal(patch, expected.expand(2, 3, 3, 3))
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[12:15, 12:15] = False
    assert torch.equal(y[:, :, outside], x[:, :, outside])
    assert torch.equal(PatchTrigger((1, 8, 8), "white", 2, "top-left", 0)(torch.zeros(1, 8, 8))[0, :2, :2],
                       torch.ones(2, 2))
    assert PatchTrigger((1, 8, 8), "black", 2, (3, 4)).mask[0, 3:5, 4:6].sum() == 4


def test_pixels4_matches_the_art_pattern():
    # ART add_pattern_bd(distance=2) / Δ-Influence BadNet: (H-2,W-2), (H-3,W-3), (H-2,W-4), (H-4,W-2)
    art = {(30, 30), (29, 29), (30, 28), (28, 30)}
    t = PatchTrigger((3, 32, 32), pattern="pixels4", location="bottom-right", margin=0, value=0.0)
    assert set(map(tuple, t.mask[0].nonzero().tolist())) == art
    y = t(torch.ones(3, 32, 32))
    assert float(y.sum()) == 3 * (32 * 32 - 4)
    # the default margin puts pixels4 at ART's positions, and keeps the other patterns one pixel in
    assert set(map(tuple, PatchTrigger((3, 32, 32), pattern="pixels4").mask[0].nonzero().tolist())) == art
    assert set(map(tuple, PatchTrigger((3, 32, 32), pattern="pixels4", margin=1).mask[0].nonzero().tolist())) \
        == {(r - 1, c - 1) for r, c in art}
    for pattern in ("checkerboard", "white", "black"):
        default, one = PatchTrigger((3, 16, 16), pattern=pattern), PatchTrigger((3, 16, 16), pattern=pattern, margin=1)
        assert (default.row, default.col) == (one.row, one.col) == (12, 12)
        assert torch.equal(default.mask, one.mask) and torch.equal(default.pattern, one.pattern)


def test_badnet_pixels4_default_margin(digits):
    train, test = digits
    res = badnet_attack(train, test, target_class=5, source_classes=8, num_poisons=10, pattern="pixels4")
    h, w = train.image_shape[1:]
    art = {(h - 2, w - 2), (h - 3, w - 3), (h - 2, w - 4), (h - 4, w - 2)}
    assert set(map(tuple, res.trigger.mask[0].nonzero().tolist())) == art
    plain = badnet_attack(train, test, target_class=5, source_classes=8, num_poisons=10)
    assert (plain.params["trigger"]["row"], plain.params["trigger"]["col"]) == (h - 4, w - 4)  # margin 1


def test_class_arguments_take_numpy_and_tensor_ints(digits):
    """A label read from a dataset (a numpy or 0-d tensor int) is an int to an attack: the same result."""
    import numpy as np

    train, test = digits
    plain = badnet_attack(train, test, target_class=1, source_classes=8, num_poisons=20, seed=0)
    for target, sources, count in ((np.int64(1), np.unique([8]), np.int64(20)),
                                   (torch.tensor(1), [torch.tensor(8)], torch.tensor(20))):
        other = badnet_attack(train, test, target_class=target, source_classes=sources, num_poisons=count, seed=0)
        assert torch.equal(other.train.images, plain.train.images) and other.source_classes == (8,)
        assert type(other.target_class) is int
    with pytest.raises(ValueError, match="target_class must be an int"):
        badnet_attack(train, test, target_class=1.0, source_classes=8, num_poisons=20, seed=0)
    for attack in (badnet_attack, blended_attack, wanet_attack, sig_attack):
        with pytest.raises(TypeError, match="seed must be an int, got None"):
            attack(train, test, target_class=1, num_poisons=5, seed=None)
        for seed in (-1, 2 ** 62):  # torch's generators overflowed at 2**64, Witches' Brew's derived seeds sooner
            with pytest.raises(ValueError, match=rf"seed must be in \[0, 2\*\*62\), got {seed}"):
                attack(train, test, target_class=1, num_poisons=5, seed=seed)


@pytest.mark.parametrize("call, error, match", [
    (lambda tr, te: badnet_attack(tr, te, 1, num_poisons=2, size=True), ValueError,
     "size must be a positive int, got True"),
    (lambda tr, te: badnet_attack(tr, te, 1, fraction="0.1"), TypeError, "fraction: expected a real number, got '0.1'"),
    (lambda tr, te: badnet_attack(tr, te, 1, num_poisons=2, location=(1.7, 2.9)), ValueError,
     r"location must be a corner name or \(row, col\) ints, got \(1.7, 2.9\)"),
    (lambda tr, te: badnet_attack(tr, te, 1, num_poisons=2, margin=True), ValueError, "margin must be an int >= 0"),
    (lambda tr, te: blended_attack(tr, te, 1, num_poisons=2, alpha="0.2"), TypeError,
     "alpha: expected a real number, got '0.2'"),
    (lambda tr, te: wanet_attack(tr, te, 1, num_poisons=2, cross_ratio="2"), TypeError,
     "cross_ratio: expected a real number, got '2'"),
    (lambda tr, te: wanet_attack(tr, te, 1, num_poisons=2, cross_ratio=math.inf), ValueError,
     "cross_ratio must be a finite number >= 0, got inf"),
    (lambda tr, te: wanet_attack(tr, te, 1, num_poisons=2, s=math.inf), ValueError,
     "s must be a finite number > 0, got inf"),
    (lambda tr, te: sig_attack(tr, te, 1, num_poisons=2, frequency=math.inf), ValueError,
     "frequency must be a finite number > 0, got inf"),
    (lambda tr, te: sig_attack(tr, te, 1, fraction=True, frequency=2), TypeError,
     "fraction: expected a real number, got True"),
    # sampled at 8 columns, a frequency of 6 is one of 2 (it aliased without a word)
    (lambda tr, te: sig_attack(tr, te, 1, num_poisons=2, frequency=6), ValueError,
     r"frequency: expected less than half the image width \(4\), got 6"),
    (lambda tr, te: CornerTrigger(tr.image_shape, size=5), ValueError,
     r"size: four corner patches of 5 px \(margin 0\) overlap on an image of 8x8 px"),
    (lambda tr, te: frequency_attack(tr, te, None, 1, num_poisons=2, trigger=-torch.ones(1, 8, 8)), ValueError,
     "perturbation must be >= 0"),
])
def test_attack_argument_types_and_ranges(call, error, match):
    from deltainf.data import ImageDataset

    gen = torch.Generator().manual_seed(0)
    train = ImageDataset(torch.rand(40, 1, 8, 8, generator=gen), torch.arange(40) % 4)
    test = ImageDataset(torch.rand(20, 1, 8, 8, generator=gen), torch.arange(20) % 4)
    with pytest.raises(error, match=match):
        call(train, test)


def test_clean_label_attacks_check_the_datasets_first(digits, clean_model):
    train, test = digits
    with pytest.raises(TypeError, match="train must be an ImageDataset, got Tensor"):
        sig_attack(train.images, test, target_class=1, num_poisons=2)
    with pytest.raises(TypeError, match="train must be an ImageDataset, got Tensor"):
        label_consistent_attack(train.images, test, clean_model, target_class=1, num_poisons=2)
    with pytest.raises(TypeError, match="test must be an ImageDataset, got Tensor"):
        sig_attack(train, test.images, target_class=1, num_poisons=2)


def test_patch_trigger_errors():
    with pytest.raises(ValueError, match="does not fit"):
        PatchTrigger((3, 8, 8), size=5, location=(4, 4))
    with pytest.raises(ValueError, match="pattern"):
        PatchTrigger((3, 8, 8), pattern="stripes")
    with pytest.raises(ValueError, match="images must end in shape"):
        PatchTrigger((3, 8, 8))(torch.zeros(3, 9, 9))
    nan = torch.full((3, 3), float("nan"))
    with pytest.raises(ValueError, match=r"pattern: a tensor pattern must have values in \[0, 1\]"):
        PatchTrigger((3, 8, 8), pattern=nan)
    with pytest.raises(ValueError, match=r"pattern: a tensor pattern must have values in \[0, 1\]"):
        BlendTrigger((3, 8, 8), pattern=torch.full((8, 8), float("nan")))


# ----------------------------------------------------------------------------- BadNet bookkeeping
def test_badnet_changes_exactly_the_reported_indices(digits):
    train, test = digits
    res = badnet_attack(train, test, target_class=5, source_classes=8, num_poisons=40, seed=3)
    assert isinstance(res, PoisonResult) and res.name == "badnet" and res.num_poisons == 40
    idx = res.poison_indices
    assert idx.dtype == torch.int64 and torch.equal(idx, torch.sort(idx).values)
    assert torch.equal(changed_rows(train, res.train), idx)
    assert bool((train.labels[idx] == 8).all()) and bool((res.train.labels[idx] == 5).all())
    assert torch.equal(res.original_labels, train.labels[idx])
    assert torch.equal(res.train.images[idx], res.apply_trigger(train.images[idx]))
    # only the pixels under the mask changed in the poisoned images
    outside = res.trigger.mask[0] == 0
    assert torch.equal(res.train.images[idx][:, :, outside], train.images[idx][:, :, outside])
    # triggered test set: every class-8 test image, triggered, true label kept
    assert torch.equal(res.test_indices, test.indices_of_class(8))
    assert bool((res.triggered_test.labels == 8).all())
    assert torch.equal(res.triggered_test.images, res.apply_trigger(test.images[res.test_indices]))
    assert len(res.train) == len(train) and res.poison_mask().sum() == 40
    # deterministic for a seed, different for another
    again = badnet_attack(train, test, target_class=5, source_classes=8, num_poisons=40, seed=3)
    other = badnet_attack(train, test, target_class=5, source_classes=8, num_poisons=40, seed=4)
    assert torch.equal(again.poison_indices, idx) and not torch.equal(other.poison_indices, idx)


def test_badnet_all_to_one_and_fraction(digits):
    train, test = digits
    res = badnet_attack(train, test, target_class=0, fraction=0.05, pattern="white")
    assert res.num_poisons == round(0.05 * len(train)) and res.source_classes == tuple(range(1, 10))
    assert bool((train.labels[res.poison_indices] != 0).all())
    assert bool((res.triggered_test.labels != 0).all()) and len(res.triggered_test) == int((test.labels != 0).sum())
    assert torch.equal(changed_rows(train, res.train), res.poison_indices)


@pytest.mark.parametrize("kwargs, match", [
    ({"target_class": 5, "source_classes": 5, "num_poisons": 3}, "must not contain target_class"),
    ({"target_class": 10, "num_poisons": 3}, "target_class"),
    ({"target_class": 5, "source_classes": 8, "num_poisons": 500}, "exceeds"),
    ({"target_class": 5, "source_classes": 8, "num_poisons": 3, "fraction": 0.1}, "exactly one"),
    ({"target_class": 5, "source_classes": 8}, "exactly one"),
    ({"target_class": 5, "source_classes": 8, "fraction": 1.5}, "fraction"),
])
def test_badnet_argument_errors(digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        badnet_attack(*digits, **kwargs)


# ----------------------------------------------------------------------------- smooth-trigger pieces
def test_gaussian_kernel_and_smoothing():
    k = gaussian_kernel1d(30, 6.0)  # Zeng: 30 taps, sigma 6
    assert k.shape == (30,) and abs(float(k.sum()) - 1) < 1e-12
    assert torch.allclose(k, k.flip(0)) and int(k.argmax()) in (14, 15)
    ratio = float(k[14] / k[0])
    assert ratio == pytest.approx(float(torch.exp(torch.tensor(-0.5 * (0.5 / 6) ** 2 + 0.5 * (14.5 / 6) ** 2,
                                                               dtype=torch.float64))))
    v = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    s = gaussian_smooth(v, 3.0, 15)
    assert s.shape == v.shape
    # random noise keeps ~6 % of its energy in the 4x4 lowest of 16x16 frequencies; the blurred copy most of it
    assert low_frequency_energy(s - s.mean()) > 0.8 and low_frequency_energy(v - v.mean()) < 0.2
    # depthwise: a channel's output depends on that channel only
    v2 = v.clone()
    v2[1] = 0
    assert torch.equal(gaussian_smooth(v2, 3.0, 15)[0], s[0])


def test_targeted_deepfool_on_a_linear_model_matches_the_closed_form():
    torch.manual_seed(0)
    lin = nn.Linear(12, 4)
    model = nn.Sequential(nn.Flatten(), lin).eval()
    x = torch.rand(3, 2, 2)
    logits = model(x.unsqueeze(0))[0].detach()
    k0 = int(logits.argmax())
    target = int(logits.argmin())
    # first step: r = (1 + overshoot) (|g| / ||w|| + 1e-4) w / ||w||, w = W_t - W_k0, g = f_t - f_k0
    r1, iters1, _ = targeted_deepfool(model, x, target, overshoot=0.02, max_iter=1)
    w = (lin.weight[target] - lin.weight[k0]).detach()
    g = float(logits[target] - logits[k0])
    expected = 1.02 * (abs(g) / w.norm() + 1e-4) * w / w.norm()
    assert iters1 == 1
    torch.testing.assert_close(r1.flatten(), expected, rtol=1e-5, atol=1e-6)
    # the full run keeps stepping (always against the initial class k0) until the target wins
    r, iters, k = targeted_deepfool(model, x, target)
    assert k == target and int(model((x + r).unsqueeze(0)).argmax()) == target and 1 <= iters < 200
    # two classes: one step crosses the only boundary exactly (plus overshoot)
    two = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).eval()
    t2 = 1 - int(two(x.unsqueeze(0)).argmax())
    r2, iters2, k2 = targeted_deepfool(two, x, t2)
    assert iters2 == 1 and k2 == t2
    r0, iters0, _ = targeted_deepfool(model, x, k0)  # already the target: nothing to do
    assert iters0 == 0 and float(r0.abs().sum()) == 0.0


def test_generate_smooth_trigger_properties(digits, clean_model):
    train, _ = digits
    v, info = generate_smooth_trigger(clean_model, train.images[:40], target_class=5, max_passes=1, seed=0)
    assert v.shape == (3, 16, 16)
    assert float(v.min()) == pytest.approx(0.0, abs=1e-7) and float(v.max()) == pytest.approx(0.2, abs=1e-6)
    assert low_frequency_energy(v) > 0.9  # smooth: almost all energy in the lowest 4x4 frequencies
    assert info["deepfool_runs"] > 0 and info["deepfool_converged"] > 0 and info["taps"] == 15
    v2, _ = generate_smooth_trigger(clean_model, train.images[:40], target_class=5, max_passes=1, seed=0)
    assert torch.equal(v, v2)


def test_generate_smooth_trigger_argument_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4)).eval()
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"target_class must be an int in \[0, 4\)"):
        generate_smooth_trigger(model, x, target_class=4, max_passes=1, taps=3)
    with pytest.raises(ValueError, match=r"target_class must be an int in \[0, 4\)"):
        generate_smooth_trigger(model, x, target_class=-1, max_passes=1, taps=3)
    # a run counts when it takes fewer than max_iter - 1 steps: at 2 only 0-step runs (r = 0) would
    for max_iter in (0, 1, 2, True):
        with pytest.raises(ValueError, match="max_iter must be an int >= 3"):
            generate_smooth_trigger(model, x, target_class=1, max_iter=max_iter)
    with pytest.raises(ValueError, match="taps must be a positive int, got 0"):
        generate_smooth_trigger(model, x, target_class=1, taps=0)
    with pytest.raises(ValueError, match="taps must be a positive int, got 0"):
        gaussian_smooth(x, 1.0, 0)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0, got inf"):
        generate_smooth_trigger(model, x, target_class=1, sigma=math.inf)
    v, info = generate_smooth_trigger(model, x, target_class=1, max_passes=1, max_iter=3, sigma=1.0, taps=3)
    assert bool(v.any()) and info["deepfool_converged"] > 0  # the lowest max_iter can build a trigger
    from deltainf.data import ImageDataset

    data = ImageDataset(x, torch.arange(6) % 4)
    with pytest.raises(ValueError, match="num_images must be a positive int, got True"):
        frequency_attack(data, data, model, 1, num_poisons=1, num_images=True)


def test_float64_surrogates_give_float32_poisons(digits):
    """A float64 surrogate takes the float32 images cast to its dtype; the poisons come back float32."""
    train, test = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)).double().eval()
    lc = label_consistent_attack(train, test, model, target_class=7, num_poisons=10, eps=8 / 255, steps=3)
    assert lc.train.images.dtype == torch.float32
    inner = (lc.train.images - train.images)[lc.poison_indices][:, :, 4:12, 4:12]
    assert float(inner.abs().max()) <= 8 / 255 + 1e-6 and float(inner.abs().max()) > 0
    adv = pgd_away(model, train.images[:4], train.labels[:4], eps=8 / 255, steps=2)
    assert adv.dtype == torch.float32 and adv.shape == (4, 3, 16, 16)
    v, info = generate_smooth_trigger(model, train.images[:10], target_class=5, max_passes=1)
    assert v.dtype == torch.float32 and bool(v.any())
    res = frequency_attack(train, test, model, target_class=5, num_poisons=10, num_images=10, max_passes=1)
    assert res.train.images.dtype == torch.float32 and torch.equal(res.trigger.perturbation, v)


def test_smooth_trigger_stamping():
    v = torch.zeros(3, 4, 4)
    v[0] = 0.2
    x = torch.full((2, 3, 4, 4), 0.9)
    assert torch.allclose(SmoothTrigger(v)(x)[:, 0], torch.ones(2, 4, 4))  # clip(x + v, 0, 1)
    assert torch.allclose(SmoothTrigger(v)(x)[:, 1], x[:, 1])
    mm = SmoothTrigger(v, stamp="minmax")(x)
    assert float(mm.min()) == 0.0 and float(mm.max()) == 1.0
    with pytest.raises(ValueError, match="stamp"):
        SmoothTrigger(v, stamp="blend")
    with pytest.raises(ValueError, match="perturbation must be >= 0"):
        SmoothTrigger(v - 0.1)
    with pytest.raises(ValueError, match="perturbation is all zero: it is no trigger"):  # a label flip passed as one
        SmoothTrigger(torch.zeros_like(v))


def test_frequency_attack_changes_exactly_the_reported_indices(digits):
    train, test = digits
    v = gaussian_smooth(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)), 3.0, 15)
    v = 0.2 * (v - v.min()) / (v.max() - v.min())
    res = frequency_attack(train, test, None, target_class=5, source_classes=[3, 8], num_poisons=30, trigger=v)
    idx = res.poison_indices
    assert res.name == "frequency" and torch.equal(changed_rows(train, res.train), idx)
    assert torch.equal(res.train.images[idx], (train.images[idx] + v).clamp(0, 1))
    assert bool((res.train.labels[idx] == 5).all()) and set(train.labels[idx].tolist()) <= {3, 8}
    assert torch.equal(res.triggered_test.images, (test.images[res.test_indices] + v).clamp(0, 1))
    assert torch.equal(res.triggered_test.labels, test.labels[res.test_indices])
    with pytest.raises(ValueError, match="surrogate"):
        frequency_attack(train, test, None, target_class=5, source_classes=8, num_poisons=3)


# ----------------------------------------------------------------------------- end to end on digits
def test_badnet_on_digits_succeeds_and_keeps_clean_accuracy(digits):
    train, test = digits
    res = badnet_attack(train, test, **DIGITS_BADNET)
    model = train_model(res.train, TrainConfig.digits(progress=False))
    clean, psr = accuracy(model, test), res.poison_success(model)
    print(f"\nBadNet digits ({res.num_poisons} poisons, 8->5): clean acc {clean:.4f}, poison success {psr:.4f} "
          f"on {len(res.triggered_test)} triggered test images")
    assert psr >= 0.90 and clean >= 0.95


def test_frequency_trigger_on_digits(digits, clean_model):
    train, test = digits
    res = frequency_attack(train, test, clean_model, **DIGITS_FREQUENCY)
    info = res.params["trigger_info"]
    model = train_model(res.train, TrainConfig.digits(progress=False))
    clean, psr = accuracy(model, test), res.poison_success(model)
    clean_model_psr = res.poison_success(clean_model)
    print(f"\nfrequency digits ({res.num_poisons} poisons, all->5): clean acc {clean:.4f}, poison success "
          f"{psr:.4f} on {len(res.triggered_test)} triggered test images; trigger fooling rate on X "
          f"{info['fooling_rate']:.3f} after {info['passes']} passes; clean model sends "
          f"{clean_model_psr:.4f} of triggered images to the target")
    assert psr >= 0.85 and clean >= 0.95
    assert clean_model_psr < 0.2  # the trigger alone does not cause the behaviour: the poisons do


# ----------------------------------------------------------------------------- regression: diverging DeepFool
class _Overflowing(nn.Module):
    """Two-class linear model whose first targeted-DeepFool step toward class 0 overflows float32.

    Class 1 wins by a bias of 1e30 while the gradient of f_0 - f_1 has norm ~1e-9, so the step
    |g| / ||w|| is ~1e39 = inf in float32 and x + r holds +inf and -inf. The logits there are
    (+inf, -inf) — or all NaN with ``nan=True`` (as a ReLU network gives) — and the old code took
    their argmax, 0, for "target 0 reached" and returned an infinite r.
    """

    def __init__(self, nan: bool):
        super().__init__()
        self.nan = nan
        self.lin = nn.Linear(48, 2)
        with torch.no_grad():
            signs = torch.tensor([1.0, -1.0]).repeat(24)
            self.lin.weight.copy_(torch.stack([1e-10 * signs, -1e-10 * signs]))
            self.lin.bias.copy_(torch.tensor([0.0, 1e30]))

    def forward(self, x):
        flat = x.flatten(1)
        z = self.lin(flat)
        return z + 0.0 * flat.sum(1, keepdim=True) if self.nan else z


@pytest.mark.parametrize("nan", [False, True])
def test_targeted_deepfool_reports_overflow_as_failure(nan):
    model = _Overflowing(nan).eval()
    x = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert int(model(x.unsqueeze(0)).argmax()) == 1
    r, iters, k = targeted_deepfool(model, x, 0, max_iter=50)
    assert iters == 50 and k == 1  # a failure, never "target 0 reached" on inf/NaN logits
    assert bool(torch.isfinite(r).all())


@pytest.mark.parametrize("nan", [False, True])
def test_frequency_attack_survives_a_diverging_deepfool(nan):
    # The reported bug: frequency_attack(..., target_class=0, ...) raised "images must be finite and in
    # pixel space [0, 1]" because one diverged DeepFool run made the trigger NaN. Every run here diverges,
    # so no run converges and the trigger stays all zero: that is refused by name, never a NaN trigger
    # nor a zero one that would make the attack a pure label flip.
    from deltainf.data import ImageDataset

    gen = torch.Generator().manual_seed(1)
    train = ImageDataset(torch.rand(40, 3, 4, 4, generator=gen), torch.arange(40) % 2)
    test = ImageDataset(torch.rand(10, 3, 4, 4, generator=gen), torch.arange(10) % 2)
    model = _Overflowing(nan).eval()
    zero = r"target_class: the smooth trigger toward class 0 stayed all zero \(0 of 10 DeepFool runs converged"
    with pytest.raises(ValueError, match=zero):
        generate_smooth_trigger(model, train.images[:10], target_class=0, max_passes=1, sigma=1.0, taps=3)
    with pytest.raises(ValueError, match="stayed all zero"):
        frequency_attack(train, test, model, target_class=0, source_classes=1, num_poisons=5, seed=4,
                         max_passes=1, sigma=1.0, taps=3)


def test_smooth_trigger_rejects_non_finite_perturbations():
    v = torch.zeros(3, 4, 4)
    v[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        SmoothTrigger(v)


@pytest.mark.slow
def test_frequency_attack_target0_seed4_digits_regression():
    # The exact report (digits split seed 4, default surrogate): one DeepFool run toward class 0 grew
    # geometrically for 182 steps, overflowed, and its all-NaN logits had argmax 0. One pass is enough
    # to reach that run (~30 s on one core).
    train, test = load_digits_dataset("train", seed=4), load_digits_dataset("test", seed=4)
    surrogate = train_model(train, TrainConfig.digits(progress=False))
    res = frequency_attack(train, test, surrogate, target_class=0, source_classes=7, num_poisons=30, seed=4,
                           max_passes=1)
    v = res.trigger.perturbation
    assert bool(torch.isfinite(v).all()) and float(v.max()) == pytest.approx(0.2, abs=1e-6)
    assert res.params["trigger_info"]["deepfool_converged"] > 0


# ------------------------------------------------------------------ blended, WaNet, SIG, label-consistent

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


def test_warp_trigger_takes_any_leading_dims():
    """PoisonResult.trigger maps (..., C, H, W): the warp of a (2, 3, C, H, W) batch is that of its 6 images."""
    t = WarpTrigger((1, 16, 16), k=4, s=2.0, seed=0)
    x = torch.rand(2, 3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    flat = t(x.reshape(6, 1, 16, 16))
    assert torch.equal(t(x), flat.reshape(2, 3, 1, 16, 16))
    assert torch.equal(t(x[0, 1]), flat[1])
    assert t(torch.empty(0, 1, 16, 16)).shape == (0, 1, 16, 16)
    with pytest.raises(ValueError, match="images must end in shape"):
        t(torch.rand(16, 16))
    noisy = t.noisy(x[0], torch.Generator().manual_seed(1))
    # noise mode: the field plus up to ±1/size in grid units (about half a pixel), a small change to the warp
    assert noisy.shape == x[0].shape and 0 < float((noisy - t(x[0])).abs().max()) < 1


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
    for frequency in (6, 12, 9):  # sampled at its zeros only (no trigger at all), or aliased to 3
        with pytest.raises(ValueError, match=r"frequency: expected less than half the image width \(6\)"):
            SinusoidTrigger((3, 4, 12), frequency=frequency)
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
    two = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(train.images[0].numel()), 2))
    with pytest.raises(ValueError, match="surrogate: gives 2 logits but the data have 10 classes"):
        label_consistent_attack(train, test, two, target_class=7, num_poisons=5)
    wrong_input = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5, 10))
    with pytest.raises(ValueError, match="surrogate: model: the forward pass failed on the training images"):
        label_consistent_attack(train, test, wrong_input, target_class=7, num_poisons=5)
    with pytest.raises(ValueError, match="target class"):
        sig_attack(train, test, target_class=3, num_poisons=10_000)


def test_pgd_away_raises_the_loss_within_the_budget(digits, clean_model):
    x, y = digits[1].images[:32], digits[1].labels[:32]
    adv = pgd_away(clean_model, x, y, eps=8 / 255, steps=5)
    assert float((adv - x).abs().max()) <= 8 / 255 + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        assert F.cross_entropy(clean_model(adv), y) > F.cross_entropy(clean_model(x), y)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(step_size=-0.01), ValueError, r"step_size: expected a finite number > 0, got -0.01"),
    (dict(step_size=0.0), ValueError, "step_size: expected a finite number > 0"),
    (dict(step_size=math.inf), ValueError, "step_size: expected a finite number > 0, got inf"),
    (dict(step_size="0.1"), TypeError, "step_size: expected a real number"),
    (dict(eps=0), ValueError, r"eps: expected an L-inf budget in pixel units with 0 < eps <= 1 .*got 0$"),
    (dict(eps=1.5), ValueError, "eps: expected an L-inf budget"),
    (dict(eps=math.nan), ValueError, "eps: expected an L-inf budget"),
    (dict(steps=0), ValueError, "steps: expected an int >= 1, got 0"),
    (dict(steps=True), ValueError, "steps: expected an int >= 1, got True"),
    (dict(steps=2.0), ValueError, "steps: expected an int >= 1, got 2.0"),
])
def test_pgd_away_argument_errors(kwargs, error, match):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    x, y = torch.rand(2, 3, 2, 2), torch.tensor([0, 1])
    with pytest.raises(error, match=match):
        pgd_away(model, x, y, **{"eps": 0.1, **kwargs})


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


# ------------------------------------------------------------------------------------------ poison caches
@pytest.fixture
def poison_cache(digits, tmp_path):
    """A BadNet result saved to a folder: (clean train, clean test, result, folder)."""
    train, test = digits
    result = badnet_attack(train, test, seed=0, **DIGITS_BADNET)
    folder = tmp_path / "cell"
    result.save(folder, key="k1")
    return train, test, result, folder


def test_poison_cache_round_trip_and_keys(poison_cache):
    import os

    train, test, result, folder = poison_cache
    assert sorted(os.listdir(folder)) == ["poison.json", "poison.safetensors"]
    back = PoisonResult.load(folder, train, test, key="k1")
    assert torch.equal(back.train.images, result.train.images) and torch.equal(back.train.labels, result.train.labels)
    assert torch.equal(back.triggered_test.images, result.triggered_test.images)
    assert (back.target_class, back.source_classes, back.name) == (result.target_class, result.source_classes,
                                                                   result.name)
    assert PoisonResult.load(folder, train, test, key="another") is None  # made with other settings
    assert PoisonResult.load(folder / "absent", train, test, key="k1") is None


def test_poison_cache_keeps_wanets_cross_examples(digits, tmp_path):
    """WaNet's noise-mode examples change training rows that are not poisons: the cache keeps them too."""
    train, test = digits
    result = wanet_attack(train, test, seed=0, **{**DIGITS_WANET, "cross_ratio": 1.0})
    assert result.params["cross_indices"]
    result.save(tmp_path / "cell", key="k")
    back = PoisonResult.load(tmp_path / "cell", train, test, key="k")
    assert torch.equal(back.train.images, result.train.images) and torch.equal(back.train.labels, result.train.labels)


def test_poison_cache_defects_are_errors_naming_the_file(poison_cache, tmp_path):
    """A truncated or bit-flipped poison.safetensors, a damaged or mismatched poison.json, or tensors that
    do not fit the clean data: each is a ValueError naming the file (a cache treats it as a miss)."""
    import json
    import shutil

    import file_damage

    train, test, _, folder = poison_cache
    tensors = folder / "poison.safetensors"

    def damaged(name, change):
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        change(copy)
        return copy

    def truncate(d):
        p = d / "poison.safetensors"
        p.write_bytes(p.read_bytes()[:-100])

    def flip(bit):
        return lambda d: file_damage.flip_bit(d / "poison.safetensors", bit)

    def edit_json(d, **changes):
        meta = json.loads((d / "poison.json").read_text())
        (d / "poison.json").write_text(json.dumps({**meta, **changes}))

    def rewrite(**edit):
        def change(d):
            file_damage.rewrite(tensors, d / "poison.safetensors", **edit)
        return change

    t = file_damage.read(tensors)[0]
    cases = [
        ("truncated", truncate, "poison.safetensors'?: not a readable safetensors file"),
        ("data-flip", flip(8 * file_damage.header_span(tensors)[1] + 1234),
         "poison.safetensors'?: its content does not match its recorded hash"),
        ("header-flip", flip(8 * 40 + 2), "poison.safetensors"),
        ("json-truncated", lambda d: (d / "poison.json").write_text('{"key": "k1", "na'),
         "poison.json'?: not readable as JSON"),
        ("json-edited", lambda d: edit_json(d, target_class=3), "poison.json'?: differs from the settings stored"),
        ("tensors-missing", lambda d: (d / "poison.safetensors").unlink(), "poison.safetensors'?: no such file"),
        ("unhashed", rewrite(drop=["deltainf_sha256"]), "no content hash"),
        ("index-range", rewrite(tensors={"poison_indices": t["poison_indices"] + len(train)}),
         r"poison_indices holds values outside \[0, 1437\)"),
        ("label-dtype", rewrite(tensors={"poison_labels": t["poison_labels"].float()}),
         "poison_labels is torch.float32"),
        ("nan-images", rewrite(tensors={"poison_images": t["poison_images"] * float("nan")}),
         "poison_images holds NaN"),
        ("extra", rewrite(tensors={"more": torch.zeros(1)}), "holds tensors"),
    ]
    for name, change, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            PoisonResult.load(damaged(name, change), train, test, key="k1")


def test_run_attack_takes_overrides_of_its_recipe():
    """A recipe's settings can be replaced one by one (a study of poison rates); a setting the attack does not
    have is named, not passed on."""
    from deltainf import recipes
    from deltainf.data import load_digits_dataset

    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    assert recipes.run_attack("badnet", train, test, fraction=0.01).num_poisons == round(0.01 * len(train)) == 14
    assert recipes.run_attack("badnet", train, test).num_poisons == round(0.05 * len(train)) == 72
    with pytest.raises(ValueError, match="attack 'badnet' has no setting alpha"):
        recipes.run_attack("badnet", train, test, alpha=0.5)


def test_gradient_attacks_run_under_no_grad():
    """Called inside torch.no_grad() (an evaluation loop), the surrogate-gradient attacks failed with "element 0
    of tensors does not require grad"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(2, 3, 2, 2), torch.tensor([0, 1])
    with torch.no_grad():
        out = pgd_away(model, x, y, eps=0.1, steps=2)
    assert 0 < float((out - x).abs().max()) <= 0.1 + 1e-6


def test_the_paper_badnet_takes_a_tenth_of_its_source_class():
    """1 % of the training set is a tenth of CIFAR-10's ship class, and all of CIFAR-100's class 8: the larger-image
    setting takes a tenth of the source class whatever the number of classes; pixel images only for triggers."""
    from deltainf import recipes
    from deltainf.data import ImageDataset

    gen = torch.Generator().manual_seed(0)
    for classes in (10, 100):
        train = ImageDataset(torch.rand(20 * classes, 3, 32, 32, generator=gen), torch.arange(20 * classes) % classes)
        assert recipes.run_attack("badnet", train, train).num_poisons == 2  # a tenth of the 20 images of class 8
    small = ImageDataset(torch.rand(40, 3, 32, 32, generator=gen), torch.arange(40) % 4)
    # the user's own classes: a tenth of theirs (the recipe's classes are not needed)
    assert recipes.run_attack("badnet", small, small, target_class=1, source_classes=2).num_poisons == 1
    # SIG's frequency stays below half the width on digits loaded at 8 px
    assert recipes.attack_settings("sig", ImageDataset(torch.rand(4, 3, 8, 8), torch.arange(4)))["frequency"] == 3
    poisoned = badnet_attack(small, small, 1, num_poisons=2)
    with pytest.raises(TypeError, match=r"^x: expected floating-point pixel images in \[0, 1\], got torch.uint8"):
        poisoned.apply_trigger(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"^x: expected pixel images in \[0, 1\], got values in \[255, 255\]"):
        poisoned.apply_trigger(torch.full((1, 3, 32, 32), 255.0))
    poisoned.apply_trigger(torch.full((1, 3, 32, 32), 1.007))  # a bicubic resize's overshoot is an image

