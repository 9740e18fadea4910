"""Ten labels of two modes each (CIFAR-like labels): every digit drawn at full size or at half size, backdoored into label 1.

The zoo's labels are single digits, one mode each; binary.py's are five digits but two labels. A CIFAR-10 class is
many kinds of input (breeds, poses, backgrounds) among ten labels, and a CIFAR-100 superclass is five unrelated
fine classes. Each training and test image here is drawn at full size or, at random (half of them), at half size
in the image's centre, and labelled by its digit ``d``: label ``d`` at full size, label ``(d + shift) % 10`` at half
size. ``--shift 0``: a label is one digit at two sizes (one concept, two looks); ``--shift 5`` (the default): a label
is two different digits, one per size (a superclass). Δ-Influence runs through the public API on the zoo's six
user-side models trained by the zoo's own loops (run.fit), the zoo's four protocols, no unlearning. Each protocol is
decided with the default settings and then, on the same votes and controls (``DetectionResult.revote``), with every
boundary of ``--boundaries``.
Attacks (binary.py's triggers, 7 % of the training set, examples of the other labels relabelled 1):

- badnet: a 3 x 3 checkerboard in the bottom-right corner;
- blended: a fixed random pattern blended in at 20 %;
- none: a poison-free model traced from the test inputs it gets wrong (it must answer "no poison").

    nice python benchmarks/zoo/modes.py --shift 5 --out benchmarks/results/modes-superclass
    python benchmarks/zoo/modes.py --out benchmarks/results/modes-superclass --table /tmp/modes.md
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import binary  # noqa: E402
import models as zoo_models  # noqa: E402
import run as zoo  # noqa: E402
from deltainf.data import ImageDataset, load_digits_dataset  # noqa: E402

ATTACKS = ("badnet", "blended", "none")
TARGET = 1
BOUNDARIES = ("representation", "mixture", "coherence")


def two_modes(data: ImageDataset, shift: int, seed: int) -> tuple[ImageDataset, torch.Tensor]:
    """``data`` with half of its images (drawn with ``seed``) shrunk to half size in the centre and relabelled
    ``(digit + shift) % 10``: (the dataset, int64 (N,) each example's mode, 1 = half size)."""
    small = torch.rand(len(data), generator=torch.Generator().manual_seed(seed)) < 0.5
    x = data.images.clone()
    side = x.shape[-1]
    shrunk = F.interpolate(x[small], scale_factor=0.5, mode="area")
    x[small] = 0.0
    at = side // 4
    x[small, :, at:at + shrunk.shape[-2], at:at + shrunk.shape[-1]] = shrunk
    y = torch.where(small, (data.labels + shift) % 10, data.labels)
    return ImageDataset(x, y, name=f"{data.name} two modes, shift {shift}"), small.long()


def run_cell(attack: str, arch: str, seed: int, shift: int, boundaries: list[str]) -> dict:
    train, mode = two_modes(load_digits_dataset("train"), shift, 77)
    test, _ = two_modes(load_digits_dataset("test"), shift, 78)
    v = binary.prepare(attack, arch, seed, train, test, TARGET)
    cell = {**v.cell, "shift": shift}
    if v.ekfac is not None:
        y = v.loader.dataset.tensors[1]

        def metrics(result) -> dict:
            return {**zoo.detection_metrics(result, v.truth, len(y)), **_clean_by_mode(result, v.truth, y, mode)}

        cell["protocols"], cell["boundaries"] = {}, {}
        for name, points, result in v.protocols():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # every other boundary decided on the same votes and controls
                cell["boundaries"][name] = {
                    b: metrics(result if b == result.settings["boundary"] else zoo.with_boundary(result, b).revote())
                    for b in boundaries}
            cell["protocols"][name] = {"points": points.shape[0], "mirror_cut": result.cut is not None,
                                       "boundary": result.settings["boundary"], **metrics(result)}
    cell["seconds"] = time.perf_counter() - v.start
    return cell


def _clean_by_mode(result, truth: set, labels: torch.Tensor, mode: torch.Tensor) -> dict:
    """The clean examples flagged, counted by label and mode ("label/mode", 1 = half size)."""
    clean = torch.tensor([i for i in result.flagged.tolist() if i not in truth], dtype=torch.int64)
    keys = [f"{int(a)}/{int(b)}" for a, b in zip(labels[clean], mode[clean])]
    return {"clean_by_mode": {k: keys.count(k) for k in sorted(set(keys))}}


def table(cells: list[dict]) -> str:
    """Per attack x architecture x seed: accuracy, poison success, then recall / FPR per protocol with the
    defaults; below, every boundary's totals on the same scores."""
    order = {a: i for i, a in enumerate(ATTACKS)}
    cells = sorted(cells, key=lambda c: (order[c["attack"]], c["arch"], c["seed"]))
    return zoo.cells_table(cells, ["attack", "architecture", "seed", "accuracy", "poison success"], binary._head) + \
        "\n" + boundary_table(cells)


def boundary_table(cells: list[dict]) -> str:
    """Per protocol and boundary: backdoor runs at the minimum and at the goal, clean examples flagged, runs with
    recall below 0.95, and poison-free models answering "no poison"."""
    took = [c for c in cells if c["took"] and c.get("boundaries")]
    names = [name for name, *_ in zoo.PROTOCOLS]
    found = sorted({b for c in took for n in names for b in c["boundaries"][n]})
    if not found:
        return ""
    lines = ["| protocol | boundary | at the minimum | at the goal | clean examples flagged | recall < 0.95 | "
             "poison-free: no poison |", "|---|---|---|---|---|---|---|"]
    for name in names:
        for boundary in found:
            rows = [(c, c["boundaries"][name][boundary]) for c in took if boundary in c["boundaries"][name]]
            poisoned = [m for c, m in rows if c["attack"] != "none"]
            clean = [m for c, m in rows if c["attack"] == "none"]
            lines.append(
                f"| {name} | {boundary} | {sum(zoo.meets_minimum(m['recall'], m['fpr']) for m in poisoned)} of "
                f"{len(poisoned)} | {sum(zoo.meets_goal(m['recall'], m['fpr']) for m in poisoned)} | "
                f"{sum(m['flagged'] - m['true_positives'] for m in poisoned)} | "
                f"{sum(m['recall'] < 0.95 for m in poisoned)} | {sum(not m['found'] for m in clean)} of {len(clean)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--shift", type=int, default=5,
                       help="a half-size digit d is labelled (d + shift) %% 10: 0 = one digit at two sizes, "
                            "5 = two digits per label")
        p.add_argument("--boundaries", default=",".join(BOUNDARIES),
                       help="boundaries to decide each protocol with as well, on the same scores ('' for none)")

    return zoo.grid(argv, __doc__.splitlines()[0],
                    {"out": "benchmarks/results/modes-superclass", "attacks": ATTACKS,
                     "archs": zoo_models.ARCHITECTURES, "seeds": "0,1"}, table,
                    lambda attack, arch, seed, args: run_cell(attack, arch, seed, args.shift,
                                                              [b for b in args.boundaries.split(",") if b]),
                    zoo.brief, extra)


if __name__ == "__main__":
    sys.exit(main())
