"""submitit launcher: the same workers and reduce step, submitted from Python through submitit.

The jobs ask for the same resources as the sbatch launcher's (one :class:`SlurmRequest` mapping).
submitit signals the tasks themselves ``slurm.signal_grace_s`` before the time limit: each worker
drains (commits its units and stops), and the last task of the job to drain requeues it when
``slurm.requeue`` is on, so the job continues by itself as an sbatch job does.
"""

from __future__ import annotations

import shlex
import time
from typing import Any

from shardinfer.config import Config
from shardinfer.errors import RunError, missing_dependency
from shardinfer.launch.base import RunHandle
from shardinfer.launch.env import FROM_SLURM, RankEnv
from shardinfer.launch.layout import layout, node_map
from shardinfer.launch.slurm import (
    SlurmLauncher,
    SlurmRequest,
    reduce_request,
    requeue_after_drain,
    submitit_parameters,
    submitted,
    worker_request,
)
from shardinfer.ledger.rundir import RunDir, restrict_umask
from shardinfer.planning.plan import Plan
from shardinfer.reduce.merge import reduce_run
from shardinfer.telemetry.logs import setup_logging
from shardinfer.telemetry.metrics import WorkerMetrics
from shardinfer.worker.entry import WorkerHooks, WorkerStart, start_worker


def run_worker_task(run_dir: str, launch: int, expect_world: int, gpus_per_replica: int, requeue: bool,
                    nodes_per_replica: int = 1) -> int:
    """Body of each submitit task: one worker (or a follower node of one), its rank and GPUs from the
    SLURM environment."""
    code = start_worker(WorkerStart(run_dir=run_dir, launcher=SubmititLauncher.name, launch=launch,
                                    expect_world=expect_world, gpus_per_replica=gpus_per_replica,
                                    nodes_per_replica=nodes_per_replica),
                        RequeueAfterDrain(requeue))
    if code:
        raise RunError(f"the worker exited with code {code}; its error is in {run_dir}/logs")
    return 0


class RequeueAfterDrain(WorkerHooks):
    """submitit signals the tasks themselves: a worker drained by USR2 marks itself, and the last
    task of the job to drain requeues it (``slurm.requeue``), as the sbatch job's shell does."""

    def __init__(self, requeue: bool):
        self.requeue = requeue

    def finished(self, run_dir: RunDir, rank_env: RankEnv, metrics: WorkerMetrics) -> int:
        if metrics.drained_by == "SIGUSR2" and self.requeue and rank_env.slurm_job_id:
            requeue_after_drain(run_dir, rank_env.slurm_job_id, rank_env.restart, rank_env.rank,
                                rank_env.tasks_in_job)
        return 0


def reduce_task(run_dir: str) -> dict[str, Any]:
    setup_logging()
    restrict_umask()
    return reduce_run(RunDir(run_dir))


def executor(cfg: Config, run_dir: RunDir, req: SlurmRequest, **more: Any) -> Any:
    """A submitit executor for one request; ``slurm.setup`` and ``run.env`` run before the task."""
    try:
        import submitit
    except ImportError as exc:
        raise missing_dependency("submitit", "submitit") from exc
    params = submitit_parameters(req)
    params["slurm_additional_parameters"].update(more.pop("slurm_additional_parameters", {}))
    setup = [*cfg.slurm.setup, *[f"export {k}={shlex.quote(v)}" for k, v in cfg.run.env.items()]]
    python = {"slurm_python": shlex.quote(cfg.slurm.python)} if cfg.slurm.python else {}
    ex = submitit.AutoExecutor(folder=str(run_dir.path.resolve() / "submitit" / "%j"), **python)
    ex.update_parameters(slurm_setup=setup, **params, **more)
    return ex


class SubmititLauncher(SlurmLauncher):
    name = "submitit"
    description = "submitit from Python: the same worker and reduce jobs as sbatch"
    ranks = FROM_SLURM  # its tasks are SLURM tasks, or the tasks of a job array, as sbatch's are

    def preview(self, cfg: Config, run_dir: RunDir) -> str:
        lay = layout(cfg)
        worker = submitit_parameters(worker_request(cfg, lay))
        reduce = submitit_parameters(reduce_request(cfg))
        nodes = "".join(f"{line}\n" for line in node_map(lay))
        return (f"# submitit executor parameters of the worker job ({lay.workers} workers):\n{nodes}{worker}\n"
                f"# and of the reduce job (after the worker job, afterany):\n{reduce}")

    def start(self, cfg: Config, run_dir: RunDir, plan: Plan, launch: int) -> RunHandle:
        started = time.time()
        lay = layout(cfg)
        path = str(run_dir.path.resolve())
        args = (path, launch, lay.workers, lay.gpus_per_task, cfg.slurm.requeue, lay.nodes_per_replica)
        workers = executor(cfg, run_dir, worker_request(cfg, lay),
                           slurm_srun_args=["--kill-on-bad-exit=0"])
        if lay.shape == "array":
            jobs = workers.map_array(run_worker_task, *[[a] * lay.workers for a in args])
            worker_job = jobs[0].job_id.split("_")[0]
        else:
            worker_job = workers.submit(run_worker_task, *args).job_id
        reducer = executor(cfg, run_dir, reduce_request(cfg), slurm_additional_parameters={
            "dependency": f"afterany:{worker_job}", "kill-on-invalid-dep": "yes"})
        reduce_job = reducer.submit(reduce_task, path)
        return submitted(run_dir, self.name, launch, [worker_job, reduce_job.job_id], started, reduce_job)


LAUNCHERS = [SubmititLauncher()]
