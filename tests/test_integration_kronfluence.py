"""deltainf.integrations.kronfluence: factor folders both ways, scores equal across the two libraries."""
from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deltainf import EKFAC

pytest.importorskip("kronfluence")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402

from deltainf.influence.kronfluence_task import KronfluenceTask  # noqa: E402
from deltainf.integrations.kronfluence import read_factors, task_loss, task_measurement, write_factors  # noqa: E402

N, Q = 300, 4
DAMPING = 1e-4


@pytest.fixture(scope="module")
def setup():
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    g = torch.Generator().manual_seed(1)
    train = TensorDataset(torch.rand(N, 3, 10, 10, generator=g), torch.randint(0, 4, (N,), generator=g))
    queries = TensorDataset(torch.rand(Q, 3, 10, 10, generator=g), torch.randint(0, 4, (Q,), generator=g))
    return model, train, queries


def analyzer(model, folder):
    km = prepare_model(copy.deepcopy(model), KronfluenceTask())
    return Analyzer(analysis_name="bridge", model=km, task=KronfluenceTask(), cpu=True, disable_tqdm=True,
                    output_dir=str(folder))


def kronfluence_scores(an, factors_name, train, queries):
    an.compute_pairwise_scores(f"s_{factors_name}", factors_name, query_dataset=queries, train_dataset=train,
                               per_device_query_batch_size=Q, per_device_train_batch_size=100,
                               score_args=ScoreArguments(damping_factor=DAMPING), overwrite_output_dir=True)
    return an.load_pairwise_scores(f"s_{factors_name}")["all_modules"].to(torch.float64)


def assert_same_scores(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Pearson >= 0.9999 per query and the same top-100 (up to float32 near-ties at the boundary)."""
    corr = []
    for q in range(a.shape[0]):
        r = float(np.corrcoef(a[q].numpy(), b[q].numpy())[0, 1])
        assert r >= 0.9999, (q, r)
        corr.append(r)
        top_a, top_b = (set(torch.topk(s[q], 100).indices.tolist()) for s in (a, b))
        cut, tie = float(torch.topk(b[q], 100).values[-1]), 1e-4 * float(b[q].abs().max())
        assert all(abs(float(b[q, i]) - cut) <= tie for i in top_a ^ top_b), (q, top_a ^ top_b)
    return corr


def test_kronfluence_factors_score_the_same_in_deltainf(setup, tmp_path):
    model, train, queries = setup
    an = analyzer(model, tmp_path)
    an.fit_all_factors("kf", dataset=train, per_device_batch_size=64,
                       factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
                       overwrite_output_dir=True)
    theirs = kronfluence_scores(an, "kf", train, queries)
    ekfac = read_factors(tmp_path / "bridge" / "factors_kf", model, damping=DAMPING, progress=False)
    assert ekfac.config.fisher == "empirical" and set(ekfac.layer_names) == {"0", "3", "6", "8"}
    ours = ekfac.score(*queries.tensors, DataLoader(train, batch_size=100)).to(torch.float64)
    assert_same_scores(ours, theirs)


def test_deltainf_factors_score_the_same_in_kronfluence(setup, tmp_path):
    model, train, queries = setup
    ekfac = EKFAC(model, damping=DAMPING, low_rank=False, progress=False).fit(DataLoader(train, batch_size=64))
    ours = ekfac.score(*queries.tensors, DataLoader(train, batch_size=100)).to(torch.float64)
    folder = write_factors(ekfac, tmp_path / "bridge" / "factors_ours")
    assert json.loads((folder / "factor_arguments.json").read_text())["use_empirical_fisher"] is True
    theirs = kronfluence_scores(analyzer(model, tmp_path), "ours", train, queries)
    assert_same_scores(theirs, ours)
    # and back: the folder reads into the same factors
    again = read_factors(folder, model, damping=DAMPING, progress=False)
    for name, f in ekfac.factors.items():
        g = again.factors[name]
        torch.testing.assert_close(g.lam, f.lam, rtol=1e-12, atol=0)
        assert torch.equal(g.Q_A, f.Q_A) and torch.equal(g.Q_S, f.Q_S)


class _SequenceFirst(nn.Module):
    """A linear layer over the rows of a (B, 1, 4, 4) input taken sequence-first, (4, B, 4), then a head."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Linear(4, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.tok(x[:, 0].transpose(0, 1))).mean(0))


def test_sequence_first_factors_read_back_score_as_fitted(tmp_path):
    """A folder read back holds no batch axes (kronfluence's format has none): the first queries find them, so a
    sequence-first layer scored in batches of 4 (its sequence length) is not read along its positions; writing it
    says that kronfluence itself reads the layer batch-first."""
    torch.manual_seed(0)
    model = _SequenceFirst().to(torch.float64).eval()
    g = torch.Generator().manual_seed(2)
    train = TensorDataset(torch.rand(40, 1, 4, 4, generator=g, dtype=torch.float64),
                          torch.randint(0, 4, (40,), generator=g))
    qx, qy = train.tensors[0][:4], train.tensors[1][:4]
    ekfac = EKFAC(model, damping=DAMPING, low_rank=False, progress=False).fit(DataLoader(train, batch_size=4))
    assert ekfac._batch_axes == {"tok": 1}
    ours = ekfac.score(qx, qy, DataLoader(train, batch_size=4))
    with pytest.warns(UserWarning, match=r"layers \['tok'\] take sequence-first"):
        folder = write_factors(ekfac, tmp_path / "f")
    again = read_factors(folder, model, damping=DAMPING, progress=False)
    torch.testing.assert_close(again.score(qx, qy, DataLoader(train, batch_size=4)), ours, rtol=1e-10, atol=0)


def test_factors_written_for_other_weights_are_refused(setup, tmp_path):
    """A folder written by write_factors names the weights it was fitted on: read into the same architecture with
    other weights, its scores were another preconditioner's (Pearson 0.22 with a refit in a probe) without a word."""
    model, train, queries = setup
    ekfac = EKFAC(model, damping=DAMPING, low_rank=False, progress=False).fit(DataLoader(train, batch_size=64))
    folder = write_factors(ekfac, tmp_path / "f")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(1.01)
    with pytest.raises(ValueError, match="model: its weights differ from those the factors in .* were fitted on"):
        read_factors(folder, other, damping=DAMPING, progress=False)
    with pytest.warns(UserWarning, match="its weights differ"):
        read_factors(folder, other, damping=DAMPING, progress=False, strict=False)
    assert not read_factors(folder, model, damping=DAMPING, progress=False).weights_changed


def test_padding_kronfluence_does_not_build_is_said(tmp_path):
    """kronfluence builds a convolution's patches with zero padding: a reflect-padded layer's scores were 11-39 %
    apart between the libraries (deltainf's match autograd's), and the folders crossed without a word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    data = TensorDataset(torch.rand(30, 3, 6, 6), torch.randint(0, 3, (30,)))
    ekfac = EKFAC(model, damping=DAMPING, low_rank=False, progress=False).fit(DataLoader(data, batch_size=10))
    with pytest.warns(UserWarning, match=r"layers \['0'\] pad with \['reflect'\], kronfluence with zeros"):
        folder = write_factors(ekfac, tmp_path / "f")
    with pytest.warns(UserWarning, match=r"layers \['0'\] pad with \['reflect'\]"):
        read_factors(folder, model, damping=DAMPING, progress=False)


def test_truncated_factors_are_not_written(setup, tmp_path):
    model, train, _ = setup
    small = TensorDataset(*(t[:20] for t in train.tensors))  # 20 rows < the linear layer's 33 inputs
    ekfac = EKFAC(model, progress=False).fit(DataLoader(small, batch_size=20))
    with pytest.raises(ValueError, match="low_rank=False"):
        write_factors(ekfac, tmp_path / "f")


@pytest.mark.parametrize("first", ["embedding", "conv1d", "depthwise"])
def test_factors_of_layers_kronfluence_does_not_track_are_not_written(tmp_path, first):
    """kronfluence tracks no nn.Embedding, no nn.Conv1d and no grouped convolution: a folder with their factors would
    stop kronfluence's scoring, or be read as a module it wraps otherwise."""
    if first == "embedding":
        model = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 2)).double()
        ids, y = torch.randint(0, 7, (30, 2)), torch.randint(0, 2, (30,))
    elif first == "conv1d":
        model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Flatten(), nn.Linear(6, 2)).double()
        ids, y = torch.randn(30, 2, 2, dtype=torch.float64), torch.randint(0, 2, (30,))
    else:
        model = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2), nn.Flatten(), nn.Linear(8, 2)).double()
        ids, y = torch.randn(30, 2, 2, 2, dtype=torch.float64), torch.randint(0, 2, (30,))
    ekfac = EKFAC(model, low_rank=False, progress=False).fit(DataLoader(TensorDataset(ids, y), batch_size=10))
    with pytest.raises(ValueError, match=r"^ekfac: it tracks \['0'\] \(nn.Embedding, nn.Conv1d or grouped "
                                         r"convolutions\), and kronfluence tracks only"):
        write_factors(ekfac, tmp_path / "f")
    assert not (tmp_path / "f").exists()
    write_factors(EKFAC(model, modules=["2"], low_rank=False, progress=False)
                  .fit(DataLoader(TensorDataset(ids, y), batch_size=10)), tmp_path / "f")


def test_read_factors_names_the_problem(setup, tmp_path):
    model, train, _ = setup
    with pytest.raises(ValueError, match="not a folder"):
        read_factors(tmp_path / "missing", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no activation_eigenvectors.safetensors"):
        read_factors(tmp_path / "empty", model)
    ekfac = EKFAC(model, low_rank=False, progress=False).fit(DataLoader(train, batch_size=100))
    folder = write_factors(ekfac, tmp_path / "ours")
    other = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))
    with pytest.raises(ValueError, match="gradient_eigenvectors\\['8'\\] has shape"):
        read_factors(folder, other)
    with pytest.raises(ValueError, match="^model: does not have the modules of the factors"):
        read_factors(folder, nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)))  # '0' is a Flatten here
    with pytest.raises(ValueError, match="^damping: "):  # an option's error names it (was: "does not have the modules")
        read_factors(folder, model, damping=-1.0)
    # values no fit produces (NaN eigenvectors gave NaN scores, a negative Lambda wrong ones) are refused as
    # EKFAC.load refuses them
    from safetensors.torch import load_file, save_file

    lam = load_file(folder / "lambda_matrix.safetensors")
    save_file({k: -v.abs() - 1 for k, v in lam.items()}, folder / "lambda_matrix.safetensors")
    with pytest.raises(ValueError, match="has non-finite \\[\\] or negative Lambda values, which no fit produces"):
        read_factors(folder, model)
    save_file(lam, folder / "lambda_matrix.safetensors")
    vecs = load_file(folder / "activation_eigenvectors.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in vecs.items()},
              folder / "activation_eigenvectors.safetensors")
    with pytest.raises(ValueError, match="has non-finite \\['activation_eigenvectors'\\]"):
        read_factors(folder, model)
    save_file(vecs, folder / "activation_eigenvectors.safetensors")
    arguments = folder / "factor_arguments.json"
    for text, message in (('{"strategy": "ek', "is not readable JSON"), ("[1, 2]", "holds a list, not kronfluence's")):
        arguments.write_text(text)
        with pytest.raises(ValueError, match=f"^folder .*: factor_arguments.json {message}"):
            read_factors(folder, model)
    with pytest.raises(TypeError, match="^ekfac: expected a fitted deltainf.EKFAC, got dict"):
        write_factors({"not": "an EKFAC"}, tmp_path / "f")
    # both were raw errors from deep inside (an AttributeError on the string, pathlib's FileExistsError)
    with pytest.raises(TypeError, match="^model: expected the torch nn.Module the factors were fitted on, got str"):
        read_factors(folder, "mypkg.models:net")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="^folder .*afile': a file, where the factors are written as a folder"):
        write_factors(ekfac, tmp_path / "afile")


def test_a_kronfluence_task_is_a_deltainf_measurement(setup):
    model, train, queries = setup
    loader = DataLoader(train, batch_size=100)
    plain = EKFAC(model, progress=False).fit(loader)
    scores = plain.score(*queries.tensors, loader)
    tasked = EKFAC(model, measurement=task_measurement(KronfluenceTask()), progress=False)
    tasked.factors, tasked._fit_examples, tasked._fitted_weights = plain.factors, plain._fit_examples, plain._fitted_weights
    torch.testing.assert_close(tasked.score(*queries.tensors, loader), scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="task: expected a kronfluence Task"):
        task_measurement(object())


def test_a_kronfluence_task_is_a_deltainf_loss(setup, tmp_path):
    model, train, queries = setup
    loader = DataLoader(train, batch_size=100)
    plain = EKFAC(model, progress=False).fit(loader)
    task = KronfluenceTask()
    tasked = EKFAC(model, measurement=task_measurement(task), loss=task_loss(task), progress=False).fit(loader)
    for name, f in plain.factors.items():
        torch.testing.assert_close(tasked.factors[name].lam, f.lam, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(tasked.score(*queries.tensors, loader), plain.score(*queries.tensors, loader),
                               rtol=1e-4, atol=1e-5)
    # a custom loss is not stored in the factor file: loading asks for it again
    tasked.save(tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match="loss: the factors were saved with a custom training loss"):
        EKFAC.load(tmp_path / "f.safetensors", model, measurement=task_measurement(task))
    again = EKFAC.load(tmp_path / "f.safetensors", model, measurement=task_measurement(task), loss=task_loss(task))
    assert again.config.loss is not None
    with pytest.raises(TypeError, match="loss: expected a scalar"):
        EKFAC(model, loss=lambda z, y: nn.functional.cross_entropy(z, y, reduction="none"),
              progress=False).fit(loader)
    with pytest.raises(TypeError, match="task: expected a kronfluence Task"):
        task_loss(object())
