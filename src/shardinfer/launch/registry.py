"""The launcher registry: local, MPI, sbatch and submitit as peers, plus those of plugins.

The CLI (``run`` takes the launchers that run here, ``submit`` those that submit to a cluster),
``resume`` and the Python API all choose a launcher here by name.
"""

from __future__ import annotations

import importlib

from shardinfer.errors import ConfigError
from shardinfer.launch.base import Launcher

_BUILTIN = ("shardinfer.launch.local", "shardinfer.launch.mpi", "shardinfer.launch.sbatch",
            "shardinfer.launch.submitit_launcher")
_LAUNCHERS: dict[str, Launcher] = {}
_builtins_loaded = False


def register_launcher(launcher: Launcher) -> Launcher:
    _load_builtins()  # built-in launchers come first, whoever registers first
    known = _LAUNCHERS.get(launcher.name)
    if known is not None and known is not launcher:
        raise ConfigError(f"launcher {launcher.name!r} is registered twice; rename one of them")
    _LAUNCHERS[launcher.name] = launcher
    return launcher


def launchers(*, on_cluster: bool | None = None) -> dict[str, Launcher]:
    """Registered launchers by name (only those that run here, or only cluster ones, if asked)."""
    _load_builtins()
    from shardinfer.plugins import load_plugins

    load_plugins()
    return {n: la for n, la in _LAUNCHERS.items() if on_cluster is None or la.on_cluster == on_cluster}


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module_name in _BUILTIN:
            for launcher in importlib.import_module(module_name).LAUNCHERS:
                register_launcher(launcher)


def launcher_choices(*, on_cluster: bool | None = None) -> list[str]:
    """Names and aliases, for command-line choices."""
    known = launchers(on_cluster=on_cluster)
    return list(known) + [a for la in known.values() for a in la.aliases if a not in known]


def get_launcher(name: str, *, on_cluster: bool | None = None) -> Launcher:
    """A launcher by name, or by alias among those of the same kind (``run`` vs ``submit``)."""
    known = launchers(on_cluster=on_cluster)
    if name in known:
        return known[name]
    for launcher in known.values():
        if name in launcher.aliases:
            return launcher
    where = {True: " that submit to a cluster", False: " that run here", None: ""}[on_cluster]
    raise ConfigError(f"launcher {name!r} is not one of the launchers{where}: {', '.join(launcher_choices(on_cluster=on_cluster))}")
