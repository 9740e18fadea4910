"""Agreement with kronfluence 1.0.1 on the same model, data, damping and (empirical) Fisher."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deltainf.influence import EKFAC

kronfluence = pytest.importorskip("kronfluence")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from deltainf.influence.kronfluence_task import KronfluenceTask  # noqa: E402


def kronfluence_scores(model, train, queries, damping, tmp_path, dtype):
    model = prepare_model(copy.deepcopy(model), KronfluenceTask())
    analyzer = Analyzer(analysis_name="agree", model=model, task=KronfluenceTask(), cpu=True,
                        disable_tqdm=True, output_dir=str(tmp_path))
    fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    sargs = ScoreArguments(damping_factor=damping)
    if dtype == torch.float64:
        for k in ("activation_covariance_dtype", "gradient_covariance_dtype", "per_sample_gradient_dtype",
                  "lambda_dtype"):
            setattr(fargs, k, torch.float64)
        for k in ("per_sample_gradient_dtype", "precondition_dtype", "score_dtype"):
            setattr(sargs, k, torch.float64)
    analyzer.fit_all_factors("f", dataset=train, per_device_batch_size=64, factor_args=fargs,
                             overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("s", "f", query_dataset=queries, train_dataset=train,
                                     per_device_query_batch_size=len(queries), per_device_train_batch_size=128,
                                     score_args=sargs, overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("s")["all_modules"].to(torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_agree_with_kronfluence(tmp_path, dtype):
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    N = 256
    X = torch.rand(N, 3, 10, 10, generator=g).to(dtype)
    Y = torch.randint(0, 4, (N,), generator=g)
    Xq = torch.rand(5, 3, 10, 10, generator=g).to(dtype)
    Yq = torch.randint(0, 4, (5,), generator=g)
    damping = 1e-4
    ours = EKFAC(model, damping=damping, fisher="empirical", progress=False)
    ours.fit(DataLoader(TensorDataset(X, Y), batch_size=64))
    s = ours.score(Xq, Yq, DataLoader(TensorDataset(X, Y), batch_size=100)).to(torch.float64)
    k = kronfluence_scores(model, TensorDataset(X, Y), TensorDataset(Xq, Yq), damping, tmp_path, dtype)
    assert k.shape == s.shape == (5, N)
    for q in range(5):
        r = np.corrcoef(s[q].numpy(), k[q].numpy())[0, 1]
        assert r >= 0.999, (q, r)
        top_s = set(torch.topk(s[q], 100).indices.tolist())
        top_k = set(torch.topk(k[q], 100).indices.tolist())
        if dtype == torch.float64:
            assert top_s == top_k
        else:  # float32 rounding may swap near-ties at the boundary, and only those
            assert len(top_s & top_k) >= 98
            cut = float(torch.topk(k[q], 100).values[-1])
            tie = 1e-4 * float(k[q].abs().max())
            for i in top_s ^ top_k:
                assert abs(float(k[q, i]) - cut) <= tie, (q, i, float(k[q, i]), cut)
    if dtype == torch.float64:
        torch.testing.assert_close(s, k, rtol=1e-6, atol=1e-6 * float(k.abs().max()))
