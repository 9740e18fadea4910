"""Each peer's own path against the same peer through deltainf (deltainf.integrations), one run, side by side.

    python benchmarks/bench_integrations.py --out benchmarks/results/integrations.json

* kronfluence 1.0.1: its fit (fit_all_factors) + its scoring, against deltainf's fit written as a kronfluence
  folder (write_factors) + kronfluence's scoring, and against kronfluence's folder read into deltainf
  (read_factors) + deltainf's scoring; score agreement (Pearson, top-100) for both round trips.
* traker 0.3.2: the projection of TRAK's per-parameter gradients (500 examples) and TRAKer's whole featurisation,
  traker's BasicProjector against deltainf's TRAKProjector, k = 256, 1024, 2048.
* dattri 0.3.0: IFAttributorEKFAC cache + attribute against deltainf's EKFACAttributor.

A small convolutional network on synthetic 3x16x16 data (the shapes the peers' CPU paths handle in minutes);
wall seconds of one run each, on a shared machine: read the ratios.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N, Q, BATCH = 2000, 16, 100


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(),
                          nn.Linear(64, 10)).eval()
    g = torch.Generator().manual_seed(1)
    train = TensorDataset(torch.rand(N, 3, 16, 16, generator=g), torch.randint(0, 10, (N,), generator=g))
    queries = TensorDataset(torch.rand(Q, 3, 16, 16, generator=g), torch.randint(0, 10, (Q,), generator=g))
    return model, train, queries


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    r = [float(np.corrcoef(a[q].numpy(), b[q].numpy())[0, 1]) for q in range(a.shape[0])]
    top = [len(set(torch.topk(a[q], 100).indices.tolist()) & set(torch.topk(b[q], 100).indices.tolist()))
           for q in range(a.shape[0])]
    return {"pearson_min": min(r), "pearson_mean": float(np.mean(r)), "top100_overlap_min": min(top)}


def kronfluence_study(model, train, queries) -> dict:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    from deltainf import EKFAC
    from deltainf.influence.kronfluence_task import KronfluenceTask
    from deltainf.integrations.kronfluence import read_factors, write_factors

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    work = tempfile.mkdtemp()
    an = Analyzer(analysis_name="b", model=prepare_model(copy.deepcopy(model), KronfluenceTask()),
                  task=KronfluenceTask(), cpu=True, disable_tqdm=True, output_dir=work)

    def kf_scores(factors):
        an.compute_pairwise_scores(f"s_{factors}", factors, query_dataset=queries, train_dataset=train,
                                   per_device_query_batch_size=Q, per_device_train_batch_size=BATCH,
                                   score_args=ScoreArguments(damping_factor=1e-8), overwrite_output_dir=True)
        return an.load_pairwise_scores(f"s_{factors}")["all_modules"]

    out = {}
    out["kronfluence_fit_s"], _ = timed(lambda: an.fit_all_factors(
        "kf", dataset=train, per_device_batch_size=BATCH,
        factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True), overwrite_output_dir=True))
    out["kronfluence_score_s"], theirs = timed(lambda: kf_scores("kf"))
    loader = DataLoader(train, batch_size=BATCH)
    out["deltainf_fit_s"], ekfac = timed(lambda: EKFAC(model, low_rank=False, progress=False).fit(loader))
    out["write_factors_s"], _ = timed(lambda: write_factors(ekfac, Path(work) / "b" / "factors_ours"))
    out["kronfluence_score_of_deltainf_factors_s"], theirs_on_ours = timed(lambda: kf_scores("ours"))
    ours = ekfac.score(*queries.tensors, loader)
    out["read_factors_s"], read = timed(lambda: read_factors(Path(work) / "b" / "factors_kf", model, progress=False))
    out["deltainf_score_of_kronfluence_factors_s"], ours_on_theirs = timed(lambda: read.score(*queries.tensors,
                                                                                              loader))
    out["kronfluence_factors_scored_by_deltainf_vs_kronfluence"] = agreement(ours_on_theirs, theirs)
    out["deltainf_factors_scored_by_kronfluence_vs_deltainf"] = agreement(theirs_on_ours, ours)
    out["ratio_fit_kronfluence_over_deltainf"] = out["kronfluence_fit_s"] / out["deltainf_fit_s"]
    out["ratio_score_kronfluence_over_deltainf"] = (out["kronfluence_score_s"]
                                                   / out["deltainf_score_of_kronfluence_factors_s"])
    return out


def trak_study(model, train, ks=(256, 1024, 2048)) -> dict:
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    from deltainf.integrations.trak import TRAKProjector

    grad_dim = sum(p.numel() for p in model.parameters())

    def featurize(projector, k):
        tr = TRAKer(model=model, task="image_classification", train_set_size=N, save_dir=tempfile.mkdtemp(),
                    device="cpu", projector=projector, proj_dim=k, use_half_precision=False)
        tr.load_checkpoint(model.state_dict(), model_id=0)
        x, y = train.tensors
        for i in range(0, N, 500):
            tr.featurize(batch=(x[i:i + 500], y[i:i + 500]), num_samples=500)
        tr.finalize_features()

    def project_only(projector) -> float:
        # the projection alone, on TRAK's dict of per-parameter gradients of 500 examples
        grads = {n: torch.randn(500, *p.shape) for n, p in model.named_parameters()}
        projector.project(grads, model_id=0)
        t = time.perf_counter()
        for _ in range(3):
            projector.project(grads, model_id=0)
        return (time.perf_counter() - t) / 3

    out = {"grad_dim": grad_dim, "rows": []}
    for k in ks:
        theirs, ours = BasicProjector(grad_dim, k, 0, ProjectionType.rademacher, "cpu"), TRAKProjector(grad_dim, k)
        row = {"k": k, "project_500_traker_s": project_only(theirs), "project_500_deltainf_s": project_only(ours)}
        row["featurize_traker_s"], _ = timed(lambda: featurize(theirs, k))
        row["featurize_deltainf_s"], _ = timed(lambda: featurize(ours, k))
        row["ratio_projection"] = row["project_500_traker_s"] / row["project_500_deltainf_s"]
        row["ratio_featurize"] = row["featurize_traker_s"] / row["featurize_deltainf_s"]
        out["rows"].append(row)
    return out


def dattri_study(model, train, queries) -> dict:
    from dattri.algorithm.influence_function import IFAttributorEKFAC
    from dattri.task import AttributionTask

    from deltainf.integrations.dattri import EKFACAttributor

    def loss_func(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    loader, test = DataLoader(train, batch_size=BATCH), DataLoader(queries, batch_size=Q)
    out = {}
    theirs = IFAttributorEKFAC(task, damping=1e-3 / BATCH ** 2)
    out["dattri_cache_s"], _ = timed(lambda: theirs.cache(loader))
    out["dattri_attribute_s"], t = timed(lambda: theirs.attribute(loader, test))
    ours = EKFACAttributor(task, measurement="ce", damping=1e-3)
    out["deltainf_cache_s"], _ = timed(lambda: ours.cache(loader))
    out["deltainf_attribute_s"], s = timed(lambda: ours.attribute(loader, test))
    out["abs_pearson_per_query"] = [abs(float(np.corrcoef(s[:, q].numpy(), t[:, q].detach().numpy())[0, 1]))
                                    for q in range(Q)]
    out["ratio_total_dattri_over_deltainf"] = ((out["dattri_cache_s"] + out["dattri_attribute_s"])
                                               / (out["deltainf_cache_s"] + out["deltainf_attribute_s"]))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, train, queries = model_and_data()
    report = {"n_train": N, "queries": Q, "threads": args.threads, "torch": torch.__version__,
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    for name, study in (("kronfluence", lambda: kronfluence_study(model, train, queries)),
                        ("trak", lambda: trak_study(model, train)),
                        ("dattri", lambda: dattri_study(model, train, queries))):
        report[name] = study()
        print(name, json.dumps(report[name], indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
