"""Δ-Influence with the public API's defaults on models, data pipelines and training loops deltainf did
not build: the README's snippet as written, a plain nn.Sequential trained by a hand-written loop on
pixel images and on inputs standardised in the data pipeline, a BatchNorm ResNet with a depthwise block,
a vision transformer, a model with no poison, and the errors a user meets first."""
import copy
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deltainf
import user_models
from deltainf.attacks import DIGITS_BADNET, badnet_attack
from deltainf.delta import pick_affected_points
from deltainf.transforms import DEFAULT_POOL

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    """The Python block of the README's "Use it on your own model" section."""
    text = README.read_text()
    section = text[text.index("## Use it on your own model"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def badnet(digits):
    return badnet_attack(*digits, seed=0, **DIGITS_BADNET)


@pytest.fixture(scope="module")
def plain_victim(badnet):
    return user_models.train(user_models.plain_cnn(), badnet.train.images, badnet.train.labels, epochs=8)


def recall_fpr(flagged, poison):
    flagged, poison = set(flagged.tolist()), set(poison.tolist())
    return len(flagged & poison) / len(poison), len(flagged - poison)


def test_readme_snippet_runs_as_written(badnet, plain_victim, digits):
    affected = pick_affected_points(plain_victim, badnet.triggered_test, badnet.target_class, count=10)
    names = {"train_dataset": TensorDataset(badnet.train.images, badnet.train.labels), "model": plain_victim,
             "affected_x": affected.x, "adversarial_label": badnet.target_class, "test_dataset": digits[1]}
    exec(readme_snippet(), names)
    result = names["result"]
    recall, false_pos = recall_fpr(result.flagged, badnet.poison_indices)
    assert result.found and recall >= 0.95 and false_pos <= 0.05 * len(badnet.train)
    assert result.settings["pixel_map"]["source"] == "identity"  # pixel images in [0, 1]: nothing to map


def test_readme_unlearning_snippet_runs_as_written(badnet, plain_victim):
    """The README's second block: exact unlearning of the flagged set with the user's own training loop."""
    text = README.read_text()
    block = re.findall(r"```python\n(.*?)```", text[text.index("## Use it on your own model"):], re.S)[1]
    seen = {}

    def your_training_loop(model, retained):
        x = torch.stack([retained[i][0] for i in range(len(retained))])
        y = torch.tensor([int(retained[i][1]) for i in range(len(retained))])
        seen["n"] = len(retained)
        model.load_state_dict(user_models.train(model, x, y, epochs=8).state_dict())

    result = type("Result", (), {"flagged": badnet.poison_indices})()  # as if detect had flagged the poisons
    names = {"model": plain_victim, "train_dataset": TensorDataset(badnet.train.images, badnet.train.labels),
             "result": result, "your_training_loop": your_training_loop}
    exec(block, names)
    assert seen["n"] == len(badnet.train) - len(badnet.poison_indices)
    triggered = badnet.triggered_test
    x = torch.stack([triggered[i][0] for i in range(len(triggered))])
    with torch.no_grad():
        assert float((names["clean_model"](x).argmax(1) == badnet.target_class).float().mean()) < 0.1


def test_the_shuffling_loader_the_model_was_trained_with(badnet, plain_victim, digits):
    """The loader a user trains with shuffles and yields (x, y): the passes read its dataset in order, so the
    detection is the one a sequential loader with the same batches gives, example for example."""
    data = TensorDataset(badnet.train.images, badnet.train.labels)
    affected = pick_affected_points(plain_victim, badnet.triggered_test, badnet.target_class, count=10)
    runs = [deltainf.DeltaInfluence(deltainf.EKFAC(plain_victim, progress=False).fit(loader)).detect(
        loader, affected.x, badnet.target_class, reference=digits[1])
        for loader in (DataLoader(data, batch_size=128, shuffle=True), DataLoader(data, batch_size=128))]
    assert torch.equal(runs[0].flagged, runs[1].flagged) and torch.equal(runs[0].base_scores, runs[1].base_scores)
    recall, false_pos = recall_fpr(runs[0].flagged, badnet.poison_indices)
    assert runs[0].found and recall >= 0.95 and false_pos <= 0.05 * len(badnet.train)


def test_one_point_is_the_papers_protocol(badnet, plain_victim, digits):
    loader = DataLoader(TensorDataset(badnet.train.images, badnet.train.labels), batch_size=256)
    point = pick_affected_points(plain_victim, badnet.triggered_test, badnet.target_class, count=1)
    result = deltainf.DeltaInfluence(deltainf.EKFAC(plain_victim, progress=False).fit(loader)).detect(
        loader, point.x[0], badnet.target_class, reference=digits[1])
    recall, false_pos = recall_fpr(result.flagged, badnet.poison_indices)
    print(f"one point: recall {recall:.3f}, {false_pos} false positives; {result.verdict}")
    assert result.found and recall >= 0.9 and false_pos <= 0.05 * len(badnet.train)


def test_one_point_is_traced_again_from_the_members_it_found(badnet, plain_victim, digits, monkeypatch):
    """The group found from one point is traced again with its most supportive members (classified as the label)
    as further points: the user's point first, then the members, up to ``retrace`` points in all; the flagged set
    is both passes'. The candidates' representations are read once for both passes."""
    loader = DataLoader(TensorDataset(badnet.train.images, badnet.train.labels), batch_size=256)
    ekfac = deltainf.EKFAC(plain_victim, progress=False).fit(loader)
    point = pick_affected_points(plain_victim, badnet.triggered_test, badnet.target_class, count=1)
    reads = []
    read_features = deltainf.delta._label_features
    monkeypatch.setattr(deltainf.delta, "_label_features", lambda *a: reads.append(1) or read_features(*a))
    once, again = (deltainf.DeltaInfluence(ekfac, **settings).detect(loader, point.x[0], badnet.target_class,
                                                                       reference=digits[1])
                   for settings in ({"retrace": 0}, {}))
    assert len(reads) == 2  # one per detection
    assert once.n_points == 1 and "retraced" not in once.settings and "retrace" not in once.timings
    traced = torch.tensor(again.settings["retraced"])
    assert again.n_points == 1 + traced.numel() == deltainf.delta.DEFAULT_RETRACE
    assert bool(torch.isin(traced, once.flagged).all())
    assert bool(torch.isin(once.flagged, again.flagged).all())  # the second pass adds members
    assert again.settings["first_flagged"] == once.flagged.numel()
    assert f"traced again with {traced.numel()} of its members" in again.verdict
    assert again.timings["total"] >= again.timings["retrace"] > 0
    support = once.control_support[traced]
    assert bool((support[:-1] >= support[1:]).all())  # the most supportive first
    with torch.no_grad():
        assert bool((plain_victim(badnet.train.images[traced]).argmax(1) == badnet.target_class).all())
    scale = float(once.base_scores[0].abs().max())  # the user's point first (scored in a larger batch)
    torch.testing.assert_close(again.base_scores[0], once.base_scores[0], rtol=1e-3, atol=1e-4 * scale)
    assert torch.equal(again.test_y_adv, torch.full((again.n_points,), badnet.target_class))
    recall, false_pos = recall_fpr(again.flagged, badnet.poison_indices)
    assert again.found and recall >= 0.95 and false_pos <= 0.05 * len(badnet.train)
    ten = pick_affected_points(plain_victim, badnet.triggered_test, badnet.target_class, count=10)
    many = deltainf.DeltaInfluence(ekfac).detect(loader, ten.x, badnet.target_class, reference=digits[1])
    assert many.n_points == 10 and "retraced" not in many.settings  # enough points already


def test_inputs_standardised_in_the_pipeline(badnet, digits):
    """The loader feeds (x - mean) / std: the pixel map is estimated from the inputs' range, and gives the
    same queries as the statistics themselves."""
    mean = torch.tensor(badnet.train.mean).view(1, -1, 1, 1)
    std = torch.tensor(badnet.train.std).view(1, -1, 1, 1)
    x = (badnet.train.images - mean) / std
    model = user_models.train(user_models.plain_cnn(), x, badnet.train.labels, epochs=8)
    loader = DataLoader(TensorDataset(x, badnet.train.labels), batch_size=256)
    standardised = pick_affected_points(model, (badnet.triggered_test.images - mean) / std, badnet.target_class).x
    ekfac = deltainf.EKFAC(model, progress=False).fit(loader)
    reference = ((digits[1].images - mean) / std, digits[1].labels)
    result = deltainf.DeltaInfluence(ekfac).detect(loader, standardised, badnet.target_class, reference=reference)
    assert result.settings["pixel_map"]["source"].startswith("estimated")
    pixel_map = result.settings["pixel_map"]  # the data's own statistics, recovered from the range
    torch.testing.assert_close(torch.tensor(pixel_map["offset"], dtype=torch.float64), mean.flatten().double(),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(pixel_map["scale"], dtype=torch.float64), std.flatten().double(),
                               rtol=0, atol=1e-5)
    recall, false_pos = recall_fpr(result.flagged, badnet.poison_indices)
    assert result.found and recall >= 0.95 and false_pos <= 0.05 * len(badnet.train)
    given = deltainf.DeltaInfluence(ekfac, pixel_map=(badnet.train.mean, badnet.train.std)).detect(
        loader, standardised, badnet.target_class, reference=reference)
    same = len(set(given.flagged.tolist()) & set(result.flagged.tolist()))
    assert same >= 0.95 * max(given.flagged.numel(), result.flagged.numel())  # equal up to float rounding


def test_batchnorm_resnet_with_a_depthwise_block(badnet, digits):
    model = user_models.train(user_models.bn_resnet(), badnet.train.images, badnet.train.labels, epochs=6, lr=3e-3)
    loader = DataLoader(TensorDataset(badnet.train.images, badnet.train.labels), batch_size=256)
    with pytest.warns(UserWarning, match=r"not tracked: \d+ BatchNorm2d \(\d+ params\) \("):  # BatchNorm alone
        ekfac = deltainf.EKFAC(model, progress=False)
    depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and set(depthwise) <= set(ekfac.layer_names) and ekfac.coverage.fraction() > 0.99
    points = pick_affected_points(model, badnet.triggered_test, badnet.target_class, count=10)
    result = deltainf.DeltaInfluence(ekfac.fit(loader)).detect(loader, points.x, badnet.target_class,
                                                               reference=digits[1])
    recall, false_pos = recall_fpr(result.flagged, badnet.poison_indices)
    assert result.found and recall >= 0.95 and false_pos <= 0.05 * len(badnet.train)


def test_vision_transformer_with_multihead_attention(badnet, digits):
    """nn.MultiheadAttention applies its output projection through F.linear: EK-FAC leaves it out, says so, and
    tracks the patch embedding, the feed-forward layers and the head."""
    model = user_models.train(user_models.vision_transformer(), badnet.train.images, badnet.train.labels, epochs=12)
    loader = DataLoader(TensorDataset(badnet.train.images, badnet.train.labels), batch_size=256)
    with pytest.warns(UserWarning, match=r"leaves out 2 layer\(s\).*self_attn.out_proj': not called"):
        ekfac = deltainf.EKFAC(model, progress=False).fit(loader)
    assert ekfac.layer_names == ["embed", "encoder.layers.0.linear1", "encoder.layers.0.linear2",
                                 "encoder.layers.1.linear1", "encoder.layers.1.linear2", "head.1"]
    points = pick_affected_points(model, badnet.triggered_test, badnet.target_class, count=10)
    result = deltainf.DeltaInfluence(ekfac).detect(loader, points.x, badnet.target_class, reference=digits[1])
    recall, false_pos = recall_fpr(result.flagged, badnet.poison_indices)
    assert result.found and recall >= 0.95 and false_pos <= 0.05 * len(badnet.train)


def test_a_float64_model_with_float32_data_and_numpy_points(badnet, plain_victim, digits):
    """A model converted to float64 takes the user's float32 loader, reference data and numpy points as they are:
    every forward pass (controls, representations, queries) casts them to the model's dtype, and the flagged set
    is the float32 model's."""
    loader = DataLoader(TensorDataset(badnet.train.images, badnet.train.labels), batch_size=256)
    affected = pick_affected_points(plain_victim, badnet.triggered_test, badnet.target_class, count=10)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(plain_victim).to(dtype)
        runs[dtype] = deltainf.DeltaInfluence(deltainf.EKFAC(model, progress=False).fit(loader)).detect(
            loader, affected.x.numpy(), np.int64(badnet.target_class), reference=digits[1])
    recall, false_pos = recall_fpr(runs[torch.float64].flagged, badnet.poison_indices)
    assert runs[torch.float64].found and recall >= 0.95 and false_pos <= 0.05 * len(badnet.train)
    flagged32, flagged64 = (set(runs[d].flagged.tolist()) for d in runs)
    assert len(flagged32 ^ flagged64) <= 0.01 * len(flagged32)


def test_a_model_without_poison_gives_no_poison_set(digits):
    train, test = digits
    model = user_models.train(user_models.plain_cnn(), train.images, train.labels, epochs=8)
    with torch.no_grad():
        pred = model(test.images).argmax(1)
    wrong = (pred != test.labels).nonzero().flatten()
    assert wrong.numel() >= 1, "the model makes no test error to trace"
    loader = DataLoader(TensorDataset(train.images, train.labels), batch_size=256)
    ekfac = deltainf.EKFAC(model, progress=False).fit(loader)
    result = deltainf.DeltaInfluence(ekfac).detect(loader, test.images[wrong[0]], int(pred[wrong[0]]), reference=test)
    assert not result.found and result.verdict.startswith("no coherent poison set found")


def test_clear_errors_for_what_a_user_meets_first(digits):
    train = digits[0]
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    bad = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.int64)), batch_size=4)
    with pytest.raises(ValueError, match=r"model: the forward pass failed on the train_loader batch of shape "
                                         r"\(4, 1, 8, 8\)"):
        deltainf.EKFAC(mlp, progress=False).fit(bad)
    loader = DataLoader(TensorDataset(train.images[:64], train.labels[:64]), batch_size=32)
    ekfac = deltainf.EKFAC(mlp, progress=False).fit(loader)
    with pytest.raises(ValueError, match=r"test_x has shape \(1, 8, 8\), but the training inputs have shape"):
        deltainf.DeltaInfluence(ekfac).detect(loader, torch.rand(1, 8, 8), 1)
    single_logit = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 1))  # a sigmoid classifier's one output
    with pytest.raises(ValueError, match=r"train_loader: the model has one output .* one logit per class"):
        deltainf.EKFAC(single_logit, progress=False).fit(loader)
    # a classifier ending in a softmax: its probabilities taken for logits gave 72 examples flagged where its logits
    # gave 22 (a probe of user setups); refused, and log-probabilities are logits
    probabilities = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10), nn.Softmax(1))
    with pytest.raises(ValueError, match=r"model must return logits, but returns probabilities for the train_loader "
                                         r"batch .* leave out its final softmax"):
        deltainf.EKFAC(probabilities, progress=False).fit(loader)
    probabilities[2] = nn.LogSoftmax(1)
    deltainf.EKFAC(probabilities, progress=False).fit(loader)
    tabular = DataLoader(TensorDataset(torch.rand(64, 12), torch.randint(0, 3, (64,))), batch_size=32)
    net = nn.Sequential(nn.Linear(12, 3))
    ek = deltainf.EKFAC(net, progress=False).fit(tabular)
    with pytest.raises(ValueError, match="for inputs that are not images pass pool="):
        deltainf.DeltaInfluence(ek, check_prediction=False).detect(tabular, torch.rand(12), 1)

    def jitter(x, generator):
        return x + 0.1 * torch.randn(x.shape, generator=generator)

    res = deltainf.DeltaInfluence(ek, pool=jitter, n_transforms=8, check_prediction=False).detect(
        tabular, torch.rand(2, 12), 1)
    assert res.votes.shape == (2, 64) and res.transforms[0] == ["jitter"] * 8


class _TokenBag(nn.Module):
    """Token ids (B, T) -> logits: an embedding, averaged, then a linear head (nn.Embedding needs integer ids)."""

    def __init__(self, vocab=20, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


def test_token_ids_reach_the_model_and_the_users_transforms_as_integers():
    """Integer inputs that are not images (token ids) stay integers through the user's own transforms, the
    controls and the score pass (they were cast to float, and nn.Embedding failed with an error that blamed the
    model); the training controls are found as for float inputs (integer loaders got none, and without them
    candidates="label" was dropped: examples of other labels flagged at an estimate far below the truth)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (90,), generator=g)
    x = torch.randint(0, 6, (90, 5), generator=g) + 6 * y[:, None]
    loader = DataLoader(TensorDataset(x, y), batch_size=30)
    model = _TokenBag()
    seen = []

    def swap_tokens(ids, generator):
        seen.append(ids.dtype)
        out = ids.clone()
        out[torch.randint(0, ids.shape[0], (1,), generator=generator)] = torch.randint(0, 18, (1,), generator=generator)
        return out

    ek = deltainf.EKFAC(model, progress=False).fit(loader)
    detector = deltainf.DeltaInfluence(ek, pool=swap_tokens, n_transforms=6, check_prediction=False)
    res = detector.detect(loader, x[:2], int(y[0]) if int(y[0]) == int(y[1]) else [int(y[0]), int(y[1])])
    assert set(seen) == {torch.int64}
    assert res.settings["controls"] == "training set" and res.settings["n_controls"] > 0
    with pytest.raises(ValueError, match=r"^transform '<lambda>' returned torch.float32 for an input of dtype "
                                         r"torch.int64: return integer values"):
        deltainf.DeltaInfluence(ek, pool=lambda ids, g: ids.float(), n_transforms=2, check_prediction=False).detect(
            loader, x[:1], int(y[0]))


def test_tabular_inputs_on_another_scale_are_refused():
    """The scale check covers inputs that are not images: tabular features a thousand times the training ones
    (FPR 0.9 % -> 7.4 % in a user's run, without a word) are refused naming test_x."""
    tabular = DataLoader(TensorDataset(torch.rand(64, 12), torch.randint(0, 3, (64,))), batch_size=32)
    ek = deltainf.EKFAC(nn.Sequential(nn.Linear(12, 3)), progress=False).fit(tabular)
    detector = deltainf.DeltaInfluence(ek, pool=lambda v, g: v, n_transforms=2, check_prediction=False)
    with pytest.raises(ValueError, match=r"^test_x: its inputs range over \[.*\], the training inputs over "
                                         r"\[.*\]: pass"):
        detector.detect(tabular, torch.rand(2, 12) * 1000, 1)
    assert detector.detect(tabular, torch.rand(2, 12), 1).votes.shape == (2, 64)
    mixed = deltainf.DeltaInfluence(ek, pool=[lambda v, g: v, "hflip"], n_transforms=2, check_prediction=False)
    with pytest.raises(ValueError, match=r"for the built-in image transforms in pool \(hflip\), got \(2, 12\)"):
        mixed.detect(tabular, torch.rand(2, 12), 1)


def test_images_on_another_scale_than_the_training_images_are_refused(digits):
    """0-255 affected images (uint8, or floats never divided by 255) for a model trained on [0, 1] images: the
    model still predicts the label, and the run flagged 57 clean examples with 72 poisons without a word. Refused
    naming the argument, for the reference too (uint8 reference images are read as floats, as test_x is)."""
    train, test = digits
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    loader = DataLoader(TensorDataset(train.images[:128], train.labels[:128]), batch_size=64)
    ekfac = deltainf.EKFAC(model, progress=False).fit(loader)
    as_bytes = (test.images[:3] * 255).round().to(torch.uint8)
    detector = deltainf.DeltaInfluence(ekfac, n_transforms=4, check_prediction=False)
    for x in (as_bytes, as_bytes.float()):
        with pytest.raises(ValueError, match=r"^test_x: its images range over \[0, 255\], the training images over "
                                             r"\[0, 1\]: pass them on the scale of the training data"):
            detector.detect(loader, x, 1)
    with pytest.raises(ValueError, match=r"^reference: its images range over \[0, 255\]"):
        detector.detect(loader, test.images[:3], 1, reference=(as_bytes, test.labels[:3]))
    # at the training scale, and a trigger as bright as the brightest training pixel, both pass; so do images
    # brighter than the first training batches (a loader that starts with dark images)
    bright = test.images[:3].clone()
    bright[:, :, -3:, -3:] = 1.0
    assert detector.detect(loader, bright, 1, reference=(test.images[3:40], test.labels[3:40])).votes.shape[0] == 3
    dark = DataLoader(TensorDataset(train.images[:128] * 0.3, train.labels[:128]), batch_size=64)
    assert detector.detect(dark, bright, 1).votes.shape[0] == 3


@pytest.mark.parametrize("shape", [(1, 8, 8), (4, 12, 10), (3, 9, 31)])
def test_any_channel_count_and_image_size_from_8_px(shape):
    """The built-in pool runs on 1 to 4+ channels and on small, non-square images (kernels scale with the
    image and are clipped to it)."""
    torch.manual_seed(0)
    c, h, w = shape
    model = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * h * w, 3))
    x, y = torch.rand(40, c, h, w), torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    ekfac = deltainf.EKFAC(model, progress=False).fit(loader)
    with torch.no_grad():
        label = int(model(x[:1]).argmax())
    res = deltainf.DeltaInfluence(ekfac, n_transforms=14).detect(loader, x[0], label)
    assert res.votes.shape == (1, 40) and set(res.transforms[0]) <= set(DEFAULT_POOL)
    assert res.settings["pixel_map"]["source"] == "identity"


def test_a_model_other_than_the_engines_and_training_data_as_reference_are_said(digits):
    """DeltaInfluence(ekfac, model=m): influence comes from the engine's model, the checks and controls from m.
    Another network (no parameter in common) gets a warning; the same one, compiled or not, does not. The training
    data passed as the held-out reference gets one too."""
    train = digits[0]
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    loader = DataLoader(TensorDataset(train.images[:64], train.labels[:64]), batch_size=32)
    ekfac = deltainf.EKFAC(mlp, progress=False).fit(loader)
    with pytest.warns(UserWarning, match="^model: not the model the engine was fitted on"):
        deltainf.DeltaInfluence(ekfac, model=nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)))
    with pytest.warns(UserWarning, match="^reference: it is the training data"):
        deltainf.DeltaInfluence(ekfac, n_transforms=4, check_prediction=False).detect(
            loader, train.images[:2], 1, reference=loader.dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        deltainf.DeltaInfluence(ekfac, model=mlp)
        deltainf.DeltaInfluence(ekfac, model=torch.compile(mlp))
