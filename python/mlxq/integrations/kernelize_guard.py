"""mlxq's eager CPU forwards kept through transformers' `kernelize`.

transformers >= 5.25 kernelizes every model `from_pretrained` loads while the `kernels` package
is installed (a dependency of 5.25), and again on `train()` / `eval()` and `reset_kernels()`.
`kernels.kernelize` sets an instance forward on every module of a hub-kernel class
(`use_kernel_forward_from_hub`: RMSNorm, SiLU, ...): the hub kernel where one exists for the
device and mode, else the class's own forward bound to the module. The latter computes what the
module computed before, but it replaced mlxq's native norm forward (`cpu_norms`), and the flat
decode step (`cpu_layers`) runs only while its norms have that forward and its other modules no
instance forward at all: on the CPU, where `kernels` has no kernel, a loaded MLX model lost both
speed-ups, silently. Two places undo exactly that fallback (a hub kernel that `kernelize`
installs stays):

- `from_pretrained` kernelizes before the quantizer's `postprocess_model`, where mlxq gives the
  forwards: :func:`drop_class_forwards` runs first there (and in `quantize_model`);
- a later `kernelize` (train/eval, `reset_kernels`) runs inside :func:`fast_paths_kept`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from mlxq.integrations.cpu_norms import give_native_forward, has_native_forward, runs_class_forward

__all__ = ["drop_class_forwards", "fast_paths_kept"]


def drop_class_forwards(model: nn.Module) -> int:
    """Remove every instance forward of `model`'s modules that only binds the module's class
    forward (kernelize's fallback: the same function, so the module computes the same); returns
    how many."""
    count = 0
    for module in model.modules():
        if "forward" in vars(module) and runs_class_forward(module):
            del module.forward
            count += 1
    return count


@contextlib.contextmanager
def fast_paths_kept(model: nn.Module) -> Iterator[None]:
    """On leaving, where the body (transformers' `kernelize`) gave a module of `model` its
    class's own forward as an instance forward: a norm that had mlxq's native forward gets it
    back, a module that had no instance forward loses it again (the same function, so nothing
    changes but the flat decode step's check). Models without mlxq's native norms are left as
    the body leaves them."""
    modules = list(model.modules())
    native = [m for m in modules if has_native_forward(m)]
    if not native:
        yield
        return
    bare = [m for m in modules if "forward" not in vars(m)]
    try:
        yield
    finally:
        for module in bare:
            if "forward" in vars(module) and runs_class_forward(module):
                del module.forward
        for module in native:
            if runs_class_forward(module):
                give_native_forward(module)
