"""1-D signals with a trigger: EK-FAC with the Conv1d layers tracked (the default) and left out.

Not images: two-channel signals of 64 samples in 4 classes (class k: a sine of 2(k + 1) and a cosine of k + 1 periods,
plus Gaussian noise of standard deviation 0.8); 800 for training, 400 held out. The attack adds a fixed alternating
burst (+-2 over 6 samples of channel 0) to 40 training signals of the other classes and relabels them to class 0;
the triggered held-out signals the victim sends to 0 are the affected inputs. The user's models: two Conv1d layers
averaged over time before a linear head ("cnn"), and a Conv1d stem with a residual block of two Conv1d layers and
BatchNorm1d ("resnet"); the new user's loop of plain_mlp.py. The pool is the user's: Gaussian noise of standard
deviation 0.5 added. Each protocol is detected twice on the same victim: with EK-FAC's default layers (the Conv1d
layers tracked) and with them left out (the other layers named), as before Conv1d was tracked. "none": the
poison-free model traced from the held-out signals it gets wrong. Protocols as in the zoo; no unlearning.

    nice python benchmarks/zoo/signals.py --out benchmarks/results/signals
    python benchmarks/zoo/signals.py --out benchmarks/results/signals --table /tmp/signals.md
"""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import left_out  # noqa: E402

ATTACKS = ("burst", "none")
LENGTH, CHANNELS, CLASSES, TARGET = 64, 2, 4, 0
N_TRAIN, N_HELD_OUT, N_POISONS = 800, 400, 40
VARIANTS = ("conv1d tracked", "conv1d left out")


def signals(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, CLASSES, (n,), generator=g)
    t = torch.linspace(0, 1, LENGTH)
    k = y.float()[:, None] + 1
    clean = torch.stack([torch.sin(4 * math.pi * k * t), torch.cos(2 * math.pi * k * t)], 1)
    return clean + 0.8 * torch.randn(n, CHANNELS, LENGTH, generator=g), y


def triggered(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, 0, 5:11] += torch.tensor([2.0, -2.0] * 3)
    return x


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(CHANNELS, 16, 5, padding=2)
        self.conv2 = nn.Conv1d(16, 32, 5, stride=2, padding=2)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x):
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).mean(2))


class Resnet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(CHANNELS, 16, 7, padding=3, bias=False), nn.BatchNorm1d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv1d(16, 16, 3, padding=1, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
                                   nn.Conv1d(16, 16, 3, padding=1, bias=False), nn.BatchNorm1d(16))
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        h = self.stem(x)
        return self.head(F.relu(h + self.block(h)).mean(2))


def add_noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The user's transform: Gaussian noise of standard deviation 0.5."""
    return x + 0.5 * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def main(argv=None) -> int:
    return left_out.study(argv, __doc__.splitlines()[0], out="benchmarks/results/signals",
                          models={"cnn": Cnn, "resnet": Resnet},
                          attacks=ATTACKS, variants=VARIANTS,
                          legend="Each protocol: with the Conv1d layers tracked ← with "
                          "them left out (recall / FPR; poison-free: flagged).",
                          draw=signals, triggered=triggered, sizes=(N_TRAIN, N_HELD_OUT, N_POISONS), target=TARGET,
                          pool=add_noise, kind=nn.Conv1d, epochs=30)


if __name__ == "__main__":
    sys.exit(main())
