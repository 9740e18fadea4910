"""The stories behind the CLI: one function per command (demo, detect, bench; evaluate in
:mod:`deltainf.evaluate`). Each takes plain arguments, does the whole job with progress bars and messages on
the ``deltainf`` logger, writes its files (atomically, the folder marked complete in ``run.json`` only at
the end) and returns a JSON-friendly dict. The CLI (:mod:`deltainf.cli`) only parses arguments and
calls one of these.

Data flows one way: data -> training -> attack -> influence (EK-FAC fit) -> Δ-Influence -> unlearning
-> metrics and report.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltainf import _dist, recipes
from deltainf._files import RUN_FILE, output_folder, run_folder, tensor_digest, write_json
from deltainf._util import first_line, log, logits
from deltainf.data import make_loader, parse_dataset_spec
from deltainf.train import MAX_IMAGE_SIDE, accuracy, model_from_build_args, predict, save_checkpoint, train_model

__all__ = ["demo", "detect", "bench", "ATTACKS"]

# The trigger backdoors (a demo traces triggered test inputs; a targeted attack has a single target: evaluate)
ATTACKS = tuple(name for name, r in recipes.ATTACKS.items() if not r.targeted)
_SCORE_BATCH = 256


def _given(**settings) -> dict[str, Any]:
    """The settings the caller gave (not None); the others keep the library defaults."""
    return {k: v for k, v in settings.items() if v is not None}


def demo(attack: str = "badnet", dataset: str = "digits", out: str | os.PathLike = "out/demo", seed: int = 0,
         points: int | None = None, n_transforms: int | None = None, threshold: float | str | None = None,
         tolerance: int | None = None, fdr: float | None = None, combine: str | int | None = None,
         candidates: str | None = None, boundary: str | None = None, retrace: int | None = None,
         progress: bool = True, image_size: int | None = None) -> dict[str, Any]:
    """The whole story on one dataset: poison it, train a victim, find the poisons with Δ-Influence,
    retrain without them, and compare with a model trained on the clean data.

    Writes ``report.json``, ``report.png`` and the victim / unlearned checkpoints into ``out``; returns
    the report's figures. ``points``: how many affected test points to trace (the first triggered test
    inputs the victim sends to the target; None = DEFAULT_N_POINTS). ``n_transforms``, ``threshold``,
    ``tolerance``, ``fdr``, ``combine``, ``candidates``, ``boundary``, ``retrace``: Δ-Influence settings (None = the
    library defaults)."""
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {list(ATTACKS)}, got {attack!r}")
    from deltainf.delta import DEFAULT_N_POINTS
    from deltainf.influence._partitions import folder_lock, remove_partition_files

    out = output_folder(out, files=(RUN_FILE, *_RESULT_FILES, "ekfac.safetensors"))
    _check_image_size(image_size)
    settings = _given(n_transforms=n_transforms, threshold=threshold, tolerance=tolerance, fdr=fdr, combine=combine,
                      candidates=candidates, boundary=boundary, retrace=retrace)
    _check_detector_settings(settings, DEFAULT_N_POINTS if points is None else points)  # before any training
    with folder_lock(out, 0, 1, name="--out"):  # one run at a time in --out (both would write its files)
        _replace_run(out, "demo")
        # the demo starts afresh: an earlier run's files (a demo's or a detect's) beside this one's would mix two
        # runs if it is stopped
        _remove_results(out, "ekfac.safetensors")
        remove_partition_files(out / "passes")  # a detect run's unfinished passes
        with run_folder(out, "demo", attack=attack, dataset=dataset, seed=seed, points=points, image_size=image_size):
            results = _demo_story(attack, dataset, out, seed, points, progress, settings, image_size)
    return results


# what demo and detect write into --out (detect's saved fit and passes aside, which a rerun of it resumes from)
_RESULT_FILES = ("victim.safetensors", "unlearned.safetensors", "flagged.json", "report.json", "report.png")


def _remove_results(out: Path, *more: str, keep: tuple = ()) -> None:
    """Remove an earlier run's result files from ``out``, and the files ``more``, except the files ``keep`` names
    (paths or None): a run's own input, e.g. ``detect --checkpoint out/demo/victim.safetensors --out out/demo``."""
    kept = [Path(p) for p in keep if p is not None and Path(p).is_file()]
    for name in (*_RESULT_FILES, *more):
        path = out / name
        if path.is_file() and not any(path.samefile(k) for k in kept):
            path.unlink()


def _demo_story(attack: str, dataset: str, out: Path, seed: int, points: int | None, progress: bool,
                delta_settings: dict[str, Any], image_size: int | None = None) -> dict[str, Any]:
    """The demo's steps, writing into ``out`` (marked running by the caller)."""
    from deltainf.delta import DEFAULT_N_POINTS, DeltaInfluence, pick_affected_points
    from deltainf.influence import EKFAC
    from deltainf.metrics import detection_metrics
    from deltainf.report import environment_info, format_table, write_report

    clock = _Stages()
    train, test, config, clean_model, poison, victim = _poisoned_story(attack, dataset, seed, progress, out, clock,
                                                                       image_size)

    before = {"clean_accuracy": accuracy(victim, test), "poison_success": poison.poison_success(victim)}
    try:
        affected = pick_affected_points(victim, poison.triggered_test, poison.target_class,
                                        count=DEFAULT_N_POINTS if points is None else points)
    except ValueError as err:  # nothing to trace: the victim did not learn the backdoor
        raise ValueError(f"--attack {attack}: it did not take on --dataset {dataset} (poison success "
                         f"{before['poison_success']:.4f}: {first_line(err)})") from err
    log.info(f"[3/6] victim: clean accuracy {before['clean_accuracy']:.4f}, poison success "
             f"{before['poison_success']:.4f}; affected test points = triggered test inputs {affected.indices}")
    if points is not None and len(affected.indices) < points:
        log.warning(f"--points {points}: the victim sends {len(affected.indices)} triggered test input(s) to the "
                    "target; tracing those")
    combine = delta_settings.get("combine")
    if isinstance(combine, int) and combine > len(affected.indices):  # --points was checked, not what was found
        raise ValueError(f"--combine: {combine} is more than the {len(affected.indices)} triggered test input(s) the "
                         f"victim sends to the target")

    with clock("ekfac_fit"):
        loader = make_loader(poison.train, batch_size=_SCORE_BATCH, shuffle=False)
        ekfac = EKFAC(victim, progress=progress, seed=seed).fit(loader)
    log.info("[4/6] EK-FAC factors fitted; running Δ-Influence")
    with clock("delta_influence"):
        detector = DeltaInfluence(ekfac, seed=seed, progress=progress, **delta_settings)
        detection = detector.detect(loader, affected.x, poison.target_class, reference=test)
    found = detection_metrics(detection.flagged, poison.poison_indices, len(poison.train))
    log.info(f"[5/6] {detection.verdict}: {found['tp']} of {found['n_poisons']} poisons (recall {found['recall']:.4f}, "
             f"FPR {found['fpr']:.4f}); retraining without them")

    with clock("exact_unlearning"):
        unlearned = train_model(poison.train, config, exclude=detection.flagged)
        save_checkpoint(unlearned, out / "unlearned.safetensors",
                        meta={"dataset": dataset, "attack": attack, "seed": seed, "removed": len(detection.flagged)})
    after = {"clean_accuracy": accuracy(unlearned, test), "poison_success": poison.poison_success(unlearned)}
    clean_ref = {"clean_accuracy": accuracy(clean_model, test), "poison_success": poison.poison_success(clean_model)}
    clock.timings["total"] = clock.total()

    results = {
        "dataset": dataset, "attack": attack, "seed": seed, "n_train": len(poison.train),
        "n_poisons": poison.num_poisons, "target_class": poison.target_class,
        "affected_test_indices": affected.indices, "detection": found, "verdict": detection.verdict,
        "before": before, "after_exact_unlearning": after, "clean_model": clean_ref,
        "timings_s": clock.timings, "delta_timings_s": detection.timings, "attack_params": poison.params,
        "train_config": config.to_dict(),
        "ekfac": {"layers": ekfac.layer_names, "damping": ekfac.config.damping, "fisher": ekfac.config.fisher,
                  "timings_s": dict(ekfac.timings)},
        "environment": environment_info(),
    }
    write_report(out, results, detection, poison_indices=poison.poison_indices, affected_x=affected.x,
                 train_images=poison.train, title=f"Δ-Influence on {dataset} / {attack} (seed {seed})",
                 settings=detection.settings)  # as used: the pixel map, the class count, the controls resolved
    rows = [{"model": "victim (poisoned)", **before}, {"model": "after Δ-Influence + retrain", **after},
            {"model": "trained on clean data", **clean_ref}]
    log.info("[6/6] done\n" + format_table(rows, keys=["model", "clean_accuracy", "poison_success"]))
    log.info(format_table({k: found[k] for k in ("flagged", "tp", "fp", "precision", "recall", "fpr")},
                          title="detection"))
    log.info(f"total {clock.timings['total']:.1f} s; report: {out / 'report.json'}, {out / 'report.png'}")
    return results


class _Stages:
    """Wall seconds per stage of a story: ``with clock("name"): ...``."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 3)


def _poisoned_story(attack: str, dataset: str, seed: int, progress: bool, out: Path, clock: _Stages,
                    image_size: int | None = None):
    """The data, the recipe, a model trained on the clean data, the poisoned data and the victim (saved)."""
    with clock("clean_training"):
        try:
            train, test = parse_dataset_spec(dataset, seed=seed, size=image_size, progress=progress)
        except (FileNotFoundError, ValueError) as err:
            raise _flag_error("--dataset", err) from err
        try:
            recipes.check_attack_fits(attack, train)
        except ValueError as err:
            raise _flag_error("--dataset", err) from err
        config = recipes.training_recipe(train, seed, progress)
        log.info(f"[1/6] data: {dataset} ({len(train)} train / {len(test)} test, images "
                 f"{tuple(train.image_shape)}); training a reference model on the clean data")
        clean_model = train_model(train, config)
    with clock("attack_and_victim_training"):
        poison = recipes.run_attack(attack, train, test, clean_model, seed, progress)
        log.info(f"[2/6] attack {attack}: {poison.num_poisons} poisons, target class {poison.target_class}; "
                 "training the victim")
        victim = train_model(poison.train, config)
        save_checkpoint(victim, out / "victim.safetensors", meta={"dataset": dataset, "attack": attack, "seed": seed})
    return train, test, config, clean_model, poison, victim


def _flag_error(flag: str, err: Exception) -> ValueError:
    """A one-line error naming the command-line flag (the library message names no Python parameter)."""
    return ValueError(f"{flag}: {first_line(err)}")


_RANGE_SLACK = 1e-3  # pixels a little outside [0, 1]: round-off of a user's own conversion, not another scale


def _load_affected(path: str | None, test_index, test, image_shape) -> torch.Tensor:
    """The affected input(s) (P, C, H, W): a tensor file (.pt/.safetensors/.npy holding (C,H,W) or (P,C,H,W)) or
    index(es) into the test split (exactly one given, the file there: checked by :func:`detect`)."""
    if path is not None:
        try:
            if str(path).endswith(".npy"):
                x = torch.from_numpy(np.load(path, allow_pickle=False))
            elif str(path).endswith(".safetensors"):
                from safetensors.torch import load_file

                tensors = load_file(path)
                if len(tensors) != 1:
                    raise ValueError(f"must hold exactly one tensor, found {sorted(tensors)}")
                x = next(iter(tensors.values()))
            else:
                with warnings.catch_warnings():  # torch's notes on a foreign pickle: the error below says it
                    warnings.simplefilter("ignore")
                    x = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged or foreign file: pickle, zip, numpy and safetensors errors alike
            raise _flag_error("--affected", ValueError(
                f"cannot read {path!r} as a .pt, .safetensors or .npy tensor file ({type(err).__name__}: "
                f"{first_line(err)[:200]})")) from err
        if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4) or not (x.is_floating_point() or x.dtype == torch.uint8):
            raise ValueError(f"--affected: {path!r} must hold a float (C,H,W) or (P,C,H,W) image tensor")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = x.unsqueeze(0) if x.ndim == 3 else x
        if x.shape[0] == 0:
            raise ValueError(f"--affected: {path!r} holds no image (shape {tuple(x.shape)})")
        if tuple(x.shape[1:]) != tuple(image_shape):
            raise ValueError(f"--affected: the images have shape {tuple(x.shape[1:])} but the --dataset images are "
                             f"{tuple(image_shape)} (read at the model's size and channels, or --image-size): pass "
                             "the affected images at that shape")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"--affected: {path!r} holds NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < -_RANGE_SLACK or high > 1.0 + _RANGE_SLACK:  # the --dataset images are pixels in [0, 1]
            scale = " (0-255 values: divide them by 255, or save them as uint8)" \
                if high > 1.0 + _RANGE_SLACK and low >= -_RANGE_SLACK else ""
            raise ValueError(f"--affected: pixel values from {low:.4g} to {high:.4g}, but the --dataset images are in "
                             f"[0, 1]{scale}; pass the images as they are before any normalisation")
        return x
    indices = [test_index] if isinstance(test_index, int) else list(test_index)
    bad = [i for i in indices if not 0 <= i < len(test)]
    if not indices or bad:
        raise ValueError(f"--test-index must be in [0, {len(test)}), got {bad or indices}")
    return torch.stack([test[i][0] for i in indices])


def _parse_norm(text: str | None):
    """``"m1,m2,m3:s1,s2,s3"`` -> (mean, std) lists, for --input-norm."""
    if text is None:
        return None
    try:
        mean_s, std_s = text.split(":")
        mean = [float(v) for v in mean_s.split(",")]
        std = [float(v) for v in std_s.split(",")]
    except ValueError:
        raise ValueError(f"--input-norm: expected 'MEAN[,MEAN...]:STD[,STD...]' (per channel), got {text!r}") from None
    if len(mean) != len(std) or any(not v > 0 for v in std):
        raise ValueError(f"--input-norm: expected as many means as stds and positive stds, got {text!r}")
    return mean, std


def _user_model(model_spec: str | None, model_kwargs: str | None, checkpoint: str | None, verify: bool = True):
    """(model in eval mode, checkpoint metadata) from --model / --model-kwargs / --checkpoint, checked."""
    from deltainf.models.user import build_from_factory, check_finite, load_exported, load_state_dict_file
    from deltainf.train import check_state

    kwargs = {}
    if model_kwargs is not None:
        try:
            kwargs = json.loads(model_kwargs)
        except ValueError:
            raise ValueError(f"--model-kwargs: expected a JSON object, got {model_kwargs!r}") from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"--model-kwargs: expected a JSON object, got {model_kwargs!r}")
    state, meta = None, {}
    if checkpoint is not None:
        try:
            state, meta = load_state_dict_file(checkpoint, verify=verify)
            check_finite(state)
        except (FileNotFoundError, ValueError) as err:
            raise _flag_error("--checkpoint", err) from err
    exported = model_spec is not None and model_spec.endswith((".pt2", ".ep"))
    if model_spec is None:
        if state is None:
            raise ValueError("--checkpoint: required (the weights), unless --model is a torch.export file")
        args = meta.get("deltainf_build_args")
        if args is None:
            raise ValueError(f"--checkpoint: {checkpoint!r} was not written by deltainf (no build arguments); pass "
                             "--model package.module:factory to build your architecture")
        model = model_from_build_args(args, state, f"--checkpoint: {checkpoint!r}")
    elif exported:
        try:
            model = load_exported(model_spec)
        except (FileNotFoundError, ValueError) as err:
            raise _flag_error("--model", err) from err
        if state is not None:  # the program's own weights are replaced: said, as a run's result depends on it
            log.warning(f"--checkpoint {checkpoint}: its weights replace those inside the exported program "
                        f"{model_spec}")
    else:
        try:
            model = build_from_factory(model_spec, kwargs)
        except ValueError as err:
            hint = " (its arguments go in --model-kwargs as a JSON object)" if "failed (TypeError" in str(err) else ""
            raise _flag_error("--model", ValueError(first_line(err) + hint)) from err
        if state is None:
            raise ValueError("--checkpoint: required with --model package.module:factory (the weights to load)")
    half = {str(p.dtype).removeprefix("torch.") for p in model.parameters()
            if p.dtype in (torch.float16, torch.bfloat16)}
    if half:
        raise ValueError(f"--model: its parameters are {', '.join(sorted(half))}, where EK-FAC on the CPU needs "
                         "float32 or float64: have the factory return the model in float32")
    if state is None:  # the weights are inside the exported program
        check_finite(dict(model.state_dict()), where="--model")
    else:
        if model_spec is not None:  # a checkpoint of deltainf's is checked against its build arguments already
            check_state(model, state, "--checkpoint")
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            model = model.to_empty(device="cpu")  # a factory that builds without memory (device="meta"): the
            # checkpoint fills every tensor it holds; check_state saw it hold every parameter and buffer
        model.load_state_dict(state)
    model.eval()
    return model, meta


def _expected_image(model, meta) -> tuple[int | None, int | None]:
    """(channels, image size) the model was built or exported for, when it says so."""
    from torch import nn

    size = channels = None
    args = meta.get("deltainf_build_args") if isinstance(meta, dict) else None
    if isinstance(args, dict):
        size, channels = args.get("image_size"), args.get("in_channels")
    info = meta.get("deltainf_meta") if isinstance(meta, dict) else None
    if isinstance(info, dict):
        size = info.get("image_size", size)
    shape = getattr(model, "exported_input_shape", None)
    if shape is not None and len(shape) == 4:
        channels = channels or shape[1]
        size = size or (shape[2] if shape[2] == shape[3] else None)
    if channels is None:
        first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
        if isinstance(first, nn.Conv2d) and first.in_channels in (1, 3):
            channels = first.in_channels
    # the data are loaded at this size before anything else could catch a damaged value
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIDE):
        raise ValueError(f"--checkpoint: its recorded image size {size!r} is not an image side in "
                         f"[1, {MAX_IMAGE_SIDE}]")
    return channels, size


@torch.no_grad()
def _check_model_on_data(model, train, test) -> float:
    """Run the model on a batch of the training data and a sample of the test split before any real work:
    it must give one logit per class, and beat chance on the test sample (a wrong image size, channel
    order or normalisation shows up here). Returns the test-sample accuracy."""
    from deltainf._util import named_as, refuse_probabilities

    hint = "check --image-size and the model"
    if getattr(model, "exported_input_shape", None) is not None:
        hint += "; export the program with a dynamic batch dimension, torch.export.Dim"
    with named_as({"model": "--model"}):
        out = logits(model, train.images[:8], where=f"--dataset images ({hint})")
        refuse_probabilities(out, "--dataset images")
    if out.shape[1] != train.num_classes:
        raise ValueError(f"--dataset has {train.num_classes} classes but the model gives {out.shape[1]} logits")
    sample = test.subset(torch.arange(min(len(test), 1000)))
    acc = accuracy(model, sample)
    chance = 1.0 / train.num_classes
    if acc <= 1.5 * chance:
        raise ValueError(f"--dataset: the model classifies only {acc:.1%} of its test images correctly (chance "
                         f"{chance:.1%}): the data does not match the model; check --image-size, --input-norm "
                         "and the class order")
    return acc


def detect(checkpoint: str | None, dataset: str, out: str | os.PathLike = "out/detect", affected: str | None = None,
           test_index=None, label: int | None = None, factors: str | None = None, seed: int = 0,
           model: str | None = None, model_kwargs: str | None = None, image_size: int | None = None,
           input_norm: str | None = None, n_transforms: int | None = None, threshold: float | str | None = None,
           tolerance: int | None = None, fdr: float | None = None, combine: str | int | None = None,
           candidates: str | None = None, boundary: str | None = None, retrace: int | None = None,
           progress: bool = True, verify: bool = True, partition_size: int | None = None) -> dict[str, Any]:
    """Run Δ-Influence on a user's own model and data.

    The model: ``model`` = ``"package.module:factory"`` (weights from ``checkpoint``, a safetensors state
    dict) or a ``torch.export`` file; without ``model``, a checkpoint written by deltainf. The data: a
    dataset spec (its train split is scored), loaded at ``image_size`` (default: the size the model was
    built or exported for); ``input_norm`` = ``"MEAN:STD"`` when the model expects standardised inputs.
    Everything is checked (files, a forward pass on the data, the class count, accuracy above chance)
    before the EK-FAC fit. ``label``: the adversarial label (default: the model's prediction).
    ``factors``: a saved EK-FAC fit to reuse (fitted and saved to ``out/ekfac.safetensors`` otherwise).
    ``verify=False`` skips the content hash check of the checkpoint and the factors (for huge files; the
    other checks stay). Writes ``flagged.json`` (training indices and the verdict) and the report into
    ``out``, marked complete in ``out/run.json`` once everything is written. A rerun of an interrupted run
    (same ``out`` and inputs) resumes it: the saved fit is reused and the passes continue from the
    partitions stored in ``out/passes``. Under ``torchrun`` every rank computes its share of the passes
    and rank 0 writes the results; ``partition_size`` sets the partitions (see :class:`deltainf.EKFAC`)."""
    from deltainf.delta import DeltaInfluence
    from deltainf.influence._partitions import DEFAULT_PARTITION_SIZE, folder_lock, remove_partition_files
    from deltainf.influence import EKFAC
    from deltainf.report import write_report

    out = output_folder(out, files=(RUN_FILE, "flagged.json", "report.json", "report.png", "ekfac.safetensors"))
    if (affected is None) == (test_index is None):
        raise ValueError("give exactly one of --affected FILE or --test-index I")
    if affected is not None and not os.path.isfile(affected):
        raise ValueError(f"--affected: {'a folder' if os.path.isdir(affected) else 'no such file'}: {affected!r} "
                         "(expected a .pt, .safetensors or .npy file holding a (C,H,W) or (P,C,H,W) image tensor)")
    net, train, test, accuracy = _model_and_data(model, model_kwargs, checkpoint, dataset, seed, image_size,
                                                 input_norm, progress, verify)
    x = _load_affected(affected, test_index, test, train.image_shape)
    predicted = predict(net, x)
    if label is not None and not 0 <= label < train.num_classes:
        raise ValueError(f"--label: expected a class in [0, {train.num_classes}), got {label}")
    if label is not None and bool((predicted != label).any()):
        raise ValueError(f"--label: the model predicts {predicted.tolist()} for the affected input(s), not {label}; "
                         "an affected input is one the model gets wrong the attacker's way (leave --label out to "
                         "trace what it predicts)")
    y_adv = predicted if label is None else torch.full((x.shape[0],), int(label), dtype=torch.int64)
    loader = make_loader(train, batch_size=_SCORE_BATCH, shuffle=False)
    rank, world = _dist.group()
    main = rank == 0
    progress = progress and main
    # everything the saved fit depends on: the model, its weights and the data it was fitted on, as loaded
    # paths as the files they name: a rerun spelling them otherwise (./model.safetensors, another working folder)
    # is the same run, and resumes
    run_info = {"model": model, "model_kwargs": model_kwargs, "checkpoint": _real(checkpoint),
                "dataset": _real_spec(dataset), "image_size": list(train.image_shape), "input_norm": input_norm,
                "factors": _real(factors), "seed": seed,
                # the partitions group the sums: another size is another fit (at round-off), not this one resumed
                "partition_size": partition_size or DEFAULT_PARTITION_SIZE,
                # the content, not only the names: a folder or a checkpoint file may have changed since
                "data_sha256": tensor_digest({"images": train.images, "labels": train.labels}),
                "weights_sha256": tensor_digest(dict(net.state_dict()))}
    # the detector's settings are checked before any work, errors naming the flag
    settings = _given(n_transforms=n_transforms, threshold=threshold, tolerance=tolerance, fdr=fdr, combine=combine,
                      candidates=candidates, boundary=boundary, retrace=retrace)
    _check_detector_settings(settings, x.shape[0])
    # one run at a time in --out (both would write its files, the last one's winning), held from here on: the
    # checks above leave nothing behind
    with folder_lock(out, rank, world, name="--out"):
        # rank 0 writes the results: another --out on a rank was ignored without a word
        _dist.agree({"--out": os.path.realpath(out)}, world, "every rank must write into the same --out")
        # a rerun of an interrupted run (same command and inputs) resumes: its fit from out/ekfac.safetensors, its
        # unfinished passes from out/passes; rank 0 decides for every rank
        same_run = _dist.broadcast(main and _same_run(out, "detect", run_info), world)
        resume = same_run and factors is None and (out / "ekfac.safetensors").is_file()
        passes = out / "passes"
        if main:  # an earlier run's results beside this one's, if it is stopped, would be read as its own
            if not same_run:
                _replace_run(out, "detect")
            _remove_results(out, keep=(checkpoint, factors))
        if not same_run:  # another run's partitions (other data, weights or settings) would be refused, every time
            if main:
                remove_partition_files(passes)
                saved = out / "ekfac.safetensors"
                # another run's fit: resuming this one after a kill before its own fit is saved would read it
                if saved.is_file() and not (factors is not None and saved.samefile(factors)):
                    saved.unlink()
            _dist.barrier(world)
        engine = {"checkpoint_dir": passes, "partition_size": partition_size or DEFAULT_PARTITION_SIZE,
                  "progress": progress}
        ekfac = None
        if factors is not None or resume:
            try:
                ekfac = EKFAC.load(factors or out / "ekfac.safetensors", net, verify=verify, **engine)
            except (FileNotFoundError, ValueError, TypeError) as err:
                if factors is not None:
                    # the engine's advice names its Python parameter; the command line refits without --factors
                    text = first_line(err).replace("refit, or pass strict=False to use them anyway",
                                                   "leave --factors out to refit for this model")
                    raise _flag_error("--factors", ValueError(text)) from err
                # this run's own saved fit, damaged (a flipped bit, a copy cut short): every rerun stopped on it
                if main:
                    log.warning(f"--out: the saved fit could not be read ({first_line(err)}); it is removed, and the "
                                "fit redone")
                    (out / "ekfac.safetensors").unlink(missing_ok=True)
            else:
                if resume:
                    log.info(f"--out {str(out)!r}: resuming the interrupted run (its EK-FAC fit reused, its stored "
                             "partitions continued)")
        if ekfac is None:
            ekfac = EKFAC(net, seed=seed, **engine)  # fitted in the run folder, after every check
        detector = DeltaInfluence(ekfac, seed=seed, progress=progress, **settings)
        with run_folder(out, "detect", **run_info) if main else contextlib.nullcontext():
            weights = f" with the weights of --checkpoint {checkpoint}" if model and checkpoint else ""
            log.info(f"model {model or checkpoint}{weights}: test accuracy {accuracy:.4f} on --dataset {dataset}; "
                     f"{x.shape[0]} affected input(s) predicted as {predicted.tolist()}; tracing label(s) "
                     f"{y_adv.tolist()} over {len(train)} training examples")
            if ekfac.factors is None:
                if not ekfac.coverage.skipped:  # (when some are, EKFAC has said it, as a warning)
                    log.info(ekfac.coverage.brief())
                ekfac.fit(loader)
                if main:
                    ekfac.save(out / "ekfac.safetensors")
            # held-out controls come from the test split (the detector skips the affected inputs themselves)
            detection = detector.detect(loader, x, y_adv, reference=test)
            if not main:  # rank 0 writes the results (every rank holds the same ones)
                return {"n_flagged": int(detection.flagged.numel()), "verdict": detection.verdict}
            remove_partition_files(passes)  # what is left there belongs to no unfinished pass of this run
            flagged = detection.flagged.tolist()
            files = getattr(train, "files", None)  # an image folder's: the flagged examples by file, not only index
            # the checkpoint as the file it names: a path relative to where the command ran means nothing beside
            # the results
            write_json(out / "flagged.json", {"model": model, "checkpoint": _real(checkpoint), "dataset": dataset,
                                              "found": detection.found, "verdict": detection.verdict,
                                              "fdr_estimate": detection.fdr_estimate, "flagged": flagged,
                                              **({"flagged_files": [files[i] for i in flagged]} if files else {})})
            results = {"model": model, "checkpoint": _real(checkpoint), "dataset": dataset, "n_train": len(train),
                       "test_accuracy": accuracy, "n_flagged": len(flagged), "verdict": detection.verdict,
                       "affected_labels": y_adv.tolist(), "ekfac_coverage": ekfac.coverage.as_dict(),
                       "timings_s": detection.timings}
            write_report(out, results, detection, affected_x=x, train_images=train,
                         title=f"Δ-Influence on {model or checkpoint}", settings=detection.settings)
        log.info(f"{detection.verdict} -> {out / 'flagged.json'}")
        return results


def _real(path: str | None) -> str | None:
    return None if path is None else os.path.realpath(path)


def _real_spec(spec: str) -> str:
    """A --dataset spec with its folder as the folder it names (imagefolder:./data and imagefolder:data agree)."""
    name, sep, arg = spec.partition(":")
    return f"{name}:{os.path.realpath(arg)}" if sep and name.strip().lower() in ("imagefolder", "cifar10",
                                                                                 "cifar100") else spec


def _check_image_size(image_size) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or not 8 <= image_size <= MAX_IMAGE_SIDE):
        raise ValueError(f"--image-size: expected an int in [8, {MAX_IMAGE_SIDE}], got {image_size!r}")


def _replace_run(out: Path, command: str) -> None:
    """Say so when ``out`` holds a finished run, whose results this one replaces."""
    from deltainf._files import run_status

    record = run_status(out)
    if record and record.get("status") == "complete":
        when = f" (finished {record['finished_utc']})" if isinstance(record.get("finished_utc"), str) else ""
        log.warning(f"--out {str(out)!r}: replacing the finished {record.get('command', command)} run{when}; "
                    "pass another --out to keep it")


def _same_run(out: Path, command: str, info: dict) -> bool:
    """Whether ``out`` holds an unfinished run of the same command with the same inputs (so its saved fit, where
    there is one, and its stored partitions belong to this one)."""
    from deltainf._files import run_status

    record = run_status(out)
    if not record or record.get("status") == "complete" or record.get("command") != command:
        return False
    return all(record.get(k) == v for k, v in json.loads(json.dumps(info, default=str)).items())


def _model_and_data(model, model_kwargs, checkpoint, dataset, seed, image_size, input_norm, progress, verify=True):
    """(the user's model, fitted to the data's input; train and test splits; test accuracy), all checked."""
    from deltainf.models import Normalize

    _check_image_size(image_size)
    norm = _parse_norm(input_norm)
    net, meta = _user_model(model, model_kwargs, checkpoint, verify)
    channels, size = _expected_image(net, meta)
    if size is not None and image_size is not None and image_size != size:  # before the folder is decoded
        raise ValueError(f"--image-size: the images are {image_size} px but the model was made for {size} px")
    if channels is not None and channels not in (1, 3):  # what image files hold; the data flags cannot give more
        raise ValueError(f"--model: it takes images of {channels} channels, and --dataset reads images with 1 or 3")
    split_seed = seed
    trained = meta.get("deltainf_meta") if isinstance(meta.get("deltainf_meta"), dict) else {}
    recorded = trained.get("seed")
    if trained.get("dataset") == dataset and isinstance(recorded, int) and not isinstance(recorded, bool):
        # a deltainf checkpoint trained on a seeded split (digits, synthetic): the same split, or the model's own
        # training images would become held-out controls and some of its test images candidates
        split_seed = recorded
        if recorded != seed:
            log.info(f"--dataset {dataset}: split as when the --checkpoint was trained (seed {recorded}); --seed {seed} "
                     "seeds the rest")
    attack = trained.get("attack")
    if trained.get("dataset") == dataset and isinstance(attack, str) and attack != "none":
        # the demo's victim: its poisons were made at training time and are not in the dataset the spec names
        log.warning(f"--checkpoint: the model was trained on {dataset} poisoned by {attack} (deltainf demo); --dataset "
                    f"{dataset} is the clean training set, which holds none of its poisons, so none can be flagged: "
                    "give --dataset the data the model was trained on")
    try:
        train, test = parse_dataset_spec(dataset, seed=split_seed, size=image_size or size, progress=progress,
                                         channels=channels)
    except (FileNotFoundError, ValueError) as err:
        raise _flag_error("--dataset", err) from err
    if size is not None and train.image_shape[-1] != size:  # --image-size against the model was checked above
        raise ValueError(f"--dataset: the images are {train.image_shape[-1]} px but the model was made for {size} px")
    if size is None and image_size is None:
        # a model that pools its features runs at any size, and may still beat chance at the wrong one
        log.warning(f"--image-size not given and the model records none: the images of --dataset are loaded at "
                    f"{train.image_shape[-1]} px; pass --image-size if the model was made for another size")
    if norm is not None:
        c = train.image_shape[0]
        if len(norm[0]) not in (1, c):
            raise ValueError(f"--input-norm: {len(norm[0])} values for images with {c} channels")
        net = torch.nn.Sequential(Normalize(norm[0] * (c // len(norm[0])), norm[1] * (c // len(norm[1]))), net).eval()
    return net, train, test, _check_model_on_data(net, train, test)


def _check_detector_settings(settings: dict, n_points: int | None) -> None:
    """ValueError naming the flag when the Δ-Influence settings given on the command line (``settings``, by
    parameter name) are not valid, for ``n_points`` affected inputs (None: not known yet)."""
    from deltainf.delta import DeltaInfluence

    try:
        DeltaInfluence.check_settings(n_points, **settings)
    except (ValueError, TypeError) as err:
        raise _settings_error(err, settings) from err
    if settings.get("tolerance") is not None and "fdr" in settings:  # --fdr was dropped without a word
        raise ValueError("--fdr: a fixed --tolerance decides without a false-discovery target; give one of the two")


def _settings_error(err: Exception, settings: dict) -> ValueError:
    """A DeltaInfluence settings error as the command line says it: the flag, then the message without the
    parameter name it starts with."""
    flag = _flag_of(err, settings)
    text = str(err)
    name = flag.replace("-", "_")
    if text.startswith(name):
        text = text[len(name):].lstrip(":= ") or text
    return ValueError(f"--{flag}: {text}")


def _flag_of(err: Exception, settings: dict) -> str:
    """The CLI flag behind a DeltaInfluence settings error (its message starts with the parameter name)."""
    text = str(err)
    for name in settings:
        if text.startswith(name):
            return name.replace("_", "-")
    return "settings"


def bench(device: str = "cpu", quick: bool = False, out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Kernel benchmarks on this machine (see :mod:`deltainf.bench`): ours vs the plain-PyTorch reference
    vs torch's GEMM / memory-copy throughput, printed as a table; JSON written to ``out`` if given."""
    from deltainf import bench as kernel_bench
    from deltainf._files import output_file

    if device not in ("cpu", "cuda", "all"):
        raise ValueError(f"--device: expected cpu, cuda or all, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no GPU is visible to torch")
    if out is not None:  # before the benchmarks run, not after (minutes of work lost to a bad path)
        out = output_file(out, "--out", make_folder=True)
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}[device]
    rows: list[dict[str, Any]] = []
    for dev in devices:
        rows += kernel_bench.run_all(device=dev, quick=quick)
    result = {"machine": kernel_bench.machine_info(devices[-1]), "rows": rows}
    log.info(kernel_bench.format_table(rows))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result, indent=2, default=str)
    return result
