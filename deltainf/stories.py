"""The stories behind the CLI: one function per command (demo, detect, bench; evaluate in
:mod:`deltainf.evaluate`). Each takes plain arguments, does the whole job with progress output, writes
its files and returns a JSON-friendly dict. The CLI (:mod:`deltainf.cli`) only parses arguments and
calls one of these.

Data flows one way: data -> training -> attack -> influence (EK-FAC fit) -> Δ-Influence -> unlearning
-> metrics and report.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from deltainf.data import make_loader, parse_dataset_spec
from deltainf.train import TrainConfig, evaluate, load_model, predict, save_checkpoint, train_model

__all__ = ["demo", "detect", "bench", "ATTACKS"]

ATTACKS = ("badnet", "frequency")
FISHER = "empirical"  # the stories' EK-FAC Fisher; see DEFAULT_TOLERANCE_FRACTION's notes in delta.py
_SCORE_BATCH = 256


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def _given(**settings) -> dict[str, Any]:
    """The settings the caller gave (not None); the others keep the library defaults."""
    return {k: v for k, v in settings.items() if v is not None}


def _recipe(train, seed: int, progress: bool) -> TrainConfig:
    """The training recipe for a dataset: the small CNN recipe for small images, the paper's ResNet-18
    recipe (reference/paper.md §2.2) for CIFAR-sized and larger ones."""
    if train.image_shape[-1] <= 16:
        return TrainConfig.digits(seed=seed, progress=progress)
    return TrainConfig.paper_resnet18(seed=seed, progress=progress)


def _run_attack(name: str, train, test, clean_model, seed: int, progress: bool):
    from deltainf.attacks import DIGITS_BADNET, DIGITS_FREQUENCY, badnet_attack, frequency_attack

    if name == "badnet":
        # The paper's CIFAR-10 setting is ship (8) -> dog (5) with 1% poisons; digits use 5%.
        settings = DIGITS_BADNET if train.image_shape[-1] <= 16 else {"target_class": 5, "source_classes": 8,
                                                                       "fraction": 0.01}
        return badnet_attack(train, test, seed=seed, **settings)
    if name == "frequency":
        settings = DIGITS_FREQUENCY if train.image_shape[-1] <= 16 else {"target_class": 5, "fraction": 0.01}
        return frequency_attack(train, test, clean_model, seed=seed, progress=progress, **settings)
    raise ValueError(f"attack must be one of {list(ATTACKS)}, got {name!r}")


def demo(attack: str = "badnet", dataset: str = "digits", out: str | os.PathLike = "out/demo", seed: int = 0,
         points: int | None = None, n_transforms: int | None = None, threshold: float | str | None = None,
         tolerance: int | None = None, combine: str | int | None = None, progress: bool = True,
         quiet: bool = False) -> dict[str, Any]:
    """The whole story on one dataset: poison it, train a victim, find the poisons with Δ-Influence,
    retrain without them, and compare with a model trained on the clean data.

    Writes ``report.json``, ``report.png`` and the victim / unlearned checkpoints into ``out``; returns
    the report's figures. ``points``: how many affected test points to trace (the first triggered test
    inputs the victim sends to the target; None = DEFAULT_N_POINTS). ``n_transforms``, ``threshold``,
    ``tolerance``, ``combine``: Δ-Influence settings (None = the library defaults)."""
    from deltainf.delta import DEFAULT_N_POINTS, DeltaInfluence, pick_affected_points
    from deltainf.influence import EKFAC
    from deltainf.metrics import detection_metrics
    from deltainf.report import environment_info, format_table, write_report

    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {list(ATTACKS)}, got {attack!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    train, test = parse_dataset_spec(dataset, seed=seed, progress=progress)
    config = _recipe(train, seed, progress)
    _log(f"[1/6] data: {dataset} ({len(train)} train / {len(test)} test, images {tuple(train.image_shape)}); "
         f"training a reference model on the clean data", quiet)
    clean_model = train_model(train, config)
    stage("clean_training", t0)

    t0 = time.perf_counter()
    poison = _run_attack(attack, train, test, clean_model, seed, progress)
    _log(f"[2/6] attack {attack}: {poison.num_poisons} poisons, target class {poison.target_class}; "
         f"training the victim", quiet)
    victim = train_model(poison.train, config)
    save_checkpoint(victim, out / "victim.safetensors", meta={"dataset": dataset, "attack": attack, "seed": seed})
    stage("attack_and_victim_training", t0)

    before = {"clean_accuracy": evaluate(victim, test), "poison_success": poison.poison_success(victim)}
    affected = pick_affected_points(victim, poison.triggered_test, poison.target_class,
                                    count=DEFAULT_N_POINTS if points is None else points)
    _log(f"[3/6] victim: clean accuracy {before['clean_accuracy']:.4f}, poison success "
         f"{before['poison_success']:.4f}; affected test points = triggered test inputs {affected.indices}", quiet)

    t0 = time.perf_counter()
    loader = make_loader(poison.train, batch_size=_SCORE_BATCH, shuffle=False)
    # Empirical Fisher: measured clearly better for Δ-Influence than the true Fisher at damping 1e-8
    # (see the tolerance notes in deltainf/delta.py).
    ekfac = EKFAC(victim, fisher=FISHER, progress=progress, seed=seed).fit(loader)
    stage("ekfac_fit", t0)
    _log("[4/6] EK-FAC factors fitted; running Δ-Influence", quiet)

    t0 = time.perf_counter()
    detector = DeltaInfluence(ekfac, seed=seed, progress=progress, **_given(
        n_transforms=n_transforms, threshold=threshold, tolerance=tolerance, combine=combine))
    detection = detector.detect(loader, affected.x, poison.target_class)
    stage("delta_influence", t0)
    found = detection_metrics(detection.flagged, poison.poison_indices, len(poison.train))
    _log(f"[5/6] flagged {found['flagged']} examples: {found['tp']} of {found['n_poisons']} poisons "
         f"(recall {found['recall']:.4f}, FPR {found['fpr']:.4f}); retraining without them", quiet)

    t0 = time.perf_counter()
    unlearned = train_model(poison.train, config, exclude=detection.flagged)
    save_checkpoint(unlearned, out / "unlearned.safetensors",
                    meta={"dataset": dataset, "attack": attack, "seed": seed, "removed": len(detection.flagged)})
    stage("exact_unlearning", t0)
    after = {"clean_accuracy": evaluate(unlearned, test), "poison_success": poison.poison_success(unlearned)}
    clean_ref = {"clean_accuracy": evaluate(clean_model, test), "poison_success": poison.poison_success(clean_model)}
    timings["total"] = round(time.perf_counter() - t_start, 3)

    results = {
        "dataset": dataset,
        "attack": attack,
        "seed": seed,
        "n_train": len(poison.train),
        "n_poisons": poison.num_poisons,
        "target_class": poison.target_class,
        "affected_test_indices": affected.indices,
        "detection": found,
        "before": before,
        "after_exact_unlearning": after,
        "clean_model": clean_ref,
        "timings_s": timings,
        "delta_timings_s": detection.timings,
        "attack_params": poison.params,
        "train_config": config.to_dict(),
        "ekfac": {"layers": ekfac.layer_names, "damping": ekfac.config.damping, "fisher": ekfac.config.fisher,
                  "timings_s": dict(ekfac.timings)},
        "environment": environment_info(),
    }
    write_report(out, results, detection, poison_indices=poison.poison_indices, affected_x=affected.x,
                 train_images=poison.train, title=f"Δ-Influence on {dataset} / {attack} (seed {seed})",
                 settings=detector.settings())
    rows = [
        {"model": "victim (poisoned)", **before},
        {"model": "after Δ-Influence + retrain", **after},
        {"model": "trained on clean data", **clean_ref},
    ]
    _log("[6/6] done\n" + format_table(rows, keys=["model", "clean_accuracy", "poison_success"]), quiet)
    _log(format_table({k: found[k] for k in ("flagged", "tp", "fp", "precision", "recall", "fpr")},
                      title="detection"), quiet)
    _log(f"total {timings['total']:.1f} s; report: {out / 'report.json'}, {out / 'report.png'}", quiet)
    return results


def _load_affected(path: str | None, test_index, test) -> torch.Tensor:
    """The affected input(s): a tensor file (.pt/.safetensors holding (C,H,W) or (P,C,H,W)) or index(es) into
    the test split."""
    if (path is None) == (test_index is None):
        raise ValueError("give exactly one of --affected FILE or --test-index I")
    if path is not None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--affected: no such file: {path!r}")
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(path)
            if len(tensors) != 1:
                raise ValueError(f"--affected: {path!r} must hold exactly one tensor, found {sorted(tensors)}")
            x = next(iter(tensors.values()))
        else:
            x = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4):
            raise ValueError(f"--affected: {path!r} must hold a (C,H,W) or (P,C,H,W) tensor")
        return x.float()
    indices = [test_index] if isinstance(test_index, int) else list(test_index)
    bad = [i for i in indices if not 0 <= i < len(test)]
    if not indices or bad:
        raise ValueError(f"--test-index must be in [0, {len(test)}), got {bad or indices}")
    return torch.stack([test[i][0] for i in indices]) if len(indices) > 1 else test[indices[0]][0]


def detect(checkpoint: str, dataset: str, out: str | os.PathLike = "out/detect", affected: str | None = None,
           test_index: int | None = None, label: int | None = None, factors: str | None = None, seed: int = 0,
           n_transforms: int | None = None, threshold: float | str | None = None, tolerance: int | None = None,
           combine: str | int | None = None, progress: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Run Δ-Influence on a user's own model: a checkpoint written by :func:`deltainf.train.save_checkpoint`,
    its training data (a dataset spec; the train split is scored) and the affected input(s).

    ``label``: the adversarial label the model predicts for the affected input (default: its prediction).
    ``factors``: a saved EK-FAC fit to reuse (fitted and saved to ``out/ekfac.safetensors`` when absent).
    Writes ``flagged.json`` (training indices) and the report into ``out``."""
    from deltainf.delta import DeltaInfluence
    from deltainf.influence import EKFAC
    from deltainf.report import write_report

    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"--checkpoint: no such file: {checkpoint!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_model(checkpoint)
    train, test = parse_dataset_spec(dataset, seed=seed, progress=progress)
    x = _load_affected(affected, test_index, test)
    x4 = x.unsqueeze(0) if x.ndim == 3 else x
    predicted = predict(model, x4)
    y_adv = predicted if label is None else torch.full((x4.shape[0],), int(label), dtype=torch.int64)
    _log(f"model {checkpoint} ({meta.get('dataset', '?')}); {x4.shape[0]} affected input(s) predicted as "
         f"{predicted.tolist()}; tracing label(s) {y_adv.tolist()} over {len(train)} training examples", quiet)
    loader = make_loader(train, batch_size=_SCORE_BATCH, shuffle=False)
    if factors is not None:
        ekfac = EKFAC.load(factors, model)
    else:
        ekfac = EKFAC(model, fisher=FISHER, progress=progress, seed=seed).fit(loader)
        ekfac.save(out / "ekfac.safetensors")
    detector = DeltaInfluence(ekfac, seed=seed, progress=progress, **_given(
        n_transforms=n_transforms, threshold=threshold, tolerance=tolerance, combine=combine))
    detection = detector.detect(loader, x4, y_adv)
    flagged = detection.flagged.tolist()
    with open(out / "flagged.json", "w") as f:
        json.dump({"checkpoint": checkpoint, "dataset": dataset, "flagged": flagged}, f)
    results = {"checkpoint": checkpoint, "dataset": dataset, "n_train": len(train), "n_flagged": len(flagged),
               "affected_labels": y_adv.tolist(), "timings_s": detection.timings}
    write_report(out, results, detection, affected_x=x4, train_images=train,
                 title=f"Δ-Influence on {checkpoint}", settings=detector.settings())
    _log(f"flagged {len(flagged)} of {len(train)} training examples -> {out / 'flagged.json'}", quiet)
    return results


def bench(device: str = "cpu", quick: bool = False, out: str | os.PathLike | None = None,
          quiet: bool = False) -> dict[str, Any]:
    """Kernel benchmarks on this machine (see :mod:`deltainf.bench`): ours vs the plain-PyTorch reference
    vs torch's GEMM / memory-copy throughput, printed as a table; JSON written to ``out`` if given."""
    from deltainf import bench as kernel_bench

    if device not in ("cpu", "cuda", "all"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'all', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no GPU is visible to torch")
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}[device]
    rows: list[dict[str, Any]] = []
    for dev in devices:
        rows += kernel_bench.run_all(device=dev, quick=quick)
    result = {"machine": kernel_bench.machine_info(devices[-1]), "rows": rows}
    _log(kernel_bench.format_table(rows), quiet)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result
