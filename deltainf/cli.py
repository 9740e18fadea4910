"""Command line: ``deltainf demo | detect | evaluate | bench``. Parses arguments and calls one story."""

from __future__ import annotations

import argparse
import sys


def _threshold(text: str):
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"threshold must be a number or 'auto', got {text!r}") from None


def _combine(text: str):
    if text in ("pooled", "any", "all", "majority"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"combine must be pooled, any, all, majority or an int, got {text!r}") from None


def _add_delta_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    p.add_argument("--n-transforms", type=int, default=None, help="transformed copies per affected point (default 50)")
    p.add_argument("--threshold", type=_threshold, default=None, help="ΔInfl vote threshold, a number or 'auto'")
    p.add_argument("--tolerance", type=int, default=None,
                   help="copies per affected point allowed to miss the threshold (default: set by the number "
                        "of points)")
    p.add_argument("--combine", type=_combine, default=None,
                   help="how several affected points combine: pooled (default), any, all, majority, or an int m")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltainf", description="Find and remove poisoned training data with "
                                     "Δ-Influence.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="poison a dataset, detect the poisons, unlearn them, report")
    p.add_argument("--attack", default="badnet", choices=["badnet", "frequency"])
    p.add_argument("--dataset", default="digits",
                   help="digits (bundled, default) | cifar10:PATH | cifar100:PATH | imagefolder:PATH | synthetic:N")
    p.add_argument("--out", default="out/demo", help="output folder (report.json, report.png, checkpoints)")
    p.add_argument("--points", type=int, default=None,
                   help="affected test points to trace: the first N triggered test inputs sent to the target "
                        "(default 10)")
    _add_delta_options(p)

    p = sub.add_parser("detect", help="run Δ-Influence on your own model checkpoint and data")
    p.add_argument("--checkpoint", required=True, help="model checkpoint written by deltainf (safetensors)")
    p.add_argument("--dataset", required=True, help="training data spec, as for demo")
    p.add_argument("--affected", default=None, help="tensor file (.pt/.safetensors) with the affected input(s)")
    p.add_argument("--test-index", type=int, nargs="+", default=None,
                   help="or: index (or indices) of the affected input(s) in the test split")
    p.add_argument("--label", type=int, default=None, help="adversarial label (default: the model's prediction)")
    p.add_argument("--factors", default=None, help="reuse EK-FAC factors saved by an earlier run")
    p.add_argument("--out", default="out/detect")
    _add_delta_options(p)

    p = sub.add_parser("evaluate", help="compare detectors and unlearning methods across attacks and seeds")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--attacks", default="badnet,frequency,witches-brew")
    p.add_argument("--detectors", default="all")
    p.add_argument("--unlearn", default="exact,cf,ga,ssd,scrub,badt")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="out/evaluate")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("bench", help="benchmark the kernels on this machine")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"])
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    p.add_argument("--out", default=None, help="write the rows and machine info as JSON")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from deltainf import stories

    try:
        if args.command == "demo":
            stories.demo(attack=args.attack, dataset=args.dataset, out=args.out, seed=args.seed, points=args.points,
                         n_transforms=args.n_transforms, threshold=args.threshold, tolerance=args.tolerance,
                         combine=args.combine, progress=not args.no_progress)
        elif args.command == "detect":
            stories.detect(checkpoint=args.checkpoint, dataset=args.dataset, out=args.out, affected=args.affected,
                           test_index=args.test_index, label=args.label, factors=args.factors, seed=args.seed,
                           n_transforms=args.n_transforms, threshold=args.threshold, tolerance=args.tolerance,
                           combine=args.combine, progress=not args.no_progress)
        elif args.command == "evaluate":
            from deltainf import evaluate

            evaluate.run(dataset=args.dataset, attacks=args.attacks, detectors=args.detectors, unlearn=args.unlearn,
                         seeds=args.seeds, out=args.out, progress=not args.no_progress)
        elif args.command == "bench":
            stories.bench(device=args.device, quick=args.quick, out=args.out)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"deltainf {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
