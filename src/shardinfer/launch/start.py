"""The one way a run is launched, whatever the launcher: ``run``, ``submit``, ``resume`` and the
Python API all come here.

1. the launcher checks what would fail at launch (nothing is planned or submitted if it fails);
2. the run is planned, or reopened when its results settings, model and input are unchanged;
3. no other process may be launching the run (the launch lock) and no earlier launch of it may
   still be running;
4. the launch begins: committed parts checked, stale claims released, failed rows set aside when
   asked, the launch numbered and its settings saved;
5. the launcher starts the workers and the launch is recorded in ``jobs.json``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from shardinfer.config import Config
from shardinfer.errors import ConfigError, RunError
from shardinfer.launch.base import LaunchRecord, RunHandle
from shardinfer.launch.lock import launch_lock
from shardinfer.launch.registry import get_launcher, launcher_of
from shardinfer.ledger.claims import Ledger
from shardinfer.ledger.rundir import RunDir, read_json, write_json_atomic
from shardinfer.ledger.runstate import begin_launch, load_run, prepare_run, run_dir_for
from shardinfer.planning.plan import Plan
from shardinfer.planning.preflight import describe as describe_checks
from shardinfer.planning.preflight import preflight, require
from shardinfer.planning.validate import load_checked, validate

log = logging.getLogger(__name__)


def launch(config: Config | str | Path, *, launcher: str = "local", overrides: list[str] | None = None,
           on_cluster: bool | None = None, retry_failed: bool = False) -> RunHandle:
    """Plan (or reopen) the run of ``config`` and start a launch of it with ``launcher``."""
    cfg = validate(config) if isinstance(config, Config) else load_checked(config, overrides)
    chosen = get_launcher(launcher, on_cluster=on_cluster)
    require(preflight(cfg))
    chosen.check(cfg)
    with launch_lock(run_dir_for(cfg)):  # local workers inherit it: held while they run
        run_dir, plan, number = open_launch(cfg, chosen.workers(cfg), retry_failed=retry_failed)
        handle = chosen.start(cfg, run_dir, plan, number)
        record_launch(run_dir, handle.record)
    return handle


def open_launch(cfg: Config, workers: int, *, retry_failed: bool = False) -> tuple[RunDir, Plan, int]:
    """Plan or reopen the run, make sure no other launch of it runs, and begin a new launch."""
    refuse_if_active(run_dir_for(cfg))  # before a run that committed nothing may be planned anew
    run_dir, plan = prepare_run(cfg, workers)
    number = begin_launch(run_dir, plan, cfg)
    if retry_failed:
        log.info("rows to retry in units %s", set_aside_failed(run_dir))
    return run_dir, plan, number


def resume(run_dir: RunDir, *, retry_failed: bool = False, launcher: str | None = None) -> RunHandle:
    """Launch again what is not done, with the run's own config and (by default) its last launcher."""
    if not run_dir.run_json.is_file():
        raise RunError(f"{run_dir.path} is not a run directory (no run.json). Start one with `shardinfer run`.")
    cfg, _ = load_run(run_dir)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, directory=str(run_dir.path)))
    return launch(cfg, launcher=launcher or last_launcher(run_dir), retry_failed=retry_failed)


def dry_run(cfg: Config, launcher: str, *, on_cluster: bool | None = None) -> str:
    """What a launch would start or submit; plans and submits nothing."""
    chosen = get_launcher(launcher, on_cluster=on_cluster)
    checks = preflight(cfg)
    require(checks)
    return describe_checks(checks) + "\n" + chosen.preview(cfg, run_dir_for(cfg))


def set_aside_failed(run_dir: RunDir) -> list[int]:
    """Un-commit the units holding failed rows; their next workers redo only those rows."""
    ledger = Ledger(run_dir)
    units = [unit for unit, record in sorted(ledger.done_units().items()) if record.get("failed", 0) > 0]
    for unit in units:
        ledger.set_aside_for_retry(unit)
    return units


def launch_records(run_dir: RunDir) -> list[LaunchRecord]:
    if not run_dir.jobs_json.is_file():
        return []
    return [LaunchRecord.from_json(r) for r in read_json(run_dir.jobs_json)]


def record_launch(run_dir: RunDir, record: LaunchRecord) -> None:
    records = read_json(run_dir.jobs_json) if run_dir.jobs_json.is_file() else []
    write_json_atomic(run_dir.jobs_json, [*records, record.to_json()])


def last_launcher(run_dir: RunDir) -> str:
    """The name of the run's last launcher (now: a record of an earlier version may name it otherwise)."""
    records = launch_records(run_dir)
    return launcher_of(records[-1]).name if records else "local"


def refuse_if_active(run_dir: RunDir) -> None:
    """Two launches of one run at once would release each other's claims: refuse the second."""
    records = launch_records(run_dir)
    if not records:
        return
    last = records[-1]
    try:
        launcher = launcher_of(last)
    except ConfigError:  # a plugin launcher that is not installed any more
        return
    if launcher.active(last):
        where = f"jobs {', '.join(last.job_ids)}" if last.job_ids else f"process {last.pid} on {last.host}"
        raise RunError(f"{run_dir.path} is still being run by launch {last.launch} ({last.launcher}, {where}). "
                       f"Wait for it (`shardinfer status {run_dir.path}`) or stop it before launching again.")
