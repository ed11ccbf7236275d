"""Casts a quantized layer cannot take: its kernels run in float32, float16 or bfloat16 only
and read the packed words as uint32, so `model.double()`, `.to(torch.float64)` or
`.type(torch.float16)` (which casts the packed words too) would leave a model whose forward
fails later without naming the layer. Quantized modules refuse such a cast before anything
of theirs is cast; the transformers integration asks the first one before the whole model is
(so nothing is cast at all), naming it."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

__all__ = ["KERNEL_DTYPES", "RefusesUnsupportedCasts", "cast_refusal"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cast_refusal(module: torch.nn.Module, fn: Callable) -> str | None:
    """Why `module._apply(fn)` (nn.Module.to/double/type/...) would leave `module` unable to run,
    or None: `fn` is tried on an empty float32 and an empty uint32 tensor on its device."""
    device = next((t.device for t in module.buffers(recurse=False)), None)
    try:
        floats = fn(torch.empty(0, device=device))
        words = fn(torch.empty(0, dtype=torch.uint32, device=device))
    except Exception:  # a cast that fails on its own (from meta, ...) says why itself
        return None
    if isinstance(floats, torch.Tensor) and floats.dtype not in KERNEL_DTYPES:
        return (
            f"it would cast it to {floats.dtype}, and mlxq's quantized kernels run in "
            "float32, float16 or bfloat16 only (dequantize_model gives a float model that can)"
        )
    if isinstance(words, torch.Tensor) and words.dtype != torch.uint32:
        return f"it would cast its packed uint32 words to {words.dtype} (use .to(dtype))"
    if isinstance(floats, torch.Tensor) and floats.dtype == torch.float16:
        # scales or biases beyond float16's range become Inf: NaN logits without a word
        for key, tensor in module.named_buffers(recurse=False):
            if (
                tensor.is_floating_point()
                and tensor.dtype != torch.float16
                and tensor.device.type != "meta"
                and bool(torch.isfinite(tensor).all())
                and not bool(torch.isfinite(tensor.to(torch.float16)).all())
            ):
                return (
                    f"its {key} holds values beyond float16's range (65504), which float16 "
                    "would make infinite (bfloat16 holds them)"
                )
    return None


def _cast_root_and_path(module: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The module whose cast (.to, .double, ...) reached `module`, and `module`'s path in it.

    nn.Module._apply applies the cast to each child in turn, so the `_apply` frames on the stack
    are the chain of parents from the cast model down; each link is named by where the child
    sits in its parent's `_modules`. The chain ends at the first frame that is not a parent
    (a layer cast on its own: itself, path "")."""
    chain, names = [module], []
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self") if frame.f_code.co_name == "_apply" else None
        if isinstance(owner, torch.nn.Module) and owner is not chain[-1]:
            name = next((n for n, m in owner._modules.items() if m is chain[-1]), None)
            if name is None:
                break
            chain.append(owner)
            names.append(name)
        frame = frame.f_back
    return chain[-1], ".".join(reversed(names))


def _cast_before(root: torch.nn.Module, module: torch.nn.Module, path: str) -> list[str]:
    """The modules with tensors of their own that nn.Module._apply cast before reaching `module`
    (at `path` in `root`): those before it in pre-order, less its parents (cast after it)."""
    out = []
    for name, m in root.named_modules():
        if m is module:
            break
        parent = name == "" or path.startswith(name + ".")
        if not parent and (any(True for _ in m.parameters(recurse=False)) or m._buffers):
            out.append(name)
    return out


class RefusesUnsupportedCasts:
    """nn.Module mixin of the quantized layers: `_apply` (behind .to, .double, .type, ...)
    refuses a cast the layer cannot run in before any of its tensors is cast, naming its path
    in the model being cast (the modules applied before it were cast already: a transformers
    model asks its first quantized module first, so that nothing is)."""

    def _apply(self, fn, recurse=True):
        why = cast_refusal(self, fn)
        if why is not None:
            root, path = _cast_root_and_path(self)
            where = f" {path!r} of the {type(root).__name__}" if path else ""
            cast = _cast_before(root, self, path)
            done = (
                f"; {len(cast)} module(s) before it were cast already ({cast[0]!r}, ...)"
                if cast
                else ""
            )
            raise TypeError(
                f"mlxq: cannot cast the quantized {type(self).__name__}{where}: {why}{done}"
            )
        return super()._apply(fn, recurse)
