"""An all-to-all backdoor: every label's poisons lead to the next label, so the affected points carry many labels.

The zoo's attacks are all-to-one: every affected point is predicted as the one target. This study writes an
all-to-all BadNet outside the library, as in BadNets' all-to-all experiment and BackdoorBench's all-to-all mode: a
3 x 3 checkerboard near the bottom-right corner on ``RATE`` of the training set, each relabelled from y to
(y + 1) mod 10, on the zoo's user models trained by their own loops (run.fit). The triggered test inputs the victim
sends to y + 1 are the affected points, drawn at random: 10 or 30 of them (of 7–10 labels), with or without held-out
controls, defaults only, no unlearning. Each affected label is decided on its own points
(``DetectionResult.per_label``), so a label with few points has little power: the study says how many of the traced
labels were found.

    nice python benchmarks/zoo/all_to_all.py --out benchmarks/results/all-to-all
    python benchmarks/zoo/all_to_all.py --out benchmarks/results/all-to-all --table /tmp/all-to-all.md
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deltainf  # noqa: E402
import run as zoo  # noqa: E402
from deltainf.data import ImageDataset, load_digits_dataset  # noqa: E402

ATTACKS = ("badnet-all-to-all",)
ARCHS = ("small_cnn", "sequential_pipeline", "layer_norm_mlp", "group_norm_cnn")
RATE = 0.1
PROTOCOLS = (("10 points + reference", 10, True), ("10 points", 10, False),
             ("30 points + reference", 30, True), ("30 points", 30, False))


def trigger(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) in [0, 1] with a 3 x 3 checkerboard one pixel in from the bottom-right corner."""
    x = x.clone()
    h, w = x.shape[-2:]
    checker = (torch.arange(3).view(3, 1) + torch.arange(3).view(1, 3)) % 2 == 0
    x[:, :, h - 4:h - 1, w - 4:w - 1] = checker.to(x.dtype)
    return x


def run_cell(attack: str, arch: str, seed: int) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    to_model = zoo.Standardize(train.mean, train.std) if arch == "sequential_pipeline" else nn.Identity()
    gen = torch.Generator().manual_seed(2000 + seed)
    poisons = torch.randperm(len(train), generator=gen)[: int(RATE * len(train))]
    x, y = train.images.clone(), train.labels.clone()
    x[poisons], y[poisons] = trigger(x[poisons]), (y[poisons] + 1) % train.num_classes
    victim = zoo.fit(arch, ImageDataset(x, y, classes=train.classes), seed, to_model)
    x_trig = to_model(trigger(test.images)).detach()
    y_trig = (test.labels + 1) % train.num_classes
    hits = (zoo.predict(victim, x_trig) == y_trig).nonzero().flatten()
    cell = {"attack": attack, "arch": arch, "seed": seed, "n_poisons": int(poisons.numel()),
            "victim": {"accuracy": zoo.hit_rate(victim, to_model(test.images).detach(), test.labels),
                       "poison_success": hits.numel() / y_trig.numel()}}
    cell["took"] = cell["victim"]["poison_success"] >= zoo.TOOK
    if not cell["took"]:
        cell["seconds"] = time.perf_counter() - t0
        return cell
    hits = hits[torch.randperm(hits.numel(), generator=torch.Generator().manual_seed(seed))]
    loader = DataLoader(torch.utils.data.TensorDataset(to_model(x).detach(), y), batch_size=256)
    reference = (to_model(test.images).detach(), test.labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untracked-module note
        ekfac = deltainf.EKFAC(victim, progress=False).fit(loader)
    truth = set(poisons.tolist())
    cell["protocols"] = {}
    for name, count, with_reference in PROTOCOLS:
        points = hits[:count]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = deltainf.DeltaInfluence(ekfac).detect(loader, x_trig[points], y_trig[points],
                                                           reference=reference if with_reference else None)
        parts = getattr(result, "per_label", None) or {}  # None: one label, or a version that pooled them
        cell["protocols"][name] = {"points": int(points.numel()), "labels": len(set(y_trig[points].tolist())),
                                   "labels_found": sum(part.found for part in parts.values()),
                                   **zoo.detection_metrics(result, truth, len(y))}
    cell["seconds"] = time.perf_counter() - t0
    return cell


def table(cells: list[dict]) -> str:
    """Per architecture x seed: poison success, then recall / FPR (labels found of those traced) per protocol."""
    names = [name for name, *_ in PROTOCOLS]
    lines = ["| architecture | seed | poison success | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for c in sorted(cells, key=lambda c: (c["arch"], c["seed"])):
        psr = f"{100 * c['victim']['poison_success']:.1f} %"
        if not c["took"]:
            lines.append(f"| {c['arch']} | {c['seed']} | {psr} | did not take |" + " |" * (len(names) - 1))
            continue
        row = [(f"{p['recall']:.2f} / {100 * p['fpr']:.1f} %" if p["found"] else "nothing found")
               + f" ({p['labels_found']} of {p['labels']} labels)" for p in (c["protocols"][n] for n in names)]
        lines.append(f"| {c['arch']} | {c['seed']} | {psr} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return zoo.study(argv, __doc__.splitlines()[0],
                     {"out": "benchmarks/results/all-to-all", "attacks": ATTACKS, "archs": ARCHS, "seeds": "0,1"},
                     table, run_cell)


if __name__ == "__main__":
    sys.exit(main())
