"""Tests for deltainf.delta: queries, the single scoring pass, the vote, combining points, checks."""
import dataclasses
import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deltainf import delta as D
from deltainf.delta import DeltaInfluence, check_affected_prediction, pick_affected_point, pick_affected_points

N = 40
K = 10


class FakeEngine:
    """Stands in for EKFAC (a deltainf.influence.Scorer): records every call and returns scores built by
    ``fn(qx, qy) -> (Q, N)`` (random by default, seeded so repeated detections see the same numbers)."""

    def __init__(self, fn=None, n_train=N, model=None):
        self.calls = []
        self.fn = fn
        self.n_train = n_train
        self.model = model

    def fit(self, train_loader):
        return self

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
    # one pass: a fake engine's scores follow the query's row, not its input, so a member traced again as a point
    # (retrace) would get another point's scores
    kw.setdefault("retrace", 0)
    kw.setdefault("n_transforms", 10)
    kw.setdefault("domain", "pixel")
    kw.setdefault("num_classes", K)
    return DeltaInfluence(engine, **kw)


def plain_vote(scores, p, n, threshold, tolerance, rank):
    """The paper's vote in plain PyTorch with a fixed tolerance; rank None = pooled (summed votes >= P * (n -
    tolerance)), else the rank-th largest per-point count must reach n - tolerance."""
    s = scores.reshape(p, 1 + n, -1)
    delta = s[:, 1:] - s[:, :1]
    votes = (delta < threshold).sum(1)
    mirror = (delta > -threshold).sum(1)
    if rank is None:
        combined = votes.sum(0) >= p * (n - tolerance)
    else:
        combined = votes.sort(0, descending=True).values[rank - 1] >= n - tolerance
    return votes, mirror, combined.nonzero().flatten()


@pytest.mark.parametrize("threshold,tolerance", [(0.0, 0), (0.0, 2), (-5.0, 1), (3.0, 4)])
@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("combine", ["any", "pooled"])
def test_vote_equals_plain_pytorch(threshold, tolerance, p, combine):
    eng = FakeEngine()
    det = detector(eng, threshold=threshold, tolerance=tolerance, combine=combine)
    res = det.detect("loader", points(p), 2)
    assert len(eng.calls) == 1
    scores = eng.returned
    votes, mirror, flagged = plain_vote(scores, p, 10, threshold, tolerance, 1 if combine == "any" else None)
    assert res.votes.dtype == torch.int32 and res.votes.shape == (p, N)
    assert torch.equal(res.votes, votes.to(torch.int32))
    assert torch.equal(res.mirror_votes, mirror.to(torch.int32))
    assert torch.equal(res.flagged, flagged) and res.flagged.dtype == torch.int64
    assert res.tolerance == tolerance and res.settings["fdr"] is None
    s = scores.reshape(p, 11, N)
    torch.testing.assert_close(res.base_scores, s[:, 0])
    torch.testing.assert_close(res.delta.mean, (s[:, 1:] - s[:, :1]).mean(1))
    torch.testing.assert_close(res.delta.frac_negative, (s[:, 1:] - s[:, :1] < 0).float().mean(1))
    torch.testing.assert_close(res.raw_scores, s)
    assert torch.equal(res.scores, res.statistic.float())  # the common DetectorResult field


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
    assert (res.votes == 4).sum(1).tolist() == [3, 4, 3]


def test_pooled_votes_sum_over_points():
    """An example voted for by most copies of every point is flagged when pooled even though no single
    point flags it; one that only one point implicates is not."""
    n, n_train = 10, 6
    s = torch.ones(3, 1 + n, n_train)  # ΔInfl = 0 -> no vote at threshold 0
    s[:, 1:8, 0] = 0.0  # example 0: 7 of 10 votes at each of the 3 points (21 of 30)
    s[0, 1:, 1] = 0.0  # example 1: 10 votes at point 0 only (10 of 30)
    eng = FakeEngine(lambda qx, qy: s.reshape(33, n_train), n_train=n_train)
    res = detector(eng, n_transforms=n, tolerance=3, combine="pooled").detect(None, points(3), 0)
    assert res.flagged.tolist() == [0] and res.statistic[0] == 21 and res.cut == 21
    res = res.revote(tolerance=2)  # needs 24 of 30: example 0 has 21
    assert res.flagged.tolist() == [] and res.cut == 24
    assert res.revote(combine="any").flagged.tolist() == [1]


def brute_force_cut(stat, mirror, fdr):
    best = None
    for c in sorted(set(stat.tolist()), reverse=True):
        if c < 0:
            continue
        t, d = int((stat >= c).sum()), int((mirror >= c).sum())
        if (1 + d) <= fdr * t:
            best = c
    return best


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), hi=st.integers(1, 40), fdr=st.sampled_from([0.05, 0.1, 0.2, 0.5]),
       seed=st.integers(0, 2**31 - 1))
def test_calibrated_cut_is_the_lowest_cut_meeting_the_fdr(n, hi, fdr, seed):
    g = torch.Generator().manual_seed(seed)
    stat = torch.randint(-1, hi, (n,), generator=g)
    mirror = torch.randint(-1, hi, (n,), generator=g)
    stat[: n // 4] = hi  # a planted excess on the vote side
    assert D.calibrated_cut(stat, mirror, fdr) == brute_force_cut(stat, mirror, fdr)


def collapse_scores(p, n, n_train, poisons, seed=0, shift=0.0):
    """Exchangeable clean scores (base and copies i.i.d.: no link to the affected point) plus poisons that
    support the base strongly and lose it under every copy."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(p, 1 + n, n_train, generator=g) + shift
    s[:, 0, poisons] = 50.0
    s[:, 1:, poisons] = torch.randn(p, n, len(poisons), generator=g)
    return s.reshape(p * (1 + n), n_train)


@pytest.mark.parametrize("p", [1, 4])
def test_calibrated_cut_finds_a_collapsing_set(p):
    poisons = list(range(0, 400, 8))  # 50 poisons among 400
    eng = FakeEngine(lambda qx, qy: collapse_scores(p, 50, 400, poisons), n_train=400)
    res = detector(eng, n_transforms=50).detect(None, points(p), 1)
    assert res.found and set(poisons) <= set(res.flagged.tolist())
    assert res.fdr_estimate <= D.DEFAULT_FDR and res.settings["fdr"] == D.DEFAULT_FDR
    fp = res.flagged.numel() - len(poisons)
    assert fp <= 0.25 * res.flagged.numel()  # the estimate tracks the real false-discovery rate
    assert "flagged as the poison set" in res.verdict and "false-discovery rate" in res.verdict


def test_without_controls_only_the_affected_label_is_a_candidate():
    """candidates="label" holds when the mirror decides alone (no controls): a collapsing group of another label is
    not flagged (it was, and the run's estimate counted it), and the result keeps the candidates for revote."""
    poisons, others = list(range(0, 400, 8)), list(range(4, 400, 8))
    labels = torch.ones(400, dtype=torch.int64)
    labels[others] = 2
    loader = DataLoader(TensorDataset(torch.zeros(400, 3, 8, 8), labels), batch_size=100)
    eng = FakeEngine(lambda qx, qy: collapse_scores(1, 50, 400, poisons + others), n_train=400)
    res = detector(eng, n_transforms=50, n_controls=0).detect(loader, points(1), 1)
    assert set(poisons) <= set(res.flagged.tolist()) and not set(others) & set(res.flagged.tolist())
    assert torch.equal(res.eligible, labels == 1)
    assert set(res.revote(fdr=0.1).flagged.tolist()) <= set(poisons) | set((labels == 1).nonzero().flatten().tolist())
    every = detector(eng, n_transforms=50, n_controls=0, candidates="all").detect(loader, points(1), 1)
    assert set(poisons + others) <= set(every.flagged.tolist())
    assert every.verdict.endswith("candidates='all': examples of the points' source classes break the permutation "
                                  "null, so the estimate is not calibrated and a large share of other labels can be "
                                  "flagged") and "candidates='all'" not in res.verdict
    # reference data with n_controls=0 is not read: said, and the verdict does not ask for what was passed
    ref = (torch.rand(8, 3, 8, 8), torch.ones(8, dtype=torch.int64))
    with pytest.warns(UserWarning, match=r"^reference: not read, as n_controls=0 scores no controls"):
        res = detector(eng, n_transforms=50, n_controls=0).detect(loader, points(1), 1, reference=ref)
    assert "no controls (pass reference=..., with n_controls > 0)" in res.verdict
    # controls asked for, none to be had (the reference holds no input of the label): the verdict asked for a reference
    # that had been passed; it says why there are none, and that the label's own examples are not ruled out
    eng.model = MeanClassifier()
    other = (const_images([0.51, 0.52]), torch.tensor([5, 5]))
    with pytest.warns(UserWarning, match=r"no correctly classified input of label\(s\) \[1\]"):
        res = detector(eng, n_transforms=50).detect(None, const_images([0.1]), 1, reference=other)
    assert res.found and res.settings["controls_wanted"] == D.DEFAULT_N_CONTROLS
    assert "no controls: no input of the affected label(s) that the model classifies correctly, in the reference or " \
           "the training set" in res.verdict and "pass reference=" not in res.verdict


@pytest.mark.parametrize("seed", range(5))
def test_no_coherent_set_without_poison(seed):
    """Scores with no link to the affected point (exchangeable base and copies) end in 'no poison'."""
    eng = FakeEngine(lambda qx, qy: collapse_scores(3, 20, 2000, [], seed=seed), n_train=2000)
    res = detector(eng, n_transforms=20).detect(None, points(3), 1)
    assert not res.found and res.flagged.numel() == 0 and res.cut is None
    assert res.verdict.startswith("no coherent poison set found") and res.fdr_estimate > D.DEFAULT_FDR


def label_loader(labels):
    """A training loader whose dataset keeps its labels (the detector reads them without iterating)."""
    data = torch.utils.data.TensorDataset(torch.rand(labels.numel(), 3, 8, 8), labels)
    return torch.utils.data.DataLoader(data, batch_size=64)


def coherence_scores(p, n, n_train, poisons, controls, seed=0):
    """collapse_scores for P points followed by ``controls`` base queries drawn like the clean examples."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.cat([collapse_scores(p, n, n_train, poisons, seed), torch.randn(controls, n_train, generator=g)])


@pytest.mark.parametrize("p", [1, 4])
def test_coherence_test_claims_a_planted_group(p):
    """Poisons labelled like the points that support them far more than any control: found, nothing else."""
    n_train, c = 400, D.DEFAULT_N_CONTROLS
    poisons = list(range(0, 200, 4))  # 50 poisons, all labelled 1 like half the data
    labels = torch.tensor([1] * 200 + [0] * 200)
    ref = (torch.rand(c, 3, 8, 8), torch.ones(c, dtype=torch.int64))
    eng = FakeEngine(lambda qx, qy: coherence_scores(p, 20, n_train, poisons, qx.shape[0] - p * 21), n_train)
    res = detector(eng, n_transforms=20).detect(label_loader(labels), points(p), 1, reference=ref)
    flagged = set(res.flagged.tolist())
    assert res.found and flagged >= set(poisons) and max(flagged) < 200  # only candidates of the label
    # clean examples beat every control by chance (1 in 1 + C for one point) or pass the mirror cut: each of the
    # two parts of the flagged set is held to the rate, so their union to at most twice it
    assert len(flagged) - len(poisons) <= 2 * D.DEFAULT_FDR * len(flagged)
    assert res.support_cut is not None and res.fdr_estimate <= D.DEFAULT_FDR
    assert "coherent group" in res.verdict and res.to_dict()["n_candidates"] == 200
    # the group is the support's; the votes (influence collapse) decide only the mirror cut's additions, so the
    # verdict does not say the group collapses (it did, and a threshold no vote passes flagged the same group)
    assert "collapses" not in res.verdict
    assert set(res.revote(threshold=-1e9).flagged.tolist()) >= set(poisons)


@pytest.mark.parametrize("k", [2, 10])
def test_two_classes_take_no_mirror_cut(k):
    """Every example of the affected label collapses under every copy, as with two classes, where each copy is
    relabelled to the one other class: among ten classes the mirror cut adds the clean examples that happen to
    support the point, with two the mirror is no null and the group is delimited by its support alone, also when
    decided again."""
    n_train, c = 600, D.DEFAULT_N_CONTROLS
    poisons = list(range(0, 300, 6))

    def fn(qx, qy):
        s = torch.randn(qx.shape[0], n_train, generator=torch.Generator().manual_seed(3))
        s[:, :300] += 3.0  # the label's examples support every input of the label ...
        s[1:21, :300] -= 6.0  # ... and lose it under every copy of the point
        s[0, poisons] += 50.0
        return s

    ref = (torch.rand(c, 3, 8, 8), torch.ones(c, dtype=torch.int64))
    labels = torch.tensor([1] * 300 + [0] * 300)
    res = detector(FakeEngine(fn, n_train), n_transforms=20, num_classes=k, boundary="mixture").detect(
        label_loader(labels), points(1), 1, reference=ref)
    flagged = set(res.flagged.tolist())
    lowest = res.support_cut if res.mixture is None else min(res.support_cut, res.mixture[0])
    by_support = set(((res.control_support >= lowest) & res.eligible).nonzero().flatten().tolist())
    assert res.found and set(poisons) <= by_support <= flagged
    if k == 2:
        assert res.cut is None and flagged == by_support and res.n_mirror == 0 and res.mirror_added is None
        # what was measured on two-class models is said: with the mixture, the flagged set is a superset
        assert res.verdict.endswith("read this set as a superset of the poisons")
        # by default a two-class model's group ends at its permutation cut (whole modes of a label were taken past
        # it), and the verdict says what that leaves; the boundary asked for is kept
        plain = detector(FakeEngine(fn, n_train), n_transforms=20, num_classes=k).detect(
            label_loader(labels), points(1), 1, reference=ref)
        assert plain.settings["boundary"] == "coherence" and set(poisons) <= set(plain.flagged.tolist())
        assert "two classes: the group ends at its permutation cut" in plain.verdict
        assert plain.mixture is None and plain.representation is None and res.settings["boundary"] == "mixture"
    else:
        assert "two classes" not in res.verdict
        assert D.resolve_boundary(None, k) == D.DEFAULT_BOUNDARY == "representation"
        assert res.cut is not None and len(flagged - by_support) >= 50
        # the verdict's estimate is of the group at its support cut; what the mirror cut adds is said on its own
        assert res.mirror_added[0] == len(flagged - by_support) == res.to_dict()["mirror_added"]
        assert f"{res.mirror_added[0]} more past the mirror cut" in res.verdict
    assert torch.equal(res.revote().flagged, res.flagged)


@pytest.mark.parametrize("seed", range(4))
def test_coherence_test_finds_nothing_when_points_are_ordinary(seed):
    """Points exchangeable with the controls (no poison): 'no coherent poison set found', though every
    example of the label collapses under relabelling and the mirror alone would flag many."""
    n_train, c = 600, D.DEFAULT_N_CONTROLS

    def fn(qx, qy):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(qx.shape[0], n_train, generator=g)
        base[:, :300] += 3.0  # the label's own examples support every input of the label, and collapse
        for k in range(0, 3 * 21, 21):
            base[k + 1:k + 21, :300] -= 6.0
        return base

    ref = (torch.rand(c, 3, 8, 8), torch.ones(c, dtype=torch.int64))
    labels = torch.tensor([1] * 300 + [0] * 300)
    res = detector(FakeEngine(fn, n_train), n_transforms=20).detect(label_loader(labels), points(3), 1, reference=ref)
    # the outranking test point by point is a test at a level, which exchangeable points pass in that share of
    # runs (seed 2 here: p = 0.020; the rate is checked below); the rest of the rule never claims them
    res = dataclasses.replace(res, coherence=res.coherence._replace(by_point=None)).revote()
    assert not res.found and res.verdict.startswith("no coherent poison set found")
    assert res.fdr_estimate > D.DEFAULT_FDR and "collapses" not in res.verdict
    # without the test, the mirror among the label's examples flags those that happen to support the points more
    assert dataclasses.replace(res, coherence=None).revote().found


def test_detect_says_each_warning_once_and_as_the_callers(monkeypatch):
    """The second pass of a detection traced again meets the first's conditions: what both say is said once, from
    the line that called detect, and what was said before a failure still reaches the caller."""
    fail = []

    def passes(self, *args, **kwargs):
        for _ in range(2):
            warnings.warn("controls: the same condition", UserWarning, stacklevel=2)
        warnings.warn("controls: another", UserWarning, stacklevel=5)
        if fail:
            raise ValueError("stopped")
        return "result"

    monkeypatch.setattr(DeltaInfluence, "_detect", passes)
    for failing in (False, True):
        fail[:] = [True] if failing else []
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            if failing:
                with pytest.raises(ValueError, match="stopped"):
                    detector(FakeEngine()).detect(None, points(1), 1)
            else:
                assert detector(FakeEngine()).detect(None, points(1), 1) == "result"
        assert [str(w.message) for w in said] == ["controls: the same condition", "controls: another"]
        assert {w.filename for w in said} == {__file__}


def test_a_second_pass_that_finds_no_group_leaves_the_first():
    """One point's group, traced again from 9 of its members (``retrace``), whose second pass finds no group (the
    fake scores give the ten points none): the first pass's answer stands, and the members traced are named."""
    n_train, c, group = 600, D.DEFAULT_N_CONTROLS, list(range(40))

    def fn(qx, qy):
        g = torch.Generator().manual_seed(3)
        base = torch.randn(qx.shape[0], n_train, generator=g)
        base[:, :300] += 3.0  # the label's own examples support every input of the label, and collapse
        n_points = (qx.shape[0] - c) // 21
        for k in range(n_points):
            base[k * 21 + 1:k * 21 + 21, :300] -= 6.0
        if n_points == 1:  # the first pass: a group supports the point far more than any control
            base[0, group] = 8.0
        return base

    ref = (torch.rand(c, 3, 8, 8), torch.ones(c, dtype=torch.int64))
    labels = torch.tensor([1] * 300 + [0] * 300)
    once, again = (detector(FakeEngine(fn, n_train), n_transforms=20, retrace=retrace).detect(
        label_loader(labels), points(1), 1, reference=ref) for retrace in (0, 10))
    assert once.found and set(once.flagged.tolist()) >= set(group)
    assert torch.equal(again.flagged, once.flagged) and again.n_points == 1 and "retraced" not in again.settings
    traced = again.settings["retraced_found_nothing"]
    assert len(traced) == 9 and set(traced) <= set(once.flagged.tolist())
    assert again.timings["retrace"] > 0 and "traced again" not in again.verdict


@pytest.mark.parametrize("lowered", ["by an offset", "scaled down"])
def test_each_point_with_its_own_group_is_claimed_point_by_point(lowered):
    """An all-to-one backdoor whose poisons each support only the triggered inputs of their own source class: each
    of 3 points has its own group of 40, which ranks it above every control and the other points not, so no
    candidate puts every point first and the support pooled over the points stays ordinary; the outranking test
    point by point claims the groups. The label's examples support a triggered input less than its controls, its
    scores lowered by an offset or scaled down (what the zoo's triggered inputs show: their quantiles against their
    controls' lie on a line of slope 0.15 through about zero)."""
    n_train, c, p = 600, D.DEFAULT_N_CONTROLS, 3
    groups = [list(range(k * 40, (k + 1) * 40)) for k in range(p)]

    def fn(qx, qy):
        g = torch.Generator().manual_seed(7)
        base = torch.randn(qx.shape[0], n_train, generator=g)
        base[:, :300] += 3.0
        for k in range(p):
            base[k * 21 + 1:k * 21 + 21, :300] -= 6.0
            if lowered == "by an offset":
                base[k * 21, :300] -= 2.0
            else:
                base[k * 21, :300] *= 0.15
            base[k * 21, groups[k]] = 8.0
        return base

    ref = (torch.rand(c, 3, 8, 8), torch.ones(c, dtype=torch.int64))
    labels = torch.tensor([1] * 300 + [0] * 300)
    res = detector(FakeEngine(fn, n_train), n_transforms=20).detect(label_loader(labels), points(p), 1, reference=ref)
    poisons = set(sum(groups, []))
    assert res.found and res.by_point is not None and res.by_point[2] and res.outrank_p is None
    assert res.by_point[0] <= D.OUTRANK_LEVEL / 2 and "point by point" in res.verdict
    assert set(res.flagged.tolist()) >= poisons and len(set(res.flagged.tolist()) - poisons) <= 0.05 * 180
    assert res.to_dict()["by_point_claimed"] is True
    pooled = dataclasses.replace(res, coherence=res.coherence._replace(by_point=None)).revote()
    assert not pooled.found  # what the pooled support and the test of every point find alone


def test_point_by_point_compares_a_wide_row_in_units_of_its_size():
    """A point whose scores all run twice as wide as its controls' puts one of the points first for about half the
    ordinary candidates by its width alone; compared in units of its own size, for about as many as an input
    exchangeable with the controls would (P / (P + C) = 1/4). A narrow point (a triggered input's scores are its
    controls' scaled down) is left as it is: the ordinary candidates stay behind the controls."""
    g = torch.Generator().manual_seed(3)
    n_train, p, c = 4000, 2, 6
    ctrl = torch.randn(c, n_train, generator=g)
    labels, clabels = torch.full((p,), 1), torch.full((c,), 1)

    def first_share(factor):
        base = factor * torch.randn(p, n_train, generator=g)
        return float(D.coherence_curve(base, labels, ctrl, clabels, permutations=50).by_point.first.double().mean())

    assert 0.2 <= first_share(2.0) <= 0.3  # 0.46 on raw scores
    assert first_share(0.2) <= 0.05  # 0.25 were it brought up to the controls' size


def test_outranking_tests_keep_their_level_on_ordinary_points():
    """Points exchangeable with their controls: over 100 runs the two outranking tests (every point first, and
    point by point, each at half of OUTRANK_LEVEL with several points) claim a group in about OUTRANK_LEVEL of them
    at most, and the estimate never does."""
    n_train, c, p = 600, D.DEFAULT_N_CONTROLS, 3
    ref = (torch.rand(c, 3, 8, 8), torch.ones(c, dtype=torch.int64))
    labels = torch.tensor([1] * 300 + [0] * 300)
    by_test = 0
    for seed in range(100):
        def fn(qx, qy, seed=seed):
            g = torch.Generator().manual_seed(seed)
            base = torch.randn(qx.shape[0], n_train, generator=g)
            base[:, :300] += 3.0
            for k in range(0, p * 21, 21):
                base[k + 1:k + 21, :300] -= 6.0
            return base

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = detector(FakeEngine(fn, n_train), n_transforms=20).detect(label_loader(labels), points(p), 1,
                                                                             reference=ref)
        if res.found:
            assert res.outrank_p is not None or res.by_point[2]  # claimed by a test, not by the estimate
            by_test += 1
    assert by_test <= 8  # 3 here; 5 expected at the level, and more than 8 has odds under 7 % at it


def content_scores(n_train, planted_points, poisons):
    """Scores that depend on each query's image and label only (so a point scores the same traced alone or with
    others): i.i.d. noise seeded by the query, plus strong support of ``poisons`` on the original queries of
    ``planted_points`` ((x, label) pairs)."""
    def fn(qx, qy):
        rows = []
        for x, y in zip(qx, qy):
            g = torch.Generator().manual_seed(int(x.double().sum() * 1e6) % (1 << 31) + int(y))
            row = torch.randn(n_train, generator=g)
            if any(torch.equal(x, px) and int(y) == py for px, py in planted_points):
                row[poisons] += 50.0
            rows.append(row)
        return torch.stack(rows)
    return fn


def test_each_affected_label_is_decided_on_its_own():
    """Points of two labels, a poison group behind label 1's only: label 1's decision is the one its points get
    traced alone, label 2 claims nothing, and the flagged set is label 1's group."""
    n_train, c = 500, D.DEFAULT_N_CONTROLS
    labels = torch.tensor([1] * 200 + [2] * 200 + [0] * 100)
    poisons = list(range(0, 200, 4))
    x, y = points(4, seed=5), torch.tensor([1, 1, 2, 2])
    ref_y = torch.tensor([1] * c + [2] * c)
    ref = (torch.rand(2 * c, 3, 8, 8, generator=torch.Generator().manual_seed(9)), ref_y)
    fn = content_scores(n_train, [(x[0], 1), (x[1], 1)], poisons)
    det = detector(FakeEngine(fn, n_train), n_transforms=20, boundary="mixture")  # no model to read
    both = det.detect(label_loader(labels), x, y, reference=ref)
    alone = det.detect(label_loader(labels), x[:2], 1, reference=ref)
    assert set(both.per_label) == {1, 2} and alone.per_label is None
    one, two = both.per_label[1], both.per_label[2]
    assert torch.equal(one.flagged, alone.flagged) and torch.equal(one.statistic, alone.statistic)
    torch.testing.assert_close(one.control_support, alone.control_support, equal_nan=True)
    assert one.fdr_estimate == alone.fdr_estimate and one.support_cut == alone.support_cut
    assert set(poisons) <= set(both.flagged.tolist()) and torch.equal(both.flagged, one.flagged)
    assert not two.found and two.flagged.numel() == 0 and int(two.eligible.sum()) == 200
    assert both.settings["n_controls"] == 2 * c and one.settings["n_controls"] == c
    assert one.settings["outrank_level"] == D.OUTRANK_LEVEL / 2 and alone.settings["outrank_level"] == D.OUTRANK_LEVEL
    assert both.fdr_estimate == pytest.approx(one.fdr_estimate)
    # a ranking on one scale: each label's pooled statistic as a share of what its own points can give
    three = det.detect(label_loader(labels), torch.cat([x, x[2:3].flip(-1)]), torch.tensor([1, 1, 2, 2, 2]),
                       reference=ref)
    for label, part in three.per_label.items():
        rows = part.statistic >= 0
        torch.testing.assert_close(three.scores[rows], part.statistic[rows].float() / (20 * part.n_points))
    assert float(three.scores.max()) <= 1.0 and set(three.scores[three.scores < 0].tolist()) == {-1.0}
    # the union's estimate says what it covers: the labels' groups at their support cuts (it was put on every
    # flagged example, the mirror cut's and the point-by-point test's members too: 0.16 read where 0.41 was clean)
    covered = D._estimated_group(one)
    assert 0 < covered <= one.flagged.numel() and f"over the {covered} of them in the labels' groups" in both.verdict
    assert "label 1 (2 point(s))" in both.verdict and "label 2 (2 point(s)): no coherent" in both.verdict
    summary = json.loads(json.dumps(both.to_dict()))
    assert summary["per_label"]["2"]["found"] is False and summary["per_label"]["1"]["n_flagged"] == len(one.flagged)
    again = both.revote()
    assert torch.equal(again.flagged, both.flagged) and set(again.per_label) == {1, 2}
    assert not both.revote(fdr=1e-3).found
    moved = both.revote(threshold=-1.0)  # new votes from the kept raw scores, split among the labels again
    assert moved.thresholds == [-1.0] * 4 and moved.per_label[2].thresholds == [-1.0] * 2
    assert torch.equal(moved.per_label[1].votes, moved.votes[:2]) and not torch.equal(moved.votes, both.votes)
    # every example a candidate of both labels: still decided label by label, the union keeps no candidate mask
    anyone = detector(FakeEngine(fn, n_train), n_transforms=20, boundary="mixture", candidates="all").detect(
        label_loader(labels), x, y, reference=ref)
    assert anyone.eligible is None and anyone.per_label[1].eligible is None and set(poisons) <= set(anyone.flagged.tolist())


@pytest.mark.parametrize("planted", [True, False])
def test_outranking_claims_a_group_the_estimate_cannot(planted):
    """One affected point that the label's ordinary examples support LESS than its controls (as a triggered input
    is): the poisons alone rank it above all 32 controls, 25 of them against ~8 ordinary examples a control gets at
    the top, so the estimate stays above fdr while the point outranks every control (p = 1 / 33). Without the
    group the point comes last and nothing is claimed."""
    n_train, c, n = 600, D.DEFAULT_N_CONTROLS, 20
    poisons = list(range(0, 300, 12)) if planted else []

    def fn(qx, qy):
        g = torch.Generator().manual_seed(3)
        s = torch.randn(qx.shape[0], n_train, generator=g)
        s[0, :300] -= 2.0  # an atypical input of the label
        s[0, poisons] += 8.0
        s[1:1 + n, :300] -= 6.0  # every example of the label collapses under relabelling
        return s

    ref = (torch.rand(c, 3, 8, 8), torch.ones(c, dtype=torch.int64))
    labels = torch.tensor([1] * 300 + [0] * 300)
    res = detector(FakeEngine(fn, n_train), n_transforms=n).detect(label_loader(labels), points(1), 1, reference=ref)
    if not planted:
        assert not res.found and res.coherence.top_p > D.OUTRANK_LEVEL and res.outrank_p is None
        assert "cannot reach" not in res.verdict  # no candidate at the top: no group too small to see
        return
    flagged = set(res.flagged.tolist())
    # the mirror cut adds a few clean examples, as in the planted-group test: each part held to the rate
    assert res.found and flagged >= set(poisons) and len(flagged - set(poisons)) <= 2 * D.DEFAULT_FDR * len(flagged)
    assert res.fdr_estimate > D.DEFAULT_FDR and res.outrank_p == pytest.approx(1 / (1 + c))
    assert "outranking test" in res.verdict and res.to_dict()["outrank_p"] == res.outrank_p
    # the estimate alone claims nothing here
    assert not dataclasses.replace(res, coherence=tuple(res.coherence[:3])).revote().found
    # one of two affected labels is tested at half the level, which p = 1 / 33 does not reach
    assert not dataclasses.replace(res, settings={**res.settings, "outrank_level": D.OUTRANK_LEVEL / 2}).revote().found
    # held-out controls: no caution; training controls (exchangeable with no misclassified input): the verdict says so
    assert "weakest" not in res.verdict
    trained = dataclasses.replace(res, settings={**res.settings, "controls": "training set"})
    assert "a claim of the outranking test on training controls is the weakest" in trained.verdict
    by_estimate = dataclasses.replace(trained, outrank_p=None)  # claimed by the estimate
    assert "weakest" not in by_estimate.verdict and "a claim on training controls is unconfirmed" in by_estimate.verdict
    assert "unconfirmed" not in res.verdict and "unconfirmed" not in trained.verdict


def test_outranking_weighs_how_far_a_small_group_puts_the_point_first():
    """Six examples put one point far above all 32 controls; every control has ~300 / 33 ordinary examples that
    rank it first by chance, more than six, so counted alone the group would not stand out. Weighed by their lead
    over the controls it does: the point leads every re-split (p = 1 / 33), and the group is claimed."""
    n_train, c, n = 600, D.DEFAULT_N_CONTROLS, 20
    group = [5, 50, 90, 130, 170, 210]

    def fn(qx, qy):
        s = torch.randn(qx.shape[0], n_train, generator=torch.Generator().manual_seed(3))
        s[0, :300] -= 2.0
        s[0, group] += 8.0
        s[1:1 + n, :300] -= 6.0
        return s

    ref = (torch.rand(c, 3, 8, 8), torch.ones(c, dtype=torch.int64))
    labels = torch.tensor([1] * 300 + [0] * 300)
    res = detector(FakeEngine(fn, n_train), n_transforms=n).detect(label_loader(labels), points(1), 1, reference=ref)
    assert float(res.coherence.null[-1]) > len(group)  # chance puts more examples at a control's top than the group
    assert res.found and res.outrank_p == pytest.approx(1 / (1 + c)) and set(group) <= set(res.flagged.tolist())
    # counted, as for training controls (not exchangeable with the point once screened), the group does not stand out
    scores = FakeEngine(fn, n_train).score(torch.zeros(1 + n + c, 1), torch.zeros(1 + n + c), None)
    counted = D.coherence_curve(scores[:1], torch.ones(1, dtype=torch.int64), scores[1 + n:],
                                torch.ones(c, dtype=torch.int64), labels == 1, weigh_lead=False)
    assert counted.top_p > D.OUTRANK_LEVEL


def test_a_group_too_small_for_one_point_is_named_in_the_verdict():
    """Six examples rank one point just above all 32 controls, where ~300 / 33 ordinary ones would rank a control
    there by chance: neither the estimate nor the outranking test (their lead is no larger than chance gives) can
    claim them, and the verdict says how large a group these points and controls could show ((1 + chance) / fdr)
    and what would show a smaller one."""
    n_train, c, n = 600, D.DEFAULT_N_CONTROLS, 20
    group = [5, 50, 90, 130, 170, 210]

    def fn(qx, qy):
        s = torch.randn(qx.shape[0], n_train, generator=torch.Generator().manual_seed(3))
        s[0, :300] -= 2.0
        s[0, group] = s[1 + n:, group].max(0).values + 0.01
        s[1:1 + n, :300] -= 6.0
        return s

    ref = (torch.rand(c, 3, 8, 8), torch.ones(c, dtype=torch.int64))
    labels = torch.tensor([1] * 300 + [0] * 300)
    res = detector(FakeEngine(fn, n_train), n_transforms=n).detect(label_loader(labels), points(1), 1, reference=ref)
    chance = float(res.coherence.null[-1])
    assert not res.found and float(res.coherence.cuts[-1]) == 1.0 and 5 < chance < 15
    assert f"fewer than {math.ceil((1 + chance) / D.DEFAULT_FDR)} examples cannot reach" in res.verdict
    assert "more affected points of the label" in res.verdict
    assert "the outranking test found the points no further ahead than chance puts a control" in res.verdict
    # far ahead, the test passes, and at fdr=0.1 a claim needs 10 at the top: the verdict says that, not a failure
    assert res.coherence.top_p > D.OUTRANK_LEVEL
    far = detector(FakeEngine(lambda qx, qy: fn(qx, qy) + 20.0 * _at(qx.shape[0], n_train, group), n_train),
                   n_transforms=n, fdr=0.1).detect(label_loader(labels), points(1), 1, reference=ref)
    assert not far.found and far.coherence.top_p <= D.OUTRANK_LEVEL
    assert "the outranking test found the points ahead of their controls (p = " in far.verdict
    assert "needs at least 10 candidates at the top, and 6 are there" in far.verdict


def _at(rows: int, cols: int, columns: list) -> torch.Tensor:
    """(rows, cols): 1 in ``columns`` of the first row (the affected point's scores), 0 elsewhere."""
    out = torch.zeros(rows, cols)
    out[0, columns] = 1.0
    return out


def test_mixture_cut_separates_the_group_from_the_ordinary_examples():
    g = torch.Generator().manual_seed(0)
    ordinary = (torch.randn(150, generator=g) * 0.15 - 0.6).clamp(-1, 1)  # support the points less than controls
    group = torch.rand(100, generator=g) * 1.2 - 0.2  # a group with a tail of modest support
    support = torch.cat([ordinary, group, torch.full((5,), float("nan"))])
    cut, share = D.mixture_cut(support)
    assert int((group >= cut).sum()) >= 95 and int((ordinary >= cut).sum()) <= 0.05 * 150
    assert 0.0 <= share < 0.05
    # only the eligible examples are fitted: without the group there is nothing to delimit
    assert D.mixture_cut(support, torch.arange(support.numel()) < 150) is None
    assert D.mixture_cut(group[:D._MIXTURE_MIN - 1]) is None  # too few to fit two populations
    assert D.mixture_cut(torch.full((50,), 0.5)) is None  # one value: no two populations


def test_the_mixture_boundary_does_not_depend_on_the_row_order():
    """The support mixture's seeded start drew values by position: the same candidates in another order found a
    boundary where this order found none (4 of 5 orders here), or moved it (16 of 120 shuffles of twelve saved runs
    of the plain-models study)."""
    g = torch.Generator().manual_seed(3)
    support = torch.cat([(torch.randn(300, generator=g) * 0.3 - 0.4).clamp(-1, 1),
                         (torch.randn(40, generator=g) * 0.4 + 0.3).clamp(-1, 1)])
    support = (support * 16).round() / 16  # the steps of a support over 16 controls: ties, as in a run
    cut, share = D.mixture_cut(support)
    for seed in range(5):
        perm = torch.randperm(support.numel(), generator=torch.Generator().manual_seed(seed))
        moved = D.mixture_cut(support[perm])
        assert moved[0] == cut and moved[1] == pytest.approx(share, rel=1e-9)


def test_the_discriminant_does_not_depend_on_the_row_order():
    """The same training data in another order (a permuted Subset) flagged one more borderline example: the
    discriminant's folds followed the row order."""
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(180, 6, generator=g, dtype=torch.float64)
    members = torch.zeros(180, dtype=torch.bool)
    members[150:] = True
    phi[members] += 1.0
    for seed in (0, 1):
        perm = torch.randperm(180, generator=torch.Generator().manual_seed(seed + 7))
        torch.testing.assert_close(D._discriminant(phi[perm], members[perm], seed),
                                   D._discriminant(phi, members, seed)[perm], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rows, columns, dead", [(240, 300, 40), (120, 16, 0), (40, 90, 80)])
def test_the_discriminant_is_scikit_learns_shrunk_lda(rows, columns, dead):
    """The discriminant solves its shrunk covariance by Cholesky instead of scikit-learn's least squares (three
    quarters of a wide head's fit): the same direction, with more columns than rows, with columns constant in the
    head inputs (dead units) and without."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, columns)) * rng.uniform(0.1, 3.0, columns)
    side = (np.arange(rows) % 3 == 0).astype(np.int64)
    x[side == 1, :4] += 2.0
    x[:, columns - dead:] = 0.5
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x, side)
    ordinary, direction = D._shrunk_discriminant(x, side)
    np.testing.assert_allclose((x - ordinary) @ direction, (x - lda.means_[0]) @ lda.coef_[0], rtol=1e-9,
                               atol=1e-9 * float(np.abs((x - lda.means_[0]) @ lda.coef_[0]).max()))


def test_mixture_cut_needs_two_populations():
    """One skewed population of supports (no group: ordinary examples only) gets no boundary, though a
    two-component mixture fitted to it would put one inside it."""
    g = torch.Generator().manual_seed(0)
    skewed = (torch.exp(0.6 * torch.randn(400, generator=g, dtype=torch.float64)) - 1.2) / 3  # a long upper tail
    assert D._upper_population(skewed, D.DEFAULT_FDR, 0) is not None  # the unchecked fit draws a boundary
    assert D.mixture_cut(skewed.float()) is None


def test_a_single_outlier_is_not_the_ordinary_population():
    """One value far below the rest is a component of its own with no spread: it passes the BIC and Ashman tests,
    and every other value would be the upper "population". A group of candidates with one ordinary example far off
    in its head input: the representation step must not add the ordinary ones with the group. One value far above
    the rest is still a population of one (a lone poison among the controls)."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(200, generator=g, dtype=torch.float64)
    values[0] = -100.0
    assert D._two_populations(values, 0, separated=True) is None
    assert D._upper_population(values, D.DEFAULT_FDR, 0) is None
    assert int(D._separated_upper(-values).sum()) == 1
    two = torch.cat([torch.randn(150, generator=g, dtype=torch.float64), 8.0 + torch.randn(50, generator=g,
                                                                                            dtype=torch.float64)])
    posterior, _ = D._two_populations(two, 0, separated=True)  # two populations are still two
    assert int((posterior > 0.5)[150:].sum()) == 50 and int((posterior > 0.5)[:150].sum()) == 0
    h = torch.Generator().manual_seed(0)
    features = torch.cat([torch.randn(150, 8, generator=h),
                          torch.randn(60, 8, generator=h) + torch.tensor([4.0] + [0.0] * 7)])
    features[:, 7] *= 0.01  # a direction the label hardly varies along, which the discriminant weighs most
    features[0, 7] = -3.0  # one ordinary example far off along it
    members = torch.zeros(210, dtype=torch.bool)
    members[150:180] = True  # influence found 30 of the group's 60
    added, _ = D.representation_cut(features, members)
    assert int(added[:150].sum()) <= 5 and int(added[180:].sum()) >= 25  # the outlier put 149 ordinary ones in


def test_a_few_outliers_are_not_the_ordinary_population():
    """Two or four values far below a heavy-tailed bulk are a component of their own too, and the best of several
    starts finds it (it has the higher likelihood): the fit must not call the other 215 the upper population (a
    BadNet trigger on a LayerNorm MLP traced with mistakes of other labels: the representation step took the whole
    target label, 144 clean examples). The same bulk with a real second population is still split."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        bulk = rng.standard_t(3, 215) * 2.0
        for low in ([-39.0, -34.0], [-39.0, -34.0, -30.0, -28.0]):
            values = torch.from_numpy(np.concatenate([bulk, low]))
            assert D._two_populations(values, 0, separated=True) is None
            assert D._upper_population(values, D.DEFAULT_FDR, 0, separated=True) is None
        group = torch.from_numpy(np.concatenate([bulk, 30.0 + rng.standard_normal(40)]))
        posterior, _ = D._two_populations(group, 0, separated=True)
        assert int((posterior > 0.5)[215:].sum()) == 40 and int((posterior > 0.5)[:215].sum()) <= 2


def test_candidate_features_are_compared_within_their_label():
    """With candidates of two labels, a group drawn mostly from one label would otherwise find its label as the
    group's direction and take that label's ordinary examples with it; centred per label there is no second
    population. With one label the centring changes nothing."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([1] * 150 + [2] * 150)
    x = torch.randn(300, 16, generator=g)
    x[150:, :4] += 4.0  # label 2's inputs sit elsewhere
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(16, K))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=64)
    eligible = torch.ones(300, dtype=torch.bool)
    feats = D.candidate_features(model, loader, eligible)
    assert feats.shape == (300, 16)
    for label in (1, 2):
        assert torch.allclose(feats[labels == label].mean(0), torch.zeros(16), atol=1e-5)
    members = torch.zeros(300, dtype=torch.bool)
    members[150:190] = True  # 40 ordinary examples of label 2 and none of label 1
    raw = D.representation_cut(x, members)
    assert raw is not None and int((raw[0] | members)[150:].sum()) > 100  # the whole of label 2
    assert D.representation_cut(feats, members) is None
    shifted = torch.randn(150, 16, generator=g)
    shifted[:60] += 3.0
    within = torch.arange(150) < 40
    assert torch.equal(D.representation_cut(shifted, within)[0],
                       D.representation_cut(shifted - shifted.double().mean(0).float(), within)[0])


def tailed_group_scores(p, n, n_train, core, tail, controls, seed=0):
    """coherence_scores where the label's clean examples support the points less than the controls (as the
    examples of a class support a triggered input of another class less than inputs of their own class), a
    core of poisons supports the points far more than any control and a tail of poisons about as much."""
    g = torch.Generator().manual_seed(seed + 2)
    s = coherence_scores(p, n, n_train, core, controls, seed).reshape(-1, n_train)
    for k in range(0, p * (1 + n), 1 + n):
        s[k, :200] -= 2.0
        s[k, core] = 50.0
        s[k, tail] = 1.5 + torch.randn(len(tail), generator=g)
    return s


def test_largest_excess_is_the_lowest_support_the_null_backs():
    cuts = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    null = torch.tensor([50.0, 12.0, 1.0], dtype=torch.float64)
    # below 1.0 the candidates come no faster than the null expects of an ordinary input's supporters
    assert D.largest_excess(cuts, torch.tensor([60, 30, 20]), null, -0.5, 1.0) == 1.0
    assert D.largest_excess(cuts, torch.tensor([80, 35, 20]), null, -0.5, 1.0) == 0.1  # a tail above the null
    assert D.largest_excess(cuts, torch.tensor([80, 35, 20]), null, 0.3, 1.0) == 0.5  # within the range asked
    assert D.largest_excess(cuts, torch.tensor([60, 31, 20]), null, -0.5, 1.0) == 1.0  # a tie: the highest
    assert D.largest_excess(cuts, torch.tensor([60, 31, 20]), null, 0.6, 0.9) == 0.9  # no cut in the range


def tailed_group(p):
    """(res with boundary="mixture", the same with "coherence", core, tail) for P points on tailed_group_scores."""
    n_train, c = 400, D.DEFAULT_N_CONTROLS
    core, tail = list(range(0, 200, 4)), list(range(1, 120, 4))  # 50 + 30 poisons, labelled 1
    labels = torch.tensor([1] * 200 + [0] * 200)
    ref = (torch.rand(c, 3, 8, 8), torch.ones(c, dtype=torch.int64))
    eng = FakeEngine(lambda qx, qy: tailed_group_scores(p, 20, n_train, core, tail, qx.shape[0] - p * 21), n_train)
    loader = label_loader(labels)
    res = detector(eng, n_transforms=20, boundary="mixture").detect(loader, points(p), 1, reference=ref)
    cut_only = detector(eng, n_transforms=20, boundary="coherence").detect(loader, points(p), 1, reference=ref)
    return res, cut_only, core, tail


def test_one_point_mixture_stops_where_the_null_stops_backing_the_group():
    """With one point an ordinary candidate's support is even over [-1, 1] under the re-splits, and a tail that
    supports the point about as much as the controls comes no faster than that null: the two-population fit would
    take it with the label's clean examples around it, so the boundary stays where the null backs the group."""
    res, cut_only, core, tail = tailed_group(1)
    assert res.mixture is not None and res.mixture[0] == res.support_cut
    assert set(res.flagged.tolist()) == set(cut_only.flagged.tolist())
    assert set(res.flagged.tolist()) >= set(core) and len(set(res.flagged.tolist()) - set(core) - set(tail)) <= 3


def test_mixture_boundary_flags_the_groups_tail():
    """With ten points the tail's pooled support stands above what the re-splits give an ordinary candidate, and
    the group is flagged with its tail."""
    res, cut_only, core, tail = tailed_group(10)
    flagged = set(res.flagged.tolist())
    assert res.mixture is not None and res.mixture[0] <= res.support_cut and cut_only.mixture is None
    assert flagged >= set(core) and len(flagged & set(tail)) >= 0.9 * len(tail)
    assert len(flagged - set(core) - set(tail)) <= 0.1 * 120
    assert res.to_dict()["mixture_cut"] == res.mixture[0]
    assert res.revote(fdr=0.1).settings["boundary"] == "mixture"


def test_representation_cut_takes_the_rest_of_the_group():
    g = torch.Generator().manual_seed(0)
    ordinary = torch.randn(150, 16, generator=g)
    shift = torch.zeros(16)
    shift[:4] = 3.0
    group = torch.randn(100, 16, generator=g) + shift  # what the head reads of a trigger
    features = torch.cat([ordinary, group])
    members = torch.zeros(250, dtype=torch.bool)
    members[150:210] = True  # influence found 60 of the 100
    added, share = D.representation_cut(features, members)
    assert int(added[210:].sum()) >= 38 and int(added[:150].sum()) <= 3
    assert not bool(added[members].any()) and 0.0 <= share < 0.05
    assert D.representation_cut(features, torch.arange(250) == 160) is None  # too few members to have a mean
    # a "group" of ordinary examples has no second population to delimit
    assert D.representation_cut(ordinary, torch.arange(150) < 60) is None


def _head_inputs_of_three_sources(g: torch.Generator) -> torch.Tensor:
    """Head inputs (420, 16) of a label: 300 ordinary examples, then the poisons of an all-to-one attack made from
    three source classes (40 each): a shared trigger direction, and their source class's own."""
    trigger = torch.zeros(16)
    trigger[:3] = 2.5
    sources = []
    for m in range(3):
        source = torch.zeros(16)
        source[4 + 3 * m:7 + 3 * m] = 2.0
        sources.append(torch.randn(40, 16, generator=g) + trigger + source)
    return torch.cat([torch.randn(300, 16, generator=g)] + sources)


def test_training_controls_inside_the_grown_group_are_set_aside():
    """Poisons among the training controls that the screens keep (they do not look like the point: each supports
    the poisons of its own source class, a pseudo-point with a group of its own) lie inside the point's group once
    it is grown from its core in the head inputs: they are set aside, with at most the few ordinary controls that
    chance puts in the core. An ordinary label, one population, loses next to none."""
    g = torch.Generator().manual_seed(0)
    features = _head_inputs_of_three_sources(g)  # 300 clean, then 3 x 40 poisons
    n, eligible = 420, torch.ones(420, dtype=torch.bool)
    base = torch.randn(1, n, generator=g)
    base[0, 300:340] += 4.0  # the point supports its own source class's poisons
    own = torch.cat([torch.arange(14), torch.tensor([340, 341, 342, 380, 381, 382])])  # 14 clean, 6 poisons
    control_scores = torch.randn(own.numel(), n, generator=g)
    control_scores[14:17, 340:380] += 4.0
    control_scores[17:, 380:420] += 4.0
    labels, control_labels = torch.tensor([3]), torch.full((own.numel(),), 3)
    kept = control_scores.clone()
    kept[torch.arange(own.numel()), own] = float("nan")  # a training control's influence on itself left out
    support = D.control_support(base, labels, kept, control_labels)
    out = D.grown_controls(support, own, eligible, features)
    assert bool(out[14:].all()) and int(out[:14].sum()) <= 3, out.nonzero().flatten().tolist()
    for seed in range(4):
        g = torch.Generator().manual_seed(seed + 10)
        ordinary, point, controls = torch.randn(n, 16, generator=g), torch.randn(1, n, generator=g), \
            torch.randn(own.numel(), n, generator=g)
        controls[torch.arange(own.numel()), own] = float("nan")
        out = D.grown_controls(D.control_support(point, labels, controls, control_labels), own, eligible, ordinary)
        assert int(out.sum()) <= 2


def test_a_grown_group_of_most_controls_is_the_label_not_poisons():
    """Two candidates of a label's larger mode rank the point above every control; grown in the head inputs they
    take the whole mode, 55 of the 64 training controls. An attack is assumed not to outnumber the label's own
    examples (the influence screen's bound), so none are set aside: the few left could not stand for the label."""
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        features = torch.randn(420, 16, generator=g)
        features[330:, 0] += 8.0  # a second mode of the label: 90 of 420
        own = torch.arange(0, 420, 6)[:64]
        support = torch.rand(420, generator=g, dtype=torch.float64) * 0.9 - 0.5
        support[[5, 17]] = 1.0
        assert not bool(D.grown_controls(support, own, torch.ones(420, dtype=torch.bool), features).any())


def test_representation_grows_from_the_groups_core():
    """One affected point supports the poisons made from its own source class (the core, at the claimed support
    cut); the poisons of the other source classes share the trigger in the head input but support nothing. Drawn
    once from the whole flagged set, which also holds the support mixture's clean tail, the boundary takes part of
    them; grown from the core and refitted until nothing joins, every source class, and hardly a clean example
    (the grown members are kept where the final group's boundaries put them)."""
    g = torch.Generator().manual_seed(0)
    features = _head_inputs_of_three_sources(g)  # 300 clean, then 3 x 40 poisons
    eligible = torch.ones(420, dtype=torch.bool)
    support = torch.full((420,), -0.5, dtype=torch.float64)
    support[300:340], support[:40] = 1.0, 0.1  # the point's own source class; 40 clean in the mixture's tail
    decision = {"support_cut": 1.0, "flagged": torch.cat([torch.arange(40), torch.arange(300, 340)]), "by_point": None}
    poisons, clean = set(range(300, 420)), set(range(300))

    def counts(d):
        flagged = set(d["flagged"].tolist())
        return len(flagged & poisons), len(flagged & clean)

    once = counts(D._add_representation(decision, features, eligible, D.DEFAULT_FDR))
    grown = D._add_representation(decision, features, eligible, D.DEFAULT_FDR, support)
    assert once[0] < 90 and counts(grown)[0] >= 114 and counts(grown)[1] <= 40 + 3, (once, counts(grown))
    assert grown["representation"][0] == len(grown["flagged"]) - 80
    # an ordinary label, long along one direction, its far end claimed as the core: no second population, no growth
    ordinary = torch.randn(400, 16, generator=g) * torch.tensor([3.0] + [1.0] * 15)
    far = ordinary[:, 0].argsort(descending=True)[:30]
    support = torch.full((400,), -0.5, dtype=torch.float64)
    support[far] = 1.0
    core_only = {"support_cut": 1.0, "flagged": far.sort().values, "by_point": None}
    assert D._add_representation(core_only, ordinary, torch.ones(400, dtype=torch.bool), D.DEFAULT_FDR,
                                 support) is core_only


def test_representation_cut_weighs_directions_by_the_labels_spread(monkeypatch):
    """Where the label's own examples vary widely along the group's mean direction, the trigger shows on the
    directions where they hardly vary: the discriminant finds the group there, where the mean direction alone sees
    one population."""
    g = torch.Generator().manual_seed(0)
    spread = torch.ones(16)
    spread[:4] = 5.0
    shift = torch.zeros(16)
    shift[:4], shift[4:6] = 3.0, 2.5
    ordinary = torch.randn(200, 16, generator=g) * spread
    group = torch.randn(100, 16, generator=g) * spread + shift
    features = torch.cat([ordinary, group])
    members = torch.zeros(300, dtype=torch.bool)
    members[200:230] = True  # influence found 30 of the 100
    along_means = D._mean_direction(features.double(), members)
    assert D._upper_population(along_means, D.DEFAULT_FDR, 0, separated=True) is None
    added, share = D.representation_cut(features, members)
    assert int(added[230:].sum()) >= 45 and int(added[:200].sum()) <= 5 and share < 0.1  # of the 70 left
    assert D.representation_cut(ordinary, torch.arange(200) < 60) is None
    monkeypatch.setattr(D, "_DISCRIMINANT_MAX_DIM", 15)  # a head wider than that keeps the mean direction alone
    assert D._discriminant(features.double(), members, 0) is None and D.representation_cut(features, members) is None


def _label_with_a_second_mode(g: torch.Generator):
    """Head inputs (240, 16) of a label: 200 ordinary examples, 30 of them (170-199) a second mode of the label's
    own, then 40 poisons (200-239) along a trigger direction; and 32 held-out controls drawn as the ordinary ones."""
    def ordinary(n):
        x = torch.randn(n, 16, generator=g)
        x[-(3 * n // 20):, 0] += 5.0  # the label's second mode, 15 % of it
        return x

    trigger = torch.zeros(16)
    trigger[4:8] = 3.0
    return torch.cat([ordinary(200), torch.randn(40, 16, generator=g) + trigger]), ordinary(32)


def test_decoy_cut_holds_the_representation_step_to_the_fdr():
    """The step adds a second mode of the label's own examples: the held-out controls of that mode score as high,
    so the additions are expected to hold as many ordinary examples as they have members, and are dropped but for
    the few that chance puts above every control (the top of 30 against the top of 5 controls in the mode). Where
    the step adds the group's remaining poisons, no control comes near them and they are kept."""
    g = torch.Generator().manual_seed(0)
    features, controls = _label_with_a_second_mode(g)
    before = torch.arange(240) >= 200  # the poisons found by influence
    mode = (torch.arange(240) >= 170) & (torch.arange(240) < 200)
    assert int(D.decoy_cut(features, before, mode, controls)[0].sum()) <= 3  # the few above every control
    found = torch.arange(240) >= 215  # influence found 25 of the 40; the step adds the other 15
    rest = before & ~found
    kept, share = D.decoy_cut(features, found, rest, controls)
    assert torch.equal(kept, rest) and share <= D.DEFAULT_FDR
    # with both the mode and the poisons added, the directions lean to the mode too: the cut keeps the poisons
    # above the mode's controls (11 of the 15) and hardly any of the mode
    kept, share = D.decoy_cut(features, found, rest | mode, controls)
    assert int(kept[rest].sum()) >= 10 and int(kept[mode].sum()) <= 3 and share <= D.DEFAULT_FDR
    assert D.decoy_cut(features, found, rest, None) is None  # no held-out control: nothing to hold the step to


class _Triggered(torch.nn.Module):
    """Predicts label 1 for everything; its hidden layer sees a bright corner (the trigger) strongly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, K)
        with torch.no_grad():
            self.head.bias[1] = 100.0

    def forward(self, x):
        return self.head(self.body(x))


def test_representation_boundary_finds_poisons_influence_cannot_see():
    """A group whose tail the model fits to zero loss: its influence, and so its support, is an ordinary
    example's, but its inputs carry the trigger. The default boundary flags that tail; the support alone does
    not; a poison-free run never reads a representation."""
    n_train, c = 400, D.DEFAULT_N_CONTROLS
    core, tail = list(range(0, 200, 4)), list(range(1, 120, 4))  # 50 + 30 poisons, labelled 1
    labels = torch.tensor([1] * 200 + [0] * 200)
    x = torch.rand(n_train, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    x[core + tail, :, :3, :3] = 4.0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=64)
    ref = (torch.rand(c, 3, 8, 8), torch.ones(c, dtype=torch.int64))

    def fn(qx, qy):
        s = tailed_group_scores(1, 20, n_train, core, tail, qx.shape[0] - 21)
        s[:, tail] = s[:, [t + 1 for t in tail]]  # the tail is scored like clean examples of the label
        return s

    eng = FakeEngine(fn, n_train, model=_Triggered())
    res = detector(eng, n_transforms=20).detect(loader, points(1), 1, reference=ref)
    flagged = set(res.flagged.tolist())
    support_only = dataclasses.replace(res, settings=dict(res.settings, boundary="mixture")).revote()
    support_only = set(support_only.flagged.tolist())
    assert res.features.shape == (200, 16) and res.representation is not None
    assert flagged >= set(core) and len(flagged & set(tail)) >= 0.9 * len(tail)
    assert len(support_only & set(tail)) <= 0.1 * len(tail) and support_only <= flagged
    assert len(flagged - set(core) - set(tail)) <= 0.05 * 120
    assert "representation" in res.verdict and res.to_dict()["representation_added"] == res.representation[0] >= 1
    # the held-out controls hold the step to the fdr, and revote holds it the same way
    assert res.control_features.shape == (c, 16)
    assert res.representation[1] <= D.DEFAULT_FDR and "from the label's held-out controls" in res.verdict
    assert torch.equal(res.revote().flagged, res.flagged)
    # controls that look like the tail (the candidates are positions 0-199): the step's additions are ordinary, then,
    # and go but for the few that chance puts above every control
    like_the_tail = dataclasses.replace(res, control_features=res.features[tail]).revote()
    assert len(set(like_the_tail.flagged.tolist()) & set(tail)) <= 5 and set(like_the_tail.flagged.tolist()) <= flagged
    # without the model the boundary cannot be read, and the run says so
    with pytest.warns(UserWarning, match="needs the model"):
        bare = detector(FakeEngine(fn, n_train), n_transforms=20).detect(loader, points(1), 1, reference=ref)
    assert bare.features is None and set(bare.flagged.tolist()) == support_only
    # points exchangeable with the controls: nothing is found, and no representation is read
    ordinary = FakeEngine(lambda qx, qy: torch.randn(qx.shape[0], n_train, generator=torch.Generator().manual_seed(5)),
                          n_train, model=_Triggered())
    quiet = detector(ordinary, n_transforms=20).detect(loader, points(1), 1, reference=ref)
    assert not quiet.found and quiet.features is None


def test_coherence_curve_counts_and_null():
    """observed = the eligible examples at or above each cut of control_support; with one point the null is
    the average over which of the 1 + C inputs plays the point, every split enumerated when there are at most
    ``permutations`` of them."""
    g = torch.Generator().manual_seed(0)
    n_train, c = 50, 3
    base, ctrl = torch.randn(1, n_train, generator=g), torch.randn(c, n_train, generator=g)
    ctrl[0, 7] = float("nan")  # a pair left out
    labels, clabels = torch.tensor([2]), torch.full((c,), 2)
    eligible = torch.arange(n_train) % 5 != 0
    cuts, observed, null, top_p, by_point = D.coherence_curve(base, labels, ctrl, clabels, eligible, permutations=4000)
    assert by_point is None  # one point: the test point by point is the test itself
    support = D.control_support(base, labels, ctrl, clabels)
    assert bool((cuts > 0).all())
    for k, cut in enumerate(cuts.tolist()):
        assert int(observed[k]) == int(((support >= cut) & eligible).sum())
    pool = torch.cat([base, ctrl])
    exact = torch.zeros_like(null)
    for k in range(1 + c):
        rest = torch.cat([pool[:k], pool[k + 1:]])
        s = D.control_support(pool[k:k + 1], labels, rest, clabels)
        exact += torch.stack([((s >= cut) & eligible).sum() for cut in cuts]).double() / (1 + c)
    assert torch.allclose(null, exact, atol=1e-9)  # 1 + C = 4 splits <= 4000: enumerated
    # top_p: the share of the 4 inputs whose count at support 1 reaches the point's (the point counts itself)
    tops = []
    for k in range(1 + c):
        rest = torch.cat([pool[:k], pool[k + 1:]])
        tops.append(int(((D.control_support(pool[k:k + 1], labels, rest, clabels) >= 1.0) & eligible).sum()))
    assert top_p == pytest.approx(sum(t >= tops[0] for t in tops) / (1 + c))
    sampled = D.coherence_curve(base, labels, ctrl, clabels, eligible, permutations=3)  # fewer than 4: random
    assert torch.allclose(sampled.null, exact, atol=float(exact.max()))
    assert 1 / 4 <= sampled.top_p <= 1.0


def test_outranking_point_by_point():
    """With several points, the test point by point: ``first`` = the eligible candidates whose highest point
    score is above every control score; ``null`` = how many rank one of the pseudo-points so, averaged over the
    splits (every one enumerated); ``p`` = the share of splits whose candidates lead by at least as much in all
    (each candidate's lead of its highest pseudo-point over its highest pseudo-control, in units of its scores'
    spread over the pool, counted where positive). Every score compared in its row's unit: the row's median
    absolute score over the eligible candidates where that is above the rows' median of it, else that median."""
    g = torch.Generator().manual_seed(1)
    n_train, p, c = 60, 2, 3
    base, ctrl = torch.randn(p, n_train, generator=g), torch.randn(c, n_train, generator=g)
    base[0, :8] += 3.0  # point 0's own group
    base[1, 8:16] += 3.0  # point 1's, which point 0 does not share
    ctrl[2] *= 3.0  # a wide control, compared in units of its own size
    labels, clabels = torch.full((p,), 2), torch.full((c,), 2)
    eligible = torch.arange(n_train) % 7 != 3
    coherence = D.coherence_curve(base, labels, ctrl, clabels, eligible, permutations=4000)
    pool = torch.cat([base, ctrl]).double()
    sizes = pool[:, eligible].abs().median(1).values
    pool /= sizes.clamp_min(sizes.median())[:, None]
    spread = pool.std(0)
    assert sizes[p + 2] > sizes.median()  # the wide control is brought down to the typical size: the case is met
    assert torch.equal(coherence.by_point.first, (pool[:p].max(0).values > pool[p:].max(0).values) & eligible)
    leads, counts = [], []
    for chosen in itertools.combinations(range(p + c), p):  # 10 splits, the observed one (0, 1) first
        playing = torch.zeros(p + c, dtype=torch.bool)
        playing[list(chosen)] = True
        lead = (pool[playing].max(0).values - pool[~playing].max(0).values) / spread
        leads.append(float(lead[eligible].clamp_min(0).sum()))
        counts.append(int(((lead > 0) & eligible).sum()))
    assert coherence.by_point.null == pytest.approx(sum(counts) / len(counts))
    assert coherence.by_point.p == pytest.approx(sum(t >= leads[0] * (1 - 1e-12) for t in leads) / len(leads))
    assert coherence.by_point.p == pytest.approx(0.1)  # the two groups put the observed split ahead of all 9 others
    assert int(coherence.by_point.first[:16].sum()) >= 12  # of the two groups' 14 eligible members


def test_training_labels_by_position():
    y = torch.tensor([3, 1, 4, 1, 5])
    data = torch.utils.data.TensorDataset(torch.rand(5, 2), y)
    assert D.training_labels(torch.utils.data.DataLoader(data, batch_size=2), 5).tolist() == y.tolist()

    class Kept(torch.utils.data.Dataset):
        targets = [0, 2, 2]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(2), self.targets[i]

    assert D.training_labels(torch.utils.data.DataLoader(Kept()), 3).tolist() == [0, 2, 2]

    class Relabelled(Kept):  # keeps the clean labels, yields others (a target_transform, a poisoning wrapper)
        def __getitem__(self, i):
            return torch.zeros(2), 9 - self.targets[i]

    assert D.training_labels(torch.utils.data.DataLoader(Relabelled(), batch_size=2), 3).tolist() == [9, 7, 7]
    indexed = [(torch.rand(2, 2), torch.tensor([7, 8]), torch.tensor([1, 0]))]
    assert D.training_labels(indexed, 2).tolist() == [8, 7]
    assert D.training_labels(indexed, 3).tolist() == [8, 7, -1]  # position 2 never yielded: never a candidate
    assert D.training_labels(indexed, 1) is None  # a position beyond N
    assert D.training_labels(None, 3) is None
    # a loader over a subset of a dataset whose stored labels would say every position's: only what it yields
    subset = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(5, 2), y, torch.arange(5)),
                                         batch_size=2, sampler=[4, 0, 2])
    assert D.training_labels(subset, 5).tolist() == [3, -1, 4, -1, 5]


def test_estimates_are_rates():
    """(1 + null) / observed exceeds 1 where the null count outnumbers the observed one; the estimate reported is a
    rate, at most 1, and the cut is the lowest one at the target."""
    cuts, observed = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64), torch.tensor([10, 4, 1])
    assert D.coherence_estimate(cuts, observed, torch.tensor([30.0, 12.0, 5.0]), 0.2) == (None, 1.0)
    assert D.coherence_estimate(cuts, observed, torch.tensor([1.0, 0.0, 0.0]), 0.2) == (0.2, 0.2)
    assert D.coherence_estimate(cuts, observed, torch.tensor([8.0, 2.0, 0.0]), 0.2) == (None, 0.75)


def test_small_sets_are_never_claimed():
    """The +1 of the estimate: fewer than 1/fdr examples cannot reach the target, however clean."""
    s = torch.zeros(1, 21, 300)
    s[0, 1::2] = 1.0  # every other example: ΔInfl alternates +1 / -1 over the copies (10 votes, 10 mirror)
    s[0, 2::2] = -1.0
    s[0, 0, [3, 9]] = 5.0  # two collapsing examples, no mirror anywhere near them
    eng = FakeEngine(lambda qx, qy: s.reshape(21, 300), n_train=300)
    res = detector(eng, n_transforms=20, fdr=0.2).detect(None, points(1), 1)
    assert not res.found and res.fdr_estimate == 0.5  # (1 + 0 mirror) / 2
    assert detector(eng, n_transforms=20, fdr=0.5).detect(None, points(1), 1).flagged.tolist() == [3, 9]


def test_mirror_swaps_with_the_sign_of_the_scores():
    eng = FakeEngine()
    res = detector(eng, threshold=-1.5).detect(None, points(2), 1)
    neg = FakeEngine(lambda qx, qy: -eng.returned)
    flipped = detector(neg, threshold=-1.5).detect(None, points(2), 1)
    assert torch.equal(res.votes, flipped.mirror_votes) and torch.equal(res.mirror_votes, flipped.votes)


def test_controls_gate_out_examples_that_support_the_label_in_general():
    """Examples that support held-out controls of the affected label as much as the affected point collapse
    like poisons (every copy has another label) but are no poisons: the controls keep them out."""
    n, n_train = 20, 300
    poisons = list(range(40))
    label_wide = list(range(40, 120))  # collapse as well, but support every image of the label

    def fn(qx, qy):
        g = torch.Generator().manual_seed(0)
        s = torch.randn(qx.shape[0], n_train, generator=g)
        s[0, poisons] = 50.0
        s[0, label_wide] = 50.0
        s[1:1 + n, poisons + label_wide] = torch.randn(n, 120, generator=g)
        s[1 + n:, label_wide] = 80.0  # the controls: supported more than the affected point
        s[1 + n:, poisons] = 0.0
        return s

    ref_x = torch.rand(5 + D.DEFAULT_N_CONTROLS + 3, 3, 8, 8)
    ref_y = torch.cat([torch.full((5,), 2), torch.full((D.DEFAULT_N_CONTROLS + 3,), 1)])
    labels = torch.tensor([1] * 120 + [0] * 180)  # poisons and label-wide examples carry the affected label
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(n_train, 3, 8, 8), labels), 64)
    eng = FakeEngine(fn, n_train)
    plain = detector(eng, n_transforms=n).detect(None, points(1), 1)
    assert set(plain.flagged.tolist()) >= set(poisons + label_wide)
    gated = detector(eng, n_transforms=n).detect(loader, points(1), 1, reference=(ref_x, ref_y))
    assert set(gated.flagged.tolist()) == set(poisons)
    qx, qy, _ = eng.calls[-1]
    c = D.DEFAULT_N_CONTROLS
    assert qx.shape[0] == 1 + n + c and qy[1 + n:].tolist() == [1] * c  # the first inputs labelled 1
    assert torch.equal(qx[1 + n:], ref_x[5:5 + c])
    assert gated.settings["n_controls"] == c and gated.control_support.shape == (n_train,)
    assert gated.eligible.tolist() == (labels == 1).tolist() and gated.support_cut is not None
    assert bool((gated.control_support[label_wide] < 0).all()) and bool((gated.control_support[poisons] > 0).all())


def test_pick_controls_needs_correct_predictions():
    model = MeanClassifier()
    xs = const_images([0.3, 0.3, 0.5, 0.29, 0.31, 0.32])
    ys = torch.tensor([3, 4, 3, 3, 3, 3])  # index 1: wrong label; index 2: predicted 5, labelled 3
    cx, cy = D.pick_controls(model, (xs, ys), torch.tensor([3]), count=2, exclude=xs[:1])
    assert cy.tolist() == [3, 3] and torch.equal(cx, xs[[3, 4]])  # 0 is the affected input itself
    cx, cy = D.pick_controls(model, (xs.numpy(), ys.numpy()), torch.tensor([3]), count=2, exclude=xs[:1])
    assert cy.tolist() == [3, 3] and torch.equal(cx, xs[[3, 4]])  # numpy arrays as (x, y) too
    data = [(xs[i], int(ys[i])) for i in range(6)]
    assert torch.equal(D.pick_controls(model, data, torch.tensor([3]), count=1)[0], xs[:1])
    assert D.pick_controls(model, (xs, ys), torch.tensor([7]), count=3)[1].numel() == 0
    eng = FakeEngine()
    eng.model = model
    with pytest.warns(UserWarning, match=r"label\(s\) \[7\]"):
        res = DeltaInfluence(eng, n_transforms=4).detect(None, const_images([0.7]), 7, reference=(xs, ys))
    assert res.control_support is None and res.settings["n_controls"] == 0


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


def test_defaults():
    det = DeltaInfluence(FakeEngine(), num_classes=K)
    assert det.n_transforms == D.DEFAULT_N_TRANSFORMS and det.threshold == D.DEFAULT_THRESHOLD
    assert det.tolerance is None and det.fdr == D.DEFAULT_FDR  # the calibrated cut
    assert det.combine == D.DEFAULT_COMBINE == "pooled" and det.domain == D.DEFAULT_DOMAIN == "pixel"


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
    assert torch.equal(only_tol.votes, r.votes) and only_tol.cut == 2 * 5
    calibrated = detector(FakeEngine(), fdr=0.3).detect(None, x, 1)
    assert torch.equal(r.revote(tolerance=None, fdr=0.3).flagged, calibrated.flagged)
    no_scores = detector(FakeEngine(), keep_scores=False).detect(None, x, 1)
    assert no_scores.raw_scores is None
    with pytest.raises(ValueError, match="keep_scores"):
        no_scores.revote(threshold=-1.0)


def test_revote_reads_the_scores_in_their_own_dtype():
    """The kept scores were a float32 copy of float64 scores (a score file kept them as they were): a revote with the
    detection's own settings lost every vote that rested on differences below float32's resolution."""
    n = 10

    def nearly_equal(qx, qy):
        out = torch.ones(qx.shape[0], N, dtype=torch.float64)
        transformed = torch.arange(qx.shape[0]) % (1 + n) != 0
        out[transformed, : N // 2] -= 1e-12  # each copy lowers these examples' score a little: every one votes
        return out

    r = detector(FakeEngine(nearly_equal), n_transforms=n, threshold=0.0, tolerance=1).detect(None, points(2), 1)
    assert r.raw_scores.dtype == torch.float64 and int(r.votes[:, : N // 2].min()) == n
    again = r.revote(threshold=0.0)
    assert torch.equal(again.votes, r.votes) and torch.equal(again.flagged, r.flagged)


def test_result_to_dict_is_json():
    res = detector(FakeEngine()).detect(None, points(2), 1)
    d = res.to_dict()
    s = json.dumps(d)
    back = json.loads(s)
    assert back["n_train"] == N and back["n_points"] == 2 and back["n_transforms"] == 10
    assert back["flagged"] == res.flagged.tolist() and back["found"] == res.found
    assert back["verdict"] == res.verdict and back["fdr"] == D.DEFAULT_FDR
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
    det = DeltaInfluence(eng, n_transforms=6, domain="normalized")  # stats read from model.normalize
    assert det.mean == [0.5, 0.5, 0.5] and det.std == [0.25, 0.25, 0.25]
    x = const_images([0.3, 0.7])
    res = det.detect(None, x, torch.tensor([3, 7]))
    assert res.settings["num_classes"] == K and res.settings["domain"] == "normalized"
    with pytest.raises(ValueError, match=r"does not predict test_y_adv.*build DeltaInfluence\(\.\.\., "
                                         r"check_prediction=False\)"):  # (detect() has no such argument)
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
        DeltaInfluence(eng, domain="normalized")  # no stats and no model
    with pytest.raises(ValueError, match="fdr"):
        detector(eng, fdr=1.0)
    with pytest.raises(ValueError, match="n_controls"):
        detector(eng, n_controls=-1)
    with pytest.raises(ValueError, match="candidates"):
        detector(eng, candidates="poisons")
    for too_few in (0, 1, 19):  # one re-split claimed a group on its own draw
        with pytest.raises(ValueError, match=r"^permutations must be an int >= 20"):
            detector(eng, permutations=too_few)
    with pytest.raises(ValueError, match="boundary"):
        detector(eng, boundary="widest")
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match=r"^retrace must be an int >= 0"):
            detector(eng, retrace=bad)
    with pytest.raises(ValueError, match="pixel_map: mean and std must be non-empty and of equal length"):
        detector(eng, pixel_map=([0.3] * 3, [0.4]))
    with pytest.raises(ValueError, match="pixel_map: mean must be finite and std finite and positive"):
        detector(eng, pixel_map=(0.5, -0.2))
    with pytest.raises(TypeError, match="^mean, std: expected per-channel numbers, got 'a' and 'b'"):
        DeltaInfluence(eng, mean="a", std="b")  # was torch's "new(): invalid data type 'str'"
    with pytest.raises(ValueError, match=r"^mean, std: expected finite numbers"):  # blamed on a transform
        DeltaInfluence(eng, domain="normalized", mean=[float("nan")], std=[1.0])
    with pytest.raises(ValueError, match=r"^pixel_map: offset must be finite and scale finite and positive"):
        detector(eng, pixel_map=D.PixelMap((0.5,), (0.0,)))  # ended in "non-finite measurement in queries"
    assert D.PixelMap((0.5,), (0.5,)).source == "given"  # was reported as 'identity'
    # in the pixel domain mean/std were kept (and reported) but not used to reach the pixels
    with pytest.warns(UserWarning, match=r"mean, std: .* pass pixel_map=\(mean, std\)"):
        DeltaInfluence(eng, mean=[0.5], std=[0.2])
    det = detector(eng)
    with pytest.raises(ValueError, match="test_x"):
        det.detect(None, torch.rand(8, 8), 1)
    with pytest.raises(TypeError, match="floating-point or integer"):
        det.detect(None, torch.zeros(3, 8, 8, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match=r"test_y_adv must be in \[0, 10\)"):
        det.detect(None, points(1), 10)
    with pytest.raises(ValueError, match="non-negative"):
        det.detect(None, points(1), -1)
    with pytest.raises(ValueError, match="one label per affected point"):
        det.detect(None, points(3), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="one label per affected point"):
        det.detect(None, points(3), [1, 2])
    # one label for several points, in a list as in a one-element tensor (the list was refused)
    other = detector(FakeEngine())
    assert torch.equal(other.detect(None, points(3), [1]).test_y_adv, torch.tensor([1, 1, 1]))
    with pytest.raises(TypeError, match="integer"):
        det.detect(None, points(1), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="between 1 and"):
        detector(eng, combine=3).detect(None, points(2), 1)
    with pytest.raises(ValueError, match="num_classes"):
        DeltaInfluence(eng, domain="pixel").detect(None, points(1), 1)
    bad = FakeEngine(lambda qx, qy: torch.zeros(3, 5))
    with pytest.raises(ValueError, match="ekfac.score must return"):
        detector(bad).detect(None, points(1), 1)
    # flags: "no" was taken as True
    for flag in ("check_prediction", "keep_scores", "progress"):
        with pytest.raises(TypeError, match=f"^{flag}: expected a bool, got 'no'"):
            detector(eng, **{flag: "no"})
    # a seed beyond 2**63 failed inside torch's generator after the fit ("Overflow when unpacking long long")
    for seed in (-1, 2 ** 64):
        with pytest.raises(ValueError, match=r"^seed must be an int in \[0, 2\*\*63\)"):
            detector(eng, seed=seed)
    with pytest.raises(TypeError, match="^model: expected the classifier"):
        detector(eng, model="m")
    nan_point = points(2)
    nan_point[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^test_x: affected input\(s\) \[1\] hold NaN or infinite values"):
        detector(eng, check_prediction=False).detect(None, nan_point, 1)
    assert len(eng.calls) == 0  # every error above was raised before scoring
    # numpy numbers are numbers (np.int64(20) was "not an int")
    numpy_made = detector(eng, n_transforms=np.int64(6), tolerance=np.int64(2), seed=np.int64(3),
                          n_controls=np.int64(0), permutations=np.int64(25), fdr=np.float32(0.25))
    assert (numpy_made.n_transforms, numpy_made.tolerance, numpy_made.seed) == (6, 2, 3)
    D.DeltaInfluence.check_settings(n_transforms=np.int64(5), tolerance=np.int64(2))


def test_a_model_that_rescales_integer_images_itself_is_refused():
    """uint8 training images and a model that divides only integer inputs by 255 (torchvision's ToDtype(scale=True)
    in the model): the copies and controls reach it as floats, 0-255, and the influence compared two scales (44
    clean examples flagged where 33 were). Refused before scoring; a model that treats both alike runs."""

    class Rescaling(nn.Module):
        def __init__(self, always):
            super().__init__()
            self.always, self.body = always, nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, K))

        def forward(self, x):
            if self.always or not x.is_floating_point():
                x = x.float() / 255
            return self.body(x)

    class FloatsOnly(Rescaling):  # an engine converts the batches for it: it cannot be one that rescales them
        def forward(self, x):
            if not x.is_floating_point():
                raise RuntimeError("Input type (unsigned char) and bias type (float) should be the same")
            return super().forward(x)

    class AtRandom(Rescaling):  # dropout kept on: its outputs cannot be compared
        def forward(self, x):
            return super().forward(x) + torch.randn(x.shape[0], K)

    images = (points(6) * 255).to(torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.arange(6) % K), batch_size=3)
    torch.manual_seed(0)
    for model in (Rescaling(False), Rescaling(True), FloatsOnly(True), AtRandom(False)):
        model = model.eval()
        label = int(model(images[:1].float()).argmax())
        eng = FakeEngine(n_train=6, model=model)
        det = detector(eng, model=model, n_controls=0, check_prediction=False)
        if model.always or isinstance(model, AtRandom):
            det.detect(loader, images[0].float(), label)
            assert len(eng.calls) == 1
        else:
            with pytest.raises(ValueError, match="^train_loader: its images are uint8, and the model gives other "
                                                 "outputs for them than for the same values as floats"):
                det.detect(loader, images[0].float(), label)
            assert not eng.calls


def test_a_reference_of_listed_inputs_is_stacked():
    """reference=([x0, x1, ...], labels) was read as a dataset of two items (torch's "stack expects each tensor to be
    equal size" inside an error saying the items must be (x, y))."""
    images = list(points(4))
    x, y = D.pick_controls(None, (images, [1, 0, 1, 1]), torch.tensor([1]), count=2)
    assert torch.equal(x, torch.stack([images[0], images[2]])) and y.tolist() == [1, 1]
    pairs = [(images[0], 1), (images[1], 0)]  # a list of two (x, y) pairs stays a dataset of pairs
    assert D.pick_controls(None, pairs, torch.tensor([0]), count=1)[1].tolist() == [0]


def test_no_training_example_of_the_affected_label_is_said():
    """Training labels that hold no example of the affected label (remapped labels): "no coherent poison set found"
    without a word of why."""
    labels = torch.tensor([0] * 300 + [2] * 300)
    ref = (torch.rand(D.DEFAULT_N_CONTROLS, 3, 8, 8), torch.ones(D.DEFAULT_N_CONTROLS, dtype=torch.int64))
    with pytest.warns(UserWarning, match=r"train_loader: no training example is labelled \[1\] \(the affected"):
        res = detector(FakeEngine(n_train=600), n_transforms=20).detect(label_loader(labels), points(1), 1,
                                                                       reference=ref)
    assert not res.found
    # one of several affected labels: the others have candidates, that one is still named
    ref = (torch.rand(2 * D.DEFAULT_N_CONTROLS, 3, 8, 8), torch.tensor([0, 1] * D.DEFAULT_N_CONTROLS))
    with pytest.warns(UserWarning, match=r"labelled \[1\] of the affected labels \[0, 1\]"):
        detector(FakeEngine(n_train=600), n_transforms=20).detect(label_loader(labels), points(2),
                                                                  torch.tensor([0, 1]), reference=ref)


def test_settings_are_checked_without_an_engine():
    """DeltaInfluence.check_settings refuses what the constructor refuses, before there is an engine."""
    D.DeltaInfluence.check_settings(n_transforms=5, tolerance=2, combine=3, n_points=3)
    for settings, error, match in (({"tolerance": 9, "n_transforms": 5}, ValueError, "tolerance"),
                                   ({"threshold": float("nan")}, ValueError, "threshold"),
                                   ({"fdr": 1.5}, ValueError, "fdr"),
                                   ({"combine": 5, "n_points": 3}, ValueError, "combine: 5 must be between 1 and"),
                                   ({"n_transform": 5}, TypeError, "n_transform: not a setting")):
        with pytest.raises(error, match=match):
            D.DeltaInfluence.check_settings(**settings)
        if "n_points" not in settings and "n_transform" not in settings:
            with pytest.raises(error, match=match):
                detector(FakeEngine(), **settings)


def test_integer_images_are_traced_as_their_values():
    """uint8 affected inputs (0-255) are scored as the same values in floating point, as floats 0-255 are."""
    x = (points(1) * 255).round()
    as_float, as_uint8 = FakeEngine(), FakeEngine()
    detector(as_float).detect(None, x, 1)
    detector(as_uint8).detect(None, x.to(torch.uint8), 1)
    torch.testing.assert_close(as_uint8.calls[0][0], as_float.calls[0][0])
    assert as_uint8.calls[0][0].dtype == torch.float32


def test_transforms_sharing_a_name_are_said():
    """Two lambdas in a pool were both reported as '<lambda>', their counts merged."""
    with pytest.warns(UserWarning, match=r"pool: several transforms share the name\(s\) \['<lambda>'\]"):
        detector(FakeEngine(), pool=[lambda v, g: v, lambda v, g: v.flip(-1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detector(FakeEngine(), pool=["hflip", "hflip"])  # the same transform twice is a weighting, not a clash


def test_a_user_transform_on_another_scale_is_refused():
    """A pool callable returning x * 10 gave copies in [0, 10] for [0, 1] data, scored without a word."""
    labels = torch.tensor([1] * 40 + [0] * 40)
    with pytest.raises(ValueError, match=r"^pool: a transform returns copies on another scale than the training "
                                         r"inputs \(its images range over \[0\.\d+, 9\.\d+\], the training images"):
        detector(FakeEngine(n_train=80), pool=[lambda v, g: v * 10], n_controls=0).detect(label_loader(labels),
                                                                                        points(1), 1)
    detector(FakeEngine(n_train=80), pool=[lambda v, g: (v + 0.05).clamp(0, 1)], n_controls=0).detect(
        label_loader(labels), points(1), 1)
    # one drawing from torch's global generator instead of the one it is given: runs with one seed differ
    with pytest.warns(UserWarning, match="pool: transform '<lambda>' gives different copies for generators seeded "
                                         "alike"):
        detector(FakeEngine(n_train=80), pool=[lambda v, g: (v + 0.05 * torch.randn_like(v)).clamp(0, 1)],
                 n_controls=0).detect(label_loader(labels), points(1), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detector(FakeEngine(n_train=80), pool=[lambda v, g: (v + 0.05 * torch.randn(v.shape, generator=g)).clamp(
            0, 1)], n_controls=0).detect(label_loader(labels), points(1), 1)


def test_a_pixel_map_that_cannot_be_right_is_said():
    """A pixel map given for inputs that are not images is ignored, and one that takes the affected inputs far
    outside [0, 1] (statistics of 0-255 pixels for [0, 1] data) is not the data's: both said."""
    with pytest.warns(UserWarning, match=r"pixel_map: it takes the affected inputs to values in \[76\.\d, 178\]"):
        detector(FakeEngine(), pixel_map=(76.5, 102.0)).detect(None, points(1), 1)
    pool = [lambda v, g: v + 0.1 * torch.randn(v.shape, generator=g)]
    with pytest.warns(UserWarning, match=r"pixel_map: ignored for inputs of shape \(12,\)"):
        detector(FakeEngine(), pixel_map=(0.5, 0.2), pool=pool).detect(None, torch.rand(1, 12), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detector(FakeEngine(), pixel_map=(0.5, 0.25)).detect(None, (points(1) - 0.5) / 0.25, 1)
    # the data's own (mean, std) given as a pipeline's for a model that normalises inside itself: the [0, 1]
    # training images map to [0.45, 0.75], where the copies were made without a word
    labels = torch.tensor([1] * 40 + [0] * 40)
    with pytest.warns(UserWarning, match=r"pixel_map: it takes the training images to values in \[0\.45, 0\.75\]"):
        detector(FakeEngine(n_train=80), pixel_map=(0.45, 0.3), n_controls=0).detect(label_loader(labels),
                                                                                    points(1), 1)
    with warnings.catch_warnings():  # the pipeline's statistics: its training inputs span the pixels
        warnings.simplefilter("error")
        standardised = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
            (torch.rand(80, 3, 8, 8) - 0.45) / 0.3, labels), batch_size=64)
        detector(FakeEngine(n_train=80), pixel_map=(0.45, 0.3), n_controls=0).detect(standardised,
                                                                                    (points(1) - 0.45) / 0.3, 1)


def test_training_controls_without_reference():
    """No reference data: the controls are the first correctly classified training examples of the affected
    label, and a control's influence on itself is left out of the gate."""
    model = MeanClassifier()
    xs = const_images([0.3, 0.5, 0.31, 0.7, 0.29, 0.32])
    ys = torch.tensor([3, 5, 3, 7, 4, 3])  # index 4: predicted 3, labelled 4
    loader = [(xs[:3], ys[:3], torch.tensor([10, 11, 12])), (xs[3:], ys[3:], torch.tensor([13, 14, 15]))]
    (cx, cy), own, set_aside = D.training_controls(model, loader, torch.tensor([3]), count=2)
    assert torch.equal(cx, xs[[0, 2]]) and cy.tolist() == [3, 3] and own.tolist() == [10, 12] and set_aside == 0

    n_train = 16
    seen = {}

    def fn(qx, qy):
        s = torch.zeros(qx.shape[0], n_train)
        s[1:5] = 1.0  # copies
        s[0, 10] = 9.0  # training control 10 supports the affected point...
        s[5, 10] = 99.0  # ...and itself far more: that must not count against it
        seen["q"] = qx.shape[0]
        return s

    eng = FakeEngine(fn, n_train)
    eng.model = model
    # (a point that is a copy of a training example would leave it out of the controls: not this one)
    res = DeltaInfluence(eng, n_transforms=4, n_controls=2, retrace=0).detect(loader, const_images([0.305]), 3)
    # every correctly classified example of the label is scored (up to twice n_controls: the influence screen
    # may set aside half), and the first n_controls the screen keeps are the controls
    assert seen["q"] == 1 + 4 + 3 and res.settings["controls"] == "training set" and res.settings["n_controls"] == 2
    assert float(res.control_support[10]) == 1.0  # one pair left (control 12), won by the affected point
    assert "controls from the training set, 0 example(s)" in res.verdict and "reference=" in res.verdict


def test_training_controls_leave_out_the_points_and_the_suspects():
    """A second pass (``retrace``) traces members of the group a first pass found: a training example that is an
    affected point is no control of its label, and the group's other members (``suspects``) are not drawn either."""
    model = MeanClassifier()
    xs = const_images([0.3, 0.5, 0.31, 0.29, 0.32, 0.33])
    ys = torch.tensor([3, 5, 3, 3, 3, 3])
    loader = [(xs[:3], ys[:3], torch.tensor([10, 11, 12])), (xs[3:], ys[3:], torch.tensor([13, 14, 15]))]
    eng = FakeEngine(n_train=16)
    eng.model = model
    detector = DeltaInfluence(eng, n_transforms=4, n_controls=1)
    peek, label = D._peek_inputs(loader), torch.tensor([3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model has no head to screen the controls with
        every = detector._controls(loader, None, const_images([0.9]), label, peek, K)
        assert every.own.tolist() == [10, 12]
        assert detector._controls(loader, None, xs[:1], label, peek, K).own.tolist() == [12, 13]
        assert detector._controls(loader, None, xs[:1], label, peek, K, torch.tensor([12, 13])).own.tolist() == [14, 15]


def _label_with_a_trigger_group(n_clean: int, n_poisons: int, seed: int = 0, trigger: float = 6.0):
    """A linear model that calls everything label 3 and reads its inputs as they are, with a loader of label-3
    examples in which every third one carries a shared 'trigger' direction (dirty-label poisons: classified
    correctly), and an affected point that carries it too (``trigger`` = 0: nothing sets them apart)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, K))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.arange(K) == 3)
    n = n_clean + n_poisons
    x = torch.randn(n, 8, generator=g)
    poison = torch.zeros(n, dtype=torch.bool)
    poison[torch.arange(n_poisons) * (n // n_poisons)] = True
    x[poison, 0] += trigger
    point = torch.randn(1, 8, generator=g)
    point[0, 0] += 6.0
    loader = [(x[a:a + 32], torch.full((min(32, n - a),), 3), torch.arange(a, min(n, a + 32))) for a in range(0, n, 32)]
    return model, loader, point, poison


def test_training_controls_set_aside_the_examples_that_look_like_the_points():
    """Dirty-label poisons carry the affected label and are classified as it, so the first training examples of
    the label include them; given the points, the examples whose head input lies with the points' (a second
    population) are set aside, and the controls are the first ordinary ones. One population: nothing is."""
    model, loader, point, poison = _label_with_a_trigger_group(n_clean=120, n_poisons=60)
    labels = torch.tensor([3])
    _, first, _ = D.training_controls(model, loader, labels, count=8)
    assert bool(poison[first].any())  # without the points: the first 8, poisons among them
    (cx, cy), own, set_aside = D.training_controls(model, loader, labels, count=8, points=(point, labels))
    assert cy.tolist() == [3] * 8 and not bool(poison[own].any())
    assert own.tolist() == (~poison).nonzero().flatten()[:8].tolist()  # the first ordinary ones, in order
    assert 0.9 * int(poison[:64].sum()) <= set_aside <= int(poison[:64].sum()) + 2  # the pool: 8 x 8 examples

    for seed in range(4):  # a lone poison is a population of its own, found by the mixture's best start
        model, loader, point, poison = _label_with_a_trigger_group(n_clean=120, n_poisons=1, seed=seed)
        _, own, set_aside = D.training_controls(model, loader, labels, count=8, points=(point, labels))
        assert not bool(poison[own].any()) and 1 <= set_aside <= 3
    for seed in range(4):  # one population (the examples of the label without any trigger): nothing is
        model, loader, point, poison = _label_with_a_trigger_group(n_clean=120, n_poisons=40, seed=seed, trigger=0.0)
        _, own, set_aside = D.training_controls(model, loader, labels, count=8, points=(point, labels))
        assert set_aside == 0 and own.tolist() == list(range(8))


def _labels_of_modes(two: bool, per_label: int = 40, seed: int = 0):
    """A linear model on (1, 8, 8) images that reads the label from pixel ``label`` (every example classified
    correctly), and a loader of ``per_label`` examples of each label, (x, y, positions): with ``two``, pixels
    20-27 are bright in half of every label's examples and dark in the others (two populations in the head
    input), else grey with the same noise as everything else (one population)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat_interleave(per_label)
    x = 0.05 + 0.02 * torch.rand(y.numel(), 64, generator=g)
    x[torch.arange(y.numel()), y] = 1.0
    x[:, 20:28] += (0.85 * (torch.arange(y.numel()) % 2)[:, None] if two else 0.4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, K))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[:, :K] = 10 * torch.eye(K)
        model[1].bias.zero_()
    x = x.view(-1, 1, 8, 8)
    loader = [(x[a:a + 64], y[a:a + 64], torch.arange(a, min(a + 64, y.numel()))) for a in range(0, y.numel(), 64)]
    return model, loader, x, y


def test_labels_in_modes_counts_the_labels_of_two_populations():
    """Each label other than the skipped ones is examined on its correctly classified examples: split when its head
    inputs along their first principal direction are two separated populations."""
    model, loader, _, _ = _labels_of_modes(two=True)
    assert D.labels_in_modes(model, loader, K, skip=[3], count=64) == (K - 1, K - 1)
    assert D.labels_in_modes(model, loader, K, skip=[3, 5], count=64) == (K - 2, K - 2)
    assert D.labels_in_modes(model, loader, K, skip=range(K), count=64) == (0, 0)
    assert D.labels_in_modes(model, loader, K, skip=[3], count=5) == (0, 0)  # too few examples to tell
    model, loader, _, _ = _labels_of_modes(two=False)
    assert D.labels_in_modes(model, loader, K, skip=[3], count=64) == (0, K - 1)
    assert D._modal_labels((7, 9)) and not D._modal_labels((6, 9)) and not D._modal_labels((0, 0))
    fives = const_images([0.46 + 0.007 * i for i in range(12)])  # class 5 to a model with no head to read
    assert D.labels_in_modes(MeanClassifier(), [(fives, torch.full((12,), 5), torch.arange(12))], K, [3], 64) == (0, 0)
    assert not D._modal_labels(None)


def test_training_controls_like_the_points_stay_where_labels_are_two_populations():
    """Without held-out data, training controls that look like the points are set aside as possible poisons. Where
    the other labels are two populations themselves, a population like the points is a mode of its label as
    likely as poisons: none is set aside (the first correctly classified examples are the controls), and the
    settings and the verdict say why. Where they are one population, the screens run: the same point-like half of
    the affected label is set aside."""
    for two, screened in ((True, False), (False, True)):
        model, loader, x, y = _labels_of_modes(two=two)
        x = x.clone()
        x[y == 3, :, 2, 4:] = 0.9 * (torch.arange(int((y == 3).sum())) % 2 == 1)[:, None, None].float()  # label 3: two
        eng = FakeEngine(n_train=y.numel(), model=model)                                               # populations
        point = x[(y == 3).nonzero()[1]].clone()
        res = detector(eng, n_controls=4).detect([(x[a:a + 64], y[a:a + 64], torch.arange(a, min(a + 64, y.numel())))
                                                  for a in range(0, y.numel(), 64)], point, 3)
        assert res.settings["controls_screened"] is screened
        assert res.settings["labels_split"] == ([K - 1, K - 1] if two else [0, K - 1])
        if two:
            assert res.settings["controls_set_aside"] == 0 and "two populations themselves" in res.verdict
        else:
            assert res.settings["controls_set_aside"] >= 15 and "set aside as possible poisons" in res.verdict


def _control_profiles(n_like: int, n_ordinary: int, n: int = 600, seed: int = 0, group_weight: float = 2.0,
                      label_weight: float = 1.0, noise: float = 0.3):
    """Scores (1, n) of an affected point and (C, n) of training controls: the first ``n_like`` controls share the
    point's influence profile (a group behind both, as poisons among the controls are), the others share only the
    label's common profile; the controls are interleaved, and each is the training example at the position of its
    row (its own column NaN, as an engine may leave it)."""
    g = torch.Generator().manual_seed(seed)
    label, group = label_weight * torch.randn(n, generator=g), group_weight * torch.randn(n, generator=g)
    point = (label + group + noise * torch.randn(n, generator=g)).unsqueeze(0)
    like = label + group + noise * torch.randn(n_like, n, generator=g)
    ordinary = label + noise * torch.randn(n_ordinary, n, generator=g)
    order = torch.randperm(n_like + n_ordinary, generator=g)
    controls = torch.cat([like, ordinary])[order]
    is_like = (order < n_like)
    controls[torch.arange(controls.shape[0]), torch.arange(controls.shape[0])] = float("nan")
    return point, controls, is_like


def test_screen_training_controls_sets_aside_the_controls_the_points_group_supports():
    """A poison among the training controls is supported by the points' group as the points are: its influence
    profile is the points'. Those controls are set aside when they form a second population, even half of the
    label's, and the first ``count`` others are kept; one population, or a majority like the point beyond what a
    label half poisons gives (the 99th percentile of Binomial(34, 1/2) is 24), is a trait of the label and keeps
    the first ``count``."""
    labels = torch.tensor([3])
    point, controls, is_like = _control_profiles(n_like=14, n_ordinary=20)
    keep, set_aside = D.screen_training_controls(point, labels, controls, torch.full((34,), 3), torch.arange(34), None, count=16)
    assert set_aside == 14 and not bool((keep & is_like).any())
    assert keep.nonzero().flatten().tolist() == (~is_like).nonzero().flatten()[:16].tolist()

    point, controls, is_like = _control_profiles(n_like=0, n_ordinary=34)
    keep, set_aside = D.screen_training_controls(point, labels, controls, torch.full((34,), 3), torch.arange(34), None, count=16)
    assert set_aside == 0 and keep.nonzero().flatten().tolist() == list(range(16))

    point, controls, is_like = _control_profiles(n_like=17, n_ordinary=17)
    keep, set_aside = D.screen_training_controls(point, labels, controls, torch.full((34,), 3), torch.arange(34), None, count=16)
    assert set_aside == 17 and not bool((keep & is_like).any()) and int(keep.sum()) == 16

    point, controls, is_like = _control_profiles(n_like=28, n_ordinary=6)
    keep, set_aside = D.screen_training_controls(point, labels, controls, torch.full((34,), 3), torch.arange(34), None, count=16)
    assert set_aside == 0 and keep.nonzero().flatten().tolist() == list(range(16))

    # only the candidates count: columns outside ``eligible`` carry no profile
    point, controls, is_like = _control_profiles(n_like=14, n_ordinary=20)
    eligible = torch.ones(600, dtype=torch.bool)
    eligible[300:] = False
    point[:, 300:] = 0.0
    controls[:, 300:] = torch.randn(34, 300)
    keep, set_aside = D.screen_training_controls(point, labels, controls, torch.full((34,), 3), torch.arange(34), eligible, count=16)
    assert set_aside == 14 and not bool((keep & is_like).any())


def test_screen_training_controls_sees_a_group_under_the_labels_common_profile():
    """When the label's common profile dominates every control's scores, a plain correlation with the point does
    not separate the controls the points' group supports from the others (their ranges overlap here); taken
    relative to the label's profile (the controls' median ranks) it does, and all 14 are set aside."""
    from scipy.stats import spearmanr

    point, controls, is_like = _control_profiles(n_like=14, n_ordinary=20, group_weight=1.0, label_weight=2.0, noise=1.5)
    rho = torch.from_numpy(spearmanr(torch.cat([point, controls]).nan_to_num(0.0).numpy(), axis=1)[0][0, 1:])
    assert float(rho[is_like].min()) < float(rho[~is_like].max())
    keep, set_aside = D.screen_training_controls(point, torch.tensor([3]), controls, torch.full((34,), 3),
                                                 torch.arange(34), None, count=16)
    assert set_aside == 14 and not bool((keep & is_like).any()) and int(keep.sum()) == 16


def test_screen_training_controls_sets_aside_a_group_of_most_of_them():
    """A dirty-label attack can make more than half of a label's training controls poisons, each supported by the
    points' group at its own strength (here 22 of 34, within the binomial bound of 24): the label's profile taken
    from all the controls is then mostly theirs, so the group is first found by the plain likeness, and all 22 are
    set aside once confirmed against the profile of the others."""
    g = torch.Generator().manual_seed(0)
    label = torch.randn(600, generator=g, dtype=torch.float64)
    spikes = (torch.rand(600, generator=g, dtype=torch.float64) < 0.1).double() * 3.0  # what the group supports
    point = (label + spikes + 0.3 * torch.randn(600, generator=g, dtype=torch.float64)).unsqueeze(0)
    strength = torch.rand(22, 1, generator=g, dtype=torch.float64) * 1.5 + 0.5
    like = label + strength * spikes + 0.3 * torch.randn(22, 600, generator=g, dtype=torch.float64)
    ordinary = label + 0.3 * torch.randn(12, 600, generator=g, dtype=torch.float64)
    order = torch.randperm(34, generator=g)
    controls, is_like = torch.cat([like, ordinary])[order], order < 22
    keep, set_aside = D.screen_training_controls(point, torch.tensor([3]), controls, torch.full((34,), 3),
                                                 torch.arange(34), None, count=8)
    assert set_aside == 22 and not bool((keep & is_like).any()) and int(keep.sum()) == 8


def test_screen_training_controls_confirms_a_group_before_setting_it_aside(monkeypatch):
    """A misclassified clean input that shares a little of a mode of its label (here 11 of 32 controls hold it, at
    varied strengths) makes some controls stand apart from the label's profile at first; taken again without
    them, the profile leaves no group standing apart, so nothing is set aside."""
    g = torch.Generator().manual_seed(2)
    label, mode = torch.randn(400, generator=g), torch.randn(400, generator=g)
    point = (label + 0.3 * mode + torch.randn(400, generator=g)).unsqueeze(0)
    held = label + mode * (0.5 + torch.rand(11, 1, generator=g)) + torch.randn(11, 400, generator=g)
    ordinary = label + torch.randn(21, 400, generator=g)
    controls = torch.cat([held, ordinary])[torch.randperm(32, generator=g)]
    suspected = []
    separated_upper = D._separated_upper

    def spy(likeness, most):
        suspects = separated_upper(likeness, most)
        suspected.append(int(suspects.sum()))
        return suspects

    monkeypatch.setattr(D, "_separated_upper", spy)
    keep, set_aside = D.screen_training_controls(point, torch.tensor([3]), controls, torch.full((32,), 3),
                                                 torch.arange(32), None, count=16)
    assert max(suspected) > 0  # some controls stood apart at first
    assert set_aside == 0 and keep.nonzero().flatten().tolist() == list(range(16))


def test_training_controls_without_a_head_are_not_screened():
    """A model with no nn.Linear / nn.Conv2d head gives no representation to screen the training controls
    with: a warning says so and the controls are the first correctly classified examples."""
    model = MeanClassifier()
    xs = const_images([0.3, 0.5, 0.31, 0.7, 0.29, 0.32])
    ys = torch.tensor([3, 5, 3, 7, 4, 3])
    loader = [(xs[:3], ys[:3], torch.tensor([10, 11, 12])), (xs[3:], ys[3:], torch.tensor([13, 14, 15]))]
    with pytest.warns(UserWarning, match="not screened for poisons"):
        _, own, set_aside = D.training_controls(model, loader, torch.tensor([3]), count=2,
                                                points=(const_images([0.3]), torch.tensor([3])))
    assert own.tolist() == [10, 12] and set_aside == 0


def test_training_controls_fill_in_labels_the_reference_lacks():
    """A clean-label victim can misclassify every held-out input of its target class: that label's controls
    then come from the training set (their own influence left out), with a warning saying so."""
    model = MeanClassifier()
    xs = const_images([0.3, 0.5, 0.31, 0.7, 0.29, 0.32])
    ys = torch.tensor([3, 5, 3, 7, 4, 3])
    loader = [(xs[:3], ys[:3], torch.tensor([10, 11, 12])), (xs[3:], ys[3:], torch.tensor([13, 14, 15]))]
    ref = (const_images([0.5, 0.7]), torch.tensor([5, 7]))  # no input of label 3
    n_train = 16

    def fn(qx, qy):
        s = torch.zeros(qx.shape[0], n_train)
        s[1:5] = 1.0
        s[0, 10] = 9.0
        s[5, 10] = 99.0  # the training control at position 10 on itself: left out
        return s

    eng = FakeEngine(fn, n_train)
    eng.model = model
    with pytest.warns(UserWarning, match=r"label\(s\) \[3\] in the reference; their controls come from the training"):
        # (a point that is a copy of a training example would leave it out of the controls: not this one)
        res = DeltaInfluence(eng, n_transforms=4, n_controls=2, retrace=0).detect(loader, const_images([0.305]), 3,
                                                                              reference=ref)
    qx, qy, _ = eng.calls[-1]
    # scored: every correctly classified training example of label 3 (up to twice n_controls); kept: the first 2
    assert res.settings["controls"] == "reference + training set" and qy[5:].tolist() == [3, 3, 3]
    assert torch.equal(qx[5:], xs[[0, 2, 5]]) and float(res.control_support[10]) == 1.0
    assert res.settings["n_controls"] == 2


def test_held_out_controls_too_few_for_the_test_give_way_to_training_controls():
    """One point against C held-out controls: the outranking test's smallest p-value is 1 / (C + 1), so below 19
    controls it can never reach its level 0.05 (100 classes, 10 held-out inputs each: a BadNet traced from one point
    found nothing with the test set as reference, every poison without it). When the reference runs out below
    n_controls that way, the held-out controls decide first and, where they find no group, training controls of the
    label, with a warning; enough points for the test, or the count the user asked for, keep the held-out ones."""
    model = MeanClassifier()
    xs = const_images([0.3, 0.5, 0.31, 0.7, 0.29, 0.32, 0.305, 0.295])
    ys = torch.tensor([3, 5, 3, 7, 4, 3, 3, 3])
    loader = [(xs[:4], ys[:4], torch.arange(4)), (xs[4:], ys[4:], torch.arange(4, 8))]
    ref = (0.3 + 0.2 * (torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)) - 0.5),
           torch.tensor([3] * 5))  # five distinct inputs of class 3
    eng = FakeEngine(lambda qx, qy: torch.randn(qx.shape[0], 8, generator=torch.Generator().manual_seed(0)), 8)
    eng.model = model
    with pytest.warns(UserWarning, match=r"^controls: the reference holds too few correctly classified inputs \(5 of "
                                         r"label 3\) for the outranking test"):
        # (not a copy of a training example, which would leave it out of the controls)
        thin = DeltaInfluence(eng, n_transforms=4, n_controls=8, retrace=0).detect(loader, const_images([0.315]), 3,
                                                                               reference=ref)
    assert thin.settings["controls"] == "reference + training set" and not thin.found
    assert thin.settings["n_controls"] == 5  # the training controls, once the held-out ones found nothing
    assert "controls from the training set" in thin.verdict
    assert eng.calls[-1][0].shape[0] == 5 + 5 + 5  # the point and its 4 copies, the 5 held-out, the 5 training
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="controls: the reference holds too few")
        # two points and 5 controls split 21 ways: the test can reach 0.05
        points = torch.cat([const_images([0.3]), 0.3 + 0.2 * (torch.rand(1, 3, 8, 8) - 0.5)])
        two = DeltaInfluence(eng, n_transforms=4, n_controls=8).detect(loader, points, torch.tensor([3, 3]),
                                                                       reference=ref)
        assert two.settings["controls"] == "reference"
        asked = DeltaInfluence(eng, n_transforms=4, n_controls=5).detect(loader, const_images([0.3]), 3, reference=ref)
        assert asked.settings["controls"] == "reference"


def test_each_label_says_where_its_own_controls_came_from():
    """Points of two labels, a reference with inputs of one: each label's verdict said the run's source, label 5
    "controls from the training set" although all of its controls were held-out inputs."""
    xs = const_images([0.3, 0.5, 0.31, 0.7, 0.29, 0.32])
    ys = torch.tensor([3, 5, 3, 7, 4, 3])
    loader = [(xs[:3], ys[:3], torch.tensor([10, 11, 12])), (xs[3:], ys[3:], torch.tensor([13, 14, 15]))]
    ref = (const_images([0.51, 0.7, 0.49]), torch.tensor([5, 7, 5]))  # no input of label 3
    eng = FakeEngine(lambda qx, qy: torch.randn(qx.shape[0], 16, generator=torch.Generator().manual_seed(0)), 16)
    eng.model = MeanClassifier()
    with pytest.warns(UserWarning, match=r"label\(s\) \[3\] in the reference"):
        res = DeltaInfluence(eng, n_transforms=4, n_controls=2).detect(loader, const_images([0.3, 0.5]),
                                                                      torch.tensor([3, 5]), reference=ref)
    assert res.settings["controls"] == "reference + training set"
    assert res.per_label[3].settings["controls"].startswith("training set")
    assert res.per_label[5].settings["controls"] == "reference"
    assert "controls from the training set" not in res.per_label[5].verdict


def test_reference_inputs_of_another_shape_are_named():
    """A model that runs at any size took 10x10 reference inputs beside 8x8 training data to torch.cat's error."""
    model = MeanClassifier()
    eng = FakeEngine(lambda qx, qy: torch.zeros(qx.shape[0], 6), 6)
    eng.model = model
    big = torch.stack([torch.full((3, 10, 10), v) for v in (0.5, 0.3)])
    with pytest.raises(ValueError, match=r"^reference: its inputs have shape \(3, 10, 10\), but the affected inputs "
                                         r"have shape \(3, 8, 8\)"):
        DeltaInfluence(eng, n_transforms=4).detect(None, const_images([0.3]), 3, reference=(big, torch.tensor([5, 3])))


def test_reference_inputs_and_labels_the_model_cannot_take_are_named():
    """A NaN reference input (its NaN logits read as class 0) became a control, and the run failed deep in the scoring
    ("non-finite measurement in queries 192..255"); labels counted from 1 or shifted matched no class, and the run
    fell back to training controls with a warning about the reference's classification."""
    eng = FakeEngine(lambda qx, qy: torch.zeros(qx.shape[0], 6), 6)
    eng.model = MeanClassifier()
    ref = const_images([0.31, 0.29, 0.3])
    ref[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^reference: input\(s\) \[1\] hold NaN or infinite values"):
        DeltaInfluence(eng, n_transforms=4).detect(None, const_images([0.3]), 3, reference=(ref, torch.tensor([3] * 3)))
    shifted = torch.tensor([4, 13, 4])  # MeanClassifier gives K = 10 logits; the inputs are of class 3
    with pytest.raises(ValueError, match=r"^reference: label 13 is not a class of the model, which gives 10 logits "
                                         r"\(labels 0..9\), and no input is labelled \[3\]"):
        DeltaInfluence(eng, n_transforms=4).detect(None, const_images([0.3]), 3,
                                                   reference=(const_images([0.31, 0.29, 0.3]), shifted))
    # an unlabelled input (-1) beside controls of the label is no matter
    eng = FakeEngine(lambda qx, qy: torch.randn(qx.shape[0], 6, generator=torch.Generator().manual_seed(0)), 6)
    eng.model = MeanClassifier()
    unlabelled = (const_images([0.31, 0.29, 0.3]), torch.tensor([3, -1, 3]))
    assert DeltaInfluence(eng, n_transforms=4).detect(None, const_images([0.3]), 3, reference=unlabelled) \
        .settings["controls"] == "reference"
    # nor where the label is simply missing: the run goes on as before (decided without controls, with a warning)
    missing = (const_images([0.51, 0.52, 0.5]), torch.tensor([5, -1, 5]))
    with pytest.warns(UserWarning, match=r"no correctly classified input of label\(s\) \[3\]"):
        DeltaInfluence(eng, n_transforms=4).detect(None, const_images([0.3]), 3, reference=missing)


class FileEngine(FakeEngine):
    """A FakeEngine that, like EKFAC.score(out=...), can write its scores to a .npy file and return a view of it."""

    def score(self, query_x, query_y, train_loader, out=None):
        scores = super().score(query_x, query_y, train_loader)
        if out is None:
            return scores
        np.save(out, scores.numpy())
        self.mapped = torch.from_numpy(np.load(out, mmap_mode="c"))
        return self.mapped


@pytest.mark.parametrize("block", [7, 1 << 16])
def test_score_file_and_column_blocks_give_the_same_vote(tmp_path, monkeypatch, block):
    poisons = list(range(0, 400, 8))
    make = lambda: FileEngine(lambda qx, qy: collapse_scores(2, 20, 400, poisons), n_train=400)  # noqa: E731
    plain = detector(make(), n_transforms=20).detect(None, points(2), 1)
    monkeypatch.setattr(D, "_BLOCK", block)  # 7: 58 blocks of columns, the last one short
    engine = make()
    stored = detector(engine, n_transforms=20, score_file=tmp_path / "scores.npy").detect(None, points(2), 1)
    assert torch.equal(stored.votes, plain.votes) and torch.equal(stored.mirror_votes, plain.mirror_votes)
    assert stored.flagged.tolist() == plain.flagged.tolist() and set(poisons) <= set(stored.flagged.tolist())
    assert torch.equal(stored.raw_scores, plain.raw_scores)
    # with many queries the blocks narrow, so that a block's float64 copy stays bounded (816 queries: 1.3 GB)
    assert D._columns(42) == min(block, 1 << 16) and D._columns(816 * 51) * 816 * 51 * 8 <= D._BLOCK_BYTES
    # the kept raw scores are a view of the file the engine wrote, not a copy in memory
    assert stored.raw_scores.untyped_storage().data_ptr() == engine.mapped.untyped_storage().data_ptr()
    assert plain.raw_scores.untyped_storage().data_ptr() != engine.mapped.untyped_storage().data_ptr()
    # the base scores are the result's own: an edit of them reached the raw scores a revote reads
    stored.base_scores.clamp_(min=0)
    assert torch.equal(stored.raw_scores, plain.raw_scores)


def test_score_file_needs_an_engine_that_writes_files(tmp_path):
    with pytest.raises(TypeError, match="score_file: the engine FakeEngine cannot write"):
        detector(FakeEngine(), score_file=tmp_path / "s.npy")
    with pytest.raises(ValueError, match="score_file: expected a path ending in .npy"):
        detector(FileEngine(), score_file=tmp_path / "s.pt")
    with pytest.raises(FileNotFoundError, match="score_file: directory .* does not exist"):
        detector(FileEngine(), score_file=tmp_path / "missing" / "s.npy")


def test_the_fixed_rule_estimate_scales_the_mirror_side_to_the_vote_side():
    """With controls, the gate puts a candidate on the vote side (support > 0) or the mirror side (< 0). When it
    puts every candidate on the vote side, nothing stands for its ordinary examples: the estimate was
    1 / #flagged (0.005 for 197 clean examples flagged from ordinary inputs), and is now 1.0."""
    from deltainf.delta import _decide

    votes = torch.full((1, 200), 10, dtype=torch.int64)
    mirror = torch.zeros((1, 200), dtype=torch.int64)
    all_supporting = _decide(votes, mirror, 10, "pooled", 2, 0.2, support=torch.full((200,), 0.5))
    assert all_supporting["flagged"].numel() == 200 and all_supporting["fdr_estimate"] == 1.0
    # half on each side, no mirror example at the cut: (1 + 0) x (100 / 100) / 100 flagged, as before
    support = torch.cat([torch.full((100,), 0.5), torch.full((100,), -0.5)])
    halves = _decide(votes, mirror, 10, "pooled", 2, 0.2, support=support)
    assert halves["flagged"].numel() == 100 and halves["fdr_estimate"] == pytest.approx(0.01)


def test_the_mirror_cut_is_held_to_the_estimate_it_reports():
    """The mirror cut of a found group was chosen where the plain estimate (1 + #mirror) / #past met the fdr, while
    the added set's estimate was reported with the mirror count scaled to the vote side: three times as many
    candidates there, and a cut reported at 0.45 added 50 clean examples. It is now chosen at the reported estimate
    where that is the larger."""
    from deltainf.delta import Coherence, _decide

    poisons, clean, mirror_side = 50, 250, 100
    n_train = poisons + clean + mirror_side
    support = torch.cat([torch.ones(poisons), torch.full((clean,), 0.1), torch.full((mirror_side,), -0.5)]).double()
    votes = torch.zeros(1, n_train, dtype=torch.int64)
    votes[0, :poisons] = 20
    votes[0, poisons:poisons + 50] = 15  # 50 clean examples on the vote side collapse under 15 of 20 copies ...
    mirror = torch.zeros(1, n_train, dtype=torch.int64)
    mirror[0, poisons + clean:poisons + clean + 14] = 15  # ... as 14 of the 100 on the mirror side rise under them
    coherence = Coherence(torch.tensor([0.5, 1.0], dtype=torch.float64), torch.tensor([poisons, poisons]),
                          torch.zeros(2, dtype=torch.float64), 1.0)
    out = _decide(votes, mirror, 20, "pooled", None, 0.2, support=support, coherence=coherence, boundary="coherence")
    # plain: (1 + 14) / 100 = 0.15 at the cut of 15; reported: x (300 / 100) = 0.45
    assert out["support_cut"] == 0.5 and out["cut"] == 20
    assert out["flagged"].tolist() == list(range(poisons))
    assert out["mirror_added"] == (0, pytest.approx(3.0 / poisons))
    # with the mirror side the larger (150 of the clean examples on it), the plain estimate is the larger: it decides,
    # and the cut of 15 stands
    fewer = support.clone()
    fewer[poisons + 100:poisons + clean] = -0.1
    plain = _decide(votes, mirror, 20, "pooled", None, 0.2, support=fewer, coherence=coherence, boundary="coherence")
    assert plain["cut"] == 15 and plain["mirror_added"][0] == 50 and plain["mirror_added"][1] <= 0.2


def test_repeated_points_and_controls_count_once():
    """Ten copies of one affected input (or with faint noise), and a reference listing its images twice, were taken
    as independent evidence: a poison-free model claimed a group of 117 from one ordinary misclassified input. Each
    repeated input now counts once, with a warning for the points."""
    eng = FakeEngine(lambda qx, qy: torch.randn(qx.shape[0], N, generator=torch.Generator().manual_seed(1)))
    x = points(1)
    copies = torch.cat([x, x, x + 1e-4 * torch.rand(1, 3, 8, 8), points(1, seed=5)])
    with pytest.warns(UserWarning, match=r"test_x: 2 of the 4 affected inputs repeat an earlier one .* \(2 points\)"):
        res = detector(eng).detect(None, copies, 1)
    assert res.n_points == 2
    model = MeanClassifier()
    ref = const_images([0.3, 0.3, 0.3 + 1e-5, 0.31, 0.3 + 2e-3])
    x, labels = D.pick_controls(model, (ref, torch.full((5,), 3)), torch.tensor([3]), count=5)
    assert x.shape[0] == 2 and labels.tolist() == [3, 3]  # 0.3 and its near copies once, 0.31 once
    # only copies with the same label merge, and inputs that are not images only when equal (rows of an
    # unstandardised feature, or token ids, differ by less than 1 % between distinct inputs)
    assert D._distinct_points(torch.cat([x[:1], x[:1]]), torch.tensor([3, 4]))[0].shape[0] == 2
    rows = torch.tensor([[52000.0, 1.0], [52300.0, 2.0], [52000.0, 1.0]])
    assert D._distinct_points(rows, torch.tensor([1, 1, 1]))[0].shape[0] == 2


def test_scores_that_tell_nothing_apart_are_an_error():
    """A damping far outside the eigenvalues' range made every score NaN (1e-100) or exactly 0 (1e40): the run said
    "no coherent poison set found" on a poisoned model. Scores that differ between queries but not between training
    examples (tied rows) had a group of them claimed with an estimate of 0.05-0.08."""
    for value in (float("nan"), 0.0):
        eng = FakeEngine(lambda qx, qy, v=value: torch.full((qx.shape[0], N), v))
        what = "NaN" if value != 0 else "exactly 0"
        with pytest.raises(ValueError, match=f"every training example's score is {what}"):
            detector(eng).detect(None, points(1), 1)
    tied = FakeEngine(lambda qx, qy: torch.arange(qx.shape[0], dtype=torch.float32).unsqueeze(1).expand(-1, N) + 1)
    with pytest.raises(ValueError, match="every training example's score is the same on each query"):
        detector(tied).detect(None, points(2), 1)


def test_labels_follow_an_index_column_and_num_classes_the_model():
    """A TensorDataset whose third tensor permutes the positions: the candidates' labels are read from the batches
    (the stored order was taken, and the run found nothing); num_classes that the model's outputs contradict is an
    error naming it (an internal 'query_y' was named)."""
    n = 12
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 3
    loader = DataLoader(TensorDataset(torch.zeros(n, 2), labels, perm), batch_size=5)
    expected = torch.empty(n, dtype=torch.int64)
    expected[perm] = labels
    assert torch.equal(D.training_labels(loader, n), expected)
    with pytest.raises(ValueError, match="^num_classes=20, but the model gives 10 logits"):
        DeltaInfluence(FakeEngine(), model=MeanClassifier(), num_classes=20, n_transforms=4).detect(
            None, const_images([0.3]), 3)


def test_a_label_with_one_training_control_is_said():
    """Without held-out data, a label with one training example has that example as its only control, never compared
    with itself: its support was NaN and the verdict read as if a test had run."""
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(4, 1, 8, 8, generator=g)
    counts = (30, 30, 30, 1)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = (templates[y] + 0.15 * torch.randn(len(y), 1, 8, 8, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    affected = (templates[3] + 0.1 * torch.randn(3, 1, 8, 8, generator=g)).clamp(0, 1)
    assert bool((model(affected).argmax(1) == 3).all())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    from deltainf import EKFAC

    ekfac = EKFAC(model, progress=False).fit(loader)
    with pytest.warns(UserWarning, match=r"controls: one training control only for label\(s\) \[3\]"):
        result = DeltaInfluence(ekfac, seed=0).detect(loader, affected, 3)
    assert not result.found and torch.isnan(result.control_support[90])
