"""The detection zoo: Δ-Influence through the public API with its defaults, on attacks x architectures x
protocols x seeds on the bundled digits, with exact unlearning (retraining without the flagged set).

Architectures (benchmarks/zoo/models.py, written the way a user writes them): deltainf's SmallCNN
(normalisation inside the model, deltainf's training recipe), a BatchNorm ResNet with a depthwise block
and dropout (pixel inputs, a hand-written SGD loop), a plain nn.Sequential CNN trained by a
hand-written Adam loop on inputs standardised in the data pipeline, a LayerNorm MLP on the flattened
pixels (no convolution) trained by a hand-written AdamW loop with label smoothing, and a GroupNorm CNN
(strided convolutions, global average pooling) trained by SGD with random shifts of up to 2 pixels.
Attacks: the library's digits settings of BadNet, blended, WaNet, the frequency trigger, SIG and label-consistent, plus "none" (a model trained
without poison, traced from the test inputs it gets wrong). Protocols: 1 affected point (the paper's) or
10, each with held-out controls from the test split (``reference=``, as ``deltainf detect`` does) or
without (the bare call, controls from the training set).

    nice python benchmarks/zoo/run.py --out benchmarks/results/zoo          # every cell (hours on 2 cores)
    python benchmarks/zoo/run.py --out benchmarks/results/zoo --table docs/zoo_table.md
    nice python benchmarks/zoo/run.py --out benchmarks/results/zoo-detect --detect-only   # detections alone

Each cell writes ``<out>/<attack>-<arch>-seed<s>.json`` when it finishes; a rerun skips finished cells.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deltainf  # noqa: E402
import models as zoo_models  # noqa: E402
from deltainf import recipes  # noqa: E402
from deltainf._files import atomic_open, write_json, write_text  # noqa: E402
from deltainf.data import load_digits_dataset  # noqa: E402
from deltainf.delta import pick_affected_points  # noqa: E402
from deltainf.report import environment_info  # noqa: E402
from deltainf.train import TrainConfig, train_model  # noqa: E402

ATTACKS = ("none",) + tuple(a for a in recipes.ATTACKS if a != "witches-brew")
PROTOCOLS = (("10 points + reference", 10, True), ("1 point + reference", 1, True),
             ("10 points", 10, False), ("1 point", 1, False))
# Other decision settings, replayed on every protocol's votes (DetectionResult.revote, no new scores): the
# data behind the choice of the defaults in docs/RESULTS.md.
SWEEP_FDR = (0.05, 0.1, 0.2, 0.3)
SWEEP_COMBINE = ("pooled", "majority", "any")


def with_boundary(result, boundary: str):
    """``result`` with another group boundary in its settings, for :meth:`DetectionResult.revote` to decide with on
    the same votes and controls (no new scores)."""
    return dataclasses.replace(result, settings=dict(result.settings, boundary=boundary))


# The decision rules replayed: the default (candidates of the affected label, the coherence test, the group's
# boundary in the support and in the representation), the support boundary alone, the permutation cut alone,
# the rule before the coherence test (every example a candidate, the control gate and the mirror), and the
# mirror alone.
RULES = {
    "coherence": lambda r: r,
    "support mixture": lambda r: with_boundary(r, "mixture"),
    "coherence cut only": lambda r: with_boundary(r, "coherence"),
    "controls + mirror": lambda r: dataclasses.replace(r, eligible=None, coherence=None),
    "mirror only": lambda r: dataclasses.replace(r, eligible=None, coherence=None, control_support=None),
}
RULE_NAMES = {"coherence": "the default", "support mixture": "the support mixture alone (no representation)",
              "coherence cut only": "the permutation cut alone (no mixture boundary)",
              "controls + mirror": "all candidates, control gate + mirror",
              "mirror only": "all candidates, mirror only"}
TOOK = 0.5  # an attack "takes" when the victim sends at least half of the triggered test inputs to the target


class Standardize(nn.Module):
    """The user's data pipeline for the pipeline-normalised model, (x - mean) / std; used to make its
    inputs and, for the attacks that need a surrogate, a pixel-space view of the model."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def fit(arch: str, dataset, seed: int, to_model) -> nn.Module:
    """Train ``arch`` on ``dataset`` the way its user does; returns a model taking model-space inputs."""
    if arch == "small_cnn":
        return train_model(dataset, TrainConfig.digits(seed=seed, progress=False))
    model = zoo_models.build(arch, dataset.num_classes, dataset.image_shape, seed)
    x = to_model(dataset.images)
    if arch == "bn_resnet":
        return zoo_models.train_user_loop(model, x, dataset.labels, optimizer="sgd", lr=0.05, epochs=15,
                                          batch_size=64, seed=seed, weight_decay=5e-4, shift=1)
    if arch == "group_norm_cnn":
        return zoo_models.train_user_loop(model, x, dataset.labels, optimizer="sgd", lr=0.05, epochs=20,
                                          batch_size=32, seed=seed, weight_decay=1e-4, shift=2)
    if arch == "layer_norm_mlp":
        return zoo_models.train_user_loop(model, x, dataset.labels, optimizer="adamw", lr=2e-3, epochs=30,
                                          batch_size=64, seed=seed, weight_decay=0.05, label_smoothing=0.1)
    if arch == "vit":
        return zoo_models.train_user_loop(model, x, dataset.labels, optimizer="adamw", lr=1e-3, epochs=40,
                                          batch_size=64, seed=seed, weight_decay=0.05, shift=1)
    return zoo_models.train_user_loop(model, x, dataset.labels, optimizer="adam", lr=1e-3, epochs=15, batch_size=32,
                                      seed=seed)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + 512]).argmax(1) for i in range(0, x.shape[0], 512)])


def hit_rate(model: nn.Module, x: torch.Tensor, y) -> float:
    """The share of x that the model labels y (an accuracy for true labels, a poison success for the target)."""
    return float((predict(model, x) == y).float().mean())


@dataclasses.dataclass
class Victim:
    """One cell's models and data: the poison-free model, the attack (None for "none"), the victim trained on
    its data, and the victim's training loader and held-out reference in model space."""

    test: object
    to_model: nn.Module
    clean: nn.Module
    poison: object
    victim: nn.Module
    data: object
    loader: DataLoader
    x_test: torch.Tensor
    x_trig: torch.Tensor | None

    @property
    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_test, self.test.labels

    @property
    def pixel_victim(self) -> nn.Module:
        return nn.Sequential(self.to_model, self.victim).eval()


def make_victim(attack: str, arch: str, seed: int) -> Victim:
    """Train the poison-free model, poison the data (unless ``attack`` is "none") and train the victim on it."""
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    to_model = Standardize(train.mean, train.std) if arch == "sequential_pipeline" else nn.Identity()
    clean = fit(arch, train, seed, to_model)
    poison = None if attack == "none" else \
        recipes.run_attack(attack, train, test, nn.Sequential(to_model, clean).eval(), seed)
    data = train if poison is None else poison.train
    victim = clean if poison is None else fit(arch, data, seed, to_model)
    loader = DataLoader(TensorDataset(to_model(data.images).detach(), data.labels), batch_size=256)
    x_trig = None if poison is None else to_model(poison.triggered_test.images).detach()
    # the inputs as the model takes them, mapped once
    return Victim(test, to_model, clean, poison, victim, data, loader, to_model(test.images).detach(), x_trig)


def replayed_settings(result, poisons: set) -> dict:
    """Every rule of :data:`RULES` x fdr x combine replayed on ``result``'s votes: {"rule|fdr|combine": [poisons
    flagged, clean examples flagged]}."""
    sweep = {}
    for gate, rule in RULES.items():
        base = rule(result)
        for fdr in SWEEP_FDR:
            for combine in SWEEP_COMBINE:
                again = set(base.revote(fdr=fdr, combine=combine).flagged.tolist())
                sweep[f"{gate}|{fdr}|{combine}"] = [len(again & poisons), len(again - poisons)]
    return sweep


def run_cell(attack: str, arch: str, seed: int, raw: str | None = None, detect_only: bool = False) -> dict:
    """One cell: train the poison-free model and the victim, detect with every protocol, replay the decision
    settings on the votes (:func:`replayed_settings`) and retrain without each flagged set; ``detect_only`` leaves out
    the replays and the retraining, which are most of a cell's cost beside the victims' training (a rerun of the
    detections after a change of rule)."""
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    v = make_victim(attack, arch, seed)
    test, to_model, poison, victim, data, loader = v.test, v.to_model, v.poison, v.victim, v.data, v.loader
    x_test, x_trig, reference, pixel_victim = v.x_test, v.x_trig, v.reference, v.pixel_victim
    clean_pred = predict(v.clean, x_test)
    cell = {"attack": attack, "arch": arch, "seed": seed,
            "clean_model": {"accuracy": float((clean_pred == test.labels).float().mean())}}
    if poison is None:
        victim_pred = clean_pred
        wrong = (clean_pred != test.labels).nonzero().flatten()
        cell["n_misclassified"] = int(wrong.numel())
    else:
        victim_pred = predict(victim, x_test)
        cell["n_poisons"] = poison.num_poisons
        cell["target_class"] = poison.target_class
        cell["clean_model"]["poison_success"] = hit_rate(v.clean, x_trig, poison.target_class)
    cell["victim"] = {"accuracy": float((victim_pred == test.labels).float().mean())}
    if poison is not None:
        psr = hit_rate(victim, x_trig, poison.target_class)
        cell["victim"]["poison_success"] = psr
        if psr < TOOK:
            cell["took"] = False
            cell["seconds"] = time.perf_counter() - t0
            return cell
    cell["took"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untracked-module note of the BatchNorm ResNet
        ekfac = deltainf.EKFAC(victim, progress=False).fit(loader)
    cell["ekfac_coverage"] = ekfac.coverage.brief()
    cell["protocols"] = {}
    for name, count, with_reference in PROTOCOLS:
        if poison is None:
            if cell["n_misclassified"] == 0:
                continue
            x, y = test.images[wrong[:count]], victim_pred[wrong[:count]]
        else:
            pts = pick_affected_points(pixel_victim, poison.triggered_test, poison.target_class, count=count)
            x, y = pts.x, torch.full((pts.x.shape[0],), poison.target_class)
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = deltainf.DeltaInfluence(ekfac).detect(loader, to_model(x).detach(), y,
                                                           reference=reference if with_reference else None)
        flagged = set(result.flagged.tolist())
        poisons = set() if poison is None else set(poison.poison_indices.tolist())
        if raw is not None:  # what any other decision rule needs, to be replayed without scoring again
            os.makedirs(raw, exist_ok=True)
            with atomic_open(os.path.join(raw, f"{attack}-{arch}-seed{seed}-{name}.pt"), "wb") as f:
                torch.save({"votes": result.votes, "mirror_votes": result.mirror_votes,
                            "support": result.control_support, "eligible": result.eligible,
                            "coherence": result.coherence, "features": result.features,
                            "poisons": sorted(poisons)}, f)
        row = {"points": int(x.shape[0]), "reference": with_reference, **detection_metrics(result, poisons, len(data)),
               "controls": result.settings.get("controls"), "n_controls": result.settings.get("n_controls"),
               "controls_set_aside": result.settings.get("controls_set_aside"),
               "seconds": time.perf_counter() - t1}
        if not detect_only:
            row["sweep"] = replayed_settings(result, poisons)
        if poison is not None and not detect_only:  # exact unlearning, every protocol (since 2026-12-05)
            kept = data.without(torch.tensor(sorted(flagged), dtype=torch.long)) if flagged else data
            after = fit(arch, kept, seed, to_model)
            row["after"] = {
                "accuracy": hit_rate(after, x_test, test.labels),
                "poison_success": hit_rate(after, x_trig, poison.target_class)}
        cell["protocols"][name] = row
    cell["seconds"] = time.perf_counter() - t0
    return cell


def misclassified(cell: dict, predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The test inputs a poison-free model gets wrong (positions), what it is traced from; their count goes into
    ``cell`` as ``n_misclassified`` and ``took`` (a model without a test error has nothing to trace)."""
    wrong = (predicted != labels).nonzero().flatten()
    cell["n_misclassified"] = int(wrong.numel())
    cell["took"] = wrong.numel() > 0
    return wrong


def traced_protocols(victim: nn.Module, x: torch.Tensor, y: torch.Tensor, affected: torch.Tensor, target: int,
                     reference: tuple[torch.Tensor, torch.Tensor]):
    """For a study whose victim takes its training images ``x`` as they are: fit ``deltainf.EKFAC(victim)`` with its
    defaults, then yield (protocol name, affected points, DetectionResult) for each of :data:`PROTOCOLS`, the points
    the first ones of ``affected`` (triggered inputs the victim sends to ``target``), held-out controls from
    ``reference`` where the protocol has them."""
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untracked-module note (BatchNorm, LayerNorm, GroupNorm)
        ekfac = deltainf.EKFAC(victim, progress=False).fit(loader)
    for name, count, with_reference in PROTOCOLS:
        points = affected[:count]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = deltainf.DeltaInfluence(ekfac).detect(loader, points, torch.full((points.shape[0],), target),
                                                           reference=reference if with_reference else None)
        yield name, points, result


def detection_metrics(result, poisons: set, n_train: int) -> dict:
    """What a detection found against the known ``poisons`` (dataset positions) among ``n_train`` examples, and
    the (split, examined) labels of labels_in_modes where the controls came from the training set: whether the
    screens ran, replayable without the victim; and how many of the group's members it was traced again from."""
    flagged = set(result.flagged.tolist())
    return {"found": result.found, "flagged": len(flagged), "true_positives": len(flagged & poisons),
            "recall": len(flagged & poisons) / len(poisons) if poisons else None,
            "fpr": len(flagged - poisons) / (n_train - len(poisons)), "fdr_estimate": result.fdr_estimate,
            "fdr_actual": len(flagged - poisons) / len(flagged) if flagged else None,
            "labels_split": result.settings.get("labels_split"),
            "retraced": len(result.settings.get("retraced") or [])}


def _fmt(v, pct=False, digits=3):
    if v is None:
        return "—"
    return f"{100 * v:.1f} %" if pct else f"{v:.{digits}f}"


TRIGGER_ATTACKS = ("badnet", "blended", "wanet", "frequency")  # the "trigger backdoor" cells of the bar
_ORDER = {a: i for i, a in enumerate(ATTACKS)}


def _sorted(cells):
    return sorted(cells, key=lambda c: (_ORDER[c["attack"]], c["arch"], c["seed"]))


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def detection_table(cells: list[dict]) -> str:
    """Mean recall and FPR over the seeds (worst FPR) per attack x architecture, for every protocol."""
    head = "| attack | architecture | seeds |" + "".join(f" {name} |" for name, *_ in PROTOCOLS)
    lines = [head, "|---|---|---|" + "---|" * len(PROTOCOLS)]
    groups: dict = {}
    for c in _sorted(cells):
        groups.setdefault((c["attack"], c["arch"]), []).append(c)
    for (attack, arch), cs in groups.items():
        took = [c for c in cs if c.get("took", True)]
        if not took:
            psr = ", ".join(_fmt(c["victim"]["poison_success"], True) for c in cs)
            lines.append(f"| {attack} | {arch} | {len(cs)} | the attack did not take (poison success {psr}) |"
                         + " |" * (len(PROTOCOLS) - 1))
            continue
        row = f"| {attack} | {arch} | {len(took)} |"
        for name, *_ in PROTOCOLS:
            rs = [c["protocols"][name] for c in took if name in c.get("protocols", {})]
            if not rs:
                row += " — |"
                continue
            found = sum(r["found"] for r in rs)
            if attack == "none":
                row += f" no poison in {len(rs) - found} of {len(rs)} (FPR {_fmt(max(r['fpr'] for r in rs), True)} worst) |"
            else:
                row += (f" {_fmt(_mean(r['recall'] for r in rs), digits=2)} / {_fmt(_mean(r['fpr'] for r in rs), True)} "
                        f"({_fmt(max(r['fpr'] for r in rs), True)}) |")
        lines.append(row)
    return "\n".join(lines)


def retrained_to_goal(cell: dict, run: dict) -> tuple[bool, bool]:
    """Whether retraining without ``run``'s flagged set brought poison success within 2 points of the poison-free
    model and kept clean accuracy within 1 point of it (False, False where no retraining was measured)."""
    if "after" not in run:
        return False, False
    clean, after = cell["clean_model"], run["after"]
    return (after["poison_success"] <= clean["poison_success"] + 0.02 + 1e-9,
            after["accuracy"] >= clean["accuracy"] - 0.01 - 1e-9)


def goals_table(cells: list[dict], retrained: bool = True) -> str:
    """Runs per seed against the issue's minimum and goal, per protocol: the trigger backdoors that took (in all, per
    attack and per architecture), the poison-free models' answers, the clean examples flagged and (``retrained``)
    the retraining."""
    names = [name for name, *_ in PROTOCOLS]
    trig = [c for c in _sorted(cells) if c["attack"] in TRIGGER_ATTACKS and c.get("took", True)]
    free = [c for c in cells if c["attack"] == "none" and c.get("protocols")]
    traced = [c for c in cells if c["attack"] != "none" and c.get("took", True) and c.get("protocols")]

    def count(rows, test) -> list:
        return [sum(test(c, c["protocols"][n]) for c in rows) for n in names]

    def minimum(group) -> list:
        return list(at_minimum(group, names).values())

    rows = [(f"trigger backdoors at the minimum (of {len(trig)})", minimum(trig)),
            ("at the goal (recall ≥ 0.99, FPR ≤ 2 %)", count(trig, lambda c, r: meets_goal(r["recall"], r["fpr"])))]
    for key in ("attack", "arch"):
        for value in dict.fromkeys(c[key] for c in trig):
            group = [c for c in trig if c[key] == value]
            rows.append((f"{value} (of {len(group)})", minimum(group)))
    rows += [(f"poison-free models: \"no poison\" (of {len(free)} traced)", count(free, lambda c, r: not r["found"])),
             ("worst FPR, any attack that took",
              [percent(max(c["protocols"][n]["fpr"] for c in traced)) for n in names]),
             ("clean examples flagged, trigger backdoors",
              count(trig, lambda c, r: r["flagged"] - r["true_positives"]))]
    if retrained:
        rows += [("retrained: poison success within 2 points of the poison-free model",
                  count(trig, lambda c, r: retrained_to_goal(c, r)[0])),
                 ("retrained: clean accuracy within 1 point of it",
                  count(trig, lambda c, r: retrained_to_goal(c, r)[1])),
                 ("every goal at once", count(trig, lambda c, r: meets_goal(r["recall"], r["fpr"]) and
                                              all(retrained_to_goal(c, r))))]
    lines = ["| runs (seeds) |" + "".join(f" {n} |" for n in names), "|---|" + "---|" * len(names)]
    return "\n".join(lines + [f"| {label} |" + "".join(f" {v} |" for v in values) for label, values in rows])


def unlearning_table(cells: list[dict]) -> str:
    """Poison success and clean accuracy after retraining without the flagged set, means over the seeds."""
    lines = ["| attack | architecture | protocol | poison success: victim → after retraining (poison-free model) | "
             "clean accuracy: after retraining (poison-free model) |", "|---|---|---|---|---|"]
    groups: dict = {}
    for c in _sorted(cells):
        if c["attack"] != "none" and c.get("took", True):
            groups.setdefault((c["attack"], c["arch"]), []).append(c)
    for (attack, arch), cs in groups.items():
        for name, *_ in PROTOCOLS:
            rs = [(c, c["protocols"][name]) for c in cs if "after" in c["protocols"].get(name, {})]
            if not rs:
                continue
            before = _mean(c["victim"]["poison_success"] for c, _ in rs)
            after = _mean(r["after"]["poison_success"] for _, r in rs)
            clean_psr = _mean(c["clean_model"]["poison_success"] for c, _ in rs)
            acc = _mean(r["after"]["accuracy"] for _, r in rs)
            clean_acc = _mean(c["clean_model"]["accuracy"] for c, _ in rs)
            lines.append(f"| {attack} | {arch} | {name} | {_fmt(before, True)} → {_fmt(after, True)} "
                         f"({_fmt(clean_psr, True)}) | {_fmt(acc, True)} ({_fmt(clean_acc, True)}) |")
    return "\n".join(lines)


def sweep_table(cells: list[dict]) -> str:
    """The decision settings replayed on the zoo's votes, summarised over every cell."""
    lines = ["| protocol | rule | fdr | combine | mean recall | mean FPR | worst FPR | trigger-backdoor cells "
             "with recall ≥ 0.95 and FPR ≤ 5 % | poison-free models answered 'no poison' |",
             "|---|---|---|---|---|---|---|---|---|"]
    took = [c for c in cells if c.get("took", True) and c.get("protocols")]
    n_train = len(load_digits_dataset("train"))  # every cell trains on the digits training split (run_cell)
    shown = ([f"coherence|{f}|pooled" for f in SWEEP_FDR] + ["coherence|0.2|majority", "coherence|0.2|any"]
             + [f"support mixture|{f}|pooled" for f in (0.1, 0.2)]
             + [f"coherence cut only|{f}|pooled" for f in (0.1, 0.2, 0.3)]
             + [f"controls + mirror|{f}|pooled" for f in (0.1, 0.2)] + ["mirror only|0.2|pooled"])
    for name, *_ in PROTOCOLS:  # the default setting (controls, fdr 0.2, pooled) is one of the rows
        replayed = next((c["protocols"][name]["sweep"] for c in took if name in c["protocols"]), {})
        for key in [k for k in shown if k in replayed]:
            gate, fdr, combine = key.split("|")
            recalls, fprs, good, n_trig, quiet, n_clean = [], [], 0, 0, 0, 0
            for c in took:
                r = c["protocols"].get(name)
                if r is None:
                    continue
                tp, fp = r["sweep"][key]
                fpr = fp / (n_train - c.get("n_poisons", 0))
                if c["attack"] == "none":
                    n_clean += 1
                    quiet += (tp + fp) == 0
                    continue
                recall = tp / c["n_poisons"]
                recalls.append(recall)
                fprs.append(fpr)
                if c["attack"] in TRIGGER_ATTACKS:
                    n_trig += 1
                    good += meets_minimum(recall, fpr)
            if not recalls:
                continue
            lines.append(f"| {name} | {RULE_NAMES[gate]} | {fdr} | {combine} | "
                         f"{_fmt(_mean(recalls), digits=2)} | {_fmt(_mean(fprs), True)} | {_fmt(max(fprs), True)} | "
                         f"{good} of {n_trig} | {quiet} of {n_clean} |")
    return "\n".join(lines)


def table(cells: list[dict]) -> str:
    """The markdown table of every cell, one row per (attack, architecture, protocol, seed)."""
    lines = ["| attack | architecture | protocol | seed | recall | FPR | flagged | answer (est. FDR) | poison success "
             "before → after (poison-free model) | clean accuracy after (poison-free model) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in _sorted(cells):
        if not c.get("took", True):
            lines.append(f"| {c['attack']} | {c['arch']} | — | {c['seed']} | the attack did not take: poison success "
                         f"{_fmt(c['victim']['poison_success'], True)} | | | | | |")
            continue
        for name, *_ in PROTOCOLS:
            r = c.get("protocols", {}).get(name)
            if r is None:
                continue
            answer = f"poison set ({_fmt(r['fdr_estimate'], digits=2)})" if r["found"] else "no poison"
            if c["attack"] == "none":
                psr = "—"
            else:
                before = _fmt(c["victim"]["poison_success"], True)
                after = _fmt(r["after"]["poison_success"], True) if "after" in r else "—"
                psr = f"{before} → {after} ({_fmt(c['clean_model']['poison_success'], True)})"
            acc = (f"{_fmt(r['after']['accuracy'], True)} ({_fmt(c['clean_model']['accuracy'], True)})"
                   if "after" in r else f"— ({_fmt(c['clean_model']['accuracy'], True)})")
            lines.append(f"| {c['attack']} | {c['arch']} | {name} | {c['seed']} | {_fmt(r['recall'])} | "
                         f"{_fmt(r['fpr'], True)} | {r['flagged']} | {answer} | {psr} | {acc} |")
    return "\n".join(lines)


def report(cells: list[dict]) -> str:
    env = cells[0].get("environment", {}) if cells else {}
    seconds = sum(c.get("seconds", 0.0) for c in cells)
    runs = [r for c in cells for r in c.get("protocols", {}).values()]
    retrained = any("after" in r for r in runs)  # detect-only cells hold neither retraining nor replays
    return "\n\n".join([
        f"{len(cells)} cells, {seconds / 3600:.1f} h of compute; environment of the first cell: "
        f"{json.dumps({k: env.get(k) for k in ('python', 'torch', 'deltainf', 'git_commit', 'cpu') if k in env})}",
        "### Detection: mean recall / mean FPR (worst FPR) over the seeds\n\n" + detection_table(cells),
        "### Against the goals: runs per seed\n\n" + goals_table(cells, retrained),
        *(["### Exact unlearning: retraining without the flagged set\n\n" + unlearning_table(cells)]
          if retrained else []),
        *(["### The decision settings replayed on the same votes\n\n" + sweep_table(cells)]
          if any("sweep" in r for r in runs) else []),
        "### Every cell\n\n" + table(cells),
    ]) + "\n"


def meets_minimum(recall: float, fpr: float) -> bool:
    """The minimum every traced attack is held to: recall >= 0.95 at FPR <= 5 %."""
    return recall >= 0.95 and fpr <= 0.05


def meets_goal(recall: float, fpr: float) -> bool:
    """The issue's goal for a traced attack: recall >= 0.99 at FPR <= 2 %."""
    return recall >= 0.99 and fpr <= 0.02


def at_minimum(cells: list[dict], protocols) -> dict[str, int]:
    """Per protocol, how many of ``cells`` meet the minimum (:func:`meets_minimum`)."""
    return {n: sum(meets_minimum(c["protocols"][n]["recall"], c["protocols"][n]["fpr"]) for c in cells)
            for n in protocols}


def protocol_entry(p: dict, poisoned: bool) -> str:
    """One protocol's result in a study's table: recall / FPR, or "nothing found"; for a poison-free model "no
    poison", or the claim's size and FPR."""
    if not p["found"]:
        return "nothing found" if poisoned else "no poison"
    return f"{p['recall']:.2f} / {100 * p['fpr']:.1f} %" if poisoned else f"claim: {p['flagged']} ({100 * p['fpr']:.1f} %)"


def cells_table(cells: list[dict], columns: list[str], head) -> str:
    """A study's per-cell markdown table, ``cells`` in the order given: the leading ``columns`` with their values
    ``head(cell)`` (strings), then :func:`protocol_entry` per protocol (one entry for an attack that did not take, or
    a poison-free model without a test error); below it, per protocol, the backdoor runs at the minimum and the
    poison-free runs answering "no poison"."""
    names = [name for name, *_ in PROTOCOLS]
    lines = ["| " + " | ".join(columns + names) + " |", "|" + "---|" * (len(columns) + len(names))]
    for c in cells:
        poisoned = c["attack"] != "none"
        if c["took"]:
            entries = [protocol_entry(c["protocols"][n], poisoned) for n in names]
        else:
            entries = ["did not take" if poisoned else "no test error"]
        lines.append("| " + " | ".join(head(c) + entries) + " |" + " |" * (len(names) - len(entries)))
    backdoors = [c for c in cells if c["took"] and c["attack"] != "none"]
    clean = [c for c in cells if c["took"] and c["attack"] == "none"]
    ok = at_minimum(backdoors, names)
    lines += ["", "Backdoor runs at recall >= 0.95 and FPR <= 5 %: " +
              "; ".join(f"{n}: {ok[n]} of {len(backdoors)}" for n in names) + "."]
    if clean:
        quiet = {n: sum(not c["protocols"][n]["found"] for c in clean) for n in names}
        lines.append("Poison-free models answering \"no poison\": " +
                     "; ".join(f"{n}: {quiet[n]} of {len(clean)}" for n in names) + ".")
    return "\n".join(lines) + "\n"


def percent(share: float) -> str:
    return f"{100 * share:.1f} %"


def study(argv, description: str, defaults: dict, table_of, run_one) -> int:
    """:func:`grid` for a study whose cells need only (attack, architecture, seed): ``run_one(attack, arch, seed)``,
    each finished cell summed up by :func:`brief`."""
    return grid(argv, description, defaults, table_of, lambda attack, arch, seed, args: run_one(attack, arch, seed),
                brief)


def grid(argv, description: str, defaults: dict, table_of, run_one, brief, extra=None) -> int:
    """The command line of a study over attacks x architectures x seeds: each cell's JSON written to --out when it
    finishes (a rerun skips finished cells), or with --table the markdown of the finished cells."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=defaults["out"])
    p.add_argument("--attacks", default=",".join(defaults["attacks"]))
    p.add_argument("--archs", default=",".join(defaults["archs"]))
    p.add_argument("--seeds", default=defaults["seeds"])
    p.add_argument("--table", default=None, help="write the markdown table of the finished cells here and stop")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.table:
        cells = [json.load(open(os.path.join(args.out, f))) for f in sorted(os.listdir(args.out)) if f.endswith(".json")]
        write_text(args.table, table_of(cells))
        return 0
    for seed in (int(s) for s in args.seeds.split(",")):
        for arch in args.archs.split(","):
            for attack in args.attacks.split(","):
                path = os.path.join(args.out, f"{attack}-{arch}-seed{seed}.json")
                if os.path.exists(path):
                    continue
                cell = run_one(attack, arch, seed, args)
                cell["environment"] = environment_info()
                write_json(path, cell, indent=1)
                print(f"{attack} {arch} seed {seed}: {brief(cell)}", flush=True)
    return 0


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--raw", default=None,
                       help="also keep what each protocol's decision needs here (votes, support, coherence curve)")
        p.add_argument("--detect-only", action="store_true",
                       help="detections alone: no decision settings replayed, no retraining")

    return grid(argv, __doc__.splitlines()[0],
                {"out": "benchmarks/results/zoo", "attacks": ATTACKS, "archs": zoo_models.ARCHITECTURES,
                 "seeds": "0,1,2"}, report,
                lambda a, r, s, args: run_cell(a, r, s, args.raw, args.detect_only), brief, extra)


def brief(cell: dict) -> str:
    """One line of a finished cell: (recall, FPR, found) per protocol."""
    summary = {k: (v["recall"], round(v["fpr"], 4), v["found"]) for k, v in cell.get("protocols", {}).items()}
    return f"{summary} ({cell['seconds']:.0f} s)"


if __name__ == "__main__":
    sys.exit(main())
