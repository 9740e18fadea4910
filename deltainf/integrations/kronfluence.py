"""kronfluence <-> deltainf: EK-FAC factor folders in both directions, and a kronfluence ``Task`` as deltainf's
query measurement.

A kronfluence factor folder (``<output_dir>/<analysis>/factors_<name>/``, strategy ``"ekfac"``) holds one
safetensors file per factor, each a ``{module name: tensor}`` map over the tracked modules (named as in the
user's ``model.named_modules()``): the eigenvectors (columns) and eigenvalues of the activation and
pseudo-gradient covariances, the Lambda sums with their example count, the covariance sums with theirs, and
``factor_arguments.json``. The maths are deltainf's (same bias column, same convolution patch order, same
eigenbasis convention), so factors cross without any change of meaning:

* :func:`read_factors` turns such a folder into a fitted :class:`deltainf.EKFAC` for the same model;
* :func:`write_factors` writes a fitted EKFAC as a folder that ``kronfluence.analyzer.Analyzer`` loads by its
  factors name (``compute_pairwise_scores(..., factors_name=name)``);
* :func:`task_measurement` and :func:`task_loss` make a kronfluence ``Task``'s ``compute_measurement`` and
  ``compute_train_loss`` deltainf's measurement and training loss: ``EKFAC(model, measurement=task_measurement(t),
  loss=task_loss(t))``.

kronfluence itself is needed only by :func:`write_factors` (for its argument file) and by the Task's own code.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Union

import torch
from torch import nn

from deltainf._files import read_tensors, write_json, write_tensors
from deltainf.influence._layers import model_fingerprint, modules_by_name
from deltainf.influence.ekfac import EKFAC, LayerFactors

__all__ = ["read_factors", "write_factors", "task_measurement", "task_loss"]

_EIGEN = ("activation_eigenvectors", "activation_eigenvalues", "gradient_eigenvectors", "gradient_eigenvalues")
_LAMBDA = ("lambda_matrix", "num_lambda_processed")
_COVARIANCE = ("activation_covariance", "gradient_covariance", "num_activation_covariance_processed",
               "num_gradient_covariance_processed")
_ARGUMENTS = "factor_arguments.json"


# metadata of lambda_matrix.safetensors in a folder deltainf writes: the fitted weights' model_fingerprint
# (kronfluence ignores it; its own folders carry nothing that names the weights)
_FINGERPRINT = "deltainf_fingerprint"


def _load(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = folder / f"{name}.safetensors"
    if not path.is_file():
        raise ValueError(f"folder {str(folder)!r}: no {path.name} (a kronfluence EK-FAC factor folder has "
                         f"{', '.join(n + '.safetensors' for n in _EIGEN + _LAMBDA)})")
    return read_tensors(path, "kronfluence factor file")  # a damaged file: ValueError naming it


def _model_order(model: nn.Module) -> dict[str, int]:
    """Each module's place in ``model``, by the names layers are known by: the order read_factors fits in and
    write_factors' fingerprint hashes the layers in (a folder's files list them alphabetically)."""
    return {name: i for i, name in enumerate(modules_by_name(model))}


def _warn_padding(ekfac: EKFAC, stacklevel: int) -> None:
    """Warn when a tracked convolution pads with something other than zeros: kronfluence builds its patches with
    zero padding, so its factors and scores of that layer are of other patches than deltainf's (11-39 % apart for
    reflect padding in a probe; deltainf's match autograd's per-example gradients)."""
    def pads(module) -> bool:
        return module.padding == "same" or (isinstance(module.padding, tuple) and any(p > 0 for p in module.padding))

    padded = {info.name: module.padding_mode for info, module in ekfac._layers
              if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros" and pads(module)}
    if padded:
        warnings.warn(f"layers {sorted(padded)} pad with {sorted(set(padded.values()))}, kronfluence with zeros: its "
                      "factors and scores of these layers differ from deltainf's (which match autograd's gradients)",
                      stacklevel=stacklevel)


def read_factors(folder: str | os.PathLike, model: nn.Module, *, damping: Union[float, str, None] = 1e-8,
                 measurement: Union[str, Callable] = "margin", strict: bool = True, **options) -> EKFAC:
    """A fitted :class:`deltainf.EKFAC` from a kronfluence EK-FAC factor folder fitted on ``model``.

    The tracked modules are those of the folder; ``fisher`` follows its ``use_empirical_fisher``; Lambda is
    its sum divided by its example count (as kronfluence does before scoring). ``damping``, ``measurement``
    and the keyword ``options`` are EKFAC's (kronfluence's default damping is 1e-8 too). The folder does not hold
    the Task: for one whose training loss or measurement is not the cross-entropy and the margin (label smoothing,
    a regression head), pass ``loss=task_loss(task), measurement=task_measurement(task)`` for kronfluence's scores
    (without them a label-smoothed Task's scores correlated 0.84-0.93 with kronfluence's). A folder that is not
    an EK-FAC folder, or whose shapes do not fit ``model``'s modules, is a ValueError naming it. A folder written
    by :func:`write_factors` records the weights it was fitted on: other weights in ``model`` are a ValueError
    (with ``strict=False`` a warning); kronfluence's own folders record none, so that is the caller's to know.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected the torch nn.Module the factors were fitted on, got {type(model).__name__}")
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r}: not a folder (expected a kronfluence factors_<name> folder)")
    args = {}
    if (folder / _ARGUMENTS).is_file():
        try:
            args = json.loads((folder / _ARGUMENTS).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"folder {str(folder)!r}: {_ARGUMENTS} is not readable JSON ({err})") from None
        if not isinstance(args, dict):
            raise ValueError(f"folder {str(folder)!r}: {_ARGUMENTS} holds a {type(args).__name__}, not kronfluence's "
                             "FactorArguments (a JSON object)")
        if args.get("strategy", "ekfac") != "ekfac":
            raise ValueError(f"folder {str(folder)!r}: factors of strategy {args['strategy']!r}; deltainf reads "
                             "EK-FAC factors (FactorArguments(strategy='ekfac'))")
    read = {name: _load(folder, name) for name in _EIGEN + _LAMBDA}
    files = {name: tensors for name, (tensors, _) in read.items()}
    fitted_on = read["lambda_matrix"][1].get(_FINGERPRINT)
    names = list(files["lambda_matrix"])
    if not names:
        raise ValueError(f"folder {str(folder)!r}: lambda_matrix.safetensors tracks no module")
    for name, tensors in files.items():
        if set(tensors) != set(names):
            raise ValueError(f"folder {str(folder)!r}: {name}.safetensors covers modules {sorted(tensors)}, "
                             f"lambda_matrix.safetensors {sorted(names)}")
    order = _model_order(model)
    missing = [n for n in names if n not in order]
    names.sort(key=lambda name: order.get(name, len(order)))  # the model's order (the files' is alphabetical)
    fisher = "empirical" if args.get("use_empirical_fisher", False) else "true"
    options.setdefault("fisher", fisher)
    if missing:
        raise ValueError(f"model: does not have the modules of the factors in {str(folder)!r} (no module named "
                         f"{missing[:3]})")
    try:
        ekfac = EKFAC(model, modules=names, damping=damping, measurement=measurement, **options)
    except (ValueError, TypeError) as err:
        if str(err).startswith("modules"):  # a module of that name the engine cannot track
            raise ValueError(f"model: does not have the modules of the factors in {str(folder)!r} ({err})") from None
        raise  # an option's own error names the option
    device = next(model.parameters()).device
    factors = {}
    for info, _ in ekfac._layers:
        t = {k: files[k][info.name].to(device, torch.float64) for k in _EIGEN + _LAMBDA}
        D, d_out = info.d_in_aug, info.d_out
        want = {"activation_eigenvectors": (D, D), "activation_eigenvalues": (D,), "gradient_eigenvectors":
                (d_out, d_out), "gradient_eigenvalues": (d_out,), "lambda_matrix": (d_out, D)}
        for key, shape in want.items():
            if tuple(t[key].shape) != shape:
                raise ValueError(f"folder {str(folder)!r}: {key}[{info.name!r}] has shape {tuple(t[key].shape)}, but "
                                 f"the model's module {info.name!r} needs {shape}")
        n = int(files["num_lambda_processed"][info.name].flatten()[0])
        if n < 1 or not bool(torch.isfinite(t["lambda_matrix"]).all()):
            raise ValueError(f"folder {str(folder)!r}: module {info.name!r} has {n} Lambda examples or non-finite "
                             "Lambda values")
        bad = [k for k in _EIGEN if not bool(torch.isfinite(t[k]).all())]
        if bad or bool((t["lambda_matrix"] < 0).any()):  # NaN scores, or Lambda no mean of squares can give
            raise ValueError(f"folder {str(folder)!r}: module {info.name!r} has non-finite {bad} or negative Lambda "
                             "values, which no fit produces")
        factors[info.name] = LayerFactors(info, t["activation_eigenvalues"], t["activation_eigenvectors"],
                                          t["gradient_eigenvalues"], t["gradient_eigenvectors"],
                                          t["lambda_matrix"] / n, D, d_out, n)
    ekfac.factors = factors
    ekfac._fit_examples = next(iter(factors.values())).examples
    ekfac._fitted_weights = model_fingerprint(ekfac._layers, ekfac.model)  # kronfluence fitted them on the model as it is
    _warn_padding(ekfac, stacklevel=3)
    if fitted_on is not None and fitted_on != ekfac._fitted_weights:
        msg = (f"model: its weights differ from those the factors in {str(folder)!r} were fitted on (the tracked "
               "layers', or the rest: a batch norm's statistics, a frozen backbone); refit, or pass strict=False to "
               "use them anyway")
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    return ekfac


def write_factors(ekfac: EKFAC, folder: str | os.PathLike) -> Path:
    """Write a fitted EKFAC as a kronfluence EK-FAC factor folder (created; its files replaced atomically).

    Load it in kronfluence with ``Analyzer(analysis_name=A, output_dir=O, ...)`` and ``factors_name=F`` for
    ``folder = O/A/factors_F``. Factors eigendecomposed in the span of their rows (``low_rank=True`` with fewer
    rows than the factor's dimension) have no full eigenbasis for kronfluence: refit with ``low_rank=False``.
    Tensors are written in float64 (kronfluence casts them to its preconditioning dtype when it scores).
    The folder covers the modules ``ekfac`` tracks (``ekfac.layer_names``); kronfluence looks for the factors of
    every module its task tracks, so a fit of some modules (``modules=``) needs a task whose
    ``get_influence_tracked_modules()`` returns those names (else kronfluence stops at the first one missing).
    Returns the folder.
    """
    from kronfluence.arguments import FactorArguments

    if not isinstance(ekfac, EKFAC):
        raise TypeError(f"ekfac: expected a fitted deltainf.EKFAC, got {type(ekfac).__name__}")
    ekfac._require_fit()
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r}: a file, where the factors are written as a folder of files")
    others = [info.name for info, m in ekfac._layers
              if info.kind not in ("linear", "conv2d") or getattr(m, "groups", 1) > 1]
    if others:
        raise ValueError(f"ekfac: it tracks {others} (nn.Embedding, nn.Conv1d or grouped convolutions), and kronfluence "
                         "tracks only nn.Linear and ungrouped nn.Conv2d modules (its scores would have no factors for "
                         "them): fit with modules=[...] naming the others")
    truncated = [name for name, f in ekfac.factors.items() if f.truncated]
    if truncated:
        raise ValueError(f"ekfac: the factors of {truncated} were eigendecomposed in the span of their rows "
                         "(low_rank=True); kronfluence needs full eigenbases: fit with EKFAC(..., low_rank=False)")
    if ekfac.weights_changed:
        warnings.warn("ekfac: the model's weights changed since the fit; the folder holds the factors of the weights "
                      "they were fitted on, not of the current ones (refit first)", stacklevel=2)
    _warn_padding(ekfac, stacklevel=3)
    if ekfac._batch_axes:
        warnings.warn(f"ekfac: layers {sorted(ekfac._batch_axes)} take sequence-first (T, B, ...) inputs; kronfluence "
                      "reads every layer's inputs batch-first, so its own scores of these layers will treat positions "
                      "as examples (deltainf's scores of the same factors do not)", stacklevel=2)
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in _EIGEN + _LAMBDA + _COVARIANCE}
    for name, f in ekfac.factors.items():
        cpu = {k: getattr(f, k).detach().to("cpu", torch.float64) for k in ("evals_A", "Q_A", "evals_S", "Q_S", "lam")}
        out["activation_eigenvectors"][name] = cpu["Q_A"]
        out["activation_eigenvalues"][name] = cpu["evals_A"]
        out["gradient_eigenvectors"][name] = cpu["Q_S"]
        out["gradient_eigenvalues"][name] = cpu["evals_S"]
        out["lambda_matrix"][name] = cpu["lam"] * f.examples  # kronfluence stores the sum and its count
        out["num_lambda_processed"][name] = torch.tensor([f.examples], dtype=torch.int64)
        # the covariances, rebuilt from their eigenpairs (kronfluence keeps them beside; EK-FAC scoring does
        # not read them): sums over the rows that built them, with that count
        for side, (Q, e, rows) in {"activation": (cpu["Q_A"], cpu["evals_A"], f.rows_A),
                                   "gradient": (cpu["Q_S"], cpu["evals_S"], f.rows_S)}.items():
            out[f"{side}_covariance"][name] = (Q * e) @ Q.T * rows
            out[f"num_{side}_covariance_processed"][name] = torch.tensor([rows], dtype=torch.int64)
    folder.mkdir(parents=True, exist_ok=True)
    # the weights' fingerprint over the layers in the model's order, as read_factors takes them (None when they
    # changed since the fit, said above)
    order = _model_order(ekfac.model)
    layers = sorted(ekfac._layers, key=lambda layer: order[layer[0].name])
    fitted = None if ekfac.weights_changed else model_fingerprint(layers, ekfac.model)
    for key, tensors in out.items():  # kronfluence ignores the content digest write_tensors adds, and the fingerprint
        meta = {_FINGERPRINT: fitted} if key == "lambda_matrix" and fitted else None
        write_tensors(folder / f"{key}.safetensors", {k: v.contiguous() for k, v in tensors.items()}, meta)
    args = FactorArguments(strategy="ekfac", use_empirical_fisher=ekfac.config.fisher == "empirical")
    write_json(folder / _ARGUMENTS, args.to_dict(), indent=4)
    return folder


def task_measurement(task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """deltainf's measurement ``(logits (B, C), labels (B,)) -> (B,)`` from a kronfluence ``Task``: the Task's
    ``compute_measurement((logits_i, y_i), model)`` per query, with ``model`` the identity on the logits, so a
    Task that measures ``model(inputs)`` (as kronfluence Tasks do) gives the same numbers through deltainf:
    ``EKFAC(model, measurement=task_measurement(task))``."""
    if not callable(getattr(task, "compute_measurement", None)):
        raise TypeError(f"task: expected a kronfluence Task with compute_measurement(batch, model), got "
                        f"{type(task).__name__}")
    identity = nn.Identity()

    def measurement(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([task.compute_measurement((logits[i:i + 1], y[i:i + 1]), identity).reshape(())
                            for i in range(logits.shape[0])])

    return measurement


def task_loss(task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """deltainf's training loss ``(logits (B, C), labels (B,)) -> summed loss`` from a kronfluence ``Task``: its
    ``compute_train_loss((logits, labels), model, sample=False)`` with ``model`` the identity on the logits. The
    labels are the dataset's, or under ``fisher="true"`` the ones deltainf draws (so the Task is not asked to
    sample). Like kronfluence, deltainf needs the loss summed (not averaged) over the batch."""
    if not callable(getattr(task, "compute_train_loss", None)):
        raise TypeError(f"task: expected a kronfluence Task with compute_train_loss(batch, model, sample), got "
                        f"{type(task).__name__}")
    identity = nn.Identity()

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task.compute_train_loss((logits, y), identity, sample=False)

    return loss
