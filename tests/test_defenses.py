"""Poison detectors: agreement with IBM ART 1.20.1 on the same activations, decision rules, errors."""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from deltainf.attacks import badnet_attack
from deltainf.data import ImageDataset, load_digits_dataset
from deltainf.defenses import (DETECTORS, ActivationClustering, DeltaInfluenceDetector, DetectorResult, EKFACThreshold, FrequencyDetector,
                               InfluenceThreshold, SpectralSignatures, TRAKThreshold, dct2, get_detector,
                               synthesize_triggers)
from deltainf.defenses._common import extract_features
from deltainf.models import penultimate_features
from deltainf.train import TrainConfig, train_model

# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def poisoned():
    train = load_digits_dataset("train", size=8, channels=1).subset(torch.arange(600))
    test = load_digits_dataset("test", size=8, channels=1)
    return badnet_attack(train, test, target_class=0, source_classes=1, num_poisons=20, size=2, seed=0)


@pytest.fixture(scope="module")
def victim(poisoned):
    cfg = TrainConfig.digits(progress=False, epochs=8, lr=1e-2, model_kwargs=dict(width=8, hidden=32))
    return train_model(poisoned.train, cfg)


@pytest.fixture(scope="module")
def live(victim, poisoned):
    """Penultimate units that vary within every class. Dead ReLU units make scikit-learn's FastICA return
    NaN inside ART (its whitening takes component signs from the first feature); comparing on the live
    units keeps ART running. Our detector drops such columns itself (see reduce_activations)."""
    feats, labels, _ = extract_features(victim, poisoned.train)
    keep = torch.ones(feats.shape[1], dtype=torch.bool)
    for c in labels.unique():
        keep &= (feats[labels == c].amax(0) - feats[labels == c].amin(0)) > 0
    assert int(keep.sum()) > 10
    return keep


class _ARTView(nn.Module):
    """ART reads the LAST registered top-level child (reference B5): register a feature module last so
    ART's activations are exactly the features our detectors read."""

    def __init__(self, net, keep):
        super().__init__()
        self.net = net
        self.keep = keep
        self.feat = nn.Identity()

    def forward(self, x):
        f = penultimate_features(self.net, x)
        self.feat(f[:, self.keep])  # what ART's hook records
        return self.net.classifier(f)


@pytest.fixture(scope="module")
def feature_fn(victim, live):
    return lambda x: penultimate_features(victim, x)[:, live]


@pytest.fixture(scope="module")
def art_classifier(victim, poisoned, live):
    pytest.importorskip("art")
    from art.estimators.classification import PyTorchClassifier

    c, h, w = poisoned.train.image_shape
    clf = PyTorchClassifier(_ARTView(victim, live), loss=nn.CrossEntropyLoss(), input_shape=(c, h, w),
                            nb_classes=10)
    assert clf.layer_names[-1] == "feat"
    return clf


# ------------------------------------------------------------------------------------- agreement with ART


def test_art_reads_the_same_activations(art_classifier, victim, poisoned, feature_fn):
    x = poisoned.train.images.numpy()
    art_acts = art_classifier.get_activations(x, layer=len(art_classifier.layer_names) - 1, batch_size=128)
    ours, labels, _ = extract_features(victim, poisoned.train, feature_fn)
    np.testing.assert_allclose(art_acts.reshape(len(x), -1), ours.numpy(), rtol=1e-5, atol=1e-6)
    assert torch.equal(labels, poisoned.train.labels)


@pytest.mark.parametrize("expected", [0.05, 0.33])
def test_spectral_signatures_matches_art(art_classifier, victim, poisoned, feature_fn, expected):
    from art.defences.detector.poison import SpectralSignatureDefense

    x, y = poisoned.train.images.numpy(), poisoned.train.labels.numpy()
    art = SpectralSignatureDefense(art_classifier, x, y, expected_pp_poison=expected, eps_multiplier=1.5)
    report, is_clean = art.detect_poison()
    art_flagged = np.flatnonzero(np.asarray(is_clean) == 0)
    ours = SpectralSignatures("art", expected_poison_fraction=expected, feature_fn=feature_fn).detect(
        victim, poisoned.train)
    assert isinstance(ours, DetectorResult)
    np.testing.assert_array_equal(ours.flagged.numpy(), art_flagged)
    # ART reports the score of every flagged index
    idx = np.array(sorted(report))
    np.testing.assert_allclose(ours.scores.numpy()[idx], np.array([report[i] for i in idx]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduce", ["PCA", "FastICA"])
def test_activation_clustering_matches_art(art_classifier, victim, poisoned, feature_fn, monkeypatch, reduce):
    import sklearn.cluster
    import sklearn.decomposition

    import art.defences.detector.poison.activation_defence as art_ac
    from art.defences.detector.poison import ActivationDefence

    # ART builds KMeans (and FastICA) without a random_state; give it the seed our detector uses so both
    # run the very same scikit-learn computation on the same activations.
    real_ica = sklearn.decomposition.FastICA
    x, y = poisoned.train.images.numpy(), poisoned.train.labels.numpy()
    with monkeypatch.context() as mp, warnings.catch_warnings():
        mp.setattr(art_ac, "KMeans", lambda n_clusters: sklearn.cluster.KMeans(
            n_clusters=n_clusters, random_state=0, n_init=10))
        mp.setattr(sklearn.decomposition, "FastICA", lambda n_components, max_iter, tol: real_ica(
            n_components=n_components, max_iter=max_iter, tol=tol, random_state=0))
        warnings.simplefilter("ignore")
        _, is_clean = ActivationDefence(art_classifier, x, y).detect_poison(
            nb_clusters=2, nb_dims=10, reduce=reduce, cluster_analysis="smaller")
    art_flagged = np.flatnonzero(np.asarray(is_clean) == 0)
    ours = ActivationClustering("art", reduce=reduce, seed=0, feature_fn=feature_fn).detect(victim, poisoned.train)
    assert ours.info["analysis"] == "smaller" and ours.info["nb_dims"] == 10
    np.testing.assert_array_equal(ours.flagged.numpy(), art_flagged)


# ------------------------------------------------------------------------------------ decision rules


def _planted(n_clean=270, n_poison=30, d=16, seed=0):
    """Two classes of activations; class 0 holds a small far-away cluster (the 'poisons')."""
    g = np.random.default_rng(seed)
    clean0 = g.normal(size=(n_clean, d))
    poison = g.normal(size=(n_poison, d)) + 6.0
    clean1 = g.normal(size=(n_clean + n_poison, d)) + 2.0
    acts = np.vstack([clean0, poison, clean1]).astype(np.float32)
    labels = np.array([0] * (n_clean + n_poison) + [1] * (n_clean + n_poison))
    return torch.from_numpy(acts), torch.from_numpy(labels), np.arange(n_clean, n_clean + n_poison)


@pytest.mark.parametrize("variant", ["chen", "art", "paper"])
def test_activation_clustering_flags_planted_cluster(variant):
    acts, labels, poison = _planted()
    res = ActivationClustering(variant).detect_from_activations(acts, labels)
    flagged = set(res.flagged.tolist())
    assert set(poison.tolist()) <= flagged
    in_class1 = {i for i in flagged if labels[i] == 1}
    if variant == "chen":
        # relative size: class 0's small cluster (10 %) is poisonous, the unimodal class 1 splits evenly
        assert flagged == set(poison.tolist()) and not in_class1
        assert res.info["per_class"][1]["poison_cluster"] is None
    else:
        # "smaller": the smaller cluster of EVERY class is flagged (ART default, Delta-Influence baseline)
        assert in_class1
    assert res.scores.shape == (len(labels),)
    assert float(res.scores[poison].min()) > float(res.scores[: len(poison)].max())


def test_activation_clustering_silhouette_and_prediction_grouping(victim, poisoned):
    acts, labels, poison = _planted()
    res = ActivationClustering("chen", analysis="silhouette").detect_from_activations(acts, labels)
    assert set(res.flagged.tolist()) == set(poison.tolist())
    assert res.info["per_class"][0]["silhouette"] > 0.10
    res = ActivationClustering("art", group_by="prediction").detect(victim, poisoned.train)
    assert res.info["group_by"] == "prediction" and res.num_flagged > 0
    # FastICA on the raw activations (with dead units) runs without NaN
    res = ActivationClustering("chen").detect(victim, poisoned.train.subset(torch.arange(250)))
    assert torch.isfinite(res.scores).all()


def test_activation_defences_name_activations_they_cannot_use():
    for defence in (SpectralSignatures(), ActivationClustering()):
        with pytest.raises(ValueError, match=r"activations: expected \(N, D\) with N, D >= 1, got shape \(0, 4\)"):
            defence.detect_from_activations(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
        with pytest.raises(ValueError, match="activations: hold NaN or infinite values"):  # AC flagged nothing
            defence.detect_from_activations(torch.full((6, 4), float("nan")), torch.zeros(6, dtype=torch.long))


def test_spectral_signatures_tran_rule():
    acts, labels, poison = _planted(d=12)
    eps = 0.1
    res = SpectralSignatures("tran", expected_poison_fraction=eps).detect_from_activations(acts, labels)
    flagged = res.flagged.numpy()
    for c in (0, 1):
        idx = np.flatnonzero(labels.numpy() == c)
        # remove the top ceil(1.5 eps n_y) of each class: 45 of 300, although 1.5 * 0.1 * 300 is 45.00000000000001
        assert np.isin(flagged, idx).sum() == math.ceil(round(1.5 * eps * len(idx), 9)) == 45
        r = acts.numpy()[idx].astype(np.float64)
        m = r - r.mean(0)
        v = np.linalg.svd(m, full_matrices=False)[2][0]
        np.testing.assert_allclose(res.scores.numpy()[idx], (m @ v) ** 2, rtol=1e-4, atol=1e-4)
    assert set(poison.tolist()) <= set(flagged.tolist())


@pytest.mark.parametrize("variant", ["tran", "art"])
def test_spectral_signatures_bound_per_class(variant):
    """eps_y per class (Tran et al.'s definition): a mapping bounds each class on its own, a class it leaves out
    loses nothing; a scalar bounds every class alike."""
    acts, labels, _ = _planted(d=12)
    n_class = [int((labels == c).sum()) for c in (0, 1)]
    res = SpectralSignatures(variant, expected_poison_fraction={np.int64(1): 0.2}).detect_from_activations(acts, labels)
    flagged = labels[res.flagged]
    assert int((flagged == 0).sum()) == 0 and res.info["per_class"][0]["removed"] == 0
    per_scalar = SpectralSignatures(variant, expected_poison_fraction=0.2).detect_from_activations(acts, labels)
    assert int((flagged == 1).sum()) == int((labels[per_scalar.flagged] == 1).sum()) >= math.floor(0.3 * n_class[1])
    # no poison expected, said as a scalar or by eps_multiplier 0: nothing removed (ART's quantile took each class's
    # top example, where the mapping form removed none)
    for settings in ({"expected_poison_fraction": 0.0}, {"eps_multiplier": 0.0}):
        assert SpectralSignatures(variant, **settings).detect_from_activations(acts, labels).num_flagged == 0
    for bad, match in (({-1: 0.1}, r"expected_poison_fraction: its keys must be class labels \(ints >= 0\), got -1"),
                       ({0: 1.5}, r"expected_poison_fraction\[0\]: expected a finite number in \[0, 1\], got 1.5")):
        with pytest.raises(ValueError, match=match):
            SpectralSignatures(variant, expected_poison_fraction=bad)


def test_spectral_signatures_paper_variant():
    acts, labels, poison = _planted(d=12)
    res = SpectralSignatures("paper", sv_threshold=7.0, norm_threshold=7.0).detect_from_activations(acts, labels)
    x = acts.numpy().astype(np.float64)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    keep = s > 7.0
    norms = np.linalg.norm(u[:, keep] * s[keep], axis=1)
    np.testing.assert_array_equal(res.flagged.numpy(), np.flatnonzero(norms > 7.0))
    assert set(poison.tolist()) <= set(res.flagged.tolist())


# ---------------------------------------------------------------------------------------- frequency


def test_dct2_is_orthonormal_dct_of_8bit_pixels():
    from scipy.fft import idctn

    x = torch.rand(2, 3, 8, 8)
    d = dct2(x)
    back = idctn(d.numpy(), type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(back, torch.floor(x * 255).numpy() / 255, atol=1e-5)


def test_synthetic_triggers_change_images():
    x = torch.rand(10, 3, 16, 16) * 0.5 + 0.25
    out, kinds = synthesize_triggers(x, torch.Generator().manual_seed(0), kinds=torch.arange(10) % 5)
    assert out.shape == x.shape and kinds.tolist() == (torch.arange(10) % 5).tolist()
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert bool(((out - x).abs().flatten(1).amax(1) > 0).all())
    assert bool((out[kinds == 0] == 1.0).flatten(1).any(1).all())  # white blocks


@pytest.mark.parametrize("kinds", [[7, 7, 7, 7], [0, 1, -1, 4], [0, 5, 1, 2], [0.5, 1, 2, 3], [True] * 4])
def test_synthetic_triggers_refuse_unknown_kinds(kinds):
    """A kind outside [0, 5) was stamped as a blend without a word."""
    with pytest.raises(ValueError, match=r"^kinds: expected trigger kinds, ints in \[0, 5\) indexing \('white_block'"):
        synthesize_triggers(torch.rand(4, 3, 16, 16), torch.Generator().manual_seed(0), kinds)


def test_frequency_detector_flags_triggered_images():
    train = load_digits_dataset("train", size=8, channels=1)
    test = load_digits_dataset("test", size=8, channels=1)
    clean = train.subset(torch.arange(600))
    det = FrequencyDetector(optimizer="adam", lr=3e-3, epochs=4, widths=(8, 16, 32), seed=0,
                            trigger_kinds=("white_block", "gaussian_noise"))
    det.fit(clean)
    kinds = torch.tensor([0, 2]).repeat(len(test) // 2)
    triggered, _ = synthesize_triggers(test.images[: kinds.numel()], torch.Generator().manual_seed(1), kinds)
    mixed = ImageDataset(torch.cat([test.images, triggered]),
                         torch.cat([test.labels, test.labels[: kinds.numel()]]))
    res = det.detect(None, mixed)
    is_trig = torch.arange(len(mixed)) >= len(test)
    tpr = float(res.mask()[is_trig].float().mean())
    fpr = float(res.mask()[~is_trig].float().mean())
    assert tpr > 0.6 and fpr < 0.25 and tpr > fpr + 0.5, (tpr, fpr)
    assert torch.equal(res.flagged, torch.nonzero(res.scores >= 0.5).flatten())


def test_frequency_detector_fits_on_train_set_with_warning():
    data = load_digits_dataset("train", size=8, channels=1).subset(torch.arange(64))
    det = FrequencyDetector(epochs=1, widths=(4, 4, 4))
    with pytest.warns(UserWarning, match="clean_dataset"):
        res = det.detect(None, data)
    assert det.fitted and res.scores.shape == (64,)


# ------------------------------------------------------------------------------ influence thresholding


class _FixedScorer:
    def __init__(self, scores):
        self.scores = scores
        self.calls = []

    def score(self, query_x, query_y, train_loader):
        self.calls.append((query_x.shape, query_y.tolist(), len(train_loader.dataset)))
        return self.scores


def test_threshold_detectors_flag_top_scoring_points(poisoned):
    n = len(poisoned.train)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, n, generator=g)
    s[0, :5] = 50.0
    s[1, 10:13] = 30.0
    scorer = _FixedScorer(s)
    qx, qy = torch.rand(2, 1, 8, 8), torch.tensor([0, 0])
    res = EKFACThreshold(scorer).detect(None, poisoned.train, qx, qy)  # default threshold 10 (paper)
    assert res.info["threshold"] == 10.0
    assert res.flagged.tolist() == [0, 1, 2, 3, 4, 10, 11, 12]  # "max": above the threshold on any query
    assert scorer.calls == [((2, 1, 8, 8), [0, 0], n)]
    EKFACThreshold(scorer).detect(None, poisoned.train, qx, 3)  # one label for every query
    assert scorer.calls[-1] == ((2, 1, 8, 8), [3, 3], n)
    torch.testing.assert_close(res.scores, s.max(0).values)
    res = EKFACThreshold(scorer, reduce="min").detect(None, poisoned.train, qx, qy)
    assert res.num_flagged == 0
    res = InfluenceThreshold(scorer, top_k=4, reduce="mean").detect(None, poisoned.train, qx, qy)
    assert res.flagged.tolist() == sorted(torch.argsort(s.mean(0), descending=True)[:4].tolist())
    res = TRAKThreshold(scorer).detect(None, poisoned.train, qx, qy)  # automatic robust threshold
    assert res.info["threshold_rule"] == "auto"
    assert set(res.flagged.tolist()) >= {0, 1, 2, 3, 4, 10, 11, 12}
    assert res.num_flagged < 40
    res = InfluenceThreshold(top_fraction=0.01).detect(None, poisoned.train, scores=s[0])
    assert res.num_flagged == math.ceil(0.01 * n) and {0, 1, 2, 3, 4} <= set(res.flagged.tolist())
    hundred = torch.utils.data.TensorDataset(torch.rand(100, 2), torch.zeros(100, dtype=torch.long))
    res = InfluenceThreshold(top_fraction=0.07).detect(None, hundred, scores=torch.randn(100))
    assert res.num_flagged == 7  # not 8: 0.07 * 100 is 7.000000000000001 in floating point
    # a plain callable works too
    res = InfluenceThreshold(lambda qx, qy, loader: s, threshold=20.0).detect(None, poisoned.train, qx, qy)
    assert res.flagged.tolist() == [0, 1, 2, 3, 4, 10, 11, 12]
    # one NaN score made the automatic threshold NaN (nothing flagged) and top_k flag it; a label 2.7 was cut to 2
    with_nan = s.clone()
    with_nan[0, 7] = float("nan")
    for detector in (TRAKThreshold(), InfluenceThreshold(top_k=1)):
        with pytest.raises(ValueError, match="^scores: non-finite values for 1 training example"):
            detector.detect(None, poisoned.train, scores=with_nan)
    with pytest.raises(ValueError, match="^query_y: expected class indices \\(whole numbers\\), got 2.7"):
        EKFACThreshold(scorer).detect(None, poisoned.train, qx, 2.7)


def test_threshold_queries_are_shaped_as_the_training_examples():
    """Every 3-D query was taken for one image (five (2, 2) sequences became one query with one label), and tabular
    queries were refused; the automatic threshold took torch's lower middle value as the median of an even count."""
    from deltainf.defenses.influence_threshold import robust_threshold

    seen = []

    def scorer(qx, qy, loader):
        seen.append((tuple(qx.shape), qy.tolist()))
        return torch.zeros(qx.shape[0], 12)

    sequences = torch.utils.data.TensorDataset(torch.randn(12, 2, 2), torch.arange(12) % 3)
    InfluenceThreshold(scorer, top_k=1).detect(None, sequences, torch.randn(5, 2, 2), 1)
    InfluenceThreshold(scorer, top_k=1).detect(None, sequences, torch.randn(2, 2), 1)
    tabular = torch.utils.data.TensorDataset(torch.randn(12, 4), torch.arange(12) % 3)
    InfluenceThreshold(scorer, top_k=1).detect(None, tabular, torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert seen == [((5, 2, 2), [1] * 5), ((1, 2, 2), [1]), ((3, 4), [0, 1, 2])]
    with pytest.raises(ValueError, match=r"^query_x: expected one input of the training examples' shape \(4,\)"):
        InfluenceThreshold(scorer, top_k=1).detect(None, tabular, torch.randn(3, 5), 1)
    assert robust_threshold(torch.tensor([0.0, 1.0, 3.0, 10.0]), 1.0) == pytest.approx(2.0 + 1.4826 * 1.5)


def test_threshold_detectors_with_deltainf_scorers(victim, poisoned):
    from deltainf.influence import EKFAC, TRAKScorer
    from deltainf.data import make_loader

    data = poisoned.train.subset(torch.arange(120))
    loader = make_loader(data, 60)
    qx, qy = data.images[:1], torch.tensor([3])
    ek = EKFAC(victim, progress=False).fit(loader)
    raw = ek.score(qx, qy, make_loader(data, 60))
    res = get_detector("ekfac", scorer=ek, top_k=7).detect(victim, data, qx, qy)
    assert res.flagged.tolist() == sorted(torch.argsort(raw[0], descending=True)[:7].tolist())
    trak = TRAKScorer(victim, proj_dim=32, progress=False).fit(loader)
    res = get_detector("trak_threshold", scorer=trak, threshold=0.0).detect(victim, data, qx, qy)
    torch.testing.assert_close(res.scores, trak.score(qx, qy)[0].float())
    assert torch.equal(res.flagged, torch.nonzero(res.scores > 0).flatten())


# ------------------------------------------------------------------------------------------- errors


def test_registry():
    assert set(DETECTORS) == {"delta_influence", "activation_clustering", "spectral_signatures", "frequency",
                              "ekfac_threshold", "trak_threshold"}
    assert isinstance(get_detector("AC"), ActivationClustering)
    assert isinstance(get_detector("delta", n_transforms=8), DeltaInfluenceDetector)
    assert isinstance(get_detector("spectral-signatures", variant="art"), SpectralSignatures)
    with pytest.raises(ValueError, match="activation_clustering.*spectral_signatures|valid names"):
        get_detector("strip")
    with pytest.raises(TypeError):
        get_detector(3)


def test_model_without_penultimate_layer_is_a_clear_error(poisoned):
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    for det in (ActivationClustering(), SpectralSignatures()):
        with pytest.raises(TypeError, match="penultimate.*feature_fn"):
            det.detect(plain, poisoned.train)
    # a user feature_fn makes it work
    res = SpectralSignatures(feature_fn=lambda x: plain[0](x)).detect(plain, poisoned.train)
    assert res.scores.shape == (len(poisoned.train),)


@pytest.mark.parametrize("make", [
    lambda: ActivationClustering(variant="mine"), lambda: ActivationClustering(reduce="TSNE"),
    lambda: ActivationClustering(nb_dims=0), lambda: ActivationClustering(size_threshold=1.5),
    lambda: ActivationClustering(analysis="distance"), lambda: ActivationClustering(group_by="cluster"),
    lambda: SpectralSignatures(variant="x"), lambda: SpectralSignatures(expected_poison_fraction=1.5),
    lambda: SpectralSignatures(eps_multiplier=-1), lambda: FrequencyDetector(threshold=2.0),
    lambda: FrequencyDetector(epochs=0), lambda: FrequencyDetector(trigger_kinds=("laser",)),
    lambda: FrequencyDetector(widths=5), lambda: FrequencyDetector(widths=("a", "b", "c")),  # raw errors before
    lambda: FrequencyDetector(widths=(8,)), lambda: FrequencyDetector(widths=(0, 0, 0)),  # refused only at fit
    lambda: InfluenceThreshold(threshold=1.0, top_k=3), lambda: InfluenceThreshold(),
    lambda: EKFACThreshold(threshold="median"), lambda: EKFACThreshold(top_k=-1),
    lambda: EKFACThreshold(reduce="median"),
])
def test_bad_settings(make):
    with pytest.raises(ValueError):
        make()


_U32, _U64 = 2 ** 32 - 1, 2 ** 64 - 1


@pytest.mark.parametrize("make, message", [
    # strings passed float() and were stored as strings (a TypeError deep in detect)
    (lambda: SpectralSignatures(expected_poison_fraction="0.1"),
     "expected_poison_fraction: expected a finite number in [0, 1], got '0.1'"),
    (lambda: SpectralSignatures(expected_poison_fraction=True),
     "expected_poison_fraction: expected a finite number in [0, 1], got True"),
    (lambda: SpectralSignatures(expected_poison_fraction=math.nan),
     "expected_poison_fraction: expected a finite number in [0, 1], got nan"),
    # inf gave an OverflowError (or, with a zero fraction, a NaN) in detect
    (lambda: SpectralSignatures(eps_multiplier=math.inf), "eps_multiplier: expected a finite number >= 0, got inf"),
    (lambda: SpectralSignatures(eps_multiplier="1.5"), "eps_multiplier: expected a finite number >= 0, got '1.5'"),
    (lambda: SpectralSignatures(eps_multiplier=False), "eps_multiplier: expected a finite number >= 0, got False"),
    (lambda: SpectralSignatures("paper", sv_threshold=math.inf),
     "sv_threshold: expected a finite number >= 0, got inf"),
    (lambda: SpectralSignatures("paper", norm_threshold=-1.0),
     "norm_threshold: expected a finite number >= 0, got -1.0"),
    (lambda: SpectralSignatures("paper", norm_threshold="7"),
     "norm_threshold: expected a finite number >= 0, got '7'"),
    (lambda: ActivationClustering(size_threshold="0.3"),
     "size_threshold: expected a finite number in (0, 1), got '0.3'"),
    (lambda: ActivationClustering(size_threshold=math.nan),
     "size_threshold: expected a finite number in (0, 1), got nan"),
    (lambda: ActivationClustering(silhouette_threshold="0.1"),
     "silhouette_threshold: expected a finite number in [-1, 1], got '0.1'"),
    (lambda: ActivationClustering(silhouette_threshold=-math.inf),
     "silhouette_threshold: expected a finite number in [-1, 1], got -inf"),
    # seeds failed only inside scikit-learn, whose random_state takes [0, 2**32 - 1]
    (lambda: ActivationClustering(seed=-1), f"seed: expected an int in [0, {_U32}], got -1"),
    (lambda: ActivationClustering(seed=1.5), f"seed: expected an int in [0, {_U32}], got 1.5"),
    (lambda: ActivationClustering(seed=2 ** 32), f"seed: expected an int in [0, {_U32}], got {2 ** 32}"),
    (lambda: ActivationClustering(seed=True), f"seed: expected an int in [0, {_U32}], got True"),
    (lambda: InfluenceThreshold(top_fraction="0.5"), "top_fraction: expected a finite number in [0, 1], got '0.5'"),
    (lambda: InfluenceThreshold(top_fraction=math.nan), "top_fraction: expected a finite number in [0, 1], got nan"),
    (lambda: InfluenceThreshold(threshold="auto", auto_z="3"), "auto_z: expected a finite number > 0, got '3'"),
    (lambda: InfluenceThreshold(threshold="auto", auto_z=math.inf), "auto_z: expected a finite number > 0, got inf"),
    (lambda: InfluenceThreshold(threshold=math.inf), "threshold: expected a finite number or 'auto', got inf"),
    (lambda: EKFACThreshold(threshold="median"), "threshold: expected a finite number or 'auto', got 'median'"),
    # FrequencyDetector's seed was never checked (-1 and 1.5 reached torch's generator)
    (lambda: FrequencyDetector(seed=-1), f"seed: expected an int in [0, {_U64}], got -1"),
    (lambda: FrequencyDetector(seed=1.5), f"seed: expected an int in [0, {_U64}], got 1.5"),
    (lambda: FrequencyDetector(seed="a"), f"seed: expected an int in [0, {_U64}], got 'a'"),
    (lambda: FrequencyDetector(seed=2 ** 64), f"seed: expected an int in [0, {_U64}], got {2 ** 64}"),
    (lambda: FrequencyDetector(lr=math.inf), "lr: expected a finite number > 0, got inf"),
    (lambda: FrequencyDetector(weight_decay=math.nan), "weight_decay: expected a finite number >= 0, got nan"),
    (lambda: FrequencyDetector(threshold="0.5"), "threshold: expected a finite number in [0, 1], got '0.5'"),
])
def test_bad_settings_name_the_argument(make, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        make()


def test_numeric_settings_are_stored_as_numbers():
    """Any real number (numpy and 0-d tensors too) is accepted and stored as a float; an integer seed as an int."""
    ss = SpectralSignatures(expected_poison_fraction=np.float32(0.25), eps_multiplier=torch.tensor(2.0),
                            sv_threshold=3, norm_threshold=np.int64(2))
    assert (ss.expected_poison_fraction, ss.eps_multiplier, ss.sv_threshold, ss.norm_threshold) == (0.25, 2.0, 3.0, 2.0)
    assert all(type(v) is float for v in (ss.expected_poison_fraction, ss.eps_multiplier, ss.sv_threshold))
    ac = ActivationClustering(size_threshold=np.float64(0.3), silhouette_threshold=-1, seed=np.int64(_U32))
    assert (ac.size_threshold, ac.silhouette_threshold, ac.seed) == (0.3, -1.0, _U32) and type(ac.seed) is int
    assert ActivationClustering("paper").seed == 3407 and ActivationClustering().size_threshold == 0.35
    it = InfluenceThreshold(top_fraction=1)
    assert type(it.top_fraction) is float and it.top_fraction == 1.0 and it.auto_z == 3.0
    fd = FrequencyDetector(seed=_U64, lr=1, weight_decay=0, threshold=1)
    assert (fd.seed, fd.lr, fd.weight_decay, fd.threshold) == (_U64, 1.0, 0.0, 1.0)


def test_spectral_signatures_huge_eps_multiplier_removes_whole_classes():
    """eps_multiplier * fraction * n_y overflowed to inf for a huge finite eps_multiplier (an OverflowError)."""
    acts, lab = torch.randn(60, 5, generator=torch.Generator().manual_seed(0)), torch.arange(60) % 3
    for variant in ("tran", "art"):
        assert SpectralSignatures(variant, eps_multiplier=1e308).detect_from_activations(acts, lab).num_flagged == 60


def test_bad_detect_inputs(poisoned):
    n = len(poisoned.train)
    det = EKFACThreshold(_FixedScorer(torch.zeros(1, n + 1)))
    with pytest.raises(ValueError, match="scores"):
        det.detect(None, poisoned.train, torch.rand(1, 8, 8), 0)
    with pytest.raises(ValueError, match="query_x"):
        EKFACThreshold(_FixedScorer(torch.zeros(1, n))).detect(None, poisoned.train, torch.rand(8, 8), 0)
    with pytest.raises(ValueError, match="query_y"):
        EKFACThreshold(_FixedScorer(torch.zeros(1, n))).detect(None, poisoned.train, torch.rand(2, 1, 8, 8), [0, 1, 2])
    with pytest.raises(ValueError, match="scorer"):
        EKFACThreshold().detect(None, poisoned.train, torch.rand(1, 8, 8), 0)
    with pytest.raises(TypeError, match="scorer"):
        EKFACThreshold(scorer=42)
    with pytest.raises(ValueError, match="groups"):
        ActivationClustering().detect_from_activations(torch.rand(5, 3), torch.zeros(4))
    with pytest.raises(TypeError, match="train_dataset"):
        SpectralSignatures().detect(nn.Linear(2, 2), 5)
    with pytest.raises(ValueError, match="H, W >= 8"):
        FrequencyDetector(epochs=1).fit(ImageDataset(torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)))


def test_delta_influence_behind_the_common_interface():
    """Δ-Influence through get_detector and Detector.run, like every baseline: one result type."""
    import deltainf
    from deltainf.attacks import DIGITS_BADNET, badnet_attack
    from deltainf.data import load_digits_dataset
    from deltainf.delta import DetectionResult, pick_affected_points
    from deltainf.detector import DetectorResult as Common
    from deltainf.train import TrainConfig, train_model

    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    poison = badnet_attack(train, test, seed=0, **DIGITS_BADNET)
    victim = train_model(poison.train, TrainConfig.digits(epochs=6, progress=False))
    pts = pick_affected_points(victim, poison.triggered_test, poison.target_class, count=5)
    det = get_detector("delta_influence", n_transforms=20)
    res = det.run(victim, poison.train, query_x=pts.x, query_y=poison.target_class, reference=test,
                  clean_dataset=train)  # an input this detector does not take is left out
    assert isinstance(res, DetectionResult) and isinstance(res, Common)
    assert res.scores.shape == (len(poison.train),) and res.mask().sum() == res.num_flagged
    assert len(set(res.flagged.tolist()) & set(poison.poison_indices.tolist())) >= 0.9 * poison.num_poisons
    assert isinstance(deltainf.DetectionResult, type)

    class Unreached:  # the labels are checked before any scoring
        model = victim

        def fit(self, loader):
            return self

        def score(self, *args):
            raise AssertionError("scored before the labels were checked")

    with pytest.raises(ValueError, match=r"query_y must be in \[0, 10\)"):  # its own argument's name
        det.detect(victim, poison.train, query_x=pts.x, query_y=12, scorer=Unreached())
