"""Architectures outside the zoo: Δ-Influence's defaults on user models whose layers EK-FAC cannot all track.

The zoo (run.py) has six user models. This study adds ten more, written here the way a user writes them, each
with something the defaults must handle without being told:

- convnext: depthwise 7 x 7 convolutions (not tracked), LayerNorm over channels-last features, pointwise layers as
  nn.Linear on (B, H, W, C) inputs (tracked, H x W positions per example), a learned layer scale;
- mixer: an MLP-Mixer block, whose token-mixing nn.Linear acts on transposed (B, C, T) features;
- seq_first_transformer: torch's nn.TransformerEncoder in its default sequence-first layout (T, B, E): its
  feed-forward layers see positions along their inputs' first dimension and are left out, as is the attention;
- weight_norm_cnn: convolutions and a head under torch.nn.utils.parametrizations.weight_norm;
- tied_mlp: one hidden nn.Linear applied twice in the forward pass;
- instance_norm_cnn: convolutions, their biases on (torch's default), each followed by InstanceNorm2d, which
  removes every channel's constant: the biases' gradients are zero up to round-off;
- all_conv: an all-convolutional network (Network in Network): its head is a 1 x 1 convolution to the class maps,
  averaged over the image, with no nn.Linear anywhere;
- tanh_cnn: a LeNet of the 1990s: tanh activations, average pooling, dropout before two linear layers;
- preact_resnet: pre-activation residual blocks (BatchNorm and ReLU before each bias-free convolution), global average
  pooling and a linear head;
- exported_vit: the zoo's vision transformer after torch.export.save / deltainf.models.load_exported (the path of
  ``deltainf detect --model model.pt2``), where nn.MultiheadAttention folds the tokens into its projections' rows.

Attacks: the library's trigger backdoors on digits (BadNet, blended, WaNet, the frequency trigger) and "none" (a
model without poison traced from the test inputs it gets wrong). Protocols as in the zoo; no unlearning.

    nice python benchmarks/zoo/archs.py --out benchmarks/results/archs
    python benchmarks/zoo/archs.py --table /tmp/archs.md
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deltainf  # noqa: E402
import models as zoo_models  # noqa: E402
import run as zoo  # noqa: E402
from deltainf import recipes  # noqa: E402
from deltainf.data import load_digits_dataset  # noqa: E402
from deltainf.delta import pick_affected_points  # noqa: E402
from deltainf.models.user import load_exported  # noqa: E402

ATTACKS = ("none", "badnet", "blended", "wanet", "frequency")
ARCHS = ("convnext", "mixer", "seq_first_transformer", "weight_norm_cnn", "tied_mlp", "exported_vit",
         "instance_norm_cnn", "all_conv", "tanh_cnn", "preact_resnet")


class _ConvNeXtBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.scale = nn.Parameter(0.1 * torch.ones(c))

    def forward(self, x):
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        return x + (self.pw2(F.gelu(self.pw1(h))) * self.scale).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 2, stride=2)
        self.blocks = nn.Sequential(_ConvNeXtBlock(width), _ConvNeXtBlock(width))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Mixer(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int, dim: int = 64, patch: int = 4):
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token1, self.token2 = nn.Linear(tokens, 2 * tokens), nn.Linear(2 * tokens, tokens)
        self.channel1, self.channel2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.token2(F.gelu(self.token1(self.norm1(t).transpose(1, 2)))).transpose(1, 2)
        t = t + self.channel2(F.gelu(self.channel1(self.norm2(t))))
        return self.head(t.mean(1))


class SequenceFirstTransformer(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int, dim: int = 64, patch: int = 4):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn((image_size // patch) ** 2, 1, dim))
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.1), 2,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).permute(2, 0, 1) + self.pos  # (T, B, E)
        return self.head(self.encoder(t).mean(0))


def weight_norm_cnn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return nn.Sequential(weight_norm(nn.Conv2d(in_channels, 32, 3, padding=1)), nn.ReLU(), nn.MaxPool2d(2),
                         weight_norm(nn.Conv2d(32, 64, 3, padding=1)), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         weight_norm(nn.Linear(64 * (image_size // 4) ** 2, num_classes)))


def instance_norm_cnn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.InstanceNorm2d(32, affine=True), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.InstanceNorm2d(64, affine=True),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * (image_size // 4) ** 2, num_classes))


def all_conv(in_channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, num_classes, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tanh_cnn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 16, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
                         nn.Conv2d(16, 32, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(32 * (image_size // 4) ** 2, 84), nn.Tanh(), nn.Linear(84, num_classes))


class _PreActBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))


def preact_resnet(in_channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), _PreActBlock(32), nn.AvgPool2d(2),
                         _PreActBlock(32), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, num_classes))


class TiedMLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.inp, self.shared, self.head = nn.Linear(in_features, hidden), nn.Linear(hidden, hidden), \
            nn.Linear(hidden, num_classes)

    def forward(self, x):
        h = F.relu(self.inp(x.flatten(1)))
        return self.head(F.relu(self.shared(F.relu(self.shared(h)))))


def build(arch: str, shape, num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    c, size = shape[0], shape[-1]
    if arch == "convnext":
        return ConvNeXt(c, num_classes)
    if arch == "mixer":
        return Mixer(c, num_classes, size)
    if arch == "seq_first_transformer":
        return SequenceFirstTransformer(c, num_classes, size)
    if arch == "weight_norm_cnn":
        return weight_norm_cnn(c, num_classes, size)
    if arch == "all_conv":
        return all_conv(c, num_classes)
    if arch == "tanh_cnn":
        return tanh_cnn(c, num_classes, size)
    if arch == "preact_resnet":
        return preact_resnet(c, num_classes)
    if arch == "instance_norm_cnn":
        return instance_norm_cnn(c, num_classes, size)
    if arch == "tied_mlp":
        return TiedMLP(c * size * size, num_classes)
    if arch == "exported_vit":
        return zoo_models.VisionTransformer(num_classes, shape)
    raise ValueError(arch)


def train(arch: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int, export: bool = True) -> nn.Module:
    """The user's model trained by a hand-written AdamW loop; the exported ViT goes through a torch.export file
    (unless ``export`` is False: the surrogate of an attack that needs one)."""
    model = zoo_models.train_user_loop(build(arch, x.shape[1:], num_classes, seed), x, y, optimizer="adamw",
                                       lr=1e-3 if "transformer" in arch or "vit" in arch else 2e-3,
                                       epochs=40 if arch == "exported_vit" else 25, batch_size=64, seed=seed,
                                       weight_decay=0.05, shift=1)
    if arch != "exported_vit" or not export:
        return model
    program = torch.export.export(model, (x[:4],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vit.pt2")
        torch.export.save(program, path)
        return load_exported(path)


def run_cell(attack: str, arch: str, seed: int) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    train_set, test = load_digits_dataset("train"), load_digits_dataset("test")
    surrogate = None  # the frequency trigger is fitted to a model of the user's architecture trained on clean data
    if attack != "none" and recipes.ATTACKS[attack].needs_surrogate:
        surrogate = train(arch, train_set.images, train_set.labels, train_set.num_classes, seed, export=False)
    poison = None if attack == "none" else recipes.run_attack(attack, train_set, test, surrogate, seed)
    data = train_set if poison is None else poison.train
    victim = train(arch, data.images, data.labels, data.num_classes, seed)
    pred = zoo.predict(victim, test.images)
    cell = {"attack": attack, "arch": arch, "seed": seed,
            "victim": {"accuracy": float((pred == test.labels).float().mean())}}
    if poison is not None:
        cell["n_poisons"] = poison.num_poisons
        cell["victim"]["poison_success"] = zoo.hit_rate(victim, poison.triggered_test.images, poison.target_class)
        cell["took"] = cell["victim"]["poison_success"] >= zoo.TOOK
    else:
        wrong = zoo.misclassified(cell, pred, test.labels)
    if not cell["took"]:
        cell["seconds"] = time.perf_counter() - t0
        return cell
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.images, data.labels), batch_size=256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ekfac = deltainf.EKFAC(victim, progress=False).fit(loader)
    cell["ekfac_coverage"] = ekfac.coverage.brief()
    cell["warnings"] = sorted({str(w.message).split(":")[0] for w in caught})
    truth = set() if poison is None else set(poison.poison_indices.tolist())
    cell["protocols"] = {}
    for name, count, with_reference in zoo.PROTOCOLS:
        if poison is None:
            x, y = test.images[wrong[:count]], pred[wrong[:count]]
        else:
            pts = pick_affected_points(victim, poison.triggered_test, poison.target_class, count=count)
            x, y = pts.x, torch.full((pts.x.shape[0],), poison.target_class)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = deltainf.DeltaInfluence(ekfac).detect(loader, x, y, reference=test if with_reference else None)
        cell["protocols"][name] = {"points": int(x.shape[0]), **zoo.detection_metrics(result, truth, len(data))}
    cell["seconds"] = time.perf_counter() - t0
    return cell


def table(cells: list[dict]) -> str:
    """Per architecture x attack x seed: recall / FPR per protocol ("no poison" or the size and FPR of the claim for
    the poison-free model), the counts against the issue's minimum, and what EK-FAC tracks in each model."""
    order = {a: i for i, a in enumerate(ARCHS)}, {a: i for i, a in enumerate(ATTACKS)}
    cells = sorted(cells, key=lambda c: (order[0][c["arch"]], order[1][c["attack"]], c["seed"]))
    lines = [zoo.cells_table(cells, ["architecture", "attack", "seed", "accuracy", "poison success"], _head)]
    coverage = {c["arch"]: c["ekfac_coverage"] for c in cells if "ekfac_coverage" in c}
    lines += ["What EK-FAC tracks in each (`EKFAC.coverage.brief()`):", ""]
    lines += [f"- {arch}: {coverage[arch]}" for arch in ARCHS if arch in coverage]
    return "\n".join(lines) + "\n"


def _head(c: dict) -> list[str]:
    psr = "—" if c["attack"] == "none" else zoo.percent(c["victim"]["poison_success"])
    return [c["arch"], c["attack"], str(c["seed"]), zoo.percent(c["victim"]["accuracy"]), psr]


def main(argv=None) -> int:
    return zoo.study(argv, __doc__.splitlines()[0],
                     {"out": "benchmarks/results/archs", "attacks": ATTACKS, "archs": ARCHS, "seeds": "0,1,2"}, table,
                     run_cell)


if __name__ == "__main__":
    sys.exit(main())
