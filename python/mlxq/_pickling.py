"""Whole-model pickling (`torch.save(model)`, `copy.deepcopy`) of what mlxq builds at runtime:
classes made by a factory (pickle finds a class by its qualified name, which these lack) are
pickled as the factory call that makes them, instance methods bound by mlxq (a bound method
pickles as `getattr(module, func.__name__)`, which these are not) as the binding, and the
output-capturing hooks transformers installs at the first forward asking for hidden states,
attentions or router logits (local functions) as a name of this module that makes them again."""

from __future__ import annotations

import copyreg
import functools
import itertools
import types
from collections.abc import Callable

import torch

__all__ = ["made_class", "bind_method", "picklable_after_forward", "PicklesUnsignedBuffers"]

_FACTORY = "_mlxq_factory"


def made_class(name: str, bases: tuple, namespace: dict, factory: Callable, *args) -> type:
    """`type(name, bases, namespace)`, made by the module-level `factory(*args)` (cached by
    it), whose instances pickle by calling `factory(*args)` again at load."""
    namespace = {"__module__": factory.__module__, **namespace}
    return type(
        name, bases, {**namespace, _FACTORY: (factory, args), "__reduce_ex__": _reduce_made}
    )


def _class_ref(cls: type):
    spec = vars(cls).get(_FACTORY)
    return cls if spec is None else _MadeClass(*spec)


class _MadeClass:
    """Pickles as the factory call that makes a class (its arguments may be made classes)."""

    def __init__(self, factory: Callable, args: tuple) -> None:
        self.factory, self.args = factory, args

    def __reduce__(self):
        args = tuple(_class_ref(a) if isinstance(a, type) else a for a in self.args)
        return (_make_class, (self.factory, args))


def _make_class(factory: Callable, args: tuple) -> type:
    return factory(*args)


def _new(cls: type):
    return object.__new__(cls)


def _reduce_made(self, protocol: int):
    # the state as object.__reduce_ex__ gives it (nn.Module's __setstate__ takes it back)
    return (_new, (_class_ref(type(self)),), self.__getstate__())


_BOUND: set[Callable] = set()


def bind_method(func: Callable, module) -> types.MethodType:
    """`types.MethodType(func, module)` (module-level `func`), which pickles."""
    _BOUND.add(func)
    return types.MethodType(func, module)


def _bind(func: Callable, module) -> types.MethodType:
    return types.MethodType(func, module)


def _reduce_method(method: types.MethodType):
    if method.__func__ is _model_getstate:
        return (_restored_model_getstate, (method.__self__,))
    if method.__func__ in _BOUND:
        return (_bind, (method.__func__, method.__self__))
    return method.__reduce__()


copyreg.pickle(types.MethodType, _reduce_method)


# transformers' output-capturing hooks, by the name of this module each pickles as
_CAPTURE_HOOKS: dict[str, Callable] = {}
_CAPTURE_PREFIX = "_capture_hook_"
_serials = itertools.count()


def picklable_after_forward(model) -> None:
    """Lets `model` and its sub-models pickle after a forward: each gets an instance
    `__getstate__` that first names the output-capturing hooks installed in it."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.__dict__["__getstate__"] = bind_method(_model_getstate, module)


def _model_getstate(model) -> dict:
    # (a shallow copy.copy of the model shares this bound method: it pickles as the original)
    for module in model.modules():
        for hook in module._forward_hooks.values():
            _name_capture_hook(hook)
    return type(model).__getstate__(model)


def _restored_model_getstate(model) -> types.MethodType:
    """The binding again, and the entry transformers' `PreTrainedModel.__init__` makes in its
    output-recording registry (keyed on the class name: a process that built no such model has
    none, and the loaded model would then capture no hidden states, attentions or router logits)."""
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    _CAN_RECORD_REGISTRY[model] = getattr(type(model), "_can_record_outputs", None)
    return bind_method(_model_getstate, model)


def _make_capture_hook(key: str, index: int, capture_initial_hidden_state: bool) -> Callable:
    """transformers' own hook for these arguments (installed on a scratch module)."""
    import torch
    from transformers.utils import output_capturing

    scratch = torch.nn.Module()
    output_capturing.install_output_capuring_hook(scratch, key, index, capture_initial_hidden_state)
    (hook,) = scratch._forward_hooks.values()
    return hook


@functools.cache
def _capture_hook_code() -> types.CodeType:
    return _make_capture_hook("hidden_states", 0, True).__code__


def _cells(fn) -> dict:
    return dict(
        zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ()), strict=True)
    )


def _name_capture_hook(hook) -> None:
    """Gives one of transformers' output-capturing hooks (a local function, which pickle
    refuses) a name of this module that makes an equal hook at load; leaves others as they are."""
    if getattr(hook, "__code__", None) is not _capture_hook_code() or hook.__module__ == __name__:
        return  # not one, or named already
    cells = _cells(hook)
    args = (cells["key"], cells["index"], cells["capture_initial_hidden_state"])
    remade = _cells(_make_capture_hook(*args))
    same = remade.keys() == cells.keys() and all(
        (v.__code__ is getattr(cells[k], "__code__", None) and not _cells(v))
        if callable(v)
        else v == cells[k]
        for k, v in remade.items()
    )
    if not same or not (isinstance(args[0], str) and args[0].isidentifier()):
        raise TypeError(
            f"mlxq: cannot pickle transformers' output-capturing hook for {args[0]!r}: "
            f"it holds {sorted(cells)} that remaking it from (key, index, "
            "capture_initial_hidden_state) would not give back"
        )
    name = f"{_CAPTURE_PREFIX}{next(_serials)}_{_hook_args(args)}"
    while name in _CAPTURE_HOOKS:  # a name a loaded model's hook already has
        name = f"{_CAPTURE_PREFIX}{next(_serials)}_{_hook_args(args)}"
    hook.__module__, hook.__qualname__ = __name__, name
    _CAPTURE_HOOKS[name] = hook


def _hook_args(args: tuple) -> str:
    key, index, initial = args
    return f"{int(index)}_{int(bool(initial))}_{key}"


def __getattr__(name: str):
    # a pickled capture hook: `_capture_hook_<serial>_<index>_<initial>_<key>`, made again
    hook = _CAPTURE_HOOKS.get(name)
    if hook is None and name.startswith(_CAPTURE_PREFIX):
        _, index, initial, key = name[len(_CAPTURE_PREFIX) :].split("_", 3)
        hook = _make_capture_hook(key, int(index), bool(int(initial)))
        hook.__module__, hook.__qualname__ = __name__, name
        _CAPTURE_HOOKS[name] = hook
    if hook is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return hook


# torch's plain pickling (pickle.dumps, multiprocessing; torch.save has its own format) writes a
# tensor's storage in the legacy format, which has no storage class for uint16/32/64: loading one
# fails ("UntypedStorage has no attribute 'dtype'", torch 2.13). Packed weights are uint32.
_SIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


class _SignedView:
    """Pickles an unsigned tensor as its signed view (the same bits) and the view back."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __reduce__(self):
        return (_unsigned_view, (self.tensor.view(_SIGNED[self.tensor.dtype]), self.tensor.dtype))


def _unsigned_view(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.view(dtype)


class PicklesUnsignedBuffers:
    """nn.Module mixin: unsigned buffers (packed weights) pickle as signed views, so that
    `pickle.loads(pickle.dumps(module))` works (see `_SIGNED`); views keep storages shared."""

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        buffers = state.get("_buffers")
        if buffers and any(getattr(t, "dtype", None) in _SIGNED for t in buffers.values()):
            state = dict(state)
            state["_buffers"] = {
                name: _SignedView(t) if getattr(t, "dtype", None) in _SIGNED else t
                for name, t in buffers.items()
            }
        return state
