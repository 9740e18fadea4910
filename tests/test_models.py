"""Models: shapes, the normalize/features/classifier split, seeded init, factory errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deltainf.models import (MODEL_NAMES, Normalize, ResNet18, SmallCNN, build_model, head_inputs,
                             init_weights, penultimate_features)


def test_normalize_module():
    norm = Normalize([0.5, 0.25], [0.5, 0.25])
    x = torch.rand(2, 2, 3, 3)
    z = norm(x)
    assert torch.allclose(z[:, 0], (x[:, 0] - 0.5) / 0.5) and torch.allclose(norm.inverse(z), x, atol=1e-6)
    assert {"mean", "std"} <= set(norm.state_dict())
    with pytest.raises(ValueError, match="positive"):
        Normalize([0.0], [0.0])
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        norm(torch.rand(2, 3, 4, 4))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name, size, kwargs, feat", [("small_cnn", 16, {}, 128), ("small_cnn", 32, {}, 128),
                                                      ("resnet18", 16, {"base_width": 16}, 128)])
def test_forward_and_feature_split(name, size, kwargs, feat):
    model = build_model(name, num_classes=7, in_channels=3, image_size=size, mean=[0.3] * 3, std=[0.3] * 3,
                        **kwargs)
    model.eval()
    x = torch.rand(4, 3, size, size)
    logits = model(x)
    f = penultimate_features(model, x)
    assert logits.shape == (4, 7) and f.shape == (4, feat) and model.feature_dim == feat
    torch.testing.assert_close(model.classifier(f), logits)
    assert isinstance(model.normalize, Normalize) and list(model.children())[0] is model.normalize


def test_resnet18_architecture():
    cifar = ResNet18(num_classes=10)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in cifar.modules())
    blocks = [len(getattr(cifar, f"layer{i}")) for i in range(1, 5)]
    assert blocks == [2, 2, 2, 2]
    assert cifar.layer2[0].conv1.stride == (2, 2) and cifar.classifier.in_features == 512
    n_params = sum(p.numel() for p in cifar.parameters())
    assert 11_000_000 < n_params < 11_300_000  # ResNet-18 for 10 classes has ~11.17 M parameters
    big = build_model("resnet18", 10, 3, image_size=96, base_width=8)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    assert big(torch.rand(1, 3, 96, 96)).shape == (1, 10)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_model("small_cnn", 10, 3, 16, seed=3)
    b = build_model("small_cnn", 10, 3, 16, seed=3)
    c = build_model("small_cnn", 10, 3, 16, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # build_model itself consumes no global RNG
    for (ka, va), (_, vb), (_, vc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(va, vb), ka
    assert not torch.equal(a.features[0].weight, c.features[0].weight)
    r1, r2 = init_weights(ResNet18(base_width=4), 0), init_weights(ResNet18(base_width=4), 0)
    assert all(torch.equal(p, q) for p, q in zip(r1.parameters(), r2.parameters()))


def test_factory_errors():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", 10)
    with pytest.raises(ValueError, match="one per channel"):
        build_model("small_cnn", 10, in_channels=3, mean=[0.5])
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_cnn", 1)
    with pytest.raises(ValueError, match="mean must be finite"):
        build_model("small_cnn", 10, in_channels=1, image_size=8, mean=[float("nan")], std=[0.5])
    for kwargs in ({"width": 0}, {"hidden": 0}, {"in_channels": True}):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be an int >= 1"):
            build_model("small_cnn", 10, image_size=8, **kwargs)
    import numpy as np

    assert build_model("small_cnn", np.int64(3), in_channels=1, image_size=8).build_args["num_classes"] == 3
    assert set(MODEL_NAMES) == {"small_cnn", "resnet18"}


def test_penultimate_requires_feature_split():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(TypeError, match="normalize"):
        penultimate_features(plain, torch.rand(1, 3, 2, 2))
    wrapped = nn.DataParallel(SmallCNN(3, 3, 16))  # wrappers are unwrapped
    assert penultimate_features(wrapped, torch.rand(2, 3, 16, 16)).shape == (2, 128)




class _HeadRegisteredFirst(nn.Module):
    """A head registered before the body: what the model CALLS last is its head, not what it lists last."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 8))

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_head_inputs_reads_what_the_head_reads():
    x = torch.rand(5, 3, 16, 16)
    model = SmallCNN(3, 3, 16).eval()
    assert torch.equal(head_inputs(model, x), penultimate_features(model, x))  # a deltainf model: the same
    user = _HeadRegisteredFirst()
    assert torch.allclose(head_inputs(user, x[:, :, :4, :4]), torch.tanh(user.body(x[:, :, :4, :4])))
    assert not user.head._forward_hooks  # the hooks are gone
    conv_head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert torch.allclose(head_inputs(conv_head, x), conv_head[:2](x).mean((2, 3)))  # averaged over positions
    tokens = nn.Sequential(nn.Unflatten(1, (3, 256)), nn.Linear(256, 6), nn.Tanh(), nn.Linear(6, 2))
    assert torch.allclose(head_inputs(tokens, x.flatten(1)), tokens[:3](x.flatten(1)).mean(1))  # over tokens
    with pytest.raises(TypeError, match="no nn.Linear or nn.Conv2d"):
        head_inputs(nn.Sequential(nn.Flatten(), nn.Tanh()), x)
    # a model in training mode: its BatchNorm statistics moved and dropout made two calls differ
    bn = nn.Sequential(nn.Flatten(), nn.Linear(768, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    first, second = head_inputs(bn, x), head_inputs(bn, x)
    assert torch.equal(first, second) and not first.requires_grad and bn.training
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
    with pytest.raises(TypeError, match="^model: expected a torch nn.Module"):
        head_inputs(lambda v: v, x)


def test_unwrap_model_reads_through_wrappers():
    """DataParallel around a compiled model, and a wrapper holding the model as .module (SWA's AveragedModel): the
    model itself (an AveragedModel made penultimate_features fail after unwrap_model was narrowed to DDP)."""
    from torch.optim.swa_utils import AveragedModel

    from deltainf.models import unwrap_model

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert unwrap_model(torch.nn.DataParallel(torch.compile(model))) is model
    assert unwrap_model(AveragedModel(model)).__class__ is torch.nn.Sequential

