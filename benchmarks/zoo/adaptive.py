"""Backdoors built to defeat latent-separation defences, through the public API with its defaults.

Δ-Influence's group boundary separates a poison group from its label in the model's representation; the adaptive
backdoors of Qi et al. (2023, "Revisiting the assumption of latent separability for backdoor defenses") were designed
against exactly that. Each poisons the training set twice: payload images carry a weakened, partial trigger and the
target label, and as many *cover* images carry the same kind of partial trigger with their own label, so that the
trigger's features alone do not separate the payload from its class. At test time the full trigger is applied, more
strongly. Both are written here, after the paper, not taken from ``deltainf.attacks``:

- ``adaptive-blend``: a fixed random pattern cut into a 4 x 4 grid of pieces; each payload and cover image blends a
  random half of the pieces at opacity 0.15; test inputs blend the whole pattern at 0.2.
- ``adaptive-patch``: four 3 x 3 random patches at fixed places; each payload and cover image gets two of them,
  drawn at random, at opacity 0.5; test inputs get all four, opaque.

5 % of the training set (72 images of classes other than ``TARGET``) is payload relabelled to ``TARGET``, and 5 % are
covers keeping their labels. Recall counts the payload; the FPR counts the clean images (neither payload nor cover);
the covers flagged are given apart (they carry the attacker's trigger, and removing them costs the user nothing the
attacker did not put there). Models and protocols as in the zoo (run.fit, run.PROTOCOLS); no unlearning.

    nice python benchmarks/zoo/adaptive.py --out benchmarks/results/adaptive
    python benchmarks/zoo/adaptive.py --out benchmarks/results/adaptive --table /tmp/adaptive.md
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deltainf  # noqa: E402
import run as zoo  # noqa: E402
from deltainf.data import ImageDataset, load_digits_dataset  # noqa: E402

ATTACKS = ("adaptive-blend", "adaptive-patch")
ARCHS = ("small_cnn", "bn_resnet", "group_norm_cnn", "layer_norm_mlp", "vit")
TARGET = 3
RATE = 0.05  # payload, and as many covers
GRID = 4  # adaptive-blend: pieces per side
BLEND_TRAIN, BLEND_TEST = 0.15, 0.2
PATCH_TRAIN, PATCH_TEST = 0.5, 1.0
PATCHES_TRAIN = 2  # adaptive-patch: of the four, on each payload and cover image


class Trigger:
    """One cell's trigger, drawn from ``gen``: the blend's pattern and the four patches with their places."""

    def __init__(self, attack: str, shape: tuple[int, int, int], gen: torch.Generator):
        if attack not in ATTACKS:
            raise ValueError(f"attack: expected one of {ATTACKS}, got {attack!r}")
        self.attack = attack
        c, h, w = shape
        self.pattern = torch.rand(c, h, w, generator=gen)
        self.patches = (torch.rand(4, c, 3, 3, generator=gen) > 0.5).float()
        self.places = [(1, 1), (1, w - 4), (h - 4, 1), (h - 4, w - 4)]

    def _pieces(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) pixel mask of the grid pieces chosen in ``mask`` (B, GRID * GRID)."""
        h, w = self.pattern.shape[-2:]
        cells = mask.view(-1, 1, GRID, GRID).float()
        return torch.nn.functional.interpolate(cells, size=(h, w), mode="nearest")

    def apply(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """``x`` (B, C, H, W) in [0, 1] with the trigger: partial and weak when ``gen`` draws the parts (training
        payload and covers), whole and strong when ``gen`` is None (test inputs)."""
        b = x.shape[0]
        if self.attack == "adaptive-blend":
            if gen is None:
                where, alpha = torch.ones(b, 1, *x.shape[-2:]), BLEND_TEST
            else:
                order = torch.rand(b, GRID * GRID, generator=gen).argsort(1)
                where, alpha = self._pieces(order < GRID * GRID // 2), BLEND_TRAIN
            return x + alpha * where * (self.pattern - x)
        x = x.clone()
        chosen = torch.ones(b, 4, dtype=torch.bool) if gen is None else \
            torch.rand(b, 4, generator=gen).argsort(1) < PATCHES_TRAIN
        alpha = PATCH_TEST if gen is None else PATCH_TRAIN
        for k, (r, c) in enumerate(self.places):
            rows = chosen[:, k]
            region = x[rows, :, r:r + 3, c:c + 3]
            x[rows, :, r:r + 3, c:c + 3] = region + alpha * (self.patches[k] - region)
        return x


def poisoned(attack: str, train, seed: int):
    """(images, labels, payload positions, cover positions, trigger) of ``train`` poisoned by ``attack``: the
    payload drawn from the classes other than ``TARGET``, the covers from every class (those of ``TARGET`` then
    carry the trigger with the target label, as the payload does)."""
    gen = torch.Generator().manual_seed(3000 + seed)
    trigger = Trigger(attack, train.image_shape, gen)
    count = int(RATE * len(train))
    source = (train.labels != TARGET).nonzero().flatten()
    drawn = torch.randperm(len(train), generator=gen)
    payload = drawn[torch.isin(drawn, source)][:count]
    covers = drawn[~torch.isin(drawn, payload)][:count]
    x, y = train.images.clone(), train.labels.clone()
    x[payload], y[payload] = trigger.apply(x[payload], gen), TARGET
    x[covers] = trigger.apply(x[covers], gen)
    return x, y, payload, covers, trigger


def run_cell(attack: str, arch: str, seed: int) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    x, y, payload, covers, trigger = poisoned(attack, train, seed)
    count = payload.numel()
    victim = zoo.fit(arch, ImageDataset(x, y, classes=train.classes), seed, torch.nn.Identity())
    others = test.labels != TARGET
    x_trig = trigger.apply(test.images[others], None)
    hits = (zoo.predict(victim, x_trig) == TARGET).nonzero().flatten()
    cell = {"attack": attack, "arch": arch, "seed": seed, "n_poisons": count, "n_covers": covers.numel(),
            "covers_of_target": int((y[covers] == TARGET).sum()),
            "victim": {"accuracy": zoo.hit_rate(victim, test.images, test.labels),
                       "poison_success": hits.numel() / x_trig.shape[0]}}
    cell["took"] = cell["victim"]["poison_success"] >= zoo.TOOK
    if not cell["took"]:
        cell["seconds"] = time.perf_counter() - t0
        return cell
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untracked-module note (BatchNorm, LayerNorm, GroupNorm)
        ekfac = deltainf.EKFAC(victim, progress=False).fit(loader)
    truth, cover_set = set(payload.tolist()), set(covers.tolist())
    cell["protocols"] = {}
    for name, n_points, with_reference in zoo.PROTOCOLS:
        points = x_trig[hits[:n_points]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = deltainf.DeltaInfluence(ekfac).detect(
                loader, points, torch.full((points.shape[0],), TARGET),
                reference=(test.images, test.labels) if with_reference else None)
        metrics = zoo.detection_metrics(result, truth, len(y))
        flagged = set(result.flagged.tolist())
        clean_flagged = len(flagged - truth - cover_set)
        metrics.update(fpr_with_covers=metrics["fpr"], fpr=clean_flagged / (len(y) - len(truth) - len(cover_set)),
                       covers_flagged=len(flagged & cover_set))
        cell["protocols"][name] = {"points": points.shape[0], **metrics}
    cell["seconds"] = time.perf_counter() - t0
    return cell


def table(cells: list[dict]) -> str:
    """Per attack x architecture x seed: poison success, then recall / FPR per protocol (the FPR over the clean
    images), and the covers flagged per protocol."""
    order = {a: i for i, a in enumerate(ATTACKS)}
    cells = sorted(cells, key=lambda c: (order[c["attack"]], ARCHS.index(c["arch"]), c["seed"]))
    names = [name for name, *_ in zoo.PROTOCOLS]
    covers = "| attack | architecture | seed | covers (of the target class) | " + \
        " | ".join(f"covers flagged, {n}" for n in names) + " |\n" + "|---|---|---|---|" + "---|" * len(names) + \
        "\n" + "".join(
            f"| {c['attack']} | {c['arch']} | {c['seed']} | {c['n_covers']} ({c['covers_of_target']}) | "
            + " | ".join(f"{c['protocols'][n]['covers_flagged']}" for n in names) + " |\n"
            for c in cells if c["took"])
    return zoo.cells_table(cells, ["attack", "architecture", "seed", "poison success"],
                           lambda c: [c["attack"], c["arch"], str(c["seed"]), zoo.percent(c["victim"]["poison_success"])]) \
        + "\n" + covers


def main(argv=None) -> int:
    return zoo.study(argv, __doc__.splitlines()[0],
                     {"out": "benchmarks/results/adaptive", "attacks": ATTACKS, "archs": ARCHS, "seeds": "0,1,2"}, table,
                     run_cell)


if __name__ == "__main__":
    sys.exit(main())
