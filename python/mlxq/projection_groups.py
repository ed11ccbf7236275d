"""Sibling projections that read one input, computed in one call.

transformers' attention layers call `q_proj(h)`, `k_proj(h)` and `v_proj(h)` one after the
other on the same tensor, and their MLPs `gate_proj(h)` and `up_proj(h)`. In a small model's
decode step on the CPU, each of those calls costs mostly its own overhead (waking the threads,
preparing `x` for the kernel), so `group_projections` ties such siblings together: the first
one called computes every sibling's output with `affine_matmul_many` (bit for bit the separate
calls) and each sibling called next with the *same* tensor, unchanged since, takes its own.

Nothing else changes: a sibling called with another tensor computes its own output, and a
group whose siblings turn out not to share their input (cross-attention, say) stops grouping
after that first miss. Off the CPU, where no one-call kernel exists, each sibling computes its
own. A tensor changed in place between the siblings' calls is seen by its version counter;
under `torch.compile` and for inference-mode tensors, which have none to read, the group
relies on identity alone (transformers never writes into a projection's input in between).
"""

from __future__ import annotations

import torch
from torch import nn

from mlxq.nn import AffineLinear
from mlxq.ops import affine_matmul, affine_matmul_many

__all__ = ["SIBLING_NAMES", "ProjectionGroup", "group_projections"]

# Children of one module that transformers calls on one input, in call order.
SIBLING_NAMES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)


def _version(x: torch.Tensor) -> int:
    """x's version counter, or -1 where none can be read (see the module doc)."""
    if torch.compiler.is_compiling() or x.is_inference():
        return -1
    return x._version


def _same_format(a: AffineLinear, b: AffineLinear) -> bool:
    return (
        a.mode == b.mode == "affine"
        and (a.bits, a.group_size, a.in_features) == (b.bits, b.group_size, b.in_features)
        and a.scales.dtype == b.scales.dtype
        and a.weight.device == b.weight.device
    )


class ProjectionGroup:
    """Affine projections of one format that their parent calls on one input (see module doc);
    creating one ties its members to it.

    `output(member, x)` is `member`'s `x @ W.T` (no bias): computed for all members at the
    first call with a new `x`, handed out to the others when they are called with that `x`.
    """

    def __init__(self, members: list[AffineLinear]) -> None:
        if len(members) < 2 or not all(_same_format(members[0], m) for m in members):
            raise ValueError("mlxq: a projection group needs 2+ affine layers of one format")
        self.members = members
        for i, m in enumerate(members):
            m.projection_group, m.projection_index = self, i
        self.enabled = True
        self._x: torch.Tensor | None = None  # the input the pending outputs belong to
        self._version = -1
        self._pending: list[torch.Tensor | None] = []
        self._left = 0

    def _clear(self) -> None:
        self._x, self._pending, self._left = None, [], 0

    def matmuls(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's `x @ W.T` (no bias) in one affine_matmul_many call: bit for bit the
        separate affine_matmul calls."""
        first = self.members[0]
        # (_buffers: nn.Module's attribute lookup costs a microsecond a buffer in a decode step)
        buffers = [m._buffers for m in self.members]
        return affine_matmul_many(
            x,
            [b["weight"] for b in buffers],
            [b["scales"] for b in buffers],
            [b["biases"] for b in buffers],
            first.group_size,
            first.bits,
        )

    def output(self, member: AffineLinear, x: torch.Tensor) -> torch.Tensor:
        first = self.members[0]
        if not self.enabled or x.device.type != "cpu":
            return affine_matmul(
                x, member.weight, member.scales, member.biases, first.group_size, first.bits
            )
        i = member.projection_index
        if self._pending:
            y = self._pending[i]
            if y is not None:
                if x is self._x and _version(x) == self._version:
                    self._pending[i] = None
                    self._left -= 1
                    if self._left == 0:
                        self._clear()  # holds no tensor between steps
                    return y
                # This sibling's output was computed for another input: the members are not
                # called on one tensor, so stop computing outputs nobody takes.
                self.enabled = False
                self._clear()
                return self.output(member, x)
        outs = self.matmuls(x)
        self._x, self._version = x, _version(x)
        self._pending = list(outs)
        self._pending[i] = None
        self._left = len(outs) - 1
        return outs[i]


def group_projections(model: nn.Module) -> int:
    """Ties the sibling projections of `model` (SIBLING_NAMES: children of one module, all
    affine `AffineLinear` of one format) into `ProjectionGroup`s; returns how many groups.

    Called by mlxq's transformers integration after loading and by `quantize_model`; the
    outputs are unchanged, bit for bit. Siblings that differ in format stay apart.
    """
    count = 0
    for parent in model.modules():
        for names in SIBLING_NAMES:
            members = [getattr(parent, n, None) for n in names]
            if not all(type(m) is AffineLinear for m in members):
                continue
            # a member with an instance forward is wrapped by someone (accelerate's offload
            # hook, which loads its tensors for its own call only: they are meta otherwise);
            # the group would read its tensors without that forward
            if any("forward" in vars(m) for m in members):
                continue
            if not all(_same_format(members[0], m) for m in members):
                continue
            ProjectionGroup(members)
            count += 1
    return count
