"""Frequency-domain backdoor detector (Zeng et al., ICCV 2021, Section 4).

A small CNN reads the per-channel orthonormal 2-D DCT-II of an image and says whether it carries a
trigger. It is trained on the user's clean images (label 0) against copies of the same images with a
random synthetic trigger (label 1), regenerated every round; then every training image with
P(trigger) >= ``threshold`` is flagged. The DCT is ``scipy.fft.dctn(..., type=2, norm="ortho")``.

Synthetic triggers (Zeng's ``patching_train``, chosen uniformly per image; sizes scale with H/32):
  0. a white block (value 1), 1. a uniform-noise block (h, w in 2..7 px, in a random corner, 0..5 px from
  the edges), 2. additive Gaussian noise with mean 25/255 and variance U(10, 70)/255^2 (albumentations
  ``GaussNoise(mean=25, var_limit=(10, 70))``), 3. a random shadow: 1-2 random 5-vertex polygons in the
  lower half whose pixels are darkened by half (albumentations ``RandomShadow`` halves HLS lightness;
  scaling RGB by 0.5 is the grey-level equivalent), 4. a blend x + 0.3 x_other, clipped at 1.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from deltainf.data.loaders import make_loader
from deltainf._util import as_int, check_int, check_number, model_device, progress_bar, seeded_rng
from deltainf.data.loaders import check_dataset, unpack_batch
from deltainf.detector import Detector, DetectorResult

TRIGGER_KINDS = ("white_block", "noise_block", "gaussian_noise", "shadow", "blend")


def dct2(images: torch.Tensor) -> torch.Tensor:
    """Per-channel orthonormal 2-D DCT-II of images (N,C,H,W) in [0,1] -> float32 (N,C,H,W).

    Pixels are first quantised to 8 bits as Zeng et al. do (``(x*255).astype(uint8)``), then rescaled
    by 1/255 so the coefficients keep the [0,1] pixel scale.
    """
    from scipy.fft import dctn

    if images.dim() != 4:
        raise ValueError(f"images: expected (N,C,H,W), got shape {tuple(images.shape)}")
    q = torch.floor(images.detach().float().clamp(0, 1) * 255).cpu().numpy() / 255.0
    return torch.from_numpy(dctn(q, type=2, norm="ortho", axes=(-2, -1))).float()


def _polygon_mask(vx: torch.Tensor, vy: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """bool (H,W): pixel centres inside the polygon (even-odd rule, like a scanline fill)."""
    py, px = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    inside = torch.zeros(h, w, dtype=torch.bool)
    j = len(vx) - 1
    for i in range(len(vx)):
        xi, yi, xj, yj = vx[i], vy[i], vx[j], vy[j]
        crosses = (yi > py) != (yj > py)
        x_at = (xj - xi) * (py - yi) / (yj - yi + 1e-12) + xi
        inside ^= crosses & (px < x_at)
        j = i
    return inside


def _trigger_kinds(kinds) -> torch.Tensor:
    """``kinds`` as int64 indices into TRIGGER_KINDS; ValueError naming ``kinds`` otherwise (a kind out of range
    was stamped as a blend)."""
    t = torch.as_tensor(kinds).reshape(-1)
    whole = t.dtype in _INT_DTYPES or (t.dtype.is_floating_point and bool((t == t.round()).all()))
    if not whole or (t.numel() and not bool(((t >= 0) & (t < len(TRIGGER_KINDS))).all())):
        raise ValueError(f"kinds: expected trigger kinds, ints in [0, {len(TRIGGER_KINDS)}) indexing {TRIGGER_KINDS}, "
                         f"got {t.tolist()[:8]}")
    return t.long()


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def synthesize_triggers(
    images: torch.Tensor, generator: torch.Generator, kinds: Optional[Sequence[int]] = None
) -> tuple:
    """Stamp one random synthetic trigger on each image.

    Args:
        images: float32 (N,C,H,W) in [0,1] (not modified).
        generator: CPU torch.Generator driving every random choice.
        kinds: optional (N,) trigger kind per image (ints in [0, len(TRIGGER_KINDS)), indices into ``TRIGGER_KINDS``);
            uniform if None.
    Returns:
        (triggered float32 (N,C,H,W) in [0,1], kinds int64 (N,)).
    """
    x = images.detach().float().cpu().clone()
    n, c, h, w = x.shape
    g = generator
    kinds = (torch.randint(0, len(TRIGGER_KINDS), (n,), generator=g) if kinds is None
             else _trigger_kinds(kinds))
    if kinds.numel() != n:
        raise ValueError(f"kinds: expected {n} entries, got {kinds.numel()}")
    # Zeng's block sizes (2..7 px) and margins (0..5 px) are for 32-px images; scale them to this size.
    lo = max(1, round(2 * h / 32))
    hi = max(lo, round(7 * h / 32))
    mmax = round(5 * h / 32)

    def rint(a, b):  # uniform int in [a, b]
        return int(torch.randint(a, b + 1, (1,), generator=g))

    for i in range(n):
        k = int(kinds[i])
        if k in (0, 1):
            bh, bw = min(rint(lo, hi), h), min(rint(lo, hi), w)
            m = rint(0, mmax)
            top = min(m, h - bh) if rint(0, 1) == 0 else max(h - m - bh, 0)
            left = min(m, w - bw) if rint(0, 1) == 0 else max(w - m - bw, 0)
            block = torch.ones(c, bh, bw) if k == 0 else torch.rand(c, bh, bw, generator=g)
            x[i, :, top:top + bh, left:left + bw] = block
        elif k == 2:
            var = 10 + 60 * float(torch.rand(1, generator=g))
            noise = 25 + var ** 0.5 * torch.randn(c, h, w, generator=g)
            x[i] = (x[i] + noise / 255).clamp(0, 1)
        elif k == 3:
            mask = torch.zeros(h, w, dtype=torch.bool)
            for _ in range(rint(1, 2)):
                vx = torch.rand(5, generator=g) * w
                vy = (0.5 + 0.5 * torch.rand(5, generator=g)) * h
                mask |= _polygon_mask(vx, vy, h, w)
            x[i, :, mask] *= 0.5
        else:  # 4: blend
            j = rint(0, n - 1) if n > 1 else i
            if j == i and n > 1:
                j = (i + 1) % n
            x[i] = (x[i] + 0.3 * images[j].float().cpu()).clamp(max=1)
    return x, kinds


class FreqCNN(nn.Module):
    """Zeng et al.'s 6-conv detector on DCT inputs (N,C,H,W) -> logits (N,2).

    ``[Conv3x3(w) -> ELU -> BN] x 2 -> MaxPool2 -> Dropout`` for widths (32, 64, 128) and dropout
    (0.2, 0.3, 0.4), then Flatten -> Linear(2). H and W must be >= 8 (three 2x poolings).
    """

    def __init__(self, in_channels: int, height: int, width: int, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        if height < 8 or width < 8:
            raise ValueError(f"images: the frequency detector needs H, W >= 8, got {height}x{width}")
        if len(widths) != 3 or any(int(v) < 1 for v in widths):
            raise ValueError(f"widths: expected three positive channel counts, got {widths!r}")
        layers, cin = [], in_channels
        for cout, p in zip(widths, (0.2, 0.3, 0.4)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ELU(), nn.BatchNorm2d(cout),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.ELU(), nn.BatchNorm2d(cout),
                       nn.MaxPool2d(2), nn.Dropout(p)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin * (height // 8) * (width // 8), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def _stack_images(dataset: Dataset, name: str, max_items: Optional[int] = None) -> torch.Tensor:
    n = check_dataset(dataset, name)
    loader = make_loader(dataset, 512, shuffle=False)
    xs, count = [], 0
    for batch in loader:
        x, _, _ = unpack_batch(batch, "train_dataset")
        xs.append(x.detach().float().cpu())
        count += x.shape[0]
        if max_items is not None and count >= max_items:
            break
    x = torch.cat(xs)[: max_items if max_items is not None else n]
    if x.dim() != 4:
        raise ValueError(f"{name}: expected images (C,H,W), got items of shape {tuple(x.shape[1:])}")
    return x


class FrequencyDetector(Detector):
    """Zeng et al.'s frequency-domain trigger detector.

    Args:
        threshold: flag when softmax P(trigger) >= threshold (default 0.5, as Delta-Influence).
        epochs: epochs per round (default 10).
        rounds: rounds, each with freshly synthesised triggers (default 1 as Delta-Influence's port;
            Zeng et al. used 5).
        batch_size: training batch size (default 64, Zeng et al.).
        lr, weight_decay: Adadelta settings (default 0.05 and 1e-4; Keras' rho 0.95, eps 1e-7).
        optimizer: ``"adadelta"`` (default, the paper's) or ``"adam"``. Adadelta at lr 0.05 needs many
            steps (Delta-Influence trained on 2 x 50k CIFAR images); on small sets such as the 1.4k digits
            ``optimizer="adam", lr=3e-3`` learns the task in a few epochs where Adadelta underfits.
        widths: conv widths (default (32, 64, 128)).
        max_train: cap on the number of clean images used to train (None = all).
        trigger_kinds: names from ``TRIGGER_KINDS`` to synthesise (default all five, uniformly).
        seed: seeds synthesis, shuffling and the network initialisation.
        device, progress: where to train/infer; tqdm bars.

    Use :meth:`fit` with trusted clean images, or let :meth:`detect` fit on ``clean_dataset`` (or, with a
    warning, on the training set itself). ``detect`` returns scores = P(trigger) (N,).
    """

    name = "frequency"

    inputs = ("clean_dataset",)

    def __init__(
        self,
        *,
        threshold: float = 0.5,
        epochs: int = 10,
        rounds: int = 1,
        batch_size: int = 64,
        lr: float = 0.05,
        weight_decay: float = 1e-4,
        optimizer: str = "adadelta",
        widths: Sequence[int] = (32, 64, 128),
        max_train: Optional[int] = None,
        trigger_kinds: Sequence[str] = TRIGGER_KINDS,
        seed: int = 0,
        device=None,
        progress: bool = False,
    ) -> None:
        threshold = check_number("threshold", threshold, inclusive=True, maximum=1.0)
        for nm, v in (("epochs", epochs), ("rounds", rounds), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm}: expected an int >= 1, got {v!r}")
        lr = check_number("lr", lr)
        weight_decay = check_number("weight_decay", weight_decay, inclusive=True)
        seed = check_int("seed", seed, minimum=0, maximum=2 ** 64 - 1)  # torch's generators take 64 bits
        if optimizer not in ("adadelta", "adam"):
            raise ValueError(f"optimizer: expected 'adadelta' or 'adam', got {optimizer!r}")
        if max_train is not None and (not isinstance(max_train, int) or max_train < 1):
            raise ValueError(f"max_train: expected None or an int >= 1, got {max_train!r}")
        kinds = list(trigger_kinds)
        bad = [k for k in kinds if k not in TRIGGER_KINDS]
        if not kinds or bad:
            raise ValueError(f"trigger_kinds: expected a non-empty subset of {list(TRIGGER_KINDS)}, "
                             f"got {trigger_kinds!r}")
        self.trigger_kinds = tuple(kinds)
        self.threshold = threshold
        self.epochs = epochs
        self.rounds = rounds
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        counts = [as_int(v) for v in widths] if isinstance(widths, (list, tuple)) else None
        if counts is None or len(counts) != 3 or any(v is None or v < 1 for v in counts):  # checked now, not at fit
            raise ValueError(f"widths: expected three positive channel counts, got {widths!r}")
        self.widths = tuple(counts)
        self.max_train = max_train
        self.seed = seed
        self.device = device
        self.progress = progress
        self.network: Optional[FreqCNN] = None
        self.history: list = []

    @property
    def fitted(self) -> bool:
        """Whether the DCT classifier has been trained."""
        return self.network is not None

    def fit(self, clean_dataset: Dataset) -> "FrequencyDetector":
        """Train the DCT classifier on ``clean_dataset`` (items (x, y[, index]), x (C,H,W) in [0,1]) against
        synthetically triggered copies. Returns self; ``self.history`` holds (round, epoch, loss, accuracy)."""
        x_clean = _stack_images(clean_dataset, "clean_dataset", self.max_train)
        dev = torch.device(self.device) if self.device is not None else torch.device("cpu")
        g = torch.Generator().manual_seed(self.seed)
        with seeded_rng(self.seed, dev):  # layer init and dropout draw from the global RNG
            net = self._train(x_clean, g, dev)
        net.eval()
        self.network = net
        return self

    def _train(self, x_clean: torch.Tensor, g: torch.Generator, dev: torch.device) -> FreqCNN:
        n, c, h, w = x_clean.shape
        net = FreqCNN(c, h, w, self.widths).to(dev)
        if self.optimizer == "adadelta":
            opt = torch.optim.Adadelta(net.parameters(), lr=self.lr, rho=0.95, eps=1e-7,
                                       weight_decay=self.weight_decay)
        else:
            opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        d_clean = dct2(x_clean)
        labels = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
        self.history = []
        net.train()
        for r in range(self.rounds):
            pool = torch.tensor([TRIGGER_KINDS.index(k) for k in self.trigger_kinds])
            kinds = pool[torch.randint(0, len(pool), (n,), generator=g)]
            x_trig, _ = synthesize_triggers(x_clean, g, kinds)
            feats = torch.cat([d_clean, dct2(x_trig)])
            for e in progress_bar(range(self.epochs), self.progress, desc=f"freq detector round {r}", leave=False):
                perm = torch.randperm(2 * n, generator=g)
                tot_loss, correct = 0.0, 0
                for s in range(0, 2 * n, self.batch_size):
                    idx = perm[s:s + self.batch_size]
                    if idx.numel() < 2:  # BatchNorm cannot train on a batch of one
                        continue
                    xb, yb = feats[idx].to(dev), labels[idx].to(dev)
                    logits = net(xb)
                    loss = F.cross_entropy(logits, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    tot_loss += float(loss.detach()) * idx.numel()
                    correct += int((logits.argmax(1) == yb).sum())
                self.history.append((r, e, tot_loss / (2 * n), correct / (2 * n)))
        return net

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """P(trigger) float32 (N,) for images (N,C,H,W) in [0,1]."""
        if self.network is None:
            raise RuntimeError("FrequencyDetector: call fit(clean_dataset) (or detect(...)) before predict_proba")
        dev = model_device(self.network)
        out = []
        for s in range(0, images.shape[0], 512):
            logits = self.network(dct2(images[s:s + 512]).to(dev))
            out.append(logits.softmax(1)[:, 1].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def detect(self, model: Optional[nn.Module], train_dataset: Dataset, *,
               clean_dataset: Optional[Dataset] = None) -> DetectorResult:
        """Flag training images with P(trigger) >= threshold.

        ``model`` is not used (the detector reads images only); it is accepted for the common interface.
        Fits first when not yet fitted: on ``clean_dataset`` if given, else on ``train_dataset`` itself with a
        warning (a few poisons among the "clean" negatives weaken, but rarely break, the detector).
        """
        check_dataset(train_dataset)
        if not self.fitted:
            if clean_dataset is None:
                warnings.warn("FrequencyDetector: no clean_dataset given and not fitted; training the DCT "
                              "classifier on train_dataset itself (which may contain poisons)", stacklevel=2)
                clean_dataset = train_dataset
            self.fit(clean_dataset)
        loader = make_loader(train_dataset, 512, shuffle=False)
        probs = []
        for batch in progress_bar(loader, self.progress, desc="frequency detector", leave=False):
            x, _, _ = unpack_batch(batch, "train_dataset")
            probs.append(self.predict_proba(x.float()))
        probs = torch.cat(probs)
        flagged = torch.nonzero(probs >= self.threshold).reshape(-1)
        return DetectorResult(flagged, probs, {"threshold": self.threshold, "history": list(self.history)})
