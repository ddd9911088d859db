"""shardinfer: LLM batch inference over large corpora, sharded across workers, nodes and GPUs.

From Python::

    import shardinfer
    report = shardinfer.run("configs/demo.yaml", overrides=["run.workers=2"])      # here, blocks
    job = shardinfer.submit("my.yaml", launcher="submitit", overrides=["slurm.nodes=4"])
    report = job.result()                                                           # waits for the reduce
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardinfer import _moved

if TYPE_CHECKING:
    from shardinfer.config import Config
    from shardinfer.launch.base import RunHandle

__version__ = "0.1.0"

_moved.install()  # module names of earlier versions still import


def run(config: Config | str | Path, *, overrides: list[str] | None = None, launcher: str = "local") -> dict[str, Any]:
    """Run a job here (``local`` worker processes, or ``mpirun``) until it is done; returns the report."""
    from shardinfer.launch.start import launch

    return launch(config, launcher=launcher, overrides=overrides, on_cluster=False).result()


def submit(config: Config | str | Path, *, launcher: str = "sbatch", overrides: list[str] | None = None
           ) -> RunHandle:
    """Plan a run and launch it with any launcher (``sbatch``, ``submitit``, ``mpi``, or ``local``);
    returns a handle whose ``states()``, ``wait()`` and ``result()`` (the report) work the same for all."""
    from shardinfer.launch.start import launch

    return launch(config, launcher=launcher, overrides=overrides)


def resume(run_dir: str | Path, *, retry_failed: bool = False, launcher: str | None = None) -> RunHandle:
    """Launch again what is not done in a run directory (by default with the run's last launcher)."""
    from shardinfer.launch.start import resume as _resume
    from shardinfer.ledger.rundir import RunDir

    return _resume(RunDir(run_dir), retry_failed=retry_failed, launcher=launcher)
