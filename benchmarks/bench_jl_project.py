"""Dense JL projection x (N, p) -> x Omega (N, k): kernel vs reference.py vs torch.mm vs TRAK's BasicProjector.

Thin wrapper over deltainf.bench (the numbers, formulas and checks live there). Example:

    nice python benchmarks/bench_jl_project.py --device cpu --dtype float32 --out benchmarks/results/jl_project.json

Flags: --device cpu|cuda, --dtype float32|float64|float16|bfloat16, --sizes (see --help), --out FILE.json,
--quick (tiny sizes), --min-run-time SECONDS.
"""

from deltainf.bench import main

if __name__ == "__main__":
    raise SystemExit(main(ops_=["jl_project"], prog="bench_jl_project.py"))
