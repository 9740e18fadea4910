"""TRAK-style scorer on deltainf.ops.jl_project and the TRAK projector backend (with traker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from deltainf.influence import EKFAC, TRAKScorer, negative_margin
from deltainf.influence.trak import projection_seed
from deltainf.reference import jl_matrix


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def reference_trak(model, X, Y, Xq, Yq, k, seed):
    """Materialised per-example margin gradients, explicit JL matrix, explicit formula (float64)."""
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    m64 = model.double()

    def f(p, x, y):
        return -negative_margin(functional_call(m64, p, (x.unsqueeze(0),)), y.unsqueeze(0)).sum()

    def flat(Xs, Ys):
        g = vmap(grad(f), in_dims=(None, 0, 0))(params, Xs.double(), Ys)
        return torch.cat([g[n].flatten(1) for n in params], 1)

    G, Gq = flat(X, Y), flat(Xq, Yq)
    omega = jl_matrix(G.shape[1], k, projection_seed(seed, 0), "rademacher", dtype=torch.float64)
    Phi, phi = G @ omega, Gq @ omega
    with torch.no_grad():
        p = torch.softmax(m64(X.double()), -1).gather(1, Y.unsqueeze(1)).squeeze(1)
    model.float()
    return phi @ torch.linalg.pinv(Phi.T @ Phi) @ Phi.T * (1 - p)


def test_trak_scorer_matches_reference():
    model = small_model()
    X, Y = data(60, 1)
    Xq, Yq = data(3, 2)
    loader = DataLoader(TensorDataset(X, Y, torch.arange(60)), batch_size=16)
    t = TRAKScorer(model, proj_dim=16, seed=3, progress=False)
    with pytest.raises(RuntimeError, match="fit"):  # like EKFAC: fit, then score
        t.score(Xq, Yq, loader)
    s = t.fit(loader).score(Xq, Yq, loader)
    ref = reference_trak(model, X, Y, Xq, Yq, 16, 3)
    assert s.shape == (3, 60) and s.dtype == torch.float32
    torch.testing.assert_close(s.double(), ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


def test_trak_sign_agrees_with_ekfac():
    # both: positive = the training example supports the query label; self-influence is the largest
    model = small_model()
    X, Y = data(40, 4)
    dl = DataLoader(TensorDataset(X, Y), batch_size=20)
    trak = TRAKScorer(model, proj_dim=32, progress=False).fit(dl).score(X[:4], Y[:4])
    ek = EKFAC(model, damping=1e-3, progress=False).fit(dl).score(X[:4], Y[:4], dl)
    for q in range(4):
        assert int(trak[q].argmax()) == q and int(ek[q].argmax()) == q
    assert np.corrcoef(trak.flatten().numpy(), ek.flatten().numpy())[0, 1] > 0.5


def test_trak_scorer_bad_inputs():
    model = small_model()
    with pytest.raises(ValueError, match="proj_dim"):
        TRAKScorer(model, proj_dim=0)
    with pytest.raises(ValueError, match="dist"):
        TRAKScorer(model, dist="uniform")
    with pytest.raises(ValueError, match="params"):
        TRAKScorer(model, params=["nope.weight"])
    t = TRAKScorer(model, proj_dim=8, progress=False)
    with pytest.raises(RuntimeError, match="fit"):
        t.score(*data(2, 0))
    X, Y = data(10, 0)
    t.fit(DataLoader(TensorDataset(X, Y), batch_size=5))
    with pytest.raises(ValueError, match=r"query_y: labels must lie in \[0, 5\)"):
        t.score(X[:2], torch.tensor([0, 7]))


def test_projector_contract_and_dict_input():
    pytest.importorskip("trak")
    from deltainf.influence import TRAKProjector
    from trak.projectors import AbstractProjector

    proj = TRAKProjector(grad_dim=30, proj_dim=7, seed=5, proj_type="normal", device="cpu")
    assert isinstance(proj, AbstractProjector) and proj.proj_dim == 7
    g = torch.randn(4, 30)
    out = proj.project(g, model_id=2)
    omega = jl_matrix(30, 7, projection_seed(5, 2), "gaussian", dtype=torch.float64)
    # traker's scale by default (unit-variance entries); deltainf's 1/sqrt(k) on request
    torch.testing.assert_close(out.double(), 7 ** 0.5 * (g.double() @ omega), rtol=1e-5, atol=1e-5)
    ours = TRAKProjector(grad_dim=30, proj_dim=7, seed=5, proj_type="normal", scale="deltainf")
    torch.testing.assert_close(ours.project(g, model_id=2).double(), g.double() @ omega, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scale"):
        TRAKProjector(grad_dim=30, proj_dim=7, scale="unit")
    # dict of parameter blocks == the vectorised gradient; fp16 blocks are accepted (fp32 math)
    blocks = {"w": g[:, :24].reshape(4, 4, 6), "b": g[:, 24:]}
    torch.testing.assert_close(proj.project(blocks, model_id=2), out, rtol=1e-5, atol=1e-5)
    assert proj.project(g.half(), model_id=2).dtype == torch.float32
    assert not torch.allclose(proj.project(g, model_id=3), out)  # a different matrix per checkpoint
    with pytest.raises(ValueError, match="grad_dim"):
        proj.project(torch.randn(4, 29), model_id=0)
    assert proj.project(g[:0], model_id=2).shape == (0, 7)  # an empty batch: no rows, not an error
    assert proj.project({k: v[:0] for k, v in blocks.items()}, model_id=2).shape == (0, 7)
    with pytest.raises(ValueError, match="proj_type"):
        TRAKProjector(grad_dim=30, proj_dim=7, proj_type="sparse")
    with pytest.raises(ValueError, match="^device: 'gpu0' is not a torch device"):  # was torch's, at project()
        TRAKProjector(grad_dim=30, proj_dim=7, device="gpu0")
    # seeds beyond 2**63 wrapped around to another seed's matrix (2**64 gave seed 0's), a negative model_id passed
    with pytest.raises(ValueError, match=r"^seed: expected an int in \[0, "):
        TRAKProjector(grad_dim=30, proj_dim=7, seed=2 ** 64)
    for model_id in (-1, 2 ** 64):
        with pytest.raises(ValueError, match=r"^model_id: expected an int in \[0, "):
            proj.project(g, model_id=model_id)
    with pytest.raises(ValueError, match=r"^proj_dim: expected an int in \[1, 65536\]"):  # was jl_project's k
        TRAKProjector(grad_dim=30, proj_dim=10 ** 6)
    assert TRAKProjector(grad_dim=np.int64(30), proj_dim=np.int64(7)).proj_dim == 7
    # the limit holds per parameter block: two blocks of 70,000 cannot go to 100,000 (the kernel's error named k)
    wide = TRAKProjector(grad_dim=140_000, proj_dim=100_000)
    with pytest.raises(ValueError, match="^proj_dim: 100000 is more than the kernel projects a parameter block"):
        wide.project({"a": torch.zeros(1, 70_000), "b": torch.zeros(1, 70_000)}, model_id=0)


def test_traker_runs_on_deltainf_projector(tmp_path):
    pytest.importorskip("trak")
    from deltainf.influence import TRAKProjector
    from trak import TRAKer

    model = small_model()
    X, Y = data(80, 6)
    Xq, Yq = data(3, 7)
    k = 24
    n_params = sum(p.numel() for p in model.parameters())
    proj = TRAKProjector(grad_dim=n_params, proj_dim=k, seed=0, proj_type="rademacher", device="cpu")
    tr = TRAKer(model=model, task="image_classification", train_set_size=80, save_dir=str(tmp_path), device="cpu",
                projector=proj, use_half_precision=False, proj_dim=k)
    tr.load_checkpoint(model.state_dict(), model_id=0)
    for i in range(0, 80, 20):
        tr.featurize(batch=(X[i:i + 20], Y[i:i + 20]), num_samples=20)
    tr.finalize_features()
    tr.start_scoring_checkpoint(exp_name="q", checkpoint=model.state_dict(), model_id=0, num_targets=3)
    tr.score(batch=(Xq, Yq), num_samples=3)
    theirs = torch.as_tensor(np.array(tr.finalize_scores(exp_name="q"))).T.double()  # (Q, N)
    ours = TRAKScorer(model, proj_dim=k, seed=0, progress=False).fit(
        DataLoader(TensorDataset(X, Y), batch_size=20)).score(Xq, Yq).double()
    # TRAK rescales (X^T X)^-1 by its mean absolute entry: equal up to one positive factor
    scale = float((theirs * ours).sum() / (ours * ours).sum())
    assert scale > 0
    torch.testing.assert_close(theirs, scale * ours, rtol=1e-3, atol=1e-4 * float(theirs.abs().max()))
