"""Whole-model benchmark: SmolLM2-135M 4-bit, mlxq vs mlx-lm vs dense transformers.

    python benchmarks/bench_model.py [--peers mlxq dense_bf16 dense_fp32 mlx_lm] [--threads 2]

See mlxq.bench.model for what is measured; also `mlxq bench model`.
"""

from mlxq.bench.model import main

if __name__ == "__main__":
    main()
