"""Whole-model pickling (`torch.save(model)`, `copy.deepcopy`) of what mlxq builds at runtime:
classes made by a factory (pickle finds a class by its qualified name, which these lack) are
pickled as the factory call that makes them, and instance `forward`s bound by mlxq (a bound
method pickles as `getattr(module, func.__name__)`, which these are not) as the binding."""

from __future__ import annotations

import copyreg
import types
from collections.abc import Callable

__all__ = ["made_class", "bind_forward"]

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


def bind_forward(func: Callable, module) -> types.MethodType:
    """`types.MethodType(func, module)` (module-level `func`), which pickles."""
    _BOUND.add(func)
    return types.MethodType(func, module)


def _bind(func: Callable, module) -> types.MethodType:
    return types.MethodType(func, module)


def _reduce_method(method: types.MethodType):
    if method.__func__ in _BOUND:
        return (_bind, (method.__func__, method.__self__))
    return method.__reduce__()


copyreg.pickle(types.MethodType, _reduce_method)
