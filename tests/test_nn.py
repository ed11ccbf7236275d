"""mlxq.nn modules against MLX's own QuantizedLinear / QuantizedEmbedding (the oracle)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as mnn
import mlxq
import numpy as np
import pytest
import torch
from mlxq.nn import AffineEmbedding, AffineLinear, TiedAffineHead
from oracles import assert_product_within, assert_within, matmul_tolerance, weight_refs

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
DTYPES = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}


def _seed_from(gen: torch.Generator) -> None:
    """Fresh data each session (conftest's seed): module inits use torch's global generator."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))


def _assert_fp32_product(got: torch.Tensor, mlx_out: np.ndarray, x: torch.Tensor, module) -> None:
    """fp32 `x @ W.T` of mlxq and of MLX each within the fp32 dequantize + accumulate bound
    (oracles.matmul_tolerance) of the float64 product with the exactly dequantized weight: the
    two sum in different orders, so they differ by up to both bounds, which a fixed 1e-5 did
    not cover for every draw of the data (a CI seed gave 1.2e-5 at |y| = 0.12)."""
    w = mlxq.affine_dequantize(
        module.weight, module.scales, module.biases, module.group_size, module.bits
    ).double()
    ref = x.double() @ w.T
    tol = matmul_tolerance(x.double().abs() @ w.abs().T, ref, x.shape[-1], torch.float32)
    assert_within(got, ref, tol, "mlxq")
    assert_within(torch.from_numpy(mlx_out), ref, tol, "mlx")


def _to_mx(t: torch.Tensor) -> mx.array:
    if t.dtype == torch.bfloat16:
        return mx.array(t.float().numpy()).astype(mx.bfloat16)
    if t.dtype == torch.uint32:
        return mx.array(t.numpy())
    return mx.array(t.numpy())


def _to_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_affine_linear_matches_mlx_quantized_linear(
    bits: int, group_size: int, gen: torch.Generator
) -> None:
    _seed_from(gen)
    linear = torch.nn.Linear(256, 48, bias=True)
    module = AffineLinear.from_float(linear, bits=bits, group_size=group_size)

    ref = mnn.Linear(256, 48, bias=True)
    ref.weight = _to_mx(linear.weight.detach())
    ref.bias = _to_mx(linear.bias.detach())
    qref = mnn.QuantizedLinear.from_linear(ref, group_size=group_size, bits=bits)
    # same packed tensors, bit for bit (the buffers keep MLX's layout)
    np.testing.assert_array_equal(module.weight.numpy(), np.array(qref.weight))
    np.testing.assert_array_equal(module.scales.numpy(), np.array(qref.scales))
    np.testing.assert_array_equal(module.biases.numpy(), np.array(qref.biases))

    x = torch.randn(2, 5, 256)
    got = module(x)
    want = _to_np(qref(_to_mx(x)))
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_affine_linear_activation_dtypes(dtype: torch.dtype, gen: torch.Generator) -> None:
    _seed_from(gen)
    linear = torch.nn.Linear(128, 64, bias=False).to(dtype)
    module = AffineLinear.from_float(linear, bits=4, group_size=64)
    assert module.scales.dtype == dtype and module.weight.dtype == torch.uint32
    qref = mnn.QuantizedLinear(128, 64, bias=False, group_size=64, bits=4)
    qref.weight, qref.scales, qref.biases = (
        _to_mx(module.weight),
        _to_mx(module.scales),
        _to_mx(module.biases),
    )
    x = torch.randn(3, 128).to(dtype)
    got = module(x)
    assert got.dtype == dtype
    if dtype == torch.float32:
        _assert_fp32_product(got.detach(), _to_np(qref(_to_mx(x))), x, module)
    else:
        # half: fp32 math rounded once to the output dtype. MLX's CPU path rounds more often,
        # so the oracle is float64 over the exactly dequantized weight.
        w = mlxq.affine_dequantize(
            module.weight, module.scales.float(), module.biases.float(), 64, 4
        ).double()
        want = x.double() @ w.T
        ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        torch.testing.assert_close(got.double(), want, rtol=ulp, atol=1e-3)


@pytest.mark.parametrize("bits", (3, 4, 8))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_affine_embedding_matches_mlx(bits: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    _seed_from(gen)
    emb = torch.nn.Embedding(100, 64).to(dtype)
    module = AffineEmbedding.from_float(emb, bits=bits, group_size=32)
    qref = mnn.QuantizedEmbedding(100, 64, group_size=32, bits=bits)
    qref.weight, qref.scales, qref.biases = (
        _to_mx(module.weight),
        _to_mx(module.scales),
        _to_mx(module.biases),
    )
    ids = torch.tensor([[0, 5, 99, 5], [7, 7, 1, 42]])
    got = module(ids)
    assert got.shape == (2, 4, 64) and got.dtype == dtype
    # the oracle: MLX's own lookup (mx.dequantize of the rows, in the table's dtype), bit for bit
    want = torch.from_numpy(_to_np(qref(mx.array(ids.numpy().astype(np.int32)))))
    assert torch.equal(got.float(), want)
    # as_linear: the table as an output head, as MLX's tied heads do
    x = torch.randn(3, 64).to(dtype)
    got = module.as_linear(x)
    assert got.dtype == dtype
    if dtype == torch.float32:
        _assert_fp32_product(got, _to_np(qref.as_linear(_to_mx(x))), x, module)
    else:
        # half: fp32 math rounded once (MLX's CPU path rounds more often, so use float64)
        table = mlxq.affine_dequantize(
            module.weight, module.scales.float(), module.biases.float(), 32, bits
        ).double()
        want = x.double() @ table.T
        torch.testing.assert_close(got.double(), want, rtol=2.0**-7, atol=1e-2)
    head = TiedAffineHead(module)
    assert torch.equal(head(x), module.as_linear(x))
    assert list(head.state_dict()) == []  # the head owns no tensors


def test_embedding_gathers_only_requested_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    emb = AffineEmbedding.from_float(torch.nn.Embedding(1000, 64), bits=4, group_size=64)
    seen = []
    import mlxq.nn as mlxq_nn

    real = mlxq_nn.affine_dequantize

    def spy(wq, *args):
        seen.append(wq.shape[0])
        return real(wq, *args)

    monkeypatch.setattr(mlxq_nn, "affine_dequantize", spy)
    emb(torch.tensor([[3, 4, 5]]))
    assert seen == [3]


def test_state_dict_is_mlx_layout_and_to_dtype_keeps_packing() -> None:
    module = AffineLinear.from_float(torch.nn.Linear(96, 32, bias=True), bits=3, group_size=32)
    sd = module.state_dict()
    assert sorted(sd) == ["bias", "biases", "scales", "weight"]
    assert sd["weight"].shape == (32, 96 * 3 // 32) and sd["weight"].dtype == torch.uint32
    assert sd["scales"].shape == (32, 3)
    packed = module.weight.clone()
    module.to(torch.bfloat16)
    assert module.weight.dtype == torch.uint32 and torch.equal(module.weight, packed)
    assert module.scales.dtype == torch.bfloat16
    assert module(torch.randn(2, 96, dtype=torch.bfloat16)).dtype == torch.bfloat16
    fresh = AffineLinear(96, 32, bias=True, bits=3, group_size=32, dtype=torch.bfloat16)
    fresh.load_state_dict(module.state_dict())
    x = torch.randn(4, 96)
    assert torch.equal(fresh(x), module(x))


def test_refused_cast_of_a_plain_model_names_the_layer_path() -> None:
    """A cast the kernels cannot run, on a plain nn.Module (no transformers hook asks first),
    named the layer's class only ("the quantized AffineLinear"); it names its path in the model
    being cast, and the float modules cast before it."""
    m = torch.nn.Sequential(
        torch.nn.LayerNorm(64),
        torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()),
        torch.nn.ModuleDict({"out": torch.nn.Linear(64, 32)}),
    )
    mlxq.quantize_model(m, bits=4, group_size=32)
    for cast, what in (
        (lambda: m.double(), "'1.0' of the Sequential: it would cast it to torch.float64"),
        (lambda: m.to(torch.float64), "'1.0' of the Sequential: it would cast it to torch.float64"),
        (lambda: m.type(torch.float16), "'1.0' of the Sequential: it would cast its packed"),
        (lambda: m[2].double(), "'out' of the ModuleDict: it would cast it"),
    ):
        with pytest.raises(TypeError) as error:
            cast()
        assert str(error.value).startswith(f"mlxq: cannot cast the quantized AffineLinear {what}")
    with pytest.raises(TypeError, match=r"AffineLinear '1\.0' .*1 module\(s\) before it .*'0'"):
        m.double()
    with pytest.raises(TypeError, match=r"^mlxq: cannot cast the quantized AffineLinear: it"):
        m[1][0].double()  # the layer itself: no path


def test_matches_dequantized_float_linear_and_gradients_flow(gen: torch.Generator) -> None:
    _seed_from(gen)
    module = AffineLinear.from_float(torch.nn.Linear(64, 16), bits=6, group_size=32)
    w, w_abs = weight_refs(module.weight, module.scales, module.biases, 32, 6)
    x = torch.randn(5, 64, requires_grad=True)
    y = module(x)
    # x @ W.T + bias in fp32 is a 65-term sum (the bias a term with factor 1): within the derived
    # bound of the float64 result
    ones = torch.ones(5, 1)
    bias = module.bias.detach()[None]
    w_b, w_b_abs = torch.cat([w.T, bias]), torch.cat([w_abs.T, bias.abs()])
    assert_product_within(y, torch.cat([x.detach(), ones], 1), w_b, "y", b_abs=w_b_abs)
    y.sum().backward()
    assert_product_within(x.grad, torch.ones(5, 16), w, "d/dx", b_abs=w_abs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 7}, "bits=7"),
        ({"group_size": 48}, "group_size=48"),
        ({"in_features": 100, "group_size": 32}, "in_features=100"),
    ],
)
def test_bad_format_is_a_clear_error(kwargs: dict, message: str) -> None:
    args = {"in_features": 128, "out_features": 8, "bits": 4, "group_size": 64, **kwargs}
    with pytest.raises(ValueError, match=message):
        AffineLinear(**args)
    with pytest.raises(ValueError, match=message):
        AffineEmbedding(8, args["in_features"], bits=args["bits"], group_size=args["group_size"])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"bits": 4.0}, TypeError, "bits must be an int, got 4.0"),  # was torch.empty's error
        ({"group_size": True}, TypeError, "group_size must be an int"),
        ({"in_features": -64}, ValueError, "in_features must be an int >= 0, got -64"),
        ({"out_features": -8}, ValueError, "out_features must be an int >= 0, got -8"),
    ],
)
def test_bad_argument_types_are_named(kwargs: dict, error: type, message: str) -> None:
    args = {"in_features": 128, "out_features": 8, "bits": 4, "group_size": 64, **kwargs}
    with pytest.raises(error, match=message):
        AffineLinear(**args)


@pytest.mark.parametrize("cls", ["linear", "embedding"])
def test_state_dict_with_converted_words_is_refused(cls: str) -> None:
    """load_state_dict copies with a dtype conversion: float words were turned into other
    words without a word; int32 words (the same bits) still load."""
    if cls == "linear":
        module = AffineLinear.from_float(torch.nn.Linear(64, 8), bits=4, group_size=32)
    else:
        module = AffineEmbedding.from_float(torch.nn.Embedding(8, 64), bits=4, group_size=32)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    words = state["weight"].clone()
    with pytest.raises(RuntimeError, match="weight of Affine.*packed words.*float32"):
        module.load_state_dict({**state, "weight": state["weight"].float()})
    assert torch.equal(module.weight, words)
    module.load_state_dict({**state, "weight": words.view(torch.int32)})
    assert module.weight.dtype == torch.uint32 and torch.equal(module.weight, words)


def test_embedding_rejects_float_ids() -> None:
    emb = AffineEmbedding.from_float(torch.nn.Embedding(10, 32), bits=4, group_size=32)
    with pytest.raises(TypeError, match="integer ids"):
        emb(torch.zeros(2))


def test_meta_modules_give_shapes_as_nn_modules_do() -> None:
    # a meta AffineEmbedding raised "Tensor.item() cannot be called on meta tensors" (its id
    # check), where nn.Embedding on meta gives the output's shape (shape inference, init_empty)
    emb = AffineEmbedding.from_float(torch.nn.Embedding(10, 32), bits=4, group_size=32)
    lin = AffineLinear.from_float(torch.nn.Linear(32, 8), bits=4, group_size=32)
    ids = torch.tensor([[1, 2, 3]], device="meta")
    out = emb.to("meta")(ids)
    assert out.device.type == "meta" and out.shape == (1, 3, 32)
    assert lin.to("meta")(out).shape == (1, 3, 8)


OUT_OF_RANGE = [
    (bad, dtype) for bad in (-1, -10, 10, 11) for dtype in (torch.int64, torch.int32, torch.int16)
] + [(2**40, torch.int64)]


@pytest.mark.parametrize(
    "bad,id_dtype", OUT_OF_RANGE, ids=[f"id{b}-{str(d).split('.')[-1]}" for b, d in OUT_OF_RANGE]
)
def test_embedding_refuses_out_of_range_ids_like_nn_embedding(bad: int, id_dtype) -> None:
    """An id outside [0, num_embeddings) raises IndexError, as nn.Embedding does; it used to
    return a row (id -1 the last one, as negative indexing does)."""
    table = torch.nn.Embedding(10, 32)
    emb = AffineEmbedding.from_float(table, bits=4, group_size=32)
    ids = torch.tensor([[0, 3], [bad, 9]], dtype=id_dtype)
    with pytest.raises(IndexError):
        table(ids.long())
    with pytest.raises(IndexError, match=rf"AffineEmbedding\(10, 32\).*\[0, 10\), got {bad}"):
        emb(ids)
    # the valid ids around it still work, and in every integer dtype
    good = torch.tensor([[0, 3], [9, 9]], dtype=id_dtype)
    assert emb(good).shape == (2, 2, 32)
    assert torch.equal(emb(good), emb(good.long()))


@pytest.mark.parametrize("batch_first", [True, False])
def test_in_proj_multihead_attention_is_torch_mha(batch_first: bool, gen) -> None:
    """InProjMultiheadAttention (nn.MultiheadAttention with its input projection a module) gives
    torch's outputs and attention weights, float or with the projection quantized (against
    torch's MHA holding the dequantized weight)."""
    from mlxq.nn import AffineLinear, InProjMultiheadAttention

    mha = torch.nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.copy_(torch.randn(192, generator=gen))
    ours = InProjMultiheadAttention.from_mha(mha)
    q, x = torch.randn(2, 3, 64, generator=gen), torch.randn(2, 9, 64, generator=gen)
    if not batch_first:  # [L, N, E]
        q, x = q.transpose(0, 1), x.transpose(0, 1)
    for quantized in (False, True):
        if quantized:
            ours.in_proj = AffineLinear.from_float(ours.in_proj, 4, 32)
            with torch.no_grad():
                mha.in_proj_weight.copy_(ours.in_proj.dequantize_weight())
        with torch.no_grad():
            for kwargs in ({}, {"average_attn_weights": False}, {"need_weights": False}):
                want, got = mha(q, x, x, **kwargs), ours(q, x, x, **kwargs)
                torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
                if want[1] is None:
                    assert got[1] is None
                else:
                    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
            y = x * 0.5  # (a value other than the key: its own projection)
            torch.testing.assert_close(ours(q, x, y)[0], mha(q, x, y)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="masks"):
        ours(q, x, x, attn_mask=torch.zeros(3, 9, dtype=torch.bool))
