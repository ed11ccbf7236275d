"""The flat eager CPU decode step of transformers' Llama decoder layer
(`integrations/cpu_layers.py`).

Oracle: the layer's own forward (transformers' modules calling mlxq's), which the flat step must
reproduce bit for bit (logits and cache); and every call it must not take goes to that forward.
"""

from __future__ import annotations

import sys

import pytest
import torch
from mlx_models import tiny_float_model, tiny_mlx_checkpoint
from mlxq.integrations import cpu_layers
from mlxq.integrations.cpu_layers import (
    ATTENTION_VARIANTS,
    LLAMA_ATTENTION_BODY,
    LLAMA_DECODER_BODY,
    LLAMA_MLP_BODY,
    MAX_ROWS,
    use_flat_decode_layers,
)
from mlxq.swap import forward_body, forward_owner
from transformers import AutoModelForCausalLM
from transformers.models.llama import modeling_llama

PROMPT = torch.tensor([[1, 400, 2000, 31, 7, 99, 1234, 5]])


def _flat_layers(model) -> list:
    return [m for m in model.modules() if hasattr(m, "_mlxq_flat_plan") and "forward" in vars(m)]


def _unflatten(model) -> None:
    for layer in _flat_layers(model):
        del layer.forward


def _decode(model, steps: int = 6, **kwargs):
    """Prompt, then `steps` greedy decode steps through the cache: (all step logits, cache)."""
    with torch.no_grad():
        out = model(PROMPT, use_cache=True, **kwargs)
        cache, logits = out.past_key_values, [out.logits]
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(tok, past_key_values=cache, use_cache=True, **kwargs)
            cache = out.past_key_values
            logits.append(out.logits)
            tok = out.logits[:, -1:].argmax(-1)
    return torch.cat(logits, dim=1), cache


def _count_flat_steps(monkeypatch) -> list:
    """One entry per flat layer step taken: whether it ran the native calls."""
    calls = []
    real = cpu_layers._Plan.native_layer

    def counted(plan):
        native = real(plan)
        calls.append(native is not None)
        return native

    monkeypatch.setattr(cpu_layers._Plan, "native_layer", counted)
    return calls


def _python_steps_only(monkeypatch) -> None:
    """Plans built from here on run the flat step in Python (as for floating-point modes)."""

    def no_native(plan) -> None:
        plan._use(None, ())

    monkeypatch.setattr(cpu_layers._Plan, "_build_native", no_native)


def _assert_same_cache(a, b) -> None:
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def test_bodies_are_transformers_llama() -> None:
    assert forward_body(forward_owner(modeling_llama.LlamaDecoderLayer)) == LLAMA_DECODER_BODY
    assert forward_body(forward_owner(modeling_llama.LlamaAttention)) == LLAMA_ATTENTION_BODY
    assert forward_body(forward_owner(modeling_llama.LlamaMLP)) == LLAMA_MLP_BODY


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_loaded_checkpoint_decodes_bit_equal(arch, dtype, native, monkeypatch) -> None:
    """A checkpoint written by `mlx_lm convert` (Llama; Qwen2 with q/k/v biases; Qwen3 with q/k
    norms; Mistral with a sliding window of 8, which the 14 positions here pass): every layer
    gets the flat step, native or in Python, and decode gives the logits and the cache of the
    layers' own forward, bit for bit."""
    if not native:
        _python_steps_only(monkeypatch)
    model = AutoModelForCausalLM.from_pretrained(tiny_mlx_checkpoint(arch, 4, 64), dtype=dtype)
    assert len(_flat_layers(model)) == model.config.num_hidden_layers
    assert use_flat_decode_layers(model) == 0  # already done
    calls = _count_flat_steps(monkeypatch)
    logits, cache = _decode(model)
    # 6 decode steps x 2 layers; the prompt (8 rows) takes it too
    assert calls == [native] * (7 * 2)
    _unflatten(model)
    want_logits, want_cache = _decode(model)
    assert torch.equal(logits, want_logits)
    _assert_same_cache(cache, want_cache)


def test_mixed_formats_and_quantize_model_bit_equal(tmp_path, monkeypatch) -> None:
    """`quantize_model` with a recipe: layer 0's v_proj and down_proj at 8 bits (so q/k/v do not
    share a group there), the rest at 4; the flat step follows each projection's format."""
    from mlxq import quantize_model

    float_dir = tiny_float_model("llama", tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    eight = {"bits": 8, "group_size": 64}
    overrides = {"model.layers.0.self_attn.v_proj": eight, "model.layers.0.mlp.down_proj": eight}
    quantize_model(model, bits=4, group_size=64, overrides=overrides)
    layer0 = model.model.layers[0]
    assert layer0.self_attn.v_proj.bits == 8 and layer0.self_attn.q_proj.projection_group is None
    assert len(_flat_layers(model)) == 2
    calls = _count_flat_steps(monkeypatch)
    logits, cache = _decode(model)
    assert calls
    _unflatten(model)
    want_logits, want_cache = _decode(model)
    assert torch.equal(logits, want_logits)
    _assert_same_cache(cache, want_cache)


def test_other_code_is_left_alone() -> None:
    """A layer whose attention (or MLP) code differs in any token keeps its own forward."""
    model = AutoModelForCausalLM.from_pretrained(tiny_mlx_checkpoint("llama", 4, 64))
    for layer in _flat_layers(model):
        del layer.forward

    class OtherAttention(modeling_llama.LlamaAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    class OtherMLP(modeling_llama.LlamaMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    model.model.layers[0].self_attn.__class__ = OtherAttention
    model.model.layers[1].mlp.__class__ = OtherMLP
    assert use_flat_decode_layers(model) == 0
    assert forward_body(OtherAttention) not in ATTENTION_VARIANTS

    class Reordered(modeling_llama.LlamaDecoderLayer):
        """Llama's body, with position_embeddings second: a positional call binds otherwise."""

        def forward(
            self,
            hidden_states,
            position_embeddings=None,
            attention_mask=None,
            position_ids=None,
            cache=None,
            use_cache=False,
            **kwargs,
        ):
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
            # Self Attention
            hidden_states, _ = self.self_attn(
                hidden_states=hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            hidden_states = residual + hidden_states
            # Fully Connected
            residual = hidden_states
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states = self.mlp(hidden_states)
            hidden_states = residual + hidden_states
            return hidden_states

    fresh = AutoModelForCausalLM.from_pretrained(tiny_mlx_checkpoint("llama", 4, 64))
    for layer in _flat_layers(fresh):
        del layer.forward
        layer.__class__ = Reordered
    assert forward_body(Reordered) == LLAMA_DECODER_BODY
    assert use_flat_decode_layers(fresh) == 0


def test_falls_back_where_the_step_does_not_apply(monkeypatch) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("llama", 4, 64), dtype=torch.bfloat16
    )
    want_logits, _ = _decode(model)
    calls = _count_flat_steps(monkeypatch)
    # a prompt of more than MAX_ROWS tokens, a call with gradients, training mode
    long_prompt = torch.arange(MAX_ROWS + 1)[None] + 3
    with torch.no_grad():
        model(long_prompt)
    model(PROMPT)  # grad enabled
    model.train()
    with torch.no_grad():
        model(PROMPT[:, :1])
    model.eval()
    assert calls == []
    # a forward hook on a projection: it must fire, so the layer runs its own forward
    fired = []
    handle = model.model.layers[1].self_attn.q_proj.register_forward_hook(
        lambda m, a, out: fired.append(out.shape)
    )
    logits, _ = _decode(model)
    handle.remove()
    assert len(fired) == 7 and torch.equal(logits, want_logits)
    assert len(calls) == 7  # layer 0 still flat
    calls.clear()
    # a projection replaced after loading (a PEFT adapter, say)
    attn = model.model.layers[0].self_attn
    original = attn.o_proj

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    attn.o_proj = Wrapped(original)
    logits, _ = _decode(model)
    attn.o_proj = original
    assert torch.equal(logits, want_logits) and len(calls) == 7  # layer 1 only
    calls.clear()
    # output capturing (transformers' hooks): hidden states and attentions as the layers give
    logits, _ = _decode(model, output_hidden_states=True)
    _unflatten(model)
    with torch.no_grad():
        flat_free = model(PROMPT, output_hidden_states=True, output_attentions=True)
    assert torch.equal(logits, want_logits)
    use_flat_decode_layers(model)
    with torch.no_grad():
        out = model(PROMPT, output_hidden_states=True, output_attentions=True)
    for a, b in zip(out.hidden_states, flat_free.hidden_states, strict=True):
        assert torch.equal(a, b)
    assert len(out.attentions) == len(flat_free.attentions)  # sdpa gives none
    # transformers left its capturing hooks on the attention modules: no flat step since
    calls.clear()
    logits, _ = _decode(model)
    assert calls == [] and torch.equal(logits, want_logits)


def _ops_run(model, tokens) -> set[str]:
    """The names of the ops that one forward of `tokens` through the cache ran."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(tokens, use_cache=True)
    return {e.key for e in prof.key_averages()}


def test_native_step_applies_the_rotary_op_where_the_stand_in_would(monkeypatch) -> None:
    """The native call runs mlxq::rotary_embedding where the module's apply_rotary_pos_emb is
    mlxq's stand-in, and hands q and k back unrotated to the module's own function otherwise:
    both bit-equal to the layers' own forward."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("llama", 4, 64), dtype=torch.bfloat16
    )
    calls = _count_flat_steps(monkeypatch)
    assert "mlxq::rotary_embedding" in _ops_run(model, PROMPT[:, :1])
    assert calls == [True, True]
    logits, cache = _decode(model)
    stand_in = modeling_llama.apply_rotary_pos_emb
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", stand_in._mlxq_original)
    assert "mlxq::rotary_embedding" not in _ops_run(model, PROMPT[:, :1])
    assert torch.equal(_decode(model)[0], logits)
    _unflatten(model)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", stand_in)
    want_logits, want_cache = _decode(model)
    assert torch.equal(logits, want_logits)
    _assert_same_cache(cache, want_cache)


def test_native_step_follows_replaced_tensors(monkeypatch) -> None:
    """`model.to(dtype)` replaces the projections' buffers: the native step is rebuilt from the
    modules' new tensors, never computed with the ones it held."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("qwen2", 4, 64), dtype=torch.float32
    )
    plan = model.model.layers[0]._mlxq_flat_plan
    before = plan.native_layer()
    assert before is not None
    _decode(model)
    model.to(torch.bfloat16)
    calls = _count_flat_steps(monkeypatch)
    logits, cache = _decode(model)
    assert calls == [True] * (7 * 2)
    assert plan.native_layer() is not before
    held = zip(plan.held_dicts, plan.held_names, plan.held_tensors, strict=True)
    assert plan.held_tensors and all(d.get(name) is t for d, name, t in held)
    _unflatten(model)
    want_logits, want_cache = _decode(model)
    assert torch.equal(logits, want_logits)
    _assert_same_cache(cache, want_cache)


def test_function_mode_sees_every_call_of_the_step(monkeypatch) -> None:
    """A TorchFunctionMode sees torch calls made from Python only, so under one the flat step
    runs in Python (the mode sees its calls); torch.device's mode leaves the native step."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("llama", 4, 64), dtype=torch.bfloat16
    )
    want_logits, _ = _decode(model)
    seen = []

    class Seen(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    calls = _count_flat_steps(monkeypatch)
    with Seen():
        logits, _ = _decode(model)
    assert calls == [False] * (7 * 2) and torch.equal(logits, want_logits)
    assert "affine_matmul_many" in " ".join(seen)
    calls.clear()
    with torch.device("cpu"):
        logits, _ = _decode(model)
    assert calls == [True] * (7 * 2) and torch.equal(logits, want_logits)


def test_native_step_calls_mlxq_attention_itself(monkeypatch) -> None:
    """With mlxq's attention interface (bf16 on the CPU), the native step asks the interface's
    own `native_arguments` and runs the op with the rest of the layer; logits and cache equal the
    layers' own forward, which calls the interface."""
    from mlxq.integrations import cpu_attention

    model = AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("qwen3", 4, 64), dtype=torch.bfloat16
    )
    assert model.config._attn_implementation == cpu_attention.NAME
    asked = []
    real = cpu_attention.native_arguments

    def spy(*args):
        native = real(*args)
        asked.append((sys._getframe(1).f_code.co_name, native is not None))  # who asked
        return native

    monkeypatch.setattr(cpu_attention, "native_arguments", spy)
    logits, cache = _decode(model)
    assert asked == [("_flat_forward", True)] * (7 * 2)
    _unflatten(model)
    want_logits, want_cache = _decode(model)
    assert torch.equal(logits, want_logits)
    _assert_same_cache(cache, want_cache)


def test_deepcopy_gives_the_copy_its_own_step(monkeypatch) -> None:
    """`copy.deepcopy(model)` copies each plan onto the copied modules: the copy decodes through
    its own flat step and tensors (a change to the copy leaves the original alone), bit-equal to
    its layers' own forward."""
    import copy

    model = AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("llama", 4, 64), dtype=torch.bfloat16
    )
    twin = copy.deepcopy(model)
    for layer, twin_layer in zip(model.model.layers, twin.model.layers, strict=True):
        plan = twin_layer._mlxq_flat_plan
        assert plan.attn is twin_layer.self_attn and plan.norms[0] is twin_layer.input_layernorm
        assert plan.native is not layer._mlxq_flat_plan.native
    want_logits, _ = _decode(model)
    with torch.no_grad():
        twin.model.layers[0].mlp.down_proj.scales.mul_(2)  # the copy's tensor, in place
    calls = _count_flat_steps(monkeypatch)
    logits, cache = _decode(twin)
    assert calls == [True] * (7 * 2)
    assert not torch.equal(logits, want_logits)
    assert torch.equal(_decode(model)[0], want_logits)
    _unflatten(twin)
    twin_logits, twin_cache = _decode(twin)
    assert torch.equal(logits, twin_logits)
    _assert_same_cache(cache, twin_cache)


def test_append_kv_is_the_concatenation() -> None:
    """`_C.append_kv` (the flat step's DynamicLayer update) gives torch.cat's keys and values,
    as views of buffers it grows: in place while they have room (earlier results keep their
    values), new buffers when they are full or the keys are not its views; None (cache.update
    then runs) for operands it does not take."""
    from mlxq._native import _C

    gen = torch.Generator().manual_seed(0)

    def heads(length: int) -> torch.Tensor:  # [B, H, L, D] as q/k/v views are: transposed
        return torch.randn(2, length, 3, 16, generator=gen).to(torch.bfloat16).transpose(1, 2)

    keys, values = heads(5).contiguous(), heads(5).contiguous()
    kbuf = vbuf = None
    history = []
    for length in (1, 1, 3, 300, 1):  # 300 outgrows the first buffer
        k, v = heads(length), heads(length)
        want = torch.cat([keys, k], dim=-2), torch.cat([values, v], dim=-2)
        before = None if kbuf is None else kbuf.data_ptr()
        kbuf, vbuf, keys, values = _C.append_kv(kbuf, vbuf, keys, values, k, v)
        assert torch.equal(keys, want[0]) and torch.equal(values, want[1])
        assert keys.data_ptr() == kbuf.data_ptr() and values.data_ptr() == vbuf.data_ptr()
        if length == 1 and before is not None:
            assert kbuf.data_ptr() == before  # appended in place
        history.append((keys, want[0].clone()))
    for got, want_keys in history:
        assert torch.equal(got, want_keys)
    # keys that are not its views (a cropped cache): new buffers, the right values
    cropped = keys[:, :, :7].clone()
    k = heads(1)
    out = _C.append_kv(kbuf, vbuf, cropped, values[:, :, :7].clone(), k, k)
    assert out[0].data_ptr() != kbuf.data_ptr()
    assert torch.equal(out[2], torch.cat([cropped, k], dim=-2))
    assert _C.append_kv(None, None, keys, values, k.float(), k.float()) is None  # dtypes
    assert _C.append_kv(None, None, keys, values, heads(1)[:1], heads(1)[:1]) is None  # batch
    assert _C.append_kv(None, None, keys[0], values[0], k[0], k[0]) is None  # 3-D


def test_dynamic_cache_grows_in_place_and_follows_crops(monkeypatch) -> None:
    """Through the flat step a DynamicCache's keys and values stay views of one buffer per layer
    while decoding (no copy of the cache a token); decode, a crop (which replaces the tensors),
    and more decode give the logits and cache of the layers' own forward, bit for bit. A
    sliding-window cache's layers (Mistral) keep transformers' own update."""

    def run(model):
        with torch.no_grad():
            out = model(PROMPT, use_cache=True)
            cache, logits, buffers = out.past_key_values, [out.logits], []
            for step in range(8):
                if step == 5:
                    seen = cache.layers[0].keys  # a view handed out before the crop
                    seen_values = seen.clone()
                    cache.crop(-3)
                tok = logits[-1][:, -1:].argmax(-1)
                out = model(tok, past_key_values=cache, use_cache=True)
                logits.append(out.logits)
                buffers.append([vars(layer).get("_mlxq_kv") for layer in cache.layers])
        assert torch.equal(seen, seen_values)  # not written again after the crop
        return torch.cat(logits, dim=1), cache, buffers

    model = AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("llama", 4, 64), dtype=torch.bfloat16
    )
    logits, cache, buffers = run(model)
    ptrs = [[None if b is None else b[0].data_ptr() for b in step] for step in buffers]
    assert all(p is not None for p in ptrs[0])
    assert ptrs[0] == ptrs[4]  # decode appended in place
    assert ptrs[5] != ptrs[4] and ptrs[5] == ptrs[7]  # the crop's new tensors: new buffers
    for layer in cache.layers:
        assert layer.keys.data_ptr() == layer._mlxq_kv[0].data_ptr()
    _unflatten(model)
    want_logits, want_cache, _ = run(model)
    assert torch.equal(logits, want_logits)
    _assert_same_cache(cache, want_cache)

    mistral = AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("mistral", 4, 64), dtype=torch.bfloat16
    )
    _, cache = _decode(mistral)
    assert not any("_mlxq_kv" in vars(layer) for layer in cache.layers)


def test_export_with_a_dynamic_sequence_length() -> None:
    """torch.export of a loaded model with a dynamic sequence length: the eager fast paths
    (flat layer, native norm, rotary op) test sizes only outside tracing, so no guard pins the
    length (before: the norm's row test guarded `5 <= L <= 8` and export refused `Dim`)."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("qwen3", 4, 64), dtype=torch.float32
    )
    assert _flat_layers(model)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(ids, use_cache=False).logits

    length = torch.export.Dim("length", min=2, max=64)
    program = torch.export.export(Logits(), (PROMPT[:, :5],), dynamic_shapes=({1: length},))
    with torch.no_grad():
        for ids in (PROMPT[:, :3], PROMPT, torch.arange(40)[None] * 7):
            # eager short calls take the native paths (fp32 sums in another order)
            torch.testing.assert_close(program.module()(ids), model(ids).logits, rtol=0, atol=5e-5)
