"""A user's own network, pipeline and attack: few poisons from every source class, on a model written by the user.

Everything here is written the way a user new to deltainf would write it, not with the library's helpers: the
digits at 28 x 28 in one channel (MNIST's shape), standardised in the data pipeline with MNIST's constants
(mean 0.1307, std 0.3081, not this data's), a CNN with BatchNorm (2-d and 1-d), in-place ReLU, SiLU, GELU, max
pooling, channel and plain dropout and adaptive pooling, trained by a hand-written Adam loop with weight decay. The
attacks are the user's too: a bright bar across the top rows stamped on 15 or 30 training images drawn from every
class but the target and relabelled to it (an all-to-one backdoor at 1 % and 2 % of the training set), and a
random pattern blended in at 15 % on 15 images. "none" is the same network trained without poison, traced from
the test inputs it gets wrong. The zoo's four protocols, Δ-Influence with its defaults, no unlearning; each
protocol also keeps the flagged set of two other boundaries replayed on its votes (the support mixture without the
representation step, and the permutation cut with the mirror cut alone), which say where the clean examples come
from. An attack that sends fewer than half of the triggered test inputs to its target "did not take".

    nice python benchmarks/zoo/user_net.py --out benchmarks/results/user-net
    python benchmarks/zoo/user_net.py --out benchmarks/results/user-net --table /tmp/user_net.md
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deltainf  # noqa: E402
import run as zoo  # noqa: E402
from deltainf.data import load_digits_dataset  # noqa: E402

ATTACKS = ("none", "bar-15", "bar-30", "blend-15")
ARCHS = ("user_net",)
TARGET = 3
MEAN, STD = 0.1307, 0.3081  # MNIST's constants, as a user copies them
SIZE = 28
# what each replayed boundary is called in the cells
REPLAYS = {"support mixture": "mixture", "permutation cut + mirror cut": "coherence"}


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(inplace=True), nn.MaxPool2d(2),
            nn.Dropout2d(0.1), nn.AdaptiveAvgPool2d(3), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(288, 64), nn.BatchNorm1d(64), nn.GELU(), nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


def standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def train(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 12) -> nn.Module:
    torch.manual_seed(seed)
    model = UserNet()
    opt = torch.optim.Adam(model.parameters(), 2e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            batch = order[i:i + 64]
            loss = F.cross_entropy(model(standardise(x[batch])), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def bar(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[..., 1:3, 4:24] = 1.0
    return x


def blend(x: torch.Tensor) -> torch.Tensor:
    pattern = torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    return 0.85 * x + 0.15 * pattern


def poison(attack: str, x: torch.Tensor, y: torch.Tensor, seed: int):
    """(poisoned images, labels, poison positions, trigger): ``count`` images of every class but TARGET, drawn with
    ``seed``, stamped and relabelled."""
    name, count = attack.split("-")
    trigger = {"bar": bar, "blend": blend}[name]
    sources = (y != TARGET).nonzero().flatten()
    chosen = sources[torch.randperm(sources.numel(), generator=torch.Generator().manual_seed(seed))[:int(count)]]
    x, y = x.clone(), y.clone()
    x[chosen] = trigger(x[chosen])
    y[chosen] = TARGET
    return x, y, chosen, trigger


def run_cell(attack: str, arch: str, seed: int) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    train_set = load_digits_dataset("train", size=SIZE, channels=1)
    test_set = load_digits_dataset("test", size=SIZE, channels=1)
    x, y, xt, yt = train_set.images, train_set.labels, test_set.images, test_set.labels
    x_test = standardise(xt)  # the test set as the model takes it, once for the accuracy, the points and the reference
    cell = {"attack": attack, "arch": arch, "seed": seed}
    if attack == "none":
        victim = train(x, y, seed)
        poisons = torch.empty(0, dtype=torch.long)
        with torch.no_grad():
            predicted = victim(x_test).argmax(1)
        wrong = zoo.misclassified(cell, predicted, yt)
        points, labels = x_test[wrong], predicted[wrong]
    else:
        x, y, poisons, trigger = poison(attack, x, y, seed)
        victim = train(x, y, seed)
        cell["n_poisons"], cell["target_class"] = int(poisons.numel()), TARGET
        triggered = standardise(trigger(xt[yt != TARGET]))
        with torch.no_grad():
            hits = (victim(triggered).argmax(1) == TARGET).nonzero().flatten()
        cell["took"] = hits.numel() >= zoo.TOOK * triggered.shape[0]
        points, labels = triggered[hits], torch.full((hits.numel(),), TARGET)
    with torch.no_grad():
        cell["victim"] = {"accuracy": float((victim(x_test).argmax(1) == yt).float().mean())}
        if attack != "none":
            cell["victim"]["poison_success"] = hits.numel() / triggered.shape[0]
    if not cell["took"]:
        cell["seconds"] = time.perf_counter() - t0
        return cell
    loader = DataLoader(TensorDataset(standardise(x), y), batch_size=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note on the BatchNorm layers EK-FAC does not track
        ekfac = deltainf.EKFAC(victim, progress=False).fit(loader)
    cell["ekfac_coverage"] = ekfac.coverage.brief()
    truth = set(poisons.tolist())
    cell["protocols"] = {}
    for name, count, with_reference in zoo.PROTOCOLS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = deltainf.DeltaInfluence(ekfac, progress=False).detect(
                loader, points[:count], labels[:count], reference=(x_test, yt) if with_reference else None)
        row = {"points": int(points[:count].shape[0]), **zoo.detection_metrics(result, truth, len(y))}
        for replay, boundary in REPLAYS.items():
            again = set(zoo.with_boundary(result, boundary).revote().flagged.tolist())
            row[replay] = [len(again & truth), len(again - truth)]
        cell["protocols"][name] = row
    cell["seconds"] = time.perf_counter() - t0
    return cell


def table(cells: list[dict]) -> str:
    """Per attack x seed: poisons, clean accuracy, poison success, then recall / FPR per protocol."""
    order = {a: i for i, a in enumerate(ATTACKS)}
    cells = sorted(cells, key=lambda c: (order[c["attack"]], c["seed"]))
    return zoo.cells_table(cells, ["attack", "seed", "poisons", "accuracy", "poison success"],
                           lambda c: [c["attack"], str(c["seed"]), str(c.get("n_poisons", 0)),
                                      zoo.percent(c["victim"]["accuracy"]),
                                      zoo.percent(c["victim"]["poison_success"]) if "poison_success" in c["victim"]
                                      else "—"])


def main(argv=None) -> int:
    return zoo.study(argv, __doc__.splitlines()[0],
                     {"out": "benchmarks/results/user-net", "attacks": ATTACKS, "archs": ARCHS, "seeds": "0,1,2,3,4,5"},
                     table, run_cell)


if __name__ == "__main__":
    sys.exit(main())
