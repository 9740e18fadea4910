"""EK-FAC influence engine vs kronfluence 1.0.1 and vs the floor (one forward+backward pass).

Model: Conv(3->32, 3x3, pad 1) ReLU MaxPool2 Conv(32->64, 3x3, pad 1) ReLU MaxPool2 Flatten
Linear(4096->128) ReLU Linear(128->10); N synthetic 32x32x3 examples (default 2,000).

Stages timed (wall seconds, median over --repeats for ours and the floor, one run for kronfluence):
  floor          one forward + backward (loss.backward, parameter gradients) over the training set
  covariance     A and S pass                     (ours / kronfluence fit_covariance_matrices)
  eigen          eigendecomposition               (ours / kronfluence perform_eigendecomposition)
  lambda         eigenvalue-correction pass       (ours / kronfluence fit_lambda_matrices)
  score_8        8 queries, one pass              (ours / kronfluence compute_pairwise_scores)
  score_51       51 queries, one pass
  score_51x1     51 single-query passes (kronfluence, as the paper's code ran it; extrapolated from
                 --single-passes passes)

Run:  nice python benchmarks/bench_ekfac.py --out bench_ekfac.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from deltainf._files import write_json
from deltainf.influence import EKFAC
from deltainf.influence import _contract as C


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4096, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


class Indexed(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def floor_pass(model, loader):
    model = copy.deepcopy(model)
    for x, y, _ in loader:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="sum").backward()


# ----------------------------------------------------------------------------- kronfluence
def run_kronfluence(model, train, q8, q51, args, workdir):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from deltainf.influence.kronfluence_task import KronfluenceTask

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    fisher_empirical = args.fisher == "empirical"

    task = KronfluenceTask()
    km = prepare_model(copy.deepcopy(model), task)
    an = Analyzer(analysis_name="bench", model=km, task=task, cpu=True, disable_tqdm=not args.progress,
                  output_dir=workdir)
    fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=fisher_empirical)
    sargs = ScoreArguments(damping_factor=args.damping)
    bs = args.batch_size
    t = {}
    t["covariance"], _ = timed(lambda: an.fit_covariance_matrices("f", train, per_device_batch_size=bs,
                                                                  factor_args=fargs, overwrite_output_dir=True))
    t["eigen"], _ = timed(lambda: an.perform_eigendecomposition("f", factor_args=fargs, overwrite_output_dir=True))
    t["lambda"], _ = timed(lambda: an.fit_lambda_matrices("f", train, per_device_batch_size=bs,
                                                          factor_args=fargs, overwrite_output_dir=True))

    def pairwise(name, qds):
        an.compute_pairwise_scores(name, "f", query_dataset=qds, train_dataset=train,
                                   per_device_query_batch_size=len(qds), per_device_train_batch_size=bs,
                                   score_args=sargs, overwrite_output_dir=True)
        return an.load_pairwise_scores(name)["all_modules"]

    t["score_8"], s8 = timed(lambda: pairwise("s8", q8))
    t["score_51"], _ = timed(lambda: pairwise("s51", q51))
    singles = []
    for j in range(args.single_passes):
        one = torch.utils.data.Subset(q51, [j])
        singles.append(timed(lambda: pairwise(f"s1_{j}", one))[0])
    t["score_single_mean"] = statistics.mean(singles)
    t["score_51x1"] = t["score_single_mean"] * 51
    return t, s8


# ----------------------------------------------------------------------------- ours
def run_ours(model, loader, q8x, q8y, q51x, q51y, args):
    ek = EKFAC(model, damping=args.damping, fisher=args.fisher, progress=args.progress)
    ek.fit(loader)
    t = {"covariance": ek.timings["covariance"], "eigen": ek.timings["eigendecomposition"],
         "lambda": ek.timings["lambda"]}
    s8 = ek.score(q8x, q8y, loader)
    t["score_8"] = sum(ek.timings.values())
    t["score_8_queries"] = ek.timings["queries"]
    ek.score(q51x, q51y, loader)
    t["score_51"] = sum(ek.timings.values())
    t["score_51_queries"] = ek.timings["queries"]
    return t, s8, ek


def profile_ours(model, loader, q8x, q8y, args, top: int):
    from torch.profiler import ProfilerActivity, profile

    ek = EKFAC(model, damping=args.damping, fisher=args.fisher, progress=False)
    report = {}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ek.fit(loader)
    report["fit"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ek.score(q8x, q8y, loader)
    report["score_8"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return report


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__),
                                       text=True).strip()
    except Exception:
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="training examples")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--damping", type=float, default=1e-8)
    p.add_argument("--fisher", choices=["true", "empirical"], default="true")
    p.add_argument("--repeats", type=int, default=3, help="runs of ours and of the floor (median)")
    p.add_argument("--single-passes", type=int, default=3, help="single-query kronfluence passes to time")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--skip-kronfluence", action="store_true")
    p.add_argument("--profile", type=int, default=0, help="print the top-k ops of our fit and score")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default=None, help="write results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    X = torch.rand(args.n, 3, 32, 32, generator=g)
    Y = torch.randint(0, 10, (args.n,), generator=g)
    Xq = torch.rand(51, 3, 32, 32, generator=g)
    Yq = torch.randint(0, 10, (51,), generator=g)
    train = Indexed(X, Y)
    loader = DataLoader(train, batch_size=args.batch_size)

    floors, ours_runs, ek, s8_ours = [], [], None, None
    for _ in range(args.repeats):  # interleave so that machine-load drift hits both alike
        floors.append(timed(lambda: floor_pass(model, loader))[0])
        t, s8_ours, ek = run_ours(model, loader, Xq[:8], Yq[:8], Xq, Yq, args)
        ours_runs.append(t)
    floor = statistics.median(floors)
    ours = {k: statistics.median(r[k] for r in ours_runs) for k in ours_runs[0]}
    ours["fit"] = ours["covariance"] + ours["eigen"] + ours["lambda"]
    # the same scores forced through the eigenbasis kernel route (ops.kron_project_score) everywhere
    forced = EKFAC(model, damping=args.damping, fisher=args.fisher, score_path="kernel", progress=args.progress)
    forced.factors, forced._fit_examples, forced._fitted_weights = ek.factors, ek._fit_examples, ek._fitted_weights
    kernel_route = {}
    for q, (qx, qy) in {"score_8": (Xq[:8], Yq[:8]), "score_51": (Xq, Yq)}.items():
        s_k = forced.score(qx, qy, loader)
        kernel_route[q] = sum(forced.timings.values())
        if q == "score_8":
            kernel_route["max_rel_diff_vs_auto"] = float((s_k - s8_ours).abs().max() / s8_ours.abs().max())
    routes = {}
    tokens = {"0": 1024, "3": 256, "7": 1, "9": 1}
    for name, f in ek.factors.items():
        T, d_out, D = tokens[name], f.info.d_out, f.info.d_in_aug
        r_out, r_in = f.lam.shape
        routes[name] = {"Q_A": list(f.Q_A.shape), "Q_S": list(f.Q_S.shape),
                        "lambda": C.rotate_cost(T, d_out, D, r_out, r_in)[1],
                        "score_8": C.score_plan(T, d_out, D, r_out, r_in, 8)[1],
                        "score_51": C.score_plan(T, d_out, D, r_out, r_in, 51)[1]}

    kron, corr = None, None
    if not args.skip_kronfluence:
        with tempfile.TemporaryDirectory() as wd:
            kron, s8_kron = run_kronfluence(model, TensorDataset(X, Y), TensorDataset(Xq[:8], Yq[:8]),
                                            TensorDataset(Xq, Yq), args, wd)
        kron["fit"] = kron["covariance"] + kron["eigen"] + kron["lambda"]
        a, b = s8_ours.double(), s8_kron.double()
        corr = [float(torch.corrcoef(torch.stack([a[q], b[q]]))[0, 1]) for q in range(8)]
        k_top = min(100, a.shape[1])  # top-100 overlap (all of them for a tiny smoke run)
        top = [len(set(torch.topk(a[q], k_top).indices.tolist()) & set(torch.topk(b[q], k_top).indices.tolist()))
               for q in range(8)]

    rows = ["covariance", "eigen", "lambda", "fit", "score_8", "score_51", "score_51x1"]
    print(f"\nEK-FAC benchmark: N={args.n}, batch {args.batch_size}, fisher={args.fisher}, damping={args.damping}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"floor (forward+backward over the training set): {floor:.2f} s  (runs: "
          f"{', '.join(f'{f:.2f}' for f in floors)})")
    print(f"{'stage':<12}{'ours s':>10}{'kron s':>10}{'kron/ours':>11}{'ours/floor':>12}")
    for r in rows:
        o = ours.get(r if r != "score_51x1" else "score_51")
        k = kron.get(r) if kron else None
        ratio = f"{k / o:>11.1f}" if k is not None else f"{'-':>11}"
        print(f"{r:<12}{o:>10.2f}{(f'{k:.2f}' if k is not None else '-'):>10}{ratio}{o / floor:>12.2f}")
    targets = {
        "fit_vs_kron>=5": (kron["fit"] / ours["fit"] >= 5) if kron else None,
        "lambda_vs_kron>=10": (kron["lambda"] / ours["lambda"] >= 10) if kron else None,
        "covariance_vs_floor<=1.5": ours["covariance"] / floor <= 1.5,
        "score_8_vs_floor<=1.5": ours["score_8"] / floor <= 1.5,
        "score_51_vs_kron_51x1>=30": (kron["score_51x1"] / ours["score_51"] >= 30) if kron else None,
    }
    for q in ("score_8", "score_51"):
        t_k = kernel_route[q]
        print(f"{q + ' forced kernel route':<30}{t_k:>8.2f} s ({t_k / floor:.2f}x floor)")
    print("routes per layer:", json.dumps(routes))
    print("targets:", json.dumps(targets))
    if corr is not None:
        print(f"8-query scores vs kronfluence: Pearson min {min(corr):.5f} mean {statistics.mean(corr):.5f}; "
              f"top-100 overlap min {min(top)}")
    prof = profile_ours(model, loader, Xq[:8], Yq[:8], args, args.profile) if args.profile else None
    if prof:
        for k, v in prof.items():
            print(f"\n--- profile of our {k} (top {args.profile} ops by self CPU time) ---\n{v}")
    if args.out:
        result = {
            "config": vars(args), "torch": torch.__version__, "python": sys.version.split()[0],
            "threads": torch.get_num_threads(), "machine": platform.machine(), "git_commit": git_commit(),
            "loadavg_end": os.getloadavg(), "floor": floor, "floor_runs": floors, "ours": ours,
            "ours_runs": ours_runs, "kronfluence": kron, "targets": targets,
            "pearson_vs_kronfluence": corr, "top100_overlap_vs_kronfluence": top if kron else None,
            "kernel_route": kernel_route, "routes": routes,
            "profile": prof,
        }
        write_json(args.out, result, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
