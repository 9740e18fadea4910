"""Small dataset/model helpers shared by the detectors (private)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from deltainf._util import model_device, progress_bar, restore_modes, training_modes
from deltainf.data.loaders import check_dataset, unpack_batch

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def resolve_feature_fn(model: nn.Module, feature_fn: Optional[FeatureFn]) -> FeatureFn:
    """Find the function that maps a pixel-space batch (B,C,H,W) to last-hidden-layer features (B, ...).

    Order: the caller's ``feature_fn``; a ``model.penultimate_features(x)`` method; a deltainf model
    (``normalize`` + ``features`` + ``classifier``, possibly wrapped in DDP/torch.compile), read with
    :func:`deltainf.models.penultimate_features`. Raises TypeError naming the options when none applies.
    """
    if feature_fn is not None:
        if not callable(feature_fn):
            raise TypeError(f"feature_fn: expected a callable x -> features, got {type(feature_fn).__name__}")
        return feature_fn
    fn = getattr(model, "penultimate_features", None)
    if callable(fn) and not isinstance(fn, nn.Module):
        return fn
    from deltainf.models.common import penultimate_features, unwrap_model

    inner = unwrap_model(model)
    if all(hasattr(inner, a) for a in ("normalize", "features", "classifier")):
        return lambda x: penultimate_features(model, x)
    raise TypeError(
        f"model: cannot read a penultimate layer from {type(inner).__name__}; it is not a deltainf model "
        "(normalize + features + classifier) and has no penultimate_features(x) method. Pass "
        "feature_fn=callable mapping a pixel-space batch (B,C,H,W) to its last-hidden-layer activations (B,D)."
    )


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    feature_fn: Optional[FeatureFn] = None,
    *,
    batch_size: int = 256,
    device=None,
    with_logits: bool = False,
    progress: bool = False,
):
    """Penultimate activations of every training example, in dataset order.

    Returns ``(features, labels, logits)``: features float32 (N, D) (flattened), labels int64 (N,),
    logits float32 (N, K) when ``with_logits`` else None. The model is put in eval mode for the pass
    and restored afterwards.
    """
    n = check_dataset(dataset)
    fn = resolve_feature_fn(model, feature_fn)
    dev = torch.device(device) if device is not None else model_device(model)
    modes = training_modes(model)
    model.eval()
    feats = labels = logits = None
    try:
        from deltainf.data.loaders import make_loader

        loader = make_loader(dataset, batch_size, shuffle=False)
        pos = 0
        for batch in progress_bar(loader, progress, desc="features", leave=False):
            x, y, _ = unpack_batch(batch, "train_dataset")
            x = x.to(dev)
            f = fn(x)
            if not isinstance(f, torch.Tensor):
                raise TypeError(f"feature_fn: expected it to return a Tensor, got {type(f).__name__}")
            f = f.reshape(f.shape[0], -1).float().cpu()
            b = f.shape[0]
            # The loader is sequential, so rows are dataset positions; a yielded index is not trusted
            # because wrappers (Subset-like views) may yield the index of an underlying dataset.
            rows = torch.arange(pos, pos + b)
            if feats is None:
                feats = torch.zeros(n, f.shape[1])
                labels = torch.full((n,), -1, dtype=torch.long)
            feats[rows] = f
            labels[rows] = torch.as_tensor(y, dtype=torch.long).reshape(-1)
            if with_logits:
                z = model(x).float().cpu()
                if logits is None:
                    logits = torch.zeros(n, z.shape[1])
                logits[rows] = z
            pos += b
    finally:
        restore_modes(modes)
    return feats, labels, logits


def activation_rows(activations) -> "np.ndarray":
    """Precomputed activations as a float64 (N, D) array, one row per example (trailing dims flattened); a
    ValueError naming ``activations`` when there is no row or a value is NaN or infinite."""
    import numpy as np

    acts = torch.as_tensor(activations).detach().cpu().double()
    if acts.ndim == 0 or acts.shape[0] == 0 or acts[0].numel() == 0:
        raise ValueError(f"activations: expected (N, D) with N, D >= 1, got shape {tuple(acts.shape)}")
    acts = acts.reshape(acts.shape[0], -1)
    if not bool(torch.isfinite(acts).all()):
        raise ValueError("activations: hold NaN or infinite values (a model that diverged, or a feature_fn that "
                         "returns them)")
    return np.asarray(acts)
