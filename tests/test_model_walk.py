"""mlxq.model_walk: the one walk over a model (candidates, formats, the head decision) that the
loader, quantize_model, the mixed recipes and inspect share."""

from __future__ import annotations

import pytest
import torch
from mlxq.format import ModuleFormat
from mlxq.model_walk import head_decision, plan_modules, plan_quantization
from torch import nn


def _llama(tied: bool, meta: bool = True):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
        tie_word_embeddings=tied,
    )
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_head_decision_tied_untied_and_stored() -> None:
    tied = head_decision(_llama(True))
    assert (tied.head, tied.embedding, tied.tied) == ("lm_head", "model.embed_tokens", True)
    assert not head_decision(_llama(False)).tied
    # a checkpoint that stores the head's own weight: it loads its own tensors
    assert not head_decision(_llama(True), stored={"lm_head.weight"}).tied
    assert head_decision(_llama(True), stored={"model.embed_tokens.weight"}).tied


def test_head_decision_follows_the_loaded_weights_not_the_config() -> None:
    model = _llama(True, meta=False)
    assert head_decision(model).tied
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untied by hand
    assert not head_decision(model).tied  # sharing it would silently change the model


def test_head_decision_of_a_plain_module() -> None:
    decision = head_decision(nn.Sequential(nn.Linear(64, 8)))
    assert (decision.head, decision.embedding, decision.tied) == (None, None, False)


def test_plan_modules_lists_candidates_in_order_without_the_tied_head() -> None:
    model = _llama(True)
    seen = []

    def format_of(name, plan):
        seen.append(name)
        return ModuleFormat(4, 32) if "mlp" in name else None

    walk = plan_modules(model, format_of)
    names = [m.name for m in walk.modules]
    assert names == seen
    assert names[0] == "model.embed_tokens" and "lm_head" not in names
    assert (
        names
        == [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))][:-1]
    )
    assert set(walk.formats()) == {n for n in names if "mlp" in n}


def test_plan_modules_errors_raise_or_are_collected() -> None:
    def format_of(name, plan):
        if name.endswith("q_proj"):
            raise ValueError(f"mlxq: layer {name!r}: bad")
        return None

    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj"):
        plan_modules(_llama(False), format_of)
    walk = plan_modules(_llama(False), format_of, collect_errors=True)
    bad = [m for m in walk.modules if m.error is not None]
    assert [m.name for m in bad] == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    with pytest.raises(ValueError, match="bad"):
        bad[0].require_format()


def test_plan_quantization_config_rules() -> None:
    model = _llama(False)
    walk = plan_quantization(
        model,
        ModuleFormat(4, 64),
        overrides={"model.layers.0.mlp.up_proj": {"bits": 8, "group_size": 32}},
        skip=["model.layers.1"],
    )
    formats = walk.formats()
    assert formats["model.layers.0.mlp.up_proj"] == ModuleFormat(8, 32)
    assert formats["model.layers.0.self_attn.q_proj"] == ModuleFormat(4, 64)
    assert "model.layers.0.mlp.down_proj" not in formats  # width 96: not a multiple of 64
    assert not any(n.startswith("model.layers.1.") for n in formats)  # skipped
    assert formats["lm_head"] == ModuleFormat(4, 64)  # untied: a layer of its own
    with pytest.raises(ValueError, match="bits=7"):
        plan_quantization(model, ModuleFormat(7, 64))


class _ReadsWeights(nn.Module):
    """Reads as in transformers' models: Mamba's causal LM casts by its head's weight dtype,
    its mixer multiplies by `dt_proj.weight`, Llama 4 moves ids to the embedding's device; a
    training-only branch and a helper outside forward read weights too."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(64, 64)
        self.dt = nn.Linear(64, 64)
        self.head = nn.Linear(64, 32)

    def forward(self, x):
        if self.training:
            return x @ self.body.weight.t()  # training only: not a read at inference
        x = x.to(self.body.weight.device)  # a device read: served by a packed weight too
        x = self.body(x) + x @ self.dt.weight.t()
        return self.head(x.to(self.head.weight.dtype))

    def resize(self):
        return self.body.weight.shape  # not a forward: runs only when asked for


def test_plan_modules_refuses_a_quantized_module_whose_weight_forward_reads() -> None:
    four_bit = ModuleFormat(4, 32)
    with pytest.raises(NotImplementedError, match=r"'dt'.*_ReadsWeights\.forward"):
        plan_modules(_ReadsWeights(), lambda name, plan: four_bit)
    # the head is read for its dtype only (served by a float layer after loading); the body's
    # reads are training-only or outside forward
    walk = plan_modules(_ReadsWeights(), lambda n, p: four_bit if n != "dt" else None)
    assert [(m.name, m.format) for m in walk.modules] == [
        ("body", four_bit),
        ("dt", None),
        ("head", four_bit),
    ]
    collected = plan_modules(_ReadsWeights(), lambda n, p: four_bit, collect_errors=True)
    assert [m.name for m in collected.modules if m.error is not None] == ["dt"]


def test_a_layer_read_for_its_dtype_runs_as_float() -> None:
    import mlxq
    from mlxq.nn import AffineLinear

    torch.manual_seed(0)
    model = _ReadsWeights().eval()
    head_w = model.head.weight.detach().clone()
    mlxq.quantize_model(model, bits=4, group_size=32, modules_to_not_convert=["dt"])
    # the head runs as a float layer holding its dequantized weight: the same function
    assert type(model.head) is nn.Linear and isinstance(model.body, AffineLinear)
    expected = mlxq.affine_dequantize(*mlxq.affine_quantize(head_w, 32, 4), 32, 4)
    assert torch.equal(model.head.weight, expected)
    x = torch.randn(3, 64)
    with torch.no_grad():
        hidden = model.body(x) + x @ model.dt.weight.t()
        torch.testing.assert_close(
            model(x), torch.nn.functional.linear(hidden, expected, model.head.bias)
        )


def test_plan_modules_refuses_a_tied_head_whose_weight_forward_reads() -> None:
    from transformers import AutoModelForCausalLM, MambaConfig

    config = MambaConfig(
        hidden_size=64, num_hidden_layers=1, vocab_size=128, tie_word_embeddings=True
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    four_bit = ModuleFormat(4, 64)
    # the head is tied: quantizing the embedding makes the head its view, which
    # MambaForCausalLM.forward reads as `self.lm_head.weight.dtype`
    with pytest.raises(NotImplementedError, match=r"'lm_head'.*MambaForCausalLM\.forward"):
        plan_modules(model, lambda n, p: four_bit if n.endswith("embeddings") else None)


class _ReadsRows(nn.Module):
    """Gemma 4's read: its forward indexes one row of the embedding's table itself (the pad
    row), and a helper outside forward compares inputs with the whole table (the reverse
    lookup of `inputs_embeds`)."""

    def __init__(self, nested: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(48, 64)
        self.pad, self.nested = 3, nested

    def forward(self, ids):
        pad = self.emb.weight[self.pad, :]
        return self.emb(ids) + pad.view(1, 1, -1), self.emb.weight[-1]

    def lookup(self, embeds):
        return (embeds[:, :, None, :] == self.emb.weight[None, None, :, :]).all(-1)


class _ReadsRowsNested(_ReadsRows):
    def forward(self, ids):
        row = (lambda: self.emb.weight[self.pad, :])()  # another frame: not served
        return self.emb(ids) + row


class _ReadsLinearRow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        return self.proj(x) + self.proj.weight[0]


def test_an_embedding_serves_the_rows_its_model_reads() -> None:
    """A quantized embedding whose table the model's forward indexes one row at a time serves
    those rows, dequantized exactly, in those methods' frames only; any other use of its weight
    there raises, naming the module and the reader. Reads it cannot serve are refused."""
    import mlxq
    from mlxq.nn import AffineEmbedding, RowServingAffineEmbedding, WeightRows

    torch.manual_seed(0)
    model = _ReadsRows().eval()
    mlxq.quantize_model(model, bits=4, group_size=32)
    emb = model.emb
    assert type(emb) is RowServingAffineEmbedding
    assert "serves rows to _ReadsRows.forward, _ReadsRows.lookup" in repr(emb)
    assert emb.weight.dtype == torch.uint32  # outside those methods: the packed words
    table = AffineEmbedding.forward(emb, torch.arange(48))
    ids = torch.tensor([[1, 7, 3]])
    with torch.no_grad():
        out, last = model(ids)
    torch.testing.assert_close(out, table[ids] + table[3], rtol=0, atol=0)
    torch.testing.assert_close(last, table[-1], rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match=r"_ReadsRows\.lookup uses the weight of embe"):
        model.lookup(table[ids])
    rows = WeightRows(emb, "emb", "reader")
    assert not hasattr(rows, "_probe")  # private names: a plain AttributeError (torch.compile)
    assert (rows.dtype, tuple(rows.shape)) == (table.dtype, (48, 64))
    torch.testing.assert_close(rows[torch.tensor(5)], table[5], rtol=0, atol=0)
    for bad in (lambda: rows[1:3], lambda: rows[torch.tensor([1, 2])], lambda: rows * 2):
        with pytest.raises(NotImplementedError, match="'emb' as"):
            bad()
    with pytest.raises(NotImplementedError, match="an argument of where"):
        torch.where(torch.tensor(True), rows, table)
    with pytest.raises(IndexError, match="row 48"):
        rows[48]
    four_bit = ModuleFormat(4, 32)
    # a read in a frame of its own, and a linear layer's row: refused as before
    with pytest.raises(NotImplementedError, match=r"'emb'.*_ReadsRowsNested\.forward"):
        plan_modules(_ReadsRowsNested(), lambda n, p: four_bit)
    with pytest.raises(NotImplementedError, match=r"'proj'.*_ReadsLinearRow\.forward"):
        plan_modules(_ReadsLinearRow(), lambda n, p: four_bit)


def test_a_row_serving_embedding_compiles_without_breaks_in_mlxq() -> None:
    """torch.compile runs a row-serving embedding's forward eagerly (its rows are served by the
    reading frame); its id check then is not traced either (it was: two graph breaks at its
    `bool()` in mlxq's code), out-of-range ids are still refused, and outputs are eager's."""
    import mlxq

    torch.manual_seed(0)
    model = _ReadsRows().eval()
    mlxq.quantize_model(model, bits=4, group_size=32)
    ids = torch.tensor([[1, 7, 3]])
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids)
        explained = torch._dynamo.explain(model)(ids)
        compiled = torch.compile(model)
        for got, want in zip(compiled(ids), eager, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        with pytest.raises(IndexError, match="got 48"):
            compiled(torch.tensor([[1, 48]]))
    in_mlxq = [
        f"{frame.filename}:{frame.lineno}"
        for reason in explained.break_reasons
        for frame in reason.user_stack or []
        if "/mlxq/" in frame.filename
    ]
    assert not in_mlxq, in_mlxq


@pytest.mark.parametrize("period", [1, 2, 4])
def test_exaone4_layer_pattern_is_the_string_mlx_lm_indexes(period: int) -> None:
    # transformers 5 writes sliding_window_pattern as an int, which mlx-lm's exaone4 indexes as
    # "LLLG": the saved config must build mlx-lm's model with transformers' sliding layers
    from mlx_lm.models import exaone4
    from mlxq.integrations.mlx_lm_layout import mlx_lm_config_keys
    from transformers import Exaone4Config

    config = Exaone4Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, sliding_window=16,
        sliding_window_pattern=period,
    )  # fmt: skip
    cfg = {**config.to_dict(), **mlx_lm_config_keys(config)}
    model = exaone4.Model(exaone4.ModelArgs.from_dict(cfg))
    sliding = [layer.self_attn.is_local for layer in model.model.layers]
    assert sliding == [t == "sliding_attention" for t in config.layer_types]
    assert any(sliding) == (period > 1)
    with pytest.raises(ValueError, match="layer_types"):
        mlx_lm_config_keys(
            {
                **cfg,
                "sliding_window_pattern": 4,
                "layer_types": ["full_attention", "sliding_attention"],
            }
        )


# before: planned, then failed at the first layer built (mid-load for `mlxq convert` and
# quantize-on-load); mx.quantize refuses each of these
@pytest.mark.parametrize(
    ("top", "words"),
    [
        (ModuleFormat(4, 16, "affine"), ["group_size=16", "'affine'"]),
        (ModuleFormat(8, 32, "mxfp4"), ["'mxfp4'", "bits=4", "bits=8"]),
        (ModuleFormat(4, 32, "nvfp4"), ["'nvfp4'", "group_size=16", "group_size=32"]),
    ],
    ids=["affine-g16", "mxfp4-8bit", "nvfp4-g32"],
)
def test_plan_refuses_formats_mlx_cannot_quantize(top: ModuleFormat, words: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        plan_quantization(_llama(tied=True), top)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_quantize_model_refuses_a_quantized_model() -> None:
    # before: the second call skipped the packed layers (kept at 4-bit g64) and rewrote the
    # config to 8-bit g32, which save_pretrained then wrote beside 4-bit tensors
    import mlxq

    model = _llama(tied=False, meta=False)
    mlxq.quantize_model(model, bits=4, group_size=64)
    with pytest.raises(ValueError, match=r"quantized already .*bits=4, group_size=64"):
        mlxq.quantize_model(model, bits=8, group_size=32)
    assert model.config.quantization_config.bits == 4


@pytest.mark.parametrize(
    ("arch", "variant"),
    [
        ("llama", "tied"),  # tied head (a view of the embedding), grouped projections
        ("gemma3_text", "tied"),  # scaled embedding
        ("gpt2", "tied"),  # Conv1D projections
        ("qwen3_moe", "untied"),  # experts' stacks, 8-bit routers (mixed recipe)
        ("deepseek_v3", "untied"),  # per-head latent layers, float MoEGate routers
        ("mixtral", "nvfp4"),  # float-mode experts
    ],
)
def test_packed_layers_by_class_are_those_by_buffers(arch: str, variant: str) -> None:
    # quantize_model's refusal of a quantized model finds its packed layers by class
    # (RefusesUnsupportedCasts); they must be exactly the modules holding a packed weight
    # beside scales, in a loaded MLX checkpoint and after quantize_model alike
    import mlxq
    from arch_models import VARIANTS, Variant, causal_lm_class, tiny_mlx_checkpoint
    from mlxq._casts import RefusesUnsupportedCasts

    def by_buffers(model: nn.Module) -> list[str]:
        out = []
        for name, module in model.named_modules():
            weight, scales = module._buffers.get("weight"), module._buffers.get("scales")
            if scales is not None and weight is not None and not weight.is_floating_point():
                out.append(name)
        return out

    def by_class(model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, RefusesUnsupportedCasts)]

    chosen = {"tied": VARIANTS[0], "untied": VARIANTS[1]}
    chosen["nvfp4"] = Variant(tied=False, mode="nvfp4", bits=4, group_size=16)
    path = tiny_mlx_checkpoint(arch, chosen[variant])
    model = causal_lm_class(arch).from_pretrained(path, dtype=torch.float32)
    assert by_buffers(model) and by_buffers(model) == by_class(model)
    model.dequantize()
    assert not by_class(model)
    mlxq.quantize_model(model, 4, 32)
    assert by_buffers(model) and by_buffers(model) == by_class(model)
    with pytest.raises(ValueError, match="quantized already"):
        mlxq.quantize_model(model, 8, 64)
