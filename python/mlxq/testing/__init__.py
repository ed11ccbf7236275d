"""Testing utilities for mlxq: the MSL emulator (:mod:`mlxq.testing.metal_emulator`)."""
