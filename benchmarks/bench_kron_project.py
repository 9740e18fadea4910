"""Fused per-example projection (features, square-sum and score epilogues): kernel vs reference.py.

Thin wrapper over deltainf.bench (the numbers, formulas and checks live there). Example:

    nice python benchmarks/bench_kron_project.py --device cpu --dtype float32 --out benchmarks/results/kron_project.json

Flags: --device cpu|cuda, --dtype float32|float64|float16|bfloat16, --sizes (see --help), --out FILE.json,
--quick (tiny sizes), --min-run-time SECONDS.
"""

from deltainf.bench import main

if __name__ == "__main__":
    raise SystemExit(main(ops_=["kron_project"], prog="bench_kron_project.py"))
