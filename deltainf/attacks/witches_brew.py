"""Witches' Brew: clean-label targeted poisoning by gradient matching (Geiping et al., ICLR 2021).

Threat model ("single-class", the reference default): one test image of class ``target_true_class``
should be classified as ``intended_class`` by a victim trained *from scratch* on the poisoned set. The
poisons are training images *of the intended class*; they keep their correct labels and get an l_inf
perturbation of at most ``eps`` (pixel units). The perturbation is crafted on a surrogate trained on clean
data so that the gradient of the poison batch's loss aligns -- one cosine over ALL parameters jointly --
with the gradient of the target's loss towards the intended class:

    B(delta) = 1 - <g_t, g_p(delta)> / (||g_t|| ||g_p(delta)||)
    g_t = grad_theta CE(F(x_t), y_intended)          (eval mode, computed once)
    g_p = grad_theta CE(F(A(x_P + delta)), y_P)      (A: differentiable random shift + flip, after delta)

Optimisation follows the authors' implementation: per restart,
delta ~ N(0,1) * eps clamped to the box, Adam on the *sign* of the accumulated gradient (lr
``tau * pbatch / 512``), MultiStepLR x0.1 at M//2.667, M//1.6, M//1.142 (93/156/218 for M = 250),
projection onto the eps box and the valid pixel range after every step; the restart with the lowest
final matching loss is kept. BatchNorm uses running statistics throughout (model in eval mode; Dropout
stays active as in the reference, its masks drawn from torch's global RNG seeded with ``seed`` for the
crafting and restored after it).

Units: the reference stores delta in the model's *normalised* space, so Adam's step (= lr for sign
gradients) is ``tau`` normalised units = ``tau * std_c`` pixels. Delta is optimised in those units here too
when the model has a ``Normalize`` module (``model.normalize`` with mean/std buffers, as every deltainf
model), else in pixel units. The constraint is the same set either way: the pixel-space l_inf ball.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from deltainf._util import model_dtype, progress_bar, restore_modes, seeded_rng, training_modes
from deltainf.attacks.base import PoisonResult, check_seed
from deltainf.data.dataset import ImageDataset, as_index_tensor

__all__ = [
    "BrewValidation", "WitchesBrew", "WitchesBrewResult", "differentiable_augment", "select_target",
    "validate_brew", "witches_brew_attack",
]


# ----------------------------------------------------------------------------------------------- helpers

def _as_image_dataset(dataset, name: str) -> ImageDataset:
    """An ImageDataset view of any map-style dataset yielding (x, y) or (x, y, index)."""
    if isinstance(dataset, ImageDataset):
        return dataset
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"{name}: expected an ImageDataset or a map-style torch Dataset, got "
                        f"{type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name}: the dataset is empty")
    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise TypeError(f"{name}: expected items (x, y) or (x, y, index), got {type(item).__name__}")
        xs.append(torch.as_tensor(item[0]).float())
        ys.append(int(item[1]))
    return ImageDataset(torch.stack(xs), torch.tensor(ys))


def _find_normalization(model: nn.Module) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(mean (C,), std (C,)) of the model's input normalisation, or (None, None) when it has none.

    Looks at ``model.normalize`` (the deltainf convention), then at the first submodule whose class is
    named ``Normalize`` with tensor ``mean``/``std`` attributes.
    """
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    cands = []
    for m in (model, inner):
        if isinstance(m, nn.Module) and isinstance(getattr(m, "normalize", None), nn.Module):
            cands.append(m.normalize)
    cands += [m for m in model.modules() if type(m).__name__ == "Normalize"]
    for m in cands:
        mean, std = getattr(m, "mean", None), getattr(m, "std", None)
        if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
            return mean.detach().reshape(-1), std.detach().reshape(-1)
    return None, None


def differentiable_augment(
    x: torch.Tensor,
    *,
    max_shift: float,
    flip: bool = True,
    generator: Optional[torch.Generator] = None,
    fill: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Random continuous translation (up to +-``max_shift`` px, bilinear ``grid_sample``) and horizontal
    flip (p = 0.5), differentiable w.r.t. ``x`` -- the reference's ``RandomTransform``.

    Args:
        x: float (B,C,H,W), H, W >= 2.
        max_shift: largest shift in pixels (>= 0); each image draws its x and y shift uniformly.
        flip: whether to flip half of the images horizontally.
        generator: CPU torch.Generator for the random draws (same draws on every device).
        fill: optional (C,) padding value that enters at the border (default 0). The reference pads with
            zeros in *normalised* space, i.e. with the normalisation mean in pixel space.
    Returns:
        float (B,C,H,W), same dtype/device as x.
    """
    b, c, h, w = x.shape
    if h < 2 or w < 2:
        raise ValueError(f"x: differentiable_augment needs H, W >= 2, got {h}x{w}")
    shifts = (torch.rand(b, 2, generator=generator) * 2 - 1) * float(max_shift)
    sign = torch.ones(b)
    if flip:
        sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = sign
    theta[:, 1, 1] = 1.0
    # with align_corners=True one pixel spans 2/(size-1) normalised units
    theta[:, 0, 2] = shifts[:, 0] * 2.0 / (w - 1)
    theta[:, 1, 2] = shifts[:, 1] * 2.0 / (h - 1)
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=True)
    if fill is None:
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    base = torch.as_tensor(fill, device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1)
    return F.grid_sample(x - base, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + base


@dataclass
class WitchesBrewResult(PoisonResult):
    """A :class:`~deltainf.attacks.base.PoisonResult` for Witches' Brew, plus the crafting record.

    Inherited fields, as for every attack: ``train`` (poisoned ImageDataset; only rows in
    ``poison_indices`` differ, labels unchanged), ``poison_indices`` (int64 (P,), all of the intended
    class), ``target_class`` (= the INTENDED class, the label the attack wants for its target),
    ``source_classes`` (``(intended_class,)``: where the poisons come from), ``triggered_test`` (the target
    image(s) with their TRUE labels), ``test_indices``, ``original_labels``, ``name="witches_brew"``,
    ``params``; ``poison_success(model)`` = fraction of targets classified as the intended class.

    Attributes:
        delta: float32 (P,C,H,W) pixel-space perturbations, ``|delta| <= eps``.
        target_true_class: the target's true class.
        eps: the l_inf budget in pixel units.
        matching_loss: the kept restart's final alignment loss (1 - cosine).
        restart_losses: final alignment loss of every restart.
        loss_history: per-iteration mean alignment loss of the kept restart.
    """

    delta: torch.Tensor = None
    target_true_class: int = -1
    eps: float = 0.0
    matching_loss: float = float("nan")
    restart_losses: List[float] = field(default_factory=list)
    loss_history: List[float] = field(default_factory=list)

    @property
    def intended_class(self) -> int:
        """The adversarial label (alias of ``target_class``)."""
        return self.target_class

    @property
    def target_x(self) -> torch.Tensor:
        """float32 (T,C,H,W) the target image(s)."""
        return self.triggered_test.images

    @property
    def target_y_adv(self) -> torch.Tensor:
        """int64 (T,) the label the attack wants each target to get (the affected point's wrong label)."""
        return torch.full((self.target_x.shape[0],), self.target_class, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- the attack

def select_target(test: Dataset, num_classes: int, seed: int = 0,
                  intended_class: Optional[int] = None) -> Tuple[int, int, int]:
    """The reference's single-class threat-model draw: ``target_class`` uniform over the classes,
    ``intended_class`` uniform over the others, the target uniform among ``target_class`` test images.
    A given ``intended_class`` is kept and ``target_class`` is drawn uniformly among the other classes.

    Returns ``(target_index, target_true_class, intended_class)``; raises ValueError when the drawn class
    has no test image.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    _check_class(intended_class, num_classes)
    test = _as_image_dataset(test, "test")
    g = torch.Generator().manual_seed(int(seed))
    if intended_class is None:
        target_class = int(torch.randint(0, num_classes, (1,), generator=g))
        others = [c for c in range(num_classes) if c != target_class]
        intended_class = others[int(torch.randint(0, len(others), (1,), generator=g))]
    else:
        others = [c for c in range(num_classes) if c != intended_class]
        target_class = others[int(torch.randint(0, len(others), (1,), generator=g))]
    cands = torch.nonzero(test.labels == target_class).reshape(-1)
    if cands.numel() == 0:
        raise ValueError(f"test: no image of the drawn target class {target_class}")
    target_index = int(cands[int(torch.randint(0, cands.numel(), (1,), generator=g))])
    return target_index, target_class, intended_class


def _check_class(intended_class, num_classes: int) -> None:
    """None, or an int in [0, num_classes) (ValueError naming intended_class otherwise)."""
    if intended_class is not None and (isinstance(intended_class, bool) or not isinstance(intended_class, int)
                                       or not 0 <= intended_class < num_classes):
        raise ValueError(f"intended_class: expected an int in [0, {num_classes}), got {intended_class!r}")


class WitchesBrew:
    """Gradient-matching poison crafting settings (see the module docstring for the algorithm).

    Args:
        eps: l_inf budget in pixel units, 0 < eps <= 1 (default 16/255).
        restarts: independent restarts; the lowest final loss is kept (default 8).
        iterations: signed-Adam steps per restart (default 250).
        tau: base step size (default 0.1), in normalised units when the model normalises internally.
        pbatch: poisons per gradient-matching batch (default 512); the lr is ``tau * pbatch / 512``.
        augment: apply the differentiable augmentation to the poison batches (default True).
        max_shift: augmentation shift in px (default W/8: 4 px for 32-px images, as the reference).
        flip: random horizontal flips in the augmentation (default True; turn off for digits/text).
        init: ``"randn"`` (default), ``"rand"`` (uniform in the box) or ``"zero"``.
        seed: seeds the initialisation and augmentation draws of every restart, and torch's global RNG while
            crafting (Dropout's masks); the caller's global RNG state is restored afterwards.
        progress: tqdm bar over restarts x iterations.
        device: where to craft (default: the surrogate's device).
    """

    def __init__(
        self,
        *,
        eps: float = 16 / 255,
        restarts: int = 8,
        iterations: int = 250,
        tau: float = 0.1,
        pbatch: int = 512,
        augment: bool = True,
        max_shift: Optional[float] = None,
        flip: bool = True,
        init: str = "randn",
        seed: int = 0,
        progress: bool = True,
        device=None,
    ) -> None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) <= 1.0:
            raise ValueError(f"eps: expected an l_inf radius in pixel units with 0 < eps <= 1 (e.g. 16/255), "
                             f"got {eps!r}")
        for nm, v in (("restarts", restarts), ("iterations", iterations), ("pbatch", pbatch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm}: expected an int >= 1, got {v!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"tau: expected a finite step size > 0, got {tau!r}")
        if max_shift is not None and not float(max_shift) >= 0:
            raise ValueError(f"max_shift: expected None or a shift >= 0 in pixels, got {max_shift!r}")
        if init not in ("randn", "rand", "zero"):
            raise ValueError(f"init: expected 'randn', 'rand' or 'zero', got {init!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.eps = float(eps)
        self.restarts = restarts
        self.iterations = iterations
        self.tau = float(tau)
        self.pbatch = pbatch
        self.augment = bool(augment)
        self.max_shift = max_shift
        self.flip = bool(flip)
        self.init = init
        self.seed = seed
        self.progress = progress
        self.device = device

    def settings(self) -> dict:
        """JSON-serialisable settings (stored in ``result.params``)."""
        return dict(eps=self.eps, restarts=self.restarts, iterations=self.iterations, tau=self.tau,
                    pbatch=self.pbatch, augment=self.augment, max_shift=self.max_shift, flip=self.flip,
                    init=self.init, seed=self.seed)

    def craft(
        self,
        model: nn.Module,
        train: Dataset,
        target_x: torch.Tensor,
        target_true_class: int,
        intended_class: int,
        poison_indices: Sequence[int],
        *,
        test_indices: Optional[Sequence[int]] = None,
    ) -> WitchesBrewResult:
        """Craft perturbations for the given poisons on the (clean-trained) surrogate ``model``.

        Args:
            model: surrogate classifier taking pixel-space (B,C,H,W); its parameters are not changed and its
                train/eval mode is restored. The crafting runs in its dtype; the poisons are float32.
            train: clean training set (ImageDataset, or any dataset yielding (x, y[, index])).
            target_x: float32 (C,H,W) or (T,C,H,W) target image(s) in [0,1].
            target_true_class: the target's true class.
            intended_class: the adversarial label; every poison must be a training image of this class.
            poison_indices: int (P,) distinct positions in ``train``.
            test_indices: optional positions of the targets in their test set (recorded in the result).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch nn.Module, got {type(model).__name__}")
        train = _as_image_dataset(train, "train")
        k = train.num_classes
        for nm, v in (("target_true_class", target_true_class), ("intended_class", intended_class)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < k:
                raise ValueError(f"{nm}: expected an int in [0, {k}), got {v!r}")
        if intended_class == target_true_class:
            raise ValueError(f"intended_class: must differ from target_true_class (both {target_true_class})")
        tx = torch.as_tensor(target_x).detach().float().cpu()
        if tx.dim() == 3:
            tx = tx.unsqueeze(0)
        if tx.dim() != 4 or tuple(tx.shape[1:]) != train.image_shape:
            raise ValueError(f"target_x: expected (C,H,W) or (T,C,H,W) with (C,H,W) = {train.image_shape}, "
                             f"got shape {tuple(torch.as_tensor(target_x).shape)}")
        pidx = as_index_tensor(poison_indices, len(train), name="poison_indices")
        if pidx.numel() == 0:
            raise ValueError("poison_indices: expected at least one poison")
        pidx = pidx.sort().values
        if bool((train.labels[pidx] != intended_class).any()):
            raise ValueError(f"poison_indices: every poison must be a training image of intended_class="
                             f"{intended_class} (clean-label threat model)")
        base = train.images[pidx].clone()

        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: has no trainable parameters to match gradients on")
        dev = torch.device(self.device) if self.device is not None else params[0].device
        mean, std = _find_normalization(model)
        c = base.shape[1]
        scale = torch.ones(c) if std is None else std.float().cpu().expand(c).clone()
        fill = None if mean is None else mean.float().cpu().expand(c).clone()
        max_shift = self.max_shift if self.max_shift is not None else base.shape[-1] / 8.0

        modes = training_modes(model)
        model.eval()
        # the reference keeps Dropout active while crafting; only BatchNorm must use running statistics
        for m in model.modules():
            if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
                m.train()
        dt = model_dtype(model) or torch.float32
        try:
            with seeded_rng(self.seed, dev):  # Dropout draws from the global RNG: seeded, and the caller's kept
                u, restart_losses, history = self._brew(
                    model, params, base.to(dev, dt), intended_class, tx.to(dev, dt), scale.to(dev, dt),
                    None if fill is None else fill.to(dev, dt), max_shift, dev)
        finally:
            restore_modes(modes)
        delta = (u.cpu() * scale.reshape(1, -1, 1, 1)).clamp(-self.eps, self.eps)
        poisoned = (base + delta).clamp(0.0, 1.0).float()
        delta = poisoned - base
        best_loss = min(restart_losses)
        triggered = ImageDataset(tx, torch.full((tx.shape[0],), target_true_class, dtype=torch.long),
                                 classes=train.classes, mean=train.mean, std=train.std,
                                 name=f"{train.name} witches' brew target".strip())
        params_out = self.settings()
        params_out.update(num_poisons=int(pidx.numel()), target_true_class=target_true_class,
                          intended_class=intended_class, matching_loss=best_loss,
                          restart_losses=list(restart_losses))
        return WitchesBrewResult(
            train=train.with_replaced(pidx, images=poisoned, name=f"{train.name} + witches' brew".strip()),
            poison_indices=pidx, target_class=intended_class, source_classes=(intended_class,),
            triggered_test=triggered,
            test_indices=torch.as_tensor([] if test_indices is None else test_indices, dtype=torch.long).reshape(-1),
            original_labels=train.labels[pidx].clone(), trigger=None, name="witches_brew", params=params_out,
            delta=delta, target_true_class=target_true_class, eps=self.eps, matching_loss=best_loss,
            restart_losses=list(restart_losses), loss_history=history,
        )

    @torch.enable_grad()  # its gradient steps run under a caller's torch.no_grad() too
    def _brew(self, model, params, base, intended_class, tx, scale, fill, max_shift, dev):
        # Target gradient, once, in eval mode (BatchNorm running statistics).
        ty = torch.full((tx.shape[0],), intended_class, dtype=torch.long, device=dev)
        g_t = [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(tx), ty), params, allow_unused=True)]
        g_t = [torch.zeros_like(p) if g is None else g for g, p in zip(g_t, params)]
        n_t = torch.sqrt(sum((g * g).sum() for g in g_t))
        if not bool(torch.isfinite(n_t)) or float(n_t) == 0.0:
            raise ValueError("target_x: the target loss has a zero (or non-finite) gradient; the surrogate "
                             "already predicts the intended class with certainty or is degenerate")
        p = base.shape[0]
        y_p = torch.full((p,), intended_class, dtype=torch.long, device=dev)
        s4 = scale.reshape(1, -1, 1, 1)
        eps_u = self.eps / s4                                    # eps box in the units delta lives in
        lo_px, hi_px = (0.0 - base) / s4, (1.0 - base) / s4      # valid-pixel box in the same units
        m = self.iterations
        milestones = [int(m // 2.667), int(m // 1.6), int(m // 1.142)]
        lr = self.tau * self.pbatch / 512
        bar = progress_bar(total=self.restarts * m, enabled=self.progress, desc="witches' brew", leave=False)
        best = None
        all_losses = []
        try:
            for r in range(self.restarts):
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + r) % 2 ** 63)
                if self.init == "randn":
                    u0 = torch.randn(base.shape, generator=g)
                elif self.init == "rand":
                    u0 = torch.rand(base.shape, generator=g) * 2 - 1
                else:
                    u0 = torch.zeros(base.shape)
                u = (u0.to(dev) * eps_u).clamp(-eps_u, eps_u)
                u = torch.max(torch.min(u, hi_px), lo_px).requires_grad_(True)
                opt = torch.optim.Adam([u], lr=lr, weight_decay=0.0)
                sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
                history = []
                for _ in range(m):
                    grad = torch.zeros_like(u)
                    losses = []
                    for s in range(0, p, self.pbatch):
                        sl = slice(s, min(s + self.pbatch, p))
                        ub = u[sl].detach().requires_grad_(True)
                        xb = base[sl] + ub * s4
                        if self.augment:  # after delta, as the victim's training will see it
                            xb = differentiable_augment(xb, max_shift=max_shift, flip=self.flip, generator=g,
                                                        fill=fill)
                        loss_p = F.cross_entropy(model(xb), y_p[sl])
                        g_p = torch.autograd.grad(loss_p, params, create_graph=True, allow_unused=True)
                        dot = sum((a * b).sum() for a, b in zip(g_t, g_p) if b is not None)
                        n_p = torch.sqrt(sum((b * b).sum() for b in g_p if b is not None))
                        align = 1 - dot / (n_t * n_p)
                        grad[sl] = torch.autograd.grad(align, ub)[0]
                        losses.append(float(align.detach()))
                    # signed Adam: Adam sees only the sign of the accumulated poison gradient
                    u.grad = grad.sign()
                    opt.step()
                    sched.step()
                    with torch.no_grad():
                        u.copy_(torch.max(torch.min(u, eps_u), -eps_u))
                        u.copy_(torch.max(torch.min(u, hi_px), lo_px))
                    history.append(sum(losses) / len(losses))
                    bar.update(1)
                # the restart's score: mean alignment loss over the final iteration's batches (reference)
                score = history[-1]
                all_losses.append(score)
                if best is None or score < best[0]:
                    best = (score, u.detach().clone(), history)
        finally:
            bar.close()
        return best[1], all_losses, best[2]


def witches_brew_attack(
    train: Dataset,
    test: Dataset,
    surrogate: nn.Module,
    *,
    target_index: Optional[int] = None,
    intended_class: Optional[int] = None,
    num_poisons: Optional[int] = None,
    fraction: Optional[float] = None,
    seed: int = 0,
    **settings,
) -> WitchesBrewResult:
    """Poison ``train`` with Witches' Brew against one test image.

    Args:
        train, test: clean datasets (ImageDataset or datasets yielding (x, y[, index])), same image shape.
        surrogate: a model trained on clean ``train`` (the reference uses the victim's architecture).
        target_index: position of the target in ``test``; None draws the target class uniformly (among the
            classes other than ``intended_class`` when that is given), the intended class (when not given)
            uniformly among the others, then the image (:func:`select_target`).
        intended_class: the adversarial label; None draws it uniformly among the classes other than the
            target's.
        num_poisons / fraction: poison budget as a count (>= 1) or a fraction in (0, 1] of the whole
            training set (ceil(fraction N), as the reference); at most one, default ``fraction=0.01``.
            Must not exceed the number of intended-class training images.
        seed: an int; seeds the target draw, the poison draw (uniform without replacement among the
            intended-class training images) and the crafting (:class:`WitchesBrew` ``seed``).
        **settings: :class:`WitchesBrew` options (eps, restarts, iterations, tau, pbatch, augment, max_shift,
            flip, init, progress, device).

    Returns:
        :class:`WitchesBrewResult` (a PoisonResult with ``name="witches_brew"``).
    """
    train = _as_image_dataset(train, "train")
    test = _as_image_dataset(test, "test")
    if train.image_shape != test.image_shape:
        raise ValueError(f"test: image shape {test.image_shape} differs from train's {train.image_shape}")
    k = train.num_classes
    seed = check_seed(seed)
    _check_class(intended_class, k)
    g = torch.Generator().manual_seed(seed + 7919)
    if target_index is None:
        target_index, target_true, intended_class = select_target(test, k, seed, intended_class=intended_class)
    else:
        if isinstance(target_index, bool) or not isinstance(target_index, int) or not 0 <= target_index < len(test):
            raise ValueError(f"target_index: expected an int in [0, {len(test)}), got {target_index!r}")
        target_true = int(test.labels[target_index])
        if intended_class is None:
            others = [c for c in range(k) if c != target_true]
            intended_class = others[int(torch.randint(0, len(others), (1,), generator=g))]
    if intended_class == target_true:
        raise ValueError(f"intended_class: must differ from the target's true class {target_true}")

    if num_poisons is not None and fraction is not None:
        raise ValueError("num_poisons, fraction: give at most one poison budget")
    pool = train.indices_of_class(intended_class)
    if num_poisons is None:
        fraction = 0.01 if fraction is None else fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction: expected a budget in (0, 1] of the training set, got {fraction!r}")
        num_poisons = math.ceil(fraction * len(train))
    elif isinstance(num_poisons, bool) or not isinstance(num_poisons, int) or num_poisons < 1:
        raise ValueError(f"num_poisons: expected an int >= 1, got {num_poisons!r}")
    if num_poisons > pool.numel():
        raise ValueError(f"num_poisons: {num_poisons} poisons requested but train has only {pool.numel()} "
                         f"images of intended_class={intended_class}")
    pidx = pool[torch.randperm(pool.numel(), generator=g)[:num_poisons]]
    brewer = WitchesBrew(seed=seed, **settings)
    return brewer.craft(surrogate, train, test.images[target_index], target_true, intended_class, pidx,
                        test_indices=[target_index])


# ------------------------------------------------------------------------------------------- validation

@dataclass
class BrewValidation:
    """Outcome of retraining fresh victims on a poisoned set.

    Attributes:
        predictions: int64 (runs, T) each retrained victim's predicted class for each target.
        success: bool (runs, T) prediction == intended class.
        success_rate: mean of ``success`` (the reference's "fool accuracy" averaged over runs).
        intended_class: the intended class.
    """

    predictions: torch.Tensor
    success: torch.Tensor
    success_rate: float
    intended_class: int


def validate_brew(
    result: WitchesBrewResult,
    train_fn: Optional[Callable[[Dataset, int], nn.Module]] = None,
    *,
    config=None,
    runs: int = 1,
    seed: int = 0,
) -> BrewValidation:
    """Judge the attack as the reference does: train fresh, randomly initialised victims on the poisoned
    set and check whether the target is classified as the intended class.

    Args:
        result: the crafted attack.
        train_fn: ``train_fn(dataset, seed) -> model``: build a freshly initialised model and train it on
            ``dataset`` (the poisoned ImageDataset). Any augmentation it applies comes after the poison
            delta, as in the reference. Default: :func:`deltainf.train.train_model` with ``config``.
        config: a :class:`deltainf.train.TrainConfig` for the default train_fn (its ``seed`` is replaced
            by ``seed + run``); default ``TrainConfig.digits(progress=False)``.
        runs: number of independent retrainings (the reference's ``--vruns``).
        seed: seed of the first run; run r uses ``seed + r``.
    """
    if not isinstance(result, WitchesBrewResult):
        raise TypeError(f"result: expected a WitchesBrewResult, got {type(result).__name__}")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs: expected an int >= 1, got {runs!r}")
    if train_fn is None:
        from deltainf.train import TrainConfig, train_model

        cfg = config if config is not None else TrainConfig.digits(progress=False)
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"config: expected a deltainf.train.TrainConfig, got {type(cfg).__name__}")

        def train_fn(ds, s):
            return train_model(ds, dataclasses.replace(cfg, seed=s))
    elif not callable(train_fn):
        raise TypeError(f"train_fn: expected a callable (dataset, seed) -> nn.Module, got {type(train_fn).__name__}")
    from deltainf.train import predict

    preds = []
    for r in range(runs):
        victim = train_fn(result.train, seed + r)
        if not isinstance(victim, nn.Module):
            raise TypeError(f"train_fn: expected it to return an nn.Module, got {type(victim).__name__}")
        preds.append(predict(victim, result.target_x))
    predictions = torch.stack(preds)
    success = predictions == result.intended_class
    return BrewValidation(predictions, success, float(success.float().mean()), result.intended_class)
