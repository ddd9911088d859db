"""submitit launcher: the same workers and reduce step, submitted from Python through submitit."""

from __future__ import annotations

import shlex
from typing import Any

from shardinfer.config import Config
from shardinfer.errors import RunError, missing_dependency
from shardinfer.launch.layout import Layout
from shardinfer.rundir import RunDir


def run_worker_task(run_dir: str, launch: int, expect_world: int, gpus_per_replica: int) -> int:
    """Body of each submitit task: one worker (rank and GPUs come from the SLURM environment)."""
    from shardinfer.worker import main

    code = main([run_dir, "--launch", str(launch), "--expect-world", str(expect_world),
                 "--gpus-per-replica", str(gpus_per_replica)])
    if code != 0:
        raise RunError(f"worker exited with code {code}; see {run_dir}/logs")
    return code


def reduce_task(run_dir: str) -> dict[str, Any]:
    from shardinfer.logs import setup_logging
    from shardinfer.reduce import reduce_run

    setup_logging()
    return reduce_run(RunDir(run_dir))


def _executor(cfg: Config, run_dir: RunDir, **params: Any) -> Any:
    try:
        import submitit
    except ImportError as exc:
        raise missing_dependency("submitit", "submitit") from exc
    s = cfg.slurm
    executor = submitit.AutoExecutor(folder=str(run_dir.path.resolve() / "submitit" / "%j"))
    common: dict[str, Any] = {"slurm_setup": [*s.setup, *[f"export {k}={shlex.quote(v)}" for k, v in cfg.run.env.items()]]}
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            common[f"slurm_{key}"] = getattr(s, key)
    executor.update_parameters(**common, **params)
    return executor


def submit_submitit(cfg: Config, lay: Layout, run_dir: RunDir, launch: int) -> Any:
    from shardinfer.launch.submit import SubmittedRun

    s = cfg.slurm
    path = str(run_dir.path.resolve())
    resources: dict[str, Any] = {"timeout_min": s.time_min, "cpus_per_task": s.cpus_per_task,
                                 "name": f"shardinfer-{cfg.name}"}
    if s.mem_gb:
        resources["mem_gb"] = s.mem_gb
    args = (path, launch, lay.workers, lay.gpus_per_replica)
    if lay.shape == "array":
        executor = _executor(cfg, run_dir, **resources, nodes=1, tasks_per_node=1,
                             gpus_per_node=lay.gpus_per_replica or None,
                             slurm_array_parallelism=s.array_parallelism or lay.workers)
        jobs = executor.map_array(run_worker_task, *[[a] * lay.workers for a in args])
        worker_job = jobs[0].job_id.split("_")[0]
    else:
        executor = _executor(cfg, run_dir, **resources, nodes=lay.nodes, tasks_per_node=lay.replicas_per_node,
                             gpus_per_node=lay.gpus_per_node or None,
                             slurm_srun_args=["--kill-on-bad-exit=0"])
        worker_job = executor.submit(run_worker_task, *args).job_id
    reducer = _executor(cfg, run_dir, timeout_min=s.reduce_time_min, cpus_per_task=s.reduce_cpus, nodes=1,
                        tasks_per_node=1, name=f"shardinfer-{cfg.name}-reduce",
                        slurm_additional_parameters={"dependency": f"afterany:{worker_job}",
                                                     "kill_on_invalid_dep": "yes"})
    reduce_job = reducer.submit(reduce_task, path)
    return SubmittedRun(run_dir, "submitit", launch, worker_job, reduce_job.job_id, _reduce_handle=reduce_job)
