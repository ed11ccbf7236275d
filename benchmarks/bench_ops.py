"""Op benchmark: mlxq vs mlx, torch int4pack, dense torch (see mlxq.bench.ops).

python benchmarks/bench_ops.py [--m 1 8 32] [--bits 4] [--shapes 4096x4096]
"""

from mlxq.bench.ops import main

if __name__ == "__main__":
    main()
