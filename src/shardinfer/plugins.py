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

from shardinfer.errors import ConfigError

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
