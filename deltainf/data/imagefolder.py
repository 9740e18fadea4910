"""Image-folder loader (Imagenette layout): ``root/{train,val}/<class_dir>/**/<image>``.

Classes are the sorted sub-folder names of ``root/train`` (the same mapping is used for ``val``, so
labels agree across splits). The images of a class are its files with an image extension
(``IMAGE_EXTENSIONS``, torchvision's) in its folder and the folders below it, in torchvision
``ImageFolder``'s order (folders sorted, then file names sorted), so an index means the same file in
both; other files are reported, never read silently as images or silently dropped. Every image is
decoded with Pillow (16-bit greyscale scaled to 8 bits, not clipped), converted to RGB (or L for
``channels=1``), resized so its shorter side equals ``size`` (bilinear) and centre-cropped to
``size`` x ``size`` — the Δ-Influence Imagenette setting used the 160 px release with a 160 centre
crop, which this reproduces with ``size=160``.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from deltainf._util import log, progress_bar
from deltainf.data.dataset import ImageDataset

__all__ = ["load_image_folder", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _list_classes(split_dir: str) -> list[str]:
    return sorted(d for d in os.listdir(split_dir)
                  if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))


def _load_image(path: str, size: int, mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = _eight_bit(img, path).convert(mode)
            w, h = img.size
            scale = size / min(w, h)
            # Resize the shorter side to `size` (never below it, hence the max), then centre-crop.
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"could not read image file {path!r} ({type(exc).__name__}: {exc})") from exc
    return arr[:, :, None] if arr.ndim == 2 else arr


def _eight_bit(img, path: str):
    """``img`` with 8-bit channels: Pillow's conversion of a 16-bit greyscale image (mode I;16 or I) to L clips every
    value above 255 to white, which turns the picture into a silhouette; its high byte is the same picture."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise ValueError(f"{img.mode} pixel values outside 0..65535")
        if a.size and int(a.max()) <= 255:
            # 8-bit values saved in a 16-bit file: their high bytes are all zero, which would read as black
            warnings.warn("16-bit images holding values within 0..255 are read as 8-bit values (their high bytes "
                          "are all zero)", stacklevel=2)
            return Image.fromarray(a.astype(np.uint8))
        return Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8))
    if img.mode == "F":
        raise ValueError("32-bit float pixels have no fixed range; save the images with 8- or 16-bit channels")
    return img


def _class_files(class_dir: str) -> tuple[list[str], list[str]]:
    """(the image files of a class folder and the folders below it, in torchvision ImageFolder's order; the other
    files there, hidden ones aside, and macOS's ``._<name>`` metadata files, which carry an image's extension). A
    linked folder is followed once: a link back to a folder already read (a loop) would read its images again, and
    again, as examples of their own."""
    images, others, walked, seen = [], [], [], set()
    for folder, dirs, names in os.walk(class_dir, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .ipynb_checkpoints: copies, not examples
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            log.warning(f"{folder!r} is a link to a folder already read ({real!r}); its images are read once")
            continue
        seen.add(real)
        walked.append((folder, names))
    for folder, names in sorted(walked):
        for name in sorted(names):
            path = os.path.join(folder, name)
            if name.startswith("._"):  # macOS AppleDouble metadata beside an image, named like it, not an image
                others.append(path)
            elif name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(path)
            elif not name.startswith("."):
                others.append(path)
    return images, others


def native_size(paths: list[str]) -> int:
    """The shorter side every image shares (read from the file headers), e.g. 160 for Imagenette's 160 px
    release; ValueError when the images disagree, since then a size has to be chosen."""
    from PIL import Image, UnidentifiedImageError

    sides = set()
    for path in paths:
        try:
            with Image.open(path) as img:
                sides.add(min(img.size))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ValueError(f"could not read image file {path!r} ({type(exc).__name__}: {exc})") from exc
        if len(sides) > 1:
            raise ValueError(f"the images have different sizes (shorter sides {sorted(sides)}); choose one "
                             "(size=..., --image-size)")
    return sides.pop()


def _note_resampling(files: list[tuple[str, int]], size: int, channels: int, split_dir: str) -> None:
    """Warn when images are smaller than ``size`` (they are enlarged: every one of them, a folder at another size
    than the model's, is a likely mistake), or greyscale when ``channels`` is 3 (copied to three channels). From
    the file headers."""
    from PIL import Image, UnidentifiedImageError

    sides, modes = [], set()
    for path, _ in files:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
                modes.add(img.mode)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            return  # named when it is decoded
    small = sum(side < size for side in sides)
    if small == len(sides):
        log.warning(f"{split_dir!r}: the images are {max(sides)} px or smaller; they are enlarged to {size} px")
    elif small:
        log.warning(f"{split_dir!r}: {small} image(s) are smaller than {size} px (down to {min(sides)} px); they "
                    "are enlarged")
    if channels == 3 and modes <= {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}:
        log.warning(f"{split_dir!r}: the images are greyscale; each is copied to 3 channels for a 3-channel model")


def load_image_folder(root, split: str = "train", size: int | None = None, channels: int = 3,
                      classes: list[str] | None = None, progress: bool = False) -> ImageDataset:
    """Load ``root/split/<class>/<image>`` into an :class:`ImageDataset`.

    Args:
        root: dataset root holding one folder per split (e.g. Imagenette's ``train`` and ``val``).
        split: sub-folder to read (``"train"``, ``"val"``, ...).
        size: output height/width in pixels (shorter-side resize + centre crop); None = the shorter
            side all images share (:func:`native_size`).
        channels: 3 (RGB) or 1 (greyscale).
        classes: class-folder names defining the label order; default = sorted folders of
            ``root/train`` if it exists, else of ``root/split``.
        progress: show a tqdm bar while decoding.

    Returns:
        ImageDataset with images float32 (N, channels, size, size) in [0, 1], labels int64 (N,),
        ImageNet normalisation constants for RGB, and ``files``: each image's path relative to ``root``, by
        index.

    Raises:
        FileNotFoundError: ``root`` or ``root/split`` does not exist.
        ValueError: no class folders, a class folder without images, or an unreadable image file.
    """
    root = os.fspath(root)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image-folder root not found: {root!r}")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"image-folder split directory not found: {split_dir!r}")
    if classes is None:
        train_dir = os.path.join(root, "train")
        classes = _list_classes(train_dir if os.path.isdir(train_dir) else split_dir)
    if not classes:
        raise ValueError(f"no class folders found under {split_dir!r} (expected root/{split}/<class>/<images>)")
    if len(classes) < 2:  # root/train/images/<class>/...: every image would get label 0
        raise ValueError(f"one class folder ({classes[0]!r}) under {os.path.dirname(os.path.join(split_dir, ''))!r}"
                         f"; a classifier needs two or more (is {os.path.join(split_dir, classes[0])!r} the split, "
                         "one level down?)")

    files: list[tuple[str, int]] = []
    skipped: list[str] = []
    real_dirs: dict[str, str] = {}
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        if not os.path.isdir(class_dir):
            raise ValueError(f"class folder {class_dir!r} is missing (classes come from the train split)")
        real = os.path.realpath(class_dir)
        if real in real_dirs:  # a link to another class folder: every image of it would be both classes
            raise ValueError(f"class folders {real_dirs[real]!r} and {class_dir!r} are the same folder "
                             f"({real!r}); each image would carry both labels")
        real_dirs[real] = class_dir
        found, others = _class_files(class_dir)
        if not found:
            raise ValueError(f"class folder {class_dir!r} holds no images with extensions {IMAGE_EXTENSIONS}")
        files.extend((f, label) for f in found)
        skipped.extend(others)
    if skipped:
        log.warning(f"{split_dir!r}: {len(skipped)} file(s) without an image extension {IMAGE_EXTENSIONS} (or macOS "
                    f"'._' metadata files) are not read, e.g. {skipped[0]!r}")
    loose = sorted(n for n in os.listdir(split_dir) if os.path.isfile(os.path.join(split_dir, n))
                   and not n.startswith("."))
    if loose:  # not under a class folder: no label to give them
        log.warning(f"{split_dir!r}: {len(loose)} file(s) outside the class folders are not read, e.g. {loose[0]!r}")
    extra = set(_list_classes(split_dir)) - set(classes)
    if extra:
        raise ValueError(f"{split_dir!r} has class folders not in the class list: {sorted(extra)}")

    if size is None:
        size = native_size([p for p, _ in files])
    else:
        _note_resampling(files, size, channels, split_dir)
    mode = "RGB" if channels == 3 else "L"
    images = np.empty((len(files), size, size, channels), dtype=np.uint8)
    for i, (path, _) in enumerate(progress_bar(files, progress, desc=f"decode {split}")):
        images[i] = _load_image(path, size, mode)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    y = torch.tensor([label for _, label in files], dtype=torch.long)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (None, None)
    dataset = ImageDataset(x, y, classes=classes, mean=mean, std=std, check_range=False,
                           name=f"imagefolder-{os.path.basename(os.path.normpath(root))}-{split}-{size}px")
    dataset.files = [os.path.relpath(path, root) for path, _ in files]
    return dataset
