"""User-side models and training loops for the detection zoo: written the way a user would write
them, without deltainf's model or training code, so the zoo measures Δ-Influence on networks and
pipelines it was not built around."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHITECTURES", "build", "train_user_loop", "BNResNet", "sequential_cnn", "layer_norm_mlp",
           "group_norm_cnn", "VisionTransformer"]


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _DepthwiseBlock(nn.Module):
    """Depthwise-separable residual block (MobileNet style): depthwise 3x3, pointwise 1x1."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.pw(F.relu(self.bn1(self.dw(x))))))


class BNResNet(nn.Module):
    """A narrow residual network with BatchNorm, one depthwise-separable block and dropout; takes
    pixel images in [0, 1] without any normalisation."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = _Block(width, width)
        self.layer2 = _Block(width, 2 * width, stride=2)
        self.mix = _DepthwiseBlock(2 * width)
        self.layer3 = _Block(2 * width, 4 * width, stride=2)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layer3(self.mix(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def sequential_cnn(num_classes: int = 10, in_channels: int = 3, image_size: int = 16) -> nn.Sequential:
    """A plain nn.Sequential CNN with dropout, meant for inputs standardised in the data pipeline."""
    flat = 64 * (image_size // 4) ** 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes))


def layer_norm_mlp(num_classes: int = 10, image_shape=(3, 16, 16)) -> nn.Sequential:
    """A multilayer perceptron on the flattened image with LayerNorm and GELU, no convolution (trained with
    AdamW and label smoothing)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(image_shape), 256), nn.LayerNorm(256), nn.GELU(),
        nn.Linear(256, 128), nn.GELU(), nn.Linear(128, num_classes))


def group_norm_cnn(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """A CNN with GroupNorm and SiLU, strided convolutions instead of pooling, and global average pooling."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


class VisionTransformer(nn.Module):
    """A small vision transformer: 4 x 4 patches embedded by a strided convolution, a class token and learned
    positions, torch's own pre-norm nn.TransformerEncoder (nn.MultiheadAttention, GELU, dropout), a LayerNorm and
    a linear head on the class token."""

    def __init__(self, num_classes: int = 10, image_shape=(3, 16, 16), dim: int = 64, depth: int = 2, heads: int = 4,
                 patch: int = 4):
        super().__init__()
        tokens = (image_shape[1] // patch) * (image_shape[2] // patch)
        self.embed = nn.Conv2d(image_shape[0], dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.encoder(t))[:, 0])


def _shift(x: torch.Tensor, gen: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero padding), one offset per example."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    off = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    return torch.stack([xp[i, :, off[i, 0]:off[i, 0] + h, off[i, 1]:off[i, 1] + w] for i in range(n)])


def train_user_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, optimizer: str, lr: float, epochs: int,
                    batch_size: int, seed: int, weight_decay: float = 0.0, shift: int = 0,
                    label_smoothing: float = 0.0) -> nn.Module:
    """A hand-written training loop: shuffled mini-batches, mean cross-entropy (with ``label_smoothing``),
    cosine learning rate; optimizer "sgd" (momentum 0.9), "adam" or "adamw"."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(x.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for s in range(0, x.shape[0], batch_size):
            b = perm[s:s + batch_size]
            xb = _shift(x[b], gen, shift) if shift else x[b]
            loss = F.cross_entropy(model(xb), y[b], label_smoothing=label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


ARCHITECTURES = ("small_cnn", "bn_resnet", "sequential_pipeline", "layer_norm_mlp", "group_norm_cnn", "vit")


def build(arch: str, num_classes: int, image_shape, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "bn_resnet":
        return BNResNet(num_classes, image_shape[0])
    if arch == "sequential_pipeline":
        return sequential_cnn(num_classes, image_shape[0], image_shape[-1])
    if arch == "layer_norm_mlp":
        return layer_norm_mlp(num_classes, image_shape)
    if arch == "group_norm_cnn":
        return group_norm_cnn(num_classes, image_shape[0])
    if arch == "vit":
        return VisionTransformer(num_classes, image_shape)
    raise ValueError(arch)
