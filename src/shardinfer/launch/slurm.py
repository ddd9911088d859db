"""What the SLURM launchers (sbatch, submitit, MPI jobs) share: one mapping from the config to a
resource request, the calls to SLURM's commands, and the handle of a submitted run.

:class:`SlurmRequest` is built once from ``slurm.*`` and the worker layout; the sbatch launchers
render it as ``#SBATCH`` lines and the submitit launcher as executor parameters, so both honour the
same settings (nodes, tasks, CPUs, GPUs, memory, time, signal, requeue, placement, extra options).
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardinfer.config import CONTROL, Config
from shardinfer.errors import ConfigError, RunError, ShardinferError
from shardinfer.launch.base import Launcher, LaunchRecord, RunHandle
from shardinfer.launch.layout import Layout, layout
from shardinfer.ledger.rundir import RunDir, read_json

log = logging.getLogger(__name__)

ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}
Option = tuple[str, "str | None"]  # an sbatch long option and its value (None: a flag)


class SubmitError(ShardinferError):
    """SLURM refused a job: the message holds sbatch's words, what was asked and the fix."""


@dataclass(frozen=True)
class SlurmRequest:
    """The resources of one SLURM job, whichever launcher submits it."""

    job_name: str
    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    time_min: int
    gpus_per_node: int = 0
    mem_gb: int | None = None
    per_node_tasks: bool = True  # ask for tasks per node (worker jobs) rather than a task count
    array_tasks: int | None = None  # a job array of this many jobs of ``nodes`` nodes (one replica each)
    array_parallelism: int | None = None
    signal_grace_s: int | None = None  # USR2 this long before the time limit (worker jobs)
    requeue: bool | None = None
    placement: tuple[Option, ...] = ()  # partition, account, qos, constraint
    extra: tuple[Option, ...] = ()  # slurm.extra_sbatch


def worker_request(cfg: Config, lay: Layout) -> SlurmRequest:
    s = cfg.slurm
    shape = dict(nodes=lay.nodes_per_replica, tasks_per_node=1, gpus_per_node=lay.gpus_per_task,
                 array_tasks=lay.workers, array_parallelism=s.array_parallelism) if lay.shape == "array" else dict(
        nodes=lay.nodes, tasks_per_node=lay.tasks_per_node, gpus_per_node=lay.gpus_per_node)
    return SlurmRequest(job_name=f"shardinfer-{cfg.name}", cpus_per_task=s.cpus_per_task, time_min=s.time_min,
                        mem_gb=s.mem_gb, signal_grace_s=s.signal_grace_s, requeue=s.requeue,
                        placement=_placement(cfg), extra=tuple(_extra(line) for line in s.extra_sbatch),
                        **shape)


def reduce_request(cfg: Config) -> SlurmRequest:
    s = cfg.slurm
    return SlurmRequest(job_name=f"shardinfer-{cfg.name}-reduce", nodes=1, tasks_per_node=1, per_node_tasks=False,
                        cpus_per_task=s.reduce_cpus, time_min=s.reduce_time_min, mem_gb=s.reduce_mem_gb,
                        placement=_placement(cfg))


def _placement(cfg: Config) -> tuple[Option, ...]:
    s = cfg.slurm
    pairs = [("partition", s.partition), ("account", s.account), ("qos", s.qos), ("constraint", s.constraint)]
    return tuple((k, v) for k, v in pairs if v)


def _extra(line: str) -> Option:
    text = line.strip().removeprefix("#SBATCH").strip().lstrip("-")
    key, sep, value = text.partition("=")
    return key, value if sep else None


def sbatch_options(req: SlurmRequest, output: str) -> list[Option]:
    """The request as sbatch options, in a stable order (``output`` is the log path pattern)."""
    opts: list[Option] = [("job-name", req.job_name)]
    if req.array_tasks is not None:
        parallel = f"%{req.array_parallelism}" if req.array_parallelism else ""
        opts += [("output", output.replace("%j", "%A_%a")), ("array", f"0-{req.array_tasks - 1}{parallel}"),
                 ("nodes", str(req.nodes)), ("ntasks", str(req.nodes * req.tasks_per_node))]
    elif not req.per_node_tasks:
        opts += [("output", output), ("nodes", str(req.nodes)), ("ntasks", str(req.nodes * req.tasks_per_node))]
    else:
        opts += [("output", output), ("nodes", str(req.nodes)), ("ntasks-per-node", str(req.tasks_per_node))]
    opts.append(("cpus-per-task", str(req.cpus_per_task)))
    if req.gpus_per_node:
        opts.append(("gpus-per-node", str(req.gpus_per_node)))
    if req.mem_gb:
        opts.append(("mem", f"{req.mem_gb}G"))
    opts.append(("time", str(req.time_min)))
    if req.signal_grace_s is not None:
        opts.append(("signal", f"B:USR2@{req.signal_grace_s}"))  # to the batch shell, which drains the workers
    if req.requeue is not None:
        opts.append(("requeue" if req.requeue else "no-requeue", None))
    return opts + list(req.placement) + list(req.extra)


def sbatch_lines(opts: list[Option]) -> str:
    for key, value in opts:
        one_line("#SBATCH option", f"--{key}" if value is None else f"--{key}={value}")
    return "\n".join(f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={shlex.quote(v)}" for k, v in opts)


def one_line(what: str, value: str) -> str:
    """``value``, refused if it holds a control character: a line break would end its script line."""
    if CONTROL.search(value):
        raise ConfigError(f"{what}: {value!r} holds a control character (newline, tab, NUL...), which would break "
                          f"the batch script's line; remove it")
    return value


def submitit_parameters(req: SlurmRequest) -> dict[str, Any]:
    """The request as ``submitit.AutoExecutor.update_parameters`` arguments."""
    params: dict[str, Any] = {"name": req.job_name, "nodes": req.nodes, "tasks_per_node": req.tasks_per_node,
                              "cpus_per_task": req.cpus_per_task, "timeout_min": req.time_min}
    if req.gpus_per_node:
        params["gpus_per_node"] = req.gpus_per_node
    if req.mem_gb:
        params["mem_gb"] = req.mem_gb
    if req.array_tasks is not None:
        params["slurm_array_parallelism"] = req.array_parallelism or req.array_tasks
    if req.signal_grace_s is not None:  # submitit signals the tasks themselves: each worker drains
        params["slurm_signal_delay_s"] = req.signal_grace_s
    additional: dict[str, Any] = {}
    if req.requeue is not None:
        additional["requeue" if req.requeue else "no-requeue"] = True
    for key, value in (*req.placement, *req.extra):
        additional[key] = True if value is None else value
    params["slurm_additional_parameters"] = additional
    return params


def check_request(req: SlurmRequest, cfg: Config, lay: Layout) -> None:
    """``sbatch --test-only`` of the worker job: refuse impossible requests now, not pending forever."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "check.sbatch"
        script.write_text(f"#!/bin/bash\n{sbatch_lines(sbatch_options(req, f'{tmp}/%j.out'))}\ntrue\n")
        try:
            run_slurm(["sbatch", "--test-only", str(script)])
        except SubmitError as exc:
            s = cfg.slurm
            raise SubmitError(
                f"{exc}\nNothing was submitted. Asked: {lay.workers} worker(s) = slurm.nodes {s.nodes} x "
                f"{lay.replicas_per_node} per node / {lay.nodes_per_replica} node(s) per replica, gpus_per_node {s.gpus_per_node}, cpus_per_task "
                f"{s.cpus_per_task}, partition {s.partition or '(default)'}. Fix: compare with "
                f"`sinfo -o '%P %D %c %m %G'` and lower slurm.nodes / slurm.gpus_per_node / "
                f"slurm.cpus_per_task, or set slurm.partition to an existing partition."
            ) from None


def run_slurm(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a SLURM command; its refusal becomes a SubmitError with SLURM's words."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as exc:
        raise SubmitError(f"{cmd[0]} not found: run shardinfer submit on a SLURM login node "
                          f"(or use `shardinfer run` for a local run)") from exc
    if proc.returncode != 0:
        raise SubmitError(f"{' '.join(cmd[:2])} refused the job: {(proc.stderr or proc.stdout).strip()}")
    return proc


def sbatch(script: Path, *args: str) -> str:
    """Submit a script; returns the job id."""
    return run_slurm(["sbatch", "--parsable", *args, str(script)]).stdout.strip().split(";")[0]


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


def requeue_after_drain(run_dir: RunDir, job_id: str, restart: int, rank: int, tasks_in_job: int) -> bool:
    """A worker drained by USR2 marks itself; the last task of the job to do so requeues it."""
    marks = run_dir.slurm / f"drained-{job_id}-{restart}"
    marks.mkdir(parents=True, exist_ok=True)
    (marks / f"rank-{rank:05d}").touch()
    if len(list(marks.iterdir())) < tasks_in_job:
        return False
    log.warning("every task of job %s drained: requeueing it", job_id)
    subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    return True


class SlurmHandle(RunHandle):
    """Jobs submitted to SLURM: the worker job(s), then the reduce job (the last id)."""

    def __init__(self, run_dir: RunDir, record: LaunchRecord, reduce_handle: Any = None):
        super().__init__(run_dir, record)
        self._reduce_handle = reduce_handle  # submitit's job of the reduce step

    @property
    def worker_job(self) -> str:
        return self.job_ids[0]

    @property
    def reduce_job(self) -> str:
        return self.job_ids[-1]

    def states(self) -> dict[str, str]:
        return job_states(self.job_ids)

    def done(self) -> bool:
        return not any(s in ACTIVE_STATES for s in self.states().values())

    def result(self, timeout_s: float | None = None) -> dict[str, Any]:
        if self._reduce_handle is not None:
            return dict(self._reduce_handle.result())
        states = self.wait(timeout_s)
        report = self.run_dir.report_json
        if (report.is_file() and report.stat().st_mtime >= self.record.submitted_at
                and states[self.reduce_job] in ("COMPLETED", "UNKNOWN")):
            return dict(read_json(report))
        raise RunError(f"the run did not finish: jobs {states}. Worker logs: {self.run_dir.logs}, "
                       f"job output: {self.run_dir.slurm}. `shardinfer status {self.run_dir.path}` "
                       f"shows what is done; `shardinfer resume {self.run_dir.path}` finishes the rest.")


class SlurmLauncher(Launcher):
    """A launcher that submits to SLURM: the worker count comes from the layout, the request is
    checked with ``sbatch --test-only`` before anything is planned."""

    on_cluster = True

    def workers(self, cfg: Config) -> int:
        return layout(cfg).workers

    def check(self, cfg: Config) -> None:
        lay = layout(cfg)
        check_request(worker_request(cfg, lay), cfg, lay)

    def active(self, record: LaunchRecord) -> bool:
        if not record.job_ids:
            return False
        try:
            states = job_states(record.job_ids)
        except (OSError, subprocess.SubprocessError):
            return False
        return any(s in ACTIVE_STATES for s in states.values())

    def states(self, record: LaunchRecord) -> dict[str, str]:
        try:
            return job_states(record.job_ids) if record.job_ids else {}
        except (OSError, subprocess.SubprocessError):
            return {}


def submitted(run_dir: RunDir, name: str, launch: int, job_ids: list[str], started_at: float,
              reduce_handle: Any = None) -> SlurmHandle:
    """The handle of a launch whose jobs (workers first, reduce last) were submitted at ``started_at``."""
    log.info("submitted %s launch %d: jobs %s", name, launch, ", ".join(job_ids))
    return SlurmHandle(run_dir, LaunchRecord(launch=launch, launcher=name, job_ids=job_ids,
                                             submitted_at=started_at), reduce_handle)
