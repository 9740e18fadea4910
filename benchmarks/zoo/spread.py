"""How far one poison-free training run's clean accuracy moves by itself: the spread behind the zoo's accuracy goal.

The zoo asks that a model retrained without the flagged set be within 1 point of clean accuracy of the poison-free
model. The retrained model is the poison-free model's recipe and seed on the training set less the flagged
examples (72-144 of the 1,437 digits when they are the poisons). This study trains, per architecture and seed, the
poison-free model as the zoo does and then the same recipe
- with another seed (seed + 1000: another initialisation and data order), on the same data, and
- with the same seed on the training set less k examples drawn at random (k = 72 and 144, drawn with the seed),
and reports each one's clean accuracy less the poison-free model's, on the 360 test digits (1 point = 3.6 images).
No attack, no detection: what a retraining moves when nothing it removes mattered.

    nice python benchmarks/zoo/spread.py --out benchmarks/results/spread
    python benchmarks/zoo/spread.py --out benchmarks/results/spread --table /tmp/spread.md
"""
from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import models as zoo_models  # noqa: E402
import run as zoo  # noqa: E402
from deltainf.data import load_digits_dataset  # noqa: E402

REMOVED = (72, 144)


def run_cell(attack: str, arch: str, seed: int) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    to_model = zoo.Standardize(train.mean, train.std) if arch == "sequential_pipeline" else nn.Identity()
    x_test = to_model(test.images).detach()

    def accuracy(dataset, s):
        return zoo.hit_rate(zoo.fit(arch, dataset, s, to_model), x_test, test.labels)

    cell = {"attack": attack, "arch": arch, "seed": seed, "poison_free": accuracy(train, seed),
            "another_seed": accuracy(train, seed + 1000), "fewer": {}}
    g = torch.Generator().manual_seed(seed)
    for k in REMOVED:
        dropped = torch.randperm(len(train.labels), generator=g)[:k].sort().values
        cell["fewer"][str(k)] = accuracy(train.without(dropped), seed)
    cell["seconds"] = time.perf_counter() - t0
    return cell


def brief(cell: dict) -> str:
    deltas = [cell["another_seed"] - cell["poison_free"]] + [v - cell["poison_free"] for v in cell["fewer"].values()]
    return f"{zoo.percent(cell['poison_free'])}, differences {[round(100 * d, 1) for d in deltas]} " \
           f"({cell['seconds']:.0f} s)"


def table(cells: list[dict]) -> str:
    """Per architecture and seed: the poison-free model's clean accuracy and each retraining's difference from it
    in points; last, how many differences are within 1 point."""
    order = {a: i for i, a in enumerate(zoo_models.ARCHITECTURES)}
    cells = sorted(cells, key=lambda c: (order[c["arch"]], c["seed"]))
    heads = ["another seed"] + [f"{k} fewer examples" for k in REMOVED]
    lines = ["| model | seed | poison-free accuracy | " + " | ".join(heads) + " |",
             "|---|---|---|" + "---|" * len(heads)]
    within = [0] * len(heads)
    for c in cells:
        deltas = [c["another_seed"] - c["poison_free"]] + [c["fewer"][str(k)] - c["poison_free"] for k in REMOVED]
        for i, d in enumerate(deltas):
            within[i] += abs(d) <= 0.01 + 1e-9
        lines.append(f"| {c['arch']} | {c['seed']} | {zoo.percent(c['poison_free'])} | "
                     + " | ".join(f"{100 * d:+.1f}" for d in deltas) + " |")
    lines.append("| within 1 point | | | " + " | ".join(f"{w} of {len(cells)}" for w in within) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return zoo.grid(argv, __doc__.splitlines()[0],
                    {"out": "benchmarks/results/spread", "attacks": ("none",), "archs": zoo_models.ARCHITECTURES,
                     "seeds": "0,1,2"}, table, lambda attack, arch, seed, args: run_cell(attack, arch, seed), brief)


if __name__ == "__main__":
    sys.exit(main())
