"""mlxq's quantization of a float model against `mlx_lm convert -q` / `mlx_vlm convert -q`.

For every text architecture of tests/arch_models.py and image-text family of
tests/vlm_models.py: the tiny float model is loaded by transformers, quantized by
`mlxq.quantize_model` (no per-module entries: the model class's own rule, as mlx-lm's and
mlx-vlm's convert apply it; or the converter's mixed recipe, mlx-vlm's own for image-text
models: mlxq.convert.recipe_arguments) and saved; the saved tensors (names,
dtypes, values) and the config's quantization block are compared with the reference
conversion of the same float model (cached by the tests, made here when missing unless
--cached-only). Non-MoE text models are also quantized while they load
(`from_pretrained(quantization_config=MLXQuantConfig(...))`), and image-text models are also
converted by `mlxq convert` (mlxq.convert.convert_checkpoint).

    python benchmarks/quantize_sweep.py [--only ARCH,...] [--text-only|--vlm-only] [--cached-only]

One line per model and variant: `match`, `MISMATCH: ...`, `refused: ...` (mlxq raised, with
its reason) or `no oracle: ...` (the reference converter fails on this model).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


# Rows that still differ, and why (mlx-lm 0.32.2 / mlx-vlm 0.7.10, transformers 5.24): printed
# after the row and counted apart ("noted") in the summary
NOTES = {
    # transformers' model reads these weights itself (the indexer casts to weights_proj's
    # dtype; Mamba's untied head is read as `.weight`): mlxq keeps them float with a `false`
    # entry, mlx-lm quantizes them
    **dict.fromkeys(
        ("deepseek_v32", "glm_moe_dsa"),
        "indexer.weights_proj kept float: transformers casts to its weight's dtype",
    ),
    **dict.fromkeys(
        ("falcon_mamba", "mamba", "mamba2"),
        "lm_head kept float: transformers' forward reads lm_head.weight directly",
    ),
    # the Hub's file keeps k/v projections for Gemma 3n's KV-shared layers (unused), which
    # mlx-lm quantizes and transformers' model does not build
    "gemma3n": "KV-shared layers' k/v projections: in the file, not in transformers' model",
    # mlx_lm convert of the image-text Gemma 4 keeps its language model under
    # `language_model.`; transformers' Gemma4ForCausalLM reads none of the image-text float
    # checkpoint (every tensor missing: the row compares a random model; loading refuses it)
    **dict.fromkeys(
        ("gemma4", "gemma4_unified"),
        "Gemma4ForCausalLM cannot read the image-text float checkpoint (the vlm rows can)",
    ),
    # transformers' Kimi Linear never ties its head (`_tied_weights_keys = {}`); mlx-lm's ties
    # it and drops lm_head.weight: with tie_word_embeddings they are different models
    "kimi_linear": "tied: transformers' model keeps its own head, mlx-lm's ties it",
    # mlx-vlm 0.7.10's gemma3 sanitize looks for `lm_head.weight` while the key is
    # `language_model.lm_head.weight`: an untied head is replaced by the embedding
    "gemma3": "untied: mlx-vlm's sanitize replaces the head by the embedding (its bug)",
    # 2I == H in the tiny model: transformers' Transpose(check_dims) leaves a square fused
    # gate_up_proj untransposed when loading, so its float model is not mlx-vlm's reading of
    # the same file (the tiny model's degenerate shape, not mlxq)
    "qwen3_vl_moe": "square gate_up_proj: transformers loads it untransposed (check_dims)",
}


def compare(ours: Path, ref: Path) -> list[str]:
    """What differs between two saved checkpoints: tensor names, dtypes, values, and the
    quantization block of config.json (which holds every per-module bits/group entry)."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            out.update(load_file(file))
        return out

    a, b = tensors(ours), tensors(ref)
    problems = []
    if only := sorted(set(a) - set(b)):
        problems.append(f"{len(only)} tensors only in mlxq's ({', '.join(only[:3])})")
    if only := sorted(set(b) - set(a)):
        problems.append(f"{len(only)} tensors only in the reference ({', '.join(only[:3])})")
    dtypes = [k for k in sorted(set(a) & set(b)) if a[k].dtype != b[k].dtype]
    if dtypes:
        k = dtypes[0]
        problems.append(f"{len(dtypes)} dtypes differ ({k}: {a[k].dtype} vs {b[k].dtype})")
    values = [
        k
        for k in sorted(set(a) & set(b))
        if k not in dtypes and (a[k].shape != b[k].shape or not torch.equal(a[k], b[k]))
    ]
    if values:
        problems.append(f"{len(values)} tensors differ ({', '.join(values[:3])})")
    qa = json.loads((ours / "config.json").read_text()).get("quantization")
    qb = json.loads((ref / "config.json").read_text()).get("quantization")
    if qa != qb:
        keys = sorted(set(qa or {}) ^ set(qb or {}))
        keys += sorted(k for k in set(qa or {}) & set(qb or {}) if qa[k] != qb[k])
        shown = ", ".join(f"{k}: {(qa or {}).get(k)} vs {(qb or {}).get(k)}" for k in keys[:3])
        problems.append(f"quantization block differs in {len(keys)} keys ({shown})")
    return problems


def _quantize_and_save(model, out: Path, variant, overrides=None) -> None:
    import mlxq

    mlxq.quantize_model(model, variant.bits, variant.group_size, overrides=overrides)
    model.save_pretrained(out)


def text_lines(arch: str, cached_only: bool) -> list[str]:
    import arch_models as A
    import torch
    from mlxq.convert import recipe_overrides
    from mlxq.integrations import MLXQuantConfig
    from mlxq.model_walk import plan_modules

    lines = []
    for first in A.VARIANTS:
        # where mlx-lm has no such model (a tied head it does not tie, no down_proj for the
        # recipe), the other head, then plain 3 bits group 32, as tests/arch_models.py does
        tries = [first, A.Variant(not first.tied, first.bits, first.group_size, first.recipe)]
        if first.recipe:
            tries.append(A.Variant(first.tied, bits=3, group_size=32))
        ref, failure = None, None
        for variant in tries:
            path = TEST_CACHE_MODELS / A._cache_key(arch, variant)
            if (path / "config.json").is_file():
                ref = path
                break
            if cached_only:
                continue
            try:
                ref = A.tiny_mlx_checkpoint(arch, variant)
                break
            except (Exception, SystemExit) as e:  # noqa: BLE001
                failure = failure or e
        tag = f"{arch:22s} {variant.tag:24s}"
        if ref is None:
            why = f"no oracle: {_one_line(failure)}" if failure else "not cached"
            lines.append(f"{tag} {why}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            float_dir = A.tiny_float_checkpoint(arch, tmp / "float", variant.tied)
            cls = A.causal_lm_class(arch)
            for way in ("quantize_model", "on_load"):
                try:
                    if way == "quantize_model":
                        model = cls.from_pretrained(float_dir, dtype=torch.bfloat16)
                        overrides = None
                        if variant.recipe:
                            overrides = recipe_overrides(model, variant.recipe, variant.group_size)
                        _quantize_and_save(model, tmp / way, variant, overrides)
                    else:
                        meta = cls.from_pretrained(float_dir, dtype=torch.bfloat16)
                        if any(m.moe for m in plan_modules(meta, lambda n, p: None).modules):
                            continue  # refused by name while loading (tested)
                        overrides = (
                            recipe_overrides(meta, variant.recipe, variant.group_size)
                            if variant.recipe
                            else None
                        )
                        quant = MLXQuantConfig(
                            bits=variant.bits, group_size=variant.group_size, overrides=overrides
                        )
                        model = cls.from_pretrained(
                            float_dir, dtype=torch.bfloat16, quantization_config=quant
                        )
                        model.save_pretrained(tmp / way)
                except (NotImplementedError, ValueError, RuntimeError, KeyError) as e:
                    lines.append(f"{tag} {way:14s} refused: {_one_line(e)}")
                    continue
                problems = compare(tmp / way, ref)
                state = "match" if not problems else "MISMATCH: " + "; ".join(problems)
                lines.append(f"{tag} {way:14s} {state}")
    return lines


def vlm_lines(name: str, cached_only: bool) -> list[str]:
    import torch
    import vlm_models as V
    from transformers import AutoModelForImageTextToText

    lines = []
    family = V.FAMILIES[name]
    variants = [
        V.variant_of(name),
        V.Variant(tied=family.tied, bits=3, group_size=32, recipe="mixed_3_6"),
    ]
    for variant in variants:
        tag = f"{name:22s} {variant.tag:24s}"
        ref = TEST_CACHE_MODELS / V._cache_key(name, variant)
        if not (ref / "config.json").is_file():
            if cached_only:
                lines.append(f"{tag} not cached")
                continue
            try:
                ref = V.tiny_mlx_vlm_checkpoint(name, variant)
            except (Exception, SystemExit) as e:  # noqa: BLE001
                lines.append(f"{tag} no oracle: {_one_line(e)}")
                continue
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            float_dir = V.tiny_float_checkpoint(name, tmp / "float", variant.tied)
            for way in ("quantize_model", "on_load", "mlxq_convert"):
                try:
                    if way == "mlxq_convert":
                        from mlxq.convert import convert_checkpoint

                        convert_checkpoint(
                            float_dir,
                            tmp / way,
                            variant.bits,
                            variant.group_size,
                            recipe=variant.recipe,
                        )
                        problems = compare(tmp / way, ref)
                        state = "match" if not problems else "MISMATCH: " + "; ".join(problems)
                        lines.append(f"{tag} {way:14s} {state}")
                        continue
                    model = AutoModelForImageTextToText.from_pretrained(
                        float_dir, dtype=torch.bfloat16
                    )
                    arguments = {}
                    if variant.recipe:
                        from mlxq.convert import recipe_arguments

                        arguments = recipe_arguments(model, variant.recipe, variant.group_size)
                    if way == "quantize_model":
                        import mlxq

                        mlxq.quantize_model(model, variant.bits, variant.group_size, **arguments)
                        model.save_pretrained(tmp / way)
                    else:
                        from mlxq.integrations import MLXQuantConfig
                        from mlxq.model_walk import plan_modules

                        if any(m.moe for m in plan_modules(model, lambda n, p: None).modules):
                            continue  # refused by name while loading (tested)
                        quant = MLXQuantConfig(
                            bits=variant.bits, group_size=variant.group_size, **arguments
                        )
                        model = AutoModelForImageTextToText.from_pretrained(
                            float_dir, dtype=torch.bfloat16, quantization_config=quant
                        )
                        model.save_pretrained(tmp / way)
                except (NotImplementedError, ValueError, RuntimeError, KeyError) as e:
                    lines.append(f"{tag} {way:14s} refused: {_one_line(e)}")
                    continue
                problems = compare(tmp / way, ref)
                state = "match" if not problems else "MISMATCH: " + "; ".join(problems)
                lines.append(f"{tag} {way:14s} {state}")
    return lines


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:240]}"


def main(argv: list[str] | None = None) -> int:
    global TEST_CACHE_MODELS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated architectures / families")
    parser.add_argument("--text-only", action="store_true")
    parser.add_argument("--vlm-only", action="store_true")
    parser.add_argument("--cached-only", action="store_true", help="skip missing references")
    args = parser.parse_args(argv)
    import logging

    import arch_models as A
    import vlm_models as V
    from mlx_models import TEST_CACHE
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    TEST_CACHE_MODELS = TEST_CACHE / "models"
    only = {x for x in args.only.split(",") if x}
    jobs = []
    if not args.vlm_only:
        jobs += [(text_lines, a) for a in sorted(A.ARCHS) if not only or a in only]
    if not args.text_only:
        jobs += [(vlm_lines, n) for n in sorted(V.FAMILIES) if not only or n in only]
    counts: dict[str, int] = {}
    for fn, name in jobs:
        try:
            lines = fn(name, args.cached_only)
        except Exception as e:  # noqa: BLE001 - one model's failure is a line, not the end
            traceback.print_exc(file=sys.stderr)
            lines = [f"{name:22s} {'':24s} ERROR: {_one_line(e)}"]
        for line in lines:
            words = line[48:].split()
            state = (
                words[1] if words[0] in ("quantize_model", "on_load", "mlxq_convert") else words[0]
            )
            state = {"not": "not cached", "no": "no oracle"}.get(state, state.rstrip(":"))
            if state == "MISMATCH" and name in NOTES:
                line, state = f"{line} [noted: {NOTES[name]}]", "MISMATCH noted"
            print(line, flush=True)
            counts[state] = counts.get(state, 0) + 1
    print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


TEST_CACHE_MODELS = Path()

if __name__ == "__main__":
    raise SystemExit(main())
