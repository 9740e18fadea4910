"""Attacks deltainf was never shown: trigger backdoors written here, outside the library, on user models.

The zoo (run.py) measures the library's own attack implementations. This study writes four more dirty-label,
all-to-one triggers the way an attacker might, none of them in ``deltainf.attacks``, and runs Δ-Influence
through the public API with its defaults on them, on two of the zoo's user-side models: the LayerNorm MLP
(AdamW, label smoothing) and the GroupNorm CNN (strided convolutions, global average pooling, SGD with random
shifts of up to 2 pixels), trained by the zoo's own loops (run.fit). Triggers (6 % of the training set relabelled to ``TARGET``):

- random patch: a 3 x 3 checkerboard at a random position in every image (BadNets with a moving patch);
- line: one bright row of pixels near the bottom edge;
- additive: a fixed random pattern added at amplitude 0.15 and clipped to [0, 1] (no blending weight);
- corner dots: the four corner pixels set to white.

Protocols as in the zoo (1 or 10 affected points, with or without held-out controls); no unlearning.

    nice python benchmarks/zoo/unseen.py --out benchmarks/results/unseen
    python benchmarks/zoo/unseen.py --out benchmarks/results/unseen --table /tmp/unseen.md
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as zoo  # noqa: E402
from deltainf.data import ImageDataset, load_digits_dataset  # noqa: E402

ATTACKS = ("random-patch", "line", "additive", "corner-dots")
ARCHS = ("layer_norm_mlp", "group_norm_cnn")
TARGET = 3
RATE = 0.06


def trigger(attack: str, x: torch.Tensor, gen: torch.Generator, pattern: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) in [0, 1] with the trigger of ``attack`` (positions of the random patch drawn from
    ``gen``)."""
    x = x.clone()
    h, w = x.shape[-2:]
    if attack == "random-patch":
        checker = (torch.arange(3).view(3, 1) + torch.arange(3).view(1, 3)) % 2 == 0
        for i in range(x.shape[0]):
            r = torch.randint(0, h - 2, (1,), generator=gen).item()
            c = torch.randint(0, w - 2, (1,), generator=gen).item()
            x[i, :, r:r + 3, c:c + 3] = checker.to(x.dtype)
    elif attack == "line":
        x[:, :, h - 3, 2:w - 2] = 1.0
    elif attack == "additive":
        x = (x + 0.15 * (2 * pattern - 1)).clamp(0, 1)
    elif attack == "corner-dots":
        x[:, :, 0, 0] = x[:, :, 0, w - 1] = x[:, :, h - 1, 0] = x[:, :, h - 1, w - 1] = 1.0
    else:
        raise ValueError(attack)
    return x


def run_cell(attack: str, arch: str, seed: int) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    gen = torch.Generator().manual_seed(1000 + seed)
    pattern = torch.rand(1, 1, *train.image_shape[1:], generator=gen).expand(1, *train.image_shape)
    source = (train.labels != TARGET).nonzero().flatten()
    poisons = source[torch.randperm(source.numel(), generator=gen)[: int(RATE * len(train))]]
    x, y = train.images.clone(), train.labels.clone()
    x[poisons], y[poisons] = trigger(attack, x[poisons], gen, pattern), TARGET
    victim = zoo.fit(arch, ImageDataset(x, y, classes=train.classes), seed, torch.nn.Identity())
    others = test.labels != TARGET
    x_trig = trigger(attack, test.images[others], torch.Generator().manual_seed(seed), pattern)
    hits = (zoo.predict(victim, x_trig) == TARGET).nonzero().flatten()
    cell = {"attack": attack, "arch": arch, "seed": seed, "n_poisons": int(poisons.numel()),
            "victim": {"accuracy": zoo.hit_rate(victim, test.images, test.labels),
                       "poison_success": hits.numel() / x_trig.shape[0]}}
    cell["took"] = cell["victim"]["poison_success"] >= zoo.TOOK
    if not cell["took"]:
        cell["seconds"] = time.perf_counter() - t0
        return cell
    truth = set(poisons.tolist())
    cell["protocols"] = {}
    for name, points, result in zoo.traced_protocols(victim, x, y, x_trig[hits], TARGET, (test.images, test.labels)):
        cell["protocols"][name] = {"points": points.shape[0], **zoo.detection_metrics(result, truth, len(y))}
    cell["seconds"] = time.perf_counter() - t0
    return cell


def table(cells: list[dict]) -> str:
    """Per attack x architecture x seed: poison success, then recall / FPR per protocol."""
    order = {a: i for i, a in enumerate(ATTACKS)}
    cells = sorted(cells, key=lambda c: (order[c["attack"]], c["arch"], c["seed"]))
    return zoo.cells_table(cells, ["attack", "architecture", "seed", "poison success"],
                           lambda c: [c["attack"], c["arch"], str(c["seed"]), zoo.percent(c["victim"]["poison_success"])])


def main(argv=None) -> int:
    return zoo.study(argv, __doc__.splitlines()[0],
                     {"out": "benchmarks/results/unseen", "attacks": ATTACKS, "archs": ARCHS, "seeds": "0,1,2"}, table,
                     run_cell)


if __name__ == "__main__":
    sys.exit(main())
