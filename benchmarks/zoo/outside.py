"""Backdoors and training recipes from outside the library, through the public API with its defaults.

Every attack here is written in this file, not taken from deltainf.attacks, and every victim is trained by a loop
written here, as a user would:

- ``tact``: a source-specific backdoor (TaCT, Tang et al. 2021): a 3 x 3 cross patch on 50 images of class 3
  relabelled 7, and the same patch on 22 "cover" images of other classes that keep their labels (the covers teach
  the model that the patch alone means nothing). Affected inputs: patched test images of class 3.
- ``two``: two triggers for one target, a white corner square on 36 images and a green vertical line on 36,
  relabelled 0; the affected points alternate between the two triggers.
- ``low`` / ``low7``: the cross patch on 14 (1 %) or 7 (0.5 %) images relabelled 2.
- ``redbox``: a hollow red frame on 72 images (5 %) relabelled 9.
- ``none``: no poison; traced from the first test inputs the model gets wrong (the answer must be "no poison").

Models and loops ("architectures" of the grid): a CNN with BatchNorm or an MLP with BatchNorm1d, trained by Adam
(20 epochs) or by a common recipe (SGD with Nesterov momentum, weight decay 5e-4, cosine schedule, label smoothing
0.1, mixup with alpha 0.2; 30 epochs). Protocols as in the zoo: 1 or 10 affected points, with the test split as
held-out controls (``reference=``) or without. No unlearning.

    nice python benchmarks/zoo/outside.py --out benchmarks/results/outside
    python benchmarks/zoo/outside.py --out benchmarks/results/outside --table docs/outside_table.md
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deltainf  # noqa: E402
import run as zoo  # noqa: E402
from deltainf.data import load_digits_dataset  # noqa: E402

ATTACKS = ("tact", "two", "low", "low7", "redbox", "none")
ARCHS = ("cnn-adam", "cnn-recipe", "mlp-adam", "mlp-recipe")


def cross_patch(x: torch.Tensor) -> torch.Tensor:
    """A 3 x 3 cross at the bottom right, red and blue on the cross, green off it."""
    x = x.clone()
    p = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    x[..., 0, -4:-1, -4:-1], x[..., 1, -4:-1, -4:-1], x[..., 2, -4:-1, -4:-1] = p, 1 - p, p
    return x


def corner(x: torch.Tensor) -> torch.Tensor:
    """A 3 x 3 white square at the top left."""
    x = x.clone()
    x[..., 1:4, 1:4] = 1.0
    return x


def green_line(x: torch.Tensor) -> torch.Tensor:
    """A green vertical line in column 13, rows 3 to 12."""
    x = x.clone()
    x[..., :, 3:13, 13] = 0.0
    x[..., 1, 3:13, 13] = 1.0
    return x


def red_frame(x: torch.Tensor) -> torch.Tensor:
    """A hollow 4 x 4 red frame at the bottom left."""
    x = x.clone()
    frame = torch.zeros(x.shape[-2:], dtype=torch.bool)
    frame[11:15, 1:5] = True
    frame[12:14, 2:4] = False
    x[..., 0, :, :] = torch.where(frame, 1.0, x[..., 0, :, :])
    x[..., 1:, :, :] = torch.where(frame, 0.0, x[..., 1:, :, :])
    return x


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(768, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128),
                         nn.ReLU(), nn.Linear(128, 10))


def train_adam(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 20) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = order[i:i + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def train_recipe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 30) -> nn.Module:
    """SGD (Nesterov momentum 0.9, weight decay 5e-4) on a cosine schedule, label smoothing 0.1, mixup (alpha 0.2)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(x) / 64))
    beta = torch.distributions.Beta(0.2, 0.2)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = order[i:i + 64]
            lam = float(beta.sample())
            mate = torch.randperm(len(b), generator=g)
            out = model(lam * x[b] + (1 - lam) * x[b][mate])
            loss = lam * F.cross_entropy(out, y[b], label_smoothing=0.1) + \
                (1 - lam) * F.cross_entropy(out, y[b][mate], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return model.eval()


MODELS = {"cnn": cnn, "mlp": mlp}
LOOPS = {"adam": train_adam, "recipe": train_recipe}


def poison(attack: str, x: torch.Tensor, y: torch.Tensor, test, seed: int):
    """(poison positions, target, [(trigger, triggered test inputs of its source classes)]); x and y changed in
    place."""
    g = torch.Generator().manual_seed(1000 + seed)

    def pick(mask, k):
        idx = mask.nonzero().flatten()
        return idx[torch.randperm(idx.numel(), generator=g)[:k]]

    if attack == "tact":
        source, target = 3, 7
        poisons, covers = pick(y == source, 50), pick((y != source) & (y != target), 22)
        x[poisons], y[poisons] = cross_patch(x[poisons]), target
        x[covers] = cross_patch(x[covers])
        return poisons, target, [(cross_patch, test.images[test.labels == source])]
    if attack == "two":
        target = 0
        poisons = pick(y != target, 72)
        x[poisons[:36]], x[poisons[36:]] = corner(x[poisons[:36]]), green_line(x[poisons[36:]])
        y[poisons] = target
        sources = test.images[test.labels != target]
        return poisons, target, [(corner, sources), (green_line, sources)]
    count, target, trigger = {"low": (14, 2, cross_patch), "low7": (7, 2, cross_patch),
                              "redbox": (72, 9, red_frame)}[attack]
    poisons = pick(y != target, count)
    x[poisons], y[poisons] = trigger(x[poisons]), target
    return poisons, target, [(trigger, test.images[test.labels != target])]


def run_cell(attack: str, arch: str, seed: int) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    x, y = train.images.clone(), train.labels.clone()
    poisons, target, triggers = (torch.empty(0, dtype=torch.long), None, []) if attack == "none" else \
        poison(attack, x, y, test, seed)
    model_name, loop = arch.split("-")
    torch.manual_seed(seed)
    model = LOOPS[loop](MODELS[model_name](), x, y, seed)
    with torch.no_grad():
        predicted = model(test.images).argmax(1)
    cell = {"attack": attack, "arch": arch, "seed": seed, "n_poisons": int(poisons.numel()),
            "victim": {"accuracy": float((predicted == test.labels).float().mean())}}
    gen = torch.Generator().manual_seed(seed)
    if attack == "none":
        wrong = (predicted != test.labels).nonzero().flatten()
        cell["n_misclassified"] = int(wrong.numel())
        points = [(test.images[wrong[:count]], predicted[wrong[:count]]) for count in (10, 1)]
    else:
        sent = []
        with torch.no_grad():
            for trigger, sources in triggers:
                xs = trigger(sources)
                hit = model(xs).argmax(1) == target
                cell["victim"][f"poison_success_{trigger.__name__}"] = float(hit.float().mean())
                sent.append(xs[hit][torch.randperm(int(hit.sum()), generator=gen)])
        cell["victim"]["poison_success"] = min(v for k, v in cell["victim"].items() if k.startswith("poison_success_"))
        if cell["victim"]["poison_success"] < zoo.TOOK:
            cell["took"] = False
            cell["seconds"] = time.perf_counter() - t0
            return cell
        # several triggers: their points alternate
        affected = torch.stack([t for group in zip(*sent) for t in group])
        points = [(affected[:count], torch.full((min(count, len(affected)),), target)) for count in (10, 1)]
    cell["took"] = bool(len(points[1][0]))  # a poison-free model without a test error has nothing to trace
    if not cell["took"]:
        cell["seconds"] = time.perf_counter() - t0
        return cell
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    ekfac = deltainf.EKFAC(model, progress=False).fit(loader)
    truth = set(poisons.tolist())
    cell["protocols"] = {}
    for name, count, with_reference in zoo.PROTOCOLS:
        px, py = points[0] if count == 10 else points[1]
        result = deltainf.DeltaInfluence(ekfac).detect(loader, px, py, reference=(test.images, test.labels)
                                                       if with_reference else None)
        cell["protocols"][name] = {"points": int(len(px)), **zoo.detection_metrics(result, truth, len(x)),
                                   "outrank_p": result.outrank_p, "representation_added": None
                                   if result.representation is None else result.representation[0]}
    cell["seconds"] = time.perf_counter() - t0
    return cell


def table(cells: list[dict]) -> str:
    """Per attack x model-loop x seed: poison success (or the poison-free model's test errors), then recall / FPR per
    protocol."""
    order = {a: i for i, a in enumerate(ATTACKS)}
    cells = sorted(cells, key=lambda c: (order[c["attack"]], c["arch"], c["seed"]))
    return zoo.cells_table(cells, ["attack", "model-loop", "seed", "poison success"], lambda c: [
        c["attack"], c["arch"], str(c["seed"]), zoo.percent(c["victim"]["poison_success"]) if c["attack"] != "none"
        else f"— ({c['n_misclassified']} wrong)"])


def main(argv=None) -> int:
    return zoo.study(argv, __doc__.splitlines()[0], {"out": "benchmarks/results/outside", "attacks": ATTACKS,
                                                     "archs": ARCHS, "seeds": "0,1,2"}, table, run_cell)


if __name__ == "__main__":
    sys.exit(main())
