"""What the end-to-end benchmarks of one change share (bench_embedding.py, bench_grouped.py): their repeat / thread /
output options, the spread of repeated runs, and the report with the machine it ran on."""
from __future__ import annotations

import argparse
import statistics
import warnings

import torch

from deltainf._files import write_json
from deltainf.bench import machine_info


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    return p


def start(p: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed options, torch's threads set and EK-FAC's coverage summary (once per model) silenced."""
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    return args


def spread(runs: list[dict]) -> dict:
    """{timing: {median, min, max}} over repeated runs, each a {timing: seconds}."""
    return {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in runs[0]}


def report(args: argparse.Namespace, **results) -> None:
    """Write the results to --out (when given) with the machine and the options."""
    if args.out:
        write_json(args.out, {"machine": machine_info("cpu"),
                              "settings": {k: v for k, v in vars(args).items() if k != "out"}, **results})
