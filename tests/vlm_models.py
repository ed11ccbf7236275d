"""Tiny random image-text models of the families both transformers 5 and mlx-vlm run,
converted by `mlx_vlm.convert`, and the comparison of mlxq's logits with mlx-vlm's.

Used by tests/test_vlm_coverage.py (every family, a few variants) and
benchmarks/vlm_coverage.py (every family and variant). Each model: 2 text layers (hidden
128, vocab 512), a 2-block vision tower of width 64, random weights larger than the init, a
word-level tokenizer built here with the family's image tokens (no download) and the family's
own image processor (or mlx-vlm's, where transformers' needs torchvision) with a small image.

mlx-vlm 0.7 reads the config.json layout of the Hub checkpoints (transformers 4): some
families want the text settings at the top level, the vision `model_type` of the whole model
and a top-level `rope_theta`/`rope_scaling`. Each family's `mlx_vlm_keys` writes them from this
file's own parameters (not from mlxq's code), so the oracle stays independent of the code
under test. Converted checkpoints are cached under $MLXQ_TEST_CACHE like tests/mlx_models.py's.

The inputs (token ids with the image tokens expanded, pixel values and the family's extra
tensors) come from mlx-vlm's processor and are fed unchanged to both models.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlx_models import cached_checkpoint

VOCAB = 512
HARNESS = 2  # bump when a checkpoint built here changes (part of the cache key)
TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)
THETA = 5000.0
TEXT_PROMPT = "t5 t77 t300 t12 t499 t3 t42 t250 t7 t128 t64"


def _flatten_text(cfg: dict, extra: dict | None = None) -> None:
    """Hub layout of Qwen2-VL / Qwen2.5-VL: the text settings at the top level too."""
    for key, value in cfg["text_config"].items():
        cfg.setdefault(key, value)
    cfg.update(extra or {})


@dataclass(frozen=True)
class Family:
    """One image-text family: its tiny config, tokens, processor and mlx-vlm keys."""

    model_type: str
    text: dict  # text_config overrides
    vision: dict  # vision_config overrides
    special: tuple[str, ...]  # special tokens, placed at the end of the vocabulary
    token_ids: dict[str, str]  # config attribute -> special token
    # (tokenizer) -> a processor or image processor to save next to the model
    processor: Callable[[Any], Any]
    prompt: str  # the text around the image; the processor expands the image token
    image_size: tuple[int, int] = (56, 56)  # (width, height) of the test image
    top: dict = field(default_factory=dict)  # top-level config overrides
    named_tokens: dict[str, str] = field(default_factory=dict)  # tokenizer.<attr> = token
    mlx_vlm_keys: Callable[[dict], None] | None = None  # edits config.json for mlx-vlm
    extra_inputs: tuple[str, ...] = ()  # processor outputs besides ids, mask, pixel_values
    # inputs transformers' processor adds and mlx-vlm's does not: (inputs, config) -> inputs
    torch_inputs: Callable[[dict, Any], dict] | None = None
    # mlx-vlm 0.7's Gemma 3 turns the attention mask into an all-ones 4-D mask when an image
    # is present: the whole prompt attends bidirectionally. transformers 5 attends causally,
    # and bidirectionally within each image. Its embeddings (vision tower, projector, merge)
    # are then run through its language model with transformers' mask, built here.
    image_block_mask: bool = False
    # mlx-vlm's model reads `mask` (PaliGemma: the prefix attends bidirectionally, as in
    # transformers); other families get none (several read `mask` as an additive mask)
    mlx_mask: bool = False
    # float tensor renames into the Hub (transformers 4) layout mlx-vlm converts from
    hub_renames: tuple[tuple[str, str], ...] = ()
    # other float tensor changes into the Hub layout: (name, tensor) -> tensor
    hub_tensors: Callable[[str, Any], Any] | None = None
    tied: bool = False  # mlx-vlm's model of the family has a tied head only
    # a correction of mlx-vlm's forward where it departs from the model (a context manager)
    mlx_fix: Callable[[], contextlib.AbstractContextManager] | None = None
    # why mlx-vlm's image + text forward is not the model's (then the image check compares
    # the projected features of each image tile instead, see tile_features)
    no_image_oracle: str = ""
    # transformers maps the model_type to its own tokenizer class (Qwen 3.5's BPE), which
    # ignores this file's word-level tokenizer.json: the inputs are tokenized by the file
    word_tokenizer: bool = False
    # the vocabulary size, special tokens at its end (a processor that hard-codes the Hub's
    # token ids needs the Hub's size)
    vocab: int = VOCAB
    # a processor whose output is not numpy arrays (ragged per-slice pixels): (output) -> the
    # numpy inputs kept (fed to transformers through torch_inputs)
    pack_inputs: Callable[[dict], dict] | None = None
    # the reverse for mlx-vlm's model: (numpy inputs) -> its keyword arguments (mlx arrays or
    # lists of them), pixel_values included
    mlx_kwargs: Callable[[dict], dict] | None = None
    # a correction of mlx-vlm's conversion where it fails on its own (a context manager)
    convert_fix: Callable[[], contextlib.AbstractContextManager] | None = None
    # image settings that mlx-vlm's loaded processor drops, set on it again: (processor) -> None
    loaded_processor_fix: Callable[[object], None] | None = None


def _qwen_image_processor(patch: int):
    def make(tokenizer):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        side = patch * 4
        return Qwen2VLImageProcessorPil(
            min_pixels=side * side, max_pixels=4 * side * side, patch_size=patch, merge_size=2
        )

    return make


_QWEN_SPECIAL = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_QWEN_IDS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}
_QWEN_PROMPT = "t5 t6 <|vision_start|><|image_pad|><|vision_end|> t7 t300 t42"
# Qwen3-VL's tower (dense and MoE language models alike)
_QWEN3_VISION = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=2,
    out_hidden_size=128,
    num_position_embeddings=16,
    deepstack_visual_indexes=[0],
    patch_size=16,
)
_MROPE = {"rope_type": "default", "rope_theta": THETA, "mrope_section": [4, 6, 6]}


def _qwen2_keys(cfg: dict) -> None:
    section = cfg["text_config"]["rope_parameters"]["mrope_section"]
    _flatten_text(
        cfg, {"rope_theta": THETA, "rope_scaling": {"type": "mrope", "mrope_section": section}}
    )
    cfg["vision_config"]["model_type"] = cfg["model_type"]


def _text_rope_keys(**extra: Any) -> Callable[[dict], None]:
    """mlx-vlm reads `rope_theta` (and Gemma 3's local base and pattern) in text_config."""

    def edit(cfg: dict) -> None:
        cfg["text_config"].update({"rope_theta": THETA, **extra})

    return edit


def _qwen3_keys(cfg: dict) -> None:
    section = cfg["text_config"]["rope_parameters"]["mrope_section"]
    rope = {"type": "default", "mrope_section": section, "mrope_interleaved": True}
    cfg["text_config"].update({"rope_theta": THETA, "rope_scaling": rope})
    cfg["vision_config"]["model_type"] = cfg["model_type"]


def _experts_in_out(name: str, tensor):
    """The Hub (transformers 4) layout of fused experts, [E, in, out], which mlx-vlm's sanitize
    reads; transformers 5 saves its own [E, out, in] (it converts the Hub's when loading)."""
    if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
        return tensor.transpose(1, 2)
    return tensor


@contextlib.contextmanager
def _qwen3_vl_moe_activations():
    """mlx-vlm 0.7.10's Qwen3-VL-MoE tower swaps the two GELUs of Qwen3-VL's (its own qwen3_vl
    has them right): exact GELU in the blocks' MLP, where the config's hidden_act is
    gelu_pytorch_tanh, and the tanh GELU in the patch merger, where the model has the exact one
    (6e-4 apart on the tiny model). Set back to the model's."""
    import mlx.nn as nn
    from mlx_vlm.models.qwen3_vl_moe import vision

    inits = vision.MLP.__init__, vision.PatchMerger.__init__

    def mlp(self, *args, **kwargs):
        inits[0](self, *args, **kwargs)
        self.act_fn = nn.GELU(approx="tanh")

    def merger(self, *args, **kwargs):
        inits[1](self, *args, **kwargs)
        self.act_fn = nn.GELU()

    vision.MLP.__init__, vision.PatchMerger.__init__ = mlp, merger
    try:
        yield
    finally:
        vision.MLP.__init__, vision.PatchMerger.__init__ = inits


def _qwen3_moe_keys(cfg: dict) -> None:
    """Qwen3-VL's keys, and the MoE settings mlx-vlm requires (no dense layers here)."""
    _qwen3_keys(cfg)
    text = cfg["text_config"]
    text.setdefault("mlp_only_layers", [])
    # transformers 5 writes the expert count as num_local_experts only
    text.setdefault("num_experts", text.get("num_local_experts"))


# CLIP/SigLIP towers: the Hub checkpoints (transformers 4) name them `vision_tower.vision_model.`
_HUB_VISION_MODEL = ((r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),)


def _gemma3_keys(**text: Any) -> Callable[[dict], None]:
    """mlx-vlm's Gemma 3 scales image features by a top-level `hidden_size` (default 2048)."""

    def edit(cfg: dict) -> None:
        cfg["text_config"].update({"rope_theta": THETA, **text})
        cfg["hidden_size"] = cfg["text_config"]["hidden_size"]

    return edit


def _mm_token_types(inputs: dict, config) -> dict:
    """Qwen-VL in transformers 5 places the rope of image tokens by `mm_token_type_ids`
    (1 for image tokens), which its processor returns and mlx-vlm's does not."""
    ids = inputs["input_ids"]
    return {**inputs, "mm_token_type_ids": (ids == config.image_token_id).astype(np.int64)}


def _image_token_types(inputs: dict, config) -> dict:
    """Gemma 3 in transformers 5 attends bidirectionally within an image by `token_type_ids`
    (1 for image tokens), which its processor returns and mlx-vlm's does not."""
    ids = inputs["input_ids"]
    return {**inputs, "token_type_ids": (ids == config.image_token_index).astype(np.int64)}


def _gemma3_processor(tokenizer):
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    return Gemma3Processor(image_processor=ip, tokenizer=tokenizer, image_seq_length=4)


def _llava_processor(tokenizer):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def _paligemma_processor(tokenizer):
    from transformers import PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    ip = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    ip.image_seq_length = 4
    return PaliGemmaProcessor(image_processor=ip, tokenizer=tokenizer)


def _pixtral_processor(tokenizer):
    # mlx-vlm's own classes: transformers' PixtralProcessor needs torchvision
    from mlx_vlm.models.mistral3.processing_mistral3 import Mistral3Processor
    from mlx_vlm.models.pixtral.image_processing_pixtral import PixtralImageProcessor

    ip = PixtralImageProcessor(size={"longest_edge": 56}, patch_size={"height": 14, "width": 14})
    return Mistral3Processor(
        image_processor=ip, tokenizer=tokenizer, patch_size=14, spatial_merge_size=2
    )


def _idefics3_processor(kind: str):
    def make(tokenizer):
        if kind == "smolvlm":  # mlx-vlm's processor: transformers' needs torchvision
            from mlx_vlm.models.smolvlm.processing_smolvlm import SmolVLMProcessor as Processor
            from transformers.models.smolvlm.image_processing_pil_smolvlm import (
                SmolVLMImageProcessorPil as ImageProcessor,
            )
        else:
            from transformers import Idefics3Processor as Processor
            from transformers.models.idefics3.image_processing_pil_idefics3 import (
                Idefics3ImageProcessorPil as ImageProcessor,
            )

        ip = ImageProcessor(
            do_image_splitting=False,
            size={"longest_edge": 32},
            max_image_size={"longest_edge": 32},
        )
        return Processor(image_processor=ip, tokenizer=tokenizer, image_seq_len=4)

    return make


class _SavedImageProcessor:
    """An image processor and a processor_config.json, saved side by side (for mlx-vlm's
    own processor classes, which have no `save_pretrained`)."""

    def __init__(self, image_processor, processor_config: dict) -> None:
        self.image_processor = image_processor
        self.processor_config = processor_config

    def save_pretrained(self, out: Path) -> None:
        if self.image_processor is not None:
            self.image_processor.save_pretrained(out)
        else:  # the processor's own settings are the image processor's
            (Path(out) / "preprocessor_config.json").write_text(json.dumps(self.processor_config))
        (Path(out) / "processor_config.json").write_text(json.dumps(self.processor_config))


_GRID = [[28, 28], [28, 56], [56, 28], [56, 56]]  # anyres tilings of 28-pixel tiles


def _onevision_processor(tokenizer):
    # mlx-vlm's processor (transformers' needs torchvision): its PIL image processor and
    # the processor settings it reads from processor_config.json
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    ip = LlavaOnevisionImageProcessorPil(
        size={"height": 28, "width": 28}, image_grid_pinpoints=_GRID, do_pad=True
    )
    settings = {"num_image_tokens": 4, "vision_feature_select_strategy": "full"}
    return _SavedImageProcessor(ip, {"processor_class": "LlavaOnevisionProcessor", **settings})


def _llava_next_processor(tokenizer):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=_GRID,
    )
    return LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def _idefics2_processor(tokenizer):
    from transformers import Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import (
        Idefics2ImageProcessorPil,
    )

    ip = Idefics2ImageProcessorPil(
        do_image_splitting=False, size={"shortest_edge": 32, "longest_edge": 32}
    )
    return Idefics2Processor(image_processor=ip, tokenizer=tokenizer, image_seq_len=4)


@contextlib.contextmanager
def _idefics2_positions():
    """mlx-vlm 0.7.10's Idefics 2 buckets patch positions with other boundaries than the model
    (`linspace(1/n, 1, n, endpoint=False)` and `digitize(right=True) - 1`: position -1, the
    last embedding, for the first row and column). Replaced by the model's rule: the patch at
    fraction f of the image takes the bucket `#{k/n <= f, k = 1..n-1}` of n per side."""
    from unittest import mock

    import mlx.core as mx
    from mlx_vlm.models.idefics2.vision import VisionEmbeddings

    def call(self, x, mask=None):
        b, h, w, _ = x.shape
        n = self.num_patches
        bounds = np.arange(1, n) / n
        ids = np.zeros((b, (h // self.patch_size) * (w // self.patch_size)), dtype=np.int64)
        for i, patches in enumerate(np.array(mask)):
            rows, cols = int(patches[:, 0].sum()), int(patches[0, :].sum())
            bh = np.searchsorted(bounds, np.arange(rows) / rows, side="right")
            bw = np.searchsorted(bounds, np.arange(cols) / cols, side="right")
            ids[i][patches.reshape(-1)] = (bh[:, None] * n + bw[None, :]).reshape(-1)
        embeddings = mx.flatten(self.patch_embedding(x), start_axis=1, end_axis=2)
        return embeddings + self.position_embedding(mx.array(ids))

    with mock.patch.object(VisionEmbeddings, "__call__", call):
        yield


@contextlib.contextmanager
def _cohere2_vision_post_layernorm():
    """mlx-vlm 0.7.10 runs Command A Vision as Aya Vision, projecting the tower's last encoder
    state; the model projects the tower's output, which has the post-layernorm applied (Aya
    Vision takes a hidden state before it). Applied here to the state mlx-vlm projects."""
    from mlx_vlm.models.aya_vision.vision import SigLipVisionModel

    original = SigLipVisionModel.__call__

    def call(self, *args, **kwargs):
        pooled, x, states = original(self, *args, **kwargs)
        if states is not None:
            states = (*states[:-1], pooled)
        return pooled, x, states

    SigLipVisionModel.__call__ = call
    try:
        yield
    finally:
        SigLipVisionModel.__call__ = original


def _cohere2_vision_keys(cfg: dict) -> None:
    _text_rope_keys(sliding_window_pattern=2)(cfg)
    cfg["image_token_index"] = cfg["image_token_id"]


_AYA_SPECIAL = (
    "<image>",
    "<|START_OF_IMG|>",
    "<|END_OF_IMG|>",
    "<|IMG_PATCH|>",
    "<|IMG_LINE_BREAK|>",
    "TILE",
    "TILE_GLOBAL",
)


def _aya_processor(tokenizer):
    from transformers import AyaVisionProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    ip = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=False)
    return AyaVisionProcessor(
        image_processor=ip, tokenizer=tokenizer, patch_size=14, img_size=56, downsample_factor=2
    )


def _internvl_processor(tokenizer):
    # mlx-vlm's processor builds its image processor from config.json and reads only the
    # number of tokens per tile here (transformers' needs torchvision)
    return _SavedImageProcessor(None, {"image_seq_length": 4})


def _flat_tiles(inputs: dict, config) -> dict:
    """InternVL in transformers takes the image tiles as a batch ([tiles, C, H, W]); mlx-vlm's
    processor returns them per image ([1, tiles, C, H, W])."""
    pixels = inputs.get("pixel_values")
    if pixels is None or pixels.ndim == 4:
        return inputs
    return {**inputs, "pixel_values": pixels.reshape(-1, *pixels.shape[2:])}


def _lfm2_vl_processor(tokenizer):
    # mlx-vlm's processor (transformers' image processor needs torchvision) reads its image
    # settings from preprocessor_config.json: 8-pixel patches, 4 to 16 image tokens
    settings = {
        "encoder_patch_size": 8,
        "downsample_factor": 2,
        "min_image_tokens": 4,
        "max_image_tokens": 16,
        "tile_size": 64,
    }
    return _SavedImageProcessor(None, {"processor_class": "Lfm2VlProcessor", **settings})


def _qwen3_5_keys(cfg: dict) -> None:
    """mlx-vlm's Qwen 3.5 places full attention every `full_attention_interval` layers (the
    Hub key; default 4) and reads the rope settings from text_config's `rope_parameters`."""
    types = cfg["text_config"]["layer_types"]
    cfg["text_config"]["full_attention_interval"] = types.index("full_attention") + 1


_QWEN3_5_TEXT = {
    "layer_types": ["linear_attention", "full_attention"],
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "rope_parameters": {
        **_MROPE,
        "mrope_section": [4, 2, 2],
        "mrope_interleaved": True,
        "partial_rotary_factor": 0.5,
    },
}
_QWEN3_5_MOE_TEXT = {
    **_QWEN3_5_TEXT,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
}
_QWEN3_5_VISION = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=2,
    out_hidden_size=128,
    num_position_embeddings=16,
    patch_size=16,
)


def _qwen3_5(model_type: str, text: dict) -> Family:
    return Family(
        model_type,
        text=text,
        vision=dict(_QWEN3_5_VISION),
        special=_QWEN_SPECIAL,
        token_ids=_QWEN_IDS,
        processor=_qwen_image_processor(16),
        prompt=_QWEN_PROMPT,
        image_size=(96, 64),
        mlx_vlm_keys=_qwen3_5_keys,
        extra_inputs=("image_grid_thw",),
        torch_inputs=_mm_token_types,
        word_tokenizer=True,
    )


# Qwen4-Exp: Qwen 3.5 MoE with hyper-connections (4 streams), an indexer (QSA) on its
# full-attention layers, which transformers calls indexed_attention, and hashed n-gram
# embeddings (PLE) on its first (linear-attention) layer, a table that mlx-vlm stores in
# `split_ngram_parts` row shards (quantized at group 32: its rows are 32 wide)
_QWEN4_EXP_TEXT = {
    **_QWEN3_5_MOE_TEXT,
    "hc_lowrank": 16,
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,  # mlx-vlm requires one
    "indexer_head_dim": 32,
    "indexer_budget": 8,  # below the prompts' length: the sparse selection runs (0.66 apart)
    "indexer_compress_ratio": 4,
    "ple_layer_ids": [1],  # one-indexed
    "ngram_vocab_size_base": 1000,  # the Hub's 20M rows: ~95 GiB
    "make_ngram_vocab_size_divisible_by": 8,
    "heads_per_ngram": 2,
    "split_ngram_parts": 4,
    "eos_token_id": 2,  # PLE pads the n-gram context with it
}


def _qwen4_exp_keys(cfg: dict) -> None:
    """The Hub's layout: `full_attention` for the indexed layers, the output gate named."""
    text = cfg["text_config"]
    text["layer_types"] = [
        "full_attention" if t == "indexed_attention" else t for t in text["layer_types"]
    ]
    text["output_gate_type"] = text["output_gate_type"] or text["hidden_act"]


_COMPASS_SPECIAL = ("<|VISION_START|>", "<|VISION_END|>", "<|IMAGE_PAD|>", "<|VIDEO_PAD|>")


def _glm4v_processor(tokenizer):
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    side = 56
    return Glm4vImageProcessorPil(
        size={"shortest_edge": side * side, "longest_edge": 4 * side * side},
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )


def _cubic_weights(t: np.ndarray) -> list[np.ndarray]:
    """Weights of the taps at -1, 0, 1, 2 for fraction t: the cubic convolution kernel with
    A = -0.75 that PyTorch's bicubic interpolation uses."""
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _bicubic_border(grid: np.ndarray, norm_w: np.ndarray, norm_h: np.ndarray) -> np.ndarray:
    """[H, W, C] sampled at normalized points (align_corners=False), bicubic with border
    padding (every tap clamped into the grid): `F.grid_sample(mode="bicubic",
    padding_mode="border")`, in float64."""
    h, w, _ = grid.shape
    ix, iy = ((norm_w + 1) * w - 1) / 2, ((norm_h + 1) * h - 1) / 2
    x0, y0 = np.floor(ix), np.floor(iy)
    wx, wy = _cubic_weights(ix - x0), _cubic_weights(iy - y0)
    out = np.zeros((len(ix), grid.shape[2]))
    for j in range(4):
        rows = np.clip(y0 - 1 + j, 0, h - 1).astype(np.int64)
        for i in range(4):
            cols = np.clip(x0 - 1 + i, 0, w - 1).astype(np.int64)
            out += (wy[j] * wx[i])[:, None] * grid[rows, cols]
    return out


@contextlib.contextmanager
def _glm4v_position_interpolation():
    """mlx-vlm 0.7.10's GLM-4V (and GLM-4.5V) samples the learned position embeddings
    bilinearly with zero padding (its grid_sample kernel) where the model samples them
    bicubically with border padding (0.09 apart on the tiny model's embeddings), and reads a
    quantized embedding's packed weight as the table (a shape error): replaced by the model's
    rule."""
    import mlx.core as mx
    from mlx_vlm.models.glm4v import vision
    from mlx_vlm.models.glm4v_moe import vision as moe_vision

    def call(self, embeddings, lengths, image_shapes, h_coords, w_coords):
        emb = self.position_embedding
        weight = emb.weight
        if hasattr(emb, "scales"):  # quantized with the tower (mlx-vlm would use the packing)
            biases = getattr(emb, "biases", None)
            mode = getattr(emb, "mode", "affine")
            weight = mx.dequantize(weight, emb.scales, biases, emb.group_size, emb.bits, mode=mode)
        weight = np.array(weight.astype(mx.float32), dtype=np.float64)
        side = int(round(weight.shape[0] ** 0.5))
        shapes = np.array(image_shapes)
        per_token = np.repeat(np.arange(len(shapes)), np.array(lengths))
        th, tw = shapes[per_token, 1], shapes[per_token, 2]
        norm_h = (np.array(h_coords, dtype=np.float64) + 0.5) / th * 2 - 1
        norm_w = (np.array(w_coords, dtype=np.float64) + 0.5) / tw * 2 - 1
        pos = _bicubic_border(weight.reshape(side, side, -1), norm_w, norm_h)
        return embeddings + mx.array(pos.astype(np.float32)).astype(embeddings.dtype)

    classes = (vision.Glm4vVisionEmbeddings, moe_vision.Glm4vVisionEmbeddings)  # (copies)
    originals = [cls.__call__ for cls in classes]
    for cls in classes:
        cls.__call__ = call
    try:
        yield
    finally:
        for cls, original in zip(classes, originals, strict=True):
            cls.__call__ = original


def _glm4v_keys(cfg: dict) -> None:
    """mlx-vlm's GLM-4V reads rope_theta, partial_rotary_factor and the mrope sections at the
    top of text_config, and `vision_start_token_id` where transformers 5 has
    `image_start_token_id`."""
    text = cfg["text_config"]
    rope = text["rope_parameters"]
    text["rope_theta"] = rope["rope_theta"]
    text["partial_rotary_factor"] = rope["partial_rotary_factor"]
    text["rope_scaling"] = {"rope_type": "default", "mrope_section": rope["mrope_section"]}
    cfg["vision_start_token_id"] = cfg["image_start_token_id"]
    cfg["vision_end_token_id"] = cfg["image_end_token_id"]
    text.setdefault("eos_token_id", cfg.get("eos_token_id") or 2)  # required there


_GLM4V_SPECIAL = (
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|video|>",
)
_GLM4V_IDS = {
    "image_start_token_id": "<|begin_of_image|>",
    "image_end_token_id": "<|end_of_image|>",
    "image_token_id": "<|image|>",
    "video_start_token_id": "<|begin_of_video|>",
    "video_end_token_id": "<|end_of_video|>",
    "video_token_id": "<|video|>",
}
_GLM4V_TEXT = {
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": THETA,
        "mrope_section": [2, 3, 3],
        "partial_rotary_factor": 0.5,
    },
}
_GLM4V_MOE_TEXT = {
    **_GLM4V_TEXT,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
}


def _glm4v_moe_keys(cfg: dict) -> None:
    """GLM-4V's keys, and the query/key norm flag mlx-vlm's GLM-4.5V requires (the Hub's)."""
    _glm4v_keys(cfg)
    cfg["text_config"].setdefault("use_qk_norm", False)


_GLM4V_VISION = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=2,
    out_hidden_size=128,
    patch_size=14,
    image_size=56,
)


def _glm_ocr_keys(cfg: dict) -> None:
    """mlx-vlm's GLM-OCR reads transformers 5's keys, and its vision config takes no
    rope_parameters (the Hub's has none; the tower's rope base is fixed at 10000)."""
    cfg["vision_config"].pop("rope_parameters", None)


def _glm4v(model_type: str, text: dict, keys: Callable[[dict], None] = _glm4v_keys) -> Family:
    return Family(
        model_type,
        text=text,
        vision=dict(_GLM4V_VISION),
        special=_GLM4V_SPECIAL,
        token_ids=_GLM4V_IDS,
        named_tokens={"image_token": "<|image|>"},
        processor=_glm4v_processor,
        prompt="t5 t6 <|begin_of_image|><|image|><|end_of_image|> t7 t300 t42",
        image_size=(84, 56),
        mlx_vlm_keys=keys,
        extra_inputs=("image_grid_thw",),
        torch_inputs=_mm_token_types,
        mlx_fix=_glm4v_position_interpolation,
    )


_GEMMA4_PATCH, _GEMMA4_POOL, _GEMMA4_SOFT_TOKENS = 8, 2, 70


def _gemma4_processor(tokenizer):
    # mlx-vlm's processor reads its image settings from processor_config.json
    settings = {
        "patch_size": _GEMMA4_PATCH,
        "max_soft_tokens": _GEMMA4_SOFT_TOKENS,
        "pooling_kernel_size": _GEMMA4_POOL,
    }
    return _SavedImageProcessor(
        None,
        {
            "processor_class": "Gemma4Processor",
            "image_processor": settings,
            "image_seq_length": _GEMMA4_SOFT_TOKENS,
        },
    )


def _gemma4_patches(inputs: dict, config) -> dict:
    """Gemma 4 in transformers takes the image as patches ([1, N, p*p*3], rows of patches,
    each patch row-major over (y, x, channel)) with their (x, y) positions, padded to the
    processor's budget with position -1; mlx-vlm's processor returns the resized image."""
    pixels = inputs.get("pixel_values")
    if pixels is None or pixels.ndim != 4:
        return inputs
    _, c, h, w = pixels.shape
    p = _GEMMA4_PATCH
    patches = pixels[0].reshape(c, h // p, p, w // p, p).transpose(1, 3, 2, 4, 0)
    patches = patches.reshape((h // p) * (w // p), p * p * c)
    xs, ys = np.meshgrid(np.arange(w // p), np.arange(h // p), indexing="xy")
    positions = np.stack([xs, ys], axis=-1).reshape(-1, 2)
    budget = _GEMMA4_SOFT_TOKENS * _GEMMA4_POOL**2
    pad = budget - len(patches)
    patches = np.pad(patches, [(0, pad), (0, 0)])
    positions = np.pad(positions, [(0, pad), (0, 0)], constant_values=-1)
    return {**inputs, "pixel_values": patches[None], "image_position_ids": positions[None]}


@contextlib.contextmanager
def _gemma4_patch_embedder_cast():
    """mlx-vlm 0.7.10's Gemma 4 patch embedder casts the pixels to `input_proj.weight.dtype`,
    uint32 where mlx-vlm quantized that layer (a tower quantized by a recipe): the pixels
    in [-1, 1] become integers (6.5 off in the logits; mxfp4's quantized_matmul refuses them).
    transformers' Gemma4VisionPatchEmbedder.forward casts only to a floating weight dtype, so
    a quantized layer takes the pixels as they are. Set to transformers' rule."""
    import mlx.core as mx
    from mlx_vlm.models.gemma4 import vision

    cls = vision.VisionPatchEmbedder
    originals = cls._patchify, cls.embed_patches

    def cast(self, x):
        dtype = self.input_proj.weight.dtype
        return x.astype(dtype) if mx.issubdtype(dtype, mx.floating) else x

    def patchify(self, pixel_values):
        b, c, h, w = pixel_values.shape
        p = self.patch_size
        patches = pixel_values.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 3, 5, 1)
        patches = 2 * (patches.reshape(b, (h // p) * (w // p), c * p * p) - 0.5)
        return self.input_proj(cast(self, patches))

    def embed_patches(self, pixel_values, patch_positions, padding_positions):
        hidden = self.input_proj(cast(self, 2 * (pixel_values - 0.5)))
        return hidden + self._position_embeddings(patch_positions, padding_positions)

    cls._patchify, cls.embed_patches = patchify, embed_patches
    try:
        yield
    finally:
        cls._patchify, cls.embed_patches = originals


_GEMMA4_SPECIAL = ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<|video|>")
_GEMMA4_TEXT = {
    "layer_types": ["sliding_attention", "full_attention"],
    "sliding_window": 64,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "default", "rope_theta": THETA},
    },
    "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": VOCAB,
}


def _llama4_processor(tokenizer):
    # mlx-vlm's processor (transformers' image processor needs torchvision) reads the tile size
    # and the tile budget from preprocessor_config.json: one 56-pixel tile, no split
    settings = {"size": {"height": 56, "width": 56}, "max_patches": 1}
    return _SavedImageProcessor(None, {"processor_class": "Llama4Processor", **settings})


_LLAMA4_SPECIAL = (
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
)


def _llama4_keys(cfg: dict) -> None:
    """mlx-vlm's Llama 4 reads rope_theta at the top of text_config and vision_config (the
    tower's from its rope_parameters), and the Hub's vision_feature_layer (the last)."""
    cfg["text_config"]["rope_theta"] = THETA
    vision = cfg["vision_config"]
    vision["rope_theta"] = vision["rope_parameters"]["rope_theta"]
    vision["vision_feature_layer"] = -1


def _mllama_keys(cfg: dict) -> None:
    """mlx-vlm's Mllama reads rope_theta in text_config and the tower's head count as
    num_attention_heads (transformers: attention_heads; its default, 16, is the Hub's)."""
    cfg["text_config"]["rope_theta"] = THETA
    vision = cfg["vision_config"]
    vision["num_attention_heads"] = vision["attention_heads"]


@contextlib.contextmanager
def _mllama_text_only():
    """mlx-vlm 0.7.10's Mllama runs its cross-attention layers on a text-only prompt, with
    keys and values split off the queries; the model skips them when there are no image
    states (nothing cached either): skipped here too."""
    from mlx_vlm.models.mllama.language import MllamaCrossAttentionDecoderLayer as Layer

    original = Layer.__call__

    def call(self, hidden_states, cross_attention_states, *args, cache=None, **kwargs):
        if cross_attention_states is None and cache is None:
            return hidden_states
        return original(self, hidden_states, cross_attention_states, *args, cache=cache, **kwargs)

    Layer.__call__ = call
    try:
        yield
    finally:
        Layer.__call__ = original


def _open_gates(name: str, tensor):
    """Mllama's tanh gates (cross-attention, tile and position embeddings, global layers)
    start at zero: opened to ~0.8 so that the vision tower moves the logits visibly."""
    if tensor.numel() == 1 and name.endswith(("gate", "gate_attn", "gate_ffn")):
        return tensor + 1.0
    return tensor


def _mllama_processor(tokenizer):
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    ip = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4)
    return MllamaProcessor(image_processor=ip, tokenizer=tokenizer)


def _paddleocr_processor(tokenizer):
    # mlx-vlm's processor reads its image settings from preprocessor_config.json
    side = 56
    settings = {"min_pixels": side * side, "max_pixels": 4 * side * side, "patch_size": 14}
    return _SavedImageProcessor(None, {"processor_class": "PaddleOCRVLProcessor", **settings})


def _paddleocr_inputs(inputs: dict, config) -> dict:
    """PaddleOCR-VL in transformers takes the patches without the batch level mlx-vlm's
    processor adds ([patches, C, p, p]), and the image tokens' types as Qwen-VL does."""
    inputs = _mm_token_types(inputs, config)
    pixels = inputs.get("pixel_values")
    if pixels is None or pixels.ndim == 4:
        return inputs
    return {**inputs, "pixel_values": pixels.reshape(-1, *pixels.shape[2:])}


def _paddleocr_keys(cfg: dict) -> None:
    """mlx-vlm's PaddleOCR-VL reads rope_theta and the mrope sections flat in text_config, and
    the vision model_type of the whole model."""
    text = cfg["text_config"]
    rope = text["rope_parameters"]
    text["rope_theta"] = rope["rope_theta"]
    text["rope_scaling"] = {
        "rope_type": "default",
        "type": "default",
        "mrope_section": rope["mrope_section"],
    }
    cfg["vision_config"]["model_type"] = "paddleocr_vl"  # the only vision type it takes
    _flatten_text(cfg)  # and the text settings at the top level (the Hub's layout)


# HunyuanOCR: mlx-vlm's processor hard-codes the Hub's ids of the image tokens (start 120118,
# end 120119, image 120120; pad 120002), so the tiny model has the Hub's vocabulary size up
# to the newline token (120121), placed last
_HUNYUAN_VOCAB = 120122
_HUNYUAN_SPECIAL = ("<hy_image_start>", "<hy_image_end>", "<hy_image>", "<hy_image_newline>")
_HUNYUAN_NAMED = {
    "image_start_token": "<hy_image_start>",
    "image_end_token": "<hy_image_end>",
    "image_token": "<hy_image>",
}
_HUNYUAN_PIXELS = (64 * 64, 128 * 128)  # the tiny image's bounds (min, max pixels)


def _hunyuan_vl_processor(tokenizer):
    from transformers import HunYuanVLProcessor
    from transformers.models.hunyuan_vl.image_processing_pil_hunyuan_vl import (
        HunYuanVLImageProcessorPil,
    )

    ip = HunYuanVLImageProcessorPil(min_pixels=_HUNYUAN_PIXELS[0], max_pixels=_HUNYUAN_PIXELS[1])
    return HunYuanVLProcessor(image_processor=ip, tokenizer=tokenizer)


def _hunyuan_vl_pixels(processor) -> None:
    """mlx-vlm 0.7.10's HunYuanVLProcessor.from_pretrained builds its image processor with the
    defaults (512 x 512 pixels at least), not processor_config.json's: the 96 x 64 test image
    became 1120 patches and 303 tokens, whose logits over the 120122-row tied head took mlx's
    CPU quantized matmul ~13 s a forward. The bounds the float checkpoint was saved with."""
    processor.image_processor.min_pixels, processor.image_processor.max_pixels = _HUNYUAN_PIXELS


@contextlib.contextmanager
def _hunyuan_vl_call():
    """mlx-vlm 0.7.10's HunyuanOCR Model.__call__ hands the ids to its language model by a
    name the language model does not read (so no rope positions: it fails), and without the
    processor's position ids the language model orders the rope axes (seq, t, h, w) where the
    model's are (seq, w, h, t) as its processor writes them. Run as mlx-vlm's generate does:
    the embeddings (which keep the processor's positions), then the language model. The
    tower's position grid is sampled by transformers' rule (see interpolate)."""
    import mlx.core as mx
    import torch
    from mlx_vlm.models.hunyuan_vl import language
    from mlx_vlm.models.hunyuan_vl.hunyuan_vl import Model
    from mlx_vlm.models.hunyuan_vl.vision import PatchEmbed

    def call(self, input_ids, pixel_values=None, mask=None, cache=None, **kwargs):
        embeds = self.get_input_embeddings(input_ids, pixel_values, **kwargs).inputs_embeds
        return self.language_model(input_ids, inputs_embeds=embeds, mask=mask, cache=cache)

    def interpolate(self, pos_embed, target_h: int, target_w: int):
        # mlx-vlm samples the position grid with a scale of edge / (grid + 0.1); transformers
        # at the grid's size (PyTorch's bilinear rule)
        grid = torch.from_numpy(np.array(pos_embed.astype(mx.float32))).permute(0, 3, 1, 2)
        out = torch.nn.functional.interpolate(
            grid, size=(target_h, target_w), mode="bilinear", align_corners=False
        )
        return mx.array(out.permute(0, 2, 3, 1).numpy()).astype(pos_embed.dtype)

    class Doubled(list):
        # mlx-vlm splits the rotary dims by `sections * 2` (the list repeated: each axis gets
        # s dims in both halves); transformers 5.24 by [2 * s for s in sections] (axis i gets
        # dims 2 s_0 + ... of the concatenated halves). `* 2` here doubles each section
        def __mul__(self, n: int) -> list:
            return [v * n for v in self]

    original_rope = language.apply_rotary_pos_emb_xdrope

    def rope(q, k, cos, sin, position_ids, sections, output_size):
        return original_rope(q, k, cos, sin, position_ids, Doubled(sections), output_size)

    originals = (Model.__call__, PatchEmbed._interpolate_pos_embed)
    Model.__call__, PatchEmbed._interpolate_pos_embed = call, interpolate
    language.apply_rotary_pos_emb_xdrope = rope
    try:
        yield
    finally:
        Model.__call__, PatchEmbed._interpolate_pos_embed = originals
        language.apply_rotary_pos_emb_xdrope = original_rope


def _hunyuan_vl_inputs(inputs: dict, config) -> dict:
    """transformers builds the rope positions itself from the image tokens' types."""
    inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
    return _mm_token_types(inputs, config)


def _hunyuan_vl_keys(cfg: dict) -> None:
    """mlx-vlm reads the rope as the Hub writes it: rope_theta and an xdrope rope_scaling
    with alpha and the section sizes in text_config."""
    text = cfg["text_config"]
    rope = text["rope_parameters"]
    text["rope_theta"] = rope["rope_theta"]
    text["rope_scaling"] = {
        "type": "xdrope",
        "alpha": rope["alpha"],
        "factor": rope["factor"],
        "xdrope_section": rope["mrope_section"],
    }
    cfg["vision_config"]["model_type"] = "hunyuan_vl"  # the only vision type it takes


_SIGLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
_LLAMA_TEXT = {"rope_parameters": {"rope_type": "default", "rope_theta": THETA}}
_IDEFICS_SPECIAL = ("<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>")

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(
        "qwen2_vl",
        text={"rope_parameters": dict(_MROPE)},
        vision=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2),
        special=_QWEN_SPECIAL,
        token_ids=_QWEN_IDS,
        processor=_qwen_image_processor(14),
        prompt=_QWEN_PROMPT,
        image_size=(84, 56),
        mlx_vlm_keys=_qwen2_keys,
        extra_inputs=("image_grid_thw",),
        torch_inputs=_mm_token_types,
    ),
    "qwen2_5_vl": Family(
        "qwen2_5_vl",
        text={"rope_parameters": dict(_MROPE)},
        vision=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=128,
            fullatt_block_indexes=[1],
            window_size=56,
        ),
        special=_QWEN_SPECIAL,
        token_ids=_QWEN_IDS,
        processor=_qwen_image_processor(14),
        prompt=_QWEN_PROMPT,
        image_size=(84, 56),
        mlx_vlm_keys=_qwen2_keys,
        extra_inputs=("image_grid_thw",),
        torch_inputs=_mm_token_types,
    ),
    "qwen3_vl": Family(
        "qwen3_vl",
        text={"rope_parameters": {**_MROPE, "mrope_interleaved": True}},
        vision=dict(_QWEN3_VISION),
        special=_QWEN_SPECIAL,
        token_ids=_QWEN_IDS,
        processor=_qwen_image_processor(16),
        prompt=_QWEN_PROMPT,
        image_size=(96, 64),
        mlx_vlm_keys=_qwen3_keys,
        extra_inputs=("image_grid_thw",),
        torch_inputs=_mm_token_types,
    ),
    "qwen3_vl_moe": Family(
        "qwen3_vl_moe",
        text={
            "rope_parameters": {**_MROPE, "mrope_interleaved": True},
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
        },
        vision=dict(_QWEN3_VISION),
        special=_QWEN_SPECIAL,
        token_ids=_QWEN_IDS,
        processor=_qwen_image_processor(16),
        prompt=_QWEN_PROMPT,
        image_size=(96, 64),
        mlx_vlm_keys=_qwen3_moe_keys,
        hub_tensors=_experts_in_out,
        mlx_fix=_qwen3_vl_moe_activations,
        extra_inputs=("image_grid_thw",),
        torch_inputs=_mm_token_types,
    ),
    "glm4v": _glm4v("glm4v", _GLM4V_TEXT),
    "glm4v_moe": _glm4v("glm4v_moe", _GLM4V_MOE_TEXT, _glm4v_moe_keys),
    "glm_ocr": _glm4v("glm_ocr", _GLM4V_TEXT, _glm_ocr_keys),
    "gemma4": Family(
        "gemma4",
        text=_GEMMA4_TEXT,
        vision=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=32,
            patch_size=_GEMMA4_PATCH,
            pooling_kernel_size=_GEMMA4_POOL,
            position_embedding_size=64,
        ),
        special=_GEMMA4_SPECIAL,
        token_ids={
            "boi_token_id": "<start_of_image>",
            "eoi_token_id": "<end_of_image>",
            "image_token_id": "<image_soft_token>",
            "video_token_id": "<|video|>",
        },
        named_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        processor=_gemma4_processor,
        prompt="t5 t6 <image_soft_token> t7 t300 t42",
        image_size=(64, 48),
        torch_inputs=_gemma4_patches,
        tied=True,
        mlx_fix=_gemma4_patch_embedder_cast,
    ),
    "llama4": Family(
        "llama4",
        text={
            **_LLAMA_TEXT,
            "intermediate_size_mlp": 256,
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 1,
        },
        # the pixel shuffle (ratio 0.5) feeds 4 x hidden channels to the adapter, whose input
        # is intermediate_size wide (as in the Hub's: 1408 x 4 = 5632)
        vision=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            vision_output_dim=128,
            projector_input_dim=128,
            projector_output_dim=128,
        ),
        special=_LLAMA4_SPECIAL,
        token_ids={"image_token_index": "<|patch|>"},
        processor=_llama4_processor,
        prompt="t5 t6 <|image|> t7 t300 t42",
        image_size=(56, 56),
        mlx_vlm_keys=_llama4_keys,
    ),
    # HunyuanOCR: an xdrope text model (4 rope sections, NTK alpha) and a ViT whose patch
    # merger adds a newline per row and begin/end embeddings around each image
    "hunyuan_vl": Family(
        "hunyuan_vl",
        text={
            "rope_parameters": {
                "rope_type": "dynamic",
                "rope_theta": THETA,
                "alpha": 1000.0,
                "factor": 1.0,
                "mrope_section": [4, 4, 4, 4],
            },
        },
        vision=dict(
            _SIGLIP,
            patch_size=16,
            spatial_merge_size=2,
            max_image_size=128,
            out_hidden_size=TEXT["hidden_size"],
        ),
        special=_HUNYUAN_SPECIAL,
        token_ids={
            "im_start_id": "<hy_image_start>",
            "im_end_id": "<hy_image_end>",
            "image_token_id": "<hy_image>",
            "im_newline_id": "<hy_image_newline>",
        },
        named_tokens=_HUNYUAN_NAMED,
        processor=_hunyuan_vl_processor,
        prompt="t5 t6 <hy_image_start><hy_image><hy_image_end> t7 t300 t42",
        image_size=(96, 64),
        mlx_vlm_keys=_hunyuan_vl_keys,
        extra_inputs=("image_grid_thw", "position_ids"),
        torch_inputs=_hunyuan_vl_inputs,
        mlx_fix=_hunyuan_vl_call,
        tied=True,
        vocab=_HUNYUAN_VOCAB,
        loaded_processor_fix=_hunyuan_vl_pixels,
    ),
    "mllama": Family(
        "mllama",
        text={
            **_LLAMA_TEXT,
            "num_hidden_layers": 3,
            "cross_attention_layers": [1],
            "pad_token_id": 0,
        },
        vision=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=2,
            image_size=28,
            patch_size=14,
            # the Hub's 4 tiles and 8 aspect ratios: mlx-vlm sizes its tile embeddings by a
            # max_aspect_ratio_id of 8, which transformers derives and does not accept
            max_num_tiles=4,
            intermediate_layers_indices=[0],
            vision_output_dim=128,
        ),
        special=("<|image|>",),
        token_ids={"image_token_index": "<|image|>"},
        named_tokens={"image_token": "<|image|>"},
        processor=_mllama_processor,
        prompt="<|image|> t5 t6 t7 t300 t42",
        image_size=(56, 28),
        mlx_vlm_keys=_mllama_keys,
        mlx_fix=_mllama_text_only,
        hub_tensors=_open_gates,
        extra_inputs=("aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"),
    ),
    "paddleocr_vl": Family(
        "paddleocr_vl",
        # mlx-vlm 0.7.10 builds the projector's output 1024 wide whatever the config says (the
        # Hub model's text width): the tiny text model is that wide
        text={
            "rope_parameters": dict(_MROPE),
            "model_type": "paddleocr_vl_text",
            "hidden_size": 1024,
        },
        vision=dict(_SIGLIP, image_size=56, patch_size=14),
        special=("<|IMAGE_START|>", "<|IMAGE_END|>", "<|IMAGE_PLACEHOLDER|>", "<|video_pad|>"),
        token_ids={
            "vision_start_token_id": "<|IMAGE_START|>",
            "vision_end_token_id": "<|IMAGE_END|>",
            "image_token_id": "<|IMAGE_PLACEHOLDER|>",
            "video_token_id": "<|video_pad|>",
        },
        named_tokens={"image_token": "<|IMAGE_PLACEHOLDER|>"},
        processor=_paddleocr_processor,
        prompt="t5 t6 <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|> t7 t300 t42",
        image_size=(84, 56),
        mlx_vlm_keys=_paddleocr_keys,
        extra_inputs=("image_grid_thw",),
        torch_inputs=_paddleocr_inputs,
    ),
    "qwen3_5": _qwen3_5("qwen3_5", _QWEN3_5_TEXT),
    "qwen3_5_moe": _qwen3_5("qwen3_5_moe", _QWEN3_5_MOE_TEXT),
    # mlx-vlm's final norm is an RMSNorm when text_config has rms_norm_eps (this file's TEXT
    # gives one; transformers' config class has no such key): left out, as the Hub's config
    "cohere_compass": Family(
        "cohere_compass",
        text={
            "rope_parameters": {"full_attention": {**_MROPE, "mrope_interleaved": True}},
            "rms_norm_eps": None,
        },
        vision=dict(_QWEN3_VISION),
        special=_COMPASS_SPECIAL,
        token_ids=dict(zip(_QWEN_IDS, _COMPASS_SPECIAL, strict=True)),
        processor=_qwen_image_processor(16),
        prompt="t5 t6 <|VISION_START|><|IMAGE_PAD|><|VISION_END|> t7 t300 t42",
        image_size=(96, 64),
        extra_inputs=("image_grid_thw",),
        torch_inputs=_mm_token_types,
    ),
    "qwen4_exp": dataclasses.replace(
        _qwen3_5("qwen4_exp", _QWEN4_EXP_TEXT), mlx_vlm_keys=_qwen4_exp_keys
    ),
    "gemma3": Family(
        "gemma3",
        text={
            "query_pre_attn_scalar": 32,
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 64,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "default", "rope_theta": THETA},
            },
        },
        vision=dict(_SIGLIP, image_size=32, patch_size=8, vision_use_head=False),
        special=("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        token_ids={
            "boi_token_index": "<start_of_image>",
            "eoi_token_index": "<end_of_image>",
            "image_token_index": "<image_soft_token>",
        },
        named_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        processor=_gemma3_processor,
        prompt="t5 t6 <start_of_image> t7 t300 t42",
        image_size=(32, 32),
        top={"mm_tokens_per_image": 4},
        mlx_vlm_keys=_gemma3_keys(
            rope_global_base_freq=THETA,
            rope_local_base_freq=10_000.0,
            sliding_window_pattern=2,
            mm_tokens_per_image=4,
        ),
        image_block_mask=True,
        torch_inputs=_image_token_types,
        hub_renames=_HUB_VISION_MODEL,
    ),
    "llava": Family(
        "llava",
        text=_LLAMA_TEXT,
        vision=dict(_SIGLIP, image_size=28, patch_size=14),
        special=("<image>",),
        token_ids={"image_token_index": "<image>"},
        named_tokens={"image_token": "<image>"},
        processor=_llava_processor,
        prompt="t5 t6 <image> t7 t300 t42",
        image_size=(28, 28),
        top={"image_seq_length": 4},
        mlx_vlm_keys=_text_rope_keys(),
        hub_renames=_HUB_VISION_MODEL,
    ),
    "paligemma": Family(
        "paligemma",
        text={**_LLAMA_TEXT, "head_dim": 32},
        vision=dict(
            _SIGLIP, image_size=28, patch_size=14, projection_dim=128, vision_use_head=False
        ),
        special=("<image>",),
        token_ids={"image_token_index": "<image>"},
        named_tokens={"image_token": "<image>"},
        processor=_paligemma_processor,
        prompt="t5 t6 t7 t300 t42",
        image_size=(28, 28),
        top={"projection_dim": 128, "hidden_size": 128},
        mlx_vlm_keys=_text_rope_keys(),
        hub_renames=_HUB_VISION_MODEL,
        mlx_mask=True,
        tied=True,
    ),
    "llava_next": Family(
        "llava_next",
        text=_LLAMA_TEXT,
        vision=dict(_SIGLIP, image_size=28, patch_size=14),
        special=("<image>",),
        token_ids={"image_token_index": "<image>"},
        named_tokens={"image_token": "<image>"},
        processor=_llava_next_processor,
        prompt="t5 t6 <image> t7 t300 t42",
        image_size=(56, 34),
        top={"image_grid_pinpoints": _GRID},
        mlx_vlm_keys=_text_rope_keys(),
        extra_inputs=("image_sizes",),
        hub_renames=_HUB_VISION_MODEL,
        no_image_oracle=(
            "mlx-vlm 0.7.10's llava_next puts a whole tile's features at each (expanded) image "
            "token and skips the anyres packing (unpad, newlines)"
        ),
    ),
    "llava_onevision": Family(
        "llava_onevision",
        text={**_LLAMA_TEXT, "model_type": "qwen2"},
        vision=dict(_SIGLIP, image_size=28, patch_size=14, vision_use_head=False),
        special=("<image>", "<video>"),
        token_ids={"image_token_index": "<image>", "video_token_index": "<video>"},
        named_tokens={"image_token": "<image>", "video_token": "<video>"},
        processor=_onevision_processor,
        prompt="t5 t6 <image> t7 t300 t42",
        image_size=(56, 34),
        top={
            "image_grid_pinpoints": _GRID,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
        },
        mlx_vlm_keys=_text_rope_keys(),
        extra_inputs=("image_sizes",),
    ),
    "aya_vision": Family(
        "aya_vision",
        text={
            **_LLAMA_TEXT,
            "model_type": "cohere2",
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 64,
        },
        vision=dict(_SIGLIP, image_size=56, patch_size=14, vision_use_head=False),
        special=_AYA_SPECIAL,
        token_ids={"image_token_index": "<|IMG_PATCH|>"},
        processor=_aya_processor,
        prompt="t5 t6 <image> t7 t300 t42",
        image_size=(56, 56),
        top={"downsample_factor": 2, "alignment_intermediate_size": 256},
        mlx_vlm_keys=_text_rope_keys(sliding_window_pattern=2),
        hub_renames=_HUB_VISION_MODEL,
        tied=True,
    ),
    "internvl": Family(
        "internvl",
        text={**_LLAMA_TEXT, "model_type": "qwen3"},
        vision=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=[56, 56],
            patch_size=[14, 14],
        ),
        special=("<img>", "</img>", "<IMG_CONTEXT>"),
        token_ids={"image_token_id": "<IMG_CONTEXT>"},
        named_tokens={"image_token": "<IMG_CONTEXT>"},
        processor=_internvl_processor,
        prompt="t5 t6 <image> t7 t300 t42",
        image_size=(56, 56),
        # mlx-vlm's InternVL projector runs the tanh gelu (`approx="precise"`) where the Hub
        # configs say gelu (exact): set to its function (5e-4 apart otherwise)
        top={
            "max_dynamic_patch": 1,
            "use_thumbnail": False,
            "projector_hidden_act": "gelu_pytorch_tanh",
        },
        torch_inputs=_flat_tiles,
        mlx_vlm_keys=_text_rope_keys(),
    ),
    "lfm2_vl": Family(
        "lfm2_vl",
        text={
            **_LLAMA_TEXT,
            "model_type": "lfm2",
            "layer_types": ["conv", "full_attention"],
            "block_auto_adjust_ff_dim": False,
            "norm_eps": 1e-5,
        },
        vision=dict(
            _SIGLIP,
            model_type="siglip2_vision_model",
            patch_size=8,
            num_patches=16,
            vision_use_head=False,
        ),
        special=("<image>", "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>"),
        token_ids={"image_token_id": "<image>"},
        named_tokens={"image_token": "<image>"},
        processor=_lfm2_vl_processor,
        prompt="t5 t6 <image> t7 t300 t42",
        image_size=(32, 32),
        top={"projector_hidden_size": 128, "downsample_factor": 2},
        # mlx-vlm's LFM2 sizes its blocks by the Hub's block_dim/conv_dim (default 1024)
        mlx_vlm_keys=_text_rope_keys(block_dim=128, conv_dim=128, conv_dim_out=128),
        extra_inputs=("pixel_attention_mask", "spatial_shapes"),
        tied=True,
    ),
    "mistral3": Family(
        "mistral3",
        text=_LLAMA_TEXT,
        # silu as in the Hub Pixtral configs (mlx-vlm hard-codes it; transformers defaults gelu)
        vision=dict(_SIGLIP, head_dim=32, image_size=56, patch_size=14, hidden_act="silu"),
        special=("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
        token_ids={"image_token_index": "[IMG]"},
        named_tokens={"image_token": "[IMG]"},
        processor=_pixtral_processor,
        prompt="t5 t6 [IMG] t7 t300 t42",
        image_size=(56, 56),
        mlx_vlm_keys=_text_rope_keys(),
        extra_inputs=("image_sizes",),
    ),
    "idefics2": Family(
        "idefics2",
        text={**_LLAMA_TEXT, "model_type": "mistral"},
        # mlx-vlm's Idefics 2 tower runs quick_gelu (x * sigmoid(1.702 x)) where the model's
        # default is gelu_pytorch_tanh, and a post-layernorm eps of 1e-5: both set to its values
        vision=dict(
            _SIGLIP, image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5
        ),
        special=_IDEFICS_SPECIAL,
        token_ids={"image_token_id": "<image>"},
        named_tokens={
            "image_token": "<image>",
            "image_boundary_token": "<fake_token_around_image>",
        },
        processor=_idefics2_processor,
        prompt="t5 t6 <image> t7 t300 t42",
        image_size=(32, 32),
        top={
            "perceiver_config": dict(
                hidden_act="silu",
                resampler_n_latents=4,
                resampler_depth=2,
                resampler_n_heads=2,
                resampler_head_dim=32,
                num_key_value_heads=1,
            )
        },
        mlx_vlm_keys=_text_rope_keys(),
        mlx_fix=_idefics2_positions,
        extra_inputs=("pixel_attention_mask",),
    ),
    "idefics3": Family(
        "idefics3",
        text=_LLAMA_TEXT,
        vision=dict(_SIGLIP, image_size=32, patch_size=8),
        special=_IDEFICS_SPECIAL,
        token_ids={"image_token_id": "<image>"},
        named_tokens={"image_token": "<image>"},
        processor=_idefics3_processor("idefics3"),
        prompt="t5 t6 <image> t7 t300 t42",
        image_size=(32, 32),
        top={"scale_factor": 2},
        mlx_vlm_keys=_text_rope_keys(),
        extra_inputs=("pixel_attention_mask",),
    ),
    "smolvlm": Family(
        "smolvlm",
        text=_LLAMA_TEXT,
        vision=dict(_SIGLIP, image_size=32, patch_size=8),
        special=_IDEFICS_SPECIAL,
        token_ids={"image_token_id": "<image>"},
        named_tokens={"image_token": "<image>"},
        processor=_idefics3_processor("smolvlm"),
        prompt="t5 t6 <image> t7 t300 t42",
        image_size=(32, 32),
        top={"scale_factor": 2},
        mlx_vlm_keys=_text_rope_keys(),
        extra_inputs=("pixel_attention_mask",),
    ),
}


def _prefix_token_types(inputs: dict, config) -> dict:
    """transformers' PaliGemmaProcessor marks a prompt without suffix as prefix
    (token_type_ids 0), which PaliGemma 2 in transformers 5 attends bidirectionally (without
    them its Gemma 2 runs causally); mlx-vlm attends over the whole prompt alike."""
    return {**inputs, "token_type_ids": np.zeros_like(inputs["input_ids"])}


# PaliGemma 2: the same model type with a Gemma 2 language model (pre/post feed-forward norms,
# attention and final logit soft-capping, query_pre_attn_scalar); its sliding window is above
# the prompts' length (mlx-vlm 0.7.10's PaliGemma has none, as mlx-lm's Gemma 2)
FAMILIES["paligemma2"] = dataclasses.replace(
    FAMILIES["paligemma"],
    text={
        **FAMILIES["paligemma"].text,
        "model_type": "gemma2",
        "query_pre_attn_scalar": 32,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 512,
    },
    torch_inputs=_prefix_token_types,
)


@contextlib.contextmanager
def _mistral4_yarn_mscale():
    """mlx-vlm 0.7.10's Mistral 4 attention (the language model of its mistral3 package)
    scales the scores by qk_head_dim**-0.5 alone; the model (transformers' yarn_apply_mscale,
    mlx-lm's apply_yarn_mscale) multiplies that by yarn's mscale squared,
    (0.1 * mscale_all_dim * ln(factor) + 1)**2: 1.63 for the tiny model, 2.4 apart in the
    logits. Set back to the model's."""
    import math

    from mlx_vlm.models.mistral4 import language

    init = language.Mistral4Attention.__init__

    def patched(self, config):
        init(self, config)
        rope = config.rope_parameters or {}
        factor, mscale = rope.get("factor", 1.0), rope.get("mscale_all_dim", 0)
        if factor > 1 and mscale:
            self.scale *= (0.1 * mscale * math.log(factor) + 1.0) ** 2

    language.Mistral4Attention.__init__ = patched
    try:
        yield
    finally:
        language.Mistral4Attention.__init__ = init


# yarn as the Hub's Ministral 3 and Mistral Small 4 configs have it, with an original context
# of 4 so that Llama 4's position-dependent query scaling acts within the prompts
_MISTRAL_YARN = {
    "rope_type": "yarn",
    "rope_theta": THETA,
    "factor": 16.0,
    "original_max_position_embeddings": 4,
    "max_position_embeddings": 512,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}
# Ministral 3: Mistral 3's model type with a ministral3 language model
FAMILIES["mistral3_ministral3"] = dataclasses.replace(
    FAMILIES["mistral3"], text={"model_type": "ministral3", "rope_parameters": dict(_MISTRAL_YARN)}
)
# Mistral Small 4: a mistral4 language model (MLA attention, routed and shared experts, which
# mlx-vlm stacks under switch_mlp)
FAMILIES["mistral3_mistral4"] = dataclasses.replace(
    FAMILIES["mistral3"],
    text={
        "model_type": "mistral4",
        "kv_lora_rank": 32,
        "q_lora_rank": 64,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 16,
        "qk_head_dim": 32,
        "v_head_dim": 32,
        "num_key_value_heads": 4,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "n_shared_experts": 1,
        "first_k_dense_replace": 0,
        "rope_parameters": {**_MISTRAL_YARN, "partial_rotary_factor": 0.5},
    },
    mlx_fix=_mistral4_yarn_mscale,
)


# Gemma 4 with its MoE block (26B-A4B): mlx-vlm stacks the experts under `switch_glu`
# Command A Vision: the aya_vision model under its own type; mlx-vlm runs it with its aya_vision
# module (no projector layernorm), which reads the image token as image_token_index (default:
# the Hub's id). As for aya_vision, mlxq applies the logit_scale transformers leaves out.
FAMILIES["cohere2_vision"] = dataclasses.replace(
    FAMILIES["aya_vision"],
    model_type="cohere2_vision",
    token_ids={"image_token_id": "<|IMG_PATCH|>"},
    mlx_vlm_keys=_cohere2_vision_keys,
    # transformers 5 saves it under `model.`; the SigLIP tower takes its `vision_model.` level
    hub_renames=(
        (r"^model\.vision_tower\.(?!vision_model\.)", "model.vision_tower.vision_model."),
    ),
    mlx_fix=_cohere2_vision_post_layernorm,
)
# Granite 4.0 Vision: a SigLIP tower whose window Q-Former projectors (one per deepstack layer,
# four spatial offsets) add the image features into the chosen text layers; anyres tiles as
# LLaVA-NeXT. mlx-vlm builds the Q-Formers 3072 wide and with one head per 64 channels
# whatever the config says (the Hub's): the tiny Q-Former has those sizes.
_GRANITE4_GRID = [[56, 56], [56, 112], [112, 56], [112, 112]]


@contextlib.contextmanager
def _granite4_vision_gelu():
    """mlx-vlm 0.7.10's Granite 4 Vision tower runs the sigmoid GELU (`approx="fast"`,
    x * sigmoid(1.702 x)) in its MLPs where the SigLIP config (and the Hub's) says
    gelu_pytorch_tanh (6.9e-3 apart in the tiny model's logits): set to the model's."""
    import mlx.nn as nn
    from mlx_vlm.models.granite4_vision import vision

    init = vision.MLP.__init__

    def mlp(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.activation_fn = nn.GELU(approx="precise")

    vision.MLP.__init__ = mlp
    try:
        yield
    finally:
        vision.MLP.__init__ = init


def _granite4_vision_processor(tokenizer):
    from transformers import Granite4VisionProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=_GRANITE4_GRID,
    )
    return Granite4VisionProcessor(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="full",
        image_token="<image>",
        downsample_rate="1/2",
    )


FAMILIES["granite4_vision"] = Family(
    "granite4_vision",
    text={
        **_LLAMA_TEXT,
        "num_hidden_layers": 5,
        "embedding_multiplier": 3.0,
        "attention_multiplier": 0.2,
        "residual_multiplier": 0.5,
        "logits_scaling": 2.0,
    },
    vision=dict(_SIGLIP, model_type="siglip_vision_model", image_size=56, patch_size=14),
    special=("<image>",),
    token_ids={"image_token_index": "<image>"},
    named_tokens={"image_token": "<image>"},
    processor=_granite4_vision_processor,
    prompt="t5 t6 <image> t7 t300 t42",
    image_size=(112, 70),
    top={
        "image_grid_pinpoints": _GRANITE4_GRID,
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
        "downsample_rate": "1/2",
        "deepstack_layer_map": [[1, 0]],
        "spatial_vision_layer": -1,
        "spatial_target_layers": [1, 2, 3, 4],
        "qformer_config": {
            "num_hidden_layers": 1,
            "intermediate_size": 3072,
            "cross_attention_frequency": 1,
            "use_qformer_text_input": False,
        },
    },
    mlx_vlm_keys=_text_rope_keys(),
    extra_inputs=("image_sizes",),
    # transformers 5 saves it under `model.`; the SigLIP tower takes its `vision_model.` level
    hub_renames=(
        (r"^model\.vision_tower\.(?!vision_model\.)", "model.vision_tower.vision_model."),
    ),
    mlx_fix=_granite4_vision_gelu,
)
# MiniCPM-V 4.6: Qwen 3.5's language model, a NaViT SigLIP tower with a window-attention merger
# after layer `insert_layer_id` and an MLP merger (two 2x2 merges: 16 patches a token); the image
# as a source tile and slices, each patch-packed ([3, p, n p]). mlx-vlm's processor returns the
# pieces per image and the spans of image tokens (`image_bound`); transformers takes them
# concatenated along the width with their patch grids (`target_sizes`) and finds the image
# tokens by id. mlx-vlm's processor fills the spans with the tokenizer's `image_token`.
_MINICPMV_SPECIAL = (
    "<image>",
    "</image>",
    "<slice>",
    "</slice>",
    "<image_id>",
    "</image_id>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@contextlib.contextmanager
def _minicpmv_merger_gelu():
    """mlx-vlm 0.7.10's MiniCPM-V 4.6 merger MLP runs the tanh GELU (`approx="precise"`) where
    the model has the exact one (transformers' MiniCPMV4_6DownsampleMLP: nn.GELU()): set to the
    model's."""
    import mlx.nn as nn
    from mlx_vlm.models.minicpmv4_6 import minicpmv4_6 as module

    init = module.MergerBlock.__init__

    def block(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.act = nn.GELU()

    module.MergerBlock.__init__ = block
    try:
        yield
    finally:
        module.MergerBlock.__init__ = init


def _minicpmv_processor(tokenizer):
    # mlx-vlm's processor reads its image settings from preprocessor_config.json: 56-pixel
    # tiles (14-pixel patches, 16 patches a token) and up to 2 slices
    settings = {
        "max_slice_nums": 2,
        "patch_size": 14,
        "scale_resolution": 56,
        "slice_mode": True,
        "use_image_id": True,
        "downsample_mode": "16x",
    }
    return _SavedImageProcessor(None, {"processor_class": "MiniCPMVProcessor", **settings})


def _minicpmv_pack(out: dict) -> dict:
    """mlx-vlm's processor output for one prompt as arrays: the pieces' pixels concatenated
    along the width ([1, 3, p, sum n p], transformers' layout), their grids, the token spans."""
    pieces = [np.asarray(p, dtype=np.float32) for p in out["pixel_values"][0]]
    ids = np.asarray(out["input_ids"], dtype=np.int64)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "pixel_values": np.concatenate(pieces, axis=-1)[None],
        "target_sizes": np.asarray(out["tgt_sizes"][0], dtype=np.int64),
        "image_bound": np.asarray(out["image_bound"][0], dtype=np.int64),
        # MiniCPM-V 4.7: image (1) and video (2) tokens, for the rope positions
        **(
            {"mm_token_type_ids": np.asarray(out["mm_token_type_ids"], dtype=np.int64)}
            if "mm_token_type_ids" in out
            else {}
        ),
    }


def _minicpmv_mlx_kwargs(inputs: dict) -> dict:
    """The packed inputs back as mlx-vlm's model takes them: a list of pieces per sample."""
    import mlx.core as mx

    if "pixel_values" not in inputs:
        return {}
    pixels, sizes = inputs["pixel_values"][0], inputs["target_sizes"]
    widths = np.cumsum([0, *(int(h * w) * pixels.shape[1] for h, w in sizes)])
    pieces = [mx.array(pixels[..., a:b]) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    return {
        "pixel_values": [pieces],
        "tgt_sizes": [mx.array(sizes.astype(np.int32))],
        "image_bound": [mx.array(inputs["image_bound"].astype(np.int32))],
    }


def _minicpmv_torch_inputs(inputs: dict, config) -> dict:
    return {k: v for k, v in inputs.items() if k != "image_bound"}


FAMILIES["minicpmv4_6"] = Family(
    "minicpmv4_6",
    text={**_QWEN3_5_TEXT, "model_type": "qwen3_5_text"},
    vision=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        insert_layer_id=0,
    ),
    special=_MINICPMV_SPECIAL,
    token_ids={"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"},
    named_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    processor=_minicpmv_processor,
    prompt="t5 t6 <image>./</image> t7 t300 t42",
    image_size=(112, 56),
    top={"insert_layer_id": 0, "image_size": 56},
    mlx_vlm_keys=_qwen3_5_keys,
    pack_inputs=_minicpmv_pack,
    mlx_kwargs=_minicpmv_mlx_kwargs,
    torch_inputs=_minicpmv_torch_inputs,
    mlx_fix=_minicpmv_merger_gelu,
    word_tokenizer=True,
)
FAMILIES["minicpmv4_7"] = dataclasses.replace(
    FAMILIES["minicpmv4_6"],
    model_type="minicpmv4_7",
    token_ids={
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "image_start_id": "<image>",
        "image_end_id": "</image>",
        "slice_start_id": "<slice>",
        "slice_end_id": "</slice>",
        "newline_id": "<nl>",
    },
    special=(*_MINICPMV_SPECIAL, "<nl>"),
)
# MiniCPM-V 4.7 on Qwen 3.5 MoE's language model
FAMILIES["minicpmv4_7_moe"] = dataclasses.replace(
    FAMILIES["minicpmv4_7"], text={**_QWEN3_5_MOE_TEXT, "model_type": "qwen3_5_moe_text"}
)
# Kimi K2.5: DeepSeek V3's language model (latent attention, sigmoid router, shared expert)
# and the MoonViT tower (2-D rope, learned positions resampled per image), whose 2x2 patch
# groups the projector takes as one token. mlx-vlm reads the tower's sizes under the Hub's
# names (depth, embed_dim, num_heads, init_pos_emb_*) and the image tokens as
# media_placeholder_token_id; its processor returns patches [N, 3, p, p] with their grid
# (image_grid_hws), transformers takes the grid as (t, h, w).
_KIMI_DEEPSEEK = {
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 64,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 64,
    "q_lora_rank": 64,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 32,
    "head_dim": 16,
}


@contextlib.contextmanager
def _kimi_k25_tower():
    """mlx-vlm 0.7.10's MoonViT departs from the model three ways, each set to the model's here:
    (its MLX path off Metal) it resamples the learned position grid with the taps outside the
    grid dropped and the rest renormalised (Pillow's edge rule) where the model resamples it as
    F.interpolate(bicubic) does, taps clamped to the border (1.4e-02 apart in the tiny model's
    logits); its MLPs run the exact GELU where the config says gelu_pytorch_tanh (5.2e-04); its
    layer norms take eps 1e-6 where the model's take 1e-5 (1e-05)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_vlm.models.kimi_k25 import vision

    emb, mlp, block, tower = (
        vision.Learnable2DInterpPosEmb,
        vision.MLP,
        vision.Qwen2VLVisionBlock,
        vision.VisionModel,
    )
    originals = emb.__call__, mlp.__init__, block.__init__, tower.__init__

    def call(self, x, grid_hws):
        table = np.array(self.weight.astype(mx.float32), dtype=np.float64)
        pos = []
        for h, w in grid_hws.tolist():  # images only: (h, w)
            norm_h = (np.repeat(np.arange(h), w) + 0.5) / h * 2 - 1
            norm_w = (np.tile(np.arange(w), h) + 0.5) / w * 2 - 1
            pos.append(_bicubic_border(table, norm_w, norm_h))
        return x + mx.array(np.concatenate(pos).astype(np.float32)).astype(x.dtype)

    def mlp_init(self, *args, **kwargs):
        originals[1](self, *args, **kwargs)
        self.activation_fn = nn.GELU(approx="precise")

    def block_init(self, config):
        originals[2](self, config)
        self.norm0 = nn.LayerNorm(config.embed_dim, eps=1e-5)
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-5)

    def tower_init(self, config):
        originals[3](self, config)
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=1e-5)

    emb.__call__, mlp.__init__, block.__init__, tower.__init__ = (
        call,
        mlp_init,
        block_init,
        tower_init,
    )
    try:
        yield
    finally:
        emb.__call__, mlp.__init__, block.__init__, tower.__init__ = originals


def _kimi_k25_processor(tokenizer):
    # mlx-vlm's processor reads the patch settings from preprocessor_config.json
    settings = {"media_proc_cfg": {"patch_size": 14, "merge_kernel_size": 2}}
    return _SavedImageProcessor(None, {"processor_class": "KimiK25Processor", **settings})


def _kimi_k25_keys(cfg: dict) -> None:
    """The Hub's names of the tower's sizes and of the image token, which mlx-vlm reads."""
    _text_rope_keys()(cfg)
    vision = cfg["vision_config"]
    for hub, ours in (
        ("depth", "num_hidden_layers"),
        ("embed_dim", "hidden_size"),
        ("num_heads", "num_attention_heads"),
        ("init_pos_emb_height", "pos_emb_height"),
        ("init_pos_emb_width", "pos_emb_width"),
    ):
        vision[hub] = vision[ours]
    vision["model_type"] = "moonvit"  # mlx-vlm's tower refuses transformers' kimi_k25_vision
    cfg["media_placeholder_token_id"] = cfg["image_token_id"]


def _kimi_k25_pack(out: dict) -> dict:
    ids = np.asarray(out["input_ids"], dtype=np.int64)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "pixel_values": np.asarray(out["pixel_values"], dtype=np.float32),
        "image_grid_hws": np.asarray(out["image_grid_hws"], dtype=np.int64),
    }


def _kimi_k25_torch_inputs(inputs: dict, config) -> dict:
    out = {k: v for k, v in inputs.items() if k != "image_grid_hws"}
    if "image_grid_hws" in inputs:
        hws = inputs["image_grid_hws"]
        out["image_grid_thw"] = np.concatenate([np.ones_like(hws[:, :1]), hws], axis=1)
    return out


FAMILIES["kimi_k25"] = Family(
    "kimi_k25",
    text={**_LLAMA_TEXT, **_KIMI_DEEPSEEK, "model_type": "deepseek_v3"},
    vision=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=14,
        pos_emb_height=8,
        pos_emb_width=8,
    ),
    special=("<|media_start|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>"),
    token_ids={"image_token_id": "<|media_pad|>"},
    processor=_kimi_k25_processor,
    prompt="t5 t6 <|media_pad|> t7 t300 t42",
    image_size=(84, 56),
    top={"projection_hidden_size": 64},
    mlx_vlm_keys=_kimi_k25_keys,
    pack_inputs=_kimi_k25_pack,
    torch_inputs=_kimi_k25_torch_inputs,
    mlx_fix=_kimi_k25_tower,
    # transformers 5.24 saves its language layers as `blocks` and the projector's norm under
    # `model.` (its conversion reversed); the Hub has `layers` and `mm_projector.`
    hub_renames=(
        (r"^language_model\.model\.blocks\.", "language_model.model.layers."),
        (r"^model\.mm_projector\.", "mm_projector."),
    ),
    word_tokenizer=True,
)
# Gemma 4 Unified: Gemma 4's language model (bidirectional attention within an image) and an
# encoder-free image embedder (each 16-pixel patch normed, projected, given its learned x/y
# position); the audio embedder is built too. mlx-vlm's processor returns the patches and their
# positions as transformers takes them.
_GEMMA4U_SOFT_TOKENS = 16


def _gemma4_unified_processor(tokenizer):
    settings = {
        "patch_size": 8,
        "pooling_kernel_size": 2,
        "max_soft_tokens": _GEMMA4U_SOFT_TOKENS,
        "mm_posemb_size": 16,
    }
    return _SavedImageProcessor(
        None,
        {
            "processor_class": "Gemma4UnifiedProcessor",
            "image_processor": settings,
            "image_seq_length": _GEMMA4U_SOFT_TOKENS,
        },
    )


@contextlib.contextmanager
def _gemma4_unified_image_blocks():
    """mlx-vlm 0.7.10's Gemma 4 Unified Model.__call__ does not hand `mm_token_type_ids` to its
    language model, which then attends causally over the image (3.9 apart in the tiny model's
    logits); its Gemma 4 language model attends bidirectionally within each image (the model's
    `use_bidirectional_attention: vision`) when given them: handed over here."""
    from mlx_vlm.models.gemma4_unified import gemma4_unified as module

    cls = module.Model
    original = cls.__call__

    def call(self, input_ids=None, pixel_values=None, mask=None, cache=None, **kwargs):
        features = self.get_input_embeddings(
            input_ids=input_ids, pixel_values=pixel_values, **kwargs
        )
        return self.language_model(
            None,
            cache=cache,
            inputs_embeds=features.inputs_embeds,
            mask=mask,
            per_layer_inputs=features.per_layer_inputs,
            mm_token_type_ids=kwargs.get("mm_token_type_ids"),
        )

    cls.__call__ = call
    try:
        yield
    finally:
        cls.__call__ = original


def _gemma4_unified_keys(cfg: dict) -> None:
    """mlx-vlm reads the full-attention layers' head size as global_head_dim (default 512),
    which transformers keeps in per_layer_config only."""
    text = cfg["text_config"]
    text["global_head_dim"] = 64
    vision = cfg["vision_config"]  # and the patch size of the embedder (default 48)
    vision["model_patch_size"] = vision["patch_size"] * vision["pooling_kernel_size"]


FAMILIES["gemma4_unified"] = Family(
    "gemma4_unified",
    text={
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 64,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": THETA},
        },
        "global_head_dim": 64,
    },
    vision=dict(
        patch_size=8, pooling_kernel_size=2, mm_embed_dim=64, output_proj_dims=64, mm_posemb_size=16
    ),
    special=(*_GEMMA4_SPECIAL, "<start_of_audio>", "<end_of_audio>", "<audio_soft_token>"),
    token_ids={
        "boi_token_id": "<start_of_image>",
        "eoi_token_id": "<end_of_image>",
        "image_token_id": "<image_soft_token>",
        "video_token_id": "<|video|>",
        "boa_token_id": "<start_of_audio>",
        "eoa_token_index": "<end_of_audio>",
        "audio_token_id": "<audio_soft_token>",
    },
    named_tokens={
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
        "boa_token": "<start_of_audio>",
        "eoa_token": "<end_of_audio>",
        "audio_token": "<audio_soft_token>",
    },
    processor=_gemma4_unified_processor,
    prompt="t5 t6 <image_soft_token> t7 t300 t42",
    image_size=(64, 48),
    top={"vision_soft_tokens_per_image": _GEMMA4U_SOFT_TOKENS},
    extra_inputs=("image_position_ids", "mm_token_type_ids"),
    mlx_vlm_keys=_gemma4_unified_keys,
    mlx_fix=_gemma4_unified_image_blocks,
    tied=True,
)


# Muse Glimmer: a ViT with 2-D rope and learned positions, its 2x2 patch groups merged and run
# through an adapter MLP and a projection (then a scale-free RMS norm) into the text model
def _muse_glimmer_processor(tokenizer):
    settings = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    return _SavedImageProcessor(
        None, {"processor_class": "MuseGlimmerProcessor", "image_processor": settings}
    )


@contextlib.contextmanager
def _muse_glimmer_processor_config():
    """mlx-vlm 0.7.10's convert fails saving Muse Glimmer's processor: MuseGlimmerProcessor keeps
    the model's ModelConfig (unused), which processor_config.json cannot hold (TypeError).
    Dropped here while converting."""
    from mlx_vlm.models.muse_glimmer import processing_muse_glimmer as module

    cls = module.MuseGlimmerProcessor
    init = cls.__init__

    def without_config(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.config = None

    cls.__init__ = without_config
    try:
        yield
    finally:
        cls.__init__ = init


@contextlib.contextmanager
def _muse_glimmer_positions():
    """transformers' Muse Glimmer samples the learned position table for a grid of (h, w)
    patches as for a (w, h) grid, in its raster order (the reference code's meshgrid with
    indexing="xy", its comment says); mlx-vlm 0.7.10 samples it for the (h, w) grid. The same
    on square grids (1.7e-06), 0.14 apart on the tiny model's 4 x 6 grid: set to transformers'."""
    from mlx_vlm.models.muse_glimmer import vision

    cls = vision.PatchEmbedder
    original = cls._position_embeddings

    def swapped(self, grid):
        return original(self, [[t, w, h] for t, h, w in grid])

    cls._position_embeddings = swapped
    try:
        yield
    finally:
        cls._position_embeddings = original


FAMILIES["muse_glimmer"] = Family(
    "muse_glimmer",
    text={
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 64,
        "rope_parameters": {"rope_type": "default", "rope_theta": THETA},
    },
    vision=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=14,
        pos_emb_height=8,
        pos_emb_width=8,
        max_position_embeddings=64,
    ),
    special=("<|image_start|>", "<|image_end|>", "<|patch|>", "<|video|>"),
    token_ids={"image_token_id": "<|patch|>", "video_token_id": "<|video|>"},
    processor=_muse_glimmer_processor,
    prompt="t5 t6 <|patch|> t7 t300 t42",
    image_size=(84, 56),
    top={"out_hidden_size": 256, "projector_hidden_size": 128},
    extra_inputs=("image_grid_thw",),
    convert_fix=_muse_glimmer_processor_config,
    mlx_fix=_muse_glimmer_positions,
)
# MiniMax M3 VL: a sparse-attention MoE language model (clamped SwiGLU experts, a shared
# expert, a dense first layer) and a Qwen2-VL style tower; mlxq refuses it by name
# (UNVERIFIED_VLM: mlx-vlm packs the shared expert into the stacked ones)
_MINIMAX_SPECIAL = ("]<]start of image[>[", "]<]end of image[>[", "]<]image[>[", "]<]video[>[")


def _minimax_m3_vl_processor(tokenizer):
    settings = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    return _SavedImageProcessor(
        None, {"processor_class": "MiniMaxM3VLProcessor", "image_processor": settings}
    )


FAMILIES["minimax_m3_vl"] = Family(
    "minimax_m3_vl",
    text={
        "rope_parameters": {"rope_type": "default", "rope_theta": THETA},
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "intermediate_size": 64,
        "shared_intermediate_size": 64,
        "dense_intermediate_size": 256,
        "mlp_layer_types": ["dense", "sparse"],
        "rotary_dim": 16,
        "layer_types": ["full_attention", "minimax_m3_sparse"],
        "index_n_heads": 2,
        "index_head_dim": 16,
        "index_block_size": 4,
        "index_topk_blocks": 16,
    },
    vision=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=14,
        image_size=56,
    ),
    special=_MINIMAX_SPECIAL,
    token_ids={"image_token_index": "]<]image[>[", "video_token_index": "]<]video[>["},
    processor=_minimax_m3_vl_processor,
    prompt="t5 t6 ]<]image[>[ t7 t300 t42",
    image_size=(84, 56),
    top={"projector_hidden_size": 128},
    extra_inputs=("image_grid_thw",),
)
FAMILIES["gemma4_moe"] = dataclasses.replace(
    FAMILIES["gemma4"],
    text={
        **_GEMMA4_TEXT,
        "enable_moe_block": True,
        "num_experts": 4,
        "top_k_experts": 2,
        "moe_intermediate_size": 64,
    },
)


# GLM-5-Next: a linear-attention layer (its fused projections) with a dense MLP and a
# sparse-attention one (DeepSeek's MLA with an indexer) with the MoE block (experts with a
# clamped SwiGLU, a shared expert); transformers' forward fails on linear-attention layers alone
FAMILIES["glm5_next"] = dataclasses.replace(
    FAMILIES["glm4v"],
    model_type="glm5_next",
    text={
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "kv_lora_rank": 64,
        "q_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "qk_rope_head_dim": 0,  # its indexed (DSA) layers take no rope
        "index_topk": 64,
        "index_head_dim": 32,
        "index_n_heads": 2,
        "linear_head_dim": 32,
        "linear_num_heads": 4,
        "num_key_value_heads": 4,
        "layer_types": ["linear_attention", "full_attention"],
        "mlp_layer_types": ["dense", "sparse"],
        "pad_token_id": 0,  # the Hub's (154820) is outside the tiny vocabulary
    },
    vision={**_GLM4V_VISION, "projection_intermediate_size": 128},
    mlx_vlm_keys=None,
)
# families mlxq refuses by name (mlx_vlm_layout.UNVERIFIED_VLM): mlx-vlm converts these tiny
# models
# Diffusion Gemma: Gemma 4's MoE language model as a block-diffusion encoder and decoder
FAMILIES["diffusion_gemma"] = dataclasses.replace(
    FAMILIES["gemma4_moe"], model_type="diffusion_gemma"
)


def tiny_tokenizer(
    out: Path, special: tuple[str, ...], named: dict[str, str] | None = None, size: int = VOCAB
):
    """A word-level tokenizer over `t4..` with <pad>/<s>/</s>/<unk> at 0..3 and the family's
    special tokens at the end of the vocabulary."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    first_special = size - len(special)
    vocab.update({f"t{i}": i for i in range(4, first_special)})
    vocab.update({s: first_special + i for i, s in enumerate(special)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=dict(named or {}),
    )
    fast.save_pretrained(out)
    return fast, {s: first_special + i for i, s in enumerate(special)}


def _config(family: Family, ids: dict[str, int], tied: bool):
    from transformers import AutoConfig

    text = {**TEXT, "vocab_size": family.vocab, **copy.deepcopy(family.text)}
    text["tie_word_embeddings"] = tied
    top = {attr: ids[token] for attr, token in family.token_ids.items()}
    return AutoConfig.for_model(
        family.model_type,
        text_config=text,
        vision_config=copy.deepcopy(family.vision),
        tie_word_embeddings=tied,
        **top,
        **family.top,
    )


def transformers_config(name: str, tied: bool | None = None):
    """The tiny model's config as transformers 5 builds it (none of mlx-vlm's keys)."""
    family = FAMILIES[name]
    first = family.vocab - len(family.special)
    ids = {s: first + i for i, s in enumerate(family.special)}
    return _config(family, ids, variant_of(name).tied if tied is None else tied)


def tiny_float_checkpoint(name: str, out: Path, tied: bool, family: Family | None = None) -> Path:
    """A tiny random bf16 image-text model of family `name` (or of `family`, a variant of it)
    saved by transformers, with a tokenizer and image processor, and config.json in the
    layout mlx-vlm reads."""
    import torch
    from transformers import AutoModelForImageTextToText

    family = family or FAMILIES[name]
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, ids = tiny_tokenizer(out, family.special, family.named_tokens, family.vocab)
    family.processor(tokenizer).save_pretrained(out)
    config = _config(family, ids, tied)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            else:  # norms and biases away from their init values (0 or 1)
                p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():  # the routers' expert-choice biases (zeros)
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.5)
    model.save_pretrained(out)
    if family.hub_renames or family.hub_tensors:
        import re

        from safetensors.torch import load_file, save_file

        tensors = load_file(out / "model.safetensors")
        for pattern, repl in family.hub_renames:
            tensors = {re.sub(pattern, repl, k): v for k, v in tensors.items()}
        if family.hub_tensors is not None:
            tensors = {k: family.hub_tensors(k, v).contiguous() for k, v in tensors.items()}
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    if family.mlx_vlm_keys is not None:
        family.mlx_vlm_keys(cfg)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@dataclass(frozen=True)
class Variant:
    """One conversion: tied or untied head and the quantization settings."""

    tied: bool = False
    bits: int = 4
    group_size: int = 64
    recipe: str | None = None  # mlx-vlm's --quant-predicate (per-module entries)
    quantize_vision: bool = False  # the vision tower quantized too (mlx-vlm skips it)

    @property
    def tag(self) -> str:
        head = "tied" if self.tied else "untied"
        recipe = self.recipe or f"{self.bits}bit"
        return f"{head}-{recipe}-g{self.group_size}" + ("-qvision" if self.quantize_vision else "")


def _cache_key(name: str, variant: Variant) -> str:
    import mlx_vlm
    from mlxq.demo_model import _versions

    family = FAMILIES[name]
    spec = json.dumps(
        [TEXT, family.text, family.vision, family.top, family.prompt, family.special]
        + [family.named_tokens, family.image_size, variant.tag, family.vocab, HARNESS],
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
    return f"vlm-{name}-{variant.tag}-{_versions()}-vlm{mlx_vlm.__version__}-{digest}"


def variant_of(name: str) -> Variant:
    """The variant a family is tested with: untied head unless mlx-vlm has tied only."""
    return Variant(tied=FAMILIES[name].tied)


# recipes of this file, not mlx-vlm's: the vision tower's linear layers in 8 bits, group 32
# (or mxfp4), the rest at the variant's default; so the per-module entries name vision modules
# only (mlxq must translate their names to apply them)
VISION_8BIT = "vision_8bit_g32"
VISION_MXFP4 = "vision_mxfp4"
_VISION_RECIPES = {
    VISION_8BIT: {"group_size": 32, "bits": 8},
    VISION_MXFP4: {"group_size": 32, "bits": 4, "mode": "mxfp4"},
}


def _quant_predicate(recipe: str | None):
    """mlx-vlm's recipe name, or this file's own recipe as an mlx-vlm predicate."""
    if recipe not in _VISION_RECIPES:
        return recipe
    from mlx_vlm.utils import skip_multimodal_module

    def predicate(path: str, module) -> bool | dict:
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % 32:
            return False
        if skip_multimodal_module(path):
            return dict(_VISION_RECIPES[recipe])
        return True

    return predicate


def tiny_mlx_vlm_checkpoint(name: str, variant: Variant | None = None) -> Path:
    """The tiny model converted by `mlx_vlm.convert -q` (cached). Raises what mlx-vlm raises."""
    from mlx_vlm import convert

    variant = variant or variant_of(name)

    def build(float_dir: Path, out: Path) -> None:
        tiny_float_checkpoint(name, float_dir, variant.tied)
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            if FAMILIES[name].convert_fix is not None:
                stack.enter_context(FAMILIES[name].convert_fix())
            if variant.quantize_vision:  # mlx-vlm's own rule keeps vision modules float
                import importlib
                from unittest import mock

                # (the package exports a function of the same name as the module)
                convert_module = importlib.import_module("mlx_vlm.convert")

                stack.enter_context(
                    mock.patch.object(convert_module, "skip_multimodal_module", lambda p: False)
                )
            convert(
                str(float_dir),
                str(out),
                quantize=True,
                q_group_size=variant.group_size,
                q_bits=variant.bits,
                quant_predicate=_quant_predicate(variant.recipe),
            )
        if FAMILIES[name].word_tokenizer:  # mlx-vlm saved its class's rebuild of it
            shutil.copy(float_dir / "tokenizer.json", out / "tokenizer.json")

    return cached_checkpoint(_cache_key(name, variant), build)


# Qwen3-Omni-MoE's thinker (language model, vision and audio towers), no talker: a family that
# transformers maps to no image-text auto class (AutoModelForMultimodalLM only)
_OMNI_THINKER = {
    "text_config": {
        **TEXT,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "rope_parameters": {**_MROPE, "mrope_interleaved": True},
    },
    "vision_config": {k: v for k, v in _QWEN3_VISION.items() if k not in ("patch_size",)},
    "audio_config": {
        "encoder_layers": 1,
        "d_model": 64,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 128,
        "output_dim": 128,
        "downsample_hidden_size": 32,
    },
    "image_token_id": VOCAB - 3,
    "audio_token_id": VOCAB - 2,
    "video_token_id": VOCAB - 1,
}


def _omni_hub_keys(cfg: dict) -> None:
    """The Hub's keys mlx-vlm 0.7.10 requires: the thinker's rope_theta and mrope
    rope_scaling, and the (unbuilt) talker's expert count, head size and rope_theta."""
    text = cfg["thinker_config"]["text_config"]
    section = text["rope_parameters"]["mrope_section"]
    text["rope_theta"] = THETA
    text["rope_scaling"] = {"type": "default", "mrope_section": section, "interleaved": True}
    talker = cfg["talker_config"]["text_config"]
    talker.setdefault("num_experts", talker.get("num_local_experts"))
    talker.setdefault("head_dim", talker["hidden_size"] // talker["num_attention_heads"])
    talker.setdefault("rope_theta", THETA)


def tiny_mlx_vlm_omni_checkpoint() -> Path:
    """A tiny random Qwen3-Omni-MoE (thinker only) converted by `mlx_vlm.convert -q` (4-bit,
    group 64), cached. Its processor (audio feature extractor, video processor) is not built:
    mlx-vlm saves the word-level tokenizer in its place."""
    import importlib
    from unittest import mock

    import torch
    from mlx_vlm import convert
    from mlxq.demo_model import _versions
    from transformers import AutoConfig, Qwen3OmniMoeForConditionalGeneration

    def build(float_dir: Path, out: Path) -> None:
        float_dir.mkdir(parents=True, exist_ok=True)
        tokenizer, _ = tiny_tokenizer(float_dir, ())
        config = AutoConfig.for_model(
            "qwen3_omni_moe",
            enable_audio_output=False,
            thinker_config=copy.deepcopy(_OMNI_THINKER),
        )
        torch.manual_seed(0)
        model = Qwen3OmniMoeForConditionalGeneration(config).to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.08)
                else:
                    p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(float_dir)
        cfg = json.loads((float_dir / "config.json").read_text())
        _omni_hub_keys(cfg)
        (float_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        utils = importlib.import_module("mlx_vlm.utils")
        with (
            contextlib.redirect_stdout(io.StringIO()),
            mock.patch.object(utils, "load_processor", lambda *a, **k: tokenizer),
        ):
            convert(str(float_dir), str(out), quantize=True, q_group_size=64, q_bits=4)

    spec = json.dumps([_OMNI_THINKER, HARNESS], sort_keys=True, default=str)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
    key = f"vlm-qwen3_omni_moe-{_versions('transformers', 'mlx-vlm')}-{digest}"
    return cached_checkpoint(key, build)


def tiny_mlx_vlm_pixtral_checkpoint() -> Path:
    """A tiny random LLaVA with a Pixtral tower (transformers' LlavaForConditionalGeneration)
    with config.json's model_type set to 'pixtral', the name mlx-vlm 0.7.10 runs it under (its
    llava package takes CLIP / SigLIP towers only), converted by `mlx_vlm.convert -q` (4-bit,
    group 64), cached."""
    import torch
    from mlx_vlm import convert
    from mlxq.demo_model import _versions
    from transformers import AutoConfig, LlavaForConditionalGeneration

    text = {**TEXT, "model_type": "mistral", "rope_theta": THETA}
    vision = dict(model_type="pixtral", hidden_size=64, intermediate_size=128, head_dim=32)
    vision.update(num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)

    def build(float_dir: Path, out: Path) -> None:
        float_dir.mkdir(parents=True, exist_ok=True)
        tokenizer, ids = tiny_tokenizer(float_dir, ("[IMG]",))
        config = AutoConfig.for_model(
            "llava",
            text_config=text,
            vision_config=vision,
            image_token_index=ids["[IMG]"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.08)
        model.save_pretrained(float_dir)
        _pixtral_processor(tokenizer).save_pretrained(float_dir)
        cfg = json.loads((float_dir / "config.json").read_text())
        cfg["model_type"] = "pixtral"
        (float_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        with contextlib.redirect_stdout(io.StringIO()):
            convert(str(float_dir), str(out), quantize=True, q_group_size=64, q_bits=4)

    spec = json.dumps([text, vision, HARNESS], sort_keys=True, default=str)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
    key = f"vlm-pixtral-{_versions('transformers', 'mlx-vlm')}-{digest}"
    return cached_checkpoint(key, build)


# mlx-lm's conversions of image-text models (their language model only): text_config settings
# over the family's that mlx-lm 0.32 needs (its llama4 indexes the cache of a fourth layer, a
# chunked-attention one, and reads text_config's rope_scaling)
MLX_LM_TEXT = {"llama4": {"num_hidden_layers": 4}}
MLX_LM_TEXT_KEYS = {"llama4": {"rope_scaling": None}, "qwen3_vl_moe": {"norm_topk_prob": True}}


def tiny_mlx_lm_checkpoint(name: str) -> Path:
    """The tiny image-text model of family `name` converted by `mlx_lm.convert -q` (4-bit,
    group 64; mlx-lm keeps the language model only), cached. Raises what mlx-lm raises."""
    from mlx_lm import convert
    from mlxq.demo_model import _versions

    family = FAMILIES[name]
    family = dataclasses.replace(family, text={**family.text, **MLX_LM_TEXT.get(name, {})})

    def build(float_dir: Path, out: Path) -> None:
        tiny_float_checkpoint(name, float_dir, family.tied, family)
        config = json.loads((float_dir / "config.json").read_text())
        config["text_config"].update(MLX_LM_TEXT_KEYS.get(name, {}))
        config.setdefault("vocab_size", config["text_config"]["vocab_size"])
        (float_dir / "config.json").write_text(json.dumps(config, indent=2))
        with contextlib.redirect_stdout(io.StringIO()):
            convert(str(float_dir), str(out), quantize=True, q_group_size=64, q_bits=4)

    spec = json.dumps(
        [TEXT, family.text, family.vision, family.top, MLX_LM_TEXT_KEYS.get(name), HARNESS],
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
    key = f"mlx-lm-of-{name}-{_versions('transformers', 'mlx-lm')}-{digest}"
    return cached_checkpoint(key, build)


def test_image(size: tuple[int, int]):
    """A deterministic RGB image with structure in both directions and every channel."""
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack(
        [(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x * 7 + y * 13) % 256)],
        axis=-1,
    )
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def model_inputs(path: Path, name: str, with_image: bool) -> dict[str, np.ndarray]:
    """The processor's output (numpy) for the family's prompt, with or without the image."""
    import importlib

    from mlx_vlm.utils import load_processor

    family = FAMILIES[name]
    # registers mlx-vlm's own processor classes, which its saved processor_config.json names
    from mlx_vlm.utils import MODEL_REMAPPING

    module = MODEL_REMAPPING.get(family.model_type, family.model_type)
    importlib.import_module(f"mlx_vlm.models.{module}")
    processor = load_processor(path)
    if family.loaded_processor_fix is not None:
        family.loaded_processor_fix(processor)
    if family.word_tokenizer:
        from transformers import PreTrainedTokenizerFast

        processor.tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(path / "tokenizer.json"), pad_token="<pad>"
        )
        if hasattr(processor, "_ensure_tokenizer_attrs"):  # MiniCPM-V: the token ids it keeps
            processor._ensure_tokenizer_attrs()
    if not with_image:
        ids = processor.tokenizer(TEXT_PROMPT, add_special_tokens=False)["input_ids"]
        ids = np.array([ids], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    out = processor(
        text=[family.prompt], images=[test_image(family.image_size)], return_tensors="np"
    )
    if family.pack_inputs is not None:
        return family.pack_inputs(out)
    keep = ("input_ids", "attention_mask", "pixel_values", *family.extra_inputs)
    return {k: np.asarray(out[k]) for k in keep if k in out}


def _causal_with_image_blocks(ids: np.ndarray, image_token: int) -> np.ndarray:
    """[L, L] bool: causal attention, and bidirectional within each run of image tokens."""
    n = len(ids)
    is_image = ids == image_token
    run = np.cumsum(np.concatenate([[0], (is_image[1:] != is_image[:-1]).astype(int)]))
    causal = np.tril(np.ones((n, n), dtype=bool))
    same_image = is_image[:, None] & is_image[None, :] & (run[:, None] == run[None, :])
    return causal | same_image


def mlx_vlm_logits(path: Path, name: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """mlx-vlm's fp32 logits for these inputs (the model cast to float32)."""
    fix = FAMILIES[name].mlx_fix
    with fix() if fix is not None else contextlib.nullcontext():
        return _mlx_vlm_logits(path, name, inputs)


def _mlx_vlm_logits(path: Path, name: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import mlx.core as mx
    from mlx_vlm.utils import load_model

    model = load_model(Path(path))
    model.set_dtype(mx.float32)
    kwargs = {k: mx.array(v) for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    if FAMILIES[name].mlx_kwargs is not None:
        kwargs = FAMILIES[name].mlx_kwargs(inputs)
    pixels = kwargs.pop("pixel_values", None)
    if isinstance(pixels, mx.array):
        pixels = pixels.astype(mx.float32)
    ids = mx.array(inputs["input_ids"])
    if FAMILIES[name].image_block_mask and pixels is not None:
        mask = mx.array(inputs["attention_mask"])
        embeds = model.get_input_embeddings(ids, pixels, mask=mask, **kwargs).inputs_embeds
        block = _causal_with_image_blocks(inputs["input_ids"][0], model.config.image_token_index)
        out = model.language_model(ids, inputs_embeds=embeds, mask=mx.array(block[None, None]))
    else:
        mask = mx.array(inputs["attention_mask"]) if FAMILIES[name].mlx_mask else None
        out = model(ids, pixels, mask=mask, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    return np.array(logits[0].astype(mx.float32))


def mlxq_logits(path: Path, name: str, inputs: dict[str, np.ndarray], model=None) -> np.ndarray:
    """mlxq's fp32 logits through transformers' AutoModelForImageTextToText."""
    import torch
    from transformers import AutoModelForImageTextToText

    if model is None:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    family = FAMILIES[name]
    if family.torch_inputs is not None:
        inputs = family.torch_inputs(inputs, model.config)
    kwargs = {k: torch.from_numpy(v) for k, v in inputs.items()}
    if "pixel_values" in kwargs:
        kwargs["pixel_values"] = kwargs["pixel_values"].float()
    with torch.no_grad():
        return model(**kwargs).logits[0].float().numpy()


def mlx_tile_features(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """mlx-vlm's projected features of each image tile (LLaVA-like models), fp32."""
    import mlx.core as mx
    from mlx_vlm.utils import load_model

    model = load_model(Path(path))
    model.set_dtype(mx.float32)
    pixels = mx.array(inputs["pixel_values"][0]).astype(mx.float32).transpose(0, 2, 3, 1)
    *_, hidden = model.vision_tower(pixels, output_hidden_states=True)
    selected = hidden[model.config.vision_feature_layer]
    if model.config.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]
    return np.array(model.multi_modal_projector(selected))


def mlxq_tile_features(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The same features from the transformers model mlxq loaded."""
    import torch

    config = model.config
    pixels = torch.from_numpy(inputs["pixel_values"][0]).float()
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_hidden_states=True)
        selected = out.hidden_states[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        return model.model.multi_modal_projector(selected).numpy()


def saved_and_expected_shapes(source: Path, out: Path) -> tuple[dict, dict]:
    """(name -> shape) of the tensors `save_pretrained` wrote to `out` from mlx-vlm's checkpoint
    `source`, and of those it should write: `source`'s, less the scales and biases of the layers
    saved float with a False entry in `out`'s config.json (layers whose weight dtype the forward
    reads run float: GLM-5-Next's indexer weights_proj); their weight is left out of both."""
    from safetensors import safe_open

    entries = json.loads((out / "config.json").read_text()).get("quantization", {})
    floats = {k for k, v in entries.items() if v is False}
    shapes = []
    for path in (out, source):
        with safe_open(path / "model.safetensors", "np") as f:
            shapes.append(
                {
                    k: f.get_slice(k).get_shape()
                    for k in f.keys()
                    if k.rsplit(".", 1)[0] not in floats
                }
            )
    return shapes[0], shapes[1]


def save_round_trip(name: str, out: Path, variant: Variant | None = None) -> float:
    """Load the mlx-vlm checkpoint in mlxq, `save_pretrained` it to `out` (with the source's
    tokenizer and processor files) and return max |mlx-vlm logits on the saved checkpoint -
    mlxq's logits| for the image + text prompt (or the tile features, see no_image_oracle)."""
    import torch
    from transformers import AutoModelForImageTextToText

    source = tiny_mlx_vlm_checkpoint(name, variant)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
    model.save_pretrained(out)
    for file in source.iterdir():  # tokenizer and processor files
        if file.is_file() and not (out / file.name).exists():
            shutil.copy(file, out / file.name)
    saved, want = saved_and_expected_shapes(source, out)
    if saved != want:
        raise ValueError(f"{name}: the saved tensors are not mlx-vlm's names and shapes")
    inputs = model_inputs(out, name, with_image=True)
    family = FAMILIES[name]
    if family.no_image_oracle:
        return float(
            np.abs(mlx_tile_features(out, inputs) - mlxq_tile_features(model, inputs)).max()
        )
    ours = mlxq_logits(out, name, inputs, model)
    return float(np.abs(mlx_vlm_logits(out, name, inputs) - ours).max())


@dataclass
class Outcome:
    """One family: `loads` with the max diffs (text only, image + text), or a reason."""

    name: str
    variant: Variant
    status: str  # "loads", "refused" (by mlxq or transformers), "mlx-vlm fails" (no oracle)
    text_diff: float | None = None
    image_diff: float | None = None
    reason: str = ""

    def line(self) -> str:
        head = f"{self.name:14s} {self.variant.tag:18s}"
        if self.status == "loads":
            image = "image tiles" if FAMILIES[self.name].no_image_oracle else "image+text"
            return f"{head} loads  text {self.text_diff:.2e}  {image} {self.image_diff:.2e}"
        return f"{head} {self.status}: {self.reason}"


def run_family(name: str, variant: Variant | None = None) -> Outcome:
    """Convert with mlx-vlm, run both on a text prompt and on an image + text prompt."""
    variant = variant or variant_of(name)
    try:
        path = tiny_mlx_vlm_checkpoint(name, variant)
        inputs = [model_inputs(path, name, with_image) for with_image in (False, True)]
        if FAMILIES[name].no_image_oracle:
            refs = [mlx_vlm_logits(path, name, inputs[0]), mlx_tile_features(path, inputs[1])]
        else:
            refs = [mlx_vlm_logits(path, name, x) for x in inputs]
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the oracle cannot run this family
        return Outcome(name, variant, "mlx-vlm fails", reason=_one_line(e))
    try:
        import torch
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        if FAMILIES[name].no_image_oracle:
            got = [mlxq_logits(path, name, inputs[0], model), mlxq_tile_features(model, inputs[1])]
        else:
            got = [mlxq_logits(path, name, x, model) for x in inputs]
    except (NotImplementedError, ValueError, RuntimeError) as e:
        return Outcome(name, variant, "refused", reason=_one_line(e))
    diffs = [float(np.abs(g - r).max()) for g, r in zip(got, refs, strict=True)]
    return Outcome(name, variant, "loads", text_diff=diffs[0], image_diff=diffs[1])


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"
