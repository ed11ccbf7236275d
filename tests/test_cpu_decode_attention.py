"""mlxq.ops.decode_attention (csrc/cpu/attention_*): attention of a few queries against a KV
cache, held to float64 attention on the same (upcast) inputs, on every CPU kernel set; its
vector exp to float64 exp; its fake kernel under torch.compile; its argument checks; and a
tiny bf16 Llama decoding through it against the fp32-widening path it replaced."""

from __future__ import annotations

import contextlib

import mlxq
import pytest
import torch
from mlxq.integrations import cpu_attention
from mlxq.ops import decode_attention

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference(q, k, v, mask, scale):
    """Attention in float64 on q, k, v upcast from their dtype; rows that attend nothing give 0
    (as torch's scaled_dot_product_attention)."""
    rep = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(rep, 1)
    v64 = v.double().repeat_interleave(rep, 1)
    s = q.double() @ k64.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v64


def assert_close_to_reference(got, want, dtype, v):
    """fp32 arithmetic (a few ulps of the largest |v|), then one rounding to `dtype`."""
    assert got.dtype == dtype and got.is_contiguous()
    fp32 = 4e-6 * v.float().abs().max().item()
    rounding = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    tol = fp32 + rounding * want.abs() + (2.0**-25 if dtype == torch.float16 else 0.0)
    err = (got.double() - want).abs()
    assert (err <= tol).all(), f"max error {err.max().item():.3g}, worst excess {(err - tol).max()}"


INTERVAL_KINDS = ("causal", "window", "left_pad")


def interval_mask(kind, shape):
    """Bool masks of prompts, each row one interval of keys: causal (the queries are the last
    Lq positions), a causal sliding window of 40 keys, and causal with the first 7 keys of the
    last batch masked (left padding) and its first query attending nothing."""
    lq, lk = shape[-2], shape[-1]
    keep = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    if kind == "window":
        keep &= torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq - 39)
    keep = keep.expand(shape).clone()
    if kind == "left_pad":
        keep[-1, ..., :7] = False
        keep[-1, ..., 0, :] = False
    return keep


def make_mask(kind, shape, gen, dtype):
    """A mask of `kind` with shape `shape` ([..., Lq, Lk], broadcastable to the scores)."""
    if kind is None:
        return None
    if kind in INTERVAL_KINDS:  # each row attends one interval of keys: the prompt kernel's masks
        return interval_mask(kind, shape)
    keep = torch.rand(shape, generator=gen) > 0.3
    keep[..., -1] = True  # most rows attend something; fully masked rows have their own test
    if kind == "bool":
        return keep
    add = torch.randn(shape, generator=gen).to(dtype)
    if kind == "float_inf":  # -inf entries, as an additive mask built from a bool one
        return add.masked_fill(~keep, float("-inf"))
    return add.masked_fill(~keep, torch.finfo(dtype).min)  # transformers' finite "minus inf"


# (B, Hkv, Hq/Hkv, Lq, Lk, D, mask kind, mask shape: "b1" [B,1,Lq,Lk], "full", "2d" [Lq,Lk])
CASES = [
    (1, 3, 3, 1, 512, 64, None, None),  # SmolLM2-135M decode
    (1, 3, 3, 1, 513, 64, "bool", "b1"),
    (2, 2, 1, 4, 7, 32, "float", "full"),
    (1, 1, 8, 16, 2048, 128, "bool", "b1"),
    (1, 2, 8, 1, 1, 256, None, None),
    (2, 1, 3, 16, 64, 80, "float_inf", "b1"),
    (1, 4, 1, 4, 2048, 256, "float", "2d"),
    (1, 1, 3, 1, 7, 80, "bool", "full"),
    (2, 2, 3, 16, 513, 32, None, None),
    (1, 2, 1, 1, 64, 128, "float_inf", "full"),
    (1, 1, 1, 3, 100, 30, "bool", "2d"),  # head size not a multiple of 8
    (1, 2, 4, 40, 300, 16, "bool", "b1"),  # more queries than decode uses: row groups
    # prompts (bf16: blocks of 16 rows, one per lane), row groups across heads, partial blocks
    (1, 3, 3, 50, 50, 64, "causal", "b1"),
    (1, 1, 3, 512, 512, 64, "causal", "2d"),
    (2, 1, 4, 37, 101, 96, "window", "b1"),
    (2, 2, 3, 33, 80, 32, "left_pad", "full"),
    (1, 2, 2, 70, 70, 128, "causal", "full"),
    (1, 1, 2, 16, 1024, 64, "window", "b1"),  # one row group: keys split between threads
    (1, 1, 2, 16, 1024, 64, "causal", "b1"),
]


def _case_inputs(case, dtype, gen):
    B, hkv, rep, lq, lk, d, kind, mshape = case
    q = torch.randn(B, hkv * rep, lq, d, generator=gen).to(dtype)
    k = torch.randn(B, hkv, lk, d, generator=gen).to(dtype)
    v = torch.randn(B, hkv, lk, d, generator=gen).to(dtype)
    shape = {"b1": (B, 1, lq, lk), "full": (B, hkv * rep, lq, lk), "2d": (lq, lk), None: None}
    mask = make_mask(kind, shape[mshape], gen, dtype)
    return q, k, v, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_float64(isa, case, dtype, gen):
    q, k, v, mask = _case_inputs(case, dtype, gen)
    scale = q.shape[-1] ** -0.5
    want = reference(q, k, v, mask if mask is None else mask.to(q.device), scale)
    for threads in (1, 2, 4):  # 2 and 4 split keys into blocks that are merged at the end
        with num_threads(threads):
            got = decode_attention(q, k, v, mask, scale)
        assert_close_to_reference(got, want, dtype, v)


def test_default_scale_is_inverse_sqrt_head_dim(gen):
    q, k, v, _ = _case_inputs((1, 2, 2, 1, 33, 48, None, None), torch.float32, gen)
    assert torch.equal(decode_attention(q, k, v), decode_attention(q, k, v, None, 48**-0.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_padded_batch_and_fully_masked_rows(isa, dtype, gen):
    """B=2 with left padding (the shorter sequence's first keys masked), a row that attends
    nothing (0, as torch's sdpa gives) and -inf / finite-minimum float masks."""
    B, hkv, rep, lq, lk, d = 2, 3, 3, 4, 200, 64
    q = torch.randn(B, hkv * rep, lq, d, generator=gen).to(dtype)
    k = torch.randn(B, hkv, lk, d, generator=gen).to(dtype)
    v = torch.randn(B, hkv, lk, d, generator=gen).to(dtype)
    keep = torch.ones(B, 1, lq, lk, dtype=torch.bool)
    keep[1, :, :, :150] = False  # left padding of the second sequence
    keep[0, :, 2, :] = False  # a row that attends nothing
    as_inf = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
    for threads in (1, 2, 4):
        with num_threads(threads):
            got_bool = decode_attention(q, k, v, keep, 0.125)
            got_inf = decode_attention(q, k, v, as_inf, 0.125)
        want = reference(q, k, v, keep, 0.125)
        # (a bool mask also lets the op skip the keys a group of rows never attends, so the
        # two may differ in summation order, not beyond it)
        assert_close_to_reference(got_bool, want, dtype, v)
        assert_close_to_reference(got_inf, want, dtype, v)
        assert (got_bool[0, :, 2] == 0).all()
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1), keep
    )
    assert (sdpa[0, :, 2] == 0).all()  # the rule matched above
    # transformers' finite minimum: the masked keys get exp(min - max) = 0 as well
    as_min = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    rows = keep.any(-1).expand(B, hkv * rep, lq)  # except where every key is masked
    got_min = decode_attention(q, k, v, as_min, 0.125)
    assert_close_to_reference(got_min[rows].contiguous(), want[rows], dtype, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keys_no_row_attends_are_not_read(isa, dtype, gen):
    """A bool mask whose head and tail no row attends (a sliding window; a static cache's unused
    positions): the op reads only the keys in between, and gives what it gives on that slice of
    the cache. NaN there would poison any read of them."""
    B, hkv, rep, lq, lk, d = 2, 3, 3, 2, 768, 64
    q = torch.randn(B, hkv * rep, lq, d, generator=gen).to(dtype)
    k = torch.randn(B, hkv, lk, d, generator=gen).to(dtype)
    v = torch.randn(B, hkv, lk, d, generator=gen).to(dtype)
    keep = torch.zeros(B, 1, lq, lk, dtype=torch.bool)
    keep[0, :, :, 40:517] = True
    keep[1, :, :, 100:300] = True
    keep[1, :, 1, 100] = False
    k[:, :, :40] = float("nan")
    v[:, :, 517:] = float("nan")
    for threads in (1, 2, 4):
        with num_threads(threads):
            got = decode_attention(q, k, v, keep, 0.125)
            sliced = decode_attention(q, k[:, :, 40:517], v[:, :, 40:517], keep[..., 40:517], 0.125)
        assert torch.equal(got, sliced)
        keys = slice(40, 517)
        want = reference(q, k[:, :, keys], v[:, :, keys], keep[..., keys], 0.125)
        assert_close_to_reference(got, want, dtype, v[:, :, keys])
    nothing = torch.zeros(B, 1, lq, lk, dtype=torch.bool)
    assert (decode_attention(q, k, v, nothing, 0.125) == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_key_blocks_that_attend_nothing(isa, dtype, gen):
    """Keys split between threads (one kv head, 1000 keys: 4 blocks on 4 threads) where whole
    blocks are masked for a row, one row attends only the last keys, another nothing."""
    q = torch.randn(1, 4, 3, 64, generator=gen).to(dtype)
    k = torch.randn(1, 1, 1000, 64, generator=gen).to(dtype)
    v = torch.randn(1, 1, 1000, 64, generator=gen).to(dtype)
    keep = torch.rand(1, 1, 3, 1000, generator=gen) > 0.5
    keep[0, 0, 0, :900] = False  # only the last block
    keep[0, 0, 1, :] = False  # nothing
    keep[0, 0, 2, 100:] = False  # only the first block
    want = reference(q, k, v, keep, 0.1)
    for threads in (1, 2, 4):
        with num_threads(threads):
            got = decode_attention(q, k, v, keep, 0.1)
        assert_close_to_reference(got, want, dtype, v)
        assert (got[0, :, 1] == 0).all()


def test_no_keys_gives_zeros():
    q = torch.randn(1, 4, 2, 16, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 0, 16, dtype=torch.bfloat16)
    assert torch.equal(decode_attention(q, k, k), torch.zeros_like(q))


def test_empty_operands():
    q = torch.randn(0, 4, 1, 16)
    k = torch.randn(0, 2, 5, 16)
    assert decode_attention(q, k, k).shape == (0, 4, 1, 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_views_read_in_place(isa, dtype, gen):
    """A StaticCache-like buffer sliced to its first keys, a [B, L, H, D] layout transposed to
    [B, H, L, D] (q and k), and a mask view: the same numbers as contiguous copies, bit for bit."""
    B, hkv, rep, lq, lk, d = 2, 2, 4, 3, 130, 64
    buf_k = torch.randn(B, hkv, 300, d, generator=gen).to(dtype)
    k = buf_k[:, :, :lk]
    v = torch.randn(B, lk, hkv, d, generator=gen).to(dtype).transpose(1, 2)
    q = torch.randn(B, lq, hkv * rep, d, generator=gen).to(dtype).transpose(1, 2)
    mask = (torch.rand(B, 1, lq, 2 * lk, generator=gen) > 0.2)[..., ::2]
    assert not (k.is_contiguous() or v.is_contiguous() or q.is_contiguous())
    got = decode_attention(q, k, v, mask, 0.1)
    want = decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask.contiguous(), 0.1)
    assert torch.equal(got, want)
    assert_close_to_reference(got, reference(q, k, v, mask, 0.1), dtype, v)


def test_vector_exp_within_one_ulp(isa):
    x = torch.cat(
        [
            torch.linspace(-110.0, 90.0, 400_001),
            torch.tensor([0.0, -0.0, 88.72, 88.73, -87.3, -103.9, -104.0, -1e30, 1e30]),
        ]
    )
    specials = torch.tensor([float("-inf"), float("inf"), float("nan")])
    got = mlxq._C.cpu_vector_exp(torch.cat([x, specials]))
    want = torch.exp(x.double()).float()  # float64 exp, rounded once
    normal = (want > 0) & torch.isfinite(want)
    ulps = (got[: len(x)][normal].view(torch.int32) - want[normal].view(torch.int32)).abs()
    assert ulps.max().item() <= 1
    assert torch.equal(got[: len(x)][~normal], want[~normal])  # 0, subnormals' ends, inf
    assert got[-3].item() == 0.0 and got[-2].item() == float("inf") and got[-1].isnan()


def test_torch_compile_fullgraph(gen):
    def f(q, k, v, mask):
        return decode_attention(q, k, v, mask, 0.125) * 2

    q, k, v, mask = _case_inputs((1, 3, 3, 1, 77, 64, "bool", "b1"), torch.bfloat16, gen)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, k, v, mask), f(q, k, v, mask))
    dynamic = torch.compile(f, fullgraph=True, dynamic=True, backend="inductor")
    for lk in (50, 90):
        q, k, v, mask = _case_inputs((1, 3, 3, 1, lk, 64, "bool", "b1"), torch.bfloat16, gen)
        assert torch.equal(dynamic(q, k, v, mask), f(q, k, v, mask))


def test_opcheck(gen):
    """torch.library.opcheck: schema, autograd registration, the fake kernel against the real
    one, AOT dispatch with dynamic shapes; with and without a mask, no keys, strided k."""
    q, k, v, mask = _case_inputs((2, 2, 3, 2, 40, 32, "float", "b1"), torch.bfloat16, gen)
    cases = [
        (q, k, v, mask, 0.2),
        (q, k, v, mask > 0, None),
        (q, k, v, None, None),
        (q, k[:, :, :0], v[:, :, :0], None, 0.5),
        (q.float(), k.float().transpose(1, 2).contiguous().transpose(1, 2), v.float(), None, 1.0),
    ]
    for args in cases:
        result = torch.library.opcheck(torch.ops.mlxq.decode_attention.default, args)
        assert set(result.values()) == {"SUCCESS"}, result


def test_meta_tensors_give_the_output_shape():
    q = torch.empty(2, 8, 3, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 2, 100, 64, device="meta", dtype=torch.bfloat16)
    out = decode_attention(q, k, k, torch.empty(2, 1, 3, 100, device="meta", dtype=torch.bool))
    assert out.shape == (2, 8, 3, 64) and out.dtype == torch.bfloat16


def _bad_calls():
    q = torch.randn(1, 6, 1, 32)
    k = torch.randn(1, 2, 10, 32)
    return [
        ((q.half(), k, k, None), TypeError, "one dtype"),
        ((q.int(), k.int(), k.int(), None), TypeError, "q must be float32"),
        ((q[0], k, k, None), ValueError, "q must be \\[batch, heads, queries, head_dim\\]"),
        ((q, k[0], k[0], None), ValueError, "k must be"),
        ((q, k, k[:, :, :5], None), ValueError, "v shape"),
        ((q, torch.randn(1, 4, 10, 32), torch.randn(1, 4, 10, 32), None), ValueError, "divide"),
        ((q, k[..., :16], k[..., :16], None), ValueError, "head_dim"),
        ((q, torch.randn(2, 2, 10, 32), torch.randn(2, 2, 10, 32), None), ValueError, "batch"),
        ((q, torch.randn(1, 2, 10, 64)[..., ::2], k, None), ValueError, "unit-stride"),
        ((q, k, k, torch.ones(1, 1, 1, 11, dtype=torch.bool)), ValueError, "mask shape"),
        ((q, k, k, torch.ones(1, 4, 1, 10, dtype=torch.bool)), ValueError, "mask shape"),
        ((q, k, k, torch.ones(1, 1, 1, 1, 10, dtype=torch.bool)), ValueError, "mask shape"),
        ((q, k, k, torch.ones(1, 1, 1, 10, dtype=torch.int32)), TypeError, "mask must be bool"),
        ((q, k, k.to("meta"), None), ValueError, "one device"),
        # a NaN / infinite scale gave finite garbage (the default scale's result, or zeros)
        ((q, k, k, None, float("nan")), ValueError, "scale must be finite, got nan"),
        ((q, k, k, None, float("inf")), ValueError, "scale must be finite, got inf"),
    ]


@pytest.mark.parametrize("call", range(len(_bad_calls())))
def test_bad_arguments_are_refused_by_the_op_and_the_fake_kernel(call):
    args, error, message = _bad_calls()[call]
    with pytest.raises(error, match=message):
        decode_attention(*args)
    if message == "one device":
        return
    meta = tuple(
        torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
        if isinstance(a, torch.Tensor)
        else a
        for a in args
    )
    with pytest.raises(error, match=message):
        decode_attention(*meta)


def test_no_gradient():
    q = torch.randn(1, 2, 1, 16, requires_grad=True)
    k = torch.randn(1, 2, 4, 16)
    out = decode_attention(q, k, k)
    with pytest.raises(RuntimeError, match="no gradient"):
        out.sum().backward()


# --- a whole model ---------------------------------------------------------------------------


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    assert cpu_attention.use_fp32_decode_attention(model)
    return model


def _generate(model, prompt, attention_mask, native: bool, monkeypatch, **generate_kwargs):
    calls = []
    real = cpu_attention.native_arguments

    def spy(*args):
        native = real(*args)
        if native is not None:  # the op runs (from the interface or the flat decode step)
            calls.append((args[1].shape[-2], args[2].shape[-2]))  # queries, keys
        return native

    with monkeypatch.context() as m:
        m.setattr(cpu_attention, "NATIVE_DECODE", native)
        m.setattr(cpu_attention, "native_arguments", spy)
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=attention_mask,
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                **generate_kwargs,
            )
    return out, calls


@pytest.mark.parametrize(
    "prompt_len,padded,cache",
    [(20, False, "dynamic"), (20, True, "dynamic"), (9, False, "dynamic"), (20, True, "static")],
    ids=["prompt20", "prompt20_left_padded_pair", "prompt9_causal_without_mask", "static_cache"],
)
def test_tiny_llama_decodes_as_the_widening_path(prompt_len, padded, cache, gen, monkeypatch):
    """Greedy tokens and logits of a bf16 Llama decoding through the op equal those of the
    fp32-widening path (the same fp32 attention, summed in another order), up to near-ties.
    The prompt takes the op too (its scores are under MAX_PROMPT_SCORES), with sdpa's causal
    rule."""
    model = _tiny_llama(int(torch.randint(0, 2**31, (1,), generator=gen)))
    prompt = torch.randint(0, 256, (2 if padded else 1, prompt_len), generator=gen)
    attention_mask = torch.ones_like(prompt)
    if padded:
        attention_mask[1, :4] = 0
        prompt[1, :4] = 0
    kwargs = {"cache_implementation": cache}
    new, native_calls = _generate(model, prompt, attention_mask, True, monkeypatch, **kwargs)
    old, old_calls = _generate(model, prompt, attention_mask, False, monkeypatch, **kwargs)
    layers = model.config.num_hidden_layers
    assert (prompt_len + 11) ** 2 <= cpu_attention.MAX_PROMPT_SCORES  # so prompts take the op
    prefill = [prompt_len] * layers
    assert [n for n, _ in native_calls] == prefill + [1] * (11 * layers) and old_calls == []
    # a dynamic cache grows by a key a step; a static one hands over its whole buffer (prompt
    # and new tokens but the last) every step, and the mask cuts it
    keys = {k for _, k in native_calls[len(prefill) :]}
    grown = set(range(prompt_len + 1, prompt_len + 12))
    assert keys == ({prompt_len + 11} if cache == "static" else grown)
    tol = 0.01  # measured: bit-equal logits, or 1 bf16 ulp (0.004 at |logit| ~ 0.8)
    for step, (a, b) in enumerate(zip(old.logits, new.logits, strict=True)):
        assert (a.float() - b.float()).abs().max().item() <= tol, step
        ta, tb = old.sequences[:, prompt_len + step], new.sequences[:, prompt_len + step]
        if not torch.equal(ta, tb):  # allowed only where the old path had a near-tie
            top2 = a.float().topk(2).values
            assert ((top2[:, 0] - top2[:, 1])[ta != tb] <= 2 * tol).all(), step
            break
