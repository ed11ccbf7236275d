"""accelerate's offload (a `device_map` with "disk", or "cpu" beside a GPU), seen from mlxq.

transformers hands a model whose device_map spans several devices, or puts anything on
"disk", to accelerate's `dispatch_model`: the modules it offloads get `AlignDevicesHook`s
(`offload=True`) whose tensors are meta in the model and loaded from the hook's `weights_map`
(CPU copies, or safetensors files on disk) at each forward, then dropped again. mlxq's packed
weights, scales and biases are buffers, which accelerate offloads only with
`offload_buffers=True` (mlxq's registration passes it for MLX models); otherwise they would stay
in memory, or, on "disk", never load.

Here: which modules and tensors are offloaded, and their values, read from the hooks, so that
mlxq's checks after loading see an offloaded tensor as loaded (and check its values), and the
forwards mlxq installs after loading leave offloaded modules to accelerate's hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["offload_hooks", "is_offloaded", "offloaded_tensors", "offloaded_modules"]


def _hooks(module: nn.Module) -> Iterator[object]:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return
    # accelerate chains several hooks of one module in a SequentialHook (`.hooks`)
    yield from getattr(hook, "hooks", (hook,))


def offload_hooks(module: nn.Module) -> list[object]:
    """accelerate's hooks on `module` that offload its tensors (`AlignDevicesHook` with
    `offload=True`), read by attribute so that accelerate is imported only where it runs."""
    return [h for h in _hooks(module) if getattr(h, "offload", False)]


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate offloads `module`'s own tensors (loaded at each of its forwards)."""
    return bool(offload_hooks(module))


def offloaded_modules(model: nn.Module) -> list[str]:
    """Names of the modules of `model` whose tensors accelerate offloads."""
    return [name for name, module in model.named_modules() if is_offloaded(module)]


def _keys_of(weights_map: object, cache: dict[int, set[str]]) -> tuple[str, set[str]]:
    """(prefix, the full names the map's dataset holds) of a hook's `weights_map` (accelerate's
    PrefixedDataset over an OffloadedWeightsLoader); membership is read from the dataset's key
    list, since `in` on the map would load the tensor from disk."""
    prefix = getattr(weights_map, "prefix", "")
    dataset = getattr(weights_map, "dataset", weights_map)
    if id(dataset) not in cache:
        keys = getattr(dataset, "all_keys", None)
        cache[id(dataset)] = set(keys if keys is not None else dataset)
    return prefix, cache[id(dataset)]


def offloaded_tensors(model: nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """The state-dict names of the tensors of `model` that accelerate's hooks hold offloaded
    (meta in the model between forwards), each with a function that reads its value (from the
    CPU copy or the file on disk, one tensor at a time). A name that the hook's map lacks is
    left out (its forward could not load it either). Being in the map does not say the tensor
    came from the checkpoint: accelerate copies a GPU model's "cpu" modules as they are, so the
    quantizer asks transformers' load report for that."""
    found: dict[str, Callable[[], torch.Tensor]] = {}
    cache: dict[int, set[str]] = {}
    for module_name, module in model.named_modules():
        for hook in offload_hooks(module):
            weights_map = getattr(hook, "weights_map", None)
            if weights_map is None:
                continue
            prefix, keys = _keys_of(weights_map, cache)
            deep = getattr(hook, "place_submodules", False)  # (accelerate's preloaded classes)
            buffers = {n for n, _ in module.named_buffers(recurse=deep)}
            tensors = [
                leaf
                for leaf in module.state_dict(keep_vars=True)  # persistent buffers only
                if (deep or "." not in leaf)
                and (leaf not in buffers or getattr(hook, "offload_buffers", False))
            ]
            for leaf in tensors:
                if f"{prefix}{leaf}" not in keys:
                    continue
                name = f"{module_name}.{leaf}" if module_name else leaf

                def read(weights_map=weights_map, leaf=leaf) -> torch.Tensor:
                    return weights_map[leaf]

                found[name] = read
    return found
