"""One explicit registry of methods: ``@register`` on the class, ``get_method`` by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from usad_bench.errors import UsadError

if TYPE_CHECKING:
    from usad_bench.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make a Method subclass available under ``name``."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method name {name!r} registered twice ({_METHODS[name].__name__}, {cls.__name__})")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        raise UsadError(f"unknown method {name!r}; `usad-bench methods` lists them: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def list_methods() -> list[str]:
    return sorted(_METHODS)
