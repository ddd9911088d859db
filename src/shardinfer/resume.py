"""``shardinfer resume RUN_DIR``: run only what is not done, with the run's own config and launcher."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from shardinfer.errors import ConfigError
from shardinfer.ledger import Ledger
from shardinfer.rundir import RunDir
from shardinfer.runstate import check_fingerprint, load_run

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "sbatch", "submitit", "mpi")


def resume(run_dir: RunDir, *, retry_failed: bool = False, launcher: str | None = None) -> Any:
    """Local: returns the report. sbatch/submitit: returns the submitted run's handle."""
    cfg, plan = load_run(run_dir)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, directory=str(run_dir.path)))
    check_fingerprint(run_dir, cfg, plan)
    Ledger(run_dir).verify_committed({u.unit: u.rows for u in plan.units})
    if retry_failed:
        log.info("rows to retry in units %s", mark_failed_for_retry(run_dir))
    launcher = launcher or last_launcher(run_dir)
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    if launcher == "local":
        from shardinfer.launch.local import execute_local

        return execute_local(cfg, run_dir, plan)
    from shardinfer.launch.submit import submit

    return submit(cfg, launcher=launcher)


def last_launcher(run_dir: RunDir) -> str:
    from shardinfer.launch.submit import recorded_jobs

    jobs = recorded_jobs(run_dir)
    return jobs[-1]["launcher"] if jobs else "local"


def mark_failed_for_retry(run_dir: RunDir) -> list[int]:
    """Set aside the parts of committed units that hold failed rows; their workers redo only those rows."""
    ledger = Ledger(run_dir)
    units = []
    for unit, record in sorted(ledger.done_units().items()):
        if record.get("failed", 0) > 0:
            os.replace(run_dir.part(unit), run_dir.retry_source(unit))
            run_dir.done_record(unit).unlink(missing_ok=True)
            run_dir.claim(unit).unlink(missing_ok=True)
            units.append(unit)
    return units
