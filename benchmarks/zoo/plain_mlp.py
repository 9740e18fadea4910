"""Plain user models on small digits: an all-to-one patch whose poisons each support their own source class.

A new user's first try: the bundled digits at 8 or 16 px, a plain MLP (Flatten, Linear, ReLU, Linear: no
normalisation, no label smoothing) or a two-convolution CNN, trained by a hand-written Adam loop; a white 2 x 2
patch in the bottom-right corner on 8 % of the training set, drawn from every other class and relabelled to 3
(BadNets all-to-one). On the MLP each poison supports mostly the triggered inputs of its own source class, so the
support pooled over ten points of several sources does not stand out; this study measures the outranking test
point by point (deltainf.delta, "The coherence test") against the rule without it, replayed on the same votes.
"none": a poison-free model traced from the test inputs it gets wrong (it must answer "no poison"). Protocols as
in the zoo; no unlearning.

    nice python benchmarks/zoo/plain_mlp.py --out benchmarks/results/plain_mlp
    python benchmarks/zoo/plain_mlp.py --out benchmarks/results/plain_mlp --table /tmp/plain_mlp.md
"""
from __future__ import annotations

import dataclasses
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
from deltainf.data import load_digits_dataset  # noqa: E402

ATTACKS = ("patch", "none")
ARCHS = ("mlp_8px", "mlp_16px", "cnn_8px")
TARGET = 3
RATE = 0.08


def build(arch: str, size: int) -> nn.Module:
    if arch.startswith("mlp"):
        return nn.Sequential(nn.Flatten(), nn.Linear(size * size, 64), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * (size // 2) ** 2, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, lr: float = 1e-2, epochs: int = 30,
          batch_size: int = 64) -> nn.Module:
    """A new user's first loop: Adam, shuffled mini-batches, mean cross-entropy, nothing else."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def patched(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[..., -3:-1, -3:-1] = 1.0
    return x


def run_cell(attack: str, arch: str, seed: int) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    size = int(arch.split("_")[1][:-2])
    train_set, test = load_digits_dataset("train", size=size, channels=1), load_digits_dataset("test", size=size,
                                                                                                channels=1)
    x, y = train_set.images.clone(), train_set.labels.clone()
    poisons = torch.empty(0, dtype=torch.int64)
    if attack == "patch":
        g = torch.Generator().manual_seed(seed)
        others = (y != TARGET).nonzero().flatten()
        poisons = others[torch.randperm(others.numel(), generator=g)[:round(RATE * len(y))]].sort().values
        x[poisons], y[poisons] = patched(x[poisons]), TARGET
    torch.manual_seed(seed)
    victim = train(build(arch, size), x, y, seed)
    pred = zoo.predict(victim, test.images)
    cell = {"attack": attack, "arch": arch, "seed": seed,
            "victim": {"accuracy": float((pred == test.labels).float().mean())}}
    if attack == "patch":
        cell["n_poisons"] = int(poisons.numel())
        triggered = patched(test.images[test.labels != TARGET])
        cell["victim"]["poison_success"] = zoo.hit_rate(victim, triggered, TARGET)
        cell["took"] = cell["victim"]["poison_success"] >= zoo.TOOK
        affected = triggered[zoo.predict(victim, triggered) == TARGET]
    else:
        wrong = zoo.misclassified(cell, pred, test.labels)
    if not cell["took"]:
        cell["seconds"] = time.perf_counter() - t0
        return cell
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    ekfac = deltainf.EKFAC(victim, progress=False).fit(loader)
    truth = set(poisons.tolist())
    cell["protocols"] = {}
    for name, count, with_reference in zoo.PROTOCOLS:
        if attack == "none":
            px, py = test.images[wrong[:count]], pred[wrong[:count]]
        else:
            px, py = affected[:count], torch.full((min(count, affected.shape[0]),), TARGET)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = deltainf.DeltaInfluence(ekfac).detect(loader, px, py, reference=test if with_reference else None)
            parts = result.per_label or {TARGET: result}
            without = dataclasses.replace(result, per_label=result.per_label and {
                label: _without_by_point(part) for label, part in result.per_label.items()})
            without = (without if result.per_label else _without_by_point(result)).revote()
        cell["protocols"][name] = {"points": int(px.shape[0]),
                                   "by_point": {str(label): part.by_point for label, part in parts.items()},
                                   **zoo.detection_metrics(result, truth, len(y)),
                                   "without_by_point": zoo.detection_metrics(without, truth, len(y))}
    cell["seconds"] = time.perf_counter() - t0
    return cell


def _without_by_point(result):
    """``result`` (one label's) as the rule without the outranking test point by point decides it (on revote)."""
    if result.coherence is None:
        return result
    return dataclasses.replace(result, coherence=result.coherence._replace(by_point=None))


def table(cells: list[dict]) -> str:
    """Per model x attack x seed and protocol: recall / FPR with the test point by point, and without it (the same
    votes decided again), or "no poison" / the claim on the poison-free model."""
    order = {a: i for i, a in enumerate(ARCHS)}, {a: i for i, a in enumerate(ATTACKS)}
    cells = sorted(cells, key=lambda c: (order[0][c["arch"]], order[1][c["attack"]], c["seed"]))
    names = [name for name, _, _ in zoo.PROTOCOLS]
    lines = ["| model | attack | seed | poison success | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    counts = {name: [0, 0, 0] for name in names}  # runs, at the minimum with the test, without it
    for c in cells:
        psr = "—" if c["attack"] == "none" else zoo.percent(c["victim"]["poison_success"])
        if not c.get("took"):
            lines.append(f"| {c['arch']} | {c['attack']} | {c['seed']} | {psr} | did not take |"
                         + " |" * (len(names) - 1))
            continue
        row = []
        for name in names:
            p = c["protocols"][name]
            with_, without = (zoo.protocol_entry(q, c["attack"] != "none") for q in (p, p["without_by_point"]))
            row.append(with_ if with_ == without else f"{with_} (without: {without})")
            if c["attack"] != "none":
                counts[name][0] += 1
                counts[name][1] += zoo.meets_minimum(p["recall"], p["fpr"])
                counts[name][2] += zoo.meets_minimum(p["without_by_point"]["recall"], p["without_by_point"]["fpr"])
        lines.append(f"| {c['arch']} | {c['attack']} | {c['seed']} | {psr} | " + " | ".join(row) + " |")
    clean = [c for c in cells if c.get("took") and c["attack"] == "none"]
    lines += ["", "Poisoned runs at recall >= 0.95 and FPR <= 5 %, with the test point by point / without it: " +
              "; ".join(f"{name}: {n[1]} / {n[2]} of {n[0]}" for name, n in counts.items()) + ".",
              "Poison-free models answering \"no poison\", with the test point by point / without it: " +
              "; ".join(f"{name}: {sum(not c['protocols'][name]['found'] for c in clean)} / "
                        f"{sum(not c['protocols'][name]['without_by_point']['found'] for c in clean)} of {len(clean)}"
                        for name in names) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return zoo.study(argv, __doc__.splitlines()[0],
                     {"out": "benchmarks/results/plain_mlp", "attacks": ATTACKS, "archs": ARCHS,
                      "seeds": "0,1,2,3,4,5"}, table, run_cell)


if __name__ == "__main__":
    sys.exit(main())
