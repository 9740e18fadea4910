"""Scale benchmark: EK-FAC and Δ-Influence on a model of the size users have, and the streaming path to N = 10^6.

Two studies, every configuration in a fresh child process (so peak RSS is that run's):

  python benchmarks/bench_scale.py resnet --n 128 256 [--kronfluence] [--ranks 1 2] [--device cuda]
      ResNet-18 (CIFAR variant, deltainf.models) on synthetic 3x32x32 data, empirical Fisher, batch 64:
      wall time of the covariance, eigendecomposition and lambda phases and of the score pass for 8 and
      51 queries (one affected point and its 50 copies), in units of one forward + backward pass over the
      same data (the floor, measured in the same child); kronfluence 1.0.1 side by side (same model, data,
      batch size); 1 vs 2 torchrun ranks. --fit-n M fits both engines' factors on the first M examples and
      scores all N: the score pass side by side at an N whose fit would take hours (the fit phases are then in
      units of the M examples' floor, fit_floor). (510 exact queries are not run: their preconditioned query gradients,
      Q x 11.2M float64 values, 46 GB at Q = 510, are scored in about 9 chunks on a 24 GB machine; the
      queries study below runs them with rank-k queries.)
  python benchmarks/bench_scale.py stream --n 10000 100000 1000000
      A small CNN on synthetic 3x8x8 data generated batch by batch (nothing held in memory), the whole
      Δ-Influence detection of one affected point (50 copies + 10 controls) with the scores memory-mapped
      on disk (``score_file``): time per phase and peak RSS against the size of the score file.

  python benchmarks/bench_scale.py eigen [--repeats 2]
      The eigendecompositions of ResNet-18's factors (the shapes of its 21 tracked layers; synthetic SPD
      matrices) in float64 and float32 (``EKFAC(..., eigen_dtype=...)``), alternated in one process, with the
      float32 bases' orthogonality error and eigenvalue error on the largest factor.
  python benchmarks/bench_scale.py queries --n 256
      ResNet-18 at one N: the score pass of 51 and 510 queries, exact and with rank-k queries (``query_rank``):
      the one-off query work and the pass in floor passes, and the rank-k scores' agreement with the exact ones.
  python benchmarks/bench_scale.py frontier --n 128
      ResNet-18 at one N, per cheaper EK-FAC setting (float32 eigendecompositions, factors fitted on a quarter
      of the data, the last 2 layers, the last layer): fit phases, the 8-query score pass, and the scores'
      agreement with the accurate setting (Spearman per query, overlap of each query's top 5 %). Their effect
      on detection is measured on the zoo's victims by benchmarks/zoo/frontier.py.

Results: one JSON per study (--out), and a table on stdout; benchmarks/RESULTS.md records them with the
growth fitted per phase (time ~ N^a). On a noisy shared machine read the ratios, not the seconds.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
RESNET_BATCH, STREAM_BATCH = 64, 1024


# ------------------------------------------------------------------------------------------------ data
class SyntheticBatches:
    """An unshuffled loader over N synthetic images (C, S, S) in [0, 1] with labels in [0, classes): batch b is
    generated from seed + b whenever it is read, so N can exceed memory and every pass (and rank) sees the
    same data."""

    def __init__(self, n: int, batch: int, shape: tuple, classes: int, seed: int = 0):
        self.n, self.batch, self.shape, self.classes, self.seed = n, batch, shape, classes, seed
        self.dataset = range(n)  # len() for the engines

    def __len__(self):
        return math.ceil(self.n / self.batch)

    def __iter__(self):
        for b in range(len(self)):
            size = min(self.batch, self.n - b * self.batch)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            yield torch.rand(size, *self.shape, generator=g), torch.randint(0, self.classes, (size,), generator=g)

    def materialize(self) -> torch.utils.data.TensorDataset:
        xs, ys = zip(*self)
        return torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))


def resnet(device) -> nn.Module:
    from deltainf.models import build_model

    torch.manual_seed(0)
    return build_model("resnet18", num_classes=10, in_channels=3, image_size=32).to(device).eval()


def small_cnn(device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 64, 10)).to(device).eval()


# ------------------------------------------------------------------------------------------------ children
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def floor_pass(model, loader, device) -> float:
    model = copy.deepcopy(model)
    t = time.perf_counter()
    for x, y in loader:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum").backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def child_resnet(args) -> dict:
    from deltainf import EKFAC, _dist

    device = torch.device(args.device)
    model = resnet(device)
    loader = SyntheticBatches(args.n, RESNET_BATCH, (3, 32, 32), 10)
    fit_n = min(args.fit_n or args.n, args.n)
    fit_loader = SyntheticBatches(fit_n, RESNET_BATCH, (3, 32, 32), 10)  # the first fit_n examples of loader's
    q = SyntheticBatches(51, 51, (3, 32, 32), 10, seed=99).materialize()
    out = {"n": args.n, "fit_n": fit_n, "engine": args.engine, "device": str(device)}
    rank, world = _dist.group(device)
    out["ranks"] = world
    out["floor"] = floor_pass(model, loader, device)
    out["fit_floor"] = out["floor"] if fit_n == args.n else floor_pass(model, fit_loader, device)
    if args.engine == "kronfluence":
        out.update(kronfluence_fit_and_score(model, fit_loader.materialize(), loader.materialize(), q, args))
    else:
        # eight partitions, so that two ranks share the passes (the default 4,096 examples would be one partition)
        ek = EKFAC(model, progress=False, partition_size=max(1, args.n // 8))
        ek.fit(fit_loader)
        out.update({"covariance": ek.timings["covariance"], "eigendecomposition": ek.timings["eigendecomposition"],
                    "lambda": ek.timings["lambda"]})
        for k in (8, 51):
            ek.score(q.tensors[0][:k].to(device), q.tensors[1][:k], loader)
            out[f"score_{k}"] = ek.timings["queries"] + ek.timings["score_pass"]
    rss = _dist.all_gather(peak_rss_mb(), world)
    out["peak_rss_mb"] = rss
    return out if rank == 0 else {}


def kronfluence_fit_and_score(model, fit_train, train, q, args) -> dict:
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    from deltainf.influence.kronfluence_task import KronfluenceTask

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    task = KronfluenceTask()
    km = prepare_model(copy.deepcopy(model), task)
    with tempfile.TemporaryDirectory() as work:
        an = Analyzer(analysis_name="scale", model=km, task=task, cpu=args.device == "cpu", disable_tqdm=True,
                      output_dir=work)
        fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
        t = {}
        s = time.perf_counter()
        an.fit_covariance_matrices("f", fit_train, per_device_batch_size=RESNET_BATCH, factor_args=fargs,
                                   overwrite_output_dir=True)
        t["covariance"] = time.perf_counter() - s
        s = time.perf_counter()
        an.perform_eigendecomposition("f", factor_args=fargs, overwrite_output_dir=True)
        t["eigendecomposition"] = time.perf_counter() - s
        s = time.perf_counter()
        an.fit_lambda_matrices("f", fit_train, per_device_batch_size=RESNET_BATCH, factor_args=fargs,
                               overwrite_output_dir=True)
        t["lambda"] = time.perf_counter() - s
        for k in (8, 51):
            qk = torch.utils.data.TensorDataset(q.tensors[0][:k], q.tensors[1][:k])
            s = time.perf_counter()
            an.compute_pairwise_scores(f"s{k}", "f", query_dataset=qk, train_dataset=train,
                                       per_device_query_batch_size=min(k, 64), per_device_train_batch_size=RESNET_BATCH,
                                       score_args=ScoreArguments(damping_factor=1e-8), overwrite_output_dir=True)
            t[f"score_{k}"] = time.perf_counter() - s
    return t


def child_stream(args) -> dict:
    from deltainf import DeltaInfluence, EKFAC

    device = torch.device(args.device)
    model = small_cnn(device)
    loader = SyntheticBatches(args.n, STREAM_BATCH, (3, 8, 8), 10)
    ref = SyntheticBatches(2000, 2000, (3, 8, 8), 10, seed=7).materialize().tensors
    with torch.no_grad():
        pred = model(ref[0].to(device)).argmax(1).cpu()
    x, y = ref[0][:1], pred[:1]  # the "affected" point: traced with the model's own prediction
    out = {"n": args.n, "device": str(device)}
    out["floor"] = floor_pass(model, loader, device)
    t = time.perf_counter()
    ek = EKFAC(model, progress=False).fit(loader)
    out["fit"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as work:
        store = Path(work) / "scores.npy"
        detector = DeltaInfluence(ek, model=model, domain="pixel", score_file=store)
        t = time.perf_counter()
        result = detector.detect(loader, x, y, reference=(ref[0], pred))
        out["detect"] = time.perf_counter() - t
        out["detect_timings"] = result.timings
        out["score_file_mb"] = store.stat().st_size / 2 ** 20
        out["queries"] = int(result.settings["n_transforms"]) + 1 + int(result.settings["n_controls"])
        out["flagged"] = int(result.flagged.numel())
    out["peak_rss_mb"] = [peak_rss_mb()]
    return out


# ------------------------------------------------------------------------------------------------ parent
def eigen_study(repeats: int) -> dict:
    """Seconds to eigendecompose every factor of ResNet-18 in float64 and in float32, alternated ``repeats``
    times, and the float32 error on the largest factor."""
    from deltainf.influence._layers import resolve_layers
    from deltainf.influence._linalg import eig_full

    dims = [d for info, _ in resolve_layers(resnet("cpu"), None) for d in (info.d_in_aug, info.d_out)]
    g = torch.Generator().manual_seed(0)
    mats = {}
    for d in sorted(set(dims)):
        x = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
        mats[d] = x @ x.T / (2 * d)
    seconds = {"float64": [], "float32": []}
    for _ in range(repeats):
        for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
            t0 = time.perf_counter()
            for d in dims:
                eig_full(mats[d], dtype)
            seconds[name].append(time.perf_counter() - t0)
            print(name, f"{seconds[name][-1]:.1f} s", flush=True)
    big = mats[max(dims)]
    e64, _ = eig_full(big)
    e32, v32 = eig_full(big, torch.float32)
    eye = torch.eye(big.shape[0], dtype=torch.float64)
    return {"study": "eigen", "machine": machine(), "threads": torch.get_num_threads(), "factor_dims": dims,
            "seconds": seconds, "largest": big.shape[0],
            "float32_orthogonality_error": float((v32.T @ v32 - eye).abs().max()),
            "float32_eigenvalue_error": float((e32 - e64).abs().max() / e64.abs().max())}


FRONTIER = {"accurate": {}, "float32 eigen": {"eigen_dtype": "float32"}, "fit on 1/4": {"low_rank": False},
            "last 2 layers": {}, "last layer": {}}


def agreement(scores: torch.Tensor, exact: torch.Tensor) -> dict:
    """How far approximate (Q, N) scores are from the exact ones, per query: the Spearman rank correlation, and the
    overlap of the top 5 % of training examples."""
    from scipy.stats import spearmanr

    k = max(1, scores.shape[1] // 20)
    return {"spearman": [float(spearmanr(a.numpy(), b.numpy())[0]) for a, b in zip(scores, exact)],
            "top5_overlap": [len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k
                             for a, b in zip(scores, exact)]}


def frontier_study(n: int, device: str) -> dict:
    """ResNet-18 at N examples, per cheaper setting: fit seconds per phase, the 8-query score pass, and how far its
    scores are from the accurate setting's (Spearman rank correlation per query, and the overlap of each query's
    top 5 % of training examples)."""
    from deltainf import EKFAC
    from deltainf.influence._layers import resolve_layers

    device = torch.device(device)
    model = resnet(device)
    loader = SyntheticBatches(n, RESNET_BATCH, (3, 32, 32), 10)
    q = SyntheticBatches(8, 8, (3, 32, 32), 10, seed=99).materialize()
    rows, exact = [], None
    floor = floor_pass(model, loader, device)
    for setting, options in FRONTIER.items():
        if setting.startswith("last"):
            names = [info.name for info, _ in resolve_layers(model, None)]  # every layer EK-FAC tracks by default
            options = {"modules": names[-(2 if setting == "last 2 layers" else 1):]}
        fit_loader = SyntheticBatches(n // 4, RESNET_BATCH, (3, 32, 32), 10) if setting == "fit on 1/4" else loader
        ek = EKFAC(model, progress=False, **options).fit(fit_loader)
        row = {"setting": setting, "floor": floor, **ek.timings, "fit": sum(ek.timings.values())}
        scores = ek.score(q.tensors[0].to(device), q.tensors[1], loader).double().cpu()
        row["score_8"] = ek.timings["queries"] + ek.timings["score_pass"]
        if exact is None:
            exact = scores
        row.update(agreement(scores, exact))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"study": "frontier", "machine": machine(), "threads": torch.get_num_threads(), "n": n, "rows": rows}


QUERY_RANKS = (32, 8)


def queries_study(n: int, device: str) -> dict:
    """ResNet-18 at N examples: the score pass of 51 and 510 queries, exact and with rank-k queries
    (``EKFAC(..., query_rank=k)``). Per run: the one-off query work (preconditioning, and the truncated SVDs with a
    rank) and the pass over the training set, each in seconds and in floor passes, the number of passes (exact
    queries that do not fit in memory at once are scored in chunks, one pass each), and, with 51 queries, how far the
    scores are from the exact ones (Spearman rank correlation per query, overlap of each query's top 5 %). 510 exact
    queries are not run (their chunks: ``passes`` of the 51-query pass each)."""
    from deltainf import EKFAC

    device = torch.device(device)
    model = resnet(device)
    loader = SyntheticBatches(n, RESNET_BATCH, (3, 32, 32), 10)
    q = SyntheticBatches(510, 510, (3, 32, 32), 10, seed=99).materialize()
    floor = floor_pass(model, loader, device)
    fitted = EKFAC(model, progress=False).fit(loader)
    fit = dict(fitted.timings)
    rows, exact = [], None
    for count, rank in [(51, None), *((51, k) for k in QUERY_RANKS), *((510, k) for k in QUERY_RANKS)]:
        ek = EKFAC(model, progress=False, query_rank=rank)
        ek.factors, ek._fit_examples = fitted.factors, fitted._fit_examples
        scores = ek.score(q.tensors[0][:count].to(device), q.tensors[1][:count], loader).double().cpu()
        row = {"queries": count, "query_rank": rank, "query_seconds": ek.timings["queries"],
               "pass_seconds": ek.timings["score_pass"], "passes": ek.score_passes,
               "chunks_if_exact": -(-count // fitted.query_chunk(count))}
        if count == 51 and rank is None:
            exact = scores
        elif count == 51:
            row.update(agreement(scores, exact))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"study": "queries", "machine": machine(), "threads": torch.get_num_threads(), "n": n, "floor": floor,
            "fit": fit, "rows": rows, "peak_rss_mb": peak_rss_mb()}


def run_child(study: str, n: int, engine: str, ranks: int, device: str, threads: int, fit_n: int = 0) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    # --size, not --n: torchrun would take an abbreviation of its own options for itself
    cmd = [sys.executable, str(HERE), "child", study, "--size", str(n), "--engine", engine, "--device", device,
           "--threads", str(threads), "--fit-n", str(fit_n)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *cmd[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def machine() -> dict:
    import deltainf

    return {"python": platform.python_version(), "torch": torch.__version__, "deltainf": deltainf.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def growth(rows: list[dict], key: str) -> float | None:
    """Exponent a of time ~ N^a, least squares on log-log over the rows that have ``key``."""
    pts = [(math.log(r["n"]), math.log(r[key])) for r in rows if r.get(key)]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)


def table(study: str, rows: list[dict]) -> str:
    if study == "resnet":
        keys = ["covariance", "eigendecomposition", "lambda", "score_8", "score_51"]
        lines = ["| engine | ranks | N (fitted on) | floor s | " + " | ".join(f"{k} (floors)" for k in keys)
                 + " | peak RSS MB |", "|---" * (5 + len(keys)) + "|"]
        for r in rows:
            # the fit phases in floors of the examples they ran on
            unit = {k: r.get("fit_floor", r["floor"]) if not k.startswith("score") else r["floor"] for k in keys}
            cells = [f"{r[k]:.0f} s ({r[k] / unit[k]:.1f})" if r.get(k) else "—" for k in keys]
            size = f"{r['n']}" if r.get("fit_n", r["n"]) == r["n"] else f"{r['n']} ({r['fit_n']})"
            lines.append(f"| {r['engine']} | {r['ranks']} | {size} | {r['floor']:.0f} | " + " | ".join(cells)
                         + f" | {' / '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} |")
        return "\n".join(lines)
    lines = ["| N | floor s | fit s (floors) | detect s (floors) | queries | score file MB | peak RSS MB "
             "| RSS - file MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = r["peak_rss_mb"][0]
        lines.append(f"| {r['n']:,} | {r['floor']:.1f} | {r['fit']:.1f} ({r['fit'] / r['floor']:.1f}) | "
                     f"{r['detect']:.1f} ({r['detect'] / r['floor']:.1f}) | {r['queries']} | "
                     f"{r['score_file_mb']:.0f} | {rss:.0f} | {rss - r['score_file_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=["resnet", "stream", "eigen", "frontier", "queries", "child"])
    ap.add_argument("child_study", nargs="?", choices=["resnet", "stream"])
    ap.add_argument("--n", type=int, nargs="+", help="training set sizes")
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)  # one size, for a child
    ap.add_argument("--engine", default="deltainf", choices=["deltainf", "kronfluence"])
    ap.add_argument("--kronfluence", action="store_true", help="also run kronfluence (resnet study)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path)
    ap.add_argument("--fit-n", type=int, default=0,
                    help="resnet study: fit the factors on the first M examples only, score all N (0: all N)")
    ap.add_argument("--repeats", type=int, default=2, help="eigen study: float64 / float32 alternations")
    args = ap.parse_args(argv)
    if args.study in ("eigen", "frontier", "queries"):
        torch.set_num_threads(args.threads)
        if args.study != "eigen" and (not args.n or len(args.n) != 1):
            ap.error(f"--n: the {args.study} study takes one training set size")
        report = eigen_study(args.repeats) if args.study == "eigen" else \
            (frontier_study if args.study == "frontier" else queries_study)(args.n[0], args.device)
        print(json.dumps({k: v for k, v in report.items() if k != "factor_dims"}))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
        return
    if args.study == "child":
        torch.set_num_threads(args.threads)
        args.n = args.size
        result = (child_resnet if args.child_study == "resnet" else child_stream)(args)
        if result:
            print(json.dumps(result))
        from deltainf import _dist

        _dist.shutdown()
        return
    if not args.n:
        ap.error("--n: give one or more training set sizes")
    rows = []
    for n in args.n:
        for ranks in args.ranks:
            engines = ["deltainf"] + (["kronfluence"] if args.kronfluence and ranks == 1 else [])
            for engine in engines if args.study == "resnet" else ["deltainf"]:
                # each rank gets its share of the cores, so 1 and 2 ranks use the same machine
                threads = max(1, args.threads // ranks)
                row = run_child(args.study, n, engine, ranks, args.device, threads, args.fit_n)
                row["threads_per_rank"] = threads
                rows.append(row)
                print(json.dumps(row), flush=True)
    keys = ["covariance", "eigendecomposition", "lambda", "score_8", "score_51"] if args.study == "resnet" \
        else ["fit", "detect"]
    fits = {k: growth([r for r in rows if r.get("engine", "deltainf") == "deltainf" and r.get("ranks", 1) == 1], k)
            for k in keys}
    report = {"study": args.study, "machine": machine(), "rows": rows, "growth_exponent": fits}
    print(table(args.study, rows))
    print("growth exponents (time ~ N^a):", {k: None if v is None else round(v, 2) for k, v in fits.items()})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
