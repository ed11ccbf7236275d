"""mlxq's eager CPU forwards kept through transformers' `kernelize`
(mlxq.integrations.kernelize_guard).

transformers >= 5.25 kernelizes every model it loads when `kernels` is installed. This index
has no `kernels` that transformers accepts, so `kernels.kernelize` is stood in for by what it
does where it has no kernel for the device (kernels' `_replace_forward(module, type(module))`:
the class's forward bound to the module), or by a hub kernel it installs; transformers' own
`kernelize` (`modeling_utils.kernelize`, which `set_use_kernels` calls) runs around it.
"""

from __future__ import annotations

from types import MethodType

import pytest
import torch
import transformers.modeling_utils as modeling_utils
from mlx_models import tiny_mlx_checkpoint
from mlxq.integrations import cpu_norms
from transformers import AutoModelForCausalLM

# the classes transformers 5.25 marks `use_kernel_forward_from_hub` in a Qwen2 model
HUB_KERNEL_CLASSES = ("Qwen2RMSNorm", "SiLUActivation")


def has_native_forward(module) -> bool:
    return getattr(vars(module).get("forward"), "__func__", None) is cpu_norms._native_forward


def _hub_kernel_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__ in HUB_KERNEL_CLASSES]


def _kernels_fallback(model, *args, **kwargs) -> None:
    for m in _hub_kernel_layers(model):
        m.forward = MethodType(type(m).forward, m)


def _hub_kernel(self, hidden_states):
    return hidden_states


def _kernels_with_a_kernel(model, *args, **kwargs) -> None:
    for m in _hub_kernel_layers(model):
        m.forward = MethodType(_hub_kernel, m)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("qwen2", 4, 64), dtype=torch.float32
    )


def _flat_plans(model) -> list:
    return [m._mlxq_flat_plan for m in model.modules() if hasattr(m, "_mlxq_flat_plan")]


def test_load_after_kernelize_gets_the_fast_paths(monkeypatch) -> None:
    """from_pretrained kernelizes (set_use_kernels) before the quantizer's postprocess_model:
    a model loaded so gets its native norms and flat decode steps all the same, and its other
    hub-kernel layers no instance forward."""
    monkeypatch.setattr(
        modeling_utils.PreTrainedModel,
        "set_use_kernels",
        lambda self, *a, **k: _kernels_fallback(self),
    )
    loaded = AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("qwen2", 4, 64), dtype=torch.float32
    )
    norms = [m for m in loaded.modules() if type(m).__name__ == "Qwen2RMSNorm"]
    plans = _flat_plans(loaded)
    assert plans and len(norms) == 2 * len(plans) + 1 and all(map(has_native_forward, norms))
    assert not any("forward" in vars(m) for m in _hub_kernel_layers(loaded) if m not in norms)
    assert all(p.intact() for p in plans)


def test_fallback_forwards_are_undone(model, monkeypatch) -> None:
    """After a later kernelize's fallback (train / eval) the norms have mlxq's native forward
    again, the other layers no instance forward, and every layer's flat decode step applies."""
    norms = [m for m in model.modules() if type(m).__name__ == "Qwen2RMSNorm"]
    plans = _flat_plans(model)
    assert len(norms) == 2 * len(plans) + 1 and all(map(has_native_forward, norms))
    assert all(p.intact() for p in plans)
    assert len(_hub_kernel_layers(model)) > len(norms)  # the MLPs' SiLU too
    with torch.no_grad():
        want = model(torch.tensor([[1, 400, 2000, 31]])).logits

    monkeypatch.setattr(modeling_utils.kernelize, "__wrapped__", _kernels_fallback)
    modeling_utils.kernelize(model)  # as PreTrainedModel.set_use_kernels calls it
    assert all(map(has_native_forward, norms))
    assert not any("forward" in vars(m) for m in _hub_kernel_layers(model) if m not in norms)
    assert all(p.intact() for p in plans)
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([[1, 400, 2000, 31]])).logits, want)


def test_a_hub_kernel_is_kept(model, monkeypatch) -> None:
    """A forward kernelize installs that is not the class's own (a hub kernel) stays."""
    layers = _hub_kernel_layers(model)
    before = [vars(m).get("forward") for m in layers]
    monkeypatch.setattr(modeling_utils.kernelize, "__wrapped__", _kernels_with_a_kernel)
    modeling_utils.kernelize(model)
    assert layers and all(vars(m)["forward"].__func__ is _hub_kernel for m in layers)
    for m, forward in zip(layers, before, strict=True):  # the module-scoped model as it was
        del m.forward
        if forward is not None:
            m.forward = forward


def test_models_without_native_norms_are_left_alone(monkeypatch) -> None:
    """A model mlxq did not speed up keeps what kernelize gives it."""
    model = torch.nn.Sequential(type("SiLUActivation", (torch.nn.SiLU,), {})())
    monkeypatch.setattr(modeling_utils.kernelize, "__wrapped__", _kernels_fallback)
    modeling_utils.kernelize(model)
    assert "forward" in vars(model[0])
