"""Named implementations of one kind, chosen by name: backends, Service datapaths, policy engines,
pod modes and CLI commands all use this one helper (papermill's ``papermill_engines.register``).

A :class:`Registry` knows the package its implementations live in. The first lookup imports every
module of that package (in name order), and each module registers what it defines with the
:meth:`Registry.register` decorator; so adding an implementation touches one place, its own module.
Names are listed by the objects' ``order`` attribute where they have one (pod modes: the study's
order), then by name: never by import order. An unknown name is an :class:`UnknownName` error that lists the
known ones and suggests the nearest.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import UsageError

T = TypeVar("T")


class UnknownName(UsageError):
    """A name no implementation of that kind is registered under."""

    def __init__(self, kind: str, name: object, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        near = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        super().__init__(f"unknown {kind} {name!r}{hint}; known: {', '.join(known)}")


class Registry(Generic[T]):
    """Implementations of ``kind`` by name, in registration order.

    ``package``: the package whose modules register into this registry, imported on first lookup.
    ``name_of``: how a registered object names itself (default: its ``name`` attribute)."""

    def __init__(self, kind: str, package: str | None = None,
                 name_of: Callable[[T], str] = lambda obj: obj.name):  # type: ignore[attr-defined]
        self.kind = kind
        self.package = package
        self._name_of = name_of
        self._items: dict[str, T] = {}
        self._loaded = package is None
        self._lock = threading.RLock()

    def register(self, obj: T) -> T:
        """Register ``obj`` under its own name (usable as a class decorator). A name taken by another
        object is a programming error."""
        name = self._name_of(obj)
        with self._lock:
            other = self._items.get(name)
            if other is not None and other is not obj and getattr(other, "__qualname__", None) != getattr(
                    obj, "__qualname__", object()):
                raise ValueError(f"{self.kind} {name!r} is registered twice ({other!r}, {obj!r})")
            self._items[name] = obj
            self._items = dict(sorted(self._items.items(), key=lambda kv: (getattr(kv[1], "order", 0), kv[0])))
        return obj

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            pkg = importlib.import_module(self.package)
            for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{info.name}")
            self._loaded = True

    def get(self, name: str) -> T:
        """The implementation registered as ``name``; :class:`UnknownName` otherwise."""
        self._load()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownName(self.kind, name, self.names()) from None

    def names(self) -> list[str]:
        self._load()
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        self._load()
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        self._load()
        return len(self._items)


__all__ = ["Registry", "UnknownName"]
