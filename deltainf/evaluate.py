"""``deltainf evaluate``: compare poison detectors and unlearning methods across attacks and seeds.

The story of one *cell* (one attack, one seed), as in the Δ-Influence paper's experiments:

1. prepare: train a reference model on the clean data (also the surrogate of the attacks that need
   one), poison the training set and train the victim with the same recipe and seed, and pick the
   affected test points: the first DEFAULT_N_POINTS (10) triggered test inputs the victim sends to the
   target (the paper's rule extended to several points, which Δ-Influence pools; the threshold
   baselines use the first, as in the paper), or the Witches' Brew target image. An attack the victim
   does not fall for leaves nothing to trace: the cell is recorded as ``attack_failed``;
2. detect: every detector flags a set; each set is removed and the model retrained from scratch (exact
   unlearning), giving poison success and clean accuracy (the detector table) and detection metrics
   (flagged, TP, precision, recall, FPR: the detection table);
3. unlearn: every unlearning method is applied to Δ-Influence's flagged set (the unlearning table).

Outputs in ``out``: ``cells/<attack>-seed<s>.json`` (one per finished cell; a re-run skips cells whose
JSON is present with the same settings), ``cells/<attack>-seed<s>/`` (the poisoned data and the victim,
reused when a cell is re-run and its ``run.json`` says complete), ``clean/seed<s>.safetensors`` (clean
reference models), ``results.json`` (every cell, the settings, the machine), ``RESULTS.md`` (mean ± std
tables), ``results.png`` (poison success and clean accuracy after retraining, per detector and attack)
and ``run.json`` (``"complete"`` once all of these are written, with the failures). Every file is written
atomically, and a cached file that does not load (truncated, altered, failing its hash check) is
recomputed, so a run killed at any point is finished by running the same command again.

The training recipe, the attack settings and the detectors' and unlearning methods' settings come
from :mod:`deltainf.recipes`; Δ-Influence runs with the library defaults and held-out controls from the
test split, as ``deltainf detect`` does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch

from deltainf import recipes
from deltainf._util import first_line, log, to_jsonable

__all__ = ["run", "failures", "run_cell", "summarize", "format_markdown", "plot_results", "parse_names",
           "resolve_seeds", "cell_settings", "ATTACKS", "DETECTORS", "UNLEARN_METHODS", "REMOVED_PSR"]

ATTACKS = tuple(recipes.ATTACKS)
DETECTORS = ("delta-influence", "activation-clustering", "spectral-signatures", "frequency", "ekfac-threshold",
             "trak-threshold", "random")
UNLEARN_METHODS = ("exact", "cf", "ga", "ssd", "scrub", "badt")

ATTACK_LABELS = {name: r.label for name, r in recipes.ATTACKS.items()}
DETECTOR_LABELS = {"delta-influence": "Δ-Influence", "activation-clustering": "Activation Clustering",
                   "spectral-signatures": "Spectral Signatures", "frequency": "Frequency (FreqDef)",
                   "ekfac-threshold": "EK-FAC threshold", "trak-threshold": "TRAK threshold",
                   "random": "Random (control)"}
UNLEARN_LABELS = {"exact": "EU (exact retrain)", "cf": "CF (fine-tune)", "ga": "GA (gradient ascent)",
                  "ssd": "SSD", "scrub": "SCRUB", "badt": "Bad Teacher"}
_UNLEARNER_NAMES = {"exact": "exact_retrain", "cf": "finetune", "ga": "gradient_ascent", "ssd": "ssd",
                    "scrub": "scrub", "badt": "bad_teacher"}
_ALIASES = {
    "attack": {"witches_brew": "witches-brew", "wb": "witches-brew", "witchesbrew": "witches-brew",
               "freq": "frequency", "lc": "label-consistent", "label_consistent": "label-consistent"},
    "detector": {"delta": "delta-influence", "deltainfluence": "delta-influence", "delta_influence": "delta-influence",
                 "ac": "activation-clustering", "ss": "spectral-signatures", "freq": "frequency",
                 "freqdef": "frequency", "ekfac": "ekfac-threshold", "trak": "trak-threshold"},
    "unlearning method": {"eu": "exact", "exact-retrain": "exact", "retrain": "exact", "finetune": "cf",
                          "fine-tune": "cf", "gradient-ascent": "ga", "bad-teacher": "badt"},
}

#: a detector "removes the poison" in a seed when poison success after retraining is at most this
REMOVED_PSR = 0.05
# The EK-FAC / TRAK threshold baselines score the first affected point only, as the paper ran them;
# Δ-Influence gets all of them (given all ten, the baselines flagged 22-28 % of digits: docs/RESULTS.md).
THRESHOLD_QUERY_POINTS = 1
#: the digits split is fixed across seeds (the paper's three runs share one dataset); seeds vary the
#: poison draw, the triggers, the training and the detectors' randomness
SPLIT_SEED = 0
_SCORE_BATCH = 256
_FORMAT = "deltainf-evaluate-cell-v2"  # v2: the calibrated Δ-Influence decision


# --------------------------------------------------------------------------------------------- arguments

def parse_names(value, valid: Sequence[str], what: str, allow_all: bool = False, argument: str | None = None
                ) -> list[str]:
    """Validate a comma string or a list of names against ``valid`` (case, ``_``/``-`` and the aliases in
    ``_ALIASES`` tolerated); ``"all"`` -> every name when ``allow_all``; ``""``/``"none"`` -> [].

    Returns the canonical names in the given order without duplicates. Raises ValueError naming every
    unknown entry and listing the valid names (after ``argument``, the parameter given, when there is one),
    TypeError for a non-string entry."""
    if value is None:
        raise ValueError(f"{what}s: expected a comma-separated string or a list of names from {list(valid)}, "
                         "got None")
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    unknown: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{what}s: expected names (str), got {item!r}")
        key = item.strip().lower().replace("_", "-")
        if not key or key == "none":
            continue
        if key == "all" and allow_all:
            names += [v for v in valid if v not in names]
            continue
        key = _ALIASES.get(what, {}).get(key, _ALIASES.get(what, {}).get(key.replace("-", "_"), key))
        if key not in valid:
            unknown.append(item.strip())
        elif key not in names:
            names.append(key)
    if unknown:
        extra = " or 'all'" if allow_all else ""
        lead = f"{argument}: " if argument else ""
        raise ValueError(f"{lead}unknown {what}{'s' if len(unknown) > 1 else ''} {unknown}; valid names: "
                         f"{', '.join(valid)}{extra}")
    return names


def resolve_seeds(seeds) -> list[int]:
    """``seeds``: an int n >= 1 (seeds 0..n-1) or a sequence of distinct ints >= 0."""
    if isinstance(seeds, bool):
        raise TypeError("seeds: expected an int >= 1 or a list of ints, got a bool")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds: expected an int >= 1 (the number of seeds), got {seeds}")
        return list(range(seeds))
    try:
        out = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise TypeError(f"seeds: expected an int >= 1 or a list of ints, got {seeds!r}") from None
    if not out or any(s < 0 for s in out) or len(set(out)) != len(out):
        raise ValueError(f"seeds: expected a non-empty list of distinct ints >= 0, got {out}")
    return out


# ---------------------------------------------------------------------------------------------- settings

def _fisher() -> str:
    from deltainf.influence.ekfac import EKFACConfig

    return EKFACConfig().fisher


def _delta_defaults() -> dict[str, Any]:
    from deltainf import delta

    return {k: getattr(delta, k) for k in ("DEFAULT_N_TRANSFORMS", "DEFAULT_THRESHOLD", "DEFAULT_FDR",
                                           "DEFAULT_N_POINTS", "DEFAULT_COMBINE", "DEFAULT_DOMAIN")}


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_digest(train, test) -> str:
    """SHA-256 of the images and labels of both splits: what ``--dataset`` names can change under the same text
    (new files at the same path), and a cached cell or clean model must be of the data that is there now."""
    from deltainf._files import tensor_digest

    return tensor_digest({"train_x": train.images, "train_y": train.labels, "test_x": test.images,
                          "test_y": test.labels})


def _stage_settings(dataset: str, train, attack: str, seed: int, data: str | None = None) -> dict[str, Any]:
    """What the clean model, the poisoned data and the victim depend on (``data``: :func:`data_digest`)."""
    from deltainf.version import __version__

    cfg = recipes.training_recipe(train, seed, False).to_dict()
    cfg.pop("progress", None)
    return {"format": _FORMAT, "deltainf": __version__, "dataset": dataset, "data": data, "split_seed": SPLIT_SEED,
            "attack": attack, "seed": seed, "attack_kwargs": recipes.attack_settings(attack, train), "train_config": cfg}


def cell_settings(dataset: str, train, attack: str, seed: int, detectors: Sequence[str],
                  unlearn: Sequence[str], data: str | None = None) -> dict[str, Any]:
    """Everything a cell's result depends on (JSON-friendly), ``data`` the :func:`data_digest` of the splits. A
    cached cell is reused only when its stored settings equal these, so changing a default (e.g. Δ-Influence's)
    or the data behind ``dataset`` re-runs the cells."""
    s = _stage_settings(dataset, train, attack, seed, data)
    # in their canonical order: the same detectors and methods listed in another order are the same cell
    detectors, unlearn = _ordered(detectors, DETECTORS), _ordered(unlearn, UNLEARN_METHODS)
    s.update({
        "detectors": list(detectors),
        "detector_kwargs": {d: recipes.detector_settings(d, train, seed) for d in detectors},
        "unlearn": list(unlearn),
        "unlearn_kwargs": {m: recipes.unlearning_settings(m, train, seed) for m in unlearn},
        "delta_defaults": _delta_defaults(),
        "ekfac": {"fisher": _fisher()},
        "removed_psr": REMOVED_PSR,
        "threshold_query_points": THRESHOLD_QUERY_POINTS,
    })
    return to_jsonable(s)


# ------------------------------------------------------------------------------------------- the cell work

@dataclasses.dataclass
class _Context:
    dataset: str
    train: Any
    test: Any
    out: Path
    progress: bool
    data: str | None = None  # data_digest(train, test)
    computed_with: dict = dataclasses.field(default_factory=dict)  # deltainf version and git commit of this run
    clean_models: dict = dataclasses.field(default_factory=dict)


def _cached(what: str, load):
    """``load()``, or None when the cache entry is damaged: any error reading it (a truncated or altered
    file, a failed hash check) makes it a miss, said in one line, and the caller recomputes it."""
    from deltainf._util import first_line

    try:
        return load()
    except Exception as err:  # noqa: BLE001 - safetensors' own error types included
        log.warning(f"{what}: damaged cache entry, recomputing ({type(err).__name__}: {first_line(err)})")
        return None


def _clean_model(ctx: _Context, seed: int):
    """The reference model trained on the clean data for ``seed`` (memoised, and cached on disk)."""
    from deltainf.train import load_model, save_checkpoint, train_model

    if seed in ctx.clean_models:
        return ctx.clean_models[seed]
    path = ctx.out / "clean" / f"seed{seed}.safetensors"
    cfg = recipes.training_recipe(ctx.train, seed, ctx.progress)
    key = _key({"dataset": ctx.dataset, "data": ctx.data, "split_seed": SPLIT_SEED,
                "config": {**cfg.to_dict(), "progress": None}})
    loaded = _cached(str(path), lambda: load_model(path)) if path.exists() else None
    model = loaded[0] if loaded is not None and loaded[1].get("key") == key else None
    if model is None:
        model = train_model(ctx.train, cfg)
        save_checkpoint(model, path, meta={"key": key, "seed": seed, "dataset": ctx.dataset})
    ctx.clean_models[seed] = model
    return model


def _attack_and_victim(attack: str, ctx: _Context, seed: int, cell_dir: Path, timings: dict):
    """(clean model, poison result, victim), from the cache in ``cell_dir`` when the folder is marked
    complete for the same key and its files check out; otherwise recomputed, with the folder marked
    incomplete until both are written."""
    from deltainf._files import mark_complete, mark_running, run_status
    from deltainf.attacks import PoisonResult
    from deltainf.train import load_model, save_checkpoint, train_model

    key = _key(_stage_settings(ctx.dataset, ctx.train, attack, seed, ctx.data))
    t0 = time.perf_counter()
    clean = _clean_model(ctx, seed)
    timings["clean_model"] = round(time.perf_counter() - t0, 3)
    poison = victim = None
    status = run_status(cell_dir) or {}
    if status.get("status") == "complete" and status.get("key") == key:
        poison = _cached(str(cell_dir / "poison.safetensors"),
                         lambda: PoisonResult.load(cell_dir, ctx.train, ctx.test, key))
        loaded = _cached(str(cell_dir / "victim.safetensors"), lambda: load_model(cell_dir / "victim.safetensors"))
        victim = loaded[0] if loaded is not None and loaded[1].get("key") == key else None
    if poison is None or victim is None:
        mark_running(cell_dir, "evaluate cell", key=key, attack=attack, seed=seed)
        t0 = time.perf_counter()
        poison = recipes.run_attack(attack, ctx.train, ctx.test, clean, seed, ctx.progress)
        timings["attack"] = round(time.perf_counter() - t0, 3)
        poison.save(cell_dir, key)
        t0 = time.perf_counter()
        victim = train_model(poison.train, recipes.training_recipe(ctx.train, seed, ctx.progress))
        timings["victim"] = round(time.perf_counter() - t0, 3)
        save_checkpoint(victim, cell_dir / "victim.safetensors", meta={"key": key, "attack": attack, "seed": seed})
        mark_complete(cell_dir, key=key)
    else:
        timings["cached_attack_and_victim"] = True
    return clean, poison, victim


def _scores(model, poison, test) -> dict[str, float]:
    from deltainf.train import accuracy

    return {"clean_accuracy": accuracy(model, test), "poison_success": poison.poison_success(model)}


def _affected(attack: str, victim, poison):
    """(x (P,C,H,W), adversarial label, description) or None when the victim did not fall for the attack.

    Trigger attacks: the first DEFAULT_N_POINTS triggered test inputs the victim sends to the target (the
    paper's rule extended to several points, for Δ-Influence; the threshold baselines use the first
    THRESHOLD_QUERY_POINTS of them).
    Witches' Brew: its single target image."""
    from deltainf.delta import DEFAULT_N_POINTS, pick_affected_points
    from deltainf.train import predict

    target = int(poison.target_class)
    if recipes.ATTACKS[attack].targeted:
        x = poison.triggered_test.images[:1]
        pred = int(predict(victim, x)[0])
        if pred != target:
            return None, {"predicted": pred, "intended": target}
        return x, {"test_index": int(poison.test_indices[0]), "true_label": int(poison.triggered_test.labels[0]),
                   "label": target}
    try:
        points = pick_affected_points(victim, poison.triggered_test, target, count=DEFAULT_N_POINTS)
    except ValueError as err:
        return None, {"reason": str(err)}
    return points.x, {"triggered_indices": points.indices,
                      "test_indices": [int(poison.test_indices[i]) for i in points.indices],
                      "true_labels": points.true_labels, "label": target}


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


@dataclasses.dataclass
class _Cell:
    """What the detect and unlearn steps of one cell work on (made by :func:`_prepare`)."""

    ctx: _Context
    attack: str
    seed: int
    clean: Any
    poison: Any
    victim: Any
    x_affected: torch.Tensor
    timings: dict
    shared: dict = dataclasses.field(default_factory=dict)  # EK-FAC fit, Δ-Influence's base scores and count
    retrained: dict = dataclasses.field(default_factory=dict)  # identical flagged sets are retrained once

    @property
    def train(self):
        return self.poison.train

    @property
    def target(self) -> int:
        return int(self.poison.target_class)

    @property
    def recipe(self):
        return recipes.training_recipe(self.ctx.train, self.seed, self.ctx.progress)

    def loader(self):
        from deltainf.data import make_loader

        return make_loader(self.train, batch_size=_SCORE_BATCH, shuffle=False)

    def ekfac(self):
        """EK-FAC of the victim, fitted once per cell (Δ-Influence and EK-FAC thresholding share it)."""
        if "ekfac" not in self.shared:
            from deltainf.influence import EKFAC

            t0 = time.perf_counter()
            self.shared["ekfac"] = EKFAC(self.victim, seed=self.seed, progress=self.ctx.progress).fit(self.loader())
            self.timings["ekfac_fit"] = round(time.perf_counter() - t0, 3)
        return self.shared["ekfac"]

    def exact_retrain(self, flagged: torch.Tensor) -> dict:
        """Poison success and clean accuracy of the victim's recipe retrained without ``flagged``."""
        from deltainf.unlearn import get_unlearner

        key = tuple(flagged.tolist())
        if key not in self.retrained:
            t0 = time.perf_counter()
            model = get_unlearner("exact_retrain", config=self.recipe, seed=self.seed).unlearn(
                self.victim, self.train, flagged)
            self.retrained[key] = {**_scores(model, self.poison, self.ctx.test),
                                   "time_s": round(time.perf_counter() - t0, 3)}
        return dict(self.retrained[key])


def _prepare(ctx: _Context, attack: str, seed: int, cell_dir: Path) -> tuple[dict, _Cell | None]:
    """Step 1: the clean model, the poisoned data, the victim and the affected points. Returns the cell's
    result so far and the prepared cell (None when the victim did not fall for the attack)."""
    timings: dict[str, Any] = {}
    clean, poison, victim = _attack_and_victim(attack, ctx, seed, cell_dir, timings)
    result: dict[str, Any] = {
        "n_train": len(poison.train), "num_classes": int(poison.train.num_classes), "n_poisons": poison.num_poisons,
        "target_class": int(poison.target_class),
        "source_classes": [int(c) for c in poison.source_classes], "n_triggered_test": len(poison.triggered_test),
        "attack_params": to_jsonable({k: v for k, v in poison.params.items() if k != "trigger_info"}),
        "clean_model": _scores(clean, poison, ctx.test), "victim": _scores(victim, poison, ctx.test),
        "detectors": {}, "unlearning": {}, "timings_s": timings,
    }
    x_affected, result["affected"] = _affected(attack, victim, poison)
    if x_affected is None:
        return result, None
    return result, _Cell(ctx, attack, seed, clean, poison, victim, x_affected, timings)


def _poison_fractions(poison) -> dict[int, float]:
    """{label: share of poisons among the training examples of that label} (the poisoned labels), for the labels
    holding any."""
    labels = poison.train.labels
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
    poisons = torch.bincount(labels[poison.poison_indices], minlength=counts.numel())
    return {int(c): float(poisons[c]) / int(counts[c]) for c in poisons.nonzero().flatten().tolist()}


def _flag(cell: _Cell, name: str) -> tuple[torch.Tensor, dict]:
    """One detector's flagged set and what to record of it, every detector through the common interface."""
    from deltainf.defenses import get_detector

    settings = recipes.detector_settings(name, cell.ctx.train, cell.seed)
    if name == "random":
        # A control, not a detector: does removing that many examples, any examples, also remove the poison?
        if "delta_count" not in cell.shared:
            raise ValueError("the random control removes as many examples as Δ-Influence flagged; "
                             "run it together with delta-influence")
        g = torch.Generator().manual_seed(settings["seed"] + 104729)
        return torch.randperm(len(cell.train), generator=g)[:cell.shared["delta_count"]], {"count": cell.shared["delta_count"]}
    available: dict[str, Any] = {"query_x": cell.x_affected, "query_y": cell.target, "reference": cell.ctx.test,
                                 "clean_dataset": cell.ctx.train}
    if name == "delta-influence":
        settings.update(progress=cell.ctx.progress, batch_size=_SCORE_BATCH)
        available["scorer"] = cell.ekfac()
    elif name == "frequency":
        settings["progress"] = cell.ctx.progress
    elif name == "spectral-signatures" and settings.get("expected_poison_fraction") == recipes.POISON_FRACTION_BOUND:
        settings["expected_poison_fraction"] = _poison_fractions(cell.poison)
    elif name in ("ekfac-threshold", "trak-threshold"):
        available["query_x"] = cell.x_affected[:THRESHOLD_QUERY_POINTS]
        if name == "ekfac-threshold":
            settings["scorer"] = cell.ekfac()
            if "delta_base_scores" in cell.shared:  # Δ-Influence already scored the original queries
                available["scores"] = cell.shared["delta_base_scores"][:THRESHOLD_QUERY_POINTS]
        else:
            from deltainf.influence import TRAKScorer

            settings["scorer"] = TRAKScorer(cell.victim, seed=cell.seed, progress=cell.ctx.progress).fit(cell.loader())
        settings["batch_size"] = _SCORE_BATCH
    res = get_detector(name.replace("-", "_"), **settings).run(cell.victim, cell.train, **available)
    if name == "delta-influence":
        cell.shared["delta_base_scores"] = res.base_scores
        cell.shared["delta_count"] = res.num_flagged
        return res.flagged, {"verdict": res.verdict, "fdr_estimate": res.fdr_estimate,
                             "settings": to_jsonable(res.settings), "timings_s": to_jsonable(res.timings)}
    if name == "frequency":
        hist = res.info.get("history") or []
        return res.flagged, {"final_train_loss_acc": list(hist[-1][2:]) if hist else None}
    extra = {"threshold": res.info.get("threshold")} if "threshold" in res.info else {}
    if name == "spectral-signatures":
        extra["expected_poison_fraction"] = settings["expected_poison_fraction"]
    return res.flagged, extra


def _detect(cell: _Cell, detectors: Sequence[str], result: dict) -> dict[str, torch.Tensor]:
    """Step 2: every detector's flagged set, its detection metrics and the model retrained without it.
    Δ-Influence runs first: the unlearning step needs its set and EK-FAC thresholding reuses its scores.
    A detector's failure is recorded in its entry; the others go on."""
    from deltainf.metrics import detection_metrics

    order = sorted(detectors, key=lambda d: d != "delta-influence")
    flagged_sets: dict[str, torch.Tensor] = {}
    for name in order:
        entry: dict[str, Any] = {"error": None}
        try:
            t0 = time.perf_counter()
            flagged, info = _flag(cell, name)
            flagged = torch.as_tensor(flagged, dtype=torch.int64).flatten().sort().values
            entry.update(detect_time_s=round(time.perf_counter() - t0, 3), info=info,
                         detection=detection_metrics(flagged, cell.poison.poison_indices, len(cell.train)),
                         flagged_indices=flagged.tolist())
            flagged_sets[name] = flagged
            entry["after_retrain"] = cell.exact_retrain(flagged)
        except Exception as err:  # noqa: BLE001 - one detector's failure must not lose the others
            entry.update(error=_error(err), traceback=traceback.format_exc(limit=8))
        result["detectors"][name] = entry
    return flagged_sets


def _unlearn(cell: _Cell, methods: Sequence[str], forget: torch.Tensor | None, result: dict) -> None:
    """Step 3: every unlearning method applied to Δ-Influence's flagged set ``forget``."""
    from deltainf.unlearn import get_unlearner

    for method in methods:
        entry: dict[str, Any] = {"error": None}
        try:
            if forget is None:
                raise RuntimeError("Δ-Influence did not produce a flagged set: "
                                   f"{result['detectors'].get('delta-influence', {}).get('error')}")
            entry["n_forget"] = int(forget.numel())
            if method == "exact":
                entry.update(cell.exact_retrain(forget))
            else:
                settings = recipes.unlearning_settings(method, cell.ctx.train, cell.seed)
                if settings.get("config") == "victim recipe":
                    settings["config"] = cell.recipe
                t0 = time.perf_counter()
                model = get_unlearner(_UNLEARNER_NAMES[method], **settings).unlearn(cell.victim, cell.train, forget)
                entry.update(_scores(model, cell.poison, cell.ctx.test), time_s=round(time.perf_counter() - t0, 3))
        except Exception as err:  # noqa: BLE001
            entry.update(error=_error(err), traceback=traceback.format_exc(limit=8))
        result["unlearning"][method] = entry


def run_cell(ctx: _Context, attack: str, seed: int, detectors: Sequence[str], unlearn: Sequence[str],
             cell_dir: Path) -> dict[str, Any]:
    """The whole job for one (attack, seed) cell: prepare, detect, unlearn (module docstring); returns its
    JSON-friendly result. Failures of one detector or one unlearning method are recorded in its entry
    (``"error"``) and the cell becomes ``"partial"``; anything else propagates (the caller records the cell
    as failed)."""
    t_cell = time.perf_counter()
    result, cell = _prepare(ctx, attack, seed, cell_dir)
    if cell is None:
        result["status"] = "attack_failed"
    else:
        if unlearn and "delta-influence" not in detectors:
            detectors = ["delta-influence", *detectors]
        flagged_sets = _detect(cell, detectors, result)
        _unlearn(cell, unlearn, flagged_sets.get("delta-influence"), result)
        entries = list(result["detectors"].values()) + list(result["unlearning"].values())
        result["status"] = "partial" if any(e["error"] for e in entries) else "ok"
    result["timings_s"]["total"] = round(time.perf_counter() - t_cell, 3)
    return result


# ------------------------------------------------------------------------------------------- aggregation

def _stats(values: Sequence[float]) -> dict[str, Any]:
    """mean, sample std (0 for one value), n of the finite values; mean/std None when there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals)}


def _ordered(keys, canonical: Sequence[str]) -> list[str]:
    keys = list(dict.fromkeys(keys))
    return [k for k in canonical if k in keys] + [k for k in keys if k not in canonical]


def _removed(cell: dict, after: dict) -> bool:
    """Whether the attack counts as removed: poison success at most REMOVED_PSR, in a model that kept at least half
    of the clean model's accuracy above chance (a model wrecked to chance has no poison success either: SCRUB on
    digits, 10 % accuracy, counted as removed). Cells that do not record their class count: poison success alone."""
    if after["poison_success"] > REMOVED_PSR:
        return False
    k = cell.get("num_classes")
    if not k:
        return True
    chance = 1.0 / k
    return after["clean_accuracy"] - chance >= 0.5 * (cell["clean_model"]["clean_accuracy"] - chance)


def summarize(cells: Sequence[dict]) -> dict[str, Any]:
    """Mean ± std over seeds of every table, from cell results (the dicts :func:`run_cell` returns, with
    ``attack``, ``seed`` and ``status`` set).

    Only ``ok``/``partial`` cells enter the detector, detection and unlearning rows (an entry with an
    ``error`` is left out of its row); ``attack_failed`` cells enter the ``attacks`` rows only (victim
    and clean-model numbers), ``failed`` cells nothing but the ``failed`` list.

    Returns a dict with lists of rows: ``attacks`` (per attack: seeds run / succeeded / failed, poisons,
    victim and clean-model stats), ``detectors`` (per attack x detector: poison success and clean
    accuracy after exact retraining, accuracy drop vs the clean model, ``removed`` seeds with poison
    success <= REMOVED_PSR in a model that kept its accuracy: :func:`_removed`), ``detection`` (flagged, tp,
    precision, recall, fpr) and ``unlearning`` (per attack x method), and ``failed`` (attack, seed, error)."""
    by_attack: dict[str, list[dict]] = {}
    for c in cells:
        by_attack.setdefault(c["attack"], []).append(c)
    out: dict[str, Any] = {"attacks": [], "detectors": [], "detection": [], "unlearning": [], "failed": []}
    for attack in _ordered(by_attack, ATTACKS):
        cs = sorted(by_attack[attack], key=lambda c: c["seed"])
        done = [c for c in cs if c.get("status") in ("ok", "partial", "attack_failed")]
        used = [c for c in cs if c.get("status") in ("ok", "partial")]
        out["failed"] += [{"attack": attack, "seed": c["seed"], "error": c.get("error")}
                          for c in cs if c.get("status") == "failed"]
        out["attacks"].append({
            "attack": attack, "seeds": [c["seed"] for c in cs], "n_done": len(done), "n_used": len(used),
            "n_attack_failed": sum(c.get("status") == "attack_failed" for c in cs),
            "n_failed": sum(c.get("status") == "failed" for c in cs),
            "n_poisons": _stats([c.get("n_poisons") for c in done]),
            "n_train": _stats([c.get("n_train") for c in done]),
            "victim_poison_success": _stats([c["victim"]["poison_success"] for c in done]),
            "victim_clean_accuracy": _stats([c["victim"]["clean_accuracy"] for c in done]),
            "clean_poison_success": _stats([c["clean_model"]["poison_success"] for c in done]),
            "clean_accuracy": _stats([c["clean_model"]["clean_accuracy"] for c in done]),
        })
        for det in _ordered([d for c in used for d in c.get("detectors", {})], DETECTORS):
            entries = [(c, c["detectors"][det]) for c in used
                       if det in c.get("detectors", {}) and not c["detectors"][det].get("error")]
            after = [(c, e["after_retrain"]) for c, e in entries if e.get("after_retrain")]
            errors = sum(1 for c in used if det in c.get("detectors", {}) and c["detectors"][det].get("error"))
            out["detectors"].append({
                "attack": attack, "detector": det, "n_errors": errors,
                "poison_success": _stats([a["poison_success"] for _, a in after]),
                "clean_accuracy": _stats([a["clean_accuracy"] for _, a in after]),
                "accuracy_drop": _stats([c["clean_model"]["clean_accuracy"] - a["clean_accuracy"] for c, a in after]),
                "removed": sum(_removed(c, a) for c, a in after), "n": len(after),
            })
            row = {"attack": attack, "detector": det, "n": len(entries), "n_errors": errors}
            for k in ("flagged", "tp", "precision", "recall", "fpr"):
                row[k] = _stats([e["detection"][k] for _, e in entries if e.get("detection")])
            out["detection"].append(row)
        for m in _ordered([k for c in used for k in c.get("unlearning", {})], UNLEARN_METHODS):
            entries = [(c, c["unlearning"][m]) for c in used
                       if m in c.get("unlearning", {}) and not c["unlearning"][m].get("error")]
            errors = sum(1 for c in used if m in c.get("unlearning", {}) and c["unlearning"][m].get("error"))
            out["unlearning"].append({
                "attack": attack, "method": m, "n_errors": errors,
                "poison_success": _stats([e["poison_success"] for _, e in entries]),
                "clean_accuracy": _stats([e["clean_accuracy"] for _, e in entries]),
                "accuracy_drop": _stats([c["clean_model"]["clean_accuracy"] - e["clean_accuracy"] for c, e in entries]),
                "removed": sum(_removed(c, e) for c, e in entries), "n": len(entries),
                "n_forget": _stats([e.get("n_forget") for _, e in entries]),
            })
    # the code each cell was computed with: a cached cell can be older than the checkout that writes the tables
    commits: dict[str, int] = {}
    for c in cells:
        made = c.get("computed_with") or {}
        name = made.get("git_commit") or f"deltainf {made.get('deltainf', 'unknown')}"
        name += " (with local edits)" if made.get("git_dirty") else ""
        commits[name] = commits.get(name, 0) + 1
    out["computed_with"] = commits
    return out


def _label(name: str, labels: dict) -> str:
    return labels.get(name, name)


def _pct(s: dict, digits: int = 1) -> str:
    if s is None or s.get("mean") is None:
        return "–"
    if s["n"] > 1:
        return f"{100 * s['mean']:.{digits}f} ± {100 * s['std']:.{digits}f}"
    return f"{100 * s['mean']:.{digits}f}"


def _num(s: dict, digits: int = 1) -> str:
    if s is None or s.get("mean") is None:
        return "–"
    if s["n"] > 1:
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}"


def format_markdown(summary: dict, settings: dict | None = None, environment: dict | None = None) -> str:
    """The RESULTS.md text: the detector, unlearning and detection tables (percentages, mean ± sample
    std over seeds), then the attacks that did not take and the failed cells."""
    settings = settings or {}
    lines = ["# deltainf evaluate", ""]
    if settings:
        lines += [f"Dataset `{settings.get('dataset')}`; attacks {', '.join(settings.get('attacks', []))}; "
                  f"seeds {settings.get('seeds')}; detectors {', '.join(settings.get('detectors', []))}; "
                  f"unlearning {', '.join(settings.get('unlearn', [])) or 'none'}.", ""]
    lines += ["Rates are percentages, counts (poisons, flagged, true positives, forget set) are counts; both are "
              "the mean ± sample standard deviation over the seeds that produced them (n). Poison success = share "
              "of the triggered source-class test images (Witches' Brew: of the target image) classified as the "
              "attack's target label. 'removed' counts the seeds in which poison success after unlearning is ≤ "
              f"{100 * REMOVED_PSR:.0f} % and the model kept at least half of the clean model's accuracy above "
              "chance (a model wrecked to chance has no poison success either). 'acc. drop' = clean "
              "accuracy of the model trained on clean data minus the accuracy after unlearning.", ""]

    lines += ["## Attacks", "",
              "| attack | seeds run | attack took | poisons | victim poison success | victim clean acc. | "
              "clean-model poison success | clean-model acc. |", "|---|---|---|---|---|---|---|---|"]
    for a in summary["attacks"]:
        failed = f" (+{a['n_failed']} failed)" if a["n_failed"] else ""
        lines.append(f"| {ATTACK_LABELS.get(a['attack'], a['attack'])} | {a['n_done']}{failed} | "
                     f"{a['n_used']}/{a['n_done']} | "
                     f"{_num(a['n_poisons'], 0)} | {_pct(a['victim_poison_success'])} | "
                     f"{_pct(a['victim_clean_accuracy'])} | {_pct(a['clean_poison_success'])} | "
                     f"{_pct(a['clean_accuracy'])} |")
    lines.append("")

    lines += ["## Detectors: flagged set removed, model retrained from scratch (exact unlearning)", "",
              "| attack | detector | n | poison success after | clean acc. after | acc. drop | removed |",
              "|---|---|---|---|---|---|---|"]
    for r in summary["detectors"]:
        err = f" ({r['n_errors']} errors)" if r["n_errors"] else ""
        lines.append(f"| {_label(r['attack'], ATTACK_LABELS)} | {_label(r['detector'], DETECTOR_LABELS)} | "
                     f"{r['n']}{err} | {_pct(r['poison_success'])} | {_pct(r['clean_accuracy'])} | "
                     f"{_pct(r['accuracy_drop'])} | {r['removed']}/{r['n']} |")
    lines.append("")

    lines += ["## Unlearning methods applied to Δ-Influence's flagged set", "",
              "| attack | method | n | forget-set size | poison success after | clean acc. after | acc. drop "
              "| removed |",
              "|---|---|---|---|---|---|---|---|"]
    for r in summary["unlearning"]:
        err = f" ({r['n_errors']} errors)" if r["n_errors"] else ""
        lines.append(f"| {_label(r['attack'], ATTACK_LABELS)} | {_label(r['method'], UNLEARN_LABELS)} | "
                     f"{r['n']}{err} | {_num(r['n_forget'])} | {_pct(r['poison_success'])} | "
                     f"{_pct(r['clean_accuracy'])} | {_pct(r['accuracy_drop'])} | {r['removed']}/{r['n']} |")
    lines.append("")

    lines += ["## Detection quality", "",
              "Precision = TP / flagged, recall = TP / poisons, FPR = FP / clean training examples, each per "
              "seed, then averaged ('–' where undefined, e.g. precision with nothing flagged).", "",
              "| attack | detector | n | flagged | TP | precision | recall | FPR |",
              "|---|---|---|---|---|---|---|---|"]
    for r in summary["detection"]:
        lines.append(f"| {_label(r['attack'], ATTACK_LABELS)} | {_label(r['detector'], DETECTOR_LABELS)} | "
                     f"{r['n']} | {_num(r['flagged'])} | {_num(r['tp'])} | {_pct(r['precision'])} | "
                     f"{_pct(r['recall'])} | {_pct(r['fpr'], 2)} |")
    lines.append("")

    not_taken = [a for a in summary["attacks"] if a["n_attack_failed"]]
    if not_taken:
        lines += ["## Attacks that did not take", ""]
        for a in not_taken:
            lines.append(f"- {ATTACK_LABELS.get(a['attack'], a['attack'])}: the victim did not fall for the attack in "
                         f"{a['n_attack_failed']} of {a['n_done']} seeds (no affected test point to trace), so "
                         "those seeds have no detector or unlearning rows.")
        lines.append("")
    if summary["failed"]:
        lines += ["## Failed cells", ""]
        for f in summary["failed"]:
            lines.append(f"- {f['attack']} seed {f['seed']}: {f['error']}")
        lines.append("")
    if environment:
        keys = ("platform", "python", "cpu_count", "torch", "torch_num_threads", "numpy", "deltainf", "git_commit",
                "git_dirty", "gpus")
        lines += ["## Machine and versions", ""]
        lines += [f"- {k}: {environment.get(k)}" for k in keys if k in environment]
        made = summary.get("computed_with") or {}
        if made:  # cached cells keep the code they were computed with
            lines.append("- cells computed with: " + ", ".join(f"{k} ({n} cell{'s' * (n != 1)})"
                                                             for k, n in made.items()))
        lines.append("")
    return "\n".join(lines)


def plot_results(summary: dict, path) -> None:
    """``results.png``: poison success (top) and clean accuracy (bottom) after exact retraining, one bar
    per detector within each attack (error bars: std over seeds), plus the undefended victim and, for
    accuracy, the clean-data model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deltainf._files import atomic_open

    attacks = [a["attack"] for a in summary["attacks"]]
    dets = _ordered([r["detector"] for r in summary["detectors"]], DETECTORS)
    series = ["(victim)"] + dets
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 2.6 * len(attacks) + 2), 7.5), sharex=True)
    width = 0.8 / max(len(series), 1)
    colors = plt.get_cmap("tab10")
    for ax, key, vkey, title in ((axes[0], "poison_success", "victim_poison_success",
                                  "poison success after retraining (%)"),
                                 (axes[1], "clean_accuracy", "victim_clean_accuracy",
                                  "clean accuracy after retraining (%)")):
        for j, name in enumerate(series):
            xs, ys, es = [], [], []
            for i, attack in enumerate(attacks):
                if name == "(victim)":
                    s = next(a[vkey] for a in summary["attacks"] if a["attack"] == attack)
                else:
                    row = next((r for r in summary["detectors"]
                                if r["attack"] == attack and r["detector"] == name), None)
                    s = row[key] if row else None
                if s and s.get("mean") is not None:
                    xs.append(i + (j - (len(series) - 1) / 2) * width)
                    ys.append(100 * s["mean"])
                    es.append(100 * s["std"])
            label = "no defence (victim)" if name == "(victim)" else DETECTOR_LABELS.get(name, name)
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=label,
                   color="lightgrey" if name == "(victim)" else colors(j - 1), edgecolor="black", linewidth=0.4)
        if key == "clean_accuracy":
            for i, a in enumerate(summary["attacks"]):
                s = a["clean_accuracy"]
                if s.get("mean") is not None:
                    ax.hlines(100 * s["mean"], i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                              label="model trained on clean data" if i == 0 else None)
            lows = [100 * r["clean_accuracy"]["mean"] for r in summary["detectors"]
                    if r["clean_accuracy"]["mean"] is not None]
            ax.set_ylim(max(0.0, min(lows + [100.0]) - 10), 100.5)
        else:
            ax.set_ylim(0, 105)
            ax.axhline(100 * REMOVED_PSR, color="red", linewidth=0.6, linestyle=":",
                       label=f"removed threshold ({100 * REMOVED_PSR:.0f} %)")
            for i, a in enumerate(summary["attacks"]):
                if a["n_used"] == 0:  # no detector ran: say why instead of leaving the group empty
                    ax.text(i, 50, f"attack did not take\n(victim fooled in 0/{a['n_done']} seeds)",
                            ha="center", va="center", fontsize=9)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(attacks)))
    axes[1].set_xticklabels([ATTACK_LABELS.get(a, a) for a in attacks])
    axes[0].legend(fontsize=7, ncol=2, loc="upper right")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- run

def _cell_name(attack: str, seed: int) -> str:
    return f"{attack}-seed{seed}"


def _read_cell(path: Path) -> dict | None:
    try:
        with open(path) as f:
            cell = json.load(f)
    except (OSError, ValueError):
        return None
    return cell if isinstance(cell, dict) else None


def _write_json(path: Path, obj) -> None:
    from deltainf._files import write_json

    write_json(path, to_jsonable(obj), indent=1)  # atomic: a kill never leaves a truncated cell that looks finished


def _cell_line(i: int, total: int, cell: dict, cached: bool) -> str:
    head = f"[{i}/{total}] {cell['attack']} seed {cell['seed']}: "
    status = cell.get("status")
    if status == "failed":
        return head + f"FAILED ({cell.get('error')})"
    v = cell["victim"]
    text = head + f"{status}{' (cached)' if cached else ''}, {cell.get('n_poisons')} poisons; victim poison success " \
                  f"{v['poison_success']:.3f}, acc {v['clean_accuracy']:.3f}"
    if status == "attack_failed":
        return text + " -> the attack did not take: no affected point, detectors skipped"
    d = cell.get("detectors", {}).get("delta-influence")
    if d and not d.get("error"):
        a, m = d["after_retrain"], d["detection"]
        text += f"; Δ-Influence flagged {m['flagged']} (recall {m['recall']:.2f}) -> poison success " \
                f"{a['poison_success']:.3f}, acc {a['clean_accuracy']:.3f}"
    t = cell.get("timings_s", {}).get("total")
    return text + (f" [{t:.0f} s]" if isinstance(t, (int, float)) and not cached else "")


def run(dataset: str = "digits", attacks="badnet,frequency,witches-brew", detectors="all",
        unlearn="exact,cf,ga,ssd,scrub,badt", seeds=3, out: str | os.PathLike = "out/evaluate",
        progress: bool = True, image_size: int | None = None) -> dict[str, Any]:
    """Compare detectors and unlearning methods over attacks x seeds (see the module docstring).

    Args:
        dataset: a dataset spec (``digits``, ``cifar10:PATH``, ...), split with seed 0 for every cell.
        image_size: the image side in pixels (digits: 16; an image folder: the side its images share).
        attacks: comma string or list from ``ATTACKS``.
        detectors: ``"all"`` or a comma string / list from ``DETECTORS``.
        unlearn: comma string / list from ``UNLEARN_METHODS`` (``""`` or ``"none"``: no unlearning table).
            Methods are applied to Δ-Influence's flagged set, so Δ-Influence runs whenever one is asked.
        seeds: number of seeds (0..n-1) or a list of seeds.
        out: output folder; cells already finished there with the same settings are not recomputed.
        progress: tqdm bars (the one-line summary per finished cell is printed either way).

    Returns:
        The ``results.json`` content: ``settings``, ``environment``, ``cells`` (one dict per cell),
        ``summary`` (see :func:`summarize`) and ``files``.

    Raises:
        ValueError for unknown attack / detector / method names or a bad seed count, before any work.
    """
    from deltainf._files import RUN_FILE, output_folder, remove_stale_temps, run_folder
    from deltainf._util import progress_bar
    from deltainf.data import parse_dataset_spec
    from deltainf.report import environment_info

    attack_list = parse_names(attacks, ATTACKS, "attack", argument="attacks")
    if not attack_list:
        raise ValueError(f"attacks: give at least one of {', '.join(ATTACKS)}")
    detector_list = parse_names(detectors, DETECTORS, "detector", allow_all=True, argument="detectors")
    if "random" in detector_list and "delta-influence" not in detector_list:
        raise ValueError("detectors: the random control removes as many examples as Δ-Influence flags; list "
                         "delta-influence beside it")
    unlearn_list = parse_names(unlearn, UNLEARN_METHODS, "unlearning method", argument="unlearn")
    if not detector_list and not unlearn_list:
        raise ValueError("detectors, unlearn: nothing to evaluate (both are empty)")
    seed_list = resolve_seeds(seeds)
    out = output_folder(out, files=(RUN_FILE, "results.json", "RESULTS.md", "results.png"))
    try:
        train, test = parse_dataset_spec(dataset, seed=SPLIT_SEED, size=image_size, progress=progress)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"dataset: {first_line(err)}") from err
    for attack in attack_list:  # before any cell trains a model, not as a failed cell after it
        try:
            recipes.check_attack_fits(attack, train)
        except ValueError as err:
            raise ValueError(f"dataset: {first_line(err)}") from err
    names = {"dataset": dataset, "attacks": attack_list, "detectors": detector_list, "unlearn": unlearn_list,
             "seeds": seed_list}
    from deltainf.influence._partitions import folder_lock

    # one run at a time in --out: a second would remove the first one's temporary files as stale, and both write
    # the same cells
    with folder_lock(out, 0, 1, name="--out"), run_folder(out, "evaluate", settings=names) as record:
        (out / "cells").mkdir(parents=True, exist_ok=True)
        cell_dirs = [d for d in (out / "cells").iterdir() if d.is_dir()]
        for folder in (out / "cells", out / "clean", *cell_dirs):
            remove_stale_temps(folder)
        env = environment_info()
        ctx = _Context(dataset=dataset, train=train, test=test, out=out, progress=bool(progress),
                       data=data_digest(train, test),
                       computed_with={k: env.get(k) for k in ("deltainf", "git_commit", "git_dirty")})
        cells: list[dict] = []
        jobs = [(a, s) for a in attack_list for s in seed_list]
        bar = progress_bar(total=len(jobs), enabled=progress, desc="evaluate cells")
        t_run = time.perf_counter()
        try:
            for i, (attack, seed) in enumerate(jobs, 1):
                cell, was_cached = _cached_or_run(ctx, attack, seed, detector_list, unlearn_list)
                cells.append(cell)
                log.info(_cell_line(i, len(jobs), cell, was_cached))
                bar.update(1)
        finally:
            bar.close()
        results = _write_outputs(out, cells, names, t_run, env)
        record["failures"] = failures(results)
    return results


def failures(results: dict) -> list[str]:
    """One line per cell that failed and per detector or unlearning method that failed inside a cell,
    from :func:`run`'s result (``deltainf evaluate`` prints them and exits with status 1)."""
    def first(text) -> str:
        lines = str(text or "").strip().splitlines()
        return lines[0] if lines else "unknown error"

    out = []
    for c in results["cells"]:
        where = f"cell {c['attack']} seed {c['seed']}"
        if c.get("status") == "failed":
            out.append(f"{where} failed: {first(c.get('error'))}")
            continue
        for kind, entries in (("detector", c.get("detectors", {})), ("unlearning method", c.get("unlearning", {}))):
            for name, entry in entries.items():
                if entry.get("error"):
                    out.append(f"{where}: {kind} {name} failed: {first(entry['error'])}")
    return out


def _cached_or_run(ctx: _Context, attack: str, seed: int, detectors: list[str], unlearn: list[str]) -> tuple[dict, bool]:
    """The cell's result: read back when it finished with the same settings, else run and written (a cell
    that raises is recorded as failed). Returns (cell, whether it was cached)."""
    name = _cell_name(attack, seed)
    path = ctx.out / "cells" / f"{name}.json"
    settings = cell_settings(ctx.dataset, ctx.train, attack, seed, detectors, unlearn, ctx.data)
    key = _key(settings)
    cached = _read_cell(path)
    if cached is not None and cached.get("settings_key") == key and cached.get("settings") == settings \
            and cached.get("status") in ("ok", "attack_failed"):
        return cached, True
    t0 = time.perf_counter()
    try:
        cell = run_cell(ctx, attack, seed, detectors, unlearn, ctx.out / "cells" / name)
        cell.setdefault("status", "ok")
        cell["error"] = cell.get("error")
    except Exception as err:  # noqa: BLE001 - one cell's failure must not stop the others
        cell = {"status": "failed", "error": _error(err), "traceback": traceback.format_exc(limit=12),
                "timings_s": {"total": round(time.perf_counter() - t0, 3)}}
    cell.update({"attack": attack, "seed": seed, "settings_key": key, "settings": settings, "format": _FORMAT,
                 "computed_with": ctx.computed_with})
    _write_json(path, cell)
    return cell, False


def _write_outputs(out: Path, cells: list[dict], names: dict, t_run: float, env: dict) -> dict[str, Any]:
    """results.json, RESULTS.md and results.png from the cells (``env``: the machine and versions of the run);
    returns the results.json content."""
    from deltainf._files import write_text

    summary = summarize(cells)
    run_settings = {**names, "split_seed": SPLIT_SEED, "removed_psr": REMOVED_PSR,
                    "delta_defaults": _delta_defaults(), "ekfac": {"fisher": _fisher()}, "argv": list(sys.argv)}
    results = {"settings": run_settings, "environment": env, "cells": cells, "summary": summary,
               "wall_time_s": round(time.perf_counter() - t_run, 3),
               "files": {"results_json": str(out / "results.json"), "results_md": str(out / "RESULTS.md"),
                         "results_png": str(out / "results.png")}}
    _write_json(out / "results.json", results)
    write_text(out / "RESULTS.md", format_markdown(summary, run_settings, env))
    try:
        plot_results(summary, out / "results.png")
    except Exception as err:  # noqa: BLE001 - a plotting problem must not lose the tables
        results["files"]["results_png"] = None
        log.info(f"could not draw results.png: {_error(err)}")
    n_failed = sum(c.get("status") == "failed" for c in cells)
    log.info(f"done: {len(cells)} cells ({n_failed} failed) in {time.perf_counter() - t_run:.0f} s; "
             f"{out / 'RESULTS.md'}, {out / 'results.json'}, {out / 'results.png'}")
    return results
