"""Tests for deltainf.report."""
import dataclasses
import json

import pytest
import torch

from deltainf import report as R
from deltainf.delta import DeltaInfluence


class Engine:
    def score(self, qx, qy, loader):
        g = torch.Generator().manual_seed(0)
        s = torch.randn(qx.shape[0], 30, generator=g)
        s[0, :3] = 50.0  # three "poisons" with collapsing influence
        return s


def detection(p=1):
    det = DeltaInfluence(Engine(), n_transforms=6, domain="pixel", num_classes=10)
    return det.detect(None, torch.rand(p, 3, 8, 8, generator=torch.Generator().manual_seed(1)), 2)


def test_write_report_files_and_json(tmp_path):
    res = detection()
    paths = R.write_report(tmp_path / "out", {"psr": 0.25, "undefined": float("nan"), "t": torch.tensor(3)}, res,
                           poison_indices=[0, 1, 2], affected_x=torch.rand(3, 8, 8),
                           train_images=torch.rand(30, 3, 8, 8),
                           title="unit test", settings={"attack": "badnet"})
    assert paths["json"].exists() and paths["png"].exists() and paths["png"].stat().st_size > 1000
    with open(paths["json"]) as f:
        rep = json.load(f)
    env = rep["environment"]
    for key in ("platform", "cpu_count", "torch", "numpy", "deltainf", "git_commit", "python"):
        assert key in env
    assert rep["results"]["psr"] == 0.25 and rep["results"]["undefined"] is None and rep["results"]["t"] == 3
    assert rep["settings"]["attack"] == "badnet" and rep["title"] == "unit test"
    assert rep["detection"]["flagged"] == res.flagged.tolist()
    assert rep["detection_metrics"]["n_poisons"] == 3
    assert len(rep["detection"]["poison_vote_histogram"][0]) == 7
    # the poisons as a bool mask, or with a repeat: the same poison statistics as their positions
    mask = torch.zeros(res.n_train, dtype=torch.bool)
    mask[[0, 1, 2]] = True
    for poisons in (mask, [2, 0, 1, 1]):
        again = json.loads(R.write_report(tmp_path / "again", {}, res, poison_indices=poisons, plot=False)["json"]
                           .read_text())
        for key in ("poison_votes_mean", "poison_vote_histogram"):
            assert again["detection"][key] == rep["detection"][key], key


def test_write_report_names_what_it_cannot_use(tmp_path):
    res = detection()
    with pytest.raises(ValueError, match="train_images: 5 images for a detection over 30 training examples"):
        R.write_report(tmp_path / "out", {}, res, train_images=torch.rand(5, 3, 8, 8))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="out_dir: '.*afile' exists and is not a folder"):
        R.write_report(tmp_path / "afile", {}, res)
    with pytest.raises(TypeError, match="detection_result: expected a Δ-Influence DetectionResult, got dict"):
        R.write_report(tmp_path / "out", {}, {"flagged": []})


def test_write_report_without_detection_and_without_plot(tmp_path):
    paths = R.write_report(tmp_path, {"clean_accuracy": 0.9}, plot=False)
    assert set(paths) == {"json"} and not (tmp_path / "report.png").exists()
    assert json.loads(paths["json"].read_text())["detection"] is None
    paths = R.write_report(tmp_path, {"clean_accuracy": 0.9})
    assert paths["png"].exists()


def test_write_report_several_points_dataset_images(tmp_path):
    res = detection(p=2)
    train = [(torch.rand(1, 8, 8), 0) for _ in range(30)]  # a dataset of grey images
    paths = R.write_report(tmp_path, None, res, affected_x=torch.rand(2, 1, 8, 8), train_images=train)
    assert paths["png"].exists()
    json.loads(paths["json"].read_text())


def test_write_report_points_of_two_labels(tmp_path):
    """Each label decided on its own: the report plots each label's statistic over its own points and keeps every
    label's decision in the JSON."""
    labels = torch.tensor([2] * 15 + [3] * 15)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(30, 3, 8, 8), labels), batch_size=8)
    ref = (torch.rand(8, 3, 8, 8), torch.tensor([2] * 4 + [3] * 4))
    det = DeltaInfluence(Engine(), n_transforms=6, domain="pixel", num_classes=10, n_controls=4, boundary="mixture")
    res = det.detect(loader, torch.rand(3, 3, 8, 8), torch.tensor([2, 3, 3]), reference=ref)
    assert set(res.per_label) == {2, 3}
    paths = R.write_report(tmp_path, None, res, affected_x=torch.rand(3, 3, 8, 8), train_images=torch.rand(30, 3, 8, 8))
    assert paths["png"].exists()
    assert set(json.loads(paths["json"].read_text())["detection"]["per_label"]) == {"2", "3"}


def test_format_table():
    t = R.format_table({"flagged": 12, "precision": 0.5, "fpr": 1.2e-5, "name": "x"}, title="metrics")
    lines = t.splitlines()
    assert lines[0] == "metrics" and any("precision" in ln and "0.5000" in ln for ln in lines)
    assert "1.200e-05" in t
    rows = [{"detector": "delta", "tpr": 1.0}, {"detector": "ekfac", "tpr": 0.25, "fpr": 0.1}]
    t = R.format_table(rows)
    header = t.splitlines()[0].split()
    assert header == ["detector", "tpr", "fpr"] and "None" in t.splitlines()[2]
    assert len(t.splitlines()) == 4


def test_to_jsonable():
    out = R.to_jsonable({"a": torch.tensor([1.0, float("inf")]), "b": (1, 2), 3: float("nan")})
    assert out == {"a": [1.0, None], "b": [1, 2], "3": None}
    json.dumps(out, allow_nan=False)


def test_write_report_with_unscored_examples(tmp_path):
    class NaNEngine(Engine):
        def score(self, qx, qy, loader):
            s = super().score(qx, qy, loader)
            s[:, 5] = float("nan")  # a training position the engine never visited
            return s

    det = DeltaInfluence(NaNEngine(), n_transforms=6, domain="pixel", num_classes=10)
    res = det.detect(None, torch.rand(1, 3, 8, 8), 2)
    assert res.votes[0, 5] == 0 and 5 not in res.flagged.tolist()
    paths = R.write_report(tmp_path, {}, res, poison_indices=[0, 1])
    assert paths["png"].exists()
    json.loads(paths["json"].read_text())
    # the result's own JSON form too: statistics over the scored examples, NaN arrays as null (NaN is not JSON)
    d = json.loads(json.dumps(res.to_dict(include_arrays=True), allow_nan=False))
    assert d["base_scores"][0][5] is None and d["delta_stats"]["base_score_min"][0] is not None


def test_write_report_on_inputs_that_are_not_images(tmp_path):
    """A tabular affected input (12,) has no picture: the panel shows the summary (imshow failed on it); a
    DataLoader for train_images is refused naming it (its length is its batch count)."""
    res = detection()
    paths = R.write_report(tmp_path, {}, res, affected_x=torch.rand(12))
    assert paths["png"].exists()
    # a (P, F) batch of tabular points is not a greyscale image, nor are tabular training rows (matplotlib failed
    # on them): the panels list what was flagged instead
    assert R._picture(torch.rand(3, 12)) is None and R._picture(torch.rand(6, 8, 8)) is None
    assert R._picture(torch.rand(3, 8, 8)) is not None
    some = dataclasses.replace(res, flagged=torch.tensor([0, 1, 2]))
    paths = R.write_report(tmp_path, {}, some, affected_x=torch.rand(2, 12), train_images=torch.rand(30, 12))
    assert paths["png"].exists()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(30, 3, 8, 8)), batch_size=8)
    with pytest.raises(TypeError, match="^train_images: .* got a DataLoader: pass its .dataset"):
        R.write_report(tmp_path, {}, res, train_images=loader)


def test_revote_keeps_what_it_is_not_told_to_change():
    """revote(tolerance=None) after a tolerance run decides at the detector's fdr (it fell back to the default
    0.2); the auto threshold's scale follows the threshold; an unchanged revote flags what detect flagged."""
    from deltainf.delta import AUTO_THRESHOLD_SCALE

    det = DeltaInfluence(Engine(), n_transforms=6, domain="pixel", num_classes=10, tolerance=2, fdr=0.1)
    res = det.detect(None, torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)), 2)
    assert res.settings["fdr"] is None and res.revote(tolerance=None).settings["fdr"] == 0.1
    auto = res.revote(threshold="auto")
    assert auto.settings["auto_threshold_scale"] == AUTO_THRESHOLD_SCALE
    assert auto.revote(threshold=0.0).settings["auto_threshold_scale"] is None
    plain = detection()
    assert torch.equal(plain.revote().flagged, plain.flagged)
