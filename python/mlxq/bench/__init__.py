"""Benchmark harnesses: mlxq side by side with its peers, reported as ratios from one run."""
