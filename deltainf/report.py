"""Reports: ``report.json`` (every figure and setting, plus the machine and versions), ``report.png``
(ΔInfl distribution for poisons vs clean, the vote histogram, the affected input and some flagged
examples) and a plain-text table for the terminal. Both files are written atomically.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from deltainf._files import atomic_open, output_folder, write_json
from deltainf._util import to_jsonable
from deltainf.version import __version__

__all__ = ["write_report", "environment_info", "format_table", "to_jsonable"]


def _git_info() -> dict[str, Any]:
    """Commit of the deltainf checkout (None outside a git work tree) and whether it has local edits."""
    here = os.path.dirname(os.path.abspath(__file__))
    info: dict[str, Any] = {"git_commit": None, "git_dirty": None}
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            info["git_commit"] = out.stdout.strip()
            st = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
            if st.returncode == 0:
                info["git_dirty"] = bool(st.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def environment_info() -> dict[str, Any]:
    """Machine and versions: platform, Python, CPU count, torch (and CUDA, GPUs), numpy, matplotlib,
    deltainf version, git commit of the checkout if available."""
    env: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_num_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "deltainf": __version__,
    }
    try:
        import matplotlib

        env["matplotlib"] = matplotlib.__version__
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        env["matplotlib"] = None
    try:
        env["cuda_available"] = bool(torch.cuda.is_available())
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
            if env["cuda_available"] else []
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not break the report
        env["cuda_available"], env["gpus"] = False, []
    try:
        from deltainf import _C  # noqa: F401

        env["extension"] = "deltainf._C"
    except Exception:  # noqa: BLE001
        env["extension"] = None
    env.update(_git_info())
    return env


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4f}"
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return _fmt(v.item())
    if isinstance(v, (list, tuple)) and len(v) > 6:
        return f"[{len(v)} items]"
    return str(v)


def format_table(rows: Mapping[str, Any] | Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None,
                 title: str | None = None) -> str:
    """A short plain-text table for the terminal.

    ``rows`` a mapping -> two columns (name, value), one line per key; a sequence of mappings -> one
    column per key and one line per mapping (e.g. one line per detector). ``keys`` selects and orders
    the keys (default: all, in first-seen order). Floats get 4 decimals (scientific when tiny/huge),
    long lists are abbreviated. Returns the table as a string (no trailing newline).
    """
    lines: list[str] = []
    if isinstance(rows, Mapping):
        ks = list(keys) if keys is not None else list(rows)
        width = max([len(str(k)) for k in ks] + [4])
        body = [f"{str(k):<{width}}  {_fmt(rows.get(k))}" for k in ks]
        rule = "-" * max([len(b) for b in body] + [width + 7])
        header: list[str] = []
    else:
        rows = list(rows)
        if keys is not None:
            ks = list(keys)
        else:
            ks = []
            for r in rows:
                ks += [k for k in r if k not in ks]
        cells = [[_fmt(r.get(k)) for k in ks] for r in rows]
        widths = [max([len(str(k))] + [len(c[i]) for c in cells]) for i, k in enumerate(ks)]
        header = ["  ".join(f"{str(k):>{w}}" for k, w in zip(ks, widths))]
        body = ["  ".join(f"{c:>{w}}" for c, w in zip(row, widths)) for row in cells]
        rule = "-" * max(len(header[0]), 1)
        header.append(rule)
    if title:
        lines += [title, rule]
    lines += header + body
    return "\n".join(lines)


def _image_for_display(x: torch.Tensor) -> np.ndarray:
    x = x.detach().float().cpu().clamp(0.0, 1.0)
    if x.ndim == 3 and x.shape[0] == 1:
        return x[0].numpy()
    if x.ndim == 3 and x.shape[0] >= 3:
        return x[:3].permute(1, 2, 0).numpy()
    if x.ndim == 3:  # 2 channels: show the first
        return x[0].numpy()
    return x.numpy()


def _picture(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` when it can be drawn as an image (C, H, W) of at most 4 channels, else None (tabular rows, token ids,
    signals: inputs with no picture)."""
    return x if x.ndim == 3 and x.shape[0] <= 4 and min(x.shape[1:]) >= 2 and not x.is_complex() else None


def _get_image(images, i: int) -> torch.Tensor:
    item = images[i]
    if isinstance(item, (tuple, list)):
        item = item[0]
    return torch.as_tensor(item)


def _symlog_edges(values: np.ndarray, bins: int = 60) -> tuple[np.ndarray, float]:
    a = np.abs(values[np.isfinite(values)])
    lin = float(np.median(a)) if a.size else 1.0
    lin = lin if lin > 0 else (float(a.max()) if a.size and a.max() > 0 else 1.0)
    lin = 10.0 ** math.floor(math.log10(lin))  # a power of ten keeps the symlog ticks readable
    t = np.sign(values) * np.log1p(np.abs(values) / lin)
    t = t[np.isfinite(t)]
    lo, hi = (float(t.min()), float(t.max())) if t.size else (-1.0, 1.0)
    if lo == hi:
        lo, hi = lo - 1.0, hi + 1.0
    e = np.linspace(lo, hi, bins + 1)
    return np.sign(e) * lin * np.expm1(np.abs(e)), lin


def _plot(path: Path, detection, poison_mask: np.ndarray | None, affected_x, train_images, n_examples: int,
          title: str | None, summary_text: str) -> None:
    # The object-oriented API with an explicit Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 2, height_ratios=[1.0, 1.0])
    if title:
        fig.suptitle(title)

    ax = fig.add_subplot(gs[0, 0])
    ax2 = fig.add_subplot(gs[0, 1])
    if detection is not None:
        mean_delta = detection.delta.mean.double().mean(0).numpy()  # (N,), averaged over points
        edges, lin = _symlog_edges(mean_delta)
        groups = [("clean", ~poison_mask, "tab:blue"), ("poison", poison_mask, "tab:red")] \
            if poison_mask is not None else [("all examples", np.ones_like(mean_delta, dtype=bool), "tab:blue")]
        finite = np.isfinite(mean_delta)  # examples the engine never scored are NaN
        for name, m, color in groups:
            if (m & finite).any():
                shown = m & finite
                ax.hist(mean_delta[shown], bins=edges, alpha=0.6, color=color, label=f"{name} ({int(shown.sum())})")
        ax.set_xscale("symlog", linthresh=lin)
        ax.set_yscale("log")
        ax.set_xlabel("mean ΔInfl over the copies (symlog)")
        ax.set_ylabel("training examples")
        ax.set_title("ΔInfl distribution")
        ax.legend(fontsize=8)

        n = detection.n_transforms
        p = detection.n_points
        # The decision statistic in votes per point (pooled: summed over the points, so divided by P),
        # beside its mirror (the null the calibrated cut is set against) and the cut itself.
        pooled = detection.settings.get("combine", "pooled") == "pooled"
        scale = p if pooled else 1
        per_label = getattr(detection, "per_label", None)
        if pooled and per_label is not None:  # a label's statistic sums the votes of its own points
            scale = np.full(detection.n_train, float(p))
            for part in per_label.values():
                if part.eligible is not None:
                    scale[part.eligible.numpy()] = part.n_points
        stat = detection.statistic.double().numpy() / scale
        mirror = detection.mirror_statistic.double().numpy() / scale
        whole = not pooled or p == 1
        bins = np.arange(n + 2) - 0.5 if whole else np.linspace(-0.5, n + 0.5, 2 * n + 2)
        gated = stat >= 0  # examples outside the candidates or the control gate have a negative statistic
        for name, m, color in groups:
            if (m & gated).any():
                ax2.hist(stat[m & gated], bins=bins, alpha=0.6, color=color, label=name)
        ax2.hist(mirror[mirror >= 0], bins=bins, histtype="step", color="k", lw=1, label="mirror (null)")
        if detection.control_support is not None:
            ax2.text(0.02, 0.97, f"{int((~gated).sum())} examples not shown (not candidates, or gated out by the "
                                 "controls)",
                     transform=ax2.transAxes, fontsize=8, va="top")
        if detection.cut is not None:
            ax2.axvline(detection.cut / scale - (0.5 if whole else 0.0), color="k", ls="--", lw=1,
                        label="mirror cut" if detection.support_cut is not None else
                        f"cut (est. FDR {detection.fdr_estimate:.2f})")
        ax2.set_yscale("log")
        ax2.set_xlabel(f"votes (copies with ΔInfl < threshold, of {n})"
                       + ("" if whole else ", mean over each label's affected points" if per_label is not None
                          else f", mean over the {p} affected points"))
        ax2.set_ylabel("training examples")
        ax2.set_title("vote histogram")
        ax2.legend(fontsize=8)
    else:
        for a in (ax, ax2):
            a.axis("off")
        ax.text(0.0, 1.0, summary_text, va="top", ha="left", family="monospace", fontsize=8,
                transform=ax.transAxes)

    sub = gs[1, 0].subgridspec(1, 1)
    ax3 = fig.add_subplot(sub[0, 0])
    ax3.axis("off")
    x = None if affected_x is None else torch.as_tensor(affected_x)
    if x is not None and x.ndim == 4:
        x = x[0]
    x = None if x is None else _picture(x)
    if x is not None:
        ax3.imshow(_image_for_display(x), cmap="gray" if x.shape[0] == 1 else None, vmin=0, vmax=1,
                   interpolation="nearest")
        label = ""
        if detection is not None:
            label = f" (ŷ = {int(detection.test_y_adv[0])})"
            if detection.n_points > 1:
                label += f", the first of {detection.n_points}"
        ax3.set_title("affected input" + label)
    elif detection is not None:
        ax3.text(0.0, 1.0, summary_text, va="top", ha="left", family="monospace", fontsize=8,
                 transform=ax3.transAxes)

    chosen, pictures = [], []
    if detection is not None and train_images is not None and detection.flagged.numel() and n_examples > 0:
        flagged = detection.flagged
        # Most convincing first: most votes, then most negative mean ΔInfl.
        v = detection.votes.double().sum(0)[flagged]
        d = detection.delta.mean.double().mean(0)[flagged]
        order = sorted(range(flagged.numel()), key=lambda k: (-float(v[k]), float(d[k])))
        chosen = [int(flagged[k]) for k in order[:n_examples]]
        pictures = [_picture(_get_image(train_images, idx)) for idx in chosen]
    if chosen and all(img is not None for img in pictures):
        cols = min(4, len(chosen))
        rows = int(math.ceil(len(chosen) / cols))
        grid = gs[1, 1].subgridspec(rows, cols)
        for k, (idx, img) in enumerate(zip(chosen, pictures)):
            a = fig.add_subplot(grid[k // cols, k % cols])
            a.imshow(_image_for_display(img), cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1,
                     interpolation="nearest")
            is_p = poison_mask is not None and bool(poison_mask[idx])
            a.set_title(f"#{idx}" + (" (poison)" if is_p else ""), fontsize=7, color="tab:red" if is_p else "k")
            a.axis("off")
    else:
        a = fig.add_subplot(gs[1, 1])
        a.axis("off")
        msg = "no flagged examples" if detection is not None and not detection.flagged.numel() else \
            "flagged (not images): " + ", ".join(f"#{idx}" for idx in chosen) if chosen else ""
        a.text(0.5, 0.5, msg, ha="center", va="center", wrap=True)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")


def write_report(out_dir, result_dict: Mapping[str, Any] | None, detection_result=None, *,
                 poison_indices=None, affected_x: torch.Tensor | None = None, train_images=None,
                 n_examples: int = 8, title: str | None = None, settings: Mapping[str, Any] | None = None,
                 plot: bool = True) -> dict[str, Path]:
    """Write ``report.json`` and ``report.png`` into ``out_dir`` (created if needed).

    Args:
        out_dir: output directory.
        result_dict: the run's figures (metrics, timings, anything JSON-able; tensors and nan are
            converted), stored under "results".
        detection_result: a :class:`deltainf.delta.DetectionResult` (its ``to_dict()`` is stored under
            "detection"), or None.
        poison_indices: ground-truth poison positions (int sequence / tensor) if known: adds detection
            metrics and splits the plots into poisons vs clean.
        affected_x: the affected test input(s) (C, H, W) or (P, C, H, W), pixel space; the first is shown.
        train_images: the training images (tensor (N, C, H, W) or a dataset yielding (x, ...)) to
            show some flagged examples.
        n_examples: how many flagged examples to show (most votes first).
        title: a title for the figure and the JSON.
        settings: extra settings to store (e.g. attack and training configuration).
        plot: write report.png (matplotlib, Agg backend).

    Returns:
        {"json": path, "png": path (when plotted)}.
    """
    if result_dict is not None and not isinstance(result_dict, Mapping):
        raise TypeError(f"result_dict must be a mapping or None, got {type(result_dict).__name__}")
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 0:
        raise ValueError(f"n_examples must be an int >= 0, got {n_examples!r}")
    if detection_result is not None and not hasattr(detection_result, "to_dict"):
        raise TypeError(f"detection_result: expected a Δ-Influence DetectionResult, got "
                        f"{type(detection_result).__name__}")
    if isinstance(train_images, torch.utils.data.DataLoader):
        raise TypeError("train_images: expected the training images (a dataset or a tensor (N, C, H, W)), got a "
                        "DataLoader: pass its .dataset")
    if detection_result is not None and train_images is not None and len(train_images) < detection_result.n_train:
        raise ValueError(f"train_images: {len(train_images)} images for a detection over "
                         f"{detection_result.n_train} training examples")
    out = output_folder(out_dir, "out_dir", files=("report.json", "report.png"))
    out.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {
        "title": title,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment_info(),
        "settings": dict(settings) if settings else {},
        "results": dict(result_dict) if result_dict else {},
        "detection": None,
    }
    poison_mask = None
    if detection_result is not None:
        report["detection"] = detection_result.to_dict()
        if poison_indices is not None:
            from deltainf.metrics import detection_metrics, index_tensor

            n = detection_result.n_train
            report["detection_metrics"] = detection_metrics(detection_result.flagged, poison_indices, n)
            idx = index_tensor(poison_indices, n, "poison_indices")  # a mask as positions, each once
            poison_mask = np.zeros(n, dtype=bool)
            poison_mask[idx.numpy()] = True
            # Where do the poisons sit in the vote distribution? (useful to tune threshold/tolerance)
            pv = detection_result.votes[:, idx].double()
            report["detection"]["poison_votes_mean"] = pv.mean(1).tolist() if idx.numel() else None
            report["detection"]["poison_vote_histogram"] = [
                torch.bincount(v.long(), minlength=detection_result.n_transforms + 1).tolist()
                for v in detection_result.votes[:, idx]]

    paths: dict[str, Path] = {}
    jpath = out / "report.json"
    write_json(jpath, to_jsonable(report), indent=2, allow_nan=False)
    paths["json"] = jpath

    if plot:
        flat = {**report["results"], **report.get("detection_metrics", {})}
        summary = format_table({k: v for k, v in flat.items() if not isinstance(v, (dict, list))})
        ppath = out / "report.png"
        _plot(ppath, detection_result, poison_mask, affected_x, train_images, n_examples, title, summary)
        paths["png"] = ppath
    return paths
