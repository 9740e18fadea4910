"""Models and a training loop written the way a user writes them, without deltainf's model or training
code (no normalisation module, no feature/classifier split): the end-to-end and command-line tests run
Δ-Influence on these. Importable as ``user_models:plain_cnn`` by ``deltainf detect --model``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def plain_cnn(num_classes: int = 10, in_channels: int = 3, image_size: int = 16, seed: int = 0) -> nn.Sequential:
    """A plain nn.Sequential CNN with dropout (weights drawn after ``torch.manual_seed(seed)``)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * (image_size // 4) ** 2, 64), nn.ReLU(),
        nn.Linear(64, num_classes))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.skip(x))


class BNResNet(nn.Module):
    """A small residual network with BatchNorm, a depthwise-separable block and dropout."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.block1 = _Block(width, 2 * width, 2)
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, 1, 1, groups=2 * width, bias=False)
        self.pointwise = nn.Conv2d(2 * width, 2 * width, 1, bias=False)
        self.bn = nn.BatchNorm2d(2 * width)
        self.block2 = _Block(2 * width, 4 * width, 2)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.block1(self.stem(x))
        x = F.relu(x + self.bn(self.pointwise(self.depthwise(x))))
        x = self.block2(x)
        return self.fc(self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def plain_cnn_on_meta(**kwargs) -> nn.Sequential:
    """plain_cnn built without memory, as large models are (its checkpoint fills it)."""
    with torch.device("meta"):
        return plain_cnn(**kwargs)


def plain_cnn_bfloat16(**kwargs) -> nn.Sequential:
    return plain_cnn(**kwargs).bfloat16()


def plain_cnn_softmax(**kwargs) -> nn.Sequential:
    """plain_cnn ending in a softmax: probabilities, not logits."""
    return plain_cnn(**kwargs).append(nn.Softmax(1))


def plain_cnn_of_width(width: int) -> nn.Sequential:
    """A factory with a required argument (--model-kwargs)."""
    return plain_cnn(num_classes=width)


def bn_resnet(num_classes: int = 10, in_channels: int = 3, seed: int = 0) -> BNResNet:
    torch.manual_seed(seed)
    return BNResNet(num_classes, in_channels)


class VisionTransformer(nn.Module):
    """4 x 4 patches, a class token, learned positions and torch's nn.TransformerEncoder (nn.MultiheadAttention)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 16, dim: int = 32):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image_size // 4) ** 2 + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos)[:, 0])


def vision_transformer(num_classes: int = 10, in_channels: int = 3, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(num_classes, in_channels)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 10, lr: float = 2e-3,
          batch_size: int = 32, seed: int = 0) -> nn.Module:
    """Adam on shuffled mini-batches, mean cross-entropy; returns the model in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for s in range(0, x.shape[0], batch_size):
            b = perm[s:s + batch_size]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def loader_stopping_at(x, y, batch: int | None):
    """Batches of 4 of (x, y); a KeyboardInterrupt at ``batch`` (a run stopped halfway)."""
    def batches():
        for i, a in enumerate(range(0, len(x), 4)):
            if i == batch:
                raise KeyboardInterrupt
            yield x[a:a + 4], y[a:a + 4]

    class Loader:
        def __iter__(self):
            return batches()

    return Loader()
