"""sbatch launcher: worker job (multi-node srun, or a job array) plus a dependent reduce job.

The scripts are pure functions of the config (rendered from the templates in ``slurm/``), saved in
the run directory before anything is submitted, and checked with ``sbatch --test-only`` so an
impossible request (more nodes than the partition has, an unknown partition) fails at once.
"""

from __future__ import annotations

import importlib.resources
import logging
import shlex
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from shardinfer import __version__
from shardinfer.config import Config
from shardinfer.errors import RunError, ShardinferError
from shardinfer.launch.layout import Layout

log = logging.getLogger(__name__)


class SubmitError(ShardinferError):
    """SLURM refused a job: the message holds sbatch's words, what was asked and the fix."""


@dataclass(frozen=True)
class Scripts:
    worker: str
    reduce: str


def render_scripts(cfg: Config, lay: Layout, *, run_dir: str, launch: int, python: str, mpi: bool = False) -> Scripts:
    return Scripts(worker=_render("worker.sbatch", cfg, run_dir=run_dir, python=python,
                                  sbatch_lines=_lines(worker_options(cfg, lay, run_dir)),
                                  launch=str(launch), workers=str(lay.workers), shape=lay.shape,
                                  requeue_line=('scontrol requeue "$SLURM_JOB_ID"' if cfg.slurm.requeue
                                                else ": # slurm.requeue is off"),
                                  launch_line=(_mpi_line if mpi else _launch_line)(cfg, lay, run_dir, launch, python)),
                   reduce=_render("reduce.sbatch", cfg, run_dir=run_dir, python=python,
                                  sbatch_lines=_lines(reduce_options(cfg, run_dir))))


def worker_options(cfg: Config, lay: Layout, run_dir: str) -> list[tuple[str, str | None]]:
    s = cfg.slurm
    opts: list[tuple[str, str | None]] = [("job-name", f"shardinfer-{cfg.name}")]
    if lay.shape == "array":
        last = lay.workers - 1
        opts += [("output", f"{run_dir}/slurm/%x-%A_%a.out"),
                 ("array", f"0-{last}" + (f"%{s.array_parallelism}" if s.array_parallelism else "")),
                 ("nodes", "1"), ("ntasks", "1")]
        gpus = lay.gpus_per_replica
    else:
        opts += [("output", f"{run_dir}/slurm/%x-%j.out"), ("nodes", str(lay.nodes)),
                 ("ntasks-per-node", str(lay.replicas_per_node))]
        gpus = lay.gpus_per_node
    opts.append(("cpus-per-task", str(s.cpus_per_task)))
    if gpus:
        opts.append(("gpus-per-node", str(gpus)))
    if s.mem_gb:
        opts.append(("mem", f"{s.mem_gb}G"))
    opts.append(("time", str(s.time_min)))
    opts += [("signal", f"B:USR2@{s.signal_grace_s}"), ("requeue" if s.requeue else "no-requeue", None)]
    return opts + _placement(cfg) + [_extra(line) for line in s.extra_sbatch]


def reduce_options(cfg: Config, run_dir: str) -> list[tuple[str, str | None]]:
    s = cfg.slurm
    opts: list[tuple[str, str | None]] = [
        ("job-name", f"shardinfer-{cfg.name}-reduce"), ("output", f"{run_dir}/slurm/%x-%j.out"),
        ("nodes", "1"), ("ntasks", "1"), ("cpus-per-task", str(s.reduce_cpus)), ("time", str(s.reduce_time_min))]
    if s.reduce_mem_gb:
        opts.append(("mem", f"{s.reduce_mem_gb}G"))
    return opts + _placement(cfg)


def _placement(cfg: Config) -> list[tuple[str, str | None]]:
    s = cfg.slurm
    pairs = [("partition", s.partition), ("account", s.account), ("qos", s.qos), ("constraint", s.constraint)]
    return [(k, v) for k, v in pairs if v]


def _extra(line: str) -> tuple[str, str | None]:
    text = line.strip().removeprefix("#SBATCH").strip().lstrip("-")
    key, sep, value = text.partition("=")
    return key, value if sep else None


def _lines(opts: list[tuple[str, str | None]]) -> str:
    return "\n".join(f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={shlex.quote(v)}" for k, v in opts)


def _launch_line(cfg: Config, lay: Layout, run_dir: str, launch: int, python: str) -> str:
    # --kill-on-bad-exit=0: a worker that dies does not take the others down; they finish the units.
    srun = f"srun --unbuffered --kill-on-bad-exit=0 --cpus-per-task={cfg.slurm.cpus_per_task}"
    worker = (f"{shlex.quote(python)} -m shardinfer.worker {shlex.quote(run_dir)} --launch {launch} "
              f"--expect-world {lay.workers} --gpus-per-replica {lay.gpus_per_replica}")
    return f"{srun} {worker}"


def template_text(name: str) -> str:
    """A template from slurm/: shipped in the package as shardinfer.slurm_templates, or read from
    the source checkout (editable installs only see src/)."""
    checkout = Path(__file__).resolve().parents[3] / "slurm" / name
    if checkout.is_file():
        return checkout.read_text()
    return importlib.resources.files("shardinfer.slurm_templates").joinpath(name).read_text()


def _mpi_line(cfg: Config, lay: Layout, run_dir: str, launch: int, python: str) -> str:
    entry = (f"{shlex.quote(python)} -m shardinfer.launch.mpi {shlex.quote(run_dir)} --launch {launch} "
             f"--gpus-per-replica {lay.gpus_per_replica}")
    if cfg.slurm.mpi_start == "mpirun":  # mpirun takes its slots from the allocation
        return f"mpirun {entry}"
    return f"srun --mpi=pmix --unbuffered --cpus-per-task={cfg.slurm.cpus_per_task} {entry}"


def _render(name: str, cfg: Config, *, run_dir: str, python: str, **values: str) -> str:
    template = string.Template(template_text(name))
    exports = [f"export {k}={shlex.quote(v)}" for k, v in {"PYTHONUNBUFFERED": "1", **cfg.run.env}.items()]
    return template.substitute(run_dir=shlex.quote(run_dir), python=shlex.quote(python), version=__version__,
                               setup="\n".join(cfg.slurm.setup), exports="\n".join(exports), **values)


def sbatch(script: Path, *args: str) -> str:
    """Submit a script; returns the job id. SLURM's refusal becomes a SubmitError."""
    proc = _run(["sbatch", "--parsable", *args, str(script)])
    return proc.stdout.strip().split(";")[0]


def check_request(script: Path, cfg: Config, lay: Layout) -> None:
    """``sbatch --test-only``: refuse impossible requests now instead of pending forever."""
    try:
        _run(["sbatch", "--test-only", str(script)])
    except SubmitError as exc:
        s = cfg.slurm
        raise SubmitError(
            f"{exc}\nNothing was submitted. Asked: {lay.workers} worker(s) = slurm.nodes {s.nodes} x {lay.replicas_per_node} per node, "
            f"gpus_per_node {s.gpus_per_node}, cpus_per_task {s.cpus_per_task}, partition {s.partition or '(default)'}. "
            f"Fix: compare with `sinfo -o '%P %D %c %m %G'` and lower slurm.nodes / slurm.gpus_per_node / "
            f"slurm.cpus_per_task, or set slurm.partition to an existing partition."
        ) from None


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as exc:
        raise SubmitError(f"{cmd[0]} not found: run shardinfer submit on a SLURM login node "
                          f"(or use `shardinfer run` for a local run)") from exc
    if proc.returncode != 0:
        raise SubmitError(f"{' '.join(cmd[:2])} refused the job: {(proc.stderr or proc.stdout).strip()}")
    return proc


def default_python() -> str:
    return sys.executable


def write_script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def job_states(job_ids: list[str]) -> dict[str, str]:
    """State of each job (array tasks folded into their job): squeue first, then sacct."""
    states: dict[str, str] = {}
    proc = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i %T"],
                          capture_output=True, text=True, timeout=60)
    for line in proc.stdout.splitlines():
        jid, _, state = line.partition(" ")
        states.setdefault(jid.split("_")[0], state)
    missing = [j for j in job_ids if j not in states]
    if missing:
        states.update(_sacct_states(missing))
    return {j: states.get(j, "UNKNOWN") for j in job_ids}


def _sacct_states(job_ids: list[str]) -> dict[str, str]:
    try:
        proc = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobID,State"],
                              capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return {}
    states: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        jid, _, state = line.partition("|")
        states.setdefault(jid.split("_")[0], state.split(" ")[0])
    return states


ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def raise_if_failed(states: dict[str, str], run_dir: Path) -> None:
    bad = {j: s for j, s in states.items() if s not in ACTIVE_STATES | {"COMPLETED"}}
    if bad:
        raise RunError(f"SLURM jobs ended badly: {bad}; logs in {run_dir / 'slurm'}")
