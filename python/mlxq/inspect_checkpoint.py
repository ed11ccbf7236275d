"""What is in a checkpoint, and what mlxq will do with each tensor (`mlxq inspect`).

The model is built on the meta device from its config (no weights read), and every linear and
embedding layer is matched with its tensors through the same helpers the transformers loader
uses (:func:`mlxq.model_walk.plan_modules`, :func:`mlxq.format.stored_format`, the safetensors
headers and the shard index repair), so the report says what loading will actually do, and
what would make it fail.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mlxq.format import (
    RUNNABLE_MODES,
    ModuleFormat,
    find_quantization,
    is_mlx_quantization,
    stored_format,
    top_level_disagreements,
)
from mlxq.integrations.checkpoint import DTYPE_BYTES, weight_map_of
from mlxq.integrations.mlx_lm_layout import MLX_LM_READS_ROPE_PARAMETERS, checkpoint_layout
from mlxq.integrations.mlx_vlm_layout import reads_rope_parameters, takes_flat_text_keys

__all__ = ["ModuleReport", "Problem", "CheckpointReport", "inspect_checkpoint", "format_report"]


@dataclass
class ModuleReport:
    """One linear/embedding layer: its stored format and what mlxq does with it."""

    name: str
    kind: str  # Linear | Embedding
    out_features: int
    in_features: int
    bits: int | None  # None: float
    group_size: int | None
    mode: str | None
    params: int
    bytes: int
    action: str


@dataclass
class Problem:
    """`error`: loading will fail; `warning`: it loads, but something is off."""

    severity: str
    message: str


@dataclass
class CheckpointReport:
    source: str
    model_type: str | None
    architectures: list[str]
    quantization: dict | None
    files: list[str]
    tensors: int
    params: int
    bytes: int
    modules: list[ModuleReport] = field(default_factory=list)
    other_tensors: int = 0
    other_bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nbytes(info) -> int:
    n = DTYPE_BYTES.get(info.dtype, 4)
    for d in info.shape:
        n *= d
    return n


def _scale_mode(key: str, header: dict) -> str:
    """The mode of a `scales` tensor as mlx-lm infers it: float scales are affine; uint8 ones
    belong to the float mode whose packed-weight to scale width ratio their shapes show
    (K/8 : K/16 nvfp4, K/8 : K/32 mxfp4, K/4 : K/32 mxfp8)."""
    scales, weight = header[key], header.get(key.removesuffix(".scales") + ".weight")
    if scales.dtype != "U8" or weight is None or not scales.shape or not weight.shape:
        return "affine"
    ratio = weight.shape[-1] / max(scales.shape[-1], 1)
    return {2: "nvfp4", 4: "mxfp4", 8: "mxfp8"}.get(ratio, "mxfp4")  # 0xFF is bad in all


def _nonfinite_scales(folder: Path, headers_by_file: dict) -> list[str]:
    """The loader's NaN/Inf check on every `scales`/`biases` tensor and float tensor (norms,
    float layers: small beside the packed weights of a quantized checkpoint)."""
    from safetensors import safe_open

    from mlxq.integrations.quantizer import check_finite

    errors = []
    floats = ("F16", "BF16", "F32", "F64")
    for file, header in headers_by_file.items():
        keys = [
            k
            for k in header
            if k.endswith((".scales", ".biases")) or getattr(header[k], "dtype", None) in floats
        ]
        if not keys:
            continue
        with safe_open(folder / file, "pt") as f:
            for key in keys:
                try:
                    check_finite(key, f.get_tensor(key), _scale_mode(key, header))
                except ValueError as error:
                    errors.append(str(error).removeprefix("mlxq: "))
    return errors


def _read_config(path: Path) -> tuple[dict, str | None]:
    """config.json as a dict, or ({}, why it cannot be read)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return {}, f"{path.name} cannot be read: {error}"
    if not isinstance(config, dict):
        return {}, f"{path.name} must be a JSON object, got {type(config).__name__}"
    return config, None


def config_validation_errors() -> tuple[type[BaseException], ...]:
    """The errors of transformers' config validation (huggingface_hub's strict dataclasses:
    `hidden_size: "128"`, `num_hidden_layers` against `layer_types`), which derive from
    Exception only."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: configs are not validated
        return ()
    return (StrictDataclassError,)


def _meta_model(folder: Path, config_dict: dict, names: Iterable[str]):
    """The model `mlxq generate` loads, on the meta device: the text model's causal LM for
    mlx-lm's conversion of an image-text model to its language model (`text_model_class`),
    else the auto class of the config."""
    import torch
    from transformers import AutoConfig

    from mlxq.integrations.model_class import auto_model_class, text_model_class

    text_class = text_model_class(config_dict, lambda: names)
    with torch.device("meta"):
        if text_class is not None:
            return text_class._from_config(text_class.config_class.from_pretrained(folder))
        config = AutoConfig.from_pretrained(folder)
        return auto_model_class(config, lambda: names).from_config(config)


def _check_index(folder: Path, source: str, headers_by_file: dict, problems: list[Problem]):
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    from mlxq.integrations.checkpoint import check_shard_index

    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        # the loader's own check, without its once-per-checkpoint warning: a later
        # from_pretrained in this process still warns
        try:
            result = check_shard_index(folder, index)
        except ValueError as error:
            if not (folder / "model.safetensors").is_file():
                raise  # transformers reads the index: the loader refuses it too
            # transformers reads model.safetensors alone and mlx-lm every model*.safetensors:
            # neither opens the index, and the model loads
            problems.append(
                Problem(
                    "warning",
                    f"{str(error).removeprefix('mlxq: ')}; unused (model.safetensors is read "
                    "without it)",
                )
            )
            return
        if result is not None:
            problems.append(Problem("warning", f"{result[2]} (mlxq repairs this when loading)"))
        return
    # a Hub repo whose shards were not downloaded: compare the index with the headers read
    from mlxq.integrations.checkpoint import read_index

    weight_map = read_index(index)["weight_map"]
    actual = {k: f for f, h in headers_by_file.items() for k in h}
    if weight_map != actual:
        missing = sorted(set(weight_map.values()) - set(headers_by_file))
        problems.append(
            Problem(
                "warning",
                f"the shard index is stale (it names {len(weight_map)} tensors, the files hold "
                f"{len(actual)}{'; missing shards: ' + ', '.join(missing[:3]) if missing else ''})"
                " (mlxq repairs this when loading)",
            )
        )


def inspect_checkpoint(folder: Path, source: str, headers_by_file: dict | None = None):
    """Report on the checkpoint in `folder` (config.json + safetensors files).

    `headers_by_file` ({file name: {tensor: TensorInfo}}) replaces reading the headers from
    `folder` (for Hub repos whose headers were fetched without the weights).
    """
    from mlxq.integrations.checkpoint import (
        FLOAT_MLX_BLOCK,
        is_float_mlx_checkpoint,
        read_header,
    )
    from mlxq.integrations.config import MLXQuantConfig

    config, config_error = _read_config(folder / "config.json")
    text_config = config.get("text_config") or {}
    file_errors: list[Problem] = []
    folder_is_local = headers_by_file is None
    if headers_by_file is None:
        headers_by_file = {}
        # the files the loader reads, as mlx-lm does: every model*.safetensors
        for p in sorted(folder.glob("model*.safetensors")):
            try:
                headers_by_file[p.name] = read_header(p)
            except (OSError, ValueError) as error:  # the loader refuses the file: say why
                file_errors.append(Problem("error", str(error).removeprefix("mlxq: ")))
    headers = {k: v for h in headers_by_file.values() for k, v in h.items()}
    try:  # a tensor in two files: refused by the loader
        weight_map_of(headers_by_file)
    except ValueError as error:
        file_errors.append(Problem("error", str(error).removeprefix("mlxq: ")))
    q = find_quantization(config)
    report = CheckpointReport(
        source=source,
        model_type=config.get("model_type"),
        architectures=list(config.get("architectures") or []),
        quantization=q if isinstance(q, dict) else None,
        files=sorted(headers_by_file),
        tensors=len(headers),
        params=0,
        bytes=sum(_nbytes(i) for i in headers.values()),
    )
    problems = report.problems
    problems.extend(file_errors)
    if config_error:
        problems.append(Problem("error", config_error))
        return report
    if not headers_by_file:
        other = [
            p.name
            for pattern in ("*.safetensors", "*.bin", "*.pt")
            for p in sorted(folder.glob(pattern))
        ]
        problems.append(
            Problem(
                "error",
                "no model*.safetensors files"
                + (
                    f" (found {', '.join(other[:3])}: mlxq, as mlx-lm, reads model*.safetensors "
                    "only)"
                    if other
                    else ""
                ),
            )
        )
    if q is not None and not isinstance(q, dict):  # transformers' config loading fails on it
        problems.append(
            Problem("error", f"config.json quantization must be an object, got {type(q).__name__}")
        )
        return report
    if q is None and folder_is_local and is_float_mlx_checkpoint(folder):
        q = dict(FLOAT_MLX_BLOCK)  # read as the loader reads it: mlx-lm's layout, all float
    mlx_q = is_mlx_quantization(q)
    packed = [k for k, v in headers.items() if v.dtype in ("U32", "I32") and k.endswith("weight")]
    if isinstance(q, dict) and not mlx_q:
        method = q.get("quant_method", "?")
        problems.append(
            Problem(
                "warning",
                f"not an MLX checkpoint: quant_method {method!r} is loaded by transformers' own "
                "quantizer, not by mlxq",
            )
        )
    elif packed and not mlx_q:
        problems.append(
            Problem(
                "error",
                f"{len(packed)} packed uint32 weights (e.g. {packed[0]}) but config.json has no "
                "MLX `quantization` block",
            )
        )
    try:
        qconfig = MLXQuantConfig.from_dict(q) if mlx_q else MLXQuantConfig()
    except (ValueError, NotImplementedError) as error:  # as from_pretrained would refuse it
        problems.append(Problem("error", str(error).removeprefix("mlxq: ")))
        return report

    rope = config.get("rope_parameters") or text_config.get("rope_parameters") or {}
    if (
        mlx_q
        and config.get("model_type") not in MLX_LM_READS_ROPE_PARAMETERS
        and "rope_theta" in rope
        and "rope_theta" not in config
        and "rope_theta" not in text_config
        # mlx-lm's dbrx reads it from attn_config, where transformers' DBRX keeps it too
        and "rope_theta" not in (config.get("attn_config") or {})
        # mlx-vlm reads GLM-OCR's rope from rope_parameters alone (its config class rejects
        # the flat keys: mlx-vlm's own conversion writes none)
        and takes_flat_text_keys(SimpleNamespace(model_type=config.get("model_type")))
        # nor MiniCPM-V's and Muse Glimmer's (mlx-vlm reads rope_parameters)
        and not reads_rope_parameters(config.get("model_type"))
    ):
        problems.append(
            Problem(
                "warning",
                f"config.json has rope_theta={rope['rope_theta']} only in rope_parameters: "
                "mlx-lm 0.32 reads the top-level key and would use its default",
            )
        )
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        problems.append(Problem("warning", "no tokenizer files (tokenizer.json/.model)"))
    try:
        _check_index(folder, source, headers_by_file, problems)
    except ValueError as error:
        problems.append(Problem("error", str(error).removeprefix("mlxq: ")))
    if file_errors:  # the model cannot load: the rest would repeat the same reason
        return report

    from mlxq.integrations.model_class import language_model_only_refusal

    refusal = language_model_only_refusal(config, headers)
    if refusal is not None:  # (the loader's refusal, not the vision tower's missing tensors)
        problems.append(Problem("error", refusal))
        return report
    try:
        model = _meta_model(folder, config, headers)
    except (ValueError, KeyError, OSError, ImportError, *config_validation_errors()) as error:
        text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        if text.startswith("mlxq: "):  # mlxq's own refusal (auto_model_class): its words
            problems.append(Problem("error", text.removeprefix("mlxq: ")))
            return report
        why = (
            "the model's config.json is invalid"
            if isinstance(error, config_validation_errors())
            else "transformers cannot build this model"
        )
        problems.append(Problem("error", f"{why}: {text}"))
        return report
    report.params = sum(p.numel() for p in model.parameters())
    from mlxq.integrations.quantizer import (
        add_unused_modules,
        check_all_quantized_tensors_used,
        check_no_mismatched_shapes,
        check_nothing_unexpected,
        checkpoint_keys_as_model_keys,
        missing_message,
        missing_tensors,
        refuse_tied_head_tensors,
    )
    from mlxq.model_walk import plan_modules
    from mlxq.swap import swap_plan

    stored_names = list(headers)
    layout = checkpoint_layout(config.get("model_type"), headers)
    headers = checkpoint_keys_as_model_keys(model, headers)
    if layout is not None:  # convolutions mlx-lm keeps apart, concatenated at load
        headers = layout.concat_headers(headers)
    stored_names = dict(zip(headers, stored_names, strict=False))  # model -> file names
    add_unused_modules(model, headers)  # as the loader: Gemma 3n's KV-shared projections

    def format_of(name: str, plan) -> Any:  # what loading does: read, then require
        fmt = stored_format(name, plan.in_features, plan.out_features, headers, qconfig)
        if fmt is not None:
            plan.require()  # a module whose forward mlxq does not reproduce is refused
        return fmt

    # the loader's own walk: candidates, formats and the head decision
    walk = plan_modules(
        model, format_of if mlx_q else lambda name, plan: None, headers, collect_errors=True
    )
    used: set[str] = set()
    formats: dict[str, Any] = {}
    moe_modules: list[str] = []  # replaced whole by mlxq.moe: their float keys do not apply
    for entry in walk.modules:
        name, module = entry.name, entry.module
        plan, error = entry.swap, entry.error
        split_rows = (
            _split_kv_b_rows(model, name, module, headers, qconfig, problems) if mlx_q else None
        )
        if split_rows is not None:  # DeepSeek V3's kv_b_proj as mlx-lm's embed_q / unembed_out
            moe_modules.append(name)  # (replaced whole: the float weight's key does not apply)
            report.modules.extend(split_rows)
            used.update(k for k in headers if k.startswith(f"{name}."))
            continue
        if entry.moe is not None:
            moe_rows = _moe_rows(name, entry.moe, headers, qconfig, problems) if mlx_q else None
            if moe_rows is not None:  # MoE experts and quantized routers (mlxq.moe)
                moe_modules.append(name)
                report.modules.extend(moe_rows)
                used.update(k for k in headers for r in moe_rows if k.rpartition(".")[0] == r.name)
                continue
            plan = swap_plan(name, module)  # a float router: reported as a layer, if one
            if plan is None:
                continue
            try:
                entry.format = format_of(name, plan) if mlx_q else None
            except (ValueError, NotImplementedError) as caught:
                error = caught
        kind = "Linear" if plan.kind == "linear" else "Embedding"
        dims = (plan.in_features, plan.out_features)
        # the tensors the layer has (a bias only where its module has one)
        leaves = ("weight", "scales", "biases", "global_scale", *(("bias",) if plan.bias else ()))
        keys = [
            k for k in headers if k.rpartition(".")[0] == name and k.rpartition(".")[2] in leaves
        ]
        used.update(keys)
        nbytes = sum(_nbytes(headers[k]) for k in keys)
        params = dims[0] * dims[1] + (dims[1] if plan.bias else 0)
        row = ModuleReport(name, kind, dims[1], dims[0], None, None, None, params, nbytes, "")
        if error is not None:
            problems.append(Problem("error", str(error).removeprefix("mlxq: ")))
            row.action = "cannot load (see problems)"
            report.modules.append(row)
            continue
        fmt = entry.format
        formats[name] = fmt
        if fmt is not None:
            row.bits, row.group_size, row.mode = fmt.bits, fmt.group_size, fmt.mode
            op = "affine_matmul" if fmt.mode == "affine" else "fp_matmul"
            row.action = (
                f"mlxq AffineLinear: {op} on the packed weight"
                if kind == "Linear"
                else "mlxq AffineEmbedding: dequantizes only the rows looked up"
            )
            if fmt.mode not in RUNNABLE_MODES:
                row.action = f"mode {fmt.mode} is not run by mlxq"
        elif f"{name}.weight" not in headers:
            row.action = "missing (see problems)"
        else:
            dtype = headers[f"{name}.weight"].dtype
            row.action = f"torch nn.{kind}, float ({dtype}), untouched"
            want = qconfig.module_format(name) if mlx_q else None
            if want is not None and dims[0] % want.group_size:
                row.action += (
                    f"; in_features {dims[0]} is not a multiple of group {want.group_size}, "
                    "so mlx-lm left it float"
                )
        report.modules.append(row)
    head_plan = (
        swap_plan(walk.head.head, model.get_submodule(walk.head.head)) if walk.head.tied else None
    )
    if head_plan is not None:  # tied: no tensors of its own, it follows the embedding
        plan = head_plan
        emb_fmt = formats.get(walk.head.embedding)
        row = ModuleReport(
            walk.head.head, "Linear", plan.out_features, plan.in_features,
            None, None, None, 0, 0,
            "TiedAffineHead: logits through the quantized embedding (no tensors of its own)"
            if emb_fmt
            else "tied to the float input embedding",
        )  # fmt: skip
        if emb_fmt:
            row.bits, row.group_size, row.mode = emb_fmt.bits, emb_fmt.group_size, emb_fmt.mode
        used.update(k for k in headers if k.rpartition(".")[0] == walk.head.head)
        report.modules.append(row)
    if mlx_q:  # a top-level value no module is stored in: it loads, but the block misleads

        def has_entry(name: str) -> bool:  # under the model's name or the file's
            key = stored_names.get(f"{name}.weight") or stored_names.get(f"{name}.scales") or ""
            return name in qconfig.overrides or key.rpartition(".")[0] in qconfig.overrides

        # the modules the top level describes: those without an entry of their own (a mixed
        # recipe's block may state a width no module has: mlx_lm convert writes --q-bits)
        stored = [
            ModuleFormat(r.bits, r.group_size, r.mode)
            for r in report.modules
            if r.bits is not None
            and r.bytes  # not a tied head (the embedding's format)
            and not has_entry(r.name)
        ]
        for message in top_level_disagreements(q, stored):
            problems.append(Problem("warning", message))
    try:  # the loader's own refusal of quantized tensors it has no module for (MoE experts...)
        # (tensors of a module the model lacks: the check of tensors it has no place for below)
        check_all_quantized_tensors_used(
            model, headers, {m.name for m in report.modules}, skip_absent=True
        )
    except NotImplementedError as error:
        problems.append(Problem("error", str(error).removeprefix("mlxq: ")))
    try:  # and of a head the config ties whose tensors the checkpoint holds
        if mlx_q:
            refuse_tied_head_tensors(model, headers, walk.head, stored_names)
    except ValueError as error:
        problems.append(Problem("error", str(error).removeprefix("mlxq: ")))
    # a head the walk ties has no tensors once loaded (TiedAffineHead), even where transformers
    # declares no tying for the model (Kimi Linear)
    followers = [*moe_modules, *([walk.head.head] if walk.head.tied else [])]
    missing = [
        key
        for key in missing_tensors(model, set(headers))
        if not any(key.startswith(f"{m}.") for m in followers)
    ]
    if mlx_q and missing:
        problems.append(Problem("error", missing_message(missing)))
    if mlx_q and folder_is_local:
        for error in _nonfinite_scales(folder, headers_by_file):
            problems.append(Problem("error", error))
    others = [k for k in headers if k not in used]
    known = set(model.state_dict())
    unknown = [k for k in others if k not in known]
    report.other_tensors = len(others) - len(unknown)
    # the loader's refusal of float tensors of another size than the model's (the count only:
    # loading permutes channels-last convolutions and reshapes scalars, of the same size)
    state = model.state_dict()
    resized = [
        (k, headers[k].shape, tuple(state[k].shape))
        for k in others
        if k in known and math.prod(headers[k].shape) != state[k].numel()
    ]
    if mlx_q and resized:
        try:
            check_no_mismatched_shapes(model, resized)
        except ValueError as error:
            problems.append(Problem("error", str(error).removeprefix("mlxq: ")))
    report.other_bytes = sum(_nbytes(headers[k]) for k in others if k in known)
    if unknown and mlx_q:  # the loader's refusal (less what transformers leaves out itself)
        try:
            check_nothing_unexpected(model, unknown)
        except ValueError as error:
            problems.append(Problem("error", str(error).removeprefix("mlxq: ")))
    elif unknown:
        problems.append(
            Problem(
                "warning",
                f"{len(unknown)} tensors the model does not use (e.g. {unknown[0]}); "
                "transformers ignores them",
            )
        )
    return report


def _ranges(indices: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(indices):
        if start is None:
            start = v
        if i + 1 == len(indices) or indices[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def _grouped(modules: list[ModuleReport]) -> list[tuple[str, list[ModuleReport]]]:
    """Rows that differ only in the layer index, merged: `model.layers.{0-29}.mlp.up_proj`."""
    groups: dict[tuple, list[tuple[int | None, ModuleReport]]] = {}
    for m in modules:
        match = re.search(r"\.(\d+)\.", m.name)
        pattern = m.name if not match else m.name[: match.start()] + ".{}." + m.name[match.end() :]
        index = int(match.group(1)) if match else None
        key = (pattern, m.bits, m.group_size, m.mode, m.out_features, m.in_features, m.action)
        groups.setdefault(key, []).append((index, m))
    out = []
    for key, members in groups.items():
        pattern = key[0]
        if "{}" in pattern:
            label = pattern.replace("{}", "{" + _ranges(sorted(i for i, _ in members)) + "}")
        else:
            label = pattern
        out.append((label, [m for _, m in members]))
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def format_report(report: CheckpointReport, every_module: bool = False) -> str:
    """The human-readable report printed by `mlxq inspect`."""
    lines = [f"checkpoint   {report.source}"]
    arch = ", ".join(report.architectures) or "?"
    lines.append(f"model        {report.model_type or '?'} ({arch})")
    q = report.quantization
    if q is None:
        lines.append("quantization none (float checkpoint)")
    else:
        per_module = {k: v for k, v in q.items() if isinstance(v, (dict, bool))}
        base = {k: v for k, v in q.items() if k not in per_module and k != "quant_method"}
        if q.get("quant_method", "mlx") != "mlx":
            base["quant_method"] = q["quant_method"]
        lines.append(
            f"quantization {json.dumps(base)}"
            + (f" + {len(per_module)} per-module entries" if per_module else "")
        )
    lines.append(
        f"files        {len(report.files)} safetensors, {report.tensors} tensors, "
        f"{_mb(report.bytes)}"
    )
    if report.modules:
        rows = [(m.name, [m]) for m in report.modules] if every_module else _grouped(report.modules)
        name_w = min(max(len(label) for label, _ in rows), 60)
        lines.append("")
        lines.append(
            f"{'module':<{name_w}} {'n':>3}  {'shape':>11}  {'format':<15} {'bytes':>9}  action"
        )
        for label, members in rows:
            m = members[0]
            fmt = f"{m.bits}-bit g{m.group_size}" if m.bits else "float"
            if m.mode and m.mode != "affine":
                fmt += f" {m.mode}"
            shape = f"{m.out_features}x{m.in_features}"
            nbytes = sum(x.bytes for x in members)
            lines.append(
                f"{label:<{name_w}} {len(members):>3}  {shape:>11}  {fmt:<15} {_mb(nbytes):>9}  "
                f"{m.action}"
            )
        if report.other_tensors:
            lines.append(
                f"{'other tensors (norms, ...)':<{name_w}} {report.other_tensors:>3}  {'':>11}  "
                f"{'float':<15} "
                f"{_mb(report.other_bytes):>9}  untouched"
            )
        quantized = [m for m in report.modules if m.bits and m.bytes]
        qparams = sum(m.params for m in quantized)
        qbytes = sum(m.bytes for m in quantized)
        lines.append("")
        summary = f"parameters   {report.params / 1e6:.1f} M; stored {_mb(report.bytes)}"
        if report.params:
            summary += f" ({report.bytes * 8 / report.params:.2f} bits/parameter"
            summary += f", bf16 would be {_mb(report.params * 2)})"
        lines.append(summary)
        if qparams:
            lines.append(
                f"quantized    {len(quantized)} layers, {qparams / 1e6:.1f} M weights in "
                f"{_mb(qbytes)} ({qbytes * 8 / qparams:.2f} bits/weight with scales and biases)"
            )
    lines.append("")
    if report.problems:
        lines.append(f"problems     {len(report.problems)}")
        lines.extend(f"  {p.severity}: {p.message}" for p in report.problems)
    else:
        lines.append("problems     none")
    return "\n".join(lines)


def _moe_rows(name: str, plan, headers: dict, qconfig, problems: list[Problem]):
    """Report rows for a MoE experts module (one per stacked projection) or a quantized
    router, as the loader replaces them (mlxq.integrations.moe_loading); None for any other
    module (and for routers the checkpoint keeps float: they are reported as they are)."""
    from mlxq.integrations.moe_loading import stored_stack_format

    rows: list[ModuleReport] = []
    try:
        if plan.kind == "router":
            fmt = stored_format(name, plan.in_features, plan.out_features, headers, qconfig)
            if fmt is None:
                return None
            plan.require()
            row = ModuleReport(
                name,
                plan.cls_name,
                plan.out_features,
                plan.in_features,
                None,
                None,
                None,
                plan.in_features * plan.out_features,
                0,
                "",
            )
            row.bits, row.group_size, row.mode = fmt.bits, fmt.group_size, fmt.mode
            row.bytes = sum(_nbytes(v) for k, v in headers.items() if k.startswith(name + "."))
            row.action = "mlxq quantized router: its own forward, F.linear on the packed weight"
            return [row]
        if f"{name}.{plan.float_tensor}" in headers:
            return None  # transformers' own float layout
        plan.require()
        hidden, inter, e = plan.in_features, plan.out_features, plan.num_experts
        shapes = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                  "down_proj": (inter, hidden)}  # fmt: skip
        for proj in plan.projections:
            k, n = shapes[proj]
            full = f"{name}.{proj}"
            fmt = stored_stack_format(full, e, k, n, headers, qconfig)
            row = ModuleReport(full, f"{e} experts", n, k, None, None, None, e * k * n, 0, "")
            row.bytes = sum(_nbytes(v) for key, v in headers.items() if key.startswith(full + "."))
            if fmt is None:
                row.action = "mlxq SwitchLinear, float experts"
            else:
                row.bits, row.group_size, row.mode = fmt.bits, fmt.group_size, fmt.mode
                op = "affine_gather_matmul" if fmt.mode == "affine" else "fp_gather_matmul"
                row.action = f"mlxq AffineSwitchLinear: {op}, selected experts only"
            rows.append(row)
    except (ValueError, NotImplementedError) as error:
        problems.append(Problem("error", str(error).removeprefix("mlxq: ")))
        return [ModuleReport(name, plan.cls_name, 0, 0, None, None, None, 0, 0,
                             "cannot load (see problems)")]  # fmt: skip
    return rows


def _split_kv_b_rows(model, name: str, module, headers: dict, qconfig, problems: list[Problem]):
    """Report rows for DeepSeek V3's `kv_b_proj` stored as mlx-lm's `embed_q`/`unembed_out`,
    replaced in the meta `model` as the loader replaces it (:class:`mlxq.mla.SplitKvB`); None
    for any other module."""
    from mlxq.integrations.moe_loading import replace_split_kv_b

    try:
        if replace_split_kv_b(model, name, module, headers, qconfig) is None:
            return None
    except ValueError as error:
        problems.append(Problem("error", str(error).removeprefix("mlxq: ")))
        return [ModuleReport(name, "Linear", 0, 0, None, None, None, 0, 0,
                             "cannot load (see problems)")]  # fmt: skip
    cfg = model.config.get_text_config()
    heads, rank = cfg.num_attention_heads, cfg.kv_lora_rank
    rows = []
    for part, (k, n) in {"embed_q": (cfg.qk_nope_head_dim, rank),
                         "unembed_out": (rank, cfg.v_head_dim)}.items():  # fmt: skip
        full = f"{name}.{part}"
        sub = model.get_submodule(full)
        row = ModuleReport(full, f"{heads} heads", n, k, None, None, None, heads * k * n, 0, "")
        row.bytes = sum(_nbytes(v) for key, v in headers.items() if key.startswith(full + "."))
        if getattr(sub, "bits", None) is not None:
            row.bits, row.group_size, row.mode = sub.bits, sub.group_size, sub.mode
            row.action = "mlxq SplitKvB: per-head quantized matmul (mlx-lm's split kv_b_proj)"
        else:
            row.action = "mlxq SplitKvB: per-head float matmul (mlx-lm's split kv_b_proj)"
        rows.append(row)
    return rows
