"""``shardinfer submit`` and ``shardinfer.submit()``: plan the run, then hand it to SLURM.

Both launchers (sbatch scripts, submitit) start the same worker on the same run directory and end
with a reduce job that depends on the worker job with ``afterany`` (so a failed worker still gets
its finished units merged) and ``--kill-on-invalid-dep=yes``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardinfer.config import Config, load_config
from shardinfer.errors import ConfigError, RunError
from shardinfer.launch import sbatch as sb
from shardinfer.launch.layout import Layout, layout
from shardinfer.ledger import Ledger
from shardinfer.model_info import check_model_path
from shardinfer.rundir import RunDir, read_json, write_json_atomic
from shardinfer.runstate import next_launch, prepare_run, run_dir_for

log = logging.getLogger(__name__)

LAUNCHERS = ("sbatch", "submitit", "mpi")


@dataclass
class SubmittedRun:
    """A run handed to SLURM: job ids, their states, and the report once the reduce job is done."""

    run_dir: RunDir
    launcher: str
    launch: int
    worker_job: str
    reduce_job: str
    submitted_at: float = field(default_factory=time.time)
    _reduce_handle: Any = None  # submitit job of the reduce step

    @property
    def job_ids(self) -> list[str]:
        return [self.worker_job, self.reduce_job]

    def states(self) -> dict[str, str]:
        return sb.job_states(self.job_ids)

    def wait(self, timeout_s: float | None = None, poll_s: float = 2.0) -> dict[str, str]:
        """Block until both jobs have left the queue; returns their final states."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            states = self.states()
            if not any(s in sb.ACTIVE_STATES for s in states.values()):
                return states
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"jobs {states} still active after {timeout_s} s")
            time.sleep(poll_s)

    def result(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The run's report once the reduce job has finished; RunError if it did not."""
        if self._reduce_handle is not None:
            return self._reduce_handle.result()
        states = self.wait(timeout_s)
        report = self.run_dir.report_json
        if report.is_file() and report.stat().st_mtime >= self.submitted_at and states[self.reduce_job] in (
                "COMPLETED", "UNKNOWN"):
            return read_json(report)
        raise RunError(f"the run did not finish: jobs {states}. Worker logs: {self.run_dir.logs}, "
                       f"job output: {self.run_dir.path / 'slurm'}. `shardinfer status {self.run_dir.path}` "
                       f"shows what is done; submit the same config again to finish the rest.")


def submit(config: Config | str | Path, *, launcher: str = "sbatch", overrides: list[str] | None = None
           ) -> SubmittedRun:
    """Plan the run and submit its worker and reduce jobs; returns a handle (``.result()`` → report)."""
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    lay = layout(cfg)
    check_model_path(cfg.model)
    _check_request(cfg, lay)
    run_dir, _ = prepare_run(cfg, lay.workers)
    _refuse_if_active(run_dir)
    Ledger(run_dir).release_unfinished_claims()
    launch = next_launch(run_dir)
    if launcher == "submitit":
        from shardinfer.launch.submitit_launcher import submit_submitit

        submitted = submit_submitit(cfg, lay, run_dir, launch)
    elif launcher == "mpi":
        submitted = _submit_mpi(cfg, lay, run_dir, launch)
    else:
        submitted = _submit_sbatch(cfg, lay, run_dir, launch)
    _record(submitted)
    return submitted


def dry_run(config: Config, launcher: str = "sbatch") -> str:
    """The scripts that submit would save and submit, without planning or submitting anything."""
    lay = layout(config)
    run_path = str(run_dir_for(config).path.resolve())
    scripts = sb.render_scripts(config, lay, run_dir=run_path, launch=0, python=config.slurm.python or sb.default_python())
    note = ("" if launcher == "sbatch" else
            "# launcher submitit: submitit writes its own scripts with the same resources as these\n")
    return (f"{note}# ---- worker job ({lay.workers} workers) ----\n{scripts.worker}\n"
            f"# ---- reduce job: sbatch --dependency=afterany:<worker job> --kill-on-invalid-dep=yes ----\n"
            f"{scripts.reduce}")


def _submit_sbatch(cfg: Config, lay: Layout, run_dir: RunDir, launch: int) -> SubmittedRun:
    python = cfg.slurm.python or sb.default_python()
    scripts = sb.render_scripts(cfg, lay, run_dir=str(run_dir.path.resolve()), launch=launch, python=python)
    worker = sb.write_script(run_dir.slurm / f"launch-{launch:03d}-worker.sbatch", scripts.worker)
    reduce = sb.write_script(run_dir.slurm / f"launch-{launch:03d}-reduce.sbatch", scripts.reduce)
    worker_job = sb.sbatch(worker)
    reduce_job = sb.sbatch(reduce, f"--dependency=afterany:{worker_job}", "--kill-on-invalid-dep=yes")
    log.info("submitted worker job %s (%d workers, %s) and reduce job %s", worker_job, lay.workers, lay.shape,
             reduce_job)
    return SubmittedRun(run_dir, "sbatch", launch, worker_job, reduce_job)


def _submit_mpi(cfg: Config, lay: Layout, run_dir: RunDir, launch: int) -> SubmittedRun:
    """One job: its MPI ranks claim units and rank 0 reduces at the end, so no reduce job."""
    python = cfg.slurm.python or sb.default_python()
    scripts = sb.render_scripts(cfg, lay, run_dir=str(run_dir.path.resolve()), launch=launch, python=python,
                                mpi=True)
    worker = sb.write_script(run_dir.slurm / f"launch-{launch:03d}-mpi.sbatch", scripts.worker)
    job = sb.sbatch(worker)
    log.info("submitted MPI job %s (%d ranks); rank 0 reduces at the end", job, lay.workers)
    return SubmittedRun(run_dir, "mpi", launch, job, job)


def _check_request(cfg: Config, lay: Layout) -> None:
    """Ask SLURM whether the worker job could ever run, before anything is planned or submitted."""
    run_path = str(run_dir_for(cfg).path.resolve())
    script = sb.render_scripts(cfg, lay, run_dir=run_path, launch=0, python=cfg.slurm.python or sb.default_python())
    with tempfile.TemporaryDirectory() as tmp:
        sb.check_request(sb.write_script(Path(tmp) / "worker.sbatch", script.worker), cfg, lay)


def _record(submitted: SubmittedRun) -> None:
    path = submitted.run_dir.jobs_json
    jobs = read_json(path) if path.is_file() else []
    jobs.append({"launch": submitted.launch, "launcher": submitted.launcher, "worker_job": submitted.worker_job,
                 "reduce_job": submitted.reduce_job, "submitted_at": submitted.submitted_at})
    write_json_atomic(path, jobs)


def recorded_jobs(run_dir: RunDir) -> list[dict[str, Any]]:
    return read_json(run_dir.jobs_json) if run_dir.jobs_json.is_file() else []


def _refuse_if_active(run_dir: RunDir) -> None:
    """Two launches of one run at once would redo each other's claimed units: refuse."""
    jobs = recorded_jobs(run_dir)
    if not jobs:
        return
    last = jobs[-1]
    try:
        states = sb.job_states([last["worker_job"], last["reduce_job"]])
    except (OSError, sb.SubmitError):
        return
    active = {j: s for j, s in states.items() if s in sb.ACTIVE_STATES}
    if active:
        raise RunError(f"{run_dir.path} still has active jobs {active}. Wait for them "
                       f"(`shardinfer status {run_dir.path}`) or scancel them before submitting again.")
