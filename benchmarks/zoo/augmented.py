"""A training loop the zoo does not have: random-crop augmentation, Adam, BatchNorm and dropout, and a trigger written
here, not in the library.

The zoo's victims are trained by deltainf's recipes or by the zoo's user loops, all without augmentation. A user's
loop usually augments, so the model never sees a poison exactly as the training set holds it, while EK-FAC and
Δ-Influence read the plain training set. This study trains a user-written CNN (two conv + BatchNorm blocks, dropout)
with Adam for 20 epochs on random 16 x 16 crops of the padded digits; the attack is a 2 x 2 white square at the image
centre stamped on 6 % of the training set (86 images of every class but 0), relabelled 0. It runs the public API with
its defaults (`EKFAC(model).fit(loader)`, `DeltaInfluence(ekfac).detect(...)`) from 1 and from 10 triggered test
inputs, with the test set as held-out controls and without them (the API's default), for each seed; no unlearning.
The same loop on the clean data is traced from the first test input it gets wrong: there the answer must be "no
coherent poison set found".

    nice python benchmarks/zoo/augmented.py --seeds 3
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deltainf
from deltainf.data import load_digits_dataset
from deltainf.metrics import detection_metrics

TARGET = 0
N_POISONS = 86  # 6 % of the 1,437 training digits
EPOCHS = 20
PAD = 2


def stamp(x: torch.Tensor) -> torch.Tensor:
    """The trigger: a 2 x 2 white square at the centre of every image."""
    x = x.clone()
    c = x.shape[-1] // 2
    x[..., c - 1:c + 1, c - 1:c + 1] = 1.0
    return x


def user_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 16, 10))


def train_augmented(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    """Adam, batches of 64, each batch one random crop of the zero-padded images (the same shift for the batch)."""
    torch.manual_seed(seed)
    model = user_net()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    g = torch.Generator().manual_seed(seed)
    size = x.shape[-1]
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = order[i:i + 64]
            dx, dy = torch.randint(0, 2 * PAD + 1, (2,), generator=g).tolist()
            crop = F.pad(x[b], (PAD, PAD, PAD, PAD))[..., dy:dy + size, dx:dx + size]
            loss = F.cross_entropy(model(crop), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


PROTOCOLS = ((1, True), (10, True), (1, False), (10, False))  # affected points, held-out controls


def _protocol(points: int, held_out: bool) -> str:
    return f"{points}{' + reference' if held_out else ''}"


def _row(seed: int, protocol: str, accuracy: float, poison_success: float, result, poisons, n_train: int,
         t0: float) -> dict:
    """One detection's row: what it found against the known ``poisons`` (none for the poison-free model)."""
    found = detection_metrics(result.flagged, poisons, n_train)
    return {"seed": seed, "points": protocol, "accuracy": accuracy, "poison_success": poison_success,
            "recall": found["recall"], "fpr": found["fpr"], "flagged": found["flagged"], "found": result.found,
            "fdr_estimate": result.fdr_estimate, "seconds": time.time() - t0}


def run_seed(seed: int) -> list[dict]:
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    g = torch.Generator().manual_seed(100 + seed)
    x, y = train.images.clone(), train.labels.clone()
    others = (y != TARGET).nonzero().flatten()
    poisons = others[torch.randperm(others.numel(), generator=g)[:N_POISONS]]
    x[poisons], y[poisons] = stamp(x[poisons]), TARGET
    t0 = time.time()
    model = train_augmented(x, y, seed)
    source = test.labels != TARGET
    with torch.no_grad():
        accuracy = float((model(test.images).argmax(1) == test.labels).float().mean())
        sent = model(stamp(test.images[source])).argmax(1) == TARGET
    affected = stamp(test.images[source][sent])
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    ekfac = deltainf.EKFAC(model, progress=False).fit(loader)
    rows = []
    for points, held_out in PROTOCOLS:
        chosen = affected[torch.randperm(len(affected), generator=torch.Generator().manual_seed(seed))[:points]]
        result = deltainf.DeltaInfluence(ekfac).detect(loader, chosen, TARGET,
                                                       reference=(test.images, test.labels) if held_out else None)
        rows.append(_row(seed, _protocol(points, held_out), accuracy, float(sent.float().mean()), result, poisons,
                         len(x), t0))
    # the same loop on the clean data, traced from a test input it gets wrong: the answer must be "no poison"
    clean = train_augmented(train.images, train.labels, seed)
    with torch.no_grad():
        predicted = clean(test.images).argmax(1)
    wrong = (predicted != test.labels).nonzero().flatten()
    if wrong.numel():
        i = int(wrong[0])
        loader = DataLoader(TensorDataset(train.images, train.labels), batch_size=128)
        ekfac = deltainf.EKFAC(clean, progress=False).fit(loader)
        for held_out in (True, False):
            result = deltainf.DeltaInfluence(ekfac).detect(
                loader, test.images[i], int(predicted[i]), reference=(test.images, test.labels) if held_out else None)
            rows.append(_row(seed, _protocol(1, held_out) + ", poison-free",
                             float((predicted == test.labels).float().mean()), float("nan"), result, [], len(train),
                             t0))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    print("| seed | points | clean accuracy | poison success | recall | FPR | flagged | estimated FDR |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in range(args.seeds):
        for r in run_seed(seed):
            poisoned = r["recall"] == r["recall"]  # NaN for the poison-free model
            psr = f"{100 * r['poison_success']:.1f} %" if poisoned else "—"
            recall = f"{r['recall']:.2f}" if poisoned else "—"
            print(f"| {r['seed']} | {r['points']} | {100 * r['accuracy']:.1f} % | {psr} | {recall} | "
                  f"{100 * r['fpr']:.2f} % | {r['flagged']} | {r['fdr_estimate']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
