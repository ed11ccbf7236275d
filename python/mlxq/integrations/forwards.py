"""The forwards mlxq gives a transformers model that holds its quantized layers.

One function, :func:`use_mlxq_forwards`, for both ways such a model comes to be: loaded from an
MLX checkpoint (or quantized while loading, :class:`~mlxq.integrations.quantizer.MLXHfQuantizer`)
and quantized in memory (:func:`mlxq.quantize_model`). Each used to list the steps itself; the
lists drifted (`quantize_model` lacked the fp32 decode attention, so the same weights decoded
other logits, and slower, than after loading), hence one list.
"""

from __future__ import annotations

from torch import nn

from mlxq._pickling import picklable_after_forward
from mlxq.integrations.cpu_attention import use_fp32_decode_attention
from mlxq.integrations.cpu_layers import use_flat_decode_layers
from mlxq.integrations.cpu_norms import use_native_rms_norm
from mlxq.integrations.cpu_rope import use_native_rotary_embedding
from mlxq.integrations.kernelize_guard import drop_class_forwards
from mlxq.integrations.logit_scale import scale_logits_as_mlx_vlm
from mlxq.projection_groups import group_projections

__all__ = ["use_mlxq_forwards"]


def use_mlxq_forwards(model: nn.Module) -> None:
    """Give the transformers model `model`, its mlxq layers in place, what mlxq runs it with.

    In this order: transformers' kernelize fallback undone (:mod:`.kernelize_guard`; it would
    hide the native norms from the flat step), the fp32 CPU decode attention
    (:mod:`.cpu_attention`), the native CPU RMSNorm and rotary embedding (:mod:`.cpu_norms`,
    :mod:`.cpu_rope`), sibling projections tied into one call (:mod:`mlxq.projection_groups`),
    the flat CPU decode step (:mod:`.cpu_layers`, which reads the norms' forwards and the groups
    at each call), Aya Vision's logit_scale (:mod:`.logit_scale`) and pickling after a forward.
    Each step leaves alone the modules it does not recognise. Placing a model without
    parameters by its buffers (:func:`~mlxq.integrations.quantizer.placed_by_buffers`) is the
    callers' own, done before.
    """
    drop_class_forwards(model)  # before the forwards below: kernelize's fallback would hide them
    use_fp32_decode_attention(model)
    use_native_rms_norm(model)
    use_native_rotary_embedding(model)
    group_projections(model)
    use_flat_decode_layers(model)  # after the norms and groups it reads
    scale_logits_as_mlx_vlm(model)  # Aya Vision's logit_scale: transformers leaves it out
    picklable_after_forward(model)
