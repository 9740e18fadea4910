"""What tracking grouped and depthwise convolutions costs: a MobileNet-like net fitted and scored with them tracked
(the default) and left out (the other layers named), against the floor (one forward + backward pass).

Model: Conv2d(3 -> 32, stride 2), then depthwise-separable blocks (a depthwise 3 x 3 convolution, BatchNorm, ReLU,
a pointwise 1 x 1 convolution, BatchNorm, ReLU) 32 -> 64 -> 128 (stride 2) -> 256 (stride 2) -> 256, global average
pooling and Linear(256, 10); --groups G makes the 3 x 3 convolutions grouped (G groups) instead of depthwise. N
synthetic 3 x 32 x 32 images, batch 128, 8 queries, default settings. Median (range) of --repeats interleaved runs.

Run:  nice python benchmarks/bench_grouped.py --threads 1 --out benchmarks/results/grouped/cpu_1thread.json
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import _runs
from deltainf.influence import EKFAC


def block(c_in: int, c_out: int, stride: int, groups: int | None) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_in, 3, stride, 1, groups=groups or c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(),
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def build(groups: int | None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), *block(32, 64, 1, groups), *block(64, 128, 2, groups),
                         *block(128, 256, 2, groups), *block(256, 256, 1, groups), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(256, 10)).eval()


def floor_pass(model: nn.Module, loader) -> float:
    t = time.perf_counter()
    for x, y in loader:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    return time.perf_counter() - t


def ekfac_run(model, modules, loader, qx, qy) -> dict:
    ek = EKFAC(model, modules=modules, progress=False)
    t = time.perf_counter()
    ek.fit(loader)
    fit = time.perf_counter() - t
    t = time.perf_counter()
    ek.score(qx, qy, loader)
    return {"fit": fit, **{k: ek.timings[k] for k in ("covariance", "eigendecomposition", "lambda")},
            "score": time.perf_counter() - t}


def main() -> None:
    p = _runs.parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--groups", type=int, default=None, help="groups of the 3 x 3 convolutions (default: depthwise)")
    args = _runs.start(p)
    model = build(args.groups)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.rand(args.n, 3, 32, 32, generator=g), torch.randint(0, 10, (args.n,), generator=g)
    loader = DataLoader(TensorDataset(X, Y), batch_size=128)
    every = EKFAC(model, progress=False).layer_names
    ungrouped = [n for n in every if getattr(model.get_submodule(n), "groups", 1) == 1]
    routes = {"tracked": None, "left out": ungrouped}
    runs: dict[str, list] = {name: [] for name in ["floor", *routes]}
    for _ in range(args.repeats):
        runs["floor"].append({"pass": floor_pass(model, loader)})
        for name, modules in routes.items():
            runs[name].append(ekfac_run(model, modules, loader, X[:8], Y[:8]))
    rows = {name: _runs.spread(r) for name, r in runs.items()}
    floor = rows["floor"]["pass"]["median"]
    print(f"floor {floor:.2f} s ({len(every)} layers tracked by default, {len(ungrouped)} without the grouped ones)")
    for name in routes:
        r = rows[name]
        print(f"{name}: fit {r['fit']['median']:.2f} s ({r['fit']['median'] / floor:.1f} floor; covariance "
              f"{r['covariance']['median']:.2f}, lambda {r['lambda']['median']:.2f}), score "
              f"{r['score']['median']:.2f} s")
    _runs.report(args, layers={"default": every, "grouped left out": ungrouped}, rows=rows)


if __name__ == "__main__":
    main()
