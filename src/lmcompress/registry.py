"""Name -> class registries for methods, tasks and models.

Methods register themselves with a decorator in their own file; a registry imports its package lazily on the
first lookup, so importing ``lmcompress`` does no work beyond defining names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from lower-case names to registered objects of one kind.

    Args:
        kind: what the entries are, used in error messages ("eviction method", "task", ...).
        package: a dotted package path imported before the first lookup so that its modules register.
    """

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self._package = package
        self._entries: dict[str, T] = {}
        self._loaded = package is None

    def register(self, name: str) -> Callable[[T], T]:
        key = name.lower()

        def decorator(obj: T) -> T:
            if key in self._entries and self._entries[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = obj
            return obj

        return decorator

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            try:
                importlib.import_module(self._package)
            except ModuleNotFoundError as exc:  # an optional part of the package that is not there
                if exc.name != self._package:
                    raise

    def get(self, name: str) -> T:
        self._load()
        key = name.lower()
        if key not in self._entries:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._entries)) or '(none)'}"
            )
        return self._entries[key]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: str) -> bool:
        self._load()
        return name.lower() in self._entries


EVICTION_METHODS: Registry = Registry("eviction method", "lmcompress.kv.evict")
KV_QUANTIZERS: Registry = Registry("KV quantizer", "lmcompress.kv.quant")
WEIGHT_METHODS: Registry = Registry("weight quantization method", "lmcompress.weights")
TASKS: Registry = Registry("task", "lmcompress.eval.tasks")
