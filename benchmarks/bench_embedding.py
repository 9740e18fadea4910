"""What tracking an nn.Embedding costs: its diagonal input factor against the same layer as dense one-hot rows.

Model: token ids (B, T) -> nn.Embedding(V, width) -> mean over positions -> tanh -> Linear(width, 10); N sequences of T
random tokens. Three ways of fitting and scoring it, side by side in one run:
  head       EK-FAC on the head alone (what the model cost before embeddings were tracked)
  embedding  the embedding tracked too: token counts, rows added and gathered by id
  one-hot    the same weights as Linear(V, width, bias=False) on one-hot rows formed in the forward pass: the dense
             factor (V x V covariance, eigendecomposition, rotations) that embeddings were fitted with before
             (--dense-up-to: the largest V it is run for; its eigendecomposition grows as V^3)
and the floor, one forward + backward pass of the embedding model over the data. Each is repeated (--repeats) and the
median and range of every phase reported; the one-hot model's scores are compared with the embedding's.

Run:  nice python benchmarks/bench_embedding.py --threads 1 --out benchmarks/results/embedding/cpu_1thread.json
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import _runs
from deltainf.influence import EKFAC


class Bag(nn.Module):
    def __init__(self, vocabulary: int, width: int, classes: int):
        super().__init__()
        self.emb = nn.Embedding(vocabulary, width)
        self.head = nn.Linear(width, classes)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids).mean(1)))


class OneHot(nn.Module):
    """The Bag with its embedding as a linear layer of one-hot rows (the same function, the same weights)."""

    def __init__(self, bag: Bag):
        super().__init__()
        V, width = bag.emb.weight.shape
        self.vocabulary = V
        self.emb = nn.Linear(V, width, bias=False)
        self.head = copy.deepcopy(bag.head)
        with torch.no_grad():
            self.emb.weight.copy_(bag.emb.weight.T)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(F.one_hot(ids, self.vocabulary).to(self.emb.weight.dtype)).mean(1)))


def floor_pass(model: nn.Module, loader) -> float:
    model = copy.deepcopy(model)
    t = time.perf_counter()
    for x, y in loader:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="sum").backward()
    return time.perf_counter() - t


def ekfac_run(model, modules, loader, qx, qy) -> tuple[dict, torch.Tensor]:
    ek = EKFAC(model, modules=modules, progress=False)
    t = time.perf_counter()
    ek.fit(loader)
    fit = time.perf_counter() - t
    t = time.perf_counter()
    scores = ek.score(qx, qy, loader)
    score = time.perf_counter() - t
    phases = {k: ek.timings[k] for k in ("covariance", "eigendecomposition", "lambda")}
    return {"fit": fit, **phases, "score": score}, scores


def measure(V: int, args) -> dict:
    torch.manual_seed(0)
    bag = Bag(V, args.width, 10).eval()
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, V, (args.n, args.tokens), generator=g)
    Y = torch.randint(0, 10, (args.n,), generator=g)
    loader = DataLoader(TensorDataset(X, Y), batch_size=args.batch_size)
    qx, qy = X[:args.queries], Y[:args.queries]
    routes = {"head": (bag, ["head"]), "embedding": (bag, ["emb", "head"])}
    if V <= args.dense_up_to:
        routes["one-hot"] = (OneHot(bag).eval(), ["emb", "head"])
    runs = {name: [] for name in ["floor", *routes]}
    scores = {}
    for _ in range(args.repeats):  # the routes interleaved, so that the machine's load falls on all of them
        runs["floor"].append({"pass": floor_pass(bag, loader)})
        for name, (model, modules) in routes.items():
            timing, scores[name] = ekfac_run(model, modules, loader, qx, qy)
            runs[name].append(timing)
    row = {"vocabulary": V, **{name: _runs.spread(r) for name, r in runs.items()}}
    if "one-hot" in scores:
        ref = scores["one-hot"]
        row["one_hot_scores_rel_diff"] = float((scores["embedding"] - ref).abs().max() / ref.abs().max())
    return row


def main() -> None:
    p = _runs.parser(__doc__.split("\n")[0])
    p.add_argument("--vocabularies", type=int, nargs="+", default=[1024, 4096, 32768, 131072])
    p.add_argument("--dense-up-to", type=int, default=4096)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--queries", type=int, default=10)
    args = _runs.start(p)
    rows = []
    for V in args.vocabularies:
        row = measure(V, args)
        rows.append(row)
        floor = row["floor"]["pass"]["median"]
        line = [f"V={V:>7,}", f"floor {floor:.3f} s"]
        for name in ("head", "embedding", "one-hot"):
            if name in row:
                fit, score = row[name]["fit"]["median"], row[name]["score"]["median"]
                line.append(f"{name}: fit {fit:.3f} s ({fit / floor:.1f} floor), score {score:.3f} s")
        if "one_hot_scores_rel_diff" in row:
            line.append(f"scores apart {row['one_hot_scores_rel_diff']:.1e}")
        print(" | ".join(line), flush=True)
    _runs.report(args, rows=rows)


if __name__ == "__main__":
    main()
