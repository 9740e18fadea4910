"""The Δ-Influence transform pool, written in plain torch (no torchvision).

Each transformed copy of an affected test point is one random image transform from the paper's pool of
seven plus a random new label. The transforms reproduce torchvision's tensor
semantics, because the paper applied torchvision to its query tensors:

==============  =====================================================================================
name            what it does (parameters as the paper used them on 32-px CIFAR images)
==============  =====================================================================================
hflip           mirror left-right
color_jitter    ``ColorJitter(brightness=(0.9,1.1), contrast=(0.9,1.1), saturation=(0.6,1.4),
                hue=(-0.1,0.1))``: the four adjustments in a random order (``randperm(4)``); the
                brightness/contrast/saturation blends clamp to [0, 1] as torchvision does for float
                images; hue goes through RGB->HSV->RGB. Saturation and hue are the identity on
                1-channel images (torchvision matches PIL there).
affine          ``RandomAffine(degrees=(-180,180), scale=(1,2), shear=10)``: rotation, zoom and x-shear
                about the image centre, no translation, nearest-neighbour sampling, fill 0.
elastic         ``ElasticTransform(alpha=150, sigma=5)``: a uniform [-1, 1] displacement field per
                axis, smoothed with a Gaussian (kernel ``int(8 sigma + 1)`` made odd, reflect padding),
                scaled by ``alpha / size``, added to the identity sampling grid; bilinear, fill 0.
blur            ``GaussianBlur(kernel_size=(5, 9), sigma=(8, 10))``: kernel 5 wide x 9 high,
                sigma ~ U[8, 10] on both axes, reflect padding.
invert          ``1 - x`` (no clamp, as torchvision's ``invert`` on float tensors).
channel_swap    swap channels 0 and 1 (R <-> G); the identity on 1-channel images.
identity        returns the input (not in the default pool; useful for a label-only ablation).
==============  =====================================================================================

Scaling to other image sizes. The parameters above are for 32-px images. Every transform receives
the scale factor ``s = min(H, W) / 32`` (``reference_size`` = 32) and, when ``scale_to_size`` is
True (the default), adapts its pixel-unit parameters so that the distortion is the same *fraction
of the image* as at 32 px; at 32 px nothing changes and torchvision's behaviour is reproduced
exactly. The rule:

* blur: each kernel side ``k`` becomes the odd integer nearest to ``k * s`` (at least 1) and the
  sigma range becomes ``sigma * s``. (16 px: 3 x 5, sigma in [4, 5]; 160 px: 25 x 45, [40, 50].)
* elastic: ``sigma`` becomes ``sigma * s`` (kernel ``int(8 sigma + 1)`` made odd, as torchvision);
  ``alpha`` becomes ``alpha * s * ||k_32||_2 / ||k_s||_2`` where ``k`` is the normalised 2-D
  smoothing kernel. The displacement in grid units is ``blur(U[-1,1]) * alpha / size`` and the
  standard deviation of blurred white noise is proportional to the kernel's L2 norm, so this keeps
  the displacement's standard deviation, as a fraction of the image, equal to torchvision's at 32 px.
* color_jitter, affine, hflip, invert, channel_swap, identity: size-free, unchanged.

Note that the paper itself used the 32-px values unchanged on its 160-px Imagenette images (a much
milder blur and warp relative to the image); ``scale_to_size=False`` on :class:`GaussianBlur` and
:class:`ElasticTransform` reproduces that.

Independently of ``scale_to_size``, a smoothing kernel is clipped to at most ``2 * side - 1`` so that
reflect padding stays valid (torchvision would raise on a kernel larger than about twice the image;
with the scaling on this never triggers for square images).

Domains. ``"pixel"`` applies a transform to the [0, 1] pixel image. ``"normalized"`` reproduces the
paper's code, which transformed mean/std-normalised tensors: ``z = (x - mean) / std``, transform
``z``, map back ``x' = z' * std + mean``. Side effects of that domain (kept on purpose, they are what
the paper ran): colour jitter's clamp to [0, 1] acts on ``z``, so after mapping back pixels lie in
``[mean, mean + std]``; fill 0 of affine/elastic becomes the dataset-mean colour; invert maps
``x -> std - x + 2 mean``; channel swap also rescales between the two channels' statistics. Outputs
are not clamped back to [0, 1] in either domain.

Randomness. Every transform draws its parameters from a CPU ``torch.Generator`` that the caller
passes, in the same order as torchvision draws them from the global generator, so one seed gives the
same image on every device.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from deltainf._util import as_int, first_line, gaussian_kernel1d

__all__ = [
    "REFERENCE_SIZE",
    "DEFAULT_POOL",
    "Transform",
    "HorizontalFlip",
    "ColorJitter",
    "RandomAffine",
    "ElasticTransform",
    "GaussianBlur",
    "Invert",
    "ChannelSwap",
    "Identity",
    "get_transform",
    "transform_name",
    "is_image_pool",
    "resolve_pool",
    "available_transforms",
    "apply_transform",
    "sample_labels",
    "make_transformed_queries",
    "to_normalized",
    "from_normalized",
    "PixelMap",
]

REFERENCE_SIZE = 32
"""Image side length (pixels) the paper's transform parameters were written for (CIFAR)."""

DEFAULT_POOL = ("hflip", "color_jitter", "affine", "elastic", "blur", "invert", "channel_swap")
"""The paper's seven transforms, in the order of the paper"""

_DOMAINS = ("pixel", "normalized")
_LABEL_MODES = ("replace", "distinct", "keep")


# --------------------------------------------------------------------------------------------------
# helpers


def _check_image(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (C, H, W), got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] < 1 or x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        # Parameters are drawn on the CPU so a seed means the same image on every device.
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")


def _uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    # Same draw as torchvision's ``float(torch.empty(1).uniform_(lo, hi))`` on its generator.
    return float(torch.empty(1, dtype=torch.float32).uniform_(lo, hi, generator=generator))


def _scale_factor(x: torch.Tensor, reference_size: int) -> float:
    return min(x.shape[-2], x.shape[-1]) / float(reference_size)


def _odd(v: float) -> int:
    """The odd integer nearest to v, at least 1 (ties go up)."""
    return max(1, 2 * int(math.floor((v - 1.0) / 2.0 + 0.5)) + 1)


def _clip_kernel(k: int, side: int) -> int:
    # reflect padding needs pad = k // 2 <= side - 1, i.e. k <= 2 * side - 1 for odd k.
    return min(k, 2 * side - 1)


def gaussian_blur(img: torch.Tensor, kernel_size: Sequence[int], sigma: Sequence[float]) -> torch.Tensor:
    """torchvision's tensor ``gaussian_blur``: normalised Gaussian kernel ``ky kx^T``, reflect padding,
    depthwise conv. img (C, H, W) or (B, C, H, W) float; kernel_size = (width, height), both odd;
    sigma = (sx, sy). The 2-D kernel is applied as two 1-D passes (same result up to float rounding,
    and k times cheaper for the large kernels of big images)."""
    kw, kh = int(kernel_size[0]), int(kernel_size[1])
    kx = gaussian_kernel1d(kw, float(sigma[0]), img.dtype, img.device)
    ky = gaussian_kernel1d(kh, float(sigma[1]), img.dtype, img.device)
    squeeze = img.ndim == 3
    x = img.unsqueeze(0) if squeeze else img
    c = x.shape[-3]
    x = F.pad(x, [kw // 2, kw // 2, kh // 2, kh // 2], mode="reflect")
    x = F.conv2d(x, kx.view(1, 1, 1, kw).expand(c, 1, 1, kw), groups=c)
    x = F.conv2d(x, ky.view(1, 1, kh, 1).expand(c, 1, kh, 1), groups=c)
    return x.squeeze(0) if squeeze else x


def _grid_sample_fill(img: torch.Tensor, grid: torch.Tensor, mode: str, fill: float) -> torch.Tensor:
    """torchvision's ``_apply_grid_transform`` with a scalar fill: sample with an extra all-ones mask
    channel; nearest: pixels whose mask < 0.5 get ``fill``; bilinear: ``img * mask + (1 - mask) * fill``
    (so border pixels are attenuated exactly as torchvision does). img (C, H, W), grid (1, H, W, 2)."""
    x = img.unsqueeze(0)
    ones = torch.ones((1, 1, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device)
    out = F.grid_sample(torch.cat((x, ones), dim=1), grid.to(x.dtype), mode=mode, padding_mode="zeros",
                        align_corners=False)
    mask = out[:, -1:].expand_as(x)
    out = out[:, :-1]
    if mode == "nearest":
        out = torch.where(mask < 0.5, torch.full_like(out, fill), out)
    else:
        out = out * mask + (1.0 - mask) * fill
    return out.squeeze(0)


def _rgb_to_grayscale(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(img.dtype).unsqueeze(-3)


def _blend(img1: torch.Tensor, img2: torch.Tensor, ratio: float) -> torch.Tensor:
    # torchvision clamps float images to [0, 1] here, whatever their actual range.
    return (ratio * img1 + (1.0 - ratio) * img2).clamp(0.0, 1.0).to(img1.dtype)


def _rgb2hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(dim=-3)
    maxc = torch.max(img, dim=-3).values
    minc = torch.min(img, dim=-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    # maxc == 0 with a channel below it: a black pixel a float32 pixel map put at -1e-8 (torchvision divides by 0)
    s = cr / torch.where(eqc | (maxc == 0), ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_divisor
    gc = (maxc - g) / cr_divisor
    bc = (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv2rgb(img: torch.Tensor) -> torch.Tensor:
    h, s, v = img.unbind(dim=-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    mask = (i.unsqueeze(-3) == torch.arange(6, device=i.device).view(-1, 1, 1)).to(img.dtype)
    a1 = torch.stack((v, q, p, p, t, v), dim=-3)
    a2 = torch.stack((t, v, v, q, p, p), dim=-3)
    a3 = torch.stack((p, p, t, v, v, q), dim=-3)
    a4 = torch.stack((a1, a2, a3), dim=-4)
    return torch.einsum("...ijk, ...xijk -> ...xjk", mask, a4)


# --------------------------------------------------------------------------------------------------
# transforms


class Transform(abc.ABC):
    """Base class: ``t(x, generator) -> x'`` for x float (C, H, W); output has x's shape, dtype and
    device. Subclasses set ``name`` and draw every random parameter from ``generator`` (CPU)."""

    name = "transform"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check_image(x)
        _check_generator(generator)
        return self._apply(x, generator)

    @abc.abstractmethod
    def _apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The transform itself, on a validated image and generator."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class HorizontalFlip(Transform):
    """Mirror left-right (torchvision ``hflip``). Deterministic; draws nothing."""

    name = "hflip"

    def _apply(self, x, generator):
        return x.flip(-1)


class Invert(Transform):
    """``1 - x`` without clamping (torchvision ``invert`` on float tensors). Deterministic."""

    name = "invert"

    def _apply(self, x, generator):
        return 1.0 - x


class ChannelSwap(Transform):
    """Swap channels 0 and 1 (R <-> G), the paper's custom "colour switch". The identity when C == 1."""

    name = "channel_swap"

    def _apply(self, x, generator):
        if x.shape[0] < 2:
            return x.clone()
        perm = list(range(x.shape[0]))
        perm[0], perm[1] = 1, 0
        return x[perm]


class Identity(Transform):
    """Return a copy of the input (for a label-only ablation). Deterministic."""

    name = "identity"

    def _apply(self, x, generator):
        return x.clone()


class ColorJitter(Transform):
    """torchvision ``ColorJitter`` on float tensors.

    Draw order (as torchvision's ``get_params``): ``randperm(4)`` for the order, then brightness,
    contrast, saturation and hue factors ~ U[range]. Brightness: ``clamp(b * x, 0, 1)``; contrast:
    blend with the mean grey level; saturation: blend with the grey image; hue: shift H in HSV.
    Saturation and hue need colour (C == 3) and are the identity otherwise; for C != 3 the grey
    level of the contrast step is the mean over channels (torchvision's for C == 1).
    """

    name = "color_jitter"

    def __init__(self, brightness=(0.9, 1.1), contrast=(0.9, 1.1), saturation=(0.6, 1.4), hue=(-0.1, 0.1)):
        for nm, rng in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if len(rng) != 2 or not 0.0 <= rng[0] <= rng[1]:
                raise ValueError(f"ColorJitter: {nm} must be (lo, hi) with 0 <= lo <= hi, got {rng!r}")
        if len(hue) != 2 or not -0.5 <= hue[0] <= hue[1] <= 0.5:
            raise ValueError(f"ColorJitter: hue must be (lo, hi) with -0.5 <= lo <= hi <= 0.5, got {hue!r}")
        self.brightness = tuple(float(v) for v in brightness)
        self.contrast = tuple(float(v) for v in contrast)
        self.saturation = tuple(float(v) for v in saturation)
        self.hue = tuple(float(v) for v in hue)

    def __repr__(self) -> str:
        return (f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue})")

    def _apply(self, x, generator):
        c = x.shape[0]
        order = torch.randperm(4, generator=generator).tolist()
        b = _uniform(*self.brightness, generator)
        ct = _uniform(*self.contrast, generator)
        s = _uniform(*self.saturation, generator)
        h = _uniform(*self.hue, generator)
        img = x
        for fn in order:
            if fn == 0:
                img = _blend(img, torch.zeros_like(img), b)
            elif fn == 1:
                grey = _rgb_to_grayscale(img) if c == 3 else img.mean(dim=-3, keepdim=True)
                mean = torch.mean(grey, dim=(-3, -2, -1), keepdim=True)
                img = _blend(img, mean, ct)
            elif fn == 2:
                if c == 3:
                    img = _blend(img, _rgb_to_grayscale(img), s)
            elif c == 3:
                hsv = _rgb2hsv(img)
                hh, ss, vv = hsv.unbind(dim=-3)
                hh = (hh + h) % 1.0
                img = _hsv2rgb(torch.stack((hh, ss, vv), dim=-3))
        return img


class RandomAffine(Transform):
    """torchvision ``RandomAffine(degrees, scale, shear)`` with no translation, about the centre.

    Draws angle ~ U[degrees], scale ~ U[scale], x-shear ~ U[shear] (in that order), builds
    torchvision's inverse affine matrix and samples the input on that grid (``interpolation``
    "nearest" by default, out-of-image pixels set to ``fill``). Size-free: no scaling needed.
    """

    name = "affine"

    def __init__(self, degrees=(-180.0, 180.0), scale=(1.0, 2.0), shear=(-10.0, 10.0),
                 interpolation: str = "nearest", fill: float = 0.0):
        if isinstance(shear, (int, float)):
            shear = (-float(shear), float(shear))
        if isinstance(degrees, (int, float)):
            degrees = (-float(degrees), float(degrees))
        if len(degrees) != 2 or degrees[0] > degrees[1]:
            raise ValueError(f"RandomAffine: degrees must be (lo, hi) with lo <= hi, got {degrees!r}")
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1]:
            raise ValueError(f"RandomAffine: scale must be (lo, hi) with 0 < lo <= hi, got {scale!r}")
        if len(shear) != 2 or shear[0] > shear[1]:
            raise ValueError(f"RandomAffine: shear must be a number or (lo, hi), got {shear!r}")
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"RandomAffine: interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
        self.degrees = tuple(float(v) for v in degrees)
        self.scale = tuple(float(v) for v in scale)
        self.shear = tuple(float(v) for v in shear)
        self.interpolation = interpolation
        self.fill = float(fill)

    def __repr__(self) -> str:
        return (f"RandomAffine(degrees={self.degrees}, scale={self.scale}, shear={self.shear}, "
                f"interpolation={self.interpolation!r}, fill={self.fill})")

    @staticmethod
    def inverse_matrix(angle: float, scale: float, shear_x: float, shear_y: float = 0.0) -> list[float]:
        """torchvision's ``_get_inverse_affine_matrix`` for centre (0, 0) and no translation:
        the 2x3 matrix (row-major) mapping output pixel offsets from the centre to input offsets."""
        rot = math.radians(angle)
        sx = math.radians(shear_x)
        sy = math.radians(shear_y)
        a = math.cos(rot - sy) / math.cos(sy)
        b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
        c = math.sin(rot - sy) / math.cos(sy)
        d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
        return [v / scale for v in (d, -b, 0.0, -c, a, 0.0)]

    def _apply(self, x, generator):
        angle = _uniform(*self.degrees, generator)
        scale = _uniform(*self.scale, generator)
        shear_x = _uniform(*self.shear, generator)
        matrix = self.inverse_matrix(angle, scale, shear_x)
        h, w = x.shape[-2], x.shape[-1]
        theta = torch.tensor(matrix, dtype=x.dtype, device=x.device).reshape(1, 2, 3)
        # torchvision's _gen_affine_grid: pixel-centre coordinates relative to the image centre,
        # transformed by theta, then normalised to [-1, 1] by the half sizes.
        base = torch.empty(1, h, w, 3, dtype=x.dtype, device=x.device)
        base[..., 0].copy_(torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w, device=x.device))
        base[..., 1].copy_(torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h, device=x.device).unsqueeze(-1))
        base[..., 2].fill_(1.0)
        rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=x.dtype, device=x.device)
        grid = base.view(1, h * w, 3).bmm(rescaled).view(1, h, w, 2)
        return _grid_sample_fill(x, grid, self.interpolation, self.fill)


class GaussianBlur(Transform):
    """torchvision ``GaussianBlur(kernel_size=(width, height), sigma=(lo, hi))``: sigma ~ U[lo, hi],
    used on both axes; reflect padding. Kernel sides and sigma scale with the image (module doc)."""

    name = "blur"

    def __init__(self, kernel_size=(5, 9), sigma=(8.0, 10.0), reference_size: int = REFERENCE_SIZE,
                 scale_to_size: bool = True):
        if len(kernel_size) != 2 or any(int(k) != k or k < 1 or k % 2 == 0 for k in kernel_size):
            raise ValueError(f"GaussianBlur: kernel_size must be two odd positive ints, got {kernel_size!r}")
        if len(sigma) != 2 or not 0.0 < sigma[0] <= sigma[1]:
            raise ValueError(f"GaussianBlur: sigma must be (lo, hi) with 0 < lo <= hi, got {sigma!r}")
        if reference_size < 1:
            raise ValueError(f"GaussianBlur: reference_size must be >= 1, got {reference_size!r}")
        self.kernel_size = (int(kernel_size[0]), int(kernel_size[1]))
        self.sigma = (float(sigma[0]), float(sigma[1]))
        self.reference_size = int(reference_size)
        self.scale_to_size = bool(scale_to_size)

    def __repr__(self) -> str:
        return (f"GaussianBlur(kernel_size={self.kernel_size}, sigma={self.sigma}, "
                f"reference_size={self.reference_size}, scale_to_size={self.scale_to_size})")

    def params_for(self, height: int, width: int) -> tuple[tuple[int, int], tuple[float, float]]:
        """The (kernel (width, height), sigma range) used on an image of this size."""
        s = min(height, width) / float(self.reference_size) if self.scale_to_size else 1.0
        kw = _clip_kernel(_odd(self.kernel_size[0] * s), width)
        kh = _clip_kernel(_odd(self.kernel_size[1] * s), height)
        return (kw, kh), (self.sigma[0] * s, self.sigma[1] * s)

    def _apply(self, x, generator):
        (kw, kh), (lo, hi) = self.params_for(x.shape[-2], x.shape[-1])
        sigma = _uniform(lo, hi, generator)
        return gaussian_blur(x, (kw, kh), (sigma, sigma))


class ElasticTransform(Transform):
    """torchvision ``ElasticTransform(alpha, sigma)``, bilinear, fill 0.

    dx, dy ~ U[-1, 1] (H, W) each (dx drawn first), smoothed with a Gaussian (kernel
    ``int(8 sigma + 1)`` made odd), scaled by ``alpha / H`` and ``alpha / W`` (torchvision's pairing),
    added to the identity grid. sigma and alpha scale with the image (module doc).
    """

    name = "elastic"

    def __init__(self, alpha: float = 150.0, sigma: float = 5.0, reference_size: int = REFERENCE_SIZE,
                 scale_to_size: bool = True, interpolation: str = "bilinear", fill: float = 0.0):
        if alpha < 0:
            raise ValueError(f"ElasticTransform: alpha must be >= 0, got {alpha!r}")
        if sigma <= 0:
            raise ValueError(f"ElasticTransform: sigma must be > 0, got {sigma!r}")
        if reference_size < 1:
            raise ValueError(f"ElasticTransform: reference_size must be >= 1, got {reference_size!r}")
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"ElasticTransform: interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
        self.alpha = float(alpha)
        self.sigma = float(sigma)
        self.reference_size = int(reference_size)
        self.scale_to_size = bool(scale_to_size)
        self.interpolation = interpolation
        self.fill = float(fill)

    def __repr__(self) -> str:
        return (f"ElasticTransform(alpha={self.alpha}, sigma={self.sigma}, reference_size={self.reference_size}, "
                f"scale_to_size={self.scale_to_size})")

    @staticmethod
    def _kernel_size(sigma: float) -> int:
        k = int(8 * sigma + 1)
        return k + 1 if k % 2 == 0 else k

    @staticmethod
    def _kernel_norm(k: int, sigma: float) -> float:
        k1 = gaussian_kernel1d(k, sigma)
        return float(k1.square().sum())  # ||k1 (x) k1||_2 = ||k1||_2^2

    def params_for(self, height: int, width: int) -> tuple[float, float, tuple[int, int]]:
        """(alpha, sigma, smoothing kernel (width, height)) used on an image of this size."""
        if not self.scale_to_size:
            k = self._kernel_size(self.sigma)
            return self.alpha, self.sigma, (_clip_kernel(k, width), _clip_kernel(k, height))
        s = min(height, width) / float(self.reference_size)
        sigma = self.sigma * s
        k = self._kernel_size(sigma)
        k_ref = self._kernel_size(self.sigma)
        alpha = self.alpha * s * self._kernel_norm(k_ref, self.sigma) / self._kernel_norm(k, sigma)
        return alpha, sigma, (_clip_kernel(k, width), _clip_kernel(k, height))

    def _apply(self, x, generator):
        h, w = x.shape[-2], x.shape[-1]
        alpha, sigma, (kw, kh) = self.params_for(h, w)
        # Fields are drawn and smoothed on the CPU in float32 (as torchvision), then moved.
        dx = torch.rand((1, 1, h, w), generator=generator) * 2 - 1
        dx = gaussian_blur(dx, (kw, kh), (sigma, sigma)) * alpha / h
        dy = torch.rand((1, 1, h, w), generator=generator) * 2 - 1
        dy = gaussian_blur(dy, (kw, kh), (sigma, sigma)) * alpha / w
        displacement = torch.cat([dx, dy], 1).permute(0, 2, 3, 1)  # (1, H, W, 2)
        ys = torch.linspace((-h + 1) / h, (h - 1) / h, h)
        xs = torch.linspace((-w + 1) / w, (w - 1) / w, w)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack([grid_x, grid_y], -1).unsqueeze(0)
        grid = (identity + displacement).to(device=x.device, dtype=x.dtype)
        return _grid_sample_fill(x, grid, self.interpolation, self.fill)


_REGISTRY: dict[str, Callable[[], Transform]] = {
    "hflip": HorizontalFlip,
    "color_jitter": ColorJitter,
    "affine": RandomAffine,
    "elastic": ElasticTransform,
    "blur": GaussianBlur,
    "invert": Invert,
    "channel_swap": ChannelSwap,
    "identity": Identity,
}


def available_transforms() -> list[str]:
    """Names accepted by :func:`get_transform` (the default pool plus ``"identity"``)."""
    return list(_REGISTRY)


def transform_name(t) -> str:
    """The name a transform is reported under: its ``name`` attribute, else its function or class name."""
    name = getattr(t, "name", None)
    if isinstance(name, str):
        return name
    return getattr(t, "__name__", None) or type(t).__name__


def get_transform(name_or_transform) -> Transform:
    """A transform with the paper's parameters from its name, or the object itself when it is a callable
    ``t(x, generator) -> x'`` (reported under :func:`transform_name`)."""
    if isinstance(name_or_transform, str):
        if name_or_transform not in _REGISTRY:
            raise ValueError(f"unknown transform {name_or_transform!r}; expected one of {available_transforms()}")
        return _REGISTRY[name_or_transform]()
    if callable(name_or_transform):
        return name_or_transform
    raise TypeError("pool entries must be transform names or callables t(x, generator) -> x', "
                    f"got {name_or_transform!r}")


def resolve_pool(pool) -> list:
    """The pool as a list of callables: a sequence of names / callables, or one callable."""
    if callable(pool) and not isinstance(pool, str):
        return [pool]
    if isinstance(pool, str) or not isinstance(pool, Sequence) or len(pool) == 0:
        raise ValueError(f"pool must be a non-empty sequence of transform names or callables, or one callable "
                         f"t(x, generator) -> x', got {pool!r}")
    return [get_transform(p) for p in pool]


def is_image_pool(pool) -> bool:
    """Whether the pool holds a built-in image transform (which needs (C, H, W) images)."""
    return any(isinstance(t, Transform) for t in resolve_pool(pool))


def _stats(v, c: int, dtype, device, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.expand(c)
    if t.numel() != c:
        raise ValueError(f"{name} must have one value per channel ({c}), got {t.numel()} values")
    if name == "std" and bool((t <= 0).any()):
        raise ValueError(f"std must be positive, got {t.tolist()}")
    return t.to(dtype=dtype, device=device).view(c, 1, 1)


def to_normalized(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel. x (C, H, W) or (B, C, H, W); mean/std: C values (or one)."""
    c = x.shape[-3]
    return (x - _stats(mean, c, x.dtype, x.device, "mean")) / _stats(std, c, x.dtype, x.device, "std")


def from_normalized(z: torch.Tensor, mean, std) -> torch.Tensor:
    """z * std + mean per channel: the inverse of :func:`to_normalized`."""
    c = z.shape[-3]
    return z * _stats(std, c, z.dtype, z.device, "std") + _stats(mean, c, z.dtype, z.device, "mean")


@dataclasses.dataclass(frozen=True)
class PixelMap:
    """How a model's inputs x relate to pixel images p in [0, 1]: ``x = (p - offset) / scale`` per channel.

    The photometric transforms (colour jitter clamps to [0, 1], invert is ``1 - p``) and the black fill
    of the geometric ones need pixel images; this map takes the model's inputs there and back. It is the
    identity for inputs already in [0, 1], ``(mean, std)`` for a data pipeline that standardises its
    images, or estimated from data (:meth:`estimate`). ``source`` says which, for reports."""

    offset: tuple
    scale: tuple
    source: str = "given"

    def __post_init__(self):
        # a map built by hand is checked as the (mean, std) pair is (scale 0 ended in "non-finite measurement in
        # queries", NaN in a transform's "returned non-finite values")
        try:
            offset = [float(v) for v in self.offset]
            scale = [float(v) for v in self.scale]
        except (TypeError, ValueError):
            raise TypeError(f"pixel_map: offset and scale must be sequences of numbers, got {self.offset!r} and "
                            f"{self.scale!r}") from None
        if not offset or len(offset) != len(scale):
            raise ValueError(f"pixel_map: offset and scale must be non-empty and of equal length, got {len(offset)} "
                             f"and {len(scale)} values")
        if not all(math.isfinite(v) for v in offset) or not all(math.isfinite(v) and v > 0 for v in scale):
            raise ValueError(f"pixel_map: offset must be finite and scale finite and positive, got {offset} / "
                             f"{scale}")
        object.__setattr__(self, "offset", tuple(offset))
        object.__setattr__(self, "scale", tuple(scale))

    @classmethod
    def identity(cls, channels: int) -> "PixelMap":
        return cls((0.0,) * channels, (1.0,) * channels, "identity")

    @classmethod
    def standardized(cls, mean, std, source: str = "given") -> "PixelMap":
        """The map of a pipeline that feeds the model ``(p - mean) / std``."""
        mean_t = torch.as_tensor(mean, dtype=torch.float64).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float64).flatten()
        if mean_t.numel() != std_t.numel() or mean_t.numel() == 0:
            raise ValueError(f"mean and std must be non-empty and of equal length, got {mean_t.numel()} and "
                             f"{std_t.numel()} values")
        if not bool(torch.isfinite(mean_t).all()) or not bool(torch.isfinite(std_t).all()) or bool((std_t <= 0).any()):
            raise ValueError(f"mean must be finite and std finite and positive, got {mean_t.tolist()} / {std_t.tolist()}")
        return cls(tuple(mean_t.tolist()), tuple(std_t.tolist()), source)

    @classmethod
    def estimate(cls, lo: torch.Tensor, hi: torch.Tensor, tol: float = 1e-4) -> "PixelMap":
        """From the per-channel minimum and maximum of the inputs (C,): the identity when they lie in
        [0, 1]; otherwise the affine map that sends [lo, hi] to [0, 1]. Natural and rendered images reach
        (near-)black and (near-)white in every channel, so for a standardised or 0..255 pipeline the
        range maps back to the pixels the images were made from."""
        lo, hi = lo.double().flatten(), hi.double().flatten()
        if not bool(torch.isfinite(lo).all()) or not bool(torch.isfinite(hi).all()):
            raise ValueError("the inputs hold non-finite values")
        if float(lo.min()) >= -tol and float(hi.max()) <= 1 + tol:
            return cls.identity(lo.numel())
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        # p = (x - lo) / span, i.e. x = (p - offset) / scale with scale = 1 / span, offset = -lo / span; a constant
        # channel within [0, 1] (an opaque alpha channel) keeps its value, where its range would make it black
        kept = (hi <= lo) & (lo >= -tol) & (lo <= 1 + tol)
        offset = torch.where(kept, torch.zeros_like(lo), -lo / span)
        scale = torch.where(kept, torch.ones_like(lo), 1.0 / span)
        return cls(tuple(offset.tolist()), tuple(scale.tolist()), "estimated from the inputs' per-channel range")

    @property
    def is_identity(self) -> bool:
        return all(o == 0.0 for o in self.offset) and all(s == 1.0 for s in self.scale)

    def _params(self, x: torch.Tensor):
        c = len(self.offset)
        if x.ndim < 3 or (c != 1 and x.shape[-3] != c):
            raise ValueError(f"the pixel map has {c} channels but the inputs have shape {tuple(x.shape)}")
        shape = (-1, 1, 1)
        return (torch.tensor(self.offset, dtype=x.dtype, device=x.device).view(shape),
                torch.tensor(self.scale, dtype=x.dtype, device=x.device).view(shape))

    def to_pixel(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return x
        offset, scale = self._params(x)
        return x * scale + offset

    def from_pixel(self, p: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return p
        offset, scale = self._params(p)
        return (p - offset) / scale

    def as_dict(self) -> dict:
        return {"offset": list(self.offset), "scale": list(self.scale), "source": self.source}


def apply_transform(transform, x: torch.Tensor, generator: torch.Generator, domain: str = "pixel",
                    mean=None, std=None) -> torch.Tensor:
    """Apply ``transform`` to a pixel image x (C, H, W) in the given domain; returns a pixel image of
    the same shape and dtype. ``domain="normalized"`` needs per-channel ``mean`` and ``std``."""
    _check_image(x)
    t = get_transform(transform)
    if domain == "pixel":
        return t(x, generator)
    if domain == "normalized":
        if mean is None or std is None:
            raise ValueError("domain='normalized' needs the dataset's per-channel mean and std "
                             "(pass mean=..., std=...), or use domain='pixel'")
        return from_normalized(t(to_normalized(x, mean, std), generator), mean, std)
    raise ValueError(f"domain must be one of {_DOMAINS}, got {domain!r}")


def sample_labels(n: int, y_adv: int, num_classes: int, generator: torch.Generator,
                  mode: str = "replace") -> torch.Tensor:
    """The paper's label rule: n labels, each uniform over the classes != y_adv.

    mode "replace": independent draws with replacement (CIFAR-10 / Imagenette notebooks);
    "distinct": n different labels without replacement (CIFAR-100 notebook; needs n <= num_classes - 1);
    "keep": every label is y_adv (image-only ablation). Returns int64 (n,).
    """
    if mode not in _LABEL_MODES:
        raise ValueError(f"labels must be one of {_LABEL_MODES}, got {mode!r}")
    if mode == "keep":
        return torch.full((n,), y_adv, dtype=torch.int64)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 to draw a label != y_adv, got {num_classes}")
    if mode == "replace":
        r = torch.randint(0, num_classes - 1, (n,), generator=generator, dtype=torch.int64)
    else:
        if n > num_classes - 1:
            raise ValueError(f"labels='distinct' needs n <= num_classes - 1 = {num_classes - 1}, got n={n}")
        r = torch.randperm(num_classes - 1, generator=generator)[:n].to(torch.int64)
    # Map 0..K-2 onto the classes other than y_adv.
    return r + (r >= y_adv).to(torch.int64)


def make_transformed_queries(x: torch.Tensor, y_adv: int, n: int, num_classes: int, seed: int = 0,
                             domain: str = "pixel", pool=DEFAULT_POOL, mean=None, std=None,
                             labels: str = "replace") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The n transformed, relabelled copies of one affected test point (paper §1.3).

    Copy j = transform ``pool[c_j]`` (c_j uniform over the pool) applied to x, with label y'_j drawn by
    :func:`sample_labels` (uniform over classes != y_adv). Choices, labels and transform parameters
    come from three independent streams derived from ``seed``, so changing the pool leaves the labels
    unchanged; each copy's parameters come from its own generator, so copy j depends only on
    (seed, j, its transform).

    Args:
        x: pixel image (C, H, W), float.
        y_adv: the adversarial label the model predicts for x, in [0, num_classes).
        n: number of copies, >= 1.
        num_classes: number of classes K.
        seed: int seed.
        domain: "pixel" or "normalized" (the paper's; needs mean and std, see module doc).
        pool: transform names or objects (default: the paper's seven).
        mean, std: per-channel dataset statistics for the normalized domain.
        labels: "replace" (paper default), "distinct" or "keep" (see :func:`sample_labels`).

    Returns:
        xs (n, C, H, W) with x's dtype and device, ys int64 (n,), names: list of n transform names.

    With a pool of user callables only, x may have any shape (each callable maps x to a tensor of
    x's shape); the built-in transforms need images (C, H, W).
    """
    transforms = resolve_pool(pool)
    if any(isinstance(t, Transform) for t in transforms) or domain == "normalized":
        if isinstance(x, torch.Tensor) and x.ndim != 3:
            raise ValueError(f"x has shape {tuple(x.shape)}, but the built-in transforms act on images (C, H, W); "
                             "for other inputs pass pool=... with your own transforms t(x, generator) -> x'")
        _check_image(x)
    elif not isinstance(x, torch.Tensor) or x.dtype == torch.bool or x.is_complex():
        raise TypeError("x must be a floating-point or integer tensor, got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    label, seed_int = as_int(y_adv), as_int(seed)
    if label is None or not 0 <= label < num_classes:  # 1.7 was cut to 1, True taken as 1
        raise ValueError(f"y_adv must be a class index in [0, {num_classes}), got {y_adv!r}")
    if seed_int is None or not 0 <= seed_int < 2 ** 63:  # as DeltaInfluence's seed (2**64 overflowed in torch)
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    y_adv, seed = label, seed_int
    if domain not in _DOMAINS:
        raise ValueError(f"domain must be one of {_DOMAINS}, got {domain!r}")
    if domain == "normalized" and (mean is None or std is None):
        raise ValueError("domain='normalized' needs the dataset's per-channel mean and std "
                         "(pass mean=..., std=...), or use domain='pixel'")

    root = torch.Generator().manual_seed(int(seed))
    choice_seed, label_seed, param_seed = (int(v) for v in torch.randint(0, 2**62, (3,), generator=root))
    choices = torch.randint(0, len(transforms), (n,), generator=torch.Generator().manual_seed(choice_seed))
    ys = sample_labels(n, y_adv, num_classes, torch.Generator().manual_seed(label_seed), labels)
    copy_seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(param_seed))

    z = to_normalized(x, mean, std) if domain == "normalized" else x
    out = []
    names = []
    for j in range(n):
        t = transforms[int(choices[j])]
        # a copy: a transform that works in place would otherwise alter the point itself and every later copy
        try:
            zj = t(z.clone(), torch.Generator().manual_seed(int(copy_seeds[j])))
        except Exception as err:  # the user's own callable: say which, and how it is called
            raise ValueError(f"pool: transform {transform_name(t)!r} failed on an input of shape {tuple(z.shape)} "
                             f"({type(err).__name__}: {first_line(err)}); a transform is called as "
                             "t(x, generator) -> x' of x's shape and dtype") from err
        if not isinstance(zj, torch.Tensor) or zj.shape != z.shape:
            got = tuple(zj.shape) if isinstance(zj, torch.Tensor) else type(zj).__name__
            raise ValueError(f"transform {transform_name(t)!r} must return a tensor of the input's shape "
                             f"{tuple(z.shape)}, got {got}")
        if zj.dtype == torch.bool or zj.is_complex() or zj.is_floating_point() != z.is_floating_point():
            raise ValueError(f"transform {transform_name(t)!r} returned {zj.dtype} for an input of dtype {z.dtype}: "
                             f"return {'floating-point' if z.is_floating_point() else 'integer'} values")
        if zj.device != z.device:  # torch's own error came later, from deep inside the scoring
            raise ValueError(f"transform {transform_name(t)!r} returned a tensor on {zj.device} for an input on "
                             f"{z.device}: return it on the input's device")
        zj = zj.to(z.dtype)
        if zj.is_floating_point() and not bool(torch.isfinite(zj).all()):
            raise ValueError(f"transform {transform_name(t)!r} returned non-finite values (NaN, infinity, or beyond "
                             f"the range of {z.dtype})")
        out.append(zj)
        names.append(transform_name(t))
    xs = torch.stack(out).to(x.dtype)
    if domain == "normalized":
        xs = from_normalized(xs, mean, std)
    return xs, ys, names
