"""Training: config validation, augmentation, reproducibility, accuracy on digits, checkpoints."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import file_damage
from deltainf.models import build_model
from deltainf.train import (TrainConfig, augment_batch, accuracy, forest_milestones, load_checkpoint, load_model,
                            predict, save_checkpoint, train_model)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(digits):
    train, test = digits
    history: list = []
    start = time.perf_counter()
    model = train_model(train, TrainConfig.digits(progress=False), test_dataset=None, history=history)
    seconds = time.perf_counter() - start
    return model, history, seconds


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs"), ({"batch_size": -1}, "batch_size"), ({"optimizer": "rmsprop"}, "optimizer"),
    ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"momentum": 1.0}, "momentum"),
    ({"nesterov": True, "optimizer": "adam"}, "nesterov"), ({"weight_decay": -1e-4}, "weight_decay"),
    ({"schedule": "linear"}, "schedule"), ({"milestones": (5, 2)}, "milestones"), ({"gamma": 0.0}, "gamma"),
    ({"shift": -1}, "shift"), ({"shift_mode": "warp"}, "shift_mode"), ({"model": "vgg"}, "model"),
    ({"device": "tpu:x"}, "device"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"flip": "no"}, TypeError, "flip must be a bool"),  # any non-empty string turned flipping on
    ({"lr": True}, TypeError, "lr must be a number"), ({"shift": True}, ValueError, "shift"),
    ({"seed": True}, TypeError, "seed must be an int"), ({"momentum": "0.9"}, TypeError, "momentum must be a number"),
    ({"milestones": "12"}, ValueError, "milestones must be a sequence of epoch numbers"),  # read as (1, 2)
    ({"milestones": (1.7,)}, ValueError, "milestones"),  # read as (1,)
    ({"weight_decay": float("inf")}, ValueError, "weight_decay must be a finite number"),  # trained to NaN weights
])
def test_config_types_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**kwargs)
    assert TrainConfig(epochs=np.int64(2), flip=np.bool_(False)).epochs == 2  # numpy values, as elsewhere


def test_a_training_loss_that_is_not_finite_stops_training(digits):
    """A learning rate far too large trained to NaN weights, returned without a word."""
    train, _ = digits
    with pytest.raises(FloatingPointError, match="training: the loss became nan in epoch 0"):
        train_model(train, TrainConfig.digits(epochs=1, lr=1e30, progress=False))


def test_a_shift_beyond_the_image_is_refused(digits):
    """shift=20 on 8 px images left most augmented images blank, with their labels."""
    train, _ = digits
    with pytest.raises(ValueError, match="^shift: 16 px moves 16 px images out of their frame"):
        train_model(train, TrainConfig.digits(epochs=1, shift=16, progress=False))


def test_non_finite_weights_are_not_saved(tmp_path):
    """They were written, and every loader then refused the file."""
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="^model: 'weight' holds non-finite values"):
        save_checkpoint(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_paper_recipe():
    cfg = TrainConfig.paper_resnet18()
    assert forest_milestones(40) == (14, 24, 35) and cfg.milestones == (14, 24, 35)
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.batch_size,
            cfg.epochs, cfg.shift, cfg.flip) == ("resnet18", "sgd", 0.1, 0.9, True, 5e-4, 128, 40, 4, True)
    assert TrainConfig.digits().flip is False
    assert TrainConfig.paper_resnet18(epochs=8).to_dict()["milestones"] == list(forest_milestones(8))


# ----------------------------------------------------------------------------- augmentation
def test_augment_identity_and_crop_semantics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 10, 10)
    assert torch.equal(augment_batch(x, 0, False, g), x)
    # an image with a single bright pixel in the interior: a crop moves it by at most `shift` pixels
    img = torch.zeros(64, 1, 10, 10)
    img[:, :, 5, 5] = 1.0
    out = augment_batch(img, 2, False, torch.Generator().manual_seed(1))
    assert torch.equal(out.sum(dim=(1, 2, 3)), torch.ones(64))  # content preserved, nothing resampled
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 10, pos % 10
    assert int((rows - 5).abs().max()) <= 2 and int((cols - 5).abs().max()) <= 2
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5  # shifts actually vary
    flipped = augment_batch(img, 0, True, torch.Generator().manual_seed(1))
    assert {int(p) % 10 for p in flipped[:, 0].flatten(1).argmax(1)} == {4, 5}
    again = augment_batch(img, 2, False, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    tr = augment_batch(x, 2, True, torch.Generator().manual_seed(0), mode="translate")
    assert tr.shape == x.shape and not torch.equal(tr, x)


# ----------------------------------------------------------------------------- training
def test_training_is_reproducible_for_a_seed(digits):
    train, _ = digits
    small = train.subset(torch.arange(300))
    cfg = TrainConfig.digits(epochs=2, progress=False, seed=5)
    a = train_model(small, cfg)
    b = train_model(small, cfg)
    c = train_model(small, TrainConfig.digits(epochs=2, progress=False, seed=6))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_a_dropout_model_trains_the_same_whatever_the_callers_stream(digits):
    train, _ = digits
    small = train.subset(torch.arange(200))
    cfg = TrainConfig.digits(epochs=1, progress=False, seed=5)
    runs = []
    for caller_seed in (1, 2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(3 * 16 * 16, 10))
        torch.manual_seed(caller_seed)
        stream = torch.random.get_rng_state()
        runs.append(train_model(small, cfg, model=model))
        assert torch.equal(torch.random.get_rng_state(), stream)
    assert torch.equal(runs[0][2].weight, runs[1][2].weight)


def test_exclude_equals_training_on_the_remaining_data(digits):
    train, _ = digits
    small = train.subset(torch.arange(200))
    drop = torch.tensor([3, 50, 199])
    cfg = TrainConfig.digits(epochs=1, progress=False)
    a = train_model(small, cfg, exclude=drop)
    b = train_model(small.without(drop), cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_small_cnn_reaches_high_accuracy_on_digits(digits, trained):
    train, test = digits
    model, history, seconds = trained
    acc = accuracy(model, test)
    print(f"\nsmall CNN on digits: clean test accuracy {acc:.4f}, train accuracy {accuracy(model, train):.4f}, "
          f"training {seconds:.1f} s ({torch.get_num_threads()} threads)")
    assert acc >= 0.97
    assert len(history) == TrainConfig.digits().epochs and history[-1]["loss"] < history[0]["loss"]
    assert not model.training


def test_paper_recipe_runs_on_a_tiny_resnet():
    from deltainf.data import make_synthetic_dataset

    train = make_synthetic_dataset(96, height=16, width=16, num_classes=4, seed=0)
    test = make_synthetic_dataset(32, height=16, width=16, num_classes=4, seed=0, split="test")
    cfg = TrainConfig.paper_resnet18(epochs=3, batch_size=32, model_kwargs={"base_width": 4}, progress=False)
    history: list = []
    model = train_model(train, cfg, test_dataset=test, history=history)
    assert model.conv1.kernel_size == (3, 3) and not model.training
    # milestones (1, 1, 2) for 3 epochs; a repeated milestone decays twice, as in MultiStepLR
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.001, 0.0001])
    assert all(0.0 <= h["test_acc"] <= 1.0 for h in history)


def test_fine_tuning_an_existing_model(digits):
    train, _ = digits
    model = build_model("small_cnn", 10, 3, 16, mean=train.mean, std=train.std, seed=0)
    before = model.classifier.weight.clone()
    out = train_model(train.subset(torch.arange(64)), TrainConfig.digits(epochs=1, progress=False), model=model)
    assert out is model and not torch.equal(before, model.classifier.weight)


def test_predict_and_evaluate(digits, trained):
    _, test = digits
    model = trained[0]
    pred = predict(model, test)
    assert pred.shape == (len(test),) and pred.dtype == torch.int64
    logits = predict(model, test.images[:5], return_logits=True)
    assert logits.shape == (5, 10) and torch.equal(logits.argmax(1), pred[:5])
    assert predict(model, test.images[0]).shape == (1,)
    assert accuracy(model, test) == pytest.approx(float((pred == test.labels).float().mean()))
    with pytest.raises(TypeError):
        predict(model, [1, 2, 3])


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path, digits, trained):
    _, test = digits
    model = trained[0]
    path = tmp_path / "ckpt" / "model.safetensors"
    save_checkpoint(model, path, meta={"clean_acc": 0.99, "note": "digits"})
    fresh = build_model("small_cnn", 10, 3, 16, seed=123)
    meta = load_checkpoint(fresh, path)
    assert meta == {"clean_acc": 0.99, "note": "digits"}
    assert torch.equal(predict(fresh, test, return_logits=True), predict(model, test, return_logits=True))
    assert torch.equal(fresh.normalize.mean, model.normalize.mean)  # normalisation travels with the weights
    rebuilt, meta2 = load_model(path)
    assert meta2 == meta and torch.equal(predict(rebuilt, test), predict(model, test))
    # a float64 model comes back as float64, exactly (it came back float32: 1/3 did not survive)
    wide = build_model("small_cnn", 10, 3, 16, seed=1).double()
    save_checkpoint(wide, tmp_path / "wide.safetensors")
    back, _ = load_model(tmp_path / "wide.safetensors")
    assert all(p.dtype == torch.float64 for p in back.parameters())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), wide.state_dict().values()))
    resnet = build_model("resnet18", 10, 3, 16, base_width=4)
    p2 = tmp_path / "resnet.safetensors"
    save_checkpoint(resnet, p2)
    assert load_checkpoint(build_model("resnet18", 10, 3, 16, base_width=4, seed=9), p2) == {}


def test_checkpoint_errors(tmp_path):
    model = build_model("small_cnn", 10, 3, 16)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_checkpoint(model, tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_checkpoint(model, bad)
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(build_model("resnet18", 10, 3, 16, base_width=4), path)
    with pytest.raises(ValueError, match="shape"):
        load_checkpoint(build_model("small_cnn", 5, 3, 16), path)
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(model, path, meta={"x": object()})


# ----------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture
def checkpoint(tmp_path):
    model = build_model("small_cnn", 10, 3, 16, seed=1)
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path, meta={"dataset": "digits"})
    return model, path


def test_checkpoint_bit_flips_are_refused(checkpoint, tmp_path):
    """60 seeded single-bit flips in the weights and 40 in the header: each is a ValueError naming the file."""
    model, path = checkpoint
    damaged = tmp_path / "damaged.safetensors"
    for bit in file_damage.random_bits(path, 60, seed=0, where="data"):
        damaged.write_bytes(path.read_bytes())
        file_damage.flip_bit(damaged, bit)
        with pytest.raises(ValueError, match="damaged.safetensors'?: its content does not match its recorded hash"):
            load_model(damaged)
        with pytest.raises(ValueError, match="does not match its recorded hash"):
            load_checkpoint(build_model("small_cnn", 10, 3, 16), damaged)
    for bit in file_damage.random_bits(path, 40, seed=1, where="header"):
        damaged.write_bytes(path.read_bytes())
        file_damage.flip_bit(damaged, bit)
        with pytest.raises(ValueError, match="damaged.safetensors"):
            load_model(damaged)


def _build_args(path, out, **changes):
    import json

    args = {**json.loads(file_damage.read(path)[1]["deltainf_build_args"]), **changes}
    return file_damage.rewrite(path, out, metadata={"deltainf_build_args": json.dumps(args)})


@pytest.mark.parametrize("changes, message", [
    ({"num_classes": 10 ** 12}, r"classifier.(weight|bias) has shape \(10.*the model expects \(1000000000000"),
    ({"hidden": 10 ** 9}, r"has shape \(.*, the model expects \(.*1000000000"),
    ({"image_size": 10 ** 9}, r"image_size=1000000000 is not an image side in \[1, 8192\]"),
    ({"image_size": "16"}, "image_size='16' is not an image side"),
    ({"name": "vgg"}, "build arguments are not usable.*unknown model 'vgg'"),
    ({"name": 3}, "build arguments must be a JSON object with the model's name"),
    ({"width": "wide"}, "build arguments are not usable"),
    ({"num_classes": None}, "build arguments are not usable.*num_classes must be an int"),
    ({"mean": [0.5]}, "build arguments are not usable.*mean must have 3 values"),
])
def test_checkpoint_crafted_build_args_are_refused_before_building(checkpoint, tmp_path, changes, message):
    """Build arguments are checked against the stored tensors on the meta device: absurd sizes are a
    ValueError naming the file, not a 72 TB allocation (the hash is recomputed, so only these checks see it)."""
    _, path = checkpoint
    bad = _build_args(path, tmp_path / "crafted.safetensors", **changes)
    with pytest.raises(ValueError, match=f"checkpoint '.*crafted.safetensors'.*{message}"):
        load_model(bad)


def test_checkpoint_metadata_and_value_defects(checkpoint, tmp_path):
    model, path = checkpoint
    state = file_damage.read(path)[0]
    cases = [
        (dict(metadata={"deltainf_meta": "{oops"}), "metadata 'deltainf_meta' is not valid JSON"),
        (dict(metadata={"deltainf_build_args": "[1, 2]"}), "metadata 'deltainf_build_args' must be a JSON object"),
        (dict(drop=["deltainf_build_args"]), "has no build arguments"),
        (dict(tensors={"classifier.weight": state["classifier.weight"] * float("nan")}),
         "weight 'classifier.weight' holds NaN or infinite values"),
        (dict(tensors={"classifier.bias": state["classifier.bias"].to(torch.int64)}),
         "classifier.bias has dtype torch.int64, the model expects torch.float32"),
        (dict(tensors={"classifier.bias": state["classifier.bias"][:5]}), r"classifier.bias has shape \(5,\)"),
        (dict(drop=["deltainf_sha256"]), "no content hash in its metadata"),
    ]
    for i, (edit, message) in enumerate(cases):
        bad = file_damage.rewrite(path, tmp_path / f"bad{i}.safetensors", **edit)
        with pytest.raises(ValueError, match=f"bad{i}.safetensors.*{message}"):
            load_model(bad)
    unhashed = tmp_path / "bad6.safetensors"
    rebuilt, meta = load_model(unhashed, verify=False)  # the explicit opt-out, for huge files
    assert meta == {"dataset": "digits"} and torch.equal(rebuilt.classifier.weight, model.classifier.weight)
    with pytest.raises(ValueError, match="holds NaN"):
        load_model(tmp_path / "bad3.safetensors", verify=False)  # the value checks stay


def test_a_users_own_safetensors_file_has_no_hash_to_check(tmp_path):
    from safetensors.torch import save_file

    from deltainf.models.user import load_state_dict_file

    model = build_model("small_cnn", 10, 3, 16, seed=2)
    path = tmp_path / "theirs.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    fresh = build_model("small_cnn", 10, 3, 16)
    assert load_checkpoint(fresh, path) == {} and torch.equal(fresh.classifier.bias, model.classifier.bias)
    assert load_state_dict_file(path)[1] == {}
    ours = tmp_path / "ours.safetensors"
    save_checkpoint(model, ours)
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(ours.read_bytes())
    file_damage.flip_bit(flipped, 8 * file_damage.header_span(ours)[1] + 3)
    with pytest.raises(ValueError, match="flipped.safetensors'?: its content does not match"):
        load_state_dict_file(flipped)
    assert set(load_state_dict_file(flipped, verify=False)[0]) == set(model.state_dict())


def test_checkpoint_save_is_atomic(checkpoint, request):
    import os

    model, path = checkpoint
    before = path.read_bytes()

    request.getfixturevalue("disk_full_on_save")
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(build_model("small_cnn", 10, 3, 16, seed=5), path)
    assert path.read_bytes() == before and os.listdir(path.parent) == [path.name]


def test_frozen_batch_norm_keeps_its_statistics(digits):
    """A batch-norm layer whose parameters are frozen (a frozen backbone) keeps its running statistics through
    training, as its weights; the trainable ones learn theirs."""
    from torch import nn

    train = digits[0]
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 10))
    for p in model[1].parameters():
        p.requires_grad_(False)
    frozen, trainable = model[1].running_mean.clone(), model[4].running_mean.clone()
    cfg = TrainConfig.digits(progress=False, epochs=1, batch_size=64, shift=0, device="cpu")
    out = train_model(train.subset(torch.arange(256)), cfg, model=model)
    assert torch.equal(out[1].running_mean, frozen) and not torch.equal(out[4].running_mean, trainable)


def test_a_last_batch_of_one_example_leaves_a_batch_norm_model_trainable(digits):
    """65 examples in batches of 64 left one example alone in the last batch, and a batch norm cannot train on one
    ("Expected more than 1 value per channel when training"): that batch is left out; a model without batch norm
    still sees every example."""
    from torch import nn

    train = digits[0].subset(torch.arange(65))
    cfg = TrainConfig.digits(progress=False, epochs=1, batch_size=64, shift=0, device="cpu")
    normed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(4),
                           nn.Linear(4, 10))
    assert train_model(train, cfg, model=normed) is normed
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    seen = []
    plain.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]) if module.training else None)
    train_model(train, cfg, model=plain)
    assert seen == [64, 1]


def test_fine_tuning_a_model_with_fewer_outputs_than_classes_is_refused_first(digits):
    """A model of a 5-class task given 10-class data failed at its first step with the loss's "Target 7 is out of
    bounds" (an IndexError, no word of the model)."""
    from torch import nn

    train = digits[0].subset(torch.arange(64))
    five = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5))
    with pytest.raises(ValueError, match="^model: gives 5 logits, but the dataset has label 9"):
        train_model(train, TrainConfig.digits(progress=False, epochs=1, device="cpu"), model=five)
