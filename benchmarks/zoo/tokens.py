"""Token sequences with a trigger token: EK-FAC with the embedding tracked (the default) and left out.

Not images: sequences of 12 token ids from a vocabulary of 60 in 4 classes, each class drawing 45 % of its tokens
from 12 of its own (the rest uniform over the first 58 ids); 800 for training, 400 held out. The attack writes a
token that occurs nowhere else (id 59) into the first two positions of 40 training sequences of the other classes
and relabels them to class 0; the triggered held-out sequences the victim sends to 0 are the affected inputs. The
user's models: an embedding averaged over positions before two linear layers ("bag"), and one transformer encoder
layer on the embedding plus a learnt position table ("transformer"); the new user's loop of plain_mlp.py (Adam,
40 epochs here). The pool is the user's: each token replaced by a random one with probability 1/2. Each protocol
is detected twice on the same victim: with EK-FAC's default layers (the embedding tracked) and with the embedding
left out (the other layers named), as before embeddings were tracked. "none": the poison-free model traced from the held-out sequences it
gets wrong. Protocols as in the zoo; no unlearning.

    nice python benchmarks/zoo/tokens.py --out benchmarks/results/tokens
    python benchmarks/zoo/tokens.py --out benchmarks/results/tokens --table /tmp/tokens.md
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import left_out  # noqa: E402

ATTACKS = ("token", "none")
VOCABULARY, LENGTH, CLASSES, TRIGGER, TARGET = 60, 12, 4, 59, 0
N_TRAIN, N_HELD_OUT, N_POISONS = 800, 400, 40
VARIANTS = ("embedding tracked", "embedding left out")


def sequences(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, CLASSES, (n,), generator=g)
    own = torch.randint(0, 12, (n, LENGTH), generator=g) + 12 * y[:, None]
    other = torch.randint(0, TRIGGER - 1, (n, LENGTH), generator=g)
    return torch.where(torch.rand(n, LENGTH, generator=g) < 0.45, own, other), y


def triggered(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :2] = TRIGGER
    return x


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, 16)
        self.hidden = nn.Linear(16, 32)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, ids):
        return self.head(F.relu(self.hidden(self.embedding(ids).mean(1))))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, 16)
        self.position = nn.Parameter(0.1 * torch.randn(LENGTH, 16))
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, ids):
        return self.head(self.encoder(self.embedding(ids) + self.position).mean(1))


def replace_tokens(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The user's transform: each token replaced by a random id with probability 1/2."""
    kept = torch.rand(x.shape, generator=generator) < 0.5
    return torch.where(kept, x, torch.randint(0, VOCABULARY, x.shape, generator=generator))


def main(argv=None) -> int:
    return left_out.study(argv, __doc__.splitlines()[0], out="benchmarks/results/tokens",
                          models={"bag": Bag, "transformer": Encoder},
                          attacks=ATTACKS, variants=VARIANTS,
                          legend="Each protocol: with the embedding tracked ← with it left "
                          "out (recall / FPR; poison-free: flagged).",
                          draw=sequences, triggered=triggered, sizes=(N_TRAIN, N_HELD_OUT, N_POISONS), target=TARGET,
                          pool=replace_tokens, kind=nn.Embedding, epochs=40)


if __name__ == "__main__":
    sys.exit(main())
