"""transformers' rotary embedding as one native call in eager CPU decode.

Each attention layer of the Llama family rotates q and k with `apply_rotary_pos_emb`, a
module-level function of its modeling file: about 14 small tensor ops (slices, cat, neg,
multiplications, additions) that cost 20 us a layer in a decode step, for a few hundred values
(SmolLM2-135M: 0.6 ms of a 9.5 ms step). `use_native_rotary_embedding(model)` gives the modeling
modules of `model` whose function is, token for token, the Llama one below (rotate_half
included) a stand-in that calls `mlxq.ops.rotary_embedding` (the same roundings: bit-equal
outputs) when that is exact and cheaper:

- eager CPU calls without a gradient, with q, k, cos and sin plain tensors of one float dtype
  and the usual shapes, on up to MAX_POSITIONS positions (decode; a prompt's ops are
  vectorized over its positions and worth their cost);
- anything else (prompts, other devices, autograd, forward-mode AD, `torch.compile`, which
  fuses the original ops itself, tensor subclasses) calls the original function.

The stand-in replaces the module attribute, so every model of that modeling file in the process
uses it: outputs stay bit-equal, only faster. Modules whose function differs in any token
(partial rotary, interleaved pairs, GLM, Cohere, ...) are left alone.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable

import torch
from torch import nn

from mlxq.ops import _forward_mode_active, rotary_embedding
from mlxq.swap import function_body

__all__ = [
    "LLAMA_ROTARY_BODY",
    "LLAMA_ROTATE_HALF_BODY",
    "MAX_POSITIONS",
    "is_stand_in",
    "use_native_rotary_embedding",
]

# Positions (tokens) up to which the op runs: decode and short speculative chunks.
MAX_POSITIONS = 16

# The Llama family's apply_rotary_pos_emb and rotate_half (transformers 5; 119 modeling files
# share them): arguments and body without the docstring, as ast.unparse writes them, without
# whitespace. A module whose functions differ in any token is left alone.
LLAMA_ROTARY_BODY = (
    "q,k,cos,sin,unsqueeze_dim=1:"
    "cos=cos.unsqueeze(unsqueeze_dim);sin=sin.unsqueeze(unsqueeze_dim);"
    "q_embed=q*cos+rotate_half(q)*sin;k_embed=k*cos+rotate_half(k)*sin;"
    "return(q_embed,k_embed)"
)
LLAMA_ROTATE_HALF_BODY = (
    "x:x1=x[...,:x.shape[-1]//2];x2=x[...,x.shape[-1]//2:];returntorch.cat((-x2,x1),dim=-1)"
)

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _fits(q, k, cos, sin, unsqueeze_dim) -> bool:
    """Whether the op computes this call exactly as the Llama function would (see module doc).
    Plain tests in order of cost: this runs once per layer per token."""
    if not (
        type(q) is torch.Tensor
        and type(k) is torch.Tensor
        and type(cos) is torch.Tensor
        and type(sin) is torch.Tensor
    ):
        return False
    # before any test of a size: under torch.compile / torch.export each would add a guard
    # (torch.export then refuses a dynamic sequence length), and the traced call never runs the op
    if torch.compiler.is_compiling() or _forward_mode_active():
        return False
    if q.device.type != "cpu" or type(unsqueeze_dim) is not int or unsqueeze_dim not in (1, 2):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    if not (q.dtype == k.dtype == cos.dtype == sin.dtype) or q.dtype not in _FLOATS:
        return False
    batch, positions, dim = cos.shape
    axis = 2 if unsqueeze_dim == 1 else 1  # where q and k keep their positions
    if positions > MAX_POSITIONS or dim % 2 or batch not in (1, q.shape[0]):
        return False
    if (q.shape[axis], q.shape[3], k.shape[axis], k.shape[3], k.shape[0]) != (
        positions,
        dim,
        positions,
        dim,
        q.shape[0],
    ):
        return False
    return not (
        torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or cos.requires_grad or sin.requires_grad)
    )


def is_stand_in(fn: object) -> bool:
    """Whether `fn` is mlxq's stand-in for a Llama apply_rotary_pos_emb (which calls the op
    where `_fits`)."""
    return hasattr(fn, "_mlxq_original")


def _stand_in(original: Callable) -> Callable:
    """apply_rotary_pos_emb through the op where _fits, else `original`."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *args, **kwargs):
        if args or kwargs or not _fits(q, k, cos, sin, unsqueeze_dim):
            return original(q, k, cos, sin, unsqueeze_dim, *args, **kwargs)
        if unsqueeze_dim == 1:  # q and k [B, H, L, D]
            return rotary_embedding(q, k, cos, sin)
        q_out, k_out = rotary_embedding(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)

    apply_rotary_pos_emb._mlxq_original = original
    return apply_rotary_pos_emb


def _patch(module: types.ModuleType) -> bool:
    """Install the stand-in in `module` if its functions are the Llama ones (once)."""
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None or is_stand_in(fn):
        return False
    rotate_half = getattr(module, "rotate_half", None)
    if function_body(fn) != LLAMA_ROTARY_BODY:
        return False
    if function_body(rotate_half) != LLAMA_ROTATE_HALF_BODY:
        return False
    module.apply_rotary_pos_emb = _stand_in(fn)
    return True


def use_native_rotary_embedding(model: nn.Module) -> int:
    """Give the modeling modules of `model`'s submodules whose `apply_rotary_pos_emb` is the
    Llama one the native eager CPU path (see the module doc); returns how many modules this call
    changed. Called by mlxq's transformers integration after loading and by `quantize_model`."""
    count, seen = 0, set()
    for sub in model.modules():
        name = type(sub).__module__
        if name in seen:
            continue
        seen.add(name)
        module = sys.modules.get(name)
        if module is not None and _patch(module):
            count += 1
    return count
