"""The CPU op checks that .ci/arm64.sh runs on aarch64 (NEON) under qemu-user.

`make OUT.npz` (on x86-64): random weights for every bits x group size x dtype, their
`affine_quantize` results from this x86 build, and the activations of the matmul cases.
`check REF.npz` (on aarch64): quantizes the same weights and requires the packed words,
scales and biases to be bit-identical to x86's, then holds `affine_dequantize` and
`affine_matmul` (decode and GEMM rows, both transposes, odd N, K with tails past the kernels'
unrolled blocks, a batched x) to a float64 reference written here from the format alone
(numpy bit unpacking, no MLX: it has no aarch64 Linux wheel here).

Only torch, numpy and mlxq: it runs in the emulated Python, which has nothing else.
"""

from __future__ import annotations

import sys
import time

import mlxq
import numpy as np
import torch
from mlxq._native import _C

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (N, K in groups): odd N; 3 groups (K = 96 at group 32: a tail after one 64-value block)
# and 9 groups (long enough for every unrolled inner loop, with a tail after it).
WEIGHTS = ((7, 3), (33, 9))
# (M, transpose): M <= 4 decode rows, 5 (a 4-row block + 1), 16 and 17 (the decode/GEMM switch
# at 16 rows), 40 (a GEMM of several tiles); both x @ W.T (qmv) and x @ W (qvm).
MATMULS = ((1, True), (3, True), (5, True), (16, True), (17, True), (40, True),
           (1, False), (4, False), (6, False), (17, False))  # fmt: skip
RAW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def raw(t: torch.Tensor) -> np.ndarray:
    """The tensor's bits as a numpy integer array (bf16 has no numpy dtype)."""
    if t.dtype == torch.uint32:
        return t.contiguous().view(torch.int32).numpy()
    return t.contiguous().view(RAW[t.dtype]).numpy()


def from_raw(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).view(dtype)


def weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A layer-like fp32 weight with the quantizer's corner cases: rows of different scale and
    offset (all-positive groups get a negative scale), a constant group and a zero group."""
    w = torch.randn((n, k), generator=gen)
    w = w * torch.exp(torch.randn((n, 1), generator=gen)) + torch.randn((n, 1), generator=gen)
    w[0, :32] = 0.75
    w[-1, -32:] = 0.0
    return w


def cases():
    """(name, bits, group size, dtype name, N, K) of every weight."""
    for bits in BITS:
        for gs in GROUP_SIZES:
            for dname in DTYPES:
                for n, groups in WEIGHTS:
                    yield f"b{bits}_g{gs}_{dname}_n{n}", bits, gs, dname, n, groups * gs


def extreme_cases():
    """(name, bits, dtype name) of the weights at the edges of each dtype's range."""
    for bits in BITS:
        for dname in DTYPES:
            yield f"extreme_b{bits}_{dname}", bits, dname


def extreme_weight(dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Groups of 64 at the edges of the dtype's range: subnormal, smallest normal, largest
    finite (spread and constant, both signs), and one huge value among ordinary ones."""
    info = torch.finfo(dtype)
    tiny_sub = info.smallest_normal / 2**3
    rows = [
        torch.randn(64, generator=gen) * tiny_sub,  # subnormal (rounds to 0 for some)
        torch.randn(64, generator=gen) * info.smallest_normal,
        torch.rand(64, generator=gen) * info.max,
        -torch.rand(64, generator=gen) * info.max,
        torch.full((64,), info.max),
        torch.full((64,), -info.max),
        torch.cat([torch.randn(63, generator=gen), torch.tensor([info.max / 2])]),
        torch.zeros(64),
    ]
    return torch.stack(rows).to(dtype)


def big_x_weight(gen: torch.Generator) -> torch.Tensor:
    """|W| in [0.01, 0.05], one sign per row: x at the dtype's largest finite value times W is
    finite, and so must every output be (tests/test_ops_extremes.py's case)."""
    sign = torch.where(torch.rand(16, 1, generator=gen) < 0.5, -1.0, 1.0)
    return sign * (0.01 + 0.04 * torch.rand(16, 256, generator=gen))


def make(path: str) -> None:
    gen = torch.Generator().manual_seed(22)
    out: dict[str, np.ndarray] = {}
    for name, bits, gs, dname, n, k in cases():
        dtype = DTYPES[dname]
        w = weight(n, k, gen).to(dtype)
        wq, s, b = mlxq.affine_quantize(w, gs, bits)
        out[f"{name}/w"], out[f"{name}/wq"] = raw(w), raw(wq)
        out[f"{name}/s"], out[f"{name}/b"] = raw(s), raw(b)
        for m, transpose in MATMULS:
            x = torch.randn((m, k if transpose else n), generator=gen).to(dtype)
            out[f"{name}/x{m}{'t' if transpose else 'n'}"] = raw(x)
        out[f"{name}/xbatch"] = raw(torch.randn((2, 3, k), generator=gen).to(dtype))
    for name, bits, dname in extreme_cases():
        dtype = DTYPES[dname]
        w = extreme_weight(dtype, gen)
        wq, s, b = mlxq.affine_quantize(w, 64, bits)
        out[f"{name}/w"], out[f"{name}/wq"] = raw(w), raw(wq)
        out[f"{name}/s"], out[f"{name}/b"] = raw(s), raw(b)
    np.savez(path, **out)
    print(f"wrote {len(out)} arrays to {path} (x86-64, mlxq kernels: {_C.cpu_isa()})")


# --- float64 references, from the format description alone --------------------------------------


def unpack(wq: torch.Tensor, bits: int) -> np.ndarray:
    """Packed rows [N, K*bits/32] (little-endian bit streams) as int64 values [N, K]."""
    words = wq.contiguous().view(torch.int32).numpy().view(np.uint32).astype("<u4")
    stream = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    n, nbits = stream.shape
    stream = stream.reshape(n, nbits // bits, bits).astype(np.int64)
    return (stream << np.arange(bits, dtype=np.int64)).sum(-1)


def dequantize_ref(wq, s, b, gs, bits) -> torch.Tensor:
    q = torch.from_numpy(unpack(wq, bits)).double()
    return s.double().repeat_interleave(gs, -1) * q + b.double().repeat_interleave(gs, -1)


def tolerance(ref_abs: torch.Tensor, ref: torch.Tensor, k: int, dtype: torch.dtype):
    """fp32 dequantize + k-term fp32 sum, rounded once to `dtype` (tests/oracles.py's bound)."""
    bound = (k + 4) * (torch.finfo(torch.float32).eps / 2) * ref_abs
    if dtype != torch.float32:
        u = torch.finfo(dtype).eps / 2
        bound = bound + u * (ref.abs() + bound) + torch.finfo(dtype).tiny
    return bound + 1e-30


class Checks:
    def __init__(self) -> None:
        self.passed, self.failures = 0, []

    def expect(self, ok: bool, what: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)
            print(f"FAIL {what}", flush=True)

    def within(self, got: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, what: str) -> None:
        if got.shape != ref.shape:
            return self.expect(False, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
        err = (got.double() - ref).abs()
        bad = ~(err <= tol)  # NaN counts as bad
        if bad.any():
            i = int(torch.where(bad.flatten())[0][0])
            what += (
                f": {int(bad.sum())}/{err.numel()} out of tolerance, first at flat {i}: got "
                f"{got.flatten()[i].item()!r}, ref {ref.flatten()[i].item()!r}, "
                f"tol {tol.flatten()[i].item():.3g}"
            )
        self.expect(not bad.any(), what)


def check(path: str) -> int:
    isa = _C.cpu_isa()
    print(f"mlxq kernels: {isa} (torch {torch.__version__}, threads {torch.get_num_threads()})")
    ref = np.load(path)
    c = Checks()
    c.expect(isa == "neon", f"cpu_isa() is {isa!r}, not 'neon'")
    t0 = time.time()
    for name, bits, gs, dname, n, k in cases():
        dtype = DTYPES[dname]
        w = from_raw(ref[f"{name}/w"], dtype)
        wq, s, b = mlxq.affine_quantize(w, gs, bits)
        for part, got in (("wq", wq), ("s", s), ("b", b)):
            c.expect(
                np.array_equal(raw(got), ref[f"{name}/{part}"]),
                f"{name}: quantize {part} differs from x86-64 bit for bit",
            )
        wd = dequantize_ref(wq, s, b, gs, bits)
        wd_abs = dequantize_ref(wq, s.abs(), b.abs(), gs, bits)
        deq = mlxq.affine_dequantize(wq, s, b, gs, bits)
        c.expect(deq.dtype == dtype, f"{name}: dequantize dtype {deq.dtype}")
        if dtype == torch.float32:  # within one ulp of the terms' magnitude
            tol = torch.finfo(dtype).eps * wd_abs + torch.finfo(dtype).tiny
            c.within(deq, wd, tol, f"{name}: dequantize")
        else:  # MLX's rounding, exactly: s*q rounded to the dtype, then + b rounded again
            q = torch.from_numpy(unpack(wq, bits)).double()
            sq = (s.double().repeat_interleave(gs, -1) * q).to(dtype)
            exact = (sq.double() + b.double().repeat_interleave(gs, -1)).to(dtype)
            c.within(deq, exact.double(), torch.zeros(()), f"{name}: dequantize (bit-exact)")
        xs = [(f"x{m}{'t' if tr else 'n'}", tr) for m, tr in MATMULS] + [("xbatch", True)]
        for key, transpose in xs:
            x = from_raw(ref[f"{name}/{key}"], dtype)
            y = mlxq.affine_matmul(x, wq, s, b, gs, bits, transpose)
            w64, w64_abs = (wd.T, wd_abs.T) if transpose else (wd, wd_abs)
            r, r_abs = x.double() @ w64, x.double().abs() @ w64_abs
            c.expect(y.dtype == dtype, f"{name} {key}: matmul dtype {y.dtype}")
            depth = k if transpose else n
            c.within(y, r, tolerance(r_abs, r, depth, dtype), f"{name} {key}: matmul")
    for name, bits, dname in extreme_cases():
        wq, s, b = mlxq.affine_quantize(from_raw(ref[f"{name}/w"], DTYPES[dname]), 64, bits)
        for part, got in (("wq", wq), ("s", s), ("b", b)):
            c.expect(
                np.array_equal(raw(got), ref[f"{name}/{part}"]),
                f"{name}: quantize {part} differs from x86-64 bit for bit",
            )
    gen = torch.Generator().manual_seed(18)
    for bits in BITS:
        for dname, dtype in DTYPES.items():
            wq, s, b = mlxq.affine_quantize(big_x_weight(gen).to(dtype), 64, bits)
            wd = dequantize_ref(wq, s, b, 64, bits)
            wd_abs = dequantize_ref(wq, s.abs(), b.abs(), 64, bits)
            for m in (1, 3, 20):
                for transpose in (True, False):
                    x = torch.randn((m, 256 if transpose else 16), generator=gen)
                    x[:, 3] = torch.finfo(dtype).max
                    x = x.to(dtype)
                    y = mlxq.affine_matmul(x, wq, s, b, 64, bits, transpose)
                    w64, w64_abs = (wd.T, wd_abs.T) if transpose else (wd, wd_abs)
                    # explicit products and sums: a BLAS may overflow through its blocking
                    r = (x.double()[:, :, None] * w64[None]).sum(1)
                    r_abs = (x.double().abs()[:, :, None] * w64_abs[None]).sum(1)
                    what = f"b{bits} {dname} M={m} transpose={transpose} x at max"
                    c.expect(bool(torch.isfinite(y).all()), f"{what}: non-finite output")
                    depth = 256 if transpose else 16
                    c.within(y, r, tolerance(r_abs, r, depth, dtype), what)
    print(f"checked {len(list(cases()))} weights in {time.time() - t0:.0f} s")
    print(f"arm64: {c.passed} passed, {len(c.failures)} failed")
    return 1 if c.failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("make", "check"):
        sys.exit("usage: arm64_ops.py make OUT.npz | check REF.npz")
    if sys.argv[1] == "make":
        make(sys.argv[2])
    else:
        sys.exit(check(sys.argv[2]))
