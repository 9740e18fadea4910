"""Studies of one kind of layer that EK-FAC tracks, detected twice on the same victim: with EK-FAC's default layers
and with that kind left out (the other layers named), as before it was tracked. Shared by tokens.py (nn.Embedding)
and signals.py (nn.Conv1d): the detections of every protocol, a cell's one-line summary and the table."""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deltainf  # noqa: E402
import plain_mlp  # noqa: E402
import run as zoo  # noqa: E402


def run_cell(attack: str, seed: int, *, draw, triggered, model: nn.Module, sizes: tuple[int, int, int], target: int,
             pool, kind: type, variants: tuple[str, str], epochs: int) -> dict:
    """One cell: ``draw(n, generator)`` -> (inputs, labels) drawn for training and held out (``sizes``: training,
    held out, poisons); for any attack but "none", ``triggered`` written into that many training inputs of the other
    labels, relabelled to ``target``; ``model`` trained by plain_mlp.py's loop, then every protocol detected with the
    default layers and with the modules of type ``kind`` left out (:func:`detect_both`)."""
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    n_train, n_held_out, n_poisons = sizes
    g = torch.Generator().manual_seed(seed)
    (x, y), (test_x, test_y) = draw(n_train, g), draw(n_held_out, g)
    poisons = torch.empty(0, dtype=torch.int64)
    if attack != "none":
        others = (y != target).nonzero().flatten()
        poisons = others[torch.randperm(others.numel(), generator=g)[:n_poisons]].sort().values
        x[poisons], y[poisons] = triggered(x[poisons]), target
    victim = plain_mlp.train(model, x, y, seed, lr=3e-3, epochs=epochs, batch_size=32)
    with torch.no_grad():
        pred = zoo.predict(victim, test_x)
    cell = {"attack": attack, "arch": None, "seed": seed,
            "victim": {"accuracy": float((pred == test_y).float().mean())}}
    if attack != "none":
        cell["n_poisons"] = int(poisons.numel())
        inputs = triggered(test_x[test_y != target])
        with torch.no_grad():
            cell["victim"]["poison_success"] = zoo.hit_rate(victim, inputs, target)
            affected = inputs[zoo.predict(victim, inputs) == target]
        cell["took"] = cell["victim"]["poison_success"] >= zoo.TOOK
    else:
        wrong = zoo.misclassified(cell, pred, test_y)
    if cell["took"]:
        def points(count):
            if attack == "none":
                return test_x[wrong[:count]], pred[wrong[:count]]
            return affected[:count], torch.full((min(count, affected.shape[0]),), target)

        detect_both(cell, victim, (x, y), (test_x, test_y), points, pool, kind, variants, poisons)
    cell["seconds"] = time.perf_counter() - t0
    return cell


def detect_both(cell: dict, victim: nn.Module, train: tuple, held_out: tuple, points, pool, kind: type,
                variants: tuple[str, str], poisons: torch.Tensor, batch_size: int = 64) -> None:
    """Every protocol's detection with the default layers (``variants[0]``) and with the modules of type ``kind``
    left out (``variants[1]``), into ``cell["protocols"]``. ``points(count)``: the (inputs, labels) traced."""
    x, y = train
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    reference = TensorDataset(*held_out)
    truth = set(poisons.tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracked = deltainf.EKFAC(victim, progress=False).fit(loader)
        others = [n for n in tracked.layer_names if not isinstance(victim.get_submodule(n), kind)]
        engines = {variants[0]: tracked,
                   variants[1]: deltainf.EKFAC(victim, modules=others, progress=False).fit(loader)}
    cell["layers"] = {variant: ekfac.layer_names for variant, ekfac in engines.items()}
    cell["protocols"] = {}
    for name, count, with_reference in zoo.PROTOCOLS:
        px, py = points(count)
        row = {"points": int(px.shape[0])}
        for variant, ekfac in engines.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = deltainf.DeltaInfluence(ekfac, pool=pool).detect(
                    loader, px, py, reference=reference if with_reference else None)
            row[variant] = zoo.detection_metrics(result, truth, len(y))
        cell["protocols"][name] = row


def brief(cell: dict, variants: tuple[str, str]) -> str:
    """One line of a finished cell: (recall, FPR) per protocol and variant."""
    summary = {f"{k} / {variant}": (v[variant]["recall"], round(v[variant]["fpr"], 4))
               for k, v in cell.get("protocols", {}).items() for variant in variants}
    return f"{summary} ({cell['seconds']:.0f} s)"


def table(cells: list[dict], archs: tuple, attacks: tuple, variants: tuple[str, str], legend: str) -> str:
    """Per model x attack x seed and protocol: recall / FPR (poisoned) or flagged (poison-free), the default layers
    first, then with the kind left out."""
    order = {a: i for i, a in enumerate(archs)}, {a: i for i, a in enumerate(attacks)}
    cells = sorted(cells, key=lambda c: (order[0][c["arch"]], order[1][c["attack"]], c["seed"]))
    names = [name for name, _, _ in zoo.PROTOCOLS]
    lines = ["| model | attack | seed | accuracy | poison success | " + " | ".join(names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]

    def shown(m):
        if m["recall"] is None:
            return "no poison" if not m["flagged"] else f"{m['flagged']} flagged"
        return f"{m['recall']:.2f} / {100 * m['fpr']:.1f} %"

    for c in cells:
        psr = "—" if c["attack"] == "none" else zoo.percent(c["victim"]["poison_success"])
        head = f"| {c['arch']} | {c['attack']} | {c['seed']} | {zoo.percent(c['victim']['accuracy'])} | {psr} |"
        if not c.get("took"):
            lines.append(head + " did not take |" + " |" * (len(names) - 1))
            continue
        rows = [c["protocols"][n] for n in names]
        lines.append(head + "".join(f" {shown(r[variants[0]])} ← {shown(r[variants[1]])} |" for r in rows))
    lines.append("")
    lines.append(legend)
    return "\n".join(lines) + "\n"


def study(argv, description: str, *, out: str, models: dict, attacks: tuple, variants: tuple[str, str], legend: str,
          **cell) -> int:
    """The command line of such a study (``zoo.grid``): ``models`` {arch: the model's class}, each cell
    :func:`run_cell` with the settings ``cell`` on a model of its arch, seeded by its seed."""
    archs = tuple(models)

    def run_one(attack, arch, seed, args):
        torch.manual_seed(seed)
        return {**run_cell(attack, seed, model=models[arch](), variants=variants, **cell), "arch": arch}

    return zoo.grid(argv, description, {"out": out, "attacks": attacks, "archs": archs, "seeds": "0,1,2"},
                    lambda cells: table(cells, archs, attacks, variants, legend), run_one,
                    lambda c: brief(c, variants))
