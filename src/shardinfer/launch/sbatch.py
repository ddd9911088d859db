"""sbatch launchers: batch scripts rendered from the templates in ``slurm/``.

- ``sbatch``: a worker job (multi-node srun, or a job array) plus a dependent reduce job; its
  workers are SLURM tasks (:data:`shardinfer.launch.env.FROM_SLURM`);
- ``slurm-mpi`` (``mpi`` in earlier versions): one job whose MPI ranks (srun --mpi=pmix, or mpirun)
  plan, infer and reduce (:data:`shardinfer.launch.env.FROM_MPI`).

Each worker is started with ``--launcher NAME``: how it finds its rank is its launcher's.

The scripts are pure functions of the config and the resource request (:mod:`shardinfer.launch.slurm`),
saved in the run directory before anything is submitted.
"""

from __future__ import annotations

import importlib.resources
import shlex
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shardinfer import __version__
from shardinfer.config import Config
from shardinfer.errors import ConfigError
from shardinfer.launch.base import RunHandle
from shardinfer.launch.env import FROM_MPI, FROM_SLURM, RankSource
from shardinfer.launch.layout import Layout, layout, node_map
from shardinfer.launch.mpi import rank_arguments
from shardinfer.launch.slurm import (
    SlurmLauncher,
    one_line,
    reduce_request,
    sbatch,
    sbatch_lines,
    sbatch_options,
    submitted,
    worker_request,
)
from shardinfer.ledger.rundir import RunDir
from shardinfer.planning.plan import Plan

REDUCE_DEPENDENCY = ("--dependency=afterany:{job}", "--kill-on-invalid-dep=yes")


@dataclass(frozen=True)
class Scripts:
    worker: str
    reduce: str


def render_scripts(cfg: Config, lay: Layout, *, run_dir: str, launch: int, python: str, mpi: bool = False,
                   launcher: str | None = None) -> Scripts:
    """The scripts of a launch; ``mpi``: of the SLURM MPI job. ``launcher``: the name its workers are
    started with (by default the built-in launcher's)."""
    one_line("run directory", run_dir)
    one_line("slurm.python", python)
    launcher = one_line("launcher", launcher or (SlurmMpiLauncher.name if mpi else SbatchLauncher.name))
    worker_opts = sbatch_options(worker_request(cfg, lay), f"{run_dir}/slurm/%x-%j.out")
    reduce_opts = sbatch_options(reduce_request(cfg), f"{run_dir}/slurm/%x-%j.out")
    launch_line = (_mpi_line if mpi else _launch_line)(cfg, lay, run_dir, launch, python, launcher)
    requeue = 'scontrol requeue "$SLURM_JOB_ID"' if cfg.slurm.requeue else ": # slurm.requeue is off"
    return Scripts(worker=_render("worker.sbatch", cfg, run_dir=run_dir, python=python,
                                  sbatch_lines=sbatch_lines(worker_opts), launch=str(launch),
                                  workers=str(lay.workers), shape=lay.shape, requeue_line=requeue,
                                  launch_line=launch_line, launcher=launcher),
                   reduce=_render("reduce.sbatch", cfg, run_dir=run_dir, python=python,
                                  sbatch_lines=sbatch_lines(reduce_opts)))


def _launch_line(cfg: Config, lay: Layout, run_dir: str, launch: int, python: str, launcher: str) -> str:
    # --kill-on-bad-exit=0: a worker that dies does not take the others down; they finish the units.
    srun = f"srun --unbuffered --kill-on-bad-exit=0 --cpus-per-task={cfg.slurm.cpus_per_task}"
    worker = (f"{shlex.quote(python)} -m shardinfer.worker {shlex.quote(run_dir)} --launcher {shlex.quote(launcher)} "
              f"--launch {launch} --expect-world {lay.workers} --gpus-per-replica {lay.gpus_per_task}")
    if lay.nodes_per_replica > 1:  # one task per node; each replica's first node runs the worker
        worker += f" --nodes-per-replica {lay.nodes_per_replica}"
    return f"{srun} {worker}"


def _mpi_line(cfg: Config, lay: Layout, run_dir: str, launch: int, python: str, launcher: str) -> str:
    entry = shlex.join([python, "-m", "shardinfer.launch.mpi",
                        *rank_arguments(run_dir, launch, lay.gpus_per_replica, launcher)])
    if cfg.slurm.mpi_start == "mpirun":  # mpirun takes its slots from the allocation
        return f"mpirun {entry}"
    return f"srun --mpi=pmix --unbuffered --cpus-per-task={cfg.slurm.cpus_per_task} {entry}"


def template_text(name: str) -> str:
    """A template from slurm/: shipped in the package as shardinfer.slurm_templates, or read from
    the source checkout (editable installs only see src/)."""
    checkout = Path(__file__).resolve().parents[3] / "slurm" / name
    if checkout.is_file():
        return checkout.read_text()
    return importlib.resources.files("shardinfer.slurm_templates").joinpath(name).read_text()


def _render(name: str, cfg: Config, *, run_dir: str, python: str, **values: str) -> str:
    template = string.Template(template_text(name))
    exports = [f"export {k}={shlex.quote(v)}" for k, v in {"PYTHONUNBUFFERED": "1", **cfg.run.env}.items()]
    return template.substitute(run_dir=shlex.quote(run_dir), python=shlex.quote(python), version=__version__,
                               setup="\n".join(cfg.slurm.setup), exports="\n".join(exports), **values)


def node_python(cfg: Config) -> str:
    """The python the jobs run: slurm.python, else the one running shardinfer submit."""
    return cfg.slurm.python or sys.executable


def write_script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


class SbatchLauncher(SlurmLauncher):
    name = "sbatch"
    description = "sbatch: a worker job (multi-node srun or a job array) and a dependent reduce job"
    ranks: RankSource = FROM_SLURM
    mpi = False

    def scripts(self, cfg: Config, run_dir: RunDir, launch: int) -> Scripts:
        return render_scripts(cfg, layout(cfg), run_dir=str(run_dir.path.resolve()), launch=launch,
                              python=node_python(cfg), mpi=self.mpi, launcher=self.name)

    def preview(self, cfg: Config, run_dir: RunDir) -> str:
        scripts = self.scripts(cfg, run_dir, 0)
        lay = layout(cfg)
        nodes = "".join(f"{line}\n" for line in node_map(lay))
        return (f"# ---- worker job ({lay.workers} workers) ----\n{nodes}{scripts.worker}\n"
                f"# ---- reduce job: sbatch {' '.join(REDUCE_DEPENDENCY).format(job='<worker job>')} ----\n"
                f"{scripts.reduce}")

    def start(self, cfg: Config, run_dir: RunDir, plan: Plan, launch: int) -> RunHandle:
        started = time.time()
        scripts = self.scripts(cfg, run_dir, launch)
        worker = write_script(run_dir.slurm / f"launch-{launch:03d}-worker.sbatch", scripts.worker)
        reduce = write_script(run_dir.slurm / f"launch-{launch:03d}-reduce.sbatch", scripts.reduce)
        worker_job = sbatch(worker)
        reduce_job = sbatch(reduce, *(opt.format(job=worker_job) for opt in REDUCE_DEPENDENCY))
        return submitted(run_dir, self.name, launch, [worker_job, reduce_job], started)


class SlurmMpiLauncher(SbatchLauncher):
    """One job: its MPI ranks claim units and rank 0 reduces at the end, so no reduce job."""

    name = "slurm-mpi"
    former_names = ("mpi",)  # `shardinfer submit --launcher mpi`, and the launch records of earlier versions
    description = "one SLURM job whose MPI ranks (srun --mpi=pmix, or mpirun) plan, infer and reduce"
    ranks = FROM_MPI
    mpi = True

    def check(self, cfg: Config) -> None:
        if cfg.slurm.nodes_per_replica > 1:
            raise ConfigError(f"slurm.nodes_per_replica={cfg.slurm.nodes_per_replica}: the {self.name} launcher "
                              f"runs each replica on one node; use --launcher sbatch or submitit")
        super().check(cfg)

    def preview(self, cfg: Config, run_dir: RunDir) -> str:
        return (f"# ---- MPI job ({layout(cfg).workers} ranks; rank 0 reduces, no reduce job) ----\n"
                f"{self.scripts(cfg, run_dir, 0).worker}")

    def start(self, cfg: Config, run_dir: RunDir, plan: Plan, launch: int) -> RunHandle:
        started = time.time()
        script = write_script(run_dir.slurm / f"launch-{launch:03d}-mpi.sbatch", self.scripts(cfg, run_dir, launch).worker)
        return submitted(run_dir, self.name, launch, [sbatch(script)], started)


LAUNCHERS = [SbatchLauncher(), SlurmMpiLauncher()]
