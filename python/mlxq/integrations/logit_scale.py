"""Cohere's `logit_scale` on the image-text models whose transformers class leaves it out.

mlx-vlm 0.7.10 runs Aya Vision and Cohere 2 Vision (its aya_vision module) with Cohere 2's
language model, which multiplies the logits by `text_config.logit_scale` (default 0.0625), as
transformers' own Cohere2ForCausalLM does. transformers 5's AyaVisionForConditionalGeneration
and Cohere2VisionForConditionalGeneration apply their `lm_head` and stop: the same argmax, but
logits 1/logit_scale times mlx-vlm's (16x at the default), so sampling with a temperature draws
from another distribution. mlxq runs these checkpoints as mlx-vlm does: the head's output is
scaled by a forward hook (the loss transformers computes from it and `generate` see the scaled
logits; the saved tensors and config.json are unchanged, and mlx-vlm reads the same
logit_scale back). The hook is set when mlxq loads a model and by `quantize_model`;
`dequantize_model` keeps it. Cohere Compass needs nothing: both apply its logit_scale.
"""

from __future__ import annotations

import inspect

from torch import nn

__all__ = ["scale_logits_as_mlx_vlm"]

# the image-text classes of transformers 5.24 that leave the scale out
_LEFT_OUT = frozenset({"aya_vision", "cohere2_vision"})


class ScaleLogits:
    """A forward hook multiplying a head's output by `scale` (a class: the model pickles)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, module: nn.Module, args: tuple, output):
        return output * self.scale


def _forward_applies_it(model: nn.Module) -> bool:
    """Whether transformers' class reads logit_scale itself (a later version fixing it)."""
    try:
        return "logit_scale" in inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False


def scale_logits_as_mlx_vlm(model: nn.Module) -> None:
    """Multiply the logits of an Aya Vision / Cohere 2 Vision model by its text config's
    logit_scale, as mlx-vlm's model does (nothing for other models, or for the base model
    without a head). A config whose logit_scale is not a number is refused by name: mlx-vlm
    would fail on it too."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    head = getattr(model, "lm_head", None)
    if model_type not in _LEFT_OUT or not isinstance(head, nn.Module):
        return
    if _forward_applies_it(model):
        return
    if any(isinstance(h, ScaleLogits) for h in head._forward_hooks.values()):
        return  # (loaded twice through the same module: never scale twice)
    scale = getattr(config.text_config, "logit_scale", None)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(
            f"mlxq: {model_type}: text_config.logit_scale is {scale!r}; mlx-vlm multiplies "
            "the logits by it, so it must be a number"
        )
    head.register_forward_hook(ScaleLogits(float(scale)))
