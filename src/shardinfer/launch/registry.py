"""The launcher registry: local, mpirun, sbatch, the SLURM MPI job and submitit as peers, plus
those of plugins.

The CLI (``run`` takes the launchers that run here, ``submit`` those that submit to a cluster),
``resume``, the Python API and the launch records of a run all choose a launcher here by name; a
worker process finds here, by the name of the launcher that started it, how to find its rank
(:func:`worker_launcher`). Each launcher has one name; the names of earlier versions still work,
with a deprecation line (:data:`Launcher.former_names`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

from shardinfer.errors import ConfigError
from shardinfer.launch.base import Launcher, LaunchRecord
from shardinfer.launch.env import LAUNCHER_VAR
from shardinfer.plugins import Registry

log = logging.getLogger(__name__)

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
    """Names and aliases, for command-line choices (the names of earlier versions are not offered)."""
    known = launchers(on_cluster=on_cluster)
    return list(known) + [a for la in known.values() for a in la.aliases if a not in known]


def get_launcher(name: str, *, on_cluster: bool | None = None, quiet: bool = False) -> Launcher:
    """A launcher by name, or by alias among those of the same kind (``run`` vs ``submit``). A name
    of an earlier version gives the launcher now called otherwise, with a deprecation line (none
    when ``quiet``); where it named launchers of both kinds and the kind is not given, the cluster
    one (earlier versions recorded only SLURM launches under such a name)."""
    known = launchers(on_cluster=on_cluster)
    if name in known:
        return known[name]
    for launcher in known.values():
        if name in launcher.aliases:
            return launcher
    renamed = sorted((la for la in known.values() if name in la.former_names), key=lambda la: not la.on_cluster)
    if renamed:
        if not quiet:
            if len(renamed) == 1:
                log.warning("launcher name %r is deprecated: use %r", name, renamed[0].name)
            else:
                called = " or ".join(f"{la.name!r} (shardinfer {'submit' if la.on_cluster else 'run'})"
                                     for la in renamed)
                log.warning("launcher name %r is deprecated: use %s; taking %r", name, called, renamed[0].name)
        return renamed[0]
    where = {True: " that submit to a cluster", False: " that run here", None: ""}[on_cluster]
    raise ConfigError(f"launcher {name!r} is not one of the launchers{where}: {', '.join(launcher_choices(on_cluster=on_cluster))}")


def launcher_type(*, on_cluster: bool | None = None) -> Callable[[str], str]:
    """An argparse ``type=`` for ``--launcher``: a name of an earlier version becomes the launcher's
    name now, with a deprecation line, before argparse checks the choices (which offer only the
    names now, so ``--help`` shows those)."""

    def launcher(name: str) -> str:
        try:
            return get_launcher(name, on_cluster=on_cluster).name
        except ConfigError:
            return name  # argparse says it is not one of the choices

    return launcher


def launcher_of(record: LaunchRecord) -> Launcher:
    """The launcher that made a launch recorded in ``jobs.json``, also when the record names it as
    an earlier version did: a launch with scheduler job ids was submitted to a cluster, one without
    ran here (``mpi`` is the SLURM MPI job, or mpirun on the launching machine)."""
    if record.launcher in launchers():
        return get_launcher(record.launcher)
    return get_launcher(record.launcher, on_cluster=bool(record.job_ids), quiet=True)


def worker_launcher(name: str | None = None, env: Mapping[str, str] | None = None, *,
                    ranked: bool = False) -> Launcher:
    """The launcher that started this worker process, whose ``ranks`` say how it finds its rank:
    named by ``--launcher`` (``name``), else by SHARDINFER_LAUNCHER. A worker started without
    either is a local worker when its command gave ``--rank`` (``ranked``; plugin launchers written
    for earlier versions), else one of a batch script written by an earlier version (sbatch)."""
    env = os.environ if env is None else env
    name = name or env.get(LAUNCHER_VAR) or None
    if name is None:
        name = "local" if ranked else "sbatch"
        log.info("no --launcher given: a worker of the %s launcher", name)
    return get_launcher(name)
