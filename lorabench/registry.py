"""Plug-in discovery shared by ``variants/`` and ``tasks/``: no hand-kept list of names."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any


class UnknownNameError(KeyError):
    """A variant or task name that is not registered; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def public_modules(package: str, path: Iterable[str]) -> Iterator[tuple[str, ModuleType]]:
    """(file stem, module) for every module of ``package`` whose name does not start with _."""
    for info in pkgutil.iter_modules(path):
        if not info.name.startswith("_"):
            yield info.name, importlib.import_module(f"{package}.{info.name}")


def lookup(registry: dict[str, Any], name: str, what: str) -> Any:
    try:
        return registry[name]
    except KeyError:
        raise UnknownNameError(f"unknown {what} {name!r}; known {what}s: {', '.join(registry)}") from None
