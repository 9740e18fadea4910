"""Seeded DataLoader construction, the batch and dataset checks every consumer of training data uses,
and the dataset spec parser of the CLI."""
from __future__ import annotations

import bisect
import collections.abc

import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler,
                              SequentialSampler, WeightedRandomSampler, default_collate, default_convert)

from deltainf._util import first_line
from deltainf.data.dataset import ImageDataset

__all__ = ["make_loader", "parse_dataset_spec", "DATASET_SPECS", "unpack_batch", "positioned_batches", "check_loader",
           "check_carried_positions", "first_batch_repeats", "items_repeat", "drops_last", "check_dataset",
           "in_dataset_order"]


def _passthrough(batch):
    return batch


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False, num_workers: int = 0) -> DataLoader:
    """A DataLoader whose order depends only on ``seed``.

    For an :class:`ImageDataset` whole batches are sliced from the tensors in one indexing call
    (no per-item Python work); other datasets go through the default collate. Either way a batch is
    ``(x (B, C, H, W) float32, y (B,) int64, index (B,) int64)`` when the dataset yields triples.

    Args:
        dataset: map-style dataset.
        batch_size: examples per batch (>= 1).
        shuffle: draw a new permutation every epoch from a ``torch.Generator`` seeded with ``seed``
            (epoch e of two loaders with the same seed visits the same order).
        seed: shuffling seed.
        drop_last: drop the final incomplete batch.
        num_workers: DataLoader worker processes.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    gen = torch.Generator().manual_seed(seed)
    base = RandomSampler(dataset, generator=gen) if shuffle else SequentialSampler(dataset)
    if isinstance(dataset, ImageDataset):
        sampler = BatchSampler(base, batch_size=batch_size, drop_last=drop_last)
        # batch_size=None: each sampler item (a list of indices) is fetched with one dataset[...] call.
        return DataLoader(dataset, sampler=sampler, batch_size=None, collate_fn=_passthrough,
                          num_workers=num_workers)
    return DataLoader(dataset, batch_size=batch_size, sampler=base, drop_last=drop_last,
                      num_workers=num_workers)


# Where a position comes twice, the likely cause, said after the error.
REPLACEMENT = ("; a sampler that draws with replacement (WeightedRandomSampler's default) repeats examples: use "
               "replacement=False or a loader over each example once")


def unpack_batch(batch, where: str = "train_loader"):
    """A loader batch ``(x, y)`` or ``(x, y, index)`` -> (x Tensor, y int64 (B,), index int64 (B,) or None)."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        got = type(batch).__name__
        if isinstance(batch, (tuple, list)):
            got += f" of length {len(batch)}"
        hint = " (a collate_fn that returns (x, y) turns such batches into it)" if isinstance(batch, dict) else ""
        raise TypeError(f"{where}: each batch must be (x, y) or (x, y, index), got {got}{hint}")
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: batch inputs x must be a Tensor, got {type(x).__name__}")
    y = _as_tensor(y, f"{where}: batch labels y")
    if y.dim() == 0:
        raise TypeError(f"{where}: a batch holds one label, not one per example: the loader yields single examples "
                        "(a DataLoader with batch_size=None over a dataset of examples?); give it a batch_size")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise TypeError(
            f"{where}: batch labels y must be an integer tensor of shape ({x.shape[0]},), got "
            f"dtype {y.dtype} and shape {tuple(y.shape)}")
    idx = None
    if len(batch) == 3:
        idx = _as_tensor(batch[2], f"{where}: the third item of a batch (the examples' dataset positions)")
        if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dim() != 1 or idx.shape[0] != x.shape[0]:
            raise TypeError(
                f"{where}: batch index must be integers of shape ({x.shape[0]},), got dtype {idx.dtype} "
                f"and shape {tuple(idx.shape)}")
        idx = idx.to(torch.int64)
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError(f"{where}: batch index must be non-negative dataset positions, got {int(idx.min())}")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"{where}: the batch index repeats a dataset position; the third item of every sample "
                             f"is read as its own position in the dataset (yield (x, y) or (x, y, index)){REPLACEMENT}")
    return x, y.to(torch.int64), idx


def batches_of(loader, where: str = "train_loader"):
    """Iterate ``loader``, a collate function's refusal of the items (PIL images, strings) said as an error naming
    ``where``."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except TypeError as err:
            if "collate" not in str(err):
                raise
            raise TypeError(f"{where}: its DataLoader cannot make tensors of its items ({first_line(err)}); a dataset "
                            "of images needs a transform to tensors (torchvision's ToTensor())") from None
        yield batch


def _as_tensor(values, what: str) -> torch.Tensor:
    """``values`` as a tensor; a TypeError naming ``what`` when they are not numbers (file names, dicts)."""
    if isinstance(values, torch.Tensor):
        return values
    try:
        return torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{what}: expected integers, got {type(values).__name__} that is not one ({err})") from None


def _index_sampler(loader: DataLoader):
    """The sampler that orders a DataLoader's dataset positions (under its batch sampler, or under a BatchSampler
    passed as ``sampler`` with ``batch_size=None``)."""
    s = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    while isinstance(s, BatchSampler):
        s = s.sampler
    return s


def in_dataset_order(loader):
    """``loader`` itself, or, when it shuffles its whole dataset (``DataLoader(..., shuffle=True)``: a RandomSampler
    that draws every position once, under a BatchSampler), a DataLoader over the same dataset in dataset order with
    the same batches, collate function and workers. The passes need every example at a known position, and the same
    batches on every read; a shuffling loader (the one a model was trained with) gives neither, and its dataset in
    order is what it shuffles. Any other sampler (a subset, weights, replacement) is left as it is."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    batches = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    if not isinstance(batches, BatchSampler):
        return loader
    s = batches.sampler
    if not isinstance(s, RandomSampler) or s.replacement or s.data_source is not loader.dataset \
            or s.num_samples != len(loader.dataset):
        return loader
    ordered = BatchSampler(SequentialSampler(loader.dataset), batches.batch_size, batches.drop_last)
    workers = {} if loader.num_workers == 0 else {
        "prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers,
        "worker_init_fn": loader.worker_init_fn, "multiprocessing_context": loader.multiprocessing_context,
        "timeout": loader.timeout}
    common = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, **workers)
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=ordered, **common)
    return DataLoader(loader.dataset, sampler=ordered, batch_size=None, **common)


def _order_unknown(loader) -> str | None:
    """Why ``loader``'s batches may not follow dataset positions 0, 1, 2, ... (the sampler's name), or None when
    they do: a DataLoader over a map-style dataset with a sequential sampler, an iterable dataset (its stream order
    is its order) or any other iterable."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    s = _index_sampler(loader)
    return None if isinstance(s, SequentialSampler) else type(s).__name__


def reads_every_position(loader) -> bool:
    """Whether ``loader`` is a DataLoader that reads every position of its map-style dataset once, in order."""
    return isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset) and \
        _order_unknown(loader) is None and not loader.drop_last


def yields_stored_items(loader) -> bool:
    """Whether ``loader``'s batches hold its dataset's items as they are: its collate function is torch's own (or
    this module's pass-through), not one of the user's that relabels, standardises or drops items."""
    return isinstance(loader, DataLoader) and loader.collate_fn in (default_collate, default_convert, _passthrough)


def _new_subset_per_read(loader) -> str | None:
    """Why ``loader`` draws another subset of its dataset on every read (a RandomSampler or WeightedRandomSampler
    without replacement over fewer than all examples), or None."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    s = _index_sampler(loader)
    if isinstance(s, RandomSampler) and not s.replacement and s.num_samples < len(s.data_source):
        return f"RandomSampler draws {s.num_samples} of its {len(s.data_source)} examples"
    if isinstance(s, WeightedRandomSampler) and not s.replacement and s.num_samples < len(s.weights):
        return f"WeightedRandomSampler draws {s.num_samples} of its {len(s.weights)} examples"
    return None


def check_loader(loader, where: str = "train_loader") -> None:
    """TypeError unless ``loader`` can be read more than once (EK-FAC reads the training data in several passes): a
    DataLoader, a list of batches, any re-iterable; not a generator or other one-shot iterator."""
    if loader is None or not hasattr(loader, "__iter__"):
        raise TypeError(f"{where}: expected an iterable of (x, y) or (x, y, index) batches, got {type(loader).__name__}")
    if isinstance(loader, collections.abc.Iterator):
        raise TypeError(f"{where}: a {type(loader).__name__} can be read only once, and the training data is read in "
                        "several passes; pass a DataLoader or a list of batches")


def check_carried_positions(loader, where: str = "train_loader") -> None:
    """ValueError when the items of ``loader``'s map-style dataset carry a third item that is not their position in
    it: the passes read it as the position, so the scores, and the flagged positions an unlearner reads in that
    dataset, would belong to other examples. The usual case: a torch Subset (``random_split``) of a dataset yielding
    ``(x, y, index)``, an ImageDataset among them, whose items carry the index in the dataset under it. A few items
    are read (the last, and a Subset's first position that differs from the index under it)."""
    from torch.utils.data import ConcatDataset, Subset

    dataset = getattr(loader, "dataset", None)
    if not isinstance(loader, DataLoader) or isinstance(dataset, IterableDataset):
        return
    try:
        n = len(dataset)
        probes = {n - 1} if n else set()
        under = None
        if isinstance(dataset, Subset):
            under = torch.as_tensor(dataset.indices, dtype=torch.int64).reshape(-1)
            probes |= set((under != torch.arange(under.numel())).nonzero().flatten()[:1].tolist())
        carried = {}
        for j in sorted(probes):
            item = dataset[j]
            if not (isinstance(item, (tuple, list)) and len(item) == 3):
                return
            carried[j] = int(torch.as_tensor(item[2]))
    except Exception:  # items the loader's own collate function makes sense of; the passes check the batches
        return
    for j, k in carried.items():
        if k == j:
            continue
        if under is not None and k == int(under[j]):
            raise ValueError(f"{where}: its dataset is a torch Subset whose items carry the index in the dataset under "
                             f"it (item {j} carries {k}), not their position in the Subset, which the third item of a "
                             "sample is read as: yield (x, y) or the position within the Subset, or pass the whole "
                             "dataset (EKFAC.score: or n_train= the whole dataset's size)")
        if isinstance(dataset, ConcatDataset):
            part = bisect.bisect_right(dataset.cumulative_sizes, j)
            if k == j - (dataset.cumulative_sizes[part - 1] if part else 0):
                raise ValueError(f"{where}: its dataset is a torch ConcatDataset whose items carry their index within "
                                 f"their own part (item {j} carries {k}), not their position in the whole, which the "
                                 "third item of a sample is read as: yield (x, y), or the position in the "
                                 "ConcatDataset")
        raise ValueError(f"{where}: item {j} of its dataset carries {k} as its third item, which is read as the "
                         "example's position in train_loader.dataset: yield (x, y), or (x, y, position)")


def first_batch_repeats(loader, where: str = "train_loader") -> bool:
    """Whether two reads of ``loader``'s first batch give the same inputs and labels (True for an empty loader).
    A loader whose dataset draws random transforms per item (augmentation) does not; a shuffling loader is read in
    dataset order (:func:`in_dataset_order`), as the passes read it. ValueError when the two reads hold different
    labels and the batches carry no positions: the loader reorders its examples on every read (a hand-written
    batch source that shuffles), so positions counted along the batches would be meaningless."""
    loader = in_dataset_order(loader)
    reads = []
    for _ in range(2):
        batch = next(iter(loader), None)
        if batch is None:
            return True
        reads.append(unpack_batch(batch, where))
    (x1, y1, i1), (x2, y2, i2) = reads
    if i1 is None and _order_unknown(loader):
        return True  # positions unknown: the passes refuse this loader themselves
    if i1 is None and (y1.shape != y2.shape or not torch.equal(y1, y2)):
        # augmentation changes inputs, not labels: these are other examples, and positions are read by order
        raise ValueError(f"{where}: two reads of its first batch hold different labels, so it yields its examples in "
                         "a new order on every read, and an example's position in the batches is not its position "
                         "in the dataset; read the data in a fixed order, or yield (x, y, index)")
    if i1 is not None and i2 is not None and not torch.equal(i1, i2):
        # a sampler that draws positions anew: compare the examples both reads hold, in position order
        a, b = torch.isin(i1, i2).nonzero().flatten(), torch.isin(i2, i1).nonzero().flatten()
        if not a.numel():
            return True
        a, b = a[i1[a].argsort()], b[i2[b].argsort()]
        x1, y1, x2, y2 = x1[a], y1[a], x2[b], y2[b]
    return x1.shape == x2.shape and torch.equal(x1, x2) and torch.equal(y1, y2)


def items_repeat(loader, probes: int = 3) -> bool:
    """Whether two reads of a few items (first, middle, last) of a DataLoader's map-style dataset, in this process,
    give the same inputs (True for anything else). A dataset that draws random transforms per item does not, also
    where :func:`first_batch_repeats` cannot tell: workers seeded to draw the same transforms on every read, or a
    first batch the transforms leave alone."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return True
    try:
        n = len(loader.dataset)
    except TypeError:
        return True
    for i in sorted({round(k * (n - 1) / max(1, probes - 1)) for k in range(probes)}) if n else ():
        try:
            a, b = (item[0] if isinstance(item, (tuple, list)) else item for item in (loader.dataset[i],
                                                                                      loader.dataset[i]))
            a, b = torch.as_tensor(a), torch.as_tensor(b)
        except Exception:  # items the loader's own sampler or collate function makes sense of
            return True
        if a.shape != b.shape or not bool(((a == b) | (a != a) & (b != b)).all()):  # equal, NaN included
            return False
    return True


def drops_last(loader) -> bool:
    """Whether a DataLoader leaves out its last incomplete batch (``drop_last=True``, on it or its batch sampler)."""
    if not isinstance(loader, DataLoader):
        return False
    s = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    return bool(loader.drop_last) or (isinstance(s, BatchSampler) and s.drop_last)


def positioned_batches(loader, where: str = "train_loader", show=None):
    """Yield (x, y int64 (B,), dataset positions int64 (B,) CPU, stream position of the batch's first example) for
    every batch of a training loader: the batch's own index when it yields one, else its running position, which
    is the dataset position only when the loader reads the dataset in order. A loader that shuffles its whole
    dataset is read in dataset order instead (:func:`in_dataset_order`); one that samples otherwise (a subset,
    weights) must yield (x, y, index); a DistributedSampler is refused, since
    every rank must see the whole training set (the passes share it between torchrun ranks themselves). ``show``
    wraps the loader for iteration (a progress bar)."""
    check_loader(loader, where)
    if isinstance(loader, DataLoader) and isinstance(_index_sampler(loader), DistributedSampler):
        raise ValueError(f"{where}: a DistributedSampler gives each rank part of the training set; deltainf shares the "
                         "passes between torchrun ranks itself, so every rank needs a loader over all of it, in order")
    subset = _new_subset_per_read(loader)
    if subset:
        raise ValueError(f"{where}: its {subset} anew on every read, and the passes must all see the same examples; "
                         "draw the subset once (a Subset, or SubsetRandomSampler over fixed positions)")
    loader = in_dataset_order(loader)
    unordered = _order_unknown(loader)
    workers = isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset) and loader.num_workers > 1
    pos, counted, seen = 0, False, torch.zeros(0, dtype=torch.bool)
    for batch in batches_of(show(loader) if show is not None else loader, where):
        x, y, idx = unpack_batch(batch, where)
        if idx is not None:
            seen = _mark_positions(seen, idx.cpu(), where)
        else:
            if unordered:
                raise ValueError(f"{where}: its {unordered} does not read the dataset in order, so the batches must "
                                 "carry their dataset positions: yield (x, y, index), or use a sequential loader")
            if workers:  # each worker streams its own copy or shard, and their batches interleave
                raise ValueError(f"{where}: its IterableDataset is read by {loader.num_workers} workers, whose batches "
                                 "interleave (each worker streams the whole dataset unless it shards it), so a batch's "
                                 "place in the stream is not its examples' positions: yield (x, y, index), or use "
                                 "num_workers <= 1")
            idx = torch.arange(pos, pos + x.shape[0], dtype=torch.int64)
            counted = True
        yield x, y, idx.cpu(), pos
        pos += x.shape[0]
    if counted and reads_every_position(loader) and not drops_last(loader) and pos != len(loader.dataset):
        # a collate function that leaves items out (unreadable files) moves every later example to another position
        raise ValueError(f"{where}: its batches held {pos} examples, its dataset has {len(loader.dataset)}, so the "
                         "positions counted along the batches are not the examples' own (a collate_fn that drops "
                         "or adds items?): yield (x, y, index), or keep every item")


def _mark_positions(seen: torch.Tensor, idx: torch.Tensor, where: str) -> torch.Tensor:
    """``seen`` (a mask over dataset positions) with ``idx`` marked; ValueError when one was marked already: a third
    item that is not the example's own position (a class or domain id, a poison flag) repeats across batches, and
    each pass would score several examples at one position."""
    need = int(idx.max()) + 1 if idx.numel() else 0
    if need > seen.numel():
        seen = torch.cat([seen, torch.zeros(max(need, 2 * seen.numel()) - seen.numel(), dtype=torch.bool)])
    if bool(seen[idx].any()):
        raise ValueError(f"{where}: dataset position {int(idx[seen[idx]][0])} appears twice in one pass; every example "
                         "is read once per pass, the third item of a sample as its own position in the dataset (yield "
                         f"(x, y) or (x, y, index)){REPLACEMENT}")
    seen[idx] = True
    return seen


def check_dataset(dataset, name: str = "train_dataset") -> int:
    """``len(dataset)``; TypeError unless it is a map-style dataset, ValueError when it is empty."""
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"{name}: expected a map-style torch Dataset (with __len__ and __getitem__, e.g. an "
                        f"ImageDataset), got {type(dataset).__name__}")
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{name}: the dataset is empty")
    return n


DATASET_SPECS = {
    "digits": "scikit-learn's bundled digits (no download), 16x16x3",
    "cifar10:PATH": "CIFAR-10 python batches at PATH",
    "cifar100:PATH": "CIFAR-100 python files at PATH (fine labels)",
    "imagefolder:PATH": "PATH/train and PATH/val with one folder per class (e.g. Imagenette)",
    "synthetic:N": "N synthetic 3x32x32 training images in 10 classes (N//5 test images)",
}


def parse_dataset_spec(spec: str, seed: int = 0, size: int | None = None, progress: bool = False,
                       channels: int | None = None) -> tuple[ImageDataset, ImageDataset]:
    """Turn a CLI dataset spec into ``(train, test)`` datasets.

    Valid specs: ``"digits"``, ``"cifar10:PATH"``, ``"cifar100:PATH"``, ``"imagefolder:PATH"``,
    ``"synthetic:N"``.

    Args:
        spec: the spec string.
        seed: split seed (digits) / generator seed (synthetic).
        size: image side in pixels for digits (default 16) and image folders (default: the shorter side
            the training images share, e.g. 160 for Imagenette-160); CIFAR and
            synthetic images are 32 px (another size is an error).
        progress: progress bars while decoding image folders.
        channels: 1 or 3 for digits and image folders (default 3); CIFAR and synthetic data have 3.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"dataset spec must be a non-empty string, one of {list(DATASET_SPECS)}; got {spec!r}")
    name, sep, arg = spec.partition(":")
    name = name.strip().lower()
    valid = ", ".join(DATASET_SPECS)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if name in ("cifar10", "cifar100", "synthetic") and (size not in (None, 32) or channels not in (None, 3)):
        raise ValueError(f"{name} images are 3 x 32 x 32; cannot give {channels or 3} x {size} x {size}")
    c = 3 if channels is None else channels
    if name == "digits":
        if sep:
            raise ValueError(f"dataset spec 'digits' takes no argument, got {spec!r}")
        from deltainf.data.digits import load_digits_dataset
        s = 16 if size is None else size
        return (load_digits_dataset("train", seed=seed, size=s, channels=c),
                load_digits_dataset("test", seed=seed, size=s, channels=c))
    if name in ("cifar10", "cifar100", "imagefolder"):
        if not arg:
            raise ValueError(f"dataset spec {name!r} needs a path: '{name}:PATH'")
        if name == "cifar10":
            from deltainf.data.cifar import load_cifar10
            return load_cifar10(arg, "train"), load_cifar10(arg, "test")
        if name == "cifar100":
            from deltainf.data.cifar import load_cifar100
            return load_cifar100(arg, "train"), load_cifar100(arg, "test")
        from deltainf.data.imagefolder import load_image_folder
        train = load_image_folder(arg, "train", size=size, channels=c, progress=progress)
        return train, load_image_folder(arg, "val", size=train.image_shape[-1], channels=c, progress=progress)
    if name == "synthetic":
        try:
            n = int(arg)
        except ValueError:
            raise ValueError(f"dataset spec 'synthetic:N' needs an integer N, got {spec!r}") from None
        if n < 10:
            raise ValueError(f"synthetic:N needs N >= 10, got {n}")
        from deltainf.data.synthetic import make_synthetic_dataset
        return (make_synthetic_dataset(n, seed=seed, split="train"),
                make_synthetic_dataset(max(10, n // 5), seed=seed, split="test"))
    raise ValueError(f"unknown dataset {name!r} in spec {spec!r}; valid specs: {valid}")
