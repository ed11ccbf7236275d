"""Which transformers class loads an MLX checkpoint: the text model's causal LM where mlx-lm
wrote only the language model of an image-text model, else the config's auto class. The
quantizer, `mlxq generate` and `mlxq inspect` choose alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "auto_model_class",
    "language_model_only_refusal",
    "no_auto_class_refusal",
    "text_model_class",
]


def text_model_class(config: dict, tensor_names: Callable[[], Iterable[str]]) -> Any:
    """The text model's causal LM class (e.g. Gemma3ForCausalLM) where mlx-lm wrote only the
    language model of an image-text model (config.json has a `text_config`; every tensor is
    under `language_model.`: Gemma 3 4B and up; or `model.language_model.`, as mlx-lm's
    gemma3n keeps the Hub's names), for which AutoModelForCausalLM would build the image-text
    model and find no vision tower (Gemma 3n's needs timm even to be built); None where
    AutoModelForCausalLM is right. `tensor_names` is called only when the config leaves the
    choice open."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as LMS

    text = config.get("text_config")
    text_class = LMS.get(text.get("model_type")) if isinstance(text, dict) else None
    if text_class is None or LMS.get(config.get("model_type")) == text_class:
        return None
    names = list(tensor_names())
    prefixes = ("language_model.", "model.language_model.")
    if names and any(all(name.startswith(p) for name in names) for p in prefixes):
        return getattr(transformers, text_class)
    return None


def language_model_only_refusal(config: dict, tensor_names: Iterable[str]) -> str | None:
    """Why mlx-lm's conversion of an image-text model to its language model (every tensor
    under `language_model.`, no vision tower: Qwen2-VL, Qwen2.5-VL, Qwen3-VL) cannot load, where
    transformers has no causal LM for the text model nor for the whole config: the image-text
    model it would build has a vision tower that nothing fills. None where this does not
    apply."""
    from transformers import __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as LMS

    text = config.get("text_config")
    if not isinstance(text, dict):  # (mlx-lm's config.json may leave out vision_config)
        return None
    model_type, text_type = config.get("model_type"), text.get("model_type")
    if LMS.get(text_type) is not None or LMS.get(model_type) is not None:
        return None
    names = list(tensor_names)
    if not names or not all(name.startswith("language_model.") for name in names):
        return None
    return (
        f"model type {model_type!r}: this checkpoint holds the language model only (mlx-lm's "
        "conversion: every tensor under `language_model.`, no vision tower), and transformers "
        f"{__version__} has no causal LM for its text model ({text_type!r}); the image-text "
        "model it builds instead would run a vision tower that nothing fills. Convert the "
        "image-text model with `mlx_vlm convert`"
    )


def auto_model_class(config: Any, tensor_names: Callable[[], Iterable[str]] | None = None) -> Any:
    """The transformers auto class that builds `config`'s model: the causal LM where
    transformers has one, else the image-text model (mlx-vlm checkpoints of Qwen2-VL, LLaVA,
    ... load through AutoModelForImageTextToText only); AutoModelForCausalLM otherwise, whose
    error names the config class. An image-text config whose checkpoint holds tensors outside
    the language model (`tensor_names`, e.g. mlx-vlm's vision tower) is the image-text model
    even where transformers maps the config to a text-only causal LM (Qwen 3.5, Mllama)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if (
        tensor_names is not None
        and getattr(config, "vision_config", None) is not None
        and type(config) in AutoModelForImageTextToText._model_mapping
        and any(not name.startswith("language_model.") for name in tensor_names())
    ):
        return AutoModelForImageTextToText
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    refusal = no_auto_class_refusal(config, tensor_names)
    if refusal is not None:
        raise ValueError(refusal)
    return AutoModelForCausalLM


def no_auto_class_refusal(
    config: Any, tensor_names: Callable[[], Iterable[str]] | None
) -> str | None:
    """Why an image-text checkpoint (a vision tower in its config, at the top or in a
    sub-config; tensors outside `language_model.`: mlx-vlm's conversion) whose config
    transformers maps to neither AutoModelForCausalLM nor AutoModelForImageTextToText cannot
    load: mlx-vlm's `pixtral` (read by transformers as the tower's PixtralVisionConfig alone),
    Qwen3-Omni-MoE (a multimodal LM only). Names the model type and why mlxq does not map its
    mlx-vlm layout, where transformers would name only a config class that AutoModelForCausalLM
    does not take. None where this does not apply."""
    from transformers import __version__

    from mlxq.integrations.mlx_vlm_layout import has_vision_tower, unmapped_vlm_note

    if tensor_names is None or not has_vision_tower(config):
        return None
    if all(name.startswith("language_model.") for name in tensor_names()):
        return None
    model_type = getattr(config, "model_type", None)
    return (
        f"mlxq: model type {model_type!r}: transformers {__version__} maps "
        f"{type(config).__name__} to neither AutoModelForCausalLM nor "
        f"AutoModelForImageTextToText, and this checkpoint holds more than a language model "
        f"(mlx-vlm's conversion): {unmapped_vlm_note(model_type)}"
    )
