"""Affected points of several labels: a backdoor's triggered inputs traced together with the victim's own test errors.

A user who collects the test inputs a model gets wrong holds triggered inputs (all predicted as the attack's target)
and ordinary mistakes of other labels side by side. This study traces both at once through the public API with its
defaults: ``TRIGGERED`` triggered inputs plus the first ``ERRORS`` clean test inputs the victim misclassifies as a
label other than the target, with and without held-out controls, on the zoo's victims (run.make_victim). Each
affected label is decided on its own (``DetectionResult.per_label``); a flagged example of a label other than the
target is a false claim. No unlearning.

    nice python benchmarks/zoo/mixed.py --out benchmarks/results/mixed
    python benchmarks/zoo/mixed.py --out benchmarks/results/mixed --table /tmp/mixed.md
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deltainf  # noqa: E402
import run as zoo  # noqa: E402
from deltainf.delta import pick_affected_points  # noqa: E402

ATTACKS = ("badnet", "blended", "wanet", "frequency")
ARCHS = ("small_cnn", "sequential_pipeline", "layer_norm_mlp", "group_norm_cnn")
TRIGGERED = 5
ERRORS = 5
PROTOCOLS = (("with reference", True), ("without reference", False))


def run_cell(attack: str, arch: str, seed: int) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    v = zoo.make_victim(attack, arch, seed)
    target = v.poison.target_class
    cell = {"attack": attack, "arch": arch, "seed": seed, "n_poisons": v.poison.num_poisons, "target_class": target,
            "victim": {"poison_success": zoo.hit_rate(v.victim, v.x_trig, target)}}
    cell["took"] = cell["victim"]["poison_success"] >= zoo.TOOK
    if not cell["took"]:
        cell["seconds"] = time.perf_counter() - t0
        return cell
    predicted = zoo.predict(v.victim, v.x_test)
    errors = ((predicted != v.test.labels) & (predicted != target)).nonzero().flatten()[:ERRORS]
    triggered = pick_affected_points(v.pixel_victim, v.poison.triggered_test, target, count=TRIGGERED).x
    x = torch.cat([v.to_model(triggered).detach(), v.to_model(v.test.images[errors]).detach()])
    y = torch.cat([torch.full((triggered.shape[0],), target), predicted[errors]])
    cell["labels"] = y.tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untracked-module note
        ekfac = deltainf.EKFAC(v.victim, progress=False).fit(v.loader)
    truth = set(v.poison.poison_indices.tolist())
    cell["protocols"] = {}
    for name, with_reference in PROTOCOLS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = deltainf.DeltaInfluence(ekfac).detect(v.loader, x, y,
                                                           reference=v.reference if with_reference else None)
        row = zoo.detection_metrics(result, truth, len(v.data))
        row["flagged_other_labels"] = int((v.data.labels[result.flagged] != target).sum())
        parts = getattr(result, "per_label", None) or {}  # None: one label, or a version that pooled them
        row["per_label"] = {str(label): {"points": part.n_points, "found": part.found,
                                         "flagged": int(part.flagged.numel()),
                                         "true_positives": len(set(part.flagged.tolist()) & truth),
                                         "fdr_estimate": part.fdr_estimate} for label, part in parts.items()}
        cell["protocols"][name] = row
    cell["seconds"] = time.perf_counter() - t0
    return cell


def false_claims(row: dict, target: int) -> str:
    """The labels other than the target that claimed a group, with their sizes; or how many flagged examples carry
    another label, for a version that decided the labels together."""
    if not row["per_label"]:
        return f"{row['flagged_other_labels']} examples" if row["flagged_other_labels"] else "none"
    claims = [f"{label}: {part['flagged']}" for label, part in row["per_label"].items()
              if int(label) != target and part["found"]]
    return ", ".join(claims) if claims else "none"


def table(cells: list[dict]) -> str:
    """Per attack x architecture x seed: the labels traced, then recall / FPR and the false claims per protocol."""
    names = [name for name, _ in PROTOCOLS]
    lines = ["| attack | architecture | seed | labels of the points | " +
             " | ".join(f"{n}: recall / FPR | {n}: other labels claiming" for n in names) + " |",
             "|---|---|---|---|" + "---|---|" * len(names)]
    order = {a: i for i, a in enumerate(ATTACKS)}
    took = [c for c in cells if c["took"]]
    for c in sorted(took, key=lambda c: (order.get(c["attack"], 99), c["arch"], c["seed"])):
        row = []
        for n in names:
            p = c["protocols"][n]
            row += [f"{p['recall']:.2f} / {100 * p['fpr']:.1f} %" if p["found"] else "nothing found",
                    false_claims(p, c["target_class"])]
        lines.append(f"| {c['attack']} | {c['arch']} | {c['seed']} | {c['labels']} | " + " | ".join(row) + " |")
    ok = zoo.at_minimum(took, names)
    clean = {n: sum(false_claims(c["protocols"][n], c["target_class"]) == "none" for c in took) for n in names}
    lines += ["", f"Victims where the attack took: {len(took)} of {len(cells)}. Runs at recall >= 0.95 and FPR <= 5 %: "
              + "; ".join(f"{n}: {ok[n]}" for n in names) + ". Runs where no other label claims a group: "
              + "; ".join(f"{n}: {clean[n]}" for n in names) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return zoo.study(argv, __doc__.splitlines()[0],
                     {"out": "benchmarks/results/mixed", "attacks": ATTACKS, "archs": ARCHS, "seeds": "0,1"}, table,
                     run_cell)


if __name__ == "__main__":
    sys.exit(main())
