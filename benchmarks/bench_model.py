"""Whole-model benchmark: an MLX checkpoint (SmolLM2-135M 4-bit unless --model names another),
mlxq vs mlx-lm vs llama.cpp vs dense transformers; on the CPU, or the GPU with --device cuda.

    python benchmarks/bench_model.py [--peers mlxq dense_bf16 dense_fp32 mlx_lm] [--threads 2]

See mlxq.bench.model for what is measured; also `mlxq bench model`.
"""

from mlxq.bench.model import main

if __name__ == "__main__":
    main()
