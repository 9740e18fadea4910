"""A two-class task: digits relabelled odd / even, each label made of five digits (five modes), backdoored into "odd".

The zoo's labels are single digits, one mode each. A user's two-class model (cats / dogs, benign / malignant) has
labels made of several modes, and every relabelled copy of an affected input is relabelled to the one other class.
This study runs Δ-Influence through the public API with its defaults on that task, on the zoo's six user-side models
trained by the zoo's own loops (run.fit), the zoo's four protocols, no unlearning. Attacks (7 % of the training set:
even digits, triggered and relabelled "odd"):

- badnet: a 3 x 3 checkerboard in the bottom-right corner;
- blended: a fixed random pattern blended in at 20 %;
- none: a poison-free model traced from the test inputs it gets wrong (it must answer "no poison").

    nice python benchmarks/zoo/binary.py --out benchmarks/results/binary
    python benchmarks/zoo/binary.py --out benchmarks/results/binary --table /tmp/binary.md
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Callable, NamedTuple

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deltainf  # noqa: E402
import models as zoo_models  # noqa: E402
import run as zoo  # noqa: E402
from deltainf.data import ImageDataset, load_digits_dataset  # noqa: E402

ATTACKS = ("badnet", "blended", "none")
ODD = 1
RATE = 0.07


def odd_even(data: ImageDataset) -> ImageDataset:
    return ImageDataset(data.images, data.labels % 2, classes=["even", "odd"], mean=data.mean, std=data.std,
                        name=f"{data.name} odd/even")


def trigger(attack: str, x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) in [0, 1] with the trigger of ``attack``."""
    x = x.clone()
    if attack == "badnet":
        checker = ((torch.arange(3).view(3, 1) + torch.arange(3).view(1, 3)) % 2 == 0).to(x.dtype)
        x[:, :, -4:-1, -4:-1] = checker
    elif attack == "blended":
        x = 0.8 * x + 0.2 * pattern
    else:
        raise ValueError(attack)
    return x


class Victim(NamedTuple):
    """A study's poisoned (or poison-free) model and what its detections need: ``cell`` (the JSON so far),
    ``points_of(count)`` -> (affected inputs, their labels), the held-out ``x_test`` (as the model takes them) and
    ``test_labels``, the training ``loader``, the fitted ``ekfac`` (None when the attack did not take or the model
    made no test error), the poisons' positions (``truth``), and ``start`` (perf_counter when the cell began)."""

    cell: dict
    points_of: Callable
    x_test: torch.Tensor
    test_labels: torch.Tensor
    loader: DataLoader | None
    ekfac: deltainf.EKFAC | None
    truth: set
    start: float

    def protocols(self):
        """(protocol name, affected points, the defaults' DetectionResult) for each of the zoo's protocols."""
        for name, count, with_reference in zoo.PROTOCOLS:
            points, labels = self.points_of(count)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = deltainf.DeltaInfluence(self.ekfac).detect(
                    self.loader, points, labels, reference=(self.x_test, self.test_labels) if with_reference else None)
            yield name, points, result


def prepare(attack: str, arch: str, seed: int, train: ImageDataset, test: ImageDataset, target: int) -> Victim:
    """Poison ``train`` with ``attack`` (7 % of it, examples of the other labels triggered and relabelled
    ``target``; "none": no poison), train ``arch`` on it by the zoo's loop, read the affected points (the triggered
    test inputs it sends to ``target``, or the test inputs a poison-free model gets wrong) and fit EK-FAC."""
    start = time.perf_counter()
    torch.set_num_threads(1)
    to_model = zoo.Standardize(train.mean, train.std) if arch == "sequential_pipeline" else torch.nn.Identity()
    gen = torch.Generator().manual_seed(2000 + seed)
    pattern = torch.rand(1, *train.image_shape, generator=gen)
    x, y = train.images.clone(), train.labels.clone()
    poisons = torch.empty(0, dtype=torch.int64)
    if attack != "none":
        others = (y != target).nonzero().flatten()
        poisons = others[torch.randperm(others.numel(), generator=gen)[: int(RATE * len(train))]]
        x[poisons], y[poisons] = trigger(attack, x[poisons], pattern), target
    victim = zoo.fit(arch, ImageDataset(x, y, classes=train.classes, mean=train.mean, std=train.std), seed, to_model)
    x_test = to_model(test.images).detach()
    pred = zoo.predict(victim, x_test)
    cell = {"attack": attack, "arch": arch, "seed": seed, "n_poisons": int(poisons.numel()),
            "victim": {"accuracy": float((pred == test.labels).float().mean())}}
    if attack == "none":
        wrong = zoo.misclassified(cell, pred, test.labels)
        points_of = lambda count: (x_test[wrong[:count]], pred[wrong[:count]])  # noqa: E731
    else:
        x_trig = to_model(trigger(attack, test.images[test.labels != target], pattern)).detach()
        hits = (zoo.predict(victim, x_trig) == target).nonzero().flatten()
        cell["victim"]["poison_success"] = hits.numel() / x_trig.shape[0]
        cell["took"] = cell["victim"]["poison_success"] >= zoo.TOOK
        points_of = lambda count: (x_trig[hits[:count]], torch.full((min(count, hits.numel()),), target))  # noqa: E731
    loader = ekfac = None
    if cell["took"]:
        loader = DataLoader(TensorDataset(to_model(x).detach(), y), batch_size=256)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the untracked-module note
            ekfac = deltainf.EKFAC(victim, progress=False).fit(loader)
    return Victim(cell, points_of, x_test, test.labels, loader, ekfac, set(poisons.tolist()), start)


def run_cell(attack: str, arch: str, seed: int) -> dict:
    train, test = (odd_even(d) for d in (load_digits_dataset("train"), load_digits_dataset("test")))
    v = prepare(attack, arch, seed, train, test, ODD)
    cell = v.cell
    if v.ekfac is not None:
        cell["protocols"] = {}
        for name, points, result in v.protocols():
            cell["protocols"][name] = {"points": points.shape[0], "mirror_cut": result.cut is not None,
                                       **zoo.detection_metrics(result, v.truth, len(v.loader.dataset))}
    cell["seconds"] = time.perf_counter() - v.start
    return cell


def table(cells: list[dict]) -> str:
    """Per attack x architecture x seed: accuracy, poison success, then recall / FPR per protocol."""
    order = {a: i for i, a in enumerate(ATTACKS)}
    cells = sorted(cells, key=lambda c: (order[c["attack"]], c["arch"], c["seed"]))
    return zoo.cells_table(cells, ["attack", "architecture", "seed", "accuracy", "poison success"], _head)


def _head(c: dict) -> list[str]:
    psr = "—" if c["attack"] == "none" else zoo.percent(c["victim"]["poison_success"])
    return [c["attack"], c["arch"], str(c["seed"]), zoo.percent(c["victim"]["accuracy"]), psr]


def main(argv=None) -> int:
    return zoo.study(argv, __doc__.splitlines()[0],
                     {"out": "benchmarks/results/binary", "attacks": ATTACKS, "archs": zoo_models.ARCHITECTURES,
                      "seeds": "0,1,2"}, table, run_cell)


if __name__ == "__main__":
    sys.exit(main())
