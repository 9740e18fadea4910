"""EK-FAC influence (George et al. 2018; Grosse et al. 2023), kronfluence-compatible maths.

For each tracked layer (nn.Linear / nn.Conv2d / nn.Conv1d / nn.Embedding, the last as the linear layer of one-hot
token rows)
with per-example weight gradient G_i (d_out x d_in, bias as an extra input column of ones):

  A = mean over tokens of a a^T,  S = mean over tokens of g g^T          (covariance pass)
  A = Q_A diag(.) Q_A^T,  S = Q_S diag(.) Q_S^T  in float64               (eigendecomposition)
  Lambda = mean over examples of (Q_S^T G_i Q_A)^2                        (eigenvalue-correction pass)
  H^-1 v = Q_S [(Q_S^T v Q_A) / (Lambda + damping)] Q_A^T
  score(q, i) = sum over layers <H^-1 grad m(z_q), grad L(z_i)>            (one pass for all queries)

The Fisher passes use the dataset labels (empirical Fisher, default) or labels sampled from the
model's softmax (true Fisher); the training-side gradient of the score pass uses the dataset labels.
Losses are summed over the batch, so the output gradient captured for example i is example i's own.
A positive score means a gradient step on z_i lowers m(z_q); with the default measurement
m = -(z_y - logsumexp_{c != y} z_c) that is "z_i supports predicting y for the query".
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from deltainf import _dist, ops
from deltainf._extension import denormals_flushed
from deltainf._files import (commit, discard, file_error, hold, output_file, output_folder, read_tensors,
                             remove_stale_temps, require_digest, temp_beside, tensor_digest, write_tensors)
from deltainf._util import (as_int, check_bool, checked_forward, keeps_global_rng, model_dtype, plain_number,
                            progress_bar, refuse_probabilities, restore_modes, to_model, training_modes, unwrapped)
from deltainf.influence import _contract as contract
from deltainf.data.loaders import (REPLACEMENT, batches_of, check_carried_positions, check_loader, drops_last,
                                    first_batch_repeats, in_dataset_order, items_repeat, positioned_batches,
                                    unpack_batch)
from deltainf.influence._batches import check_labels, resolve_measurement, sample_fisher_labels
from deltainf.influence._layers import (CONVOLUTIONS, NOT_CALLED, NOT_ITS_GRADIENT, NOT_PER_EXAMPLE, OTHER_DTYPE,
                                       Capture, LayerBatch, LayerInfo, ModuleCoverage, model_fingerprint,
                                       grouped, module_coverage, modules_by_name, resolve_layers)
from deltainf.influence._linalg import CovAccumulator, TokenCounts, truncated_svd
from deltainf.influence._partitions import DEFAULT_PARTITION_SIZE, PartitionStore, folder_lock, run_partitioned

__all__ = ["EKFAC", "EKFACConfig", "LayerFactors"]

FORMAT = "deltainf-ekfac/1"
HEURISTIC_DAMPING_SCALE = 0.1  # Grosse et al. 2023; kronfluence's damping_factor=None
_SCORE_PATHS = ("auto", "kernel", "dense")
_EIGEN_DTYPES = {"float64": torch.float64, "float32": torch.float32}
# float64 results of the query preconditioning held at once: each block is cast to the pass dtype as it is done
PRECONDITION_BYTES = 128 * 2 ** 20


# Eigenvalues at most this fraction of a layer's largest are round-off of directions without data (float64's
# epsilon is 2.2e-16): inverting them undamped gives scores of any size
_ROUND_OFF = 1e-13
# Rows of the fixed logits a custom loss or measurement is fingerprinted on for a run's key: one per class up to it
_KEY_ROWS = 1024


@dataclass(frozen=True)
class EKFACConfig:
    """Settings of an :class:`EKFAC` run (validated on construction).

    damping: absolute damping added to Lambda (kronfluence's default 1e-8), or None /
        "heuristic" for 0.1 x mean(Lambda) per layer (mean over the full d_out x d_in grid).
    fisher: "empirical" (dataset labels; the default: Δ-Influence measured clearly better with it than
        with the true Fisher, see docs/RESULTS.md) or "true" (labels sampled from the model's softmax,
        the paper's kronfluence setting).
    measurement: "margin" (negative margin), "ce" (cross-entropy) or a callable
        (logits (B, C), labels (B,)) -> (B,) per-example measurement.
    seed: seed of the true-Fisher label draws (label of example i = f(seed, i)).
    low_rank: eigendecompose a factor inside the span of its rows when it has fewer rows than its
        dimension (exact for the scores of examples that built it; see _linalg).
    score_path: "auto" (cheapest exact route per layer), "kernel" (eigenbasis form through
        ``ops.kron_project_score``) or "dense" (preconditioned gradient in parameter basis).
    query_batch_size: queries per forward/backward when preconditioning.
    query_chunk: queries scored per pass over the training set; None: all in one pass unless their
        preconditioned gradients would take more than a quarter of the memory (:meth:`EKFAC.query_chunk`).
        Every chunk costs one more pass, the scores are the same.
    eigen_dtype: "float64" (default) or "float32", the precision of the eigendecompositions (the factors are
        kept in float64 either way); float32 is faster on large layers, at the cost measured in
        benchmarks/RESULTS.md ("the speed / accuracy frontier"). Its eigenvectors are exact to about 1e-7 of a
        factor's largest eigenvalue: with a damping far below that (the default 1e-8 on inputs whose scales span
        1e-6..1) scores move by percents (2-14 % on a probe's small MLP, rank order kept to Spearman 0.99); keep
        float64 there, or use the heuristic damping (4e-6 apart on the same MLP).
    query_rank: None (default: exact) or k >= 1: on the layers where it makes the score pass cheaper, each
        preconditioned query gradient is replaced by its best rank-k approximation (a randomized SVD seeded with
        ``seed``; kronfluence's ``query_gradient_low_rank``) and scored from the tokens' projections on its
        factors, never forming per-example gradients (wide layers with few positions per example: ResNet-18's
        last block at k = 8); those layers' queries then take k (d_out + d_in) numbers instead of d_out d_in,
        so many more queries fit in one pass. The other layers stay exact. An approximation: its speed and its
        effect on detection are measured in benchmarks/RESULTS.md ("the speed / accuracy frontier"). Which layers
        it approximates depends on how many queries are scored together (and on the training set's size), so a
        query's scores can differ between calls of other sizes (by 0.1-0.25 at rank 1 in a probe): score the
        queries to be compared in one call. Used with ``score_path="auto"`` only (the other paths are exact).
    progress: tqdm progress bars.
    loss: the training loss whose per-example gradients the passes use: "ce" (cross-entropy summed over the
        batch) or a callable (logits (B, C), labels (B,)) -> scalar that is a SUM of per-example terms (each
        example's gradient is then its own), e.g. a kronfluence Task's through
        ``deltainf.integrations.kronfluence.task_loss``.
    """

    damping: Union[float, str, None] = 1e-8
    fisher: str = "empirical"
    measurement: Union[str, Callable] = "margin"
    seed: int = 0
    low_rank: bool = True
    score_path: str = "auto"
    query_batch_size: int = 64
    query_chunk: int | None = None
    eigen_dtype: str = "float64"
    query_rank: int | None = None
    progress: bool = True
    loss: Union[str, Callable] = "ce"

    def __post_init__(self):
        for name in ("seed", "query_batch_size", "query_chunk", "query_rank"):  # np.int64(64) is an int like 64
            object.__setattr__(self, name, plain_number(getattr(self, name)))
        d = plain_number(self.damping)  # a numpy float32 compared with the largest float overflowed, with a warning
        if isinstance(d, str):
            if d != "heuristic":
                raise ValueError(f"damping: expected a float >= 0, None or 'heuristic', got {d!r}")
            object.__setattr__(self, "damping", None)
        elif d is not None:
            if isinstance(d, bool) or not isinstance(d, (int, float, np.integer, np.floating)) \
                    or not d <= sys.float_info.max or not math.isfinite(d) or d < 0:  # 10**400 overflowed float()
                raise ValueError(f"damping: expected a finite float >= 0, None or 'heuristic', got {d!r}")
            object.__setattr__(self, "damping", float(d))
        if self.fisher not in ("true", "empirical"):
            raise ValueError(f"fisher: expected 'true' or 'empirical', got {self.fisher!r}")
        if not isinstance(self.low_rank, (bool, np.bool_)):
            raise ValueError(f"low_rank: expected a bool, got {self.low_rank!r}")
        check_bool("progress", self.progress)
        resolve_measurement(self.measurement)
        if self.loss != "ce" and not callable(self.loss):
            raise ValueError(f"loss: expected 'ce' or a callable (logits, labels) -> summed loss, got {self.loss!r}")
        seed = as_int(self.seed)  # a numpy or 0-d tensor int too
        if seed is None or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed: expected an int in [0, 2**63), got {self.seed!r}")
        object.__setattr__(self, "seed", seed)
        if self.score_path not in _SCORE_PATHS:
            raise ValueError(f"score_path: expected one of {_SCORE_PATHS}, got {self.score_path!r}")
        if isinstance(self.query_batch_size, bool) or not isinstance(self.query_batch_size, int) \
                or self.query_batch_size < 1:
            raise ValueError(f"query_batch_size: expected an int >= 1, got {self.query_batch_size!r}")
        if self.query_chunk is not None and (isinstance(self.query_chunk, bool) or not isinstance(self.query_chunk, int)
                                             or self.query_chunk < 1):
            raise ValueError(f"query_chunk: expected an int >= 1 or None, got {self.query_chunk!r}")
        if self.query_rank is not None and (isinstance(self.query_rank, bool) or not isinstance(self.query_rank, int)
                                            or self.query_rank < 1):
            raise ValueError(f"query_rank: expected an int >= 1 or None, got {self.query_rank!r}")
        if self.eigen_dtype not in _EIGEN_DTYPES:
            raise ValueError(f"eigen_dtype: expected one of {tuple(_EIGEN_DTYPES)}, got {self.eigen_dtype!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["measurement"] = self.measurement if isinstance(self.measurement, str) else "custom"
        d["loss"] = self.loss if isinstance(self.loss, str) else "custom"
        return d


@dataclass
class LayerFactors:
    """Fitted factors of one layer (float64, on the model's device).

    evals_A (r_in,), Q_A (d_in_aug, r_in), evals_S (r_out,), Q_S (d_out, r_out),
    lam (r_out, r_in) = Lambda. r = d unless the factor was eigendecomposed in its row span. Q_A None: the identity
    (an embedding's input factor, diagonal: evals_A are its token counts / tokens, in token order).
    """

    info: LayerInfo
    evals_A: torch.Tensor
    Q_A: torch.Tensor | None
    evals_S: torch.Tensor
    Q_S: torch.Tensor
    lam: torch.Tensor
    rows_A: int
    rows_S: int
    examples: int
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def truncated(self) -> bool:
        return (self.Q_A is not None and self.Q_A.shape[1] < self.Q_A.shape[0]) or self.Q_S.shape[1] < self.Q_S.shape[0]

    def damping(self, damping: float | None) -> float:
        if damping is not None:
            return damping
        # mean over the full grid: truncated directions have Lambda = 0 in the untruncated method
        return HEURISTIC_DAMPING_SCALE * float(self.lam.sum()) / (self.info.d_out * self.info.d_in_aug)

    def cast(self, dtype: torch.dtype):
        """(Q_S, Q_A) as operands of the passes in ``dtype`` (cached; :func:`_contract.pass_operand`)."""
        key = ("bases", dtype)
        if key not in self._cache:
            self._cache[key] = (contract.pass_operand(self.Q_S, dtype),
                                None if self.Q_A is None else contract.pass_operand(self.Q_A, dtype))
        return self._cache[key]


def _one_run_per_folder(method):
    """``method`` (fit, score) holds the checkpoint folder for the whole call (:func:`folder_lock`): another run
    in the same folder fails at once with an error naming ``checkpoint_dir``, instead of meeting this one's
    partitions halfway."""
    @functools.wraps(method)
    @keeps_global_rng
    def holding(self, *args, **kwargs):
        rank, world = _dist.group(self._device_dtype()[0])
        # before the lock's exchange: a folder on some ranks only paired that exchange with the others' next one
        # (an AttributeError on one rank, a ValueError on another)
        _dist.agree({"checkpoint_dir": self.checkpoint_dir is not None}, world,
                    "every rank must pass a checkpoint_dir, or none")
        if self.checkpoint_dir is None:
            return method(self, *args, **kwargs)
        with folder_lock(self.checkpoint_dir, rank, world):
            self._earlier_runs = PartitionStore.keys_in(self.checkpoint_dir)  # what runs stopped before left
            try:
                return method(self, *args, **kwargs)
            finally:
                self._earlier_runs = set()
    return holding


class EKFAC:
    """EK-FAC influence scores for a classifier, kronfluence-compatible.

    Args:
        model: nn.Module mapping inputs (B, ...) to logits (B, C). Passes run in eval mode and in the
            model's parameter dtype (float32 by default); eigendecompositions in float64 (``eigen_dtype``).
        modules: names (as in ``model.named_modules()``) of the nn.Linear / nn.Conv2d / nn.Conv1d / nn.Embedding
            layers to track, or None for all of them.
        damping, fisher, measurement: see :class:`EKFACConfig`; further keyword options too
            (seed, low_rank, score_path, query_batch_size, query_chunk, eigen_dtype, query_rank, progress,
            loss).
        checkpoint_dir: a folder where the fit and score passes keep every finished partition of the data
            (and each layer's eigendecomposition), so that a killed ``fit`` or ``score`` rerun with the same
            model, settings and data resumes where it stopped, with the same result bit for bit. A partition
            computed on other data is refused (ValueError naming the folder), never mixed in; a pass that
            completes removes its files. A folder serves one run at a time: a ``fit`` or ``score`` started while
            another process's holds it fails at once (ValueError naming ``checkpoint_dir``); under torchrun
            each rank holds its own lock, so the ranks of one run may share the folder.
        partition_size: examples per partition of the data passes (the unit of resuming and of the work
            shared between torchrun ranks). Results do not depend on the number of ranks; the factors' sums
            depend on the partition size at float64 round-off, when there are several partitions, and where a
            factor has (nearly) equal eigenvalues that round-off can turn its eigenvectors within them, which
            moves scores by more (1e-4 relative on digits, 4096 against 300 examples; the flagged set the same).
            Keep one partition size for results to be compared.

    Use: ``EKFAC(model).fit(train_loader)``, then ``.score(query_x, query_y, train_loader) -> (Q, N)``.
    Training loaders yield (x, y) or (x, y, index); scores are indexed by dataset position.

    Under ``torchrun --nproc-per-node K`` (gloo on the CPU, NCCL on GPUs) the same code shares the passes
    between the ranks: every rank builds the same loader, runs the model on its own partitions only, and
    ends with the same factors and the same (Q, N) scores; the eigendecompositions are split by layer.
    """

    def __init__(self, model: nn.Module, modules: str | Sequence[str] | None = None,
                 damping: Union[float, str, None] = 1e-8, fisher: str = "empirical",
                 measurement: Union[str, Callable] = "margin", *, checkpoint_dir: str | os.PathLike | None = None,
                 partition_size: int = DEFAULT_PARTITION_SIZE, **options):
        unknown = set(options) - {"seed", "low_rank", "score_path", "query_batch_size", "query_chunk",
                                  "eigen_dtype", "query_rank", "progress", "loss"}
        if unknown:
            raise TypeError(f"EKFAC: unexpected keyword arguments {sorted(unknown)}")
        self.config = EKFACConfig(damping=damping, fisher=fisher, measurement=measurement, **options)
        partition_size = plain_number(partition_size)
        if isinstance(partition_size, bool) or not isinstance(partition_size, int) or partition_size < 1:
            raise ValueError(f"partition_size: expected an int >= 1 (examples per partition), got {partition_size!r}")
        if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir: expected a folder path or None, got {type(checkpoint_dir).__name__}")
        if checkpoint_dir is not None:
            output_folder(checkpoint_dir, "checkpoint_dir")
        self.partition_size = partition_size
        self.checkpoint_dir = checkpoint_dir
        self.model = unwrapped(model)
        if isinstance(self.model, nn.Module) and any(t.is_meta for t in
                                                     (*self.model.parameters(), *self.model.buffers())):
            # built without memory (device="meta"): fit failed deep in its first forward pass
            raise ValueError("model: its parameters are on the meta device (built without memory); load real "
                             "weights first (model.to_empty(device=...), then load_state_dict)")
        self._modules = modules
        self._select_layers()
        if modules is None and self.coverage.skipped:
            # Influence through untracked parameters (BatchNorm, LayerNorm, embeddings, grouped convs) is
            # left out of every score; say so once, the full list is in .coverage.table().
            warnings.warn(self.coverage.brief() + " (see EKFAC.coverage.table())", stacklevel=2)
        self.factors: dict[str, LayerFactors] | None = None
        self._earlier_runs: set[str] = set()  # checkpoint keys of stopped runs in checkpoint_dir, while fit/score run
        self._digest: tuple | None = None  # (the factors it was computed for, their SHA-256): _factors_digest
        self._fitted_weights: str | None = None  # model_fingerprint of the weights the factors belong to
        self._fit_examples = 0
        # wall seconds of the last fit's stages, and of the last scoring call's ("queries", "score_pass")
        self.timings: dict[str, float] = {}
        self.score_passes = 0  # training-set passes the last scoring call made (one per chunk of queries)

    # ------------------------------------------------------------------ basics
    def _select_layers(self) -> None:
        """The layers to track among the model's modules as they are now (``modules`` of the constructor)."""
        self._layers = resolve_layers(self.model, self._modules)
        # with the default choice, fit() leaves out the layers it cannot see per example (_keep_layers_seen_per_example)
        self._trackable = self._layers if self._modules is None else None
        self._batch_axes: dict[str, int] = {}  # layers whose examples lie along their inputs' second dimension
        self._axes_found = False  # by _probe_layers (fit, or the first queries of factors read from elsewhere)
        self.coverage: ModuleCoverage = module_coverage(self.model, self._layers)

    def _check_layers_in_place(self) -> None:
        """ValueError when a tracked layer is no longer the model's module of its name (replaced since the fit), or
        the tracked layers now hold several dtypes (some converted since the factors were fitted or loaded)."""
        now = modules_by_name(self.model)
        for info, m in self._layers:
            if now.get(info.name) is not m:
                raise ValueError(f"model: its layer {info.name!r} was replaced (or removed) since the factors were "
                                 "fitted; refit for the model as it is")
        _check_one_dtype(self._layers)

    @property
    def layer_names(self) -> list[str]:
        return [info.name for info, _ in self._layers]

    def _device_dtype(self):
        # the tracked layers' dtype, which the inputs are cast to (a model's first parameter may be another: a float64
        # temperature cast float32 data to float64 for float32 layers; the probe and the score check they share one);
        # before the probe has chosen them, the dtype most of the model's layers hold; an embedding's only when no
        # other layer is tracked (token ids are not cast, and a bfloat16 table may sit before float32 layers)
        layers = sorted(self._layers, key=lambda layer: layer[0].kind == "embedding")
        first = next((t for _, m in layers for t in m.parameters(recurse=False)), None)
        p = first if first is not None else next(self.model.parameters())
        chosen = self._axes_found or self._trackable is None
        dtype = p.dtype if chosen else model_dtype(self.model) or p.dtype
        if p.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            raise TypeError(f"model: its parameters are {str(dtype).removeprefix('torch.')} on the CPU, where EK-FAC's "
                            "kernels take float32 or float64 (half precision needs a GPU); pass model.float()")
        return p.device, dtype

    def _bar(self, it, desc, total=None):
        if total is None:
            try:
                total = len(it)
            except TypeError:
                total = None
        return progress_bar(it, self.config.progress, desc=desc, total=total, leave=False)

    @property
    def weights_changed(self) -> bool:
        """Whether the model's weights (its parameters and buffers) differ from those the factors were fitted on (or
        loaded for): the model was trained further, or unlearned in place, since. Scores then use the curvature of the earlier
        weights; refit for the current ones."""
        return self._changed_from(model_fingerprint(self._layers, self.model))

    def _changed_from(self, weights: str) -> bool:
        """:attr:`weights_changed` for the model's current ``weights`` (their :func:`model_fingerprint`)."""
        return self.factors is not None and self._fitted_weights != weights

    def _require_fit(self, what: str = "scoring"):
        if self.factors is None:
            raise RuntimeError(f"EKFAC: call .fit(train_loader) or EKFAC.load(path, model) before {what}")
        device = next(self.model.parameters()).device
        for f in self.factors.values():  # the model moved to another device since the fit (or the load)
            if f.Q_S.device != device:
                for key in _FACTOR_KEYS:
                    if getattr(f, key) is not None:
                        setattr(f, key, getattr(f, key).to(device))
                f._cache.clear()

    # ------------------------------------------------------------------ passes
    def _iterate(self, loader, where: str, desc: str):
        """Yield (x, y, dataset positions (B,) int64 cpu, stream position of the batch's first example)."""
        yield from positioned_batches(loader, where, show=lambda it: self._bar(it, desc))

    def _layer_batches(self, x, y, idx, labels: str, where: str) -> list[LayerBatch]:
        """The tracked layers' inputs and output gradients for one batch: one forward and one backward to the
        layer outputs, with the dataset labels (labels="data") or true-Fisher draws ("sampled"). The model
        must be in eval mode (see :meth:`_passes`)."""
        device, dtype = self._device_dtype()
        x = to_model(x, device, dtype)
        y = y.to(device)
        with torch.enable_grad():
            with Capture(self._layers, self._batch_axes) as cap:
                logits = checked_forward(self.model, x, f"the {where} batch")
            check_labels(y, logits.shape[1], where)
            target = sample_fisher_labels(logits, idx, self.config.seed) if labels == "sampled" else y
            loss = self._train_loss(logits, target, where)
            first = int(idx[0]) if idx.numel() else 0
            if not torch.isfinite(loss):
                bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1) if x.is_floating_point() else \
                    torch.zeros(0, dtype=torch.bool)
                if bool(bad.any()):
                    raise FloatingPointError(f"{where}: the input of the example at dataset position "
                                             f"{int(idx[bad.nonzero()[0, 0].cpu()])} holds NaN or infinite values")
                raise FloatingPointError(f"{where}: non-finite loss ({float(loss.detach())}) in the batch starting at "
                                         f"dataset position {first}, whose inputs are finite: the model's weights "
                                         "or its outputs overflow")
            lbs = cap.gradients(loss, x.shape[0])
        for lb in lbs:
            if not lb.finite():
                raise FloatingPointError(f"{where}: non-finite gradient at layer {lb.info.name!r} in the batch "
                                         f"starting at dataset position {first}")
        return lbs

    def _train_loss(self, logits: torch.Tensor, target: torch.Tensor, where: str) -> torch.Tensor:
        if self.config.loss == "ce":
            return F.cross_entropy(logits, target, reduction="sum")
        loss = self.config.loss(logits, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TypeError(f"loss: expected a scalar tensor (the batch's summed loss), got {shape} for {where}")
        return loss.reshape(())

    @contextlib.contextmanager
    def _passes(self):
        """The model in eval mode for the passes and the queries, and subnormal floats flushed to zero on the CPU
        (:func:`denormals_flushed`), both restored afterwards."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("EKFAC: called under torch.inference_mode(), where no gradient can be taken; call fit, "
                               "score and precondition outside it")
        modes = training_modes(self.model)
        self.model.eval()
        try:
            with denormals_flushed():
                yield
        finally:
            restore_modes(modes)

    def _pass(self, loader, desc: str, kind: str, group: tuple[int, int], store, new, work, pack, unpack, merge):
        """One partitioned pass over ``loader`` (see :mod:`._partitions`): shared between the ranks of a
        torchrun group (rank, world size), resumable from ``store``. Returns the partitions' data digests
        (with a store)."""
        rank, world = group
        with self._passes():
            return run_partitioned(self._iterate(loader, "train_loader", desc), kind=kind, size=self.partition_size,
                                   rank=rank, world=world, store=store, new=new, work=work, pack=pack, unpack=unpack,
                                   merge=merge)

    def _store(self, probe: tuple[torch.Tensor, torch.Tensor] | None, weights: str, *parts) -> PartitionStore | None:
        """The checkpoint store of a run identified by ``parts`` (with the settings and ``weights``, the model's
        :func:`model_fingerprint`), or None without a checkpoint folder. ``probe``: the logits of the loader's first
        batch, kept with every partition and compared when one is resumed (a model that behaves otherwise for the
        same state dict: a temperature attribute)."""
        if self.checkpoint_dir is None:
            return None
        key = hashlib.sha256(json.dumps([FORMAT, self._run_settings(), self.partition_size, weights, *parts],
                                        sort_keys=True, default=str).encode()).hexdigest()
        store = PartitionStore(self.checkpoint_dir, key, None if probe is None else probe[0])
        others = self._earlier_runs - {store.key}
        if others and store.key not in self._earlier_runs:
            self._earlier_runs = set()  # said once per call
            warnings.warn(f"checkpoint_dir: {str(self.checkpoint_dir)!r} holds the partitions of {len(others)} stopped "
                          "run(s) with other settings, weights, loss or data, which this run does not use (remove them "
                          "to free the space)", stacklevel=4)
        return store

    @staticmethod
    def _first_batch(loader) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The inputs and labels of ``loader``'s first batch in dataset order, as the passes read it (None for an
        empty loader)."""
        batch = next(batches_of(in_dataset_order(loader)), None)
        return None if batch is None else unpack_batch(batch, "train_loader")[:2]

    def _keep_layers_seen_per_example(self, loader) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Find the tracked layers' batch axes on the first batch of ``loader`` (:meth:`_probe_layers`). Returns that
        batch's logits and labels (None for an empty loader)."""
        check_loader(loader, "train_loader")
        first = self._first_batch(loader)
        if first is None:
            return None
        x, y = first
        logits = self._probe_layers(x, "the train_loader batch")
        self._warn_if_saturated(logits, y)
        return logits, y

    def _first_logits(self, loader) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The logits and labels of the first batch of ``loader`` (None for an empty loader)."""
        first = self._first_batch(loader)
        if first is None:
            return None
        x, y = first
        device, dtype = self._device_dtype()
        with self._passes(), torch.no_grad():
            return checked_forward(self.model, to_model(x, device, dtype), "the train_loader batch"), y

    def _callables(self, probe: tuple[torch.Tensor, torch.Tensor] | None) -> str:
        """SHA-256 of what the training loss and the measurement give on fixed logits shaped as ``probe``'s (logits,
        labels): part of a run's checkpoint key, and what the ranks of a run compare, since both may be callables
        that the settings only name as "custom" (a changed loss resumed from the old partitions: Lambda 61 % off).
        One value per row, each row labelled with another class: every class of up to 1,024 (a class weight changed
        for class 5 alone went unseen with 4 rows labelled 0..3, and in one sum over 1,000 classes), a spread of
        them beyond. Rounded to float16: the same callable gives the same digest on every device."""
        if _checked_by_the_passes(probe) is None:
            return ""
        k = probe[0].shape[1]
        rows = max(4, min(k, _KEY_ROWS))
        logits = torch.randn(rows, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(probe[0])
        y = (torch.arange(rows, device=logits.device) * k // rows) % k
        with torch.no_grad():
            loss = torch.stack([self._train_loss(logits[i:i + 1], y[i:i + 1], "the train_loader batch").reshape(())
                                for i in range(rows)])
            measured = resolve_measurement(self.config.measurement)(logits, y)
        values = {"loss": loss}
        if isinstance(measured, torch.Tensor):
            values["measurement"] = measured
        return tensor_digest({name: v.detach().to("cpu", torch.float64).to(torch.float16)
                              for name, v in values.items()})

    def _run_settings(self) -> dict:
        """The settings a pass's results depend on (those of progress bars aside): part of the checkpoint key, and
        what the ranks of a run must agree on."""
        return {k: v for k, v in self.config.to_json().items() if k != "progress"}

    def _check_summed_loss(self, probe: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """ValueError when a custom training loss is the mean of its examples' losses over the batch, not their sum
        (the factors and scores would scale with each batch's size): on the first batch, the loss times the batch
        size is the sum of the single examples' losses, and the loss itself is not. Tested that way round, the
        check holds in float16/bfloat16, whose sums differ from the batch's loss by round-off."""
        if self.config.loss == "ce" or _checked_by_the_passes(probe) is None or probe[0].shape[0] < 2:
            return
        logits, y = probe[0].detach()[:_LOSS_CHECK], probe[1][:_LOSS_CHECK].to(probe[0].device)
        b = logits.shape[0]
        with torch.no_grad():
            whole = float(self._train_loss(logits, y, "the train_loader batch"))
            parts = sum(float(self._train_loss(logits[i:i + 1], y[i:i + 1], "the train_loader batch"))
                        for i in range(b))
        if abs(whole * b - parts) < 0.1 * abs(whole - parts):
            raise ValueError(f"loss: it must be the batch's summed loss, and on the first batch it gives {whole:.6g} "
                             f"where its {b} examples' losses sum to {parts:.6g} (a mean over the batch? use "
                             "reduction='sum')")

    def _warn_if_saturated(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Warn when most examples of the first batch have a cross-entropy of exactly 0 in the model's dtype (an
        overconfident network: softmax 1 at the label): their gradients are round-off, and nothing tells the poisons
        among them apart (logits scaled 10x flagged 227 examples, half of them clean, at estimate 0.19)."""
        if self.config.loss != "ce" or _checked_by_the_passes((logits, y)) is None:
            return
        flat = int((F.cross_entropy(logits, y.to(logits.device), reduction="none") == 0).sum())
        if flat > logits.shape[0] // 2:
            warnings.warn(f"model: {flat} of the first {logits.shape[0]} training examples have a loss of exactly 0 in "
                          f"{str(logits.dtype).removeprefix('torch.')} (softmax 1 at their label: an overconfident "
                          "network); their gradients are round-off, and poisons among them cannot be told apart",
                          stacklevel=4)

    def _probe_layers(self, x: torch.Tensor, where: str) -> torch.Tensor:
        """Find along which dimension each layer's inputs hold the examples, on the batch ``x`` in the mode of the
        passes, once whole and once less its last example: the first, or for a linear layer the second (a
        sequence-first (T, B, ...) layout, as in torch's transformer layers by default; the shorter second batch
        tells the two apart even when T equals the batch size). A layer must also be called as a module
        (nn.MultiheadAttention applies its output projection through F.linear; an auxiliary head may run only in
        training). With the default layer choice the layers that fail either are left out, with a warning, and
        listed in ``coverage``; a layer named in ``modules`` that fails is an error (ValueError / RuntimeError), as
        its scores would be those of positions. Not seen per example: positions folded into the batch dimension,
        as in nn.MultiheadAttention inside an exported program. Last, on a few examples, each layer's weight gradient
        must be the sum of the per-example gradients its hooks see (:meth:`_unseen_gradients`); and a model whose
        output for an example depends on the rest of its batch is warned about. Returns the logits of ``x``."""
        named = self._trackable is None
        layers = self._layers if named else self._trackable
        device, dtype = self._device_dtype()
        x = to_model(x, device, dtype)
        axes = {info.name: {0} if info.kind in CONVOLUTIONS else {0, 1} for info, _ in layers}
        left_out: dict[str, str] = {}
        outputs = []
        for part in (x, x[:-1]) if x.shape[0] > 1 else (x,):
            with self._passes(), torch.enable_grad(), Capture(layers) as cap:
                try:
                    outputs.append(checked_forward(self.model, part, where).detach())
                    refuse_probabilities(outputs[-1], where)
                except ValueError:
                    if part is x:
                        raise
                    break  # a model that takes only its own batch size (a static export): the first probe decides
            for info, _ in layers:
                if not cap.records[info.name]:
                    left_out.setdefault(info.name, NOT_CALLED)
                axes[info.name] = {a for a in axes[info.name] if cap.batch_dims(info.name, a) == {part.shape[0]}}
        for name, found in axes.items():
            if not found:
                left_out.setdefault(name, NOT_PER_EXAMPLE)
        if len(outputs) == 2:
            def again():
                with self._passes(), torch.no_grad():
                    return checked_forward(self.model, x[:-1], where)

            _warn_if_batch_mixes(outputs[0][:-1], outputs[1], again)
        seen = [(info, m) for info, m in layers if info.name not in left_out]
        found_axes = {info.name: min(axes[info.name]) for info, _ in seen if min(axes[info.name]) != 0}
        # on a few examples, unless the model takes only its own batch size (its shorter probe failed)
        for name in self._unseen_gradients(x[:_GRADIENT_CHECK] if len(outputs) == 2 else x, seen, found_axes, where):
            left_out.setdefault(name, NOT_ITS_GRADIENT)
        self._axes_found = True
        if not named:
            # a frozen embedding table kept in bfloat16 beside float32 layers: left out, where naming it is an error
            others = {p.dtype for info, m in layers if info.name not in left_out and info.kind != "embedding"
                      for p in m.parameters(recurse=False)}
            for info, m in layers:
                if info.kind == "embedding" and others and m.weight.dtype not in others:
                    left_out.setdefault(info.name, OTHER_DTYPE)
        _check_one_dtype([(info, m) for info, m in layers if info.name not in left_out])
        if named:
            for name, why in left_out.items():
                if why == NOT_CALLED:
                    raise RuntimeError(f"modules: tracked layer {name!r} was not called during the forward pass "
                                       "(as a module, in eval mode); leave it out of modules")
                if why == NOT_ITS_GRADIENT:
                    raise ValueError(f"modules: layer {name!r}: {why}, so its scores would not be its weight's; "
                                     "leave it out of modules")
                raise ValueError(f"modules: layer {name!r}: {why}, so its per-example gradients would be those of "
                                 "positions; leave it out of modules")
            self._batch_axes = found_axes
            return outputs[0]
        if len(left_out) == len(layers):
            reasons = "; ".join(dict.fromkeys(left_out.values()))
            raise ValueError(f"model: EK-FAC has no layer to track: every nn.Linear / nn.Conv2d / nn.Conv1d / "
                             f"nn.Embedding module is left out ({reasons})")
        was = self.layer_names
        self._layers = [(info, m) for info, m in layers if info.name not in left_out]
        self._batch_axes = {n: a for n, a in found_axes.items() if n not in left_out}
        self.coverage = module_coverage(self.model, self._layers, left_out)
        if left_out and self.layer_names != was:
            shown = "; ".join(f"{n!r}: {why}" for n, why in list(left_out.items())[:4])
            more = f"; and {len(left_out) - 4} more" if len(left_out) > 4 else ""
            warnings.warn(f"EK-FAC leaves out {len(left_out)} layer(s) it cannot score per example ({shown}{more}): "
                          f"their parameters are not in the scores. {self.coverage.brief()}", stacklevel=4)
        return outputs[0]

    def _unseen_gradients(self, x: torch.Tensor, layers, axes: dict[str, int], where: str) -> list[str]:
        """The layers whose weight gradient on the batch ``x`` (of a fixed random combination of the logits) is not
        the sum of the per-example gradients their hooks give (their inputs and output gradients): a weight shared
        by two modules or also used through a functional call gets gradient from elsewhere too, and a subclass
        whose forward transforms the weight or the output (an activation inside, weight standardisation) gives
        hooks that do not see the weight's own gradient. Their scores would be off by tens of percent, without a
        word. Layers whose weight is computed (torch's parametrizations, pruning: the gradient of the computed
        weight is what is scored) or frozen are not checked."""
        # a parametrized weight is never read here: outside eval mode reading it runs the parametrization, and
        # spectral_norm's then takes a power-iteration step that changes the user's model
        checked = [(info, m) for info, m in layers if not parametrize.is_parametrized(m, "weight")
                   and isinstance(m.weight, nn.Parameter) and m.weight.requires_grad]
        if not checked or not x.shape[0]:
            return []
        with self._passes(), torch.enable_grad():
            with Capture(checked, axes) as cap:  # the hooks end with the forward (a checkpointed block reruns it)
                logits = checked_forward(self.model, x, where)
            mix = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            loss = (logits * mix.to(logits.device, logits.dtype)).sum()
            lbs = cap.gradients(loss, x.shape[0], retain_graph=True)
            # the bias too, when it is a trainable parameter: one tied to another layer's (fc2.bias = fc1.bias) gets
            # both layers' gradients, where the hooks see this layer's alone (scores 94 % off, and no word)
            biases = [m.bias if isinstance(getattr(m, "bias", None), nn.Parameter) and m.bias.requires_grad else None
                      for _, m in checked]
            wanted = [m.weight for _, m in checked] + [b for b in biases if b is not None]
            own = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
            own_weights = [next(own) for _ in checked]
            own_biases = [None if b is None else next(own) for b in biases]
        unseen = []
        for lb, (info, m), grad, bias, bias_grad in zip(lbs, checked, own_weights, biases, own_biases):
            tolerance = _tolerance(_GRADIENT_TOLERANCE, m.weight.dtype)
            if grad is not None and grad.is_sparse:  # nn.Embedding(sparse=True)
                grad = grad.to_dense()
            if grad is not None and info.kind == "embedding":  # its weight is (V, D): the transpose of g a^T's
                grad = grad.T
            pairs = [(lb.summed_grad().double(), grad, 0.0)]
            if bias is not None:
                # a norm after the layer that removes each channel's constant (InstanceNorm, GroupNorm of one channel
                # per group) makes the bias's gradient a sum of terms that cancel: zero up to round-off both ways,
                # so the two sums are compared no closer than the round-off of their terms
                g = lb.g_cols()
                eps = torch.finfo(m.weight.dtype).eps if m.weight.dtype.is_floating_point else 0.0
                share = min(_ROUND_OFF_TERMS * eps, tolerance)  # bfloat16's: no more than the tolerance
                terms = g.abs().sum(1, dtype=torch.float64).norm()
                pairs.append((g.sum(1, dtype=torch.float64), bias_grad, share * float(terms)))
            for summed, got, round_off in pairs:
                got = torch.zeros_like(summed) if got is None else got.reshape(summed.shape).double()
                scale = max(float(got.norm()), float(summed.norm()))
                gap = float((summed - got).norm())
                if scale > 0 and gap > tolerance * scale and gap > round_off:
                    unseen.append(info.name)
                    break
        return unseen

    # ------------------------------------------------------------------ fit
    @_one_run_per_folder
    def fit(self, train_loader) -> "EKFAC":
        """Fit A, S, their eigenbases and Lambda: one pass for covariances, one for Lambda.

        train_loader yields (x, y) or (x, y, index); it must yield the same data in the same order on every
        pass (and on every rank under torchrun). Returns self. On error nothing is kept. Under torchrun the
        passes are shared between the ranks and every rank ends with the same factors; with a
        ``checkpoint_dir`` a killed fit resumes where it stopped (see the class docstring).
        """
        kept = self._layers, self._trackable, self._batch_axes, self._axes_found, self.coverage
        try:
            return self._fit(train_loader)
        except BaseException:  # the layers stay those of the factors (a stopped refit chose others)
            self._layers, self._trackable, self._batch_axes, self._axes_found, self.coverage = kept
            raise

    def _fit(self, train_loader) -> "EKFAC":
        cfg = self.config
        fisher_labels = "sampled" if cfg.fisher == "true" else "data"
        was = self.coverage.brief()
        self._select_layers()  # the model's modules as they are now (one may have been replaced since the last fit)
        probe = self._keep_layers_seen_per_example(train_loader)
        if self.factors is not None and self.coverage.brief() != was:
            warnings.warn(self.coverage.brief() + " (see EKFAC.coverage.table())", stacklevel=4)
        self._check_summed_loss(probe)
        _warn_unless_repeatable(train_loader)
        if drops_last(train_loader):  # said now, not after the fit: score() refuses such a loader
            warnings.warn("train_loader: drop_last=True leaves its last incomplete batch out of the fit, and score() "
                          "refuses such a loader (those examples would get no score); pass one with drop_last=False",
                          stacklevel=4)
        device, dtype = self._device_dtype()
        rank, world = _dist.group(device)
        weights = model_fingerprint(self._layers, self.model)  # the weights the factors will belong to
        callables = self._callables(probe)
        _dist.agree({"model": weights, "modules": self.layer_names, "settings": self._run_settings(),
                     "partition_size": self.partition_size, "loss": callables}, world,
                    "every rank must fit the same model (weights and tracked layers) with the same settings, loss and "
                    "partition size")
        store = self._store(probe, weights, "fit", callables)
        # S rows depend on labels: its span shortcut is exact only when fit and score labels agree
        keep = {"A": cfg.low_rank, "S": cfg.low_rank and cfg.fisher == "empirical"}
        shapes = {info.name: {"A": (info.d_in, info.bias), "S": (info.d_out, False)} for info, _ in self._layers}
        # an embedding's one-hot rows: its input factor is diagonal, streamed as token counts
        counted = {info.name for info, _ in self._layers if info.kind == "embedding"}
        # a grouped convolution's factors: A shared by its groups, S their diagonal blocks (never truncated: the span
        # check needs (B, T, d_in) inputs that it does not have)
        groups = {info.name: grouped(m) for info, m in self._layers}

        def settings(name, f):
            G = groups[name]
            return {"keep_rows": keep[f] and G == 1, "blocks": G if f == "S" else 1, "shared": G if f == "A" else 1}

        def new_factor(name, f):
            if f == "A" and name in counted:
                return TokenCounts(shapes[name]["A"][0])
            return CovAccumulator(*shapes[name][f], **settings(name, f))

        def new_cov():
            return {"examples": 0, "layers": {name: {f: new_factor(name, f) for f in "AS"} for name in shapes}}

        def add_cov(state, x, y, idx):
            state["examples"] += idx.numel()
            for lb in self._layer_batches(x, y, idx, fisher_labels, "train_loader"):
                acc = state["layers"][lb.info.name]
                acc["A"].add(lb.token_ids() if lb.info.name in counted else lb.a_cols())
                acc["S"].add(lb.g_cols())
            return state

        def pack_cov(state):
            out = {"examples": torch.tensor([state["examples"]], dtype=torch.int64)}
            for name, acc in state["layers"].items():
                for f in "AS":
                    out.update(acc[f].pack(f"{name}/{f}"))
            return out

        def unpack_cov(t):
            return {"examples": int(t["examples"][0]),
                    "layers": {name: {f: TokenCounts.unpack(t, f"{name}/A", shape["A"][0], device)
                                      if f == "A" and name in counted else
                                      CovAccumulator.unpack(t, f"{name}/{f}", *shape[f], device=device,
                                                            **settings(name, f))
                                      for f in "AS"} for name, shape in shapes.items()}}

        total = new_cov()

        def merge_cov(part):
            total["examples"] += part["examples"]
            for name, acc in part["layers"].items():
                for f in "AS":
                    total["layers"][name][f].merge(acc[f])

        timings = {}
        t0 = time.perf_counter()
        digests = self._pass(train_loader, "EK-FAC covariances", "covariance", (rank, world), store, new_cov, add_cov,
                             pack_cov, unpack_cov, merge_cov)
        n_examples = total["examples"]
        if n_examples == 0:
            raise ValueError("train_loader: yielded no examples")
        data_key = hashlib.sha256("".join(digests).encode()).hexdigest() if digests is not None else None

        timings["covariance"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        eig = self._eigen(total["layers"], store, data_key, rank, world)
        del total

        timings["eigendecomposition"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        bases = {name: (e[3].to(dtype), None if e[1] is None else e[1].to(dtype)) for name, e in eig.items()}
        lam_sum: dict = {"examples": 0, "lam": {}}

        def add_lam(state, x, y, idx):
            state["examples"] += idx.numel()
            for lb in self._layer_batches(x, y, idx, fisher_labels, "train_loader"):
                QS, QA = bases[lb.info.name]
                cur = state["lam"].get(lb.info.name)
                if QA is None:  # an embedding: its tokens' squares added to their columns, in float64
                    if cur is None:
                        cur = state["lam"][lb.info.name] = torch.zeros(QS.shape[1], lb.info.d_in,
                                                                       dtype=torch.float64, device=QS.device)
                    contract.add_row_squares_(cur, lb, QS)
                    continue
                part = contract.rotate_square_sum(lb, QS, QA)
                if cur is None:
                    state["lam"][lb.info.name] = part.to(torch.float64)
                else:
                    cur += part  # in place, in float64: no float64 copy of every layer's sum per batch
            return state

        def pack_lam(state):
            return {"examples": torch.tensor([state["examples"]], dtype=torch.int64),
                    **{f"lam/{name}": v for name, v in state["lam"].items()}}

        def unpack_lam(t):
            return {"examples": int(t["examples"][0]),
                    "lam": {k[4:]: v.to(device) for k, v in t.items() if k.startswith("lam/")}}

        def merge_lam(part):
            lam_sum["examples"] += part["examples"]
            for name, v in part["lam"].items():
                cur = lam_sum["lam"].get(name)
                lam_sum["lam"][name] = v if cur is None else cur + v

        lam_digests = self._pass(train_loader, "EK-FAC lambda", "lambda", (rank, world), store,
                                 lambda: {"examples": 0, "lam": {}}, add_lam, pack_lam, unpack_lam, merge_lam)
        n_lambda = lam_sum["examples"]
        if n_lambda != n_examples or lam_digests != digests:
            raise RuntimeError(f"train_loader: yielded {n_examples} examples in the covariance pass but "
                               f"{n_lambda} in the lambda pass (or other data); it must be re-iterable with the "
                               "same data in the same order")
        factors = {}
        for info, _ in self._layers:
            eA, QA, eS, QS, rA, rS = eig[info.name]
            factors[info.name] = LayerFactors(info, eA, QA, eS, QS, lam_sum["lam"][info.name] / n_lambda, rA, rS,
                                              n_lambda)
        timings["lambda"] = time.perf_counter() - t0
        self.factors = factors
        self._fit_examples = n_examples
        self._fitted_weights = weights
        self.timings = timings
        if store is not None:  # the fit is done: its partial results are no longer needed
            _dist.barrier(world)
            store.clear()  # by every rank: a rank's checkpoint_dir may be its own (a node's local disk)
        return self

    def _eigen(self, covs: dict, store, data_key, rank: int, world: int) -> dict:
        """Eigendecompose every layer's two factors (float64): layer i on rank i mod K, then shared; with a
        store each layer's result is kept (a fit killed later does not redo it)."""
        low_rank = self.config.low_rank
        device, _ = self._device_dtype()
        names = self.layer_names
        mine = {}

        def decompose() -> None:
            for i, name in enumerate(self._bar(names, "EK-FAC eigendecomposition")):
                if i % world != rank:
                    continue
                if store is not None and store.has("eigen", i):
                    mine[name] = store.load("eigen", i, data_key)  # moved to the device with the others below
                    continue
                dtype = _EIGEN_DTYPES[self.config.eigen_dtype]
                eA, QA = covs[name]["A"].eigen(span=low_rank, dtype=dtype)
                eS, QS = covs[name]["S"].eigen(span=low_rank, dtype=dtype)
                # contiguous: a computed and a stored (hence contiguous) basis must enter the same kernels
                mine[name] = {k: v.contiguous() for k, v in {"evals_A": eA, "Q_A": QA, "evals_S": eS,
                                                              "Q_S": QS}.items() if v is not None}
                if store is not None:
                    store.save("eigen", i, mine[name], data_key)

        failed = None
        if world == 1:
            decompose()
        else:  # a rank's error travels with the results, so that no rank waits for one that has stopped
            try:
                decompose()
            except Exception as err:
                failed = err
        gathered = _dist.all_gather((mine if failed is None else {}, _dist.describe(failed)), world)
        _dist.raise_any([f for _, f in gathered], failed)
        eig = {}
        for part, _ in gathered:
            for name, t in part.items():
                t = {k: v.to(device) for k, v in t.items()}
                eig[name] = (t["evals_A"], t.get("Q_A"), t["evals_S"], t["Q_S"], covs[name]["A"].n,
                             covs[name]["S"].n)
        return {name: eig[name] for name in names}

    # ------------------------------------------------------------------ queries
    def _check_queries(self, query_x, query_y):
        if not isinstance(query_x, torch.Tensor):
            raise TypeError(f"query_x: expected a Tensor (Q, ...), got {type(query_x).__name__}")
        if not isinstance(query_y, torch.Tensor):
            query_y = torch.as_tensor(query_y)
        if query_y.dtype.is_floating_point or query_y.dtype == torch.bool or query_y.dim() != 1 \
                or query_y.shape[0] != query_x.shape[0]:
            hint = (f" (query_x of shape {tuple(query_x.shape)} is read as {query_x.shape[0]} queries; one query is "
                    "query_x[None])") if query_x.dim() == 1 or query_y.numel() == 1 and query_x.shape[0] != 1 else ""
            raise TypeError(f"query_y: expected integer labels of shape ({query_x.shape[0]},), got dtype "
                            f"{query_y.dtype} and shape {tuple(query_y.shape)}{hint}")
        if query_x.shape[0] == 0:
            raise ValueError("query_x: expected at least one query")
        return query_x, query_y.to(torch.int64)

    def precondition(self, query_x: torch.Tensor, query_y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Preconditioned query gradients in eigenbasis form, per layer:
        {name: (Q, r_out, r_in) float64} = (Q_S^T grad m_q Q_A) / (Lambda + damping).

        query_x (Q, ...) model inputs, query_y (Q,) int labels whose measurement is differentiated.
        """
        out = self._precondition(query_x, query_y, {})
        return {name: q.dense(self.factors[name].lam.shape[1]) if isinstance(q, contract.RowQueries) else q
                for name, q in out.items()}

    def _precondition(self, query_x, query_y, lowrank: dict[str, int], out_dtype: torch.dtype = torch.float64
                      ) -> dict:
        """:meth:`precondition`, each batch of queries cast to ``out_dtype`` once preconditioned (the score pass's dtype:
        its operands are cast to it anyway, and with many queries on a large model a float64 copy of every query
        would be the pass's largest allocation), the queries of the layers in ``lowrank`` ({name: k}) kept as
        rank-k factors (:class:`~deltainf.influence._contract.LowRankQueries`), a batch of queries at a time, so
        that their full form is never held for all queries at once."""
        self._require_fit()
        query_x, query_y = self._check_queries(query_x, query_y)
        meas = resolve_measurement(self.config.measurement)
        device, dtype = self._device_dtype()
        out: dict[str, list] = {info.name: [] for info, _ in self._layers}
        bs = self.config.query_batch_size
        if not self._axes_found:  # factors read from another library's files
            self._probe_layers(query_x[:bs], "the query batch")
        with self._passes(), torch.enable_grad():
            for s in self._bar(range(0, query_x.shape[0], bs), "EK-FAC queries"):
                x = query_x[s:s + bs]
                x = to_model(x, device, dtype)
                y = query_y[s:s + bs].to(device)
                with Capture(self._layers, self._batch_axes) as cap:
                    logits = checked_forward(self.model, x, "the query batch")
                refuse_probabilities(logits, "the query batch")
                check_labels(y, logits.shape[1], "query_y")
                m = meas(logits, y)
                if not isinstance(m, torch.Tensor) or m.shape != (x.shape[0],):
                    raise TypeError(f"measurement: expected a per-example tensor of shape ({x.shape[0]},), "
                                    f"got {tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
                total = m.sum()
                if not torch.isfinite(total):
                    raise FloatingPointError(f"query: non-finite measurement in queries {s}..{s + x.shape[0] - 1}")
                for lb in cap.gradients(total, x.shape[0]):
                    if not lb.finite():
                        raise FloatingPointError(f"query: non-finite gradient at layer {lb.info.name!r}")
                    if lb.info.name in lowrank:  # the SVD of the float64 queries
                        pre = contract.LowRankQueries(*truncated_svd(self._precondition_layer(lb, torch.float64),
                                                                     lowrank[lb.info.name], seed=self.config.seed))
                    else:
                        pre = self._precondition_layer(lb, out_dtype)
                    out[lb.info.name].append(pre)

        def joined(parts):
            if len(parts) == 1:
                return parts[0]  # no copy of one batch
            if isinstance(parts[0], contract.LowRankQueries):
                return contract.LowRankQueries(*(torch.cat(side, 0) for side in zip(*parts)))
            if isinstance(parts[0], contract.RowQueries):
                return contract.RowQueries.joined(parts)
            return torch.cat(parts, 0)
        return {k: joined(v) for k, v in out.items()}

    def _positions(self, query_x) -> dict[str, int]:
        """The positions (tokens) per example of every layer, from one query's forward and backward pass (the
        training inputs are assumed to have the queries' shape)."""
        device, dtype = self._device_dtype()
        x = to_model(query_x[:1], device, dtype)
        with self._passes(), torch.enable_grad():
            with Capture(self._layers, self._batch_axes) as cap:
                logits = checked_forward(self.model, x, "the query batch")
            return {lb.info.name: lb.tokens for lb in cap.gradients(logits.sum(), x.shape[0])}

    def _lowrank_layers(self, tokens: dict[str, int] | None, n_queries: int, n_train: int) -> dict[str, int]:
        """The layers whose queries are scored as rank-k factors ({name: k}, k = ``query_rank``): those where the
        "lowrank" route costs fewer multiply-adds than the cheapest exact one for ``n_queries`` queries and
        ``n_train`` examples, with ``tokens`` the positions per example of every layer (:meth:`_positions`)."""
        k = self.config.query_rank
        if k is None or self.config.score_path != "auto":
            return {}
        out = {}
        for info, module in self._layers:
            f = self.factors[info.name]
            r_out, r_in = f.lam.shape
            shape = (tokens[info.name], info.d_out, info.d_in_aug, r_out, r_in, n_queries)
            # (the lowrank route projects tokens: none of an embedding's identity basis or a grouped convolution)
            if f.Q_A is not None and grouped(module) == 1 and k < min(r_out, r_in) and \
                    contract.lowrank_cost(*shape, k, n_train) < contract.score_plan(*shape, n=n_train)[0]:
                out[info.name] = k
        return out

    def _precondition_layer(self, lb: LayerBatch, dtype: torch.dtype) -> torch.Tensor:
        """(Q_S^T G_q Q_A) / (Lambda + damping) of every query of ``lb``: (Q, r_out, r_in) in ``dtype``, computed in
        float64; for a narrower ``dtype`` a few queries at a time (at most PRECONDITION_BYTES of float64 results at
        once; the whole float64 result of ResNet-18's widest layer for 51 queries is a gigabyte of fresh pages), each
        cast with its entries below ``dtype``'s smallest normal number set to 0 (as
        :func:`~deltainf.influence._contract.pass_operand` casts). An embedding's queries come as
        ``RowQueries``: only the columns of the token ids they hold."""
        f = self.factors[lb.info.name]
        damp = f.damping(self.config.damping)
        if damp == 0:
            # 1 / 0 there: every score NaN without a word (an input always zero, a dead unit gives such a direction);
            # round-off leaves such a direction a tiny eigenvalue instead (3.8e-37), and scores of 1e18 in place of 84
            tiny = f.lam <= float(f.lam.max()) * _ROUND_OFF
            if bool(tiny.any()):
                raise ValueError(f"damping: 0 leaves {int(tiny.sum())} zero or round-off eigenvalue(s) (at most "
                                 f"{_ROUND_OFF:g} of the largest) of layer {lb.info.name!r} to invert; pass damping "
                                 "> 0 (e.g. 1e-8) or 'heuristic'")
        if f.Q_A is None:  # an embedding: its tokens' columns added up in float64 (Q_S's dtype), the others zero
            q = contract.row_rotate(lb, f.Q_S)
            return contract.RowQueries(contract.pass_operand(q.rows.div_(f.lam[:, q.ids] + damp), dtype), q.ids)
        r_out, r_in = f.lam.shape
        T, d_out, D = lb.tokens, lb.info.d_out, lb.info.d_in_aug
        lb64 = lb.to(torch.float64)
        square = r_out == d_out and r_in == D  # kron_ihvp takes full (square) eigenbases only
        ihvp = square and \
            contract.ihvp_cost(T, d_out, D, r_out, r_in) < contract.rotate_cost(T, d_out, D, r_out, r_in)[0]
        denom = None if ihvp else f.lam + damp  # once, not per block of queries

        def preconditioned(part: LayerBatch) -> torch.Tensor:
            if ihvp:
                return ops.kron_ihvp(part.grads(), f.Q_S, f.Q_A, f.lam, damp, eigenbasis=True)
            # same quantity without materialising G_q: rotate the tokens, then divide
            return contract.rotate(part, f.Q_S, f.Q_A).div_(denom)

        step = max(1, PRECONDITION_BYTES // (8 * r_out * r_in))
        if dtype == torch.float64 or step >= lb.batch:
            return contract.pass_operand(preconditioned(lb64), dtype)
        out = torch.empty(lb.batch, r_out, r_in, dtype=dtype, device=lb.device)
        for s in range(0, lb.batch, step):
            contract.drop_subnormals_(out[s:s + step].copy_(preconditioned(lb64.examples(s, s + step))))
        return out

    # ------------------------------------------------------------------ scores
    @_one_run_per_folder
    def score(self, query_x: torch.Tensor, query_y: torch.Tensor, train_loader, *, per_layer: bool = False,
              n_train: int | None = None, out: str | os.PathLike | None = None):
        """Influence of every training example on every query, in one pass over train_loader (one per chunk of
        ``query_chunk`` queries when the preconditioned queries would not fit in memory at once).

        query_x (Q, ...) inputs, query_y (Q,) int64 labels for the measurement.
        train_loader yields (x, y) or (x, y, index); gradients use the true labels and the summed
        cross-entropy. Returns scores (Q, N) in the model's dtype (float32 by default), indexed by
        dataset position, N = n_train or len(train_loader.dataset); positions never visited are NaN.
        A position >= len(train_loader.dataset) is an error; with n_train given, or a dataset without a length,
        N in memory grows if a larger position appears. With ``out`` (a path ending in .npy) the scores
        are written batch by batch to a memory-mapped .npy file (so N is bounded by disk, not memory;
        N must then be known), renamed into place when complete, and returned as a tensor over it.
        With per_layer=True returns (scores, {layer name: (Q, N)}) (per-layer scores in memory).
        score(q, i) = sum_layers <H^-1 grad m(q), grad L(z_i)>; positive = z_i supports query q's label.
        """
        self._require_fit()
        check_bool("per_layer", per_layer)  # "no" was taken as True
        self._check_layers_in_place()
        query_x, query_y = self._check_queries(query_x, query_y)
        weights = model_fingerprint(self._layers, self.model)
        if self._changed_from(weights):
            warnings.warn("EKFAC: the model's weights changed since the factors were fitted (or loaded); the "
                          "scores use the curvature of the earlier weights: refit for the current model", stacklevel=2)
        if drops_last(train_loader):
            raise ValueError("train_loader: drop_last=True leaves its last incomplete batch out, whose examples would "
                             "get no score; pass a loader with drop_last=False")
        n_train = plain_number(n_train)
        bounded = n_train is None  # the dataset's own length: a position beyond it is a mistake, not growth
        if bounded:  # (with n_train, positions in a larger dataset are what the user says the third items are)
            check_carried_positions(train_loader)  # before any batch is read: a batch's own check says less
        _warn_unless_repeatable(train_loader)
        Q = query_x.shape[0]
        device, dtype = self._device_dtype()
        if n_train is None:
            ds = getattr(train_loader, "dataset", None)
            try:
                n_train = len(ds) if ds is not None else 0
            except TypeError:
                n_train = 0
            bounded = n_train > 0
        elif isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 0:
            raise ValueError(f"n_train: expected an int >= 0, got {n_train!r}")
        rank, world = _dist.group(device)
        probe = self._first_logits(train_loader) if self.checkpoint_dir is not None or world > 1 else None
        callables = self._callables(probe)
        if world > 1:
            _dist.agree({"query_x": tensor_digest({"x": query_x}), "query_y": tensor_digest({"y": query_y}),
                         "n_train": n_train, "model": weights, "settings": self._run_settings(),
                         "partition_size": self.partition_size, "measurement": callables,
                         "factors": self._factors_digest(),
                         # rank 0 writes `out` and the others read it: one path on every rank, or none
                         "out": None if out is None else os.fspath(out)}, world,
                        "every rank must score the same queries (the same affected inputs, labels, reference data and "
                        "settings) with the same weights, factors, measurement and partition size, into the same "
                        "score file or none")
        writer = out is None or rank == 0  # under torchrun rank 0 writes `out`; the others read it afterwards
        sink = _ScoreSink(Q, n_train, dtype, out if writer else None, keep=writer, bounded=bounded)
        layer_sinks = {name: _ScoreSink(Q, n_train, dtype, None) for name in self.layer_names} if per_layer else None
        # (an embedding's positions bound its queries' size: the chunk's estimate reads them)
        wanted = self.config.query_rank is not None and self.config.score_path == "auto" or \
            self.config.query_chunk is None and any(f.Q_A is None for f in self.factors.values())
        positions = self._positions(query_x) if wanted else None
        lowrank = self._lowrank_layers(positions, Q, n_train)
        chunk = self.query_chunk(Q, lowrank, positions)
        stores = []
        self.timings.update(queries=0.0, score_pass=0.0)  # the fit's stages stay beside them
        self.score_passes = 0
        try:
            for a in range(0, Q, chunk):
                rows = (a, min(Q, a + chunk))
                store = None
                if self.checkpoint_dir is not None:  # one store per chunk, all kept until every chunk is done
                    queries = tensor_digest({"x": query_x[rows[0]:rows[1]], "y": query_y[rows[0]:rows[1]]})
                    store = self._store(probe, weights, "score", queries, self._factors_digest(), per_layer,
                                        callables)
                    stores.append(store)
                self._score_rows(query_x[rows[0]:rows[1]], query_y[rows[0]:rows[1]], train_loader, rows, n_train,
                                 (rank, world), store, sink, layer_sinks, lowrank)
            total = sink.finish()
        except BaseException:
            sink.abort()
            raise
        if out is not None and world > 1:
            _dist.barrier(world)  # rank 0 has renamed `out` into place
            if not writer:
                total = torch.from_numpy(np.load(os.fspath(out), mmap_mode="c"))
        if stores:
            _dist.barrier(world)
            for store in stores:  # by every rank, as in fit
                store.clear()
        if per_layer:
            return total, {k: v.finish() for k, v in layer_sinks.items()}
        return total

    def query_chunk(self, n_queries: int, lowrank: dict[str, int] | None = None,
                    positions: dict[str, int] | None = None) -> int:
        """Queries scored per pass over the training set: ``config.query_chunk``, or (None) all of them unless
        their preconditioned gradients would take more than a quarter of the memory of the machine (or of the GPU):
        the pass dtype's bytes per query and tracked parameter, plus float64 and pass-dtype bytes for the largest
        layer's (preconditioned in float64, then cast; laid out for its route by the pass); the layers of
        ``lowrank`` ({name: k}) take 8 bytes per number of their rank-k factors instead. An embedding's queries hold
        only the columns of their tokens: with its ``positions`` per example known ({name: T}, :meth:`_positions`),
        c queries take at most min(V, c T) columns (in float64, then in the pass dtype twice), else V each."""
        if self.config.query_chunk is not None:
            return min(self.config.query_chunk, n_queries)
        device, dtype = self._device_dtype()
        item = torch.finfo(dtype).bits // 8
        lowrank, positions = lowrank or {}, positions or {}
        rows = {name: f.lam.shape for name, f in self.factors.items() if f.Q_A is None and name in positions}
        sizes = [f.lam.numel() for name, f in self.factors.items() if name not in lowrank and name not in rows]
        factors = [lowrank[name] * sum(f.lam.shape) for name, f in self.factors.items() if name in lowrank]
        per_query = item * sum(sizes) + 8 * sum(factors) + (8 + item) * max(sizes, default=0)

        def size(c: int) -> int:
            held = sum(r_out * min(V, c * positions[name]) for name, (r_out, V) in rows.items())
            return c * per_query + (8 + 2 * item) * held

        budget, fits, c = _memory_bytes(device) // 4, 1, n_queries
        while fits < c:  # the largest chunk within the budget (size grows with c), at least 1
            mid = (fits + c + 1) // 2
            fits, c = (mid, c) if size(mid) <= budget else (fits, mid - 1)
        return fits

    def _score_rows(self, query_x, query_y, train_loader, rows: tuple[int, int], n_train: int, group, store,
                    sink: "_ScoreSink", layer_sinks: dict | None, lowrank: dict[str, int]) -> None:
        """One pass over train_loader scoring the queries of ``rows`` (a, b) of the result into the sinks, those of
        the ``lowrank`` layers as rank-k factors."""
        t0 = time.perf_counter()
        device, dtype = self._device_dtype()
        P = self._precondition(query_x, query_y, lowrank, dtype)
        self.timings["queries"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        Q = query_x.shape[0]
        per_layer = layer_sinks is not None
        names = list(P)  # P empties as the pass turns each layer's queries into its plan
        plans: dict[str, tuple] = {}
        outside = [torch.zeros((), dtype=torch.float64, device=device)]  # largest share outside a truncated span

        def new():
            return {"idx": [], "total": [], "layers": {name: [] for name in names} if per_layer else {}}

        def work(state, x, y, idx):
            acc = torch.zeros(idx.numel(), Q, dtype=torch.float64, device=device)
            for lb in self._layer_batches(x, y, idx, "data", "train_loader"):
                if self.factors[lb.info.name].truncated:
                    outside[0] = torch.maximum(outside[0], _outside_span(lb, self.factors[lb.info.name]))
                s = self._score_layer(lb, P, plans, dtype, n_train)
                acc += s
                if per_layer:
                    state["layers"][lb.info.name].append(s.to(torch.float64))
            state["idx"].append(idx)
            state["total"].append(acc)
            return state

        def pack(state):
            out_ = {"idx": torch.cat(state["idx"]) if state["idx"] else torch.zeros(0, dtype=torch.int64),
                    "total": torch.cat(state["total"]) if state["total"] else torch.zeros(0, Q, dtype=torch.float64)}
            for name, blocks in state["layers"].items():
                out_[f"layer/{name}"] = torch.cat(blocks) if blocks else torch.zeros(0, Q, dtype=torch.float64)
            return out_

        def unpack(t):
            return {"idx": [t["idx"]], "total": [t["total"]],
                    "layers": {k[6:]: [v] for k, v in t.items() if k.startswith("layer/")}}

        def merge(part):
            for idx, block in zip(part["idx"], part["total"]):
                sink.put(idx, block, rows)
            for name, blocks in part["layers"].items():
                for idx, block in zip(part["idx"], blocks):
                    layer_sinks[name].put(idx, block, rows)

        self._pass(train_loader, "EK-FAC scores", "score", group, store, new, work, pack, unpack, merge)
        self._warn_truncated(float(outside[0]), group)
        self.timings["score_pass"] += time.perf_counter() - t0
        self.score_passes += 1

    def _factors_digest(self) -> str:
        """SHA-256 of the fitted factors (what a stored score partition depends on besides the model, the
        settings and the queries); computed once per fit or load."""
        if self._digest is None or self._digest[0] is not self.factors:
            tensors = {f"{name}/{key}": getattr(f, key) for name, f in self.factors.items() for key in _FACTOR_KEYS
                       if getattr(f, key) is not None}
            self._digest = (self.factors, tensor_digest(tensors))
        return self._digest[1]

    def _warn_truncated(self, outside: float, group: tuple[int, int]) -> None:
        """Warn when scored examples' data lie outside the span of a factor eigendecomposed in its fitting rows
        (``outside``: the largest share of an example's squared norm, on this rank; the largest over the ranks)."""
        if not any(f.truncated for f in self.factors.values()):
            return
        outside = max(_dist.all_gather(outside, group[1]))
        if outside > _OUTSIDE_SPAN:
            warnings.warn(
                f"EKFAC: some factors were eigendecomposed in the span of their {self._fit_examples} fitting "
                f"examples (low_rank=True), and up to {100 * outside:.3g} % of a scored example's layer inputs or "
                "output gradients lie outside that span (examples the fit did not see): their scores omit those "
                "directions. Fit with low_rank=False, or on the examples you score.", stacklevel=3)

    def _score_layer(self, lb: LayerBatch, P: dict, plans: dict, dtype, n_train: int) -> torch.Tensor:
        name = lb.info.name
        if name not in plans:
            # the queries are dropped once laid out for their route: with many queries on a large model they are
            # the score pass's largest allocation (Q x #parameters x the dtype's bytes)
            plans[name] = self._plan(lb, P.pop(name), dtype, n_train)
        plan = plans[name]
        if isinstance(plan, contract.LowRankPlan):
            return contract.lowrank_score(lb, plan)
        if isinstance(plan, contract.EigenbasisPlan):
            return contract.rotate_score(lb, plan.U, plan.V, plan.P, mode=plan.route)
        if isinstance(plan, contract.RowsPlan):
            return contract.row_score(lb, plan)
        return contract.dense_score(lb, plan)

    def _plan(self, lb: LayerBatch, queries, dtype, n_train: int):
        """How a layer is scored for the whole pass: its queries laid out for the cheapest route by operation count
        (``score_path="auto"``) or the route asked for; rank-k factors for the "lowrank" route."""
        f = self.factors[lb.info.name]
        if isinstance(queries, contract.LowRankQueries):
            return contract.lowrank_operands(queries, f.Q_S, f.Q_A, dtype)
        if f.Q_A is None:  # an embedding, whatever score_path: every route gives these scores, this one per token
            return contract.rows_operands(f.cast(dtype)[0], queries, f.lam.shape[1])
        r_out, r_in = f.lam.shape
        T, d_out, D = lb.tokens, lb.info.d_out, lb.info.d_in_aug
        path = self.config.score_path
        Q = queries.shape[0]
        tokens = lb.groups == 1  # a grouped convolution is scored from its per-example gradients
        if path == "auto":
            # one-off costs of a route are spread over the training examples
            route = contract.score_plan(T, d_out, D, r_out, r_in, Q, n=n_train, tokens=tokens)[1]
        elif path == "kernel":
            route = contract.rotate_cost(T, d_out, D, r_out, r_in, tokens=tokens)[1]
        else:
            route = "tokens" if tokens and T * Q < T + Q else "grads"
        QS, QA = f.cast(dtype)
        queries = contract.pass_operand(queries, dtype)
        if route in ("direct", "compressed"):
            return contract.EigenbasisPlan(route, QS, QA, queries)
        # back to the parameter basis once: H^-1 grad m_q = Q_S P_q Q_A^T, in the pass dtype: the scores are taken in
        # it anyway, and the product (Q d_out r_in (r_out + D) multiply-adds) is the pass's largest one-off cost on
        # wide layers (ResNet-18, 8 queries: 7 s of a 13 s pass over 128 examples in float64). dense_operands lays
        # the weight and bias parts out from views (one copy, not two).
        full = QS @ queries @ QA.T
        del queries
        d_in = lb.info.d_in
        Pb = full[:, :, d_in] if lb.info.bias else None
        return contract.dense_operands(full[:, :, :d_in], Pb, route, lb.unit_width)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted factors (float64) to one safetensors file, atomically and with a content hash
        that :meth:`load` checks (see :mod:`deltainf._files`). Metadata: settings, layer names/shapes, row
        counts, model fingerprint."""
        self._require_fit("saving")
        path = output_file(path, "path")
        if self.weights_changed:
            warnings.warn("EKFAC.save: the model's weights changed since the fit; the file holds the factors of the "
                          "weights they were fitted on, and EKFAC.load accepts them for those weights only (refit for "
                          "the current ones)", stacklevel=2)
        tensors, layers = {}, []
        for name, f in self.factors.items():
            for key in _FACTOR_KEYS:
                if getattr(f, key) is not None:
                    tensors[f"{name}/{key}"] = getattr(f, key).detach().to("cpu", torch.float64).contiguous()
            layers.append({**f.info.as_dict(), "rows_A": f.rows_A, "rows_S": f.rows_S, "examples": f.examples})
        meta = {"format": FORMAT, "config": self.config.to_json(), "layers": layers,
                "fit_examples": self._fit_examples,
                "fingerprint": self._fitted_weights}
        if self._batch_axes:
            meta["batch_axes"] = self._batch_axes
        write_tensors(path, tensors, {"deltainf": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, *, strict: bool = True, verify: bool = True,
             measurement: Union[str, Callable, None] = None, loss: Union[str, Callable, None] = None,
             **overrides) -> "EKFAC":
        """Read factors written by :meth:`save` for ``model``.

        The file is checked first: its content hash (``verify=False`` skips only that, for huge files),
        its metadata, and every factor's dtype (float64), shape and values (finite; Lambda >= 0); a
        defect is a ValueError naming the file. Then the model must have the saved layers with the same
        types and shapes (ValueError otherwise) and, when ``strict``, the same weights (fingerprint).
        ``measurement`` and the keyword ``overrides`` (damping, score_path, query_batch_size, query_chunk,
        query_rank, progress: what scoring reads) replace saved settings; checkpoint_dir and partition_size are
        those of the constructor.
        """
        check_bool("strict", strict)
        check_bool("verify", verify)
        allowed = {"damping", "score_path", "query_batch_size", "query_chunk", "query_rank", "progress",
                   "checkpoint_dir", "partition_size"}
        bad = set(overrides) - allowed
        if bad:
            raise TypeError(f"EKFAC.load: unexpected keyword arguments {sorted(bad)}")
        path = os.fspath(path)
        meta, saved_factors = _read_factor_file(path, verify)
        cfg = dict(meta["config"])
        if measurement is not None:
            cfg["measurement"] = measurement
        elif cfg.get("measurement") == "custom":
            raise ValueError("measurement: the factors were saved with a custom measurement callable; pass it "
                             "again as EKFAC.load(path, model, measurement=...)")
        if loss is not None:
            cfg["loss"] = loss
        elif cfg.get("loss") == "custom":
            raise ValueError("loss: the factors were saved with a custom training loss; pass it again as "
                             "EKFAC.load(path, model, loss=...)")
        cfg.update(overrides)
        names = [layer["name"] for layer in meta["layers"]]
        try:
            obj = cls(model, modules=names, **cfg)
        except (TypeError, ValueError) as err:
            if not str(err).startswith("modules: "):
                raise
            raise ValueError(f"model: it does not have the layers the factors in {path!r} were fitted for "
                            f"({str(err).removeprefix('modules: ')})") from None
        for (info, _), saved in zip(obj._layers, meta["layers"]):
            if info.as_dict() != {k: saved[k] for k in ("name", "kind", "d_in", "d_out", "bias")}:
                raise ValueError(f"model: layer {info.name!r} is {info.as_dict()} but the factors in {path!r} were "
                                 f"fitted for {saved}")
        # with strict=False, accepted for these weights
        obj._fitted_weights = model_fingerprint(obj._layers, obj.model)
        if meta["fingerprint"] != obj._fitted_weights:
            msg = ("model: its weights differ from those the factors were fitted on (the tracked layers', or the rest: "
                   "a batch norm's statistics, a frozen backbone); refit, or pass strict=False to use them anyway")
            if strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        device, _ = obj._device_dtype()
        factors = {}
        for (info, _), saved in zip(obj._layers, meta["layers"]):
            t = {k: v.to(device) for k, v in saved_factors[info.name].items()}
            factors[info.name] = LayerFactors(info, t["evals_A"], t.get("Q_A"), t["evals_S"], t["Q_S"], t["lam"],
                                              saved["rows_A"], saved["rows_S"], saved["examples"])
        obj.factors = factors
        obj._fit_examples = meta["fit_examples"]
        obj._batch_axes = dict(meta.get("batch_axes", {}))
        obj._axes_found = True
        return obj


_FACTOR_KEYS = ("evals_A", "Q_A", "evals_S", "Q_S", "lam")
_LAYER_FIELDS = {"name": str, "kind": str, "d_in": int, "d_out": int, "bias": bool, "rows_A": int, "rows_S": int,
                 "examples": int}


def _read_factor_file(path: str, verify: bool) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(metadata, {layer: {factor: float64 tensor}}) of a factor file, checked before anything is built
    from it: every defect (damaged or altered content, missing or mistyped metadata, a factor of the
    wrong dtype, shape or values) is a ValueError naming the file."""
    tensors, header = read_tensors(path, "factor file", verify=verify)

    def defect(problem: str) -> ValueError:
        return file_error("factor file", path, problem)

    if "deltainf" not in header:
        raise defect(f"not a deltainf EK-FAC factor file (no 'deltainf' metadata; format {FORMAT})")
    try:
        meta = json.loads(header["deltainf"])
    except ValueError as err:
        raise defect(f"its 'deltainf' metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise defect(f"not a deltainf EK-FAC factor file (format {FORMAT})")
    if verify:
        require_digest(header, "factor file", path)
    missing = [k for k in ("config", "layers", "fit_examples", "fingerprint") if k not in meta]
    if missing:
        raise defect(f"its metadata lacks {missing}")
    if not isinstance(meta["config"], dict):
        raise defect(f"metadata 'config' must be an object, got {type(meta['config']).__name__}")
    if not isinstance(meta["fingerprint"], str):
        raise defect("metadata 'fingerprint' must be a string")
    if not _is_int(meta["fit_examples"]) or meta["fit_examples"] < 1:
        raise defect(f"metadata 'fit_examples' must be an int >= 1, got {meta['fit_examples']!r}")
    config = dict(meta["config"])
    if config.get("measurement") == "custom":
        config["measurement"] = "margin"  # a callable that cannot be stored; load asks for it
    if config.get("loss") == "custom":
        config["loss"] = "ce"  # likewise
    try:
        EKFACConfig(**config)
    except (TypeError, ValueError) as err:
        raise defect(f"metadata 'config' is not usable ({err})") from None
    layers = meta["layers"]
    if not isinstance(layers, list) or not layers:
        raise defect("metadata 'layers' must be a non-empty list")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise defect(f"metadata 'layers'[{i}] must be an object")
        for key, kind in _LAYER_FIELDS.items():
            value = layer.get(key)
            ok = _is_int(value) if kind is int else isinstance(value, kind)
            if not ok:
                raise defect(f"metadata 'layers'[{i}].{key} must be a {kind.__name__}, got {value!r}")
        if min(layer["d_in"], layer["d_out"], layer["examples"]) < 1 or min(layer["rows_A"], layer["rows_S"]) < 0:
            raise defect(f"metadata 'layers'[{i}] has impossible sizes {layer}")
    names = [layer["name"] for layer in layers]
    if len(set(names)) != len(names):
        raise defect(f"metadata 'layers' names a layer twice: {names}")
    axes = meta.get("batch_axes", {})
    if not isinstance(axes, dict) or any(k not in names or not _is_int(v) or v != 1 for k, v in axes.items()):
        raise defect(f"metadata 'batch_axes' must map layers of the file to 1, got {axes!r}")
    # an embedding's input basis, the identity, is not stored
    identity = {layer["name"] for layer in layers
                if layer["kind"] == "embedding" and f"{layer['name']}/Q_A" not in tensors}
    expected = {f"{n}/{k}" for n in names for k in _FACTOR_KEYS if not (k == "Q_A" and n in identity)}
    if set(tensors) != expected:
        raise defect(f"its tensors do not match its layers (missing {sorted(expected - set(tensors))[:4]}, "
                     f"unexpected {sorted(set(tensors) - expected)[:4]})")
    factors = {}
    for layer in layers:
        t = {k: tensors[f"{layer['name']}/{k}"] for k in _FACTOR_KEYS if f"{layer['name']}/{k}" in tensors}
        _check_layer_factors(layer, t, defect)
        factors[layer["name"]] = t
    return meta, factors


def _check_layer_factors(layer: dict, t: dict[str, torch.Tensor], defect) -> None:
    """The factors of one layer have the dtype they are written in, the shapes its metadata implies and
    values a fit can produce (finite; Lambda, a mean of squares, >= 0)."""
    name = layer["name"]
    for key, v in t.items():
        if v.dtype != torch.float64:
            raise defect(f"{name}/{key} has dtype {v.dtype}, expected torch.float64 (the dtype factors are "
                         "written in)")
    D, d_out = layer["d_in"] + int(layer["bias"]), layer["d_out"]
    r_in = t["evals_A"].shape[0] if t["evals_A"].ndim == 1 else -1
    r_out = t["evals_S"].shape[0] if t["evals_S"].ndim == 1 else -1
    shapes = {"evals_A": (r_in,), "Q_A": (D, r_in), "evals_S": (r_out,), "Q_S": (d_out, r_out), "lam": (r_out, r_in)}
    if "Q_A" not in t:  # the identity: an embedding's full input basis
        shapes["evals_A"] = (D,)
        del shapes["Q_A"]
    for key, want in shapes.items():
        if tuple(t[key].shape) != want or not 0 <= r_in <= D or not 0 <= r_out <= d_out:
            raise defect(f"{name}/{key} has shape {tuple(t[key].shape)}, but layer {name!r} (d_in {D}, d_out "
                         f"{d_out}) needs {want} with rank <= its dimension")
    for key, v in t.items():
        if not bool(torch.isfinite(v).all()):
            raise defect(f"{name}/{key} holds NaN or infinite values")
    if t["lam"].numel() and float(t["lam"].min()) < 0:
        raise defect(f"{name}/lam holds negative values (min {float(t['lam'].min()):.3g}); Lambda is a mean of "
                     "squares")


def _memory_bytes(device: torch.device) -> int:
    """Total memory of the GPU the model is on, or of the machine."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_OUTSIDE_SPAN = 1e-3  # an example's share outside a truncated span beyond round-off (float32 passes: ~1e-7)


def _outside_span(lb: LayerBatch, f: LayerFactors) -> float:
    """The largest share (squared norm) of one example's layer inputs or output gradients in ``lb`` outside the span
    of ``f``'s truncated eigenbases: 0 up to round-off for the examples the factors were fitted on. One product with
    each basis, in the pass's dtype (1 - the share inside, whose round-off is far below _OUTSIDE_SPAN); a float64
    0-d tensor on the pass's device, so that the pass never waits for it."""
    worst = torch.zeros((), dtype=torch.float64, device=lb.device)
    for side, basis, bias in (("A", f.Q_A, lb.info.bias), ("S", f.Q_S, False)):
        if basis is None or basis.shape[1] == basis.shape[0]:  # (None: the identity, an embedding's)
            continue
        v = lb.a if side == "A" else lb.g
        if not v.numel():
            continue
        key = ("span", side, v.dtype)
        if key not in f._cache:
            f._cache[key] = basis.to(v.dtype)
        basis = f._cache[key]
        inside = (v @ (basis[:-1] if bias else basis)).add_(basis[-1] if bias else 0).square().sum((1, 2))
        total = v.square().sum((1, 2)) + (v.shape[1] if bias else 0)
        worst = torch.maximum(worst, (1 - inside / total.clamp_min(torch.finfo(v.dtype).tiny)).max().double())
    return worst


def _checked_by_the_passes(probe: tuple[torch.Tensor, torch.Tensor] | None):
    """``probe`` (logits, labels) when its labels are the logits' classes, one per example; else None (the passes
    say what is wrong with them)."""
    if probe is None:
        return None
    logits, y = probe
    if not logits.shape[0] or y.numel() != logits.shape[0] or int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
        return None
    return probe


_LOSS_CHECK = 8  # examples of the first batch on which a custom loss is checked to be a sum
_GRADIENT_CHECK = 4  # examples on which each layer's hooked gradient is compared with its weight's own


def _tolerance(at_float32: float, dtype: torch.dtype) -> float:
    """A relative tolerance of ``at_float32`` for float32 arithmetic, widened for coarser dtypes (float16 and
    bfloat16 on a GPU, whose round-off alone would pass it)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(at_float32, 16 * eps)


_GRADIENT_TOLERANCE = 1e-2  # relative: float32 sums differ by ~1e-6 (bfloat16 autocast ~4e-3), a shared or
# transformed weight by 0.1-1
_ROUND_OFF_TERMS = 1024  # a sum's round-off, in eps x the sum of its terms' magnitudes: the worst case of 1,024
# terms (random-order round-off grows as their square root); what a tied bias's other layer adds is of the terms' size


def _check_one_dtype(layers) -> None:
    """ValueError when the tracked ``layers`` hold parameters of several dtypes (a float64 head on a float32 body
    failed in a kernel after the covariance pass): the factors and the kernels take one. Layers the probe left out
    (an auxiliary head called only in training) do not count."""
    kinds: dict[str, str] = {}
    for info, m in layers:
        t = next(m.parameters(), None)
        if t is not None:
            kinds.setdefault(str(t.dtype).removeprefix("torch."), info.name)
    if len(kinds) > 1:
        shown = ", ".join(f"{d} ({name!r})" for d, name in kinds.items())
        raise ValueError(f"model: its tracked layers hold parameters of several dtypes: {shown}; EK-FAC fits them in "
                         "one: convert the model (model.float() or model.double()), or name the layers of one dtype "
                         "in modules=")


def _warn_if_batch_mixes(whole: torch.Tensor, alone: torch.Tensor, again) -> None:
    """Warn when the logits of the same examples differ between a batch and the batch less its last example: the
    model mixes examples in eval mode (batch statistics: a BatchNorm with track_running_stats=False), so every
    example's influence depends on the batch it is scored in; or, when ``again()`` (the shorter batch's logits once
    more) differs too, its forward pass draws at random in eval mode."""
    scale = float(whole.abs().max()) if whole.numel() else 0.0
    tolerance = _tolerance(1e-4, whole.dtype) * scale

    def differ(a, b):
        return float((a - b).abs().max()) > tolerance

    if scale > 0 and differ(whole, alone):
        if differ(again(), alone):
            warnings.warn("model: two forward passes of the same inputs in eval mode give different outputs (a random "
                          "draw left on in eval mode, e.g. F.dropout without training=self.training?): every score "
                          "is then a random draw", stacklevel=5)
        else:
            warnings.warn("model: its output for an example changes with the other examples of its batch (batch "
                          "statistics in eval mode, e.g. a BatchNorm with track_running_stats=False?): every score "
                          "then depends on how the data are batched", stacklevel=5)


def _warn_unless_repeatable(train_loader) -> None:
    """Warn when the loader draws its inputs anew on every read (random augmentation in the dataset): the passes
    would fit and score random variants, a different one each pass, not the training examples themselves."""
    check_loader(train_loader, "train_loader")
    if not first_batch_repeats(train_loader) or not items_repeat(train_loader):
        warnings.warn("train_loader: two reads of its data differ (random augmentation?): EK-FAC fits and "
                      "scores the inputs as each pass draws them, not the training examples; pass a loader "
                      "without random transforms", stacklevel=3)


def _reserve(path: str | os.PathLike) -> None:
    """Allocate the whole of the sparse file at ``path`` on its disk now: a memory map that writes into a hole on a
    full disk is killed by SIGBUS, without a message. ValueError naming ``out`` when the disk has no room."""
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - not Linux
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise ValueError(f"out: no room on the disk for the scores ({os.fstat(fd).st_size:,} bytes) at "
                             f"{os.fspath(path)!r}") from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a filesystem that cannot reserve
            raise
    finally:
        os.close(fd)


class _ScoreSink:
    """Receives (B, Q) score blocks for dataset positions and stores them as (Q, N): in memory
    (growing when a larger position appears) or in a memory-mapped .npy file written under a
    temporary name and renamed into place by :meth:`finish` (so a failed pass leaves nothing, and a
    killed one a temporary file that the next pass writing a score file into the same folder removes)."""

    def __init__(self, Q: int, n: int, dtype: torch.dtype, path, keep: bool = True, bounded: bool = False):
        self.Q, self.dtype, self.path, self.tmp, self.held = Q, dtype, None, None, None
        self.keep = keep
        self.bounded = bounded  # n is the length of the loader's dataset: no position reaches it
        self._seen = (None, torch.zeros(max(n, 0), dtype=torch.bool))  # (rows, positions put for them)
        if not keep:  # a rank that reads the scores from the file rank 0 writes
            self.data = None
            self.mm = None
            return
        if path is None:
            self.data = torch.full((Q, n), float("nan"), dtype=dtype)
            return

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"out: expected a path ending in .npy, got {type(path).__name__} {path!r}")
        path = os.fspath(path)
        if not path.endswith(".npy"):
            raise ValueError(f"out: expected a path ending in .npy, got {path!r}")
        if n <= 0:
            raise ValueError("n_train: writing scores to `out` needs the number of training examples (pass "
                             "n_train=, or a loader whose dataset has a length, which DeltaInfluence's score_file "
                             "needs)")
        output_file(path, "out")
        self.tmp = temp_beside(path)  # also removes what a killed pass writing `path` left behind
        self.path = path
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        try:
            self.held = hold(self.tmp)  # but not this file while the pass runs: another run may start beside it
            # every live pass holds its file, so an unheld one is a killed pass's, whatever score file it wrote
            if self.held is not None:
                remove_stale_temps(os.path.dirname(os.path.abspath(path)), suffix=".npy")
            self.mm = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np_dtype, shape=(Q, n))
            _reserve(self.tmp)
            self.mm[:] = np.nan
        except BaseException:
            self.abort()
            raise
        self.data = None

    def put(self, idx: torch.Tensor, block: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """idx (B,) int64 positions, block (B, b - a) scores of the queries of ``rows`` (a, b) (default: all)."""
        if not self.keep:
            return
        a, b = (0, self.Q) if rows is None else rows
        self._mark_seen(idx, (a, b))
        vals = block.detach().to("cpu", self.dtype).T
        if self.data is None:
            n = self.mm.shape[1]
            if idx.numel() and int(idx.max()) >= n:
                raise ValueError(f"train_loader: dataset position {int(idx.max())} is out of range for n_train={n}")
            self.mm[a:b, idx.numpy()] = vals.numpy()
            return
        need = int(idx.max()) + 1 if idx.numel() else 0
        if need > self.data.shape[1] and self.bounded:
            raise ValueError(
                f"train_loader: yields dataset position {need - 1}, but its dataset holds {self.data.shape[1]} "
                "examples: the third item of a sample must be its position in train_loader.dataset (a torch Subset "
                "of a dataset that yields its own index gives the index in the whole dataset: yield the position "
                "within the Subset, or call EKFAC.score with n_train= the whole dataset's size)")
        if need > self.data.shape[1]:
            grown = torch.full((self.Q, need), float("nan"), dtype=self.dtype)
            grown[:, :self.data.shape[1]] = self.data
            self.data = grown
        self.data[a:b, idx] = vals

    def _mark_seen(self, idx: torch.Tensor, rows: tuple[int, int]) -> None:
        """ValueError when a position of ``idx`` was already scored for the queries of ``rows``: two examples of one
        pass at one position (a third item of each sample that is not its position) would overwrite each other."""
        done, seen = self._seen
        if done != rows:
            seen = torch.zeros_like(seen)
        need = int(idx.max()) + 1 if idx.numel() else 0
        if need > seen.numel():
            seen = torch.cat([seen, torch.zeros(need - seen.numel(), dtype=torch.bool)])
        if bool(seen[idx].any()):
            position = int(idx[seen[idx]][0])
            raise ValueError(f"train_loader: dataset position {position} appears twice in one pass; every example is "
                             f"read once per pass, the third item of a sample as its own position in the dataset "
                             f"(yield (x, y) or (x, y, index)){REPLACEMENT}")
        seen[idx] = True
        self._seen = (rows, seen)

    def finish(self) -> torch.Tensor | None:
        if not self.keep:
            return None
        if self.data is not None:
            return self.data

        self.mm.flush()
        del self.mm
        # mapped before the rename, the scores are this pass's even if another run renames its file onto `path`
        # next; copy-on-write: an edit of the returned tensor stays in memory, and the file stays what was scored
        scores = np.load(self.tmp, mmap_mode="c")
        commit(self.tmp, self.path)
        self.tmp = None
        self._release()
        return torch.from_numpy(scores)

    def _release(self) -> None:
        if self.held is not None:
            os.close(self.held)
            self.held = None

    def abort(self) -> None:
        if self.tmp is not None:
            self.mm = None
            discard(self.tmp)
            self.tmp = None
        self._release()
