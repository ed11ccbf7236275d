"""transformers' Llama-family RMSNorm as one native call in eager CPU inference.

The norm's forward is seven small tensor ops (widen, square, mean, add, rsqrt, multiply,
round, multiply); in a small model's decode step the two norms of each layer cost more in
dispatch than in arithmetic (SmolLM2-135M: about 1.1 ms of a 10 ms step for 61 norms). A module
whose class forward is, token for token, the Llama body below gets an instance `forward` that
calls `mlxq.ops.rms_norm` (the same computation: see the op) when that is exact to do:

- eager CPU calls without a gradient on up to MAX_ROWS rows (decode: a prompt's norm is worth
  its seven ops, which torch vectorizes over the rows); anything else (prompts, another device,
  autograd, forward-mode AD, `torch.compile`, which fuses the original ops itself) runs the
  class's own forward;
- other norms (Gemma's `1 + weight`, OLMo-2's rounding after the product, ...) have another
  body and are left alone.

The op sums the squares in double where torch sums them in fp32 in its own order, so the mean
can differ in its last bit; the normalized values then round to the model's dtype, where the
two agree except at rounding ties (checked against transformers' own forward and float64 in
tests/test_cpu_norms.py).
"""

from __future__ import annotations

import torch
from torch import nn

from mlxq._pickling import bind_method
from mlxq.ops import _forward_mode_active, rms_norm
from mlxq.swap import forward_body, forward_owner

__all__ = [
    "LLAMA_RMS_NORM_BODY",
    "MAX_ROWS",
    "give_native_forward",
    "has_native_forward",
    "runs_class_forward",
    "use_native_rms_norm",
]

# Rows (tokens) up to which the op runs: SmolLM2's norm at 1 row took 3 us against 13 for
# transformers' forward, at 512 rows 187 us against 96.
MAX_ROWS = 16

# LlamaRMSNorm.forward without whitespace (transformers 5; Mistral, Qwen2/3, Phi-3 and others
# copy it). A class whose forward differs in any token is left alone.
LLAMA_RMS_NORM_BODY = (
    "input_dtype=hidden_states.dtype"
    "hidden_states=hidden_states.to(torch.float32)"
    "variance=hidden_states.pow(2).mean(-1,keepdim=True)"
    "hidden_states=hidden_states*torch.rsqrt(variance+self.variance_epsilon)"
    "returnself.weight*hidden_states.to(input_dtype)"
)


def _native_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (
        # first: a size test under torch.compile / torch.export would add a guard on the
        # sequence length (torch.export then refuses a dynamic one) for a path never traced
        torch.compiler.is_compiling()
        or hidden_states.device.type != "cpu"
        or not 0 < hidden_states.numel() <= MAX_ROWS * hidden_states.shape[-1]
        or (torch.is_grad_enabled() and (hidden_states.requires_grad or weight.requires_grad))
        or _forward_mode_active()
    ):
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, weight, self.variance_epsilon)


def _is_llama_rms_norm(module: nn.Module) -> bool:
    if forward_body(forward_owner(type(module))) != LLAMA_RMS_NORM_BODY:
        return False
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def runs_class_forward(module: nn.Module) -> bool:
    """Whether `module` runs its class's own forward: no instance forward, or one that only
    binds the class's (what `kernels.kernelize` gives a module it has no kernel for on the
    device: transformers >= 5.25 kernelizes every model it loads when `kernels` is installed)."""
    forward = vars(module).get("forward")
    return forward is None or (
        getattr(forward, "__self__", None) is module
        and getattr(forward, "__func__", None) is type(module).forward
    )


def has_native_forward(module: nn.Module) -> bool:
    """Whether `module` has the native forward :func:`use_native_rms_norm` gives."""
    return getattr(vars(module).get("forward"), "__func__", None) is _native_forward


def give_native_forward(module: nn.Module) -> None:
    """Give the norm `module` the native forward (one :func:`use_native_rms_norm` chose)."""
    module.forward = bind_method(_native_forward, module)


def use_native_rms_norm(model: nn.Module) -> int:
    """Give every Llama-family RMSNorm of `model` the native eager CPU forward (see the module
    doc); returns how many. Called by mlxq's transformers integration after loading."""
    count = 0
    for module in model.modules():
        if "forward" not in vars(module) and _is_llama_rms_norm(module):
            give_native_forward(module)
            count += 1
    return count
