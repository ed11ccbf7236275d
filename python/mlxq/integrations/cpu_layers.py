"""transformers' Llama decoder layer as one flat eager step for CPU decode.

A decode step of a small model on the CPU is mostly Python: each layer calls about 15 modules
(norms, attention, seven projections, the MLP, the activation), each through `nn.Module.__call__`
and transformers' wrappers, for a few microseconds of arithmetic apiece (SmolLM2-135M: 1.0-1.5 ms
of a 9 ms step at 512 tokens of context, 2 threads). `use_flat_decode_layers(model)` gives each
decoder layer whose code is, token for token, transformers' Llama code (the decoder layer, its
attention and MLP; LLAMA_*_BODY below; the attention may also be Qwen2's, Mistral's or Qwen3's,
which add a sliding-window argument and Qwen3's q/k norms: ATTENTION_VARIANTS), with Llama
RMSNorms, a SiLU activation and mlxq projections, an instance `forward` that runs the same
tensor operations, in the same order, in one function:

- the norms through `mlxq.ops.rms_norm` and the projections through the mlxq matmul ops, as
  their own forwards do at decode sizes (q/k/v and gate/up in one `affine_matmul_many` call when
  they share a format, bit for bit the separate calls);
- the rotary embedding, the cache update and the attention through the very functions the
  attention module calls (its modeling module's `apply_rotary_pos_emb`, `cache.update` and the
  registered attention interface), with the same arguments; for transformers' DynamicCache
  (its update's code known token for token) the concatenation of each token's keys and values
  goes into buffers that grow (`_cache_update`), the same values without a copy of the whole
  cache a token.

Where every projection is affine, the ops before the cache update (norm, q/k/v, head views,
the rotary op where mlxq's `apply_rotary_pos_emb` stand-in would call it) and those after the
attention (o_proj, residual, norm, gate/up, SiLU, down, residual) run as two native calls,
`mlxq._C.FlatDecoderLayer` (csrc/composite/decoder_layer.cpp), which reach the same ops through
the dispatcher: a Python op call cost about 2 us, next to kernels of a few (SmolLM2-135M
decoded 125 -> 155 tokens/s, 2 threads). The native object holds the layer's tensors; it is
rebuilt when a module holds another tensor (`model.to(dtype)`), and a TorchFunctionMode, which
would not see its calls, gets the Python step.

So the outputs, the cache and the logits are bit-equal to the layer's own forward (tests compare
them). The flat step runs only where that holds and the module calls it skips would do nothing
else: eager CPU calls of up to MAX_ROWS tokens, without a gradient, in eval mode, with no hooks
on the layer's modules and none global, and those modules unchanged since the layer was set up.
Anything else (prompts, autograd, training, `torch.compile`, forward-mode AD, another device,
output capturing through hooks, a PEFT adapter in place of a projection) runs the layer's own
forward. Layers of other code (Gemma's norms and attention, Phi-3's fused projections, ...) are
left alone.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module
from torch.overrides import _get_current_function_mode_stack
from torch.utils._device import DeviceContext
from torch.utils.hooks import RemovableHandle
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from mlxq._native import _C
from mlxq._pickling import bind_method
from mlxq.integrations import cpu_attention
from mlxq.integrations.cpu_norms import MAX_ROWS, _is_llama_rms_norm, _native_forward
from mlxq.integrations.cpu_rope import MAX_POSITIONS, is_stand_in
from mlxq.integrations.offload import is_offloaded
from mlxq.nn import AffineLinear, _matmul
from mlxq.ops import _forward_mode_active
from mlxq.swap import forward_body, forward_owner, function_body

__all__ = [
    "LLAMA_DECODER_BODY",
    "LLAMA_ATTENTION_BODY",
    "LLAMA_MLP_BODY",
    "ATTENTION_VARIANTS",
    "MAX_ROWS",
    "use_flat_decode_layers",
]

# The forwards of transformers' LlamaDecoderLayer, LlamaAttention and LlamaMLP (transformers 5)
# without whitespace; a class whose forward differs in any token is left alone.
LLAMA_DECODER_BODY = (
    "residual=hidden_states"
    "hidden_states=self.input_layernorm(hidden_states)"
    "#SelfAttention"
    "hidden_states,_=self.self_attn(hidden_states=hidden_states,attention_mask=attention_mask,"
    "position_ids=position_ids,cache=cache,use_cache=use_cache,"
    "position_embeddings=position_embeddings,**kwargs,)"
    "hidden_states=residual+hidden_states"
    "#FullyConnected"
    "residual=hidden_states"
    "hidden_states=self.post_attention_layernorm(hidden_states)"
    "hidden_states=self.mlp(hidden_states)"
    "hidden_states=residual+hidden_states"
    "returnhidden_states"
)
LLAMA_ATTENTION_BODY = (
    "input_shape=hidden_states.shape[:-1]"
    "hidden_shape=(*input_shape,-1,self.head_dim)"
    "query_states=self.q_proj(hidden_states).view(hidden_shape).transpose(1,2)"
    "key_states=self.k_proj(hidden_states).view(hidden_shape).transpose(1,2)"
    "value_states=self.v_proj(hidden_states).view(hidden_shape).transpose(1,2)"
    "cos,sin=position_embeddings"
    "query_states,key_states=apply_rotary_pos_emb(query_states,key_states,cos,sin)"
    "ifcacheisnotNone:"
    "key_states,value_states=cache.update(key_states,value_states,self.layer_idx,kwargs=kwargs)"
    "attention_interface:Callable=ALL_ATTENTION_FUNCTIONS.get_interface("
    "self.config._attn_implementation,eager_attention_forward)"
    "attn_output,attn_weights=attention_interface(self,query_states,key_states,value_states,"
    "attention_mask,dropout=0.0ifnotself.trainingelseself.attention_dropout,"
    "scaling=self.scaling,**kwargs,)"
    "attn_output=attn_output.reshape(*input_shape,-1).contiguous()"
    "attn_output=self.o_proj(attn_output)"
    "returnattn_output,attn_weights"
)
# The attention variants of other families that differ from Llama's only in what the flat step
# restates below: a sliding-window argument to the attention interface (Qwen2, Mistral) and
# Qwen3's q/k norms (called as modules, so they keep their own forward and hooks). Each maps to
# (q/k norms, the sliding window of the module).
_SCALING = "scaling=self.scaling,"
_QWEN2_ATTENTION = LLAMA_ATTENTION_BODY.replace(
    _SCALING, _SCALING + "sliding_window=self.sliding_window,#maindiffwithLlama"
)
_MISTRAL_ATTENTION = LLAMA_ATTENTION_BODY.replace(
    _SCALING,
    _SCALING + 'sliding_window=getattr(self.config,"sliding_window",None),#maindiffwithLlama',
)
_QWEN3_ATTENTION = (
    LLAMA_ATTENTION_BODY.replace(
        _SCALING, _SCALING + "sliding_window=self.sliding_window,#diffwithLlama"
    )
    .replace(
        "query_states=self.q_proj(hidden_states).view(hidden_shape).transpose(1,2)",
        "query_states=self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1,2)",
    )
    .replace(
        "key_states=self.k_proj(hidden_states).view(hidden_shape).transpose(1,2)",
        "key_states=self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1,2)",
    )
)
ATTENTION_VARIANTS: dict[str, tuple[bool, Callable[[nn.Module], dict] | None]] = {
    LLAMA_ATTENTION_BODY: (False, None),
    _QWEN2_ATTENTION: (False, lambda attn: {"sliding_window": attn.sliding_window}),
    _MISTRAL_ATTENTION: (
        False,
        lambda attn: {"sliding_window": getattr(attn.config, "sliding_window", None)},
    ),
    _QWEN3_ATTENTION: (True, lambda attn: {"sliding_window": attn.sliding_window}),
}
LLAMA_MLP_BODY = (
    "down_proj=self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))returndown_proj"
)

_FORWARD = itertools.repeat("forward")
# _Plan attributes that a copy builds anew rather than copies (__deepcopy__)
_REBUILT = frozenset(
    ("instance_dicts", "norm_dicts", "hooks_seen", "native")
    + ("held_dicts", "held_names", "held_tensors")
)
# transformers' Cache.update and DynamicLayer.update (transformers 5), as function_body gives
# them: _cache_update restates what they do for a DynamicCache, only while they are these.
CACHE_UPDATE_BODY = (
    "self,key_states:torch.Tensor,value_states:torch.Tensor,layer_idx:int,*args,**kwargs:"
    "ifself.layer_class_to_replicateisnotNone:whilelen(self.layers)<=layer_idx:"
    "self.layers.append(self.layer_class_to_replicate());"
    "ifself.offloading:torch.cuda.default_stream(key_states.device).wait_stream("
    "self.prefetch_stream)self.prefetch_stream.wait_stream(torch.cuda.default_stream("
    "key_states.device))self.prefetch(layer_idx+1,self.only_non_sliding);"
    "keys,values=self.layers[layer_idx].update(key_states,value_states,*args,**kwargs);"
    "ifself.offloading:self.offload(layer_idx,self.only_non_sliding);return(keys,values)"
)
DYNAMIC_LAYER_UPDATE_BODY = (
    "self,key_states:torch.Tensor,value_states:torch.Tensor,*args,**kwargs:"
    "ifnotself.is_initialized:self.lazy_initialization(key_states,value_states);"
    "self.keys=torch.cat([self.keys,key_states],dim=-2);"
    "self.values=torch.cat([self.values,value_states],dim=-2);return(self.keys,self.values)"
)
_KNOWN_DYNAMIC_CACHE = (
    DynamicCache.update is Cache.update
    and function_body(Cache.update) == CACHE_UPDATE_BODY
    and function_body(DynamicLayer.update) == DYNAMIC_LAYER_UPDATE_BODY
)
_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")
_rms_norm = torch.ops.mlxq.rms_norm.default


def _globals_of(cls: type) -> dict:
    """The module globals that `cls.forward`'s code reads (through any decorator)."""
    return inspect.unwrap(forward_owner(cls).forward).__globals__


def _is_silu(act: nn.Module) -> bool:
    if type(act) is nn.SiLU:
        return not act.inplace
    return forward_body(forward_owner(type(act))) == "returnnn.functional.silu(input)"


class _Plan:
    """What the flat step of one layer reads, checked once when the layer is set up; `intact()`
    checks at each call that nothing it skips would do more than it does."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn
        self.norms = (layer.input_layernorm, layer.post_attention_layernorm)
        self.qkv = tuple(getattr(attn, n) for n in _QKV)
        self.o_proj = attn.o_proj
        self.gate_up = tuple(getattr(mlp, n) for n in _GATE_UP)
        self.down_proj = mlp.down_proj
        self.act = mlp.act_fn
        self.attn_globals = _globals_of(type(attn))
        self.qk_norms, self.window = ATTENTION_VARIANTS[forward_body(forward_owner(type(attn)))]
        self.skipped = (attn, mlp, self.act, *self.qkv, self.o_proj, *self.gate_up, self.down_proj)
        # The children of the layer, its attention and its MLP as they were: a replaced child
        # (a PEFT adapter, say) changes its parent's `_modules`.
        self.children = tuple(
            (parent._modules, tuple(parent._modules.values())) for parent in (layer, attn, mlp)
        )
        self._watch()

    def _watch(self) -> None:
        """What `intact` and `native_layer` read, from the plan's modules as they are now."""
        self.instance_dicts = tuple(m.__dict__ for m in self.skipped)
        self.norm_dicts = tuple(m.__dict__ for m in self.norms)
        self.hooks_seen = -1  # RemovableHandle.next_id when no hook was found last
        self._build_native()

    def __deepcopy__(self, memo: dict) -> _Plan:
        """The plan of a copied layer (`copy.deepcopy(model)`): its modules are the copies (the
        layer's children are copied before its plan), the modeling module's globals are shared,
        and the native object is built from the copied tensors."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in vars(self).items():
            if name in ("attn_globals", "window"):
                setattr(new, name, value)
            elif name in _REBUILT:
                continue
            else:
                setattr(new, name, copy.deepcopy(value, memo))
        new._watch()
        return new

    def __getstate__(self) -> dict:
        """Pickled (`torch.save(model)`) without what is derived from the modules: the
        modeling module's globals, the attention variant and the native object."""
        skip = _REBUILT | {"attn_globals", "qk_norms", "window"}
        return {k: v for k, v in vars(self).items() if k not in skip}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)  # the modules, loaded before the layer's plan
        self.attn_globals = _globals_of(type(self.attn))
        self.qk_norms, self.window = ATTENTION_VARIANTS[
            forward_body(forward_owner(type(self.attn)))
        ]
        self._watch()

    def _build_native(self) -> None:
        """The native step (mlxq._C.FlatDecoderLayer) for the modules' current tensors, where
        every projection is affine; `held_*` list the tensors it holds, where the modules keep
        them (dict, key, tensor)."""
        projections = (*self.qkv, self.o_proj, *self.gate_up, self.down_proj)
        if not all(p.mode == "affine" for p in projections):
            self._use(None, ())
            return
        held = [(n._parameters, "weight") for n in self.norms]
        for p in projections:
            held += [(p._buffers, "weight"), (p._buffers, "scales"), (p._buffers, "biases")]
            held.append((p._parameters, "bias"))
        triples = tuple((d, name, d.get(name)) for d, name in held)

        def args(p: AffineLinear) -> tuple:
            return (p.weight, p.scales, p.biases, p.bias, p.group_size, p.bits)

        native = _C.FlatDecoderLayer(
            self.norms[0].weight,
            self.norms[1].weight,
            [args(p) for p in self.qkv],
            args(self.o_proj),
            [args(p) for p in self.gate_up],
            args(self.down_proj),
            self.attn.head_dim,
        )
        self._use(native, triples)

    def _use(self, native: _C.FlatDecoderLayer | None, held: tuple) -> None:
        """Run `native` (None: the Python step), which holds the (dict, key, tensor) `held`."""
        self.native = native
        self.held_dicts = tuple(d for d, _, _ in held)
        self.held_names = tuple(name for _, name, _ in held)
        self.held_tensors = tuple(tensor for _, _, tensor in held)

    def native_layer(self) -> _C.FlatDecoderLayer | None:
        """The native step, rebuilt first if a module holds another tensor than it does (a
        buffer replaced by `model.to(dtype)`, say); None where a projection is not affine or a
        TorchFunctionMode would miss the native calls (`_no_function_mode`)."""
        if not _no_function_mode():
            return None
        # (map over C functions: each of the ~30 lookups costs no bytecode)
        if not all(
            map(operator.is_, map(dict.get, self.held_dicts, self.held_names), self.held_tensors)
        ):
            self._build_native()
        return self.native

    def _no_hooks(self) -> bool:
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return False
        return not any(
            m._forward_hooks or m._forward_pre_hooks for m in (*self.skipped, *self.norms)
        )

    def intact(self) -> bool:
        # Every forward hook comes with a RemovableHandle, whose class counts them: while the
        # count stands where it stood at the last check that found none, none was added since
        # (a decode step touches every object read here after the weights left the caches, so
        # the 26 hook tables are worth skipping: about 5 us a layer).
        if RemovableHandle.next_id != self.hooks_seen:
            if not self._no_hooks():
                return False
            self.hooks_seen = RemovableHandle.next_id
        for modules, children in self.children:
            if tuple(modules.values()) != children:
                return False
        if any(map(operator.contains, self.instance_dicts, _FORWARD)):
            return False  # an instance forward (accelerate's hooks, say)
        for d in self.norm_dicts:  # the native forward, which calls rms_norm
            if getattr(d.get("forward"), "__func__", None) is not _native_forward:
                return False
        return True


def _no_function_mode() -> bool:
    """Whether no TorchFunctionMode is active but torch.device's (which only places factory
    calls, none of which the step makes): a mode sees the Python step's torch calls, not the
    native calls', so under one the step runs in Python."""
    if not torch._C._is_torch_function_mode_enabled():
        return True
    return all(type(m) is DeviceContext for m in _get_current_function_mode_stack())


def _project(module: AffineLinear, x: torch.Tensor) -> torch.Tensor:
    """AffineLinear.forward without its group."""
    return module.add_bias(_matmul(module, x))


def _projections(modules: tuple[AffineLinear, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of `modules` on x: the group's one call when exactly they form a group (bit
    for bit the separate calls), else one call each."""
    group = modules[0].projection_group
    if group is None or group.members != list(modules):
        return [_project(m, x) for m in modules]
    return [m.add_bias(y) for m, y in zip(modules, group.matmuls(x), strict=True)]


def _cache_update(cache, k: torch.Tensor, v: torch.Tensor, layer_idx: int, kwargs: dict) -> tuple:
    """cache.update(k, v, layer_idx, kwargs=kwargs). For transformers' DynamicCache of
    DynamicLayers (the code known token for token) the concatenation goes into buffers that grow
    (`_C.append_kv`, kept on the layer): the same keys and values, as views of the buffers,
    without a copy of the whole cache every token."""
    layers = cache.layers
    if not (
        type(cache) is DynamicCache
        and _KNOWN_DYNAMIC_CACHE
        and not cache.offloading
        and layer_idx < len(layers)
        and type(layer := layers[layer_idx]) is DynamicLayer
        and layer.is_initialized
    ):
        return cache.update(k, v, layer_idx, kwargs=kwargs)
    # Only the keys/values last made here grow in place: other tensors (a crop's, a reorder's)
    # get new buffers, so that no view handed out before sees a position written again.
    held = layer.__dict__.get("_mlxq_kv")
    ours = held is not None and layer.keys is held[2] and layer.values is held[3]
    kbuf, vbuf = held[:2] if ours else (None, None)
    out = _C.append_kv(kbuf, vbuf, layer.keys, layer.values, k, v)
    if out is None:  # not CPU tensors of one layout and dtype: cat as transformers does
        return cache.update(k, v, layer_idx, kwargs=kwargs)
    layer.keys, layer.values = out[2], out[3]
    layer._mlxq_kv = out
    return out[2], out[3]


def _flat_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache=None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> torch.Tensor:
    plan: _Plan = self._mlxq_flat_plan
    if not (
        # first: a size test while compiling would guard the sequence length (see cpu_norms)
        not torch.compiler.is_compiling()
        and type(hidden_states) is torch.Tensor
        and hidden_states.device.type == "cpu"
        and 0 < hidden_states.numel() <= MAX_ROWS * hidden_states.shape[-1]
        and not torch.is_grad_enabled()
        and not self.training
        and position_embeddings is not None
        and "past_key_values" not in kwargs
        and not _forward_mode_active()
        and plan.intact()
    ):
        return type(self).forward(
            self,
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
    attn = plan.attn
    norm_in, norm_post = plan.norms
    native = plan.native_layer()
    residual = hidden_states
    cos, sin = position_embeddings
    g = plan.attn_globals
    rotary = g["apply_rotary_pos_emb"]
    if native is not None and not plan.qk_norms:
        # the native call applies the rotary op where the stand-in would (it checks the rest)
        native_rotary = (
            is_stand_in(rotary)
            and type(cos) is torch.Tensor
            and type(sin) is torch.Tensor
            and cos.dim() == 3
            and cos.shape[1] <= MAX_POSITIONS
        )
        q, k, v, roped = native.attention_input(
            hidden_states,
            norm_in.variance_epsilon,
            cos if native_rotary else None,
            sin if native_rotary else None,
        )
        if not roped:
            q, k = rotary(q, k, cos, sin)
    else:
        # LlamaAttention.forward, with the projections' and the norm's forwards inlined
        h = _rms_norm(hidden_states, norm_in.weight, norm_in.variance_epsilon)
        hidden_shape = (*h.shape[:-1], -1, attn.head_dim)
        q, k, v = _projections(plan.qkv, h)
        if plan.qk_norms:  # Qwen3: the norms' own modules, on [B, L, H, D]
            q, k = attn.q_norm(q.view(hidden_shape)), attn.k_norm(k.view(hidden_shape))
        q, k, v = (y.view(hidden_shape).transpose(1, 2) for y in (q, k, v))
        q, k = rotary(q, k, cos, sin)
    attn_kwargs = {"position_ids": position_ids, "use_cache": use_cache, **kwargs}
    if cache is not None:
        k, v = _cache_update(cache, k, v, attn.layer_idx, attn_kwargs)
    interface = g["ALL_ATTENTION_FUNCTIONS"].get_interface(
        attn.config._attn_implementation, g["eager_attention_forward"]
    )
    extra = {} if plan.window is None else plan.window(attn)
    call = dict(dropout=0.0, scaling=attn.scaling, **extra, **attn_kwargs)
    if native is not None and interface is cpu_attention._attention:
        # mlxq's interface: its op and the rest of the layer in one native call
        args = cpu_attention.native_arguments(attn, q, k, v, attention_mask, call)
        if args is not None:
            return native.attention_output(q, k, v, *args, residual, norm_post.variance_epsilon)
    out, _ = interface(attn, q, k, v, attention_mask, **call)
    if native is not None:  # the rest of the layer in one native call
        return native.output(out, residual, norm_post.variance_epsilon)
    out = _project(plan.o_proj, out.reshape(*residual.shape[:-1], -1).contiguous())
    hidden_states = residual + out
    # MLP: LlamaMLP.forward with SiLU
    residual = hidden_states
    h = _rms_norm(hidden_states, norm_post.weight, norm_post.variance_epsilon)
    gate, up = _projections(plan.gate_up, h)
    h = _project(plan.down_proj, F.silu(gate) * up)
    return residual + h


def _parameters(fn: Callable) -> list[tuple[str, object, object]]:
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]


def _fits(layer: nn.Module) -> bool:
    """Whether `layer` runs the code the flat step restates (module doc)."""
    owner = forward_owner(type(layer))
    if forward_body(owner) != LLAMA_DECODER_BODY:
        return False
    # the same parameters in the same order, so that positional calls bind alike
    if _parameters(inspect.unwrap(owner.forward)) != _parameters(_flat_forward):
        return False
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return False
    if forward_body(forward_owner(type(attn))) not in ATTENTION_VARIANTS:
        return False
    if forward_body(forward_owner(type(mlp))) != LLAMA_MLP_BODY:
        return False
    norms = (
        getattr(layer, "input_layernorm", None),
        getattr(layer, "post_attention_layernorm", None),
    )
    if not all(n is not None and _is_llama_rms_norm(n) for n in norms):
        return False
    projections = [getattr(attn, n, None) for n in (*_QKV, "o_proj")]
    projections += [getattr(mlp, n, None) for n in (*_GATE_UP, "down_proj")]
    if not all(type(p) is AffineLinear for p in projections):
        return False
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, nn.Module) or not _is_silu(act):
        return False
    g = _globals_of(type(attn))
    return all(
        n in g
        for n in ("apply_rotary_pos_emb", "ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")
    )


def use_flat_decode_layers(model: nn.Module) -> int:
    """Give every decoder layer of `model` that runs transformers' Llama code with mlxq
    projections the flat eager CPU decode step (see the module doc); returns how many layers.
    Called by mlxq's transformers integration after loading and by `quantize_model`."""
    count = 0
    for layer in model.modules():
        if "forward" in vars(layer) or not _fits(layer):
            continue
        # accelerate's offload hooks on the layer's modules load their tensors (meta otherwise)
        # at each module's forward, which the flat step does not call: such layers keep theirs
        if any(is_offloaded(m) for m in layer.modules()):
            continue
        layer._mlxq_flat_plan = _Plan(layer)
        layer.forward = bind_method(_flat_forward, layer)
        count += 1
    return count
