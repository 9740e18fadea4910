"""The speed / accuracy frontier: what each cheaper EK-FAC setting saves and what it costs Δ-Influence.

For each trigger-backdoor victim of the zoo (benchmarks/zoo/run.py: same attacks, architectures, training
loops and seeds) the detection "10 points + reference" runs once per setting, through the public API with the
defaults otherwise:

- accurate: the defaults (every trackable layer, float64 eigendecompositions, factors fitted on the whole set);
- float32 eigen: ``EKFAC(..., eigen_dtype="float32")``;
- fit on 1/4: the factors fitted on a random quarter of the training set (``low_rank=False``, so the scores of
  the other three quarters keep every direction), every example scored;
- last 2 layers / last layer: ``EKFAC(model, modules=<the last k tracked layers>)``;
- query rank 32 / query rank 8: ``EKFAC(..., query_rank=k)``, every query's preconditioned gradient replaced by its
  best rank-k approximation per layer;
- damping 1e-4 / heuristic damping: not cheaper, the other damping choices (``EKFAC(..., damping=1e-4)``, and
  ``damping=None``: 0.1 x mean Lambda per layer) against the default 1e-8.

Per setting: wall seconds of the fit and of the detection (scoring + vote), recall and FPR against the known
poisons. The victims are trained once per cell; the cell's JSON is written when all its settings are done.

    nice python benchmarks/zoo/frontier.py --out benchmarks/results/frontier [--settings accurate,"query rank 8"]
    python benchmarks/zoo/frontier.py --out benchmarks/results/frontier --table /tmp/frontier.md
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deltainf  # noqa: E402
import run as zoo  # noqa: E402
from deltainf.delta import pick_affected_points  # noqa: E402
from deltainf.influence._layers import resolve_layers  # noqa: E402

SETTINGS = ("accurate", "float32 eigen", "fit on 1/4", "last 2 layers", "last layer", "query rank 32", "query rank 8",
            "damping 1e-4", "heuristic damping")
ATTACKS = zoo.TRIGGER_ATTACKS
ARCHS = zoo.zoo_models.ARCHITECTURES


def engine(setting: str, victim: nn.Module, loader: DataLoader, seed: int):
    """The fitted engine of ``setting`` and its fit seconds."""
    options = {"progress": False}
    fit_loader = loader
    if setting == "float32 eigen":
        options["eigen_dtype"] = "float32"
    elif setting == "fit on 1/4":
        n = len(loader.dataset)
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n // 4].sort().values
        fit_loader = DataLoader(Subset(loader.dataset, keep.tolist()), batch_size=loader.batch_size)
        options["low_rank"] = False
    elif setting.startswith("last"):
        names = [info.name for info, _ in resolve_layers(victim, None)]  # every layer EK-FAC tracks by default
        options["modules"] = names[-(2 if setting == "last 2 layers" else 1):]
    elif setting.startswith("query rank"):
        options["query_rank"] = int(setting.split()[-1])
    elif setting == "damping 1e-4":
        options["damping"] = 1e-4
    elif setting == "heuristic damping":
        options["damping"] = None
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untracked-module note
        ekfac = deltainf.EKFAC(victim, **options).fit(fit_loader)
    return ekfac, time.perf_counter() - t0


def run_cell(attack: str, arch: str, seed: int, settings=SETTINGS) -> dict:
    torch.set_num_threads(1)
    v = zoo.make_victim(attack, arch, seed)
    poison = v.poison
    cell = {"attack": attack, "arch": arch, "seed": seed, "n_poisons": poison.num_poisons,
            "poison_success": zoo.hit_rate(v.victim, v.x_trig, poison.target_class), "settings": {}}
    if cell["poison_success"] < zoo.TOOK:
        return cell
    victim, loader = v.victim, v.loader
    pts = pick_affected_points(v.pixel_victim, poison.triggered_test, poison.target_class, count=10)
    x, y = v.to_model(pts.x).detach(), torch.full((pts.x.shape[0],), poison.target_class)
    poisons = set(poison.poison_indices.tolist())
    n_clean = len(poison.train) - len(poisons)
    for setting in settings:
        ekfac, fit_s = engine(setting, victim, loader, seed)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = deltainf.DeltaInfluence(ekfac).detect(loader, x, y, reference=v.reference)
        flagged = set(result.flagged.tolist())
        cell["settings"][setting] = {
            "fit_seconds": fit_s, "detect_seconds": time.perf_counter() - t0,
            "tracked_parameters": sum(f.lam.numel() for f in ekfac.factors.values()),
            "recall": len(flagged & poisons) / len(poisons), "fpr": len(flagged - poisons) / n_clean,
            "found": result.found}
    return cell


def table(cells: list[dict]) -> str:
    """Per setting: fit and detection time relative to the accurate setting (median and range over the cells),
    and the detection quality (mean recall, worst recall, mean and worst FPR, cells at recall >= 0.95 and
    FPR <= 5 %)."""
    took = [c for c in cells if c["settings"]]
    lines = ["| setting | fit time vs accurate | detection time vs accurate | mean recall | worst recall | "
             "mean FPR | worst FPR | runs at recall >= 0.95, FPR <= 5 % |", "|---|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        runs = [(c["settings"][setting], c["settings"]["accurate"]) for c in took if setting in c["settings"]]
        if not runs:
            continue
        fit = sorted(r["fit_seconds"] / a["fit_seconds"] for r, a in runs)
        det = sorted(r["detect_seconds"] / a["detect_seconds"] for r, a in runs)
        rec = [r["recall"] for r, _ in runs]
        fpr = [r["fpr"] for r, _ in runs]
        ok = sum(zoo.meets_minimum(r["recall"], r["fpr"]) for r, _ in runs)
        lines.append(f"| {setting} | {fit[len(fit) // 2]:.2f} ({fit[0]:.2f}–{fit[-1]:.2f}) | "
                     f"{det[len(det) // 2]:.2f} ({det[0]:.2f}–{det[-1]:.2f}) | {sum(rec) / len(rec):.3f} | "
                     f"{min(rec):.3f} | {100 * sum(fpr) / len(fpr):.2f} % | {100 * max(fpr):.2f} % | "
                     f"{ok} of {len(runs)} |")
    present = [s for s in SETTINGS if any(s in c["settings"] for c in took)]
    lines += ["", "| attack | architecture | seed | " + " | ".join(present) + " |",
              "|---|---|---|" + "---|" * len(present)]
    for c in took:
        row = [f"{c['settings'][s]['recall']:.2f} / {100 * c['settings'][s]['fpr']:.1f} %" if s in c["settings"]
               else "—" for s in present]
        lines.append(f"| {c['attack']} | {c['arch']} | {c['seed']} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--settings", default=",".join(SETTINGS),
                       help="the settings to run, comma-separated (accurate first: the others are compared with it)")

    def one(attack, arch, seed, args):
        settings = tuple(args.settings.split(","))
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown or settings[0] != "accurate":
            raise SystemExit(f"--settings: expected 'accurate' first, then any of {SETTINGS}, got {args.settings!r}")
        return run_cell(attack, arch, seed, settings)

    return zoo.grid(argv, __doc__.splitlines()[0],
                    {"out": "benchmarks/results/frontier", "attacks": ATTACKS, "archs": ARCHS, "seeds": "0"}, table,
                    one,
                    lambda cell: {s: (round(v["recall"], 3), round(v["fpr"], 4), round(v["fit_seconds"], 1))
                                  for s, v in cell["settings"].items()}, extra)


if __name__ == "__main__":
    sys.exit(main())
