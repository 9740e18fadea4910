"""Tests for deltainf.delta: queries, the single scoring pass, the vote, combining points, checks."""
import json

import numpy as np
import pytest
import torch

from deltainf import delta as D
from deltainf.delta import DeltaInfluence, check_affected_prediction, pick_affected_point, pick_affected_points

N = 40
K = 10


class FakeEngine:
    """Stands in for EKFAC: records every call and returns scores built by ``fn(qx, qy) -> (Q, N)``
    (random by default, seeded by the call count so repeated detections see the same numbers)."""

    def __init__(self, fn=None, n_train=N):
        self.calls = []
        self.fn = fn
        self.n_train = n_train

    def score(self, query_x, query_y, train_loader):
        self.calls.append((query_x.clone(), query_y.clone(), train_loader))
        if self.fn is not None:
            out = self.fn(query_x, query_y)
        else:
            g = torch.Generator().manual_seed(1234)
            out = torch.randn(query_x.shape[0], self.n_train, generator=g) * 10
        self.returned = out.clone()
        return out


def points(p=1, seed=0):
    return torch.rand(p, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def detector(engine, **kw):
    kw.setdefault("n_transforms", 10)
    kw.setdefault("domain", "pixel")
    kw.setdefault("num_classes", K)
    return DeltaInfluence(engine, **kw)


def plain_vote(scores, p, n, threshold, tolerance, min_points):
    """The paper's vote in plain PyTorch; min_points None = pooled (summed votes >= P * (n - tolerance))."""
    s = scores.reshape(p, 1 + n, -1)
    delta = s[:, 1:] - s[:, :1]
    votes = (delta < threshold).sum(1)
    flags = votes >= n - tolerance
    if min_points is None:
        combined = votes.sum(0) >= p * (n - tolerance)
    else:
        combined = flags.sum(0) >= min_points
    return votes, flags, combined.nonzero().flatten()


@pytest.mark.parametrize("threshold,tolerance", [(0.0, 0), (0.0, 2), (-5.0, 1), (3.0, 4)])
@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("combine", ["any", "pooled"])
def test_vote_equals_plain_pytorch(threshold, tolerance, p, combine):
    eng = FakeEngine()
    det = detector(eng, threshold=threshold, tolerance=tolerance, combine=combine)
    res = det.detect("loader", points(p), 2)
    assert len(eng.calls) == 1
    scores = eng.returned
    votes, flags, flagged = plain_vote(scores, p, 10, threshold, tolerance, 1 if combine == "any" else None)
    assert res.votes.dtype == torch.int32 and res.votes.shape == (p, N)
    assert torch.equal(res.votes, votes.to(torch.int32))
    assert torch.equal(res.point_flags, flags)
    assert torch.equal(res.flagged, flagged) and res.flagged.dtype == torch.int64
    assert res.min_votes == 10 - tolerance
    s = scores.reshape(p, 11, N)
    torch.testing.assert_close(res.base_scores, s[:, 0])
    torch.testing.assert_close(res.delta.mean, (s[:, 1:] - s[:, :1]).mean(1))
    torch.testing.assert_close(res.delta.frac_negative, (s[:, 1:] - s[:, :1] < 0).float().mean(1))
    torch.testing.assert_close(res.scores, s)


def test_one_score_call_with_all_queries_in_order():
    eng = FakeEngine()
    det = detector(eng, n_transforms=5)
    x = points(3)
    y = torch.tensor([1, 2, 3])
    res = det.detect("the-loader", x, y)
    assert len(eng.calls) == 1
    qx, qy, loader = eng.calls[0]
    assert loader == "the-loader"
    assert qx.shape == (3 * 6, 3, 8, 8) and qy.shape == (18,) and qy.dtype == torch.int64
    for p in range(3):
        assert torch.equal(qx[p * 6], x[p]) and int(qy[p * 6]) == int(y[p])  # original query first
        copies = qy[p * 6 + 1:(p + 1) * 6]
        assert torch.equal(copies, res.query_labels[p])
        assert not (copies == y[p]).any()  # the label rule: never the adversarial label
    assert len(res.transforms) == 3 and all(len(t) == 5 for t in res.transforms)
    assert set(res.timings) >= {"transform", "scoring", "vote", "total"}


def test_single_point_accepts_chw_and_int_label():
    eng = FakeEngine()
    res = detector(eng).detect(None, points(1)[0], 4)
    assert res.votes.shape == (1, N) and res.test_y_adv.tolist() == [4]
    res = detector(eng).detect(None, points(2), [1, np.int64(2)])
    assert res.test_y_adv.tolist() == [1, 2]
    res = detector(eng).detect(None, points(2), np.int64(3))  # one label for every point
    assert res.test_y_adv.tolist() == [3, 3]


def make_scores(p, n, n_train, flag_sets):
    """Scores where point k's votes are n for the examples in flag_sets[k] and 0 elsewhere."""
    s = torch.zeros(p, 1 + n, n_train)
    s[:, 0] = 1.0  # base
    s[:, 1:] = 2.0  # transformed: ΔInfl = +1 -> no vote
    for k, idx in enumerate(flag_sets):
        s[k, 1:, idx] = -1.0  # ΔInfl = -2 -> a vote from every copy
    return s.reshape(p * (1 + n), n_train)


@pytest.mark.parametrize("combine,expected", [
    ("any", [0, 1, 2, 3, 4, 5]),
    ("all", [2]),
    ("majority", [1, 2, 3]),
    (2, [1, 2, 3]),
    (1, [0, 1, 2, 3, 4, 5]),
    (3, [2]),
    ("pooled", [2]),  # tolerance 0: every copy of every point must vote
])
def test_multiple_points_combine(combine, expected):
    flag_sets = [[0, 1, 2], [1, 2, 3, 4], [2, 3, 5]]
    eng = FakeEngine(lambda qx, qy: make_scores(3, 4, 12, flag_sets), n_train=12)
    res = detector(eng, n_transforms=4, tolerance=0, combine=combine).detect(None, points(3), 0)
    assert res.flagged.tolist() == expected
    assert res.point_flags.sum(1).tolist() == [3, 4, 3]
    assert res.min_points == D.resolve_min_points(combine, 3)


def test_pooled_votes_sum_over_points():
    """An example voted for by most copies of every point is flagged when pooled even though no single
    point flags it; one that only one point implicates is not."""
    n, n_train = 10, 6
    s = torch.ones(3, 1 + n, n_train)  # ΔInfl = 0 -> no vote at threshold 0
    s[:, 1:8, 0] = 0.0  # example 0: 7 of 10 votes at each of the 3 points (21 of 30)
    s[0, 1:, 1] = 0.0  # example 1: 10 votes at point 0 only (10 of 30)
    eng = FakeEngine(lambda qx, qy: s.reshape(33, n_train), n_train=n_train)
    res = detector(eng, n_transforms=n, tolerance=3, combine="pooled").detect(None, points(3), 0)
    assert res.flagged.tolist() == [0] and res.min_points is None
    assert res.point_flags[:, 0].tolist() == [True, True, True]  # 7 >= 10 - 3 at each point
    res = res.revote(tolerance=2)  # needs 24 of 30: example 0 has 21
    assert res.flagged.tolist() == [] and res.point_flags[0, 1]
    assert res.revote(combine="any").flagged.tolist() == [1]


def test_default_tolerance_grows_with_pooled_points():
    assert D.default_tolerance(50, 1) == round(D.DEFAULT_TOLERANCE_FRACTION * 50) == 2  # the paper's BadNet rule
    tols = [D.default_tolerance(50, p) for p in (1, 2, 3, 5, 10, 100)]
    assert tols == sorted(tols) and tols[-1] <= round(D.POOLED_TOLERANCE_LIMIT * 50)
    assert D.default_tolerance(50, 10) == 12
    assert D.default_tolerance(50, 10, combine="majority") == 2  # per-point rules keep the one-point default
    eng = FakeEngine()
    res = detector(eng, n_transforms=50).detect(None, points(10), 1)
    assert res.tolerance == 12 and res.settings["tolerance"] == 12 and res.min_votes == 38


def test_poisons_flagged_exactly():
    n, n_train = 8, 50
    poisons = [3, 17, 42]

    def fn(qx, qy):
        s = torch.zeros(1 + n, n_train)
        s[0] = 0.5
        s[1::2] = 1.5  # clean examples: ΔInfl alternates +1 / -1 over the copies (half the votes)
        s[2::2] = -0.5
        s[0, poisons] = 100.0  # poisons strongly support the adversarial label...
        s[1:, poisons] = -5.0  # ...and collapse under every transform
        return s

    res = detector(FakeEngine(fn, n_train), n_transforms=n, tolerance=0).detect(None, points(1), 0)
    assert res.flagged.tolist() == poisons


def test_deterministic_for_seed_and_point_independent():
    e1, e2, e3, e4 = FakeEngine(), FakeEngine(), FakeEngine(), FakeEngine()
    x = points(2)
    r1 = detector(e1, seed=3).detect(None, x, 1)
    r2 = detector(e2, seed=3).detect(None, x, 1)
    assert torch.equal(e1.calls[0][0], e2.calls[0][0]) and torch.equal(e1.calls[0][1], e2.calls[0][1])
    assert torch.equal(r1.flagged, r2.flagged) and r1.transforms == r2.transforms
    detector(e3, seed=4).detect(None, x, 1)
    assert not torch.equal(e1.calls[0][1], e3.calls[0][1]) or not torch.equal(e1.calls[0][0], e3.calls[0][0])
    # point 0's queries do not depend on how many points are detected together
    detector(e4, seed=3).detect(None, x[:1], 1)
    assert torch.equal(e4.calls[0][0], e1.calls[0][0][:11])
    assert torch.equal(e4.calls[0][1], e1.calls[0][1][:11])


def test_default_tolerance_and_threshold():
    det = DeltaInfluence(FakeEngine(), domain="pixel", num_classes=K)
    assert det.n_transforms == D.DEFAULT_N_TRANSFORMS
    assert det.threshold == D.DEFAULT_THRESHOLD
    assert det.tolerance is None and det.tolerance_for(1) == round(D.DEFAULT_TOLERANCE_FRACTION * 50)
    assert det.combine == D.DEFAULT_COMBINE == "pooled"
    assert D.resolve_tolerance(None, 1) == 0
    assert D.resolve_tolerance(None, 10) < 10


def test_auto_threshold_matches_plain_median():
    eng = FakeEngine()
    res = detector(eng, threshold="auto", combine="any").detect(None, points(2), 1)
    s = eng.returned.reshape(2, 11, N)
    delta = s[:, 1:] - s[:, :1]
    for p in range(2):
        thr = -D.AUTO_THRESHOLD_SCALE * delta[p].abs().double().median().item()
        assert res.thresholds[p] == pytest.approx(thr, rel=1e-6)
        assert torch.equal(res.votes[p], (delta[p] < thr).sum(0).to(torch.int32))


def test_revote_matches_fresh_detection():
    x = points(2)
    r = detector(FakeEngine(), threshold=0.0, tolerance=1).detect(None, x, 1)
    fresh = detector(FakeEngine(), threshold=-4.0, tolerance=3, combine="all").detect(None, x, 1)
    again = r.revote(threshold=-4.0, tolerance=3, combine="all")
    assert torch.equal(again.votes, fresh.votes) and torch.equal(again.flagged, fresh.flagged)
    assert again.tolerance == 3 and again.settings["threshold"] == -4.0
    only_tol = r.revote(tolerance=5)
    assert torch.equal(only_tol.votes, r.votes) and only_tol.min_votes == 5
    no_scores = detector(FakeEngine(), keep_scores=False).detect(None, x, 1)
    assert no_scores.scores is None
    with pytest.raises(ValueError, match="keep_scores"):
        no_scores.revote(threshold=-1.0)


def test_result_to_dict_is_json():
    res = detector(FakeEngine()).detect(None, points(2), 1)
    d = res.to_dict()
    s = json.dumps(d)
    back = json.loads(s)
    assert back["n_train"] == N and back["n_points"] == 2 and back["n_transforms"] == 10
    assert back["flagged"] == res.flagged.tolist()
    assert len(back["vote_histogram"]) == 2 and sum(back["vote_histogram"][0]) == N
    assert sum(back["transform_counts"].values()) == 20
    assert "votes" not in back
    assert len(json.loads(json.dumps(res.to_dict(include_arrays=True)))["votes"][0]) == N


class Normalize(torch.nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class MeanClassifier(torch.nn.Module):
    """Predicts class round(10 * mean pixel value): easy to construct inputs for any class."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        m = x.mean((1, 2, 3), keepdim=False).unsqueeze(1)
        centres = torch.arange(K, dtype=x.dtype) / 10
        return -(m - centres) ** 2 * 100 + self.dummy


def const_images(values):
    return torch.stack([torch.full((3, 8, 8), v) for v in values])


def test_model_check_and_normalization_from_model():
    model = MeanClassifier()
    eng = FakeEngine()
    eng.model = model
    det = DeltaInfluence(eng, n_transforms=6)  # normalized domain, stats read from model.normalize
    assert det.mean == [0.5, 0.5, 0.5] and det.std == [0.25, 0.25, 0.25]
    x = const_images([0.3, 0.7])
    res = det.detect(None, x, torch.tensor([3, 7]))
    assert res.settings["num_classes"] == K and res.settings["domain"] == "normalized"
    with pytest.raises(ValueError, match="does not predict test_y_adv"):
        det.detect(None, x, torch.tensor([3, 6]))
    # switching the check off lets it through
    DeltaInfluence(eng, n_transforms=6, check_prediction=False, num_classes=K).detect(None, x, torch.tensor([3, 6]))
    with pytest.raises(ValueError, match="point 1"):
        check_affected_prediction(model, x, torch.tensor([3, 6]))
    assert check_affected_prediction(model, x, torch.tensor([3, 7])).shape == (2, K)


def test_pick_affected_point():
    model = MeanClassifier()
    triggered = const_images([0.1, 0.2, 0.5, 0.5, 0.3])
    ap = pick_affected_point(model, triggered, 5)
    assert ap.index == 2 and torch.equal(ap.x, triggered[2]) and ap.true_label is None
    # a dataset with labels: inputs whose true class is the target are skipped
    data = [(triggered[i], lab) for i, lab in enumerate([1, 2, 5, 4, 3])]
    ap = pick_affected_point(model, data, 5)
    assert ap.index == 3 and ap.true_label == 4
    with pytest.raises(ValueError, match="none of the 5 triggered test inputs"):
        pick_affected_point(model, triggered, 9)
    with pytest.raises(ValueError, match="empty"):
        pick_affected_point(model, triggered[:0], 5)
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    assert pick_affected_point(model, loader, 5, batch_size=2).index == 3


def test_pick_affected_points_takes_the_first_ones_in_order():
    model = MeanClassifier()
    triggered = const_images([0.5, 0.1, 0.5, 0.5, 0.3, 0.5])
    data = [(triggered[i], lab) for i, lab in enumerate([1, 2, 5, 4, 3, 6])]
    pts = pick_affected_points(model, data, 5, count=2, batch_size=2)
    assert pts.indices == [0, 3] and pts.true_labels == [1, 4] and torch.equal(pts.x, triggered[[0, 3]])
    pts = pick_affected_points(model, triggered, 5, count=10)  # fewer available than asked: all of them
    assert pts.indices == [0, 2, 3, 5] and pts.true_labels is None and pts.x.shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="count"):
        pick_affected_points(model, triggered, 5, count=0)
    with pytest.raises(ValueError, match="none of the 6 triggered test inputs"):
        pick_affected_points(model, triggered, 9)


def test_bad_inputs():
    eng = FakeEngine()
    with pytest.raises(ValueError, match="n_transforms"):
        detector(eng, n_transforms=0)
    with pytest.raises(ValueError, match="tolerance"):
        detector(eng, tolerance=10)
    with pytest.raises(ValueError, match="tolerance"):
        detector(eng, tolerance=-1)
    with pytest.raises(ValueError, match="threshold"):
        detector(eng, threshold="median")
    with pytest.raises(ValueError, match="combine"):
        detector(eng, combine="some")
    with pytest.raises(TypeError, match="score"):
        DeltaInfluence(object(), domain="pixel")
    with pytest.raises(ValueError, match="mean"):
        DeltaInfluence(eng)  # normalized domain with no stats and no model
    det = detector(eng)
    with pytest.raises(ValueError, match="test_x"):
        det.detect(None, torch.rand(8, 8), 1)
    with pytest.raises(TypeError, match="floating-point"):
        det.detect(None, torch.zeros(3, 8, 8, dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match=r"test_y_adv must be in \[0, 10\)"):
        det.detect(None, points(1), 10)
    with pytest.raises(ValueError, match="non-negative"):
        det.detect(None, points(1), -1)
    with pytest.raises(ValueError, match="one label per affected point"):
        det.detect(None, points(3), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer"):
        det.detect(None, points(1), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="between 1 and"):
        detector(eng, combine=3).detect(None, points(2), 1)
    with pytest.raises(ValueError, match="num_classes"):
        DeltaInfluence(eng, domain="pixel").detect(None, points(1), 1)
    bad = FakeEngine(lambda qx, qy: torch.zeros(3, 5))
    with pytest.raises(ValueError, match="ekfac.score must return"):
        detector(bad).detect(None, points(1), 1)
    assert len(eng.calls) == 0  # every error above was raised before scoring
