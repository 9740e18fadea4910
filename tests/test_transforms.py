"""Tests for deltainf.transforms: the Δ-Influence transform pool and the label rule."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deltainf import transforms as T
from deltainf._util import gaussian_kernel1d

RANDOM = ["color_jitter", "affine", "elastic", "blur"]
ALL = T.available_transforms()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def image(c=3, h=16, w=16, seed=0, dtype=torch.float32):
    return torch.rand(c, h, w, generator=gen(seed), dtype=dtype)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transform_shape_dtype_preserved(name, dtype):
    x = image(dtype=dtype)
    y = T.get_transform(name)(x, gen(1))
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ALL)
def test_transform_deterministic_for_seed(name):
    x = image()
    t = T.get_transform(name)
    assert torch.equal(t(x, gen(7)), t(x, gen(7)))


@pytest.mark.parametrize("name", RANDOM)
def test_random_transforms_depend_on_seed(name):
    x = image(h=32, w=32)
    t = T.get_transform(name)
    assert not torch.equal(t(x, gen(1)), t(x, gen(2)))


@pytest.mark.parametrize("name", ALL)
def test_transform_does_not_modify_input(name):
    x = image()
    x0 = x.clone()
    T.get_transform(name)(x, gen(0))
    assert torch.equal(x, x0)


def test_exact_transforms():
    x = image()
    assert torch.equal(T.HorizontalFlip()(x, gen()), x.flip(-1))
    assert torch.equal(T.Invert()(x, gen()), 1.0 - x)
    assert torch.equal(T.ChannelSwap()(x, gen()), x[[1, 0, 2]])
    assert torch.equal(T.Identity()(x, gen()), x)
    g1 = image(c=1)
    assert torch.equal(T.ChannelSwap()(g1, gen()), g1)  # nothing to swap with one channel
    # invert does not clamp (torchvision semantics on float tensors)
    z = torch.full((3, 4, 4), 2.5)
    assert torch.equal(T.Invert()(z, gen()), torch.full((3, 4, 4), -1.5))


def test_affine_identity_and_rotation():
    x = image(c=1, h=6, w=6)
    ident = T.RandomAffine(degrees=(0, 0), scale=(1, 1), shear=(0, 0))
    assert torch.equal(ident(x, gen()), x)
    # torchvision's affine angle is clockwise
    rot = T.RandomAffine(degrees=(90, 90), scale=(1, 1), shear=(0, 0))
    assert torch.equal(rot(x, gen()), torch.rot90(x, -1, (-2, -1)))
    # zooming in (scale 2) keeps the centre and never leaves the image: no fill appears
    zoom = T.RandomAffine(degrees=(0, 0), scale=(2, 2), shear=(0, 0))
    y = zoom(torch.rand(1, 8, 8, generator=gen()) + 1.0, gen())
    assert (y >= 1.0).all()


def test_affine_fill_zero_outside():
    x = torch.ones(3, 16, 16)
    y = T.RandomAffine(degrees=(45, 45), scale=(1, 1), shear=(0, 0))(x, gen())
    assert y[:, 0, 0].eq(0).all() and y[:, 8, 8].eq(1).all()
    assert set(y.unique().tolist()) <= {0.0, 1.0}  # nearest interpolation


def test_blur_kernel_scaling():
    b = T.GaussianBlur()
    assert b.params_for(32, 32) == ((5, 9), (8.0, 10.0))  # the paper's values at 32 px
    assert b.params_for(16, 16) == ((3, 5), (4.0, 5.0))
    assert b.params_for(64, 64) == ((11, 19), (16.0, 20.0))
    assert b.params_for(8, 8) == ((1, 3), (2.0, 2.5))
    kw, kh = b.params_for(160, 160)[0]
    assert kw % 2 == 1 and kh % 2 == 1
    unscaled = T.GaussianBlur(scale_to_size=False)
    assert unscaled.params_for(160, 160) == ((5, 9), (8.0, 10.0))
    # kernels never exceed what reflect padding allows
    assert unscaled.params_for(4, 4)[0] == (5, 7)


def test_blur_matches_direct_2d_convolution():
    x = image(h=12, w=10, dtype=torch.float64)
    kx = gaussian_kernel1d(5, 3.0)
    ky = gaussian_kernel1d(9, 3.5)
    k2 = torch.mm(ky[:, None], kx[None, :])
    ref = F.conv2d(F.pad(x.unsqueeze(0), [2, 2, 4, 4], mode="reflect"), k2.expand(3, 1, 9, 5), groups=3)[0]
    torch.testing.assert_close(T.gaussian_blur(x, (5, 9), (3.0, 3.5)), ref)
    # a normalised kernel keeps constant images constant
    c = torch.full((3, 16, 16), 0.3)
    torch.testing.assert_close(T.GaussianBlur()(c, gen()), c)


def test_blur_sigma_in_scaled_range():
    x = torch.zeros(1, 32, 32)
    x[0, 16, 16] = 1.0
    y = T.GaussianBlur()(x, gen(3))
    # impulse response = the 5x9 kernel itself, centred
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (y[0, 12:21, 14:19] > 0).all() and y[0, :12].abs().max() == 0


def test_elastic_params_and_small_images():
    e = T.ElasticTransform()
    alpha, sigma, k = e.params_for(32, 32)
    assert alpha == pytest.approx(150.0) and sigma == 5.0 and k == (41, 41)  # torchvision at 32 px
    a16, s16, k16 = e.params_for(16, 16)
    assert s16 == 2.5 and k16 == (21, 21) and a16 < alpha
    for size in (8, 16, 24):
        y = e(image(h=size, w=size), gen())
        assert y.shape == (3, size, size)
    # unscaled parameters: the 41-px smoothing kernel is clipped so a 16-px image still works
    un = T.ElasticTransform(scale_to_size=False)
    assert un.params_for(16, 16)[2] == (31, 31)
    assert un(image(), gen()).shape == (3, 16, 16)


def test_elastic_scaling_keeps_relative_displacement():
    # the displacement std as a fraction of the image should match the 32-px one
    def rel_std(size):
        e = T.ElasticTransform()
        alpha, sigma, (kw, kh) = e.params_for(size, size)
        vals = []
        for s in range(20):
            d = torch.rand((1, 1, size, size), generator=gen(s)) * 2 - 1
            d = T.gaussian_blur(d, (kw, kh), (sigma, sigma)) * alpha / size
            c = size // 4
            vals.append(d[..., c:-c, c:-c].flatten())  # interior: away from reflect-padding effects
        return torch.cat(vals).std().item()

    r32, r64 = rel_std(32), rel_std(64)
    assert r64 == pytest.approx(r32, rel=0.35)


def test_elastic_zero_alpha_is_identity():
    x = image()
    y = T.ElasticTransform(alpha=0.0)(x, gen())
    torch.testing.assert_close(y, x)


def test_color_jitter_semantics():
    x = image()
    ident = T.ColorJitter(brightness=(1, 1), contrast=(1, 1), saturation=(1, 1), hue=(0, 0))
    torch.testing.assert_close(ident(x, gen()), x, atol=1e-5, rtol=0)
    bright = T.ColorJitter(brightness=(3, 3), contrast=(1, 1), saturation=(1, 1), hue=(0, 0))
    y = bright(x, gen())
    torch.testing.assert_close(y, (3 * x).clamp(0, 1))
    # the paper's jitter always yields images in [0, 1] (blends clamp)
    for s in range(5):
        y = T.ColorJitter()(torch.rand(3, 8, 8, generator=gen(s)) * 3 - 1, gen(s))
        assert y.min() >= 0 and y.max() <= 1
    # grey image: saturation and hue are the identity, brightness/contrast still act
    g = image(c=1)
    sat = T.ColorJitter(brightness=(1, 1), contrast=(1, 1), saturation=(0, 0), hue=(0.3, 0.3))
    torch.testing.assert_close(sat(g, gen()), g)
    # other channel counts (2, 4, ...): brightness and contrast (grey = channel mean); no saturation / hue
    x4 = image(c=4)
    con = T.ColorJitter(brightness=(1, 1), contrast=(0.5, 0.5), saturation=(0, 0), hue=(0.3, 0.3))
    torch.testing.assert_close(con(x4, gen()), (0.5 * x4 + 0.5 * x4.mean()).clamp(0, 1))
    assert T.ColorJitter()(image(c=2), gen()).shape == (2, 16, 16)


def test_color_jitter_contrast_and_saturation_formulas():
    x = image(seed=3)
    grey = (0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
    con = T.ColorJitter(brightness=(1, 1), contrast=(0.5, 0.5), saturation=(1, 1), hue=(0, 0))
    torch.testing.assert_close(con(x, gen()), (0.5 * x + 0.5 * grey.mean()).clamp(0, 1))
    sat = T.ColorJitter(brightness=(1, 1), contrast=(1, 1), saturation=(0, 0), hue=(0, 0))
    torch.testing.assert_close(sat(x, gen()), grey.expand(3, -1, -1))


def test_hue_shift_of_pure_red():
    x = torch.zeros(3, 2, 2)
    x[0] = 1.0
    hue = T.ColorJitter(brightness=(1, 1), contrast=(1, 1), saturation=(1, 1), hue=(1 / 3, 1 / 3))
    y = hue(x, gen())
    torch.testing.assert_close(y, torch.stack([torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, 2)]),
                               atol=1e-5, rtol=0)  # red -> green


def test_normalized_domain():
    x = image()
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    y = T.apply_transform("hflip", x, gen(), "normalized", mean, std)
    torch.testing.assert_close(y, x.flip(-1))
    y = T.apply_transform("invert", x, gen(), "normalized", mean, std)
    torch.testing.assert_close(y, s - x + 2 * m)
    # fill 0 of the affine transform becomes the mean colour in pixel space
    rot = T.RandomAffine(degrees=(45, 45), scale=(1, 1), shear=(0, 0))
    y = T.apply_transform(rot, torch.ones(3, 16, 16), gen(), "normalized", mean, std)
    torch.testing.assert_close(y[:, 0, 0], torch.tensor(mean))
    # jitter clamps z to [0, 1]: pixels land in [mean, mean + std]
    y = T.apply_transform("color_jitter", x, gen(), "normalized", mean, std)
    assert (y >= m - 1e-6).all() and (y <= m + s + 1e-6).all()
    with pytest.raises(ValueError, match="mean and std"):
        T.apply_transform("hflip", x, gen(), "normalized")
    with pytest.raises(ValueError, match="domain"):
        T.apply_transform("hflip", x, gen(), "lab")


def test_make_transformed_queries_shapes_and_determinism():
    x = image()
    xs, ys, names = T.make_transformed_queries(x, 3, 20, 10, seed=5)
    assert xs.shape == (20, 3, 16, 16) and xs.dtype == torch.float32
    assert ys.shape == (20,) and ys.dtype == torch.int64
    assert len(names) == 20 and set(names) <= set(T.DEFAULT_POOL)
    xs2, ys2, names2 = T.make_transformed_queries(x, 3, 20, 10, seed=5)
    assert torch.equal(xs, xs2) and torch.equal(ys, ys2) and names == names2
    xs3, ys3, _ = T.make_transformed_queries(x, 3, 20, 10, seed=6)
    assert not torch.equal(ys, ys3) or not torch.equal(xs, xs3)
    # each copy really is its named transform (deterministic ones checked exactly)
    for j, nm in enumerate(names):
        if nm == "hflip":
            assert torch.equal(xs[j], x.flip(-1))
        elif nm == "invert":
            assert torch.equal(xs[j], 1 - x)


def test_make_transformed_queries_checks_its_arguments():
    """As DeltaInfluence does: a label 1.7 was cut to 1 and True taken as 1, a negative seed accepted and 2**64 an
    overflow inside torch; a user transform's copy on another device failed later, inside the scoring."""
    x = image()
    for label in (1.7, True):
        with pytest.raises(ValueError, match=r"^y_adv must be a class index in \[0, 10\)"):
            T.make_transformed_queries(x, label, 4, 10)
    for seed in (-5, 2 ** 64):
        with pytest.raises(ValueError, match=r"^seed must be an int in \[0, 2\*\*63\)"):
            T.make_transformed_queries(x, 3, 4, 10, seed=seed)
    with pytest.raises(ValueError, match="returned a tensor on meta for an input on cpu"):
        T.make_transformed_queries(x, 3, 4, 10, pool=[lambda v, g: v.to("meta")])
    assert T.make_transformed_queries(x, np.int64(3), 4, 10, seed=np.int64(5))[1].shape == (4,)


def test_labels_independent_of_pool():
    x = image()
    _, ys_a, _ = T.make_transformed_queries(x, 2, 30, 10, seed=1)
    _, ys_b, names_b = T.make_transformed_queries(x, 2, 30, 10, seed=1, pool=["hflip"])
    assert torch.equal(ys_a, ys_b) and set(names_b) == {"hflip"}


@pytest.mark.parametrize("y_adv", [0, 4, 9])
def test_label_rule_never_yields_y_adv(y_adv):
    for seed in range(20):
        ys = T.sample_labels(200, y_adv, 10, gen(seed))
        assert not (ys == y_adv).any()
        assert ys.min() >= 0 and ys.max() <= 9
    ys = T.sample_labels(5000, y_adv, 10, gen(0))
    counts = torch.bincount(ys, minlength=10)
    assert counts[y_adv] == 0
    others = counts[torch.arange(10) != y_adv].double()
    assert (others > 0).all() and others.min() / others.max() > 0.8  # uniform over the others


def test_label_rule_distinct_and_keep():
    ys = T.sample_labels(9, 4, 10, gen(0), mode="distinct")
    assert sorted(ys.tolist()) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    ys = T.sample_labels(5, 0, 100, gen(1), mode="distinct")
    assert len(set(ys.tolist())) == 5 and 0 not in ys.tolist()
    with pytest.raises(ValueError, match="distinct"):
        T.sample_labels(10, 4, 10, gen(0), mode="distinct")
    assert T.sample_labels(4, 7, 10, gen(0), mode="keep").tolist() == [7] * 4
    _, ys, _ = T.make_transformed_queries(image(), 1, 9, 10, seed=0, labels="distinct")
    assert len(set(ys.tolist())) == 9 and 1 not in ys.tolist()
    with pytest.raises(ValueError, match="labels"):
        T.sample_labels(4, 0, 10, gen(0), mode="other")


def test_normalized_queries():
    x = image()
    mean, std = [0.5] * 3, [0.25] * 3
    xs, _, names = T.make_transformed_queries(x, 0, 12, 10, seed=2, domain="normalized", mean=mean, std=std,
                                              pool=["hflip", "invert"])
    for j, nm in enumerate(names):
        expect = x.flip(-1) if nm == "hflip" else 0.25 - x + 1.0
        torch.testing.assert_close(xs[j], expect)


def test_bad_inputs():
    x = image()
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        T.HorizontalFlip()(torch.rand(16, 16), gen())
    with pytest.raises(TypeError, match="floating-point"):
        T.HorizontalFlip()(torch.zeros(3, 4, 4, dtype=torch.uint8), gen())
    with pytest.raises(TypeError, match="Generator"):
        T.HorizontalFlip()(x, 0)
    with pytest.raises(ValueError, match="unknown transform"):
        T.get_transform("sharpen")
    with pytest.raises(ValueError, match="n must be"):
        T.make_transformed_queries(x, 0, 0, 10)
    with pytest.raises(ValueError, match="y_adv"):
        T.make_transformed_queries(x, 10, 5, 10)
    with pytest.raises(ValueError, match="num_classes"):
        T.make_transformed_queries(x, 0, 5, 1)
    with pytest.raises(ValueError, match="mean and std"):
        T.make_transformed_queries(x, 0, 5, 10, domain="normalized")
    with pytest.raises(ValueError, match="pool"):
        T.make_transformed_queries(x, 0, 5, 10, pool=[])
    with pytest.raises(ValueError, match="one value per channel"):
        T.make_transformed_queries(x, 0, 5, 10, domain="normalized", mean=[0.5, 0.5], std=[0.2, 0.2])
    with pytest.raises(ValueError, match="kernel_size"):
        T.GaussianBlur(kernel_size=(4, 9))
    with pytest.raises(ValueError, match="hue"):
        T.ColorJitter(hue=(-0.7, 0.1))


def test_custom_transform_in_pool():
    class AddOne:
        name = "add_one"

        def __call__(self, x, generator):
            return x + 1

    xs, _, names = T.make_transformed_queries(image(), 0, 3, 10, pool=[AddOne()])
    assert names == ["add_one"] * 3
    torch.testing.assert_close(xs[0], image() + 1)
    assert math.isclose(T.REFERENCE_SIZE, 32)
    # a transform that works in place gets a copy: the point and the other copies stay as they were
    x = image()
    xs, _, _ = T.make_transformed_queries(x, 0, 3, 10, pool=[lambda v, g: v.add_(0.25)])
    torch.testing.assert_close(x, image())
    torch.testing.assert_close(xs, (image() + 0.25).expand(3, *x.shape))
    with pytest.raises(ValueError, match="transform '.*' returned non-finite values"):
        T.make_transformed_queries(image(), 0, 3, 10, pool=[lambda v, g: v * float("nan")])


def test_a_failing_or_misbehaving_transform_is_named():
    """The user's callables: an exception, a wrong signature, an output of the wrong kind of dtype or beyond the
    input dtype's range are errors naming the transform (the raw exception came from deep inside, or the output was
    cast without a word: complex to real, 1e39 to float32 infinity)."""
    x = image()

    def broken(v, g):
        raise KeyError("mine")

    with pytest.raises(ValueError, match=r"^pool: transform 'broken' failed on an input of shape \(3, 16, 16\) "
                                         r"\(KeyError: 'mine'\); a transform is called as t\(x, generator\)"):
        T.make_transformed_queries(x, 0, 2, 10, pool=[broken])
    with pytest.raises(ValueError, match=r"^pool: transform '<lambda>' failed .*TypeError"):
        T.make_transformed_queries(x, 0, 2, 10, pool=[lambda v: v])
    for dtype in (torch.int64, torch.bool, torch.complex64):
        with pytest.raises(ValueError, match=rf"returned {dtype} for an input of dtype torch.float32: return "
                                             "floating-point values"):
            T.make_transformed_queries(x, 0, 2, 10, pool=[lambda v, g, d=dtype: v.to(d)])
    with pytest.raises(ValueError, match="returned non-finite values .*beyond the range of torch.float32"):
        T.make_transformed_queries(x, 0, 2, 10, pool=[lambda v, g: v.double() * 1e39])
    ids = torch.arange(6)
    xs, _, _ = T.make_transformed_queries(ids, 0, 2, 10, pool=[lambda v, g: v.flip(0)])
    assert xs.dtype == torch.int64 and torch.equal(xs[0], ids.flip(0))
    with pytest.raises(ValueError, match="built-in transforms act on images"):
        T.make_transformed_queries(ids, 0, 2, 10)


def test_hue_of_a_black_pixel_a_pixel_map_put_just_below_zero_is_finite():
    """A float32 pixel map puts black at -1e-8 in some channels: the HSV conversion divided by max = 0, and colour
    jitter returned NaN (12 of 18 runs of a user's RGB pipeline standardised with its dataset's statistics)."""
    img = torch.rand(3, 8, 8)
    img[:, 0, 0] = torch.tensor([0.0, -1.5e-8, 0.0])
    jitter = T.ColorJitter(brightness=(1.0, 1.0), contrast=(1.0, 1.0), saturation=(1.0, 1.0), hue=(0.1, 0.1))
    out = jitter(img, torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(out).all()) and float(out[:, 0, 0].abs().max()) < 1e-6


def test_a_constant_channel_keeps_its_value_in_the_estimated_pixel_map():
    """An opaque alpha channel (always 1) beside standardised colour channels: the range estimate mapped it to black
    (pixel 0); a constant within [0, 1] is kept, the other channels are mapped from their range."""
    pm = T.PixelMap.estimate(torch.tensor([-2.0, -1.0, 1.0]), torch.tensor([2.0, 1.0, 1.0]))
    x = torch.tensor([[[-2.0]], [[1.0]], [[1.0]]])
    torch.testing.assert_close(pm.to_pixel(x), torch.tensor([[[0.0]], [[1.0]], [[1.0]]]))
    torch.testing.assert_close(pm.from_pixel(pm.to_pixel(x)), x)
