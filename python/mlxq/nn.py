"""torch.nn modules holding MLX-quantized weights in MLX's own layout.

Buffers are named and shaped as in an MLX checkpoint (``weight`` uint32 ``[N, K*bits/32]``,
``scales`` and ``biases`` ``[N, K/group_size]``), so a state dict of these modules *is* an MLX
checkpoint: loading and saving copy tensors unchanged. The modules hold every MLX mode
(``mode=``): ``"affine"`` (float scales and biases), and ``"mxfp4"``, ``"nvfp4"``, ``"mxfp8"``
(uint8 ``scales``, no ``biases`` buffer), as MLX's own QuantizedLinear/QuantizedEmbedding do;
the class names keep the affine prefix they were introduced with.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types

import torch
from torch import nn

from mlxq._casts import RefusesUnsupportedCasts
from mlxq._pickling import PicklesUnsignedBuffers
from mlxq.format import MODE_DEFAULTS, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from mlxq.ops import affine_dequantize, affine_matmul, affine_quantize, quantize

__all__ = [
    "AffineLinear",
    "AffineEmbedding",
    "ScaledAffineEmbedding",
    "NormedAffineEmbedding",
    "TiedAffineHead",
    "InProjMultiheadAttention",
    "RowServingAffineEmbedding",
    "RowServingScaledAffineEmbedding",
    "WeightRows",
    "SUPPORTED_BITS",
]


def _check_format(
    name: str, in_features: int, bits: int, group_size: int, mode: str = "affine", **sizes: int
) -> None:
    # ints, not floats that compare equal (bits=4.0 passed `in SUPPORTED_BITS` and failed in
    # torch.empty), and sizes >= 0 (a negative one was torch's "negative dimension" error)
    def integer(value) -> bool:  # int, numpy's ints; not bool, not float
        return not isinstance(value, bool) and hasattr(type(value), "__index__")

    for key, value in {"bits": bits, "group_size": group_size}.items():
        if not integer(value):
            raise TypeError(f"mlxq: {name}: {key} must be an int, got {value!r}")
    for key, value in {"in_features": in_features, **sizes}.items():
        if not integer(value) or value < 0:
            raise ValueError(f"mlxq: {name}: {key} must be an int >= 0, got {value!r}")
    if mode != "affine":
        if mode not in MODE_DEFAULTS:
            raise ValueError(
                f"mlxq: {name}: mode={mode!r} is not one of {', '.join(MODE_DEFAULTS)}"
            )
        if (group_size, bits) != MODE_DEFAULTS[mode]:
            want_group, want_bits = MODE_DEFAULTS[mode]
            raise ValueError(
                f"mlxq: {name}: mode {mode!r} needs group_size={want_group} and bits={want_bits}, "
                f"got group_size={group_size} and bits={bits}"
            )
        if in_features % group_size:
            raise ValueError(
                f"mlxq: {name}: in_features={in_features} is not a multiple of group_size="
                f"{group_size}"
            )
        return
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"mlxq: {name}: bits={bits} is not one of {SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"mlxq: {name}: group_size={group_size} is not one of {SUPPORTED_GROUP_SIZES}"
        )
    if in_features % group_size or (in_features * bits) % 32:
        raise ValueError(
            f"mlxq: {name}: in_features={in_features} is not a multiple of group_size="
            f"{group_size} (and of 32/gcd(bits, 32) for bits={bits})"
        )


def _refuse_converted_words(module: nn.Module, state_dict: dict, prefix: str, errors: list) -> bool:
    """`load_state_dict` copies with a dtype conversion: a float (or other) `weight` would turn
    the packed words' numbers into new words, not keep their bits. Records an error, True then."""
    packed = state_dict.get(prefix + "weight")
    if isinstance(packed, torch.Tensor) and packed.dtype not in (torch.uint32, torch.int32):
        errors.append(
            f"mlxq: {prefix}weight of {type(module).__name__} holds packed words (uint32 or "
            f"int32), got {packed.dtype}: loading it would convert the numbers, not keep the bits"
        )
        return True
    return False


def _packed_buffers(
    rows: int, cols: int, bits: int, group_size: int, dtype: torch.dtype, device, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    weight = torch.empty(rows, cols * bits // 32, dtype=torch.uint32, device=device)
    if mode != "affine":  # uint8 scale bytes, no biases
        return weight, torch.empty(rows, cols // group_size, dtype=torch.uint8, device=device), None
    scales = torch.empty(rows, cols // group_size, dtype=dtype, device=device)
    return weight, scales, torch.empty_like(scales)


def _mode_repr(mode: str) -> str:
    return "" if mode == "affine" else f", mode={mode}"


class AffineLinear(RefusesUnsupportedCasts, PicklesUnsignedBuffers, nn.Module):
    """A linear layer `y = x @ W.T + bias` whose `W` is MLX-quantized (any `mode`).

    Activations may be float16, bfloat16 or float32; the product is computed in fp32 and
    rounded to the dtype of `x` (as MLX does). `bias`, when present, is a float parameter.
    `dtype` is the float dtype of the scales and biases (affine) or of `dequantize_weight`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        bits: int = 4,
        group_size: int = 64,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        mode: str = "affine",
    ) -> None:
        super().__init__()
        _check_format(
            type(self).__name__, in_features, bits, group_size, mode, out_features=out_features
        )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.mode, self.dtype = bits, group_size, mode, dtype
        weight, scales, biases = _packed_buffers(
            out_features, in_features, bits, group_size, dtype, device, mode
        )
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("biases", biases)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        # Set by mlxq.projection_groups: siblings on one input (q/k/v) computed in one call.
        self.projection_group, self.projection_index = None, 0

    @classmethod
    def from_float(
        cls, linear: nn.Linear, bits: int = 4, group_size: int = 64, mode: str = "affine"
    ) -> AffineLinear:
        """Quantize an `nn.Linear` exactly as `mlx.nn.quantize` would."""
        w = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            bits=bits,
            group_size=group_size,
            dtype=w.dtype,
            device=w.device,
            mode=mode,
        )
        module.load_quantized(w)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def load_quantized(self, w: torch.Tensor) -> None:
        """Quantize the float weight `w` into this module's buffers (bit-exact with MLX)."""
        _quantize_into(self, w)

    def dequantize_weight(self) -> torch.Tensor:
        """The float weight `[out_features, in_features]`, in the dtype of `scales` (affine) or
        `self.dtype` (exact for the floating-point modes)."""
        return _dequantize_rows(self, self.weight, self.scales, self.biases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.projection_group
        return self.add_bias(_matmul(self, x) if group is None else group.output(self, x))

    def _load_from_state_dict(
        self, state_dict, prefix, metadata, strict, missing, unexpected, errors
    ):
        if not _refuse_converted_words(self, state_dict, prefix, errors):
            super()._load_from_state_dict(
                state_dict, prefix, metadata, strict, missing, unexpected, errors
            )

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        """`y` (this layer's `x @ W.T`) plus its bias, in the dtype of `y`."""
        bias = self.bias
        return y if bias is None else y + bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}"
            f"{_mode_repr(self.mode)}"
        )


class AffineEmbedding(RefusesUnsupportedCasts, PicklesUnsignedBuffers, nn.Module):
    """An embedding table stored MLX-quantized (any `mode`).

    A lookup gathers the packed rows of the requested ids and dequantizes only those; the
    output dtype is the dtype of `scales` (affine) or `dtype` (floating-point modes, whose
    values it holds exactly where MLX returns bfloat16). :meth:`as_linear` uses the table as
    an output head (`x @ table.T`), which is how tied word embeddings work in MLX.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int = 4,
        group_size: int = 64,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        mode: str = "affine",
    ) -> None:
        super().__init__()
        _check_format(
            type(self).__name__,
            embedding_dim,
            bits,
            group_size,
            mode,
            num_embeddings=num_embeddings,
        )
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.padding_idx = bits, group_size, padding_idx
        self.mode, self.dtype = mode, dtype
        weight, scales, biases = _packed_buffers(
            num_embeddings, embedding_dim, bits, group_size, dtype, device, mode
        )
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("biases", biases)

    @classmethod
    def from_float(
        cls, embedding: nn.Embedding, bits: int = 4, group_size: int = 64, mode: str = "affine"
    ) -> AffineEmbedding:
        """Quantize an `nn.Embedding` exactly as `mlx.nn.quantize` would."""
        w = embedding.weight.detach()
        module = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            bits=bits,
            group_size=group_size,
            padding_idx=embedding.padding_idx,
            dtype=w.dtype,
            device=w.device,
            mode=mode,
        )
        module.load_quantized(w)
        return module

    def load_quantized(self, w: torch.Tensor) -> None:
        """Quantize the float table `w` into this module's buffers (bit-exact with MLX)."""
        _quantize_into(self, w)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"mlxq: AffineEmbedding expects integer ids, got {ids.dtype}")
        flat = ids.reshape(-1)
        if flat.dtype not in (torch.int32, torch.int64):
            flat = flat.long()
        if not torch.compiler.is_compiling() and flat.device.type != "meta":  # no values there
            self._check_ids(flat)
        # index_select, not indexing: a negative id must not wrap around to the last rows
        # (nn.Embedding raises for it); compiled graphs keep index_select's own bounds check.
        # The packed rows are gathered as int32 (the same bits): CUDA has no uint32 indexing.
        biases = None if self.biases is None else self.biases.index_select(0, flat)
        rows = _dequantize_rows(
            self,
            self.weight.view(torch.int32).index_select(0, flat),
            self.scales.index_select(0, flat),
            biases,
        )
        return rows.reshape(*ids.shape, self.embedding_dim)

    def _load_from_state_dict(
        self, state_dict, prefix, metadata, strict, missing, unexpected, errors
    ):
        if not _refuse_converted_words(self, state_dict, prefix, errors):
            super()._load_from_state_dict(
                state_dict, prefix, metadata, strict, missing, unexpected, errors
            )

    # Called in eager code only (a compiled forward skips it); where a forward runs eagerly
    # under torch.compile (a row-serving embedding's), not traced: its `bool()` would be one
    # more graph break in that forward, reported in mlxq's code. torch's lazy form of
    # torch.compiler.disable (torch >= 2.1): that one imports torch._dynamo at `import mlxq`
    # (as long as `import torch`); this wrapper's frame lies in a module dynamo skips, so a
    # compile counts the same frames, graphs and breaks.
    @torch._disable_dynamo
    def _check_ids(self, flat: torch.Tensor) -> None:
        # One reduction, on every device (index_select does not check bounds on all of them).
        bad = (flat < 0) | (flat >= self.num_embeddings)
        if bool(bad.any()):
            raise IndexError(
                f"mlxq: AffineEmbedding({self.num_embeddings}, {self.embedding_dim}): ids must "
                f"lie in [0, {self.num_embeddings}), got {int(flat[bad][0])}"
            )

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ table.T`: logits over the vocabulary, in the dtype of `x`."""
        return _matmul(self, x)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
            f"group_size={self.group_size}{_mode_repr(self.mode)}"
        )


class ScaledAffineEmbedding(AffineEmbedding):
    """An :class:`AffineEmbedding` whose lookup is multiplied by a constant, as the scaled word
    embeddings of Gemma, MiniCPM3, BART, ... do (`embed_scale`, e.g. `sqrt(hidden_size)`).

    The product is rounded the way the replaced module rounds it: with `scale_dtype` set, the
    scale is a tensor of that dtype cast to the rows' dtype first (Gemma's
    `embed_scale.to(weight.dtype)`); with `scale_dtype=None` it is a Python float (BART's
    `* self.embed_scale`). :meth:`as_linear` (a tied output head) does not scale, as in the
    models. The scale is not part of the state dict: MLX checkpoints do not store it.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        embed_scale: float,
        scale_dtype: torch.dtype | None = torch.float32,
        bits: int = 4,
        group_size: int = 64,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        mode: str = "affine",
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, bits, group_size, padding_idx, dtype, device, mode
        )
        self.embed_scale, self.scale_dtype = float(embed_scale), scale_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(ids)
        if self.mode != "affine" and rows.dtype != torch.bfloat16:
            # MLX looks a floating-point-mode table up in bfloat16 (no float scale sets another
            # dtype; the values are exact there) and mlx-lm's models scale the rows in that
            # dtype (`h * hidden_size**0.5`), whatever the model's: the product is rounded to
            # bfloat16, then widened as MLX widens it at the first op with a float32 operand.
            # Unrounded, a float32 Gemma 3 differs from mlx-lm's by ~1e-2 in the logits
            scale = torch.tensor(self.embed_scale, dtype=torch.bfloat16, device=rows.device)
            return (rows.to(torch.bfloat16) * scale).to(rows.dtype)
        if self.scale_dtype is None:
            return rows * self.embed_scale
        scale = torch.tensor(self.embed_scale, dtype=self.scale_dtype, device=rows.device)
        return rows * scale.to(rows.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, embed_scale={self.embed_scale}"


class NormedAffineEmbedding(AffineEmbedding):
    """An :class:`AffineEmbedding` whose rows go through a module of the embedding it replaces
    (`embed_norm`, kept as it is): transformers' embeddings whose forward is
    `self.embed_norm(super().forward(input_ids))` (Muse Glimmer's weight-less RMS norm).
    :meth:`as_linear` (a tied output head) leaves the norm out, as the models do."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        embed_norm: nn.Module,
        bits: int = 4,
        group_size: int = 64,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        mode: str = "affine",
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, bits, group_size, padding_idx, dtype, device, mode
        )
        self.embed_norm = embed_norm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_norm(super().forward(ids))


class _ServesRows:
    """Mixin of an :class:`AffineEmbedding` whose table model code indexes itself, one row at
    a time (Gemma 4's `self.language_model.embed_tokens.weight[pad_token_id, :]`).

    Only in the frames of the methods it was told of (:meth:`serve_rows`, found in the model's
    source by :func:`mlxq.swap.weight_reads`), `weight` is a :class:`WeightRows`: indexing one
    row gives that row of the table, dequantized exactly (unscaled, as `nn.Embedding.weight`
    holds it); any other use raises, naming the module. Everywhere else (mlxq's own code,
    loading, saving) `weight` is the packed buffer, as in every quantized module.
    """

    def serve_rows(self, name: str, readers: dict[types.CodeType, str]) -> None:
        self._row_name, self._row_readers = name, dict(readers)

    def __getstate__(self) -> dict:
        # code objects do not pickle: each reader's method as (module, qualified name)
        state = super().__getstate__()
        if state.get("_row_readers"):
            state["_row_readers"] = tuple(
                (_code_module(code), code.co_qualname, reader)
                for code, reader in state["_row_readers"].items()
            )
        return state

    def __setstate__(self, state: dict) -> None:
        readers = state.get("_row_readers")
        if isinstance(readers, tuple):
            state = {**state, "_row_readers": {_method_code(*r[:2]): r[2] for r in readers}}
        super().__setstate__(state)

    @property
    def weight(self) -> torch.Tensor | WeightRows:
        try:
            packed = self._buffers["weight"]
        except KeyError:
            raise AttributeError("weight") from None
        readers = self.__dict__.get("_row_readers")
        if not readers:
            return packed
        if torch.compiler.is_compiling():
            # dynamo cannot see the reading frame: it breaks the graph here and runs the read
            # eagerly (measured on Gemma 4: the row served); fullgraph=True fails with this
            raise NotImplementedError(
                f"mlxq: embedding {self._row_name!r} serves rows of its quantized table to "
                f"{', '.join(sorted(readers.values()))} by the reading frame, which torch.compile "
                "cannot trace (compile without fullgraph: a graph break at the read)"
            )
        reader = readers.get(sys._getframe(1).f_code)
        return packed if reader is None else WeightRows(self, self._row_name, reader)

    def extra_repr(self) -> str:
        readers = ", ".join(sorted(self.__dict__.get("_row_readers", {}).values()))
        return f"{super().extra_repr()}, serves rows to {readers}"


def method_code(cls: type, name: str) -> types.CodeType | None:
    """The code object that runs for method `name` of `cls` (under its decorators)."""
    fn = vars(cls).get(name)
    if isinstance(fn, (staticmethod, classmethod)):
        fn = fn.__func__
    if not callable(fn):
        return None
    code = getattr(inspect.unwrap(fn), "__code__", None)
    return code if code is not None and code.co_name == name else None


def _code_module(code: types.CodeType) -> str:
    module = inspect.getmodule(code)
    if module is None:
        raise TypeError(
            f"mlxq: cannot pickle the row-serving embedding: no module defines the method "
            f"{code.co_qualname} ({code.co_filename}) it serves rows to"
        )
    return module.__name__


def _method_code(module: str, qualname: str) -> types.CodeType:
    """The code object of method `qualname` of `module` (as `weight_reads` found it)."""
    *owner, name = qualname.split(".")
    obj = importlib.import_module(module)
    for part in owner:
        obj = getattr(obj, part, None)
    code = method_code(obj, name) if isinstance(obj, type) else None
    if code is None:
        raise RuntimeError(
            f"mlxq: a pickled row-serving embedding serves rows to {module}.{qualname}, "
            "which this transformers does not define: load the model from its checkpoint"
        )
    return code


class RowServingAffineEmbedding(_ServesRows, AffineEmbedding):
    """An :class:`AffineEmbedding` serving rows of its table to model code (see _ServesRows)."""


class RowServingScaledAffineEmbedding(_ServesRows, ScaledAffineEmbedding):
    """A :class:`ScaledAffineEmbedding` serving rows of its (unscaled) table (see _ServesRows)."""


class WeightRows:
    """The `weight` of a quantized embedding as the model method that indexes it sees it:
    `w[i]`, `w[i, :]` and `w[i, ...]` (one integer `i`) give row `i` dequantized, in the
    dtype of the table's lookups; `dtype`, `device` and `shape` are the float table's. Anything
    else (another index, arithmetic, a torch function) raises NotImplementedError naming the
    module: the packed table holds uint32 words, not the float table the code expects."""

    __slots__ = ("_module", "_name", "_reader")

    def __init__(self, module: AffineEmbedding, name: str, reader: str) -> None:
        self._module, self._name, self._reader = module, name, reader

    def _refuse(self, use: str) -> NotImplementedError:
        return NotImplementedError(
            f"mlxq: {self._reader} uses the weight of embedding {self._name!r} as {use}; the "
            "module is quantized (its weight holds packed uint32 words) and serves single rows "
            "only (weight[i] / weight[i, :])"
        )

    @property
    def dtype(self) -> torch.dtype:
        module = self._module
        return module.scales.dtype if module.mode == "affine" else module.dtype

    @property
    def device(self) -> torch.device:
        return self._module.scales.device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._module.num_embeddings, self._module.embedding_dim))

    def __getitem__(self, index):
        rest = index[1:] if isinstance(index, tuple) else ()
        first = index[0] if isinstance(index, tuple) and index else index
        if isinstance(first, torch.Tensor) and first.dim() == 0 and not first.is_floating_point():
            first = int(first)
        full = all(r is Ellipsis or r == slice(None) for r in rest)
        if not (isinstance(first, int) and not isinstance(first, bool) and len(rest) <= 1 and full):
            raise self._refuse(f"weight[{index!r}]")
        n = self._module.num_embeddings
        if not -n <= first < n:
            raise IndexError(f"mlxq: row {first} of embedding {self._name!r} ({n} rows)")
        ids = torch.tensor([first % n], device=self.device)
        return AffineEmbedding.forward(self._module, ids)[0]  # the table's row, unscaled

    def __getattr__(self, attr: str):
        if attr.startswith("_"):  # private and special names (its slots before they are set)
            raise AttributeError(attr)
        raise self._refuse(f"a tensor (.{attr})")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        use = f"an argument of {getattr(func, '__name__', func)}"
        rows = next((a for a in (*args, *(kwargs or {}).values()) if isinstance(a, cls)), None)
        if rows is None:
            raise NotImplementedError(f"mlxq: a quantized embedding's weight used as {use}")
        raise rows._refuse(use)

    def _operator(self, *args):
        raise self._refuse("an operand")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _operator
    __truediv__ = __rtruediv__ = __matmul__ = __rmatmul__ = __neg__ = _operator
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _operator
    __iter__ = __len__ = __bool__ = __array__ = _operator
    __hash__ = None


class TiedAffineHead(nn.Module):
    """Output head tied to a quantized embedding: `logits = embedding.as_linear(x)`.

    Owns no tensors (so a state dict has no `lm_head.*` entries, as in MLX checkpoints); the
    embedding is referenced, not registered, so it is saved once under its own name.
    """

    def __init__(self, embedding: AffineEmbedding) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # plain reference, not a submodule
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    @property
    def embedding(self) -> AffineEmbedding:
        return self._embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # accelerate may place the head on another GPU than its embedding (device_map="auto"):
        # the product runs where the embedding's tensors are, and the logits come back to x's
        device = self._embedding.weight.device
        if x.device != device:
            return self._embedding.as_linear(x.to(device)).to(x.device)
        return self._embedding.as_linear(x)

    def extra_repr(self) -> str:
        return f"tied to AffineEmbedding({self.out_features}, {self.in_features})"


# --- one place that turns a module's mode into op calls -----------------------------------------


class InProjMultiheadAttention(nn.Module):
    """`torch.nn.MultiheadAttention` (no masks, no dropout: inference) with its fused q/k/v
    input projection held as a module, `in_proj` (`[3E, E]`, with bias), so that it can be an
    :class:`AffineLinear`: nn.MultiheadAttention keeps it as raw `in_proj_weight` /
    `in_proj_bias` parameters, where mlx-vlm quantizes SigLIP's pooling head as a Linear
    (Granite 4 Vision). Called as nn.MultiheadAttention is; returns the same
    `(output, weights)`."""

    def __init__(
        self, in_proj: nn.Module, out_proj: nn.Module, num_heads: int, batch_first: bool
    ) -> None:
        super().__init__()
        self.in_proj, self.out_proj = in_proj, out_proj
        self.num_heads, self.batch_first = num_heads, batch_first
        self.embed_dim = out_proj.in_features

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> InProjMultiheadAttention:
        """The same attention, its input projection an nn.Linear (sharing the parameters)."""
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise NotImplementedError(
                "mlxq: nn.MultiheadAttention with separate q/k/v projections (kdim/vdim)"
            )
        if mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError("mlxq: nn.MultiheadAttention with add_bias_kv/add_zero_attn")
        weight = mha.in_proj_weight
        in_proj = nn.Linear(
            weight.shape[1],
            weight.shape[0],
            bias=mha.in_proj_bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        in_proj.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            in_proj.bias = mha.in_proj_bias
        return cls(in_proj, mha.out_proj, mha.num_heads, mha.batch_first)

    # nn.MultiheadAttention's names, for code that reaches for them (transformers' SigLIP
    # weight init, which skips tensors loaded from the checkpoint): in_proj's own tensors,
    # packed where it is quantized
    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.in_proj.bias

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise NotImplementedError(f"mlxq: {type(self).__name__} takes no attention masks")
        if not self.batch_first:  # [L, N, E] -> [N, L, E]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e, h = self.embed_dim, self.num_heads
        # one projection per distinct input; each keeps only its third of the rows
        q = self.in_proj(query)[..., :e]
        kv = self.in_proj(key)
        v = kv[..., 2 * e :] if value is key else self.in_proj(value)[..., 2 * e :]
        k = kv[..., e : 2 * e]

        def heads(t: torch.Tensor) -> torch.Tensor:  # [N, L, E] -> [N, H, L, E/H]
            return t.unflatten(-1, (h, e // h)).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        weights = torch.softmax((q @ k.transpose(-2, -1)) * (e // h) ** -0.5, dim=-1)
        out = self.out_proj((weights @ v).transpose(1, 2).flatten(-2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, batch_first={self.batch_first}"


def refuse_nonfinite_weight(w: torch.Tensor) -> None:
    """Refuse a float weight with NaN or Inf before quantizing it: MLX's quantizer (and so
    `mlx_lm convert`, bit for bit mlxq's) turns a group with one NaN into finite codes, scale
    and bias, so the NaN is lost without a word and the layer computes another weight."""
    if w.numel() == 0 or bool(torch.isfinite(w.sum(dtype=torch.float32))):
        return  # (a sum, not a mask as large as w: this runs on every layer quantized)
    bad = ~torch.isfinite(w)
    if bool(bad.any()):  # (else only the sum overflowed)
        where = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(
            f"mlxq: the float weight {list(w.shape)} to quantize has {int(bad.sum())} non-finite "
            f"values (NaN or Inf), e.g. at index {where}; MLX's quantizer would turn them into "
            "finite codes without a word (a corrupt float checkpoint?)"
        )


def _quantize_into(module: AffineLinear | AffineEmbedding, w: torch.Tensor) -> None:
    refuse_nonfinite_weight(w)
    if module.mode == "affine":
        module.weight, module.scales, module.biases = affine_quantize(
            w, module.group_size, module.bits
        )
    else:
        module.weight, module.scales = quantize(w, module.group_size, module.bits, module.mode)


def _dequantize_rows(
    module: AffineLinear | AffineEmbedding,
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None,
) -> torch.Tensor:
    if module.mode == "affine":
        return affine_dequantize(wq, scales, biases, module.group_size, module.bits)
    return torch.ops.mlxq.fp_dequantize(
        wq, scales, module.mode, module.group_size, module.bits, None, module.dtype
    )


def _matmul(module: AffineLinear | AffineEmbedding, x: torch.Tensor) -> torch.Tensor:
    if module.mode == "affine":
        return affine_matmul(
            x, module.weight, module.scales, module.biases, module.group_size, module.bits
        )
    return torch.ops.mlxq.fp_matmul(
        x, module.weight, module.scales, module.mode, module.group_size, module.bits, True, None
    )
