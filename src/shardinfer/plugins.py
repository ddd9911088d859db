"""Third-party engines and launchers: modules imported once, before a registry is first read.

A plugin module registers what it brings when imported (``register_engine(SPEC)``,
``register_launcher(MyLauncher())``). Plugins are found in the ``SHARDINFER_PLUGINS`` environment
variable (comma-separated module names, importable from ``PYTHONPATH``) and in the
``shardinfer.plugins`` entry-point group of installed packages. Workers are started with the same
environment, so a plugin engine runs in every worker of every launcher.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from shardinfer.errors import ConfigError

T = TypeVar("T")

log = logging.getLogger(__name__)

ENV_VAR = "SHARDINFER_PLUGINS"
ENTRY_POINT_GROUP = "shardinfer.plugins"
_loaded = False


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in [m.strip() for m in os.environ.get(ENV_VAR, "").split(",") if m.strip()]:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"{ENV_VAR}: cannot import plugin module {name!r} ({exc}). Put it on PYTHONPATH "
                              f"or remove it from {ENV_VAR}.") from exc
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:  # noqa: BLE001 - a broken third-party plugin must not stop the others
            log.warning("plugin %s (%s) failed to load: %r", entry.name, entry.value, exc)


class Registry(Generic[T]):
    """Named items of one kind (engines, launchers): the built-in ones first, then plugins'."""

    def __init__(self, kind: str, builtin_modules: tuple[str, ...], items_of: Callable[[Any], list[T]],
                 name_of: Callable[[T], str]):
        self.kind = kind
        self._builtin_modules = builtin_modules
        self._items_of = items_of  # a built-in module -> the items it brings
        self._name_of = name_of
        self._items: dict[str, T] = {}
        self._builtins_loaded = False

    def register(self, item: T) -> T:
        self._load_builtins()  # built-in items come first, whoever registers first
        name = self._name_of(item)
        known = self._items.get(name)
        if known is not None and known is not item:
            raise ConfigError(f"{self.kind} {name!r} is registered twice; rename one of them")
        self._items[name] = item
        return item

    def all(self) -> dict[str, T]:
        self._load_builtins()
        load_plugins()
        return dict(self._items)

    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for module_name in self._builtin_modules:
                for item in self._items_of(importlib.import_module(module_name)):
                    self.register(item)
