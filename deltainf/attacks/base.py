"""Shared pieces of the poisoning attacks: the result object and poison-index selection."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from deltainf._util import as_int, check_real
from deltainf.data.dataset import ImageDataset

__all__ = ["PoisonResult", "resolve_poison_count", "select_poison_indices", "check_classes", "check_pair",
           "check_trigger_attack", "check_real", "triggered_test_set", "POISON_FORMAT"]

POISON_FORMAT = "deltainf-poison/1"
_POISON_TENSORS, _POISON_JSON = "poison.safetensors", "poison.json"


@dataclass
class PoisonResult:
    """What a poisoning attack produced.

    Attributes:
        train: the poisoned training set (same length and order as the clean one; only the rows in
            ``poison_indices`` differ, and those in ``params["cross_indices"]`` when the attack makes such
            examples: WaNet's noise mode).
        poison_indices: LongTensor (P,), sorted positions of the poisons in ``train`` (ground truth for
            detection metrics).
        target_class: the label the attack wants triggered / targeted inputs to receive.
        source_classes: tuple of the classes the poisons were drawn from.
        triggered_test: test images of the source classes with the trigger applied and their TRUE
            labels kept; poison success = fraction of it predicted as ``target_class``. For a
            targeted attack without a trigger (Witches' Brew) it holds the target test image(s).
        test_indices: LongTensor, positions in the clean test set of the ``triggered_test`` images.
        original_labels: LongTensor (P,), the clean labels of the poisoned rows.
        trigger: callable mapping pixel-space images (..., C, H, W) -> triggered images of the same
            shape; None for attacks without a trigger.
        name: attack name (``"badnet"``, ``"frequency"``, ...).
        params: JSON-serialisable settings and diagnostics of the attack, for reports.
    """

    train: ImageDataset
    poison_indices: torch.Tensor
    target_class: int
    source_classes: tuple[int, ...]
    triggered_test: ImageDataset
    test_indices: torch.Tensor
    original_labels: torch.Tensor
    trigger: Callable[[torch.Tensor], torch.Tensor] | None = None
    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_poisons(self) -> int:
        """Number of poisoned training examples."""
        return int(self.poison_indices.numel())

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on pixel-space images ``x`` (C, H, W) or (N, C, H, W); returns a new tensor."""
        if self.trigger is None:
            raise ValueError(f"attack {self.name!r} has no trigger to apply")
        # a uint8 or 0-255 image got a patch of 0/1 values, a SIG image clamped to {0, 1}, without a word
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x: expected floating-point pixel images in [0, 1], got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__} (divide uint8 images by "
                            "255)")
        lo, hi = (float(v) for v in torch.aminmax(x)) if x.numel() else (0.0, 1.0)
        if not (lo >= -0.5 and hi <= 1.5):  # a resize's overshoot is fine
            raise ValueError(f"x: expected pixel images in [0, 1], got values in [{lo:.4g}, {hi:.4g}] (divide 0-255 "
                             "images by 255)")
        return self.trigger(x)

    def poison_mask(self) -> torch.Tensor:
        """Bool tensor (len(train),), True at the poisons."""
        mask = torch.zeros(len(self.train), dtype=torch.bool)
        mask[self.poison_indices] = True
        return mask

    def save(self, folder, key: str = "") -> None:
        """Write the poisoned rows and the triggered test set to ``folder``: ``poison.safetensors`` (the
        tensors, the settings in its metadata and a content hash, see :mod:`deltainf._files`) and then
        ``poison.json`` (a readable copy of the settings that :meth:`load` checks against it), each
        atomically. The clean data are not stored: :meth:`load` rebuilds the poisoned set from them.
        ``key`` identifies the settings the result was made with."""
        import json
        import os

        from deltainf._files import write_json, write_tensors
        from deltainf._util import to_jsonable

        idx = self.poison_indices
        cross = torch.as_tensor(self.params.get("cross_indices", []), dtype=torch.int64).reshape(-1)
        tensors = {"cross_indices": cross.contiguous(), "cross_images": self.train.images[cross].contiguous(),
                   "cross_labels": self.train.labels[cross].contiguous(),
                   "poison_indices": idx.to(torch.int64).contiguous(),
                   "poison_images": self.train.images[idx].contiguous(),
                   "poison_labels": self.train.labels[idx].contiguous(),
                   "original_labels": self.original_labels.to(torch.int64).contiguous(),
                   "test_indices": self.test_indices.to(torch.int64).contiguous(),
                   "triggered_images": self.triggered_test.images.contiguous(),
                   "triggered_labels": self.triggered_test.labels.contiguous()}
        params = to_jsonable(self.params)
        meta = {"key": key, "name": self.name, "target_class": int(self.target_class),
                "source_classes": [int(c) for c in self.source_classes], "params": params}
        os.makedirs(folder, exist_ok=True)
        write_tensors(os.path.join(os.fspath(folder), _POISON_TENSORS), tensors,
                      {"format": POISON_FORMAT, "deltainf_poison": json.dumps(meta)})
        write_json(os.path.join(os.fspath(folder), _POISON_JSON), meta)

    @classmethod
    def load(cls, folder, clean_train: ImageDataset, clean_test: ImageDataset, key: str = "",
             verify: bool = True) -> "PoisonResult | None":
        """The result :meth:`save` wrote to ``folder``, rebuilt over the clean data (without its trigger
        callable); None when there is none or it was made with another ``key``.

        A damaged entry is a ValueError naming the file (a cache treats it as a miss): unreadable
        ``poison.json``, ``poison.safetensors`` missing, unreadable or not matching its content hash
        (``verify=False`` skips the hash only), a ``poison.json`` that differs from the settings stored
        with the tensors, or tensors that do not fit the clean data."""
        import json
        import os

        from deltainf._files import file_error, read_tensors, require_digest

        json_path = os.path.join(os.fspath(folder), _POISON_JSON)
        tensor_path = os.path.join(os.fspath(folder), _POISON_TENSORS)
        if not os.path.exists(json_path):
            return None
        try:
            with open(json_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as err:
            raise file_error("poison cache", json_path, f"not readable as JSON ({err})") from None
        if not isinstance(meta, dict):
            raise file_error("poison cache", json_path, "must hold a JSON object")
        if meta.get("key") != key:
            return None
        t, header = read_tensors(tensor_path, "poison cache", verify=verify)
        if header.get("format") != POISON_FORMAT:
            raise file_error("poison cache", tensor_path, f"not a deltainf poison cache (format {POISON_FORMAT})")
        if verify:
            require_digest(header, "poison cache", tensor_path)
        try:
            stored = json.loads(header.get("deltainf_poison", "null"))
        except ValueError:
            stored = None
        if stored != meta:
            raise file_error("poison cache", json_path, f"differs from the settings stored in {_POISON_TENSORS} "
                                                        "(one of them was altered, or a write was interrupted)")
        _check_poison_tensors(t, clean_train, clean_test, tensor_path)
        try:
            idx = t["poison_indices"]
            train = clean_train.with_replaced(idx, images=t["poison_images"], labels=t["poison_labels"],
                                              name=f"{clean_train.name}+{meta['name']}")
            if t["cross_indices"].numel():  # the other rows the attack changed (WaNet's noise mode)
                train = train.with_replaced(t["cross_indices"], images=t["cross_images"], labels=t["cross_labels"])
            test_idx = t["test_indices"]
            triggered = clean_test.subset(test_idx, name=f"{clean_test.name}+{meta['name']}-test")
            triggered = triggered.with_replaced(torch.arange(len(triggered)), images=t["triggered_images"],
                                                labels=t["triggered_labels"])
            return cls(train=train, poison_indices=idx, target_class=int(meta["target_class"]),
                       source_classes=tuple(int(c) for c in meta["source_classes"]), triggered_test=triggered,
                       test_indices=test_idx, original_labels=t["original_labels"], trigger=None,
                       name=str(meta["name"]), params=dict(meta.get("params", {})))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise file_error("poison cache", tensor_path, f"does not fit the clean data ({type(err).__name__}: "
                                                          f"{err})") from None

    def poison_success(self, model, batch_size: int = 512, device=None) -> float:
        """Fraction of ``triggered_test`` that ``model`` classifies as ``target_class``."""
        from deltainf.train import predict

        if len(self.triggered_test) == 0:
            raise ValueError("triggered_test is empty; poison success is undefined")
        pred = predict(model, self.triggered_test, batch_size=batch_size, device=device)
        return float((pred == self.target_class).float().mean())


def _check_poison_tensors(t: dict[str, torch.Tensor], train: ImageDataset, test: ImageDataset, path: str) -> None:
    """The tensors of a poison cache have the names, dtypes, shapes and ranges :meth:`PoisonResult.save`
    writes for this clean data (ValueError naming the file otherwise)."""
    from deltainf._files import file_error

    names = {"poison_indices", "poison_images", "poison_labels", "original_labels", "test_indices",
             "triggered_images", "triggered_labels", "cross_indices", "cross_images", "cross_labels"}
    if set(t) != names:  # a cache written before the cross examples were kept lacks them: a miss
        raise file_error("poison cache", path, f"holds tensors {sorted(t)}, expected {sorted(names)}")
    P = t["poison_indices"].shape[0] if t["poison_indices"].ndim == 1 else -1
    T = t["test_indices"].shape[0] if t["test_indices"].ndim == 1 else -1
    X = t["cross_indices"].shape[0] if t["cross_indices"].ndim == 1 else -1
    K = train.num_classes
    wanted = {"cross_indices": (torch.int64, (X,), len(train)), "cross_labels": (torch.int64, (X,), K),
              "cross_images": (train.images.dtype, (X, *train.image_shape), None),
              "poison_indices": (torch.int64, (P,), len(train)), "poison_labels": (torch.int64, (P,), K),
              "original_labels": (torch.int64, (P,), K), "test_indices": (torch.int64, (T,), len(test)),
              "triggered_labels": (torch.int64, (T,), K),
              "poison_images": (train.images.dtype, (P, *train.image_shape), None),
              "triggered_images": (test.images.dtype, (T, *test.image_shape), None)}
    for name, (dtype, shape, bound) in wanted.items():
        v = t[name]
        if v.dtype != dtype or tuple(v.shape) != shape:
            raise file_error("poison cache", path, f"{name} is {v.dtype} {tuple(v.shape)}, expected {dtype} {shape}")
        if bound is not None and v.numel() and not 0 <= int(v.min()) <= int(v.max()) < bound:
            raise file_error("poison cache", path, f"{name} holds values outside [0, {bound})")
        if bound is None and not bool(torch.isfinite(v).all()):
            raise file_error("poison cache", path, f"{name} holds NaN or infinite values")


def check_classes(dataset: ImageDataset, target_class: int,
                  source_classes: int | Sequence[int] | None) -> tuple[int, tuple[int, ...]]:
    """Validate the target and source classes; ``None`` sources = every class except the target."""
    k = dataset.num_classes
    target = as_int(target_class)
    if target is None or not 0 <= target < k:
        raise ValueError(f"target_class must be an int in [0, {k}), got {target_class!r}")
    target_class = target
    if source_classes is None:
        sources = tuple(c for c in range(k) if c != target_class)
    else:
        single = as_int(source_classes)
        if single is not None:
            given = (single,)
        else:
            try:
                given = tuple(source_classes.tolist() if hasattr(source_classes, "tolist") else source_classes)
            except TypeError:
                raise ValueError(f"source_classes must be an int or ints in [0, {k}), got {source_classes!r}") from None
        if not given:
            raise ValueError("source_classes must not be empty")
        sources = tuple(as_int(c) for c in given)
        for c, v in zip(given, sources):
            if v is None or not 0 <= v < k:
                raise ValueError(f"source_classes must be ints in [0, {k}), got {c!r}")
        if target_class in sources:
            raise ValueError(f"source_classes {sources} must not contain target_class {target_class}")
        if len(set(sources)) != len(sources):
            raise ValueError(f"source_classes must be distinct, got {sources}")
    return target_class, tuple(sorted(sources))


def resolve_poison_count(num_poisons: int | None, fraction: float | None, n_train: int,
                         n_available: int) -> int:
    """Number of poisons from an explicit count or a fraction of the WHOLE training set.

    Exactly one of ``num_poisons`` / ``fraction`` must be given; the result must be in
    ``[1, n_available]`` (``n_available`` = training images of the source classes).
    """
    if (num_poisons is None) == (fraction is None):
        raise ValueError("give exactly one of num_poisons (a count) or fraction (of the training set)")
    if fraction is not None:
        fraction = check_real(fraction, "fraction")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        num_poisons = max(1, round(fraction * n_train))
    count = as_int(num_poisons)
    if count is None or count < 1:
        raise ValueError(f"num_poisons must be an int >= 1, got {num_poisons!r}")
    num_poisons = count
    if num_poisons > n_available:
        raise ValueError(f"num_poisons={num_poisons} exceeds the {n_available} training images of the "
                         f"source classes")
    return num_poisons


def check_seed(seed) -> int:
    """``seed`` as an int (a numpy or 0-d tensor int too); TypeError naming it otherwise (None included), ValueError
    outside [0, 2**62) (the attacks derive further seeds from it, and torch's generators take 64 bits)."""
    value = as_int(seed)
    if value is None:
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not 0 <= value < 2 ** 62:
        raise ValueError(f"seed must be in [0, 2**62), got {value}")
    return value


def check_trigger_attack(train: ImageDataset, test: ImageDataset, target_class: int,
                         source_classes: int | Sequence[int] | None, num_poisons: int | None,
                         fraction: float | None, seed=0) -> tuple[int, tuple[int, ...], int]:
    """The arguments every dirty-label trigger attack shares, checked: :func:`check_pair`, :func:`check_seed`,
    :func:`check_classes` and :func:`resolve_poison_count` against the source classes' training images.

    Returns (target_class, sorted source classes, number of poisons)."""
    check_pair(train, test)
    check_seed(seed)
    target_class, sources = check_classes(train, target_class, source_classes)
    available = int(train.indices_of_class(list(sources)).numel())
    return target_class, sources, resolve_poison_count(num_poisons, fraction, len(train), available)


def select_poison_indices(dataset: ImageDataset, source_classes: Sequence[int], num_poisons: int,
                          seed: int) -> torch.Tensor:
    """Draw ``num_poisons`` distinct indices uniformly from the source-class images; sorted LongTensor."""
    candidates = dataset.indices_of_class(list(source_classes))
    gen = torch.Generator().manual_seed(int(seed))
    chosen = candidates[torch.randperm(candidates.numel(), generator=gen)[:num_poisons]]
    return torch.sort(chosen).values


def stamp_trigger_attack(train: ImageDataset, test: ImageDataset, trigger: Callable[[torch.Tensor], torch.Tensor],
                         sources: Sequence[int], target_class: int, num_poisons: int, seed: int,
                         name: str) -> tuple[ImageDataset, torch.Tensor, ImageDataset, torch.Tensor]:
    """The dirty-label backdoor shared by the trigger attacks: stamp ``trigger`` on ``num_poisons``
    source-class training images and relabel them ``target_class``; stamp it on every source-class
    test image, true labels kept.

    Returns (poisoned train set, poison indices (sorted LongTensor), triggered test set, its positions
    in ``test``)."""
    idx = select_poison_indices(train, sources, num_poisons, seed)
    poisoned = train.with_replaced(idx, images=trigger(train.images[idx]), labels=target_class,
                                   name=f"{train.name}+{name}")
    return (poisoned, idx, *triggered_test_set(test, sources, trigger, name))


def triggered_test_set(test: ImageDataset, sources: Sequence[int], trigger: Callable[[torch.Tensor], torch.Tensor],
                       name: str) -> tuple[ImageDataset, torch.Tensor]:
    """Every source-class test image with ``trigger`` applied, true labels kept; and their positions in
    ``test``."""
    test_idx = test.indices_of_class(list(sources))
    triggered = test.subset(test_idx, name=f"{test.name}+{name}-trigger")
    return triggered.with_replaced(torch.arange(len(triggered)), images=trigger(triggered.images)), test_idx


def check_pair(train: ImageDataset, test: ImageDataset) -> None:
    """Both are ImageDatasets with the same image shape and classes (TypeError / ValueError otherwise)."""
    for name, d in (("train", train), ("test", test)):
        if not isinstance(d, ImageDataset):
            raise TypeError(f"{name} must be an ImageDataset, got {type(d).__name__}")
    if train.image_shape != test.image_shape or train.num_classes != test.num_classes:
        raise ValueError(f"train and test must share image shape and classes, got {train.image_shape}/"
                         f"{train.num_classes} and {test.image_shape}/{test.num_classes}")
