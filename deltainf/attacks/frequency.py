"""Frequency ("smooth", low-frequency) trigger of Zeng et al. 2021, used as a dirty-label backdoor.

Trigger generation (Zeng's ``target_universal.py``,
``universal_pert.py``, ``deepfool.py``, ``gauss_smooth.py``): a targeted universal adversarial
perturbation whose every update is low-pass filtered.

* G: separable depthwise Gaussian blur, ``taps`` taps with weights ∝ exp(−½((i − (taps−1)/2)/σ)²),
  zero padding ((taps−1)//2 before, the rest after), first along H then along W. Zeng used σ = 6 and
  30 taps on 32 px images; by default σ scales with the image (σ = 6·H/32, taps = round(5σ)), i.e.
  σ = 3 px and 15 taps on the 16 px digits.
* N: global min-max rescale of the whole perturbation to [0, ``max_value``] (0.2 in Zeng).
* Starting from v = 0 with a DeepFool target t, repeat passes over the images X (shuffled):
  for every x whose prediction v does not yet change, run targeted DeepFool from x + v toward t;
  if it converged (< max_iter − 1 iterations), set v ← N(G(v + G(r))). After each pass measure the
  fooling rate on X (fraction of predictions changed by adding v, no clipping); keep the best v;
  if more than 5 % changed, t becomes their most common new label ("dominant label"). Stop once
  the fooling rate reaches ``fooling_rate`` (1 − delta = 0.2 in Zeng) or after ``max_passes``
  passes (Zeng: unbounded; bounded here so the attack always terminates).
* Targeted DeepFool (Moosavi-Dezfooli et al. 2016, Zeng's targeted variant): with k0 the class
  predicted for the starting image (fixed for all steps), iterate
  w = ∇(f_t − f_k0), r_i = (|f_t − f_k0| / ‖w‖ + 1e-4) · w / ‖w‖, r_tot += r_i,
  x' = x + (1 + overshoot)·r_tot, until argmax f(x') = t or ``max_iter``; return (1+overshoot)·r_tot.
  Zeng's Keras model output softmax probabilities, so f was the softmax; ``outputs="probs"``
  reproduces that, ``outputs="logits"`` (default) is the original DeepFool formulation, which does
  not stall on saturated probabilities.

Poisoning (the Δ-Influence frequency setting): source-class training images
get the trigger and the target label (dirty-label); poison success is measured on every triggered
source-class test image. Stamping: ``clip(x + v, 0, 1)`` in pixel space (Zeng's evaluation) by
default; ``stamp="minmax"`` rescales each triggered image globally to [0, 1] (Zeng's detector
notebook). The Δ-Influence quirk of min-max rescaling normalised tensors (poisons then differ in
value range from clean images) is deliberately not reproduced.
"""
from __future__ import annotations

from typing import Sequence

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltainf._util import (as_int, gaussian_kernel1d, model_device, model_dtype, named_as, progress_bar,
                            restore_modes, training_modes)
from deltainf._util import logits as model_logits
from deltainf.attacks.base import PoisonResult, check_real, check_trigger_attack, stamp_trigger_attack
from deltainf.data.dataset import ImageDataset

__all__ = ["SmoothTrigger", "gaussian_smooth", "targeted_deepfool",
           "generate_smooth_trigger", "frequency_attack", "DIGITS_FREQUENCY"]

# All-to-one at 10 %: from one source class the smooth trigger reached only ~89 % (docs/RESULTS.md)
DIGITS_FREQUENCY = {"target_class": 5, "source_classes": None, "fraction": 0.10}


def gaussian_smooth(v: torch.Tensor, sigma: float, taps: int) -> torch.Tensor:
    """Separable depthwise Gaussian low-pass G of Zeng et al.

    Args:
        v: float tensor (C, H, W) or (N, C, H, W).
        sigma: standard deviation in pixels.
        taps: kernel length; zero padding of ``(taps-1)//2`` before and ``taps-1-(taps-1)//2`` after
            keeps H and W (for Zeng's 30 taps: 14 / 15).

    Returns:
        Tensor of v's shape and dtype: blurred along H, then along W, each channel independently.
    """
    squeeze = v.ndim == 3
    x = v.unsqueeze(0) if squeeze else v
    if x.ndim != 4:
        raise ValueError(f"v must be (C, H, W) or (N, C, H, W), got {tuple(v.shape)}")
    c = x.shape[1]
    with named_as({"size": "taps"}):
        k = gaussian_kernel1d(taps, sigma, x.dtype, x.device)
    lo, hi = (taps - 1) // 2, taps - 1 - (taps - 1) // 2
    x = F.conv2d(F.pad(x, (0, 0, lo, hi)), k.view(1, 1, taps, 1).expand(c, 1, taps, 1), groups=c)  # along H
    x = F.conv2d(F.pad(x, (lo, hi, 0, 0)), k.view(1, 1, 1, taps).expand(c, 1, 1, taps), groups=c)  # along W
    return x.squeeze(0) if squeeze else x


def _rescale(v: torch.Tensor, max_value: float) -> torch.Tensor:
    # N(v): global min-max to [0, max_value]; a constant v (no information yet) maps to 0.
    # float64 because a large but finite DeepFool step (up to ~3e38 in float32) would make hi - lo
    # overflow to inf in float32 and (v - lo) / span NaN.
    v64 = v.double()
    lo, hi = v64.min(), v64.max()
    span = hi - lo
    if not bool(torch.isfinite(span)):
        raise ValueError("perturbation must be finite to be rescaled")
    if float(span) <= 1e-12:
        return torch.zeros_like(v)
    return (max_value * (v64 - lo) / span).to(v.dtype)


def _outputs(model: nn.Module, x: torch.Tensor, outputs: str) -> torch.Tensor:
    z = model(x)
    return z.softmax(dim=-1) if outputs == "probs" else z


@torch.enable_grad()  # its gradient steps run under a caller's torch.no_grad() too
def targeted_deepfool(model: nn.Module, x: torch.Tensor, target: int, overshoot: float = 0.02,
                      max_iter: int = 200, outputs: str = "logits") -> tuple[torch.Tensor, int, int]:
    """Targeted DeepFool from one image toward ``target``.

    Args:
        model: classifier on pixel-space images, in eval mode.
        x: float tensor (C, H, W), the starting image (no clipping is applied anywhere, as in Zeng).
        target: class to reach.
        overshoot: the (1 + overshoot) factor on the accumulated step.
        max_iter: maximum number of linearisation steps.
        outputs: ``"logits"`` or ``"probs"`` (differentiate softmax probabilities, as Zeng's model did).

    Returns:
        (r (C, H, W) = (1 + overshoot)·r_tot, number of iterations run, final predicted class).
        Iterations < ``max_iter`` means the target was reached. r is always finite: DeepFool has no
        step bound, and when the target is unreachable along the linearisation the accumulated step
        can grow geometrically until x + r overflows float32; the logits are then inf/NaN, and
        ``argmax`` of an all-NaN row is 0, which used to pass for "target 0 reached" and hand a NaN
        r to the caller. A non-finite step or output now ends the run as a failure
        (iterations = ``max_iter``) and returns the last finite r and the class predicted there.
    """
    x0 = x.detach()
    xi = x0.clone().requires_grad_(True)
    out = _outputs(model, xi.unsqueeze(0), outputs)[0]
    k0 = int(out.argmax())
    k_i = k0
    r_tot = torch.zeros_like(x0)
    loop_i = 0
    while k_i != target and loop_i < max_iter:
        g = out[target] - out[k0]
        (w,) = torch.autograd.grad(g, xi)
        w_norm = w.norm()
        if not torch.isfinite(w_norm) or float(w_norm) == 0.0:
            loop_i = max_iter  # flat or invalid gradient: DeepFool cannot make progress
            break
        r_i = (g.detach().abs() / w_norm + 1e-4) * w / w_norm
        r_next = r_tot + r_i
        # One forward per step: its argmax is the stopping test, its graph gives the next gradient.
        xi_next = (x0 + (1.0 + overshoot) * r_next).requires_grad_(True)
        out_next = _outputs(model, xi_next.unsqueeze(0), outputs)[0]
        if not (bool(torch.isfinite(r_next).all()) and bool(torch.isfinite(out_next).all())):
            # Diverged (overflow): argmax of inf/NaN logits means nothing, so this is a failure, not
            # a success; keep the last finite step.
            loop_i = max_iter
            break
        r_tot, xi, out = r_next, xi_next, out_next
        k_i = int(out.argmax())
        loop_i += 1
    return (1.0 + overshoot) * r_tot, loop_i, k_i


class SmoothTrigger:
    """A universal additive trigger v (C, H, W), v >= 0.

    Args:
        perturbation: float tensor (C, H, W), finite and >= 0 (what :func:`generate_smooth_trigger` makes).
        stamp: ``"clip"`` -> clip(x + v, 0, 1); ``"minmax"`` -> per-image global min-max of x + v to [0, 1].

    Calling it maps pixel-space images (C, H, W) or (N, C, H, W) to triggered images in [0, 1].
    """

    def __init__(self, perturbation: torch.Tensor, stamp: str = "clip"):
        if not isinstance(perturbation, torch.Tensor) or perturbation.ndim != 3:
            raise ValueError("perturbation must be a float tensor (C, H, W)")
        if stamp not in ("clip", "minmax"):
            raise ValueError(f"stamp must be 'clip' or 'minmax', got {stamp!r}")
        if not bool(torch.isfinite(perturbation).all()):
            raise ValueError("perturbation must be finite (got NaN or inf values)")
        if perturbation.numel() and float(perturbation.min()) < 0:
            raise ValueError(f"perturbation must be >= 0 (a smooth trigger only adds), got a minimum of "
                             f"{float(perturbation.min())!r}")
        if perturbation.numel() and float(perturbation.max()) == 0:  # the attack would be a label flip alone
            raise ValueError("perturbation is all zero: it is no trigger (the poisons would be their clean images "
                             "relabelled)")
        self.perturbation = perturbation.detach().float().cpu().contiguous()
        self.stamp = stamp
        self.image_shape = tuple(self.perturbation.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-3:]) != self.image_shape:
            raise ValueError(f"images must end in shape {self.image_shape}, got {tuple(x.shape)}")
        y = x + self.perturbation.to(x.device, x.dtype)
        if self.stamp == "clip":
            return y.clamp(0.0, 1.0)
        flat = y.flatten(-3)
        lo = flat.min(dim=-1).values[..., None, None, None]
        hi = flat.max(dim=-1).values[..., None, None, None]
        return ((y - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)

    def describe(self) -> dict:
        """JSON-serialisable summary (statistics of v)."""
        v = self.perturbation
        return {"stamp": self.stamp, "min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
                "channel_means": [float(m) for m in v.mean(dim=(1, 2))]}


def _predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model_logits(model, x, where="the trigger's images").argmax(1)


def generate_smooth_trigger(model: nn.Module, images: torch.Tensor, target_class: int,
                            max_value: float = 0.2, sigma: float | None = None, taps: int | None = None,
                            fooling_rate: float = 0.2, max_passes: int = 3, overshoot: float = 0.02,
                            max_iter: int = 200, outputs: str = "logits", adapt_target: bool = True,
                            seed: int = 0, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Zeng et al.'s smooth universal trigger, built with targeted DeepFool (see module docstring).

    Args:
        model: a classifier trained on CLEAN data (the surrogate), taking pixel-space images; DeepFool runs
            in its dtype.
        images: float tensor (M, C, H, W) in [0, 1], the images X (Zeng: the first 100 training images).
        target_class: initial DeepFool target t, a class of the model in [0, K).
        max_value: upper end of the min-max rescaling N (0.2 in Zeng).
        sigma, taps: Gaussian low-pass; default σ = 6·H/32 and taps = round(5σ).
        fooling_rate: stop once this fraction of X changes prediction (1 − delta; 0.2 in Zeng).
        max_passes: upper bound on passes over X.
        overshoot, max_iter: DeepFool settings (0.02 and 200 in Zeng); max_iter >= 3, since a run counts
            only when it reaches the target in fewer than max_iter − 1 steps and a run of 0 steps adds
            nothing to v.
        outputs: differentiate ``"logits"`` or softmax ``"probs"``.
        adapt_target: switch t to the dominant new label after each pass (Zeng's behaviour).
        seed: seed for the per-pass shuffles.
        progress: tqdm bar over passes.

    Returns:
        (v float32 (C, H, W) in [0, max_value] on CPU — the best perturbation found,
         info dict: ``fooling_rate`` of v, ``deepfool_target`` (t used to build it),
         ``dominant_label`` (most common new label under v, or None), ``passes``,
         ``deepfool_runs``, ``deepfool_converged``, ``sigma``, ``taps``, ``history``).

    Raises:
        ValueError: when every pass leaves v all zero (no DeepFool run converged with a nonzero step): the
            trigger would change nothing and the attack would be a pure label flip.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty float tensor (M, C, H, W)")
    if not 0.0 < max_value <= 1.0:
        raise ValueError(f"max_value must be in (0, 1], got {max_value!r}")
    if not 0.0 < fooling_rate <= 1.0:
        raise ValueError(f"fooling_rate must be in (0, 1], got {fooling_rate!r}")
    if not isinstance(max_passes, int) or max_passes < 1:
        raise ValueError(f"max_passes must be an int >= 1, got {max_passes!r}")
    n_iter = as_int(max_iter)
    if n_iter is None or n_iter < 3:
        # a run converges when it takes fewer than max_iter - 1 steps: at max_iter 2 only the 0-step runs of
        # images already at the target qualify, and their r = 0 leaves v at zero for good
        raise ValueError(f"max_iter must be an int >= 3 (below that no DeepFool run can add to the trigger), "
                         f"got {max_iter!r}")
    max_iter = n_iter
    if outputs not in ("logits", "probs"):
        raise ValueError(f"outputs must be 'logits' or 'probs', got {outputs!r}")
    h = images.shape[-2]
    if sigma is not None:
        sigma = check_real(sigma, "sigma")
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    sigma = 6.0 * h / 32.0 if sigma is None else float(sigma)
    n_taps = max(1, round(5 * sigma)) if taps is None else as_int(taps)
    if n_taps is None or n_taps < 1:
        raise ValueError(f"taps must be a positive int, got {taps!r}")
    taps = n_taps
    device, dtype = model_device(model), model_dtype(model) or torch.float32
    X = images.detach().to(device, dtype)
    clean_logits = model_logits(model, X, where="the trigger's images")  # in eval mode, the model's mode restored
    num_classes = clean_logits.shape[1]
    t = as_int(target_class)
    if t is None or not 0 <= t < num_classes:
        raise ValueError(f"target_class must be an int in [0, {num_classes}) (the model's classes), "
                         f"got {target_class!r}")
    clean_pred = clean_logits.argmax(1)
    t0 = t
    modes = training_modes(model)
    model.eval()
    gen = torch.Generator().manual_seed(int(seed))
    v = torch.zeros_like(X[0])
    best = (v.clone(), -1.0, t, None)
    runs = converged = 0
    history = []
    try:
        for p in progress_bar(range(max_passes), progress, desc="smooth trigger", leave=False):
            for i in torch.randperm(X.shape[0], generator=gen).tolist():
                x = X[i]
                with torch.no_grad():  # one image per step: the plain forward pass (checked on X above)
                    fooled = int(model((x + v).unsqueeze(0)).argmax(1)) != int(clean_pred[i])
                if fooled:
                    continue  # v already fools this image
                r, iters, _ = targeted_deepfool(model, x + v, t, overshoot=overshoot, max_iter=max_iter,
                                                outputs=outputs)
                runs += 1
                # targeted_deepfool reports a diverged run as a failure; the finiteness test is a second
                # line of defence, since one NaN step would make v (and every later v) NaN.
                if iters < max_iter - 1 and bool(torch.isfinite(r).all()):
                    converged += 1
                    v = _rescale(gaussian_smooth(v + gaussian_smooth(r, sigma, taps), sigma, taps), max_value)
            pert_pred = _predictions(model, X + v)
            changed = pert_pred != clean_pred
            rate = float(changed.float().mean())
            dominant = int(torch.mode(pert_pred[changed]).values) if bool(changed.any()) else None
            history.append({"pass": p, "fooling_rate": rate, "target": t, "dominant_label": dominant})
            # a nonzero v that fools no more images still beats the all-zero one, which is no trigger at all
            if rate > best[1] or (rate == best[1] and not bool(best[0].any())):
                best = (v.clone(), rate, t, dominant)
            if adapt_target and rate > 0.05 and dominant is not None:
                t = dominant
            if rate >= fooling_rate:
                break
    finally:
        restore_modes(modes)
    v_best, rate, t_best, dominant = best
    if not bool(v_best.any()):
        raise ValueError(f"target_class: the smooth trigger toward class {t0} stayed all zero "
                         f"({converged} of {runs} DeepFool runs converged within max_iter={max_iter}, none with a "
                         "nonzero step), so the attack would be a pure label flip; raise max_iter or max_passes, "
                         "or choose another target_class")
    info = {"fooling_rate": rate, "deepfool_target": t_best, "dominant_label": dominant,
            "passes": len(history), "deepfool_runs": runs, "deepfool_converged": converged,
            "sigma": sigma, "taps": taps, "max_value": max_value, "outputs": outputs, "history": history}
    return v_best.detach().to("cpu", torch.float32), info


def frequency_attack(train: ImageDataset, test: ImageDataset, surrogate: nn.Module | None, target_class: int,
                     source_classes: int | Sequence[int] | None = None, num_poisons: int | None = None,
                     fraction: float | None = None, trigger: torch.Tensor | SmoothTrigger | None = None,
                     num_images: int = 100, stamp: str = "clip", seed: int = 0, progress: bool = False,
                     **trigger_kwargs) -> PoisonResult:
    """Dirty-label backdoor with Zeng et al.'s smooth trigger.

    Args:
        train, test: clean ImageDatasets.
        surrogate: classifier trained on clean data, used by DeepFool to build the trigger (may be None
            when ``trigger`` is given).
        target_class: poison label, and the initial DeepFool target.
        source_classes: class(es) the poisons come from (``None`` = all but the target).
        num_poisons / fraction: poison count, or fraction of the whole training set (exactly one).
        trigger: a precomputed perturbation (C, H, W) or :class:`SmoothTrigger`; generated when None.
        num_images: images X for trigger generation = the first ``num_images`` training images (as Zeng
            used the first 100 CIFAR-10 training images).
        stamp: ``"clip"`` or ``"minmax"`` (see :class:`SmoothTrigger`); ignored for a SmoothTrigger.
        seed: seed of the poison draw and of the trigger generation's shuffles.
        progress: tqdm bar while generating.
        **trigger_kwargs: forwarded to :func:`generate_smooth_trigger` (``max_passes``, ``sigma``, ...).

    Returns:
        :class:`PoisonResult` with ``name="frequency"``; ``params["trigger_info"]`` holds the
        generation diagnostics (fooling rate on X etc.).
    """
    target_class, sources, n = check_trigger_attack(train, test, target_class, source_classes, num_poisons, fraction,
                                                    seed)
    info: dict = {}
    if isinstance(trigger, SmoothTrigger):
        trig = trigger
    elif isinstance(trigger, torch.Tensor):
        trig = SmoothTrigger(trigger, stamp=stamp)
    elif trigger is None:
        if surrogate is None:
            raise ValueError("give a clean surrogate model (to generate the trigger) or a precomputed trigger")
        count = as_int(num_images)
        if count is None or count < 1:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        v, info = generate_smooth_trigger(surrogate, train.images[:count], target_class, seed=seed,
                                          progress=progress, **trigger_kwargs)
        trig = SmoothTrigger(v, stamp=stamp)
    else:
        raise TypeError(f"trigger must be None, a tensor or a SmoothTrigger, got {type(trigger).__name__}")
    if trig.image_shape != train.image_shape:
        raise ValueError(f"trigger shape {trig.image_shape} does not match images {train.image_shape}")
    poisoned, idx, triggered, test_idx = stamp_trigger_attack(train, test, trig, sources, target_class, n, seed,
                                                              "frequency")
    params = {"target_class": target_class, "source_classes": list(sources), "num_poisons": n,
              "fraction_of_train": n / len(train),
              "fraction_of_sources": n / train.indices_of_class(list(sources)).numel(), "seed": seed,
              "trigger": trig.describe(),
              "trigger_info": {k: v for k, v in info.items()}}
    return PoisonResult(train=poisoned, poison_indices=idx, target_class=target_class, source_classes=sources,
                        triggered_test=triggered, test_indices=test_idx, original_labels=train.labels[idx].clone(),
                        trigger=trig, name="frequency", params=params)
