"""Batched sign vote: kernel vs reference.py vs memory-copy bandwidth.

Thin wrapper over deltainf.bench (the numbers, formulas and checks live there). Example:

    nice python benchmarks/bench_sign_vote.py --device cpu --dtype float32 --out benchmarks/results/sign_vote.json

Flags: --device cpu|cuda, --dtype float32|float64|float16|bfloat16, --sizes (see --help), --out FILE.json,
--quick (tiny sizes), --min-run-time SECONDS.
"""

from deltainf.bench import main

if __name__ == "__main__":
    raise SystemExit(main(ops_=["sign_vote"], prog="bench_sign_vote.py"))
