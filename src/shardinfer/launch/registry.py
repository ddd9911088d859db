"""The launcher registry: local, MPI, sbatch and submitit as peers, plus those of plugins.

The CLI (``run`` takes the launchers that run here, ``submit`` those that submit to a cluster),
``resume`` and the Python API all choose a launcher here by name.
"""

from __future__ import annotations

from shardinfer.errors import ConfigError
from shardinfer.launch.base import Launcher
from shardinfer.plugins import Registry

_BUILTIN = ("shardinfer.launch.local", "shardinfer.launch.mpi", "shardinfer.launch.sbatch",
            "shardinfer.launch.submitit_launcher")
_REGISTRY: Registry[Launcher] = Registry("launcher", _BUILTIN, lambda module: list(module.LAUNCHERS),
                                         lambda launcher: launcher.name)


def register_launcher(launcher: Launcher) -> Launcher:
    return _REGISTRY.register(launcher)


def launchers(*, on_cluster: bool | None = None) -> dict[str, Launcher]:
    """Registered launchers by name (only those that run here, or only cluster ones, if asked)."""
    return {n: la for n, la in _REGISTRY.all().items() if on_cluster is None or la.on_cluster == on_cluster}


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
