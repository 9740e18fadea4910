"""Few poisons: the library's BadNet, blended and WaNet backdoors at 1 % and 2 % of the training set.

Every other study poisons 5-10 % of the digits (72-146 examples). An attacker who needs fewer does not announce it;
this study runs the same attacks with their digits settings but for the poison count (``fraction``: 14 or 28 of the
1,437 training images; BadNet's poisons come from its one source class, 8), on three of the zoo's models trained by
the zoo's loops (run.fit): the SmallCNN, the BatchNorm ResNet and the GroupNorm CNN. The zoo's four protocols,
Δ-Influence with its defaults, no unlearning. An attack that sends fewer than half of the triggered test inputs to
its target "did not take" and is not traced.

    nice python benchmarks/zoo/rates.py --out benchmarks/results/rates
    python benchmarks/zoo/rates.py --out benchmarks/results/rates --table /tmp/rates.md
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deltainf  # noqa: E402
import run as zoo  # noqa: E402
from deltainf import recipes  # noqa: E402
from deltainf.data import load_digits_dataset  # noqa: E402
from deltainf.delta import pick_affected_points  # noqa: E402

ATTACKS = ("badnet-1pct", "badnet-2pct", "blended-1pct", "blended-2pct", "wanet-2pct")
ARCHS = ("small_cnn", "bn_resnet", "group_norm_cnn")


def poison(attack: str, train, test, seed: int):
    """The library attack of ``attack`` ("badnet-1pct": BadNet on 1 % of ``train``) with its digits settings."""
    name, rate = attack.rsplit("-", 1)
    return recipes.run_attack(name, train, test, seed=seed, fraction=int(rate.removesuffix("pct")) / 100)


def run_cell(attack: str, arch: str, seed: int) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    p = poison(attack, train, test, seed)
    victim = zoo.fit(arch, p.train, seed, nn.Identity()).eval()
    cell = {"attack": attack, "arch": arch, "seed": seed, "n_poisons": p.num_poisons, "target_class": p.target_class,
            "victim": {"accuracy": zoo.hit_rate(victim, test.images, test.labels),
                       "poison_success": zoo.hit_rate(victim, p.triggered_test.images, p.target_class)}}
    cell["took"] = cell["victim"]["poison_success"] >= zoo.TOOK
    if not cell["took"]:
        cell["seconds"] = time.perf_counter() - t0
        return cell
    loader = DataLoader(TensorDataset(p.train.images, p.train.labels), batch_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untracked-module note (BatchNorm, GroupNorm)
        ekfac = deltainf.EKFAC(victim, progress=False).fit(loader)
    truth = set(p.poison_indices.tolist())
    cell["protocols"] = {}
    for name, count, with_reference in zoo.PROTOCOLS:
        points = pick_affected_points(victim, p.triggered_test, p.target_class, count=count).x
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = deltainf.DeltaInfluence(ekfac).detect(
                loader, points, torch.full((points.shape[0],), p.target_class),
                reference=(test.images, test.labels) if with_reference else None)
        cell["protocols"][name] = {"points": points.shape[0], **zoo.detection_metrics(result, truth, len(p.train))}
    cell["seconds"] = time.perf_counter() - t0
    return cell


def table(cells: list[dict]) -> str:
    """Per attack x architecture x seed: poisons, clean accuracy, poison success, then recall / FPR per protocol."""
    order = {a: i for i, a in enumerate(ATTACKS)}
    cells = sorted(cells, key=lambda c: (order[c["attack"]], c["arch"], c["seed"]))
    return zoo.cells_table(cells, ["attack", "architecture", "seed", "poisons", "accuracy", "poison success"],
                           lambda c: [c["attack"], c["arch"], str(c["seed"]), str(c["n_poisons"]),
                                      zoo.percent(c["victim"]["accuracy"]), zoo.percent(c["victim"]["poison_success"])])


def main(argv=None) -> int:
    return zoo.study(argv, __doc__.splitlines()[0],
                     {"out": "benchmarks/results/rates", "attacks": ATTACKS, "archs": ARCHS, "seeds": "0,1,2"}, table,
                     run_cell)


if __name__ == "__main__":
    sys.exit(main())
