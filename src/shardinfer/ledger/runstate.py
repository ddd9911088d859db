"""Creating a run directory (config, fingerprint, plan), reopening it, and beginning a launch of it.

Every launcher goes through the same two steps: :func:`prepare_run` plans a new run or reopens the
run of the same results settings, and :func:`begin_launch` checks the committed parts, releases the
claims of workers that are gone and numbers the launch. Settings that do not change results
(``run.*``, ``slurm.*``, see :func:`shardinfer.config.results_settings`) may differ between
launches; each launch saves its own in ``run.json``, where the workers read them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from shardinfer import __version__
from shardinfer.config import Config, config_from_dict, config_to_dict, results_settings
from shardinfer.errors import ConfigError, RunError
from shardinfer.inputs import storage
from shardinfer.ledger.claims import Ledger
from shardinfer.ledger.rundir import RunDir, read_json, write_json_atomic
from shardinfer.planning.fingerprint import differences, fingerprint
from shardinfer.planning.plan import Plan, make_plan
from shardinfer.planning.validate import checked_from_dict

log = logging.getLogger(__name__)



def run_dir_for(cfg: Config) -> RunDir:
    """run.directory; by default runs/<name>, or runs/<name>-<hash> when that holds a run whose
    results settings differ."""
    if cfg.run.directory:
        return RunDir(cfg.run.directory)
    first = RunDir(Path("runs") / cfg.name)
    if not first.run_json.is_file() or not changed_settings(first, cfg) or not has_committed(first):
        return first
    other = RunDir(Path("runs") / f"{cfg.name}-{config_hash(cfg)}")
    log.info("%s holds a run of another config; this config runs in %s", first.path, other.path)
    return other


def config_hash(cfg: Config) -> str:
    text = json.dumps(results_settings(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def prepare_run(cfg: Config, workers: int) -> tuple[RunDir, Plan]:
    """Plan a new run, or reopen the run of the same results settings in the run directory. A run
    directory in which no unit was committed is planned anew when the config changed."""
    run_dir = run_dir_for(cfg)
    if run_dir.run_json.is_file():
        plan = load_plan(run_dir)
        try:
            check_fingerprint(run_dir, cfg, plan)
        except ConfigError:
            if has_committed(run_dir):
                raise
            log.warning("%s holds a run of another config in which no unit was committed: planning it anew",
                        run_dir.path)
            clear_uncommitted(run_dir)
        else:
            log.info("continuing the run in %s", run_dir.path)
            return run_dir, plan
    log.info("planning %s", run_dir.path)
    existed = run_dir.path.exists() and any(not run_dir.is_lock(p) for p in run_dir.path.iterdir())
    try:
        plan = make_plan(cfg, workers, index_dir=run_dir.index)
    except BaseException:
        if not existed:  # a plan that fails leaves nothing behind (gzip indexes are written early)
            shutil.rmtree(run_dir.path, ignore_errors=True)
        raise
    run_dir.make(units=len(plan.units))
    write_json_atomic(run_dir.plan_json, plan.to_json())
    write_json_atomic(run_dir.fingerprint_json, fingerprint(cfg, plan.files))
    write_json_atomic(run_dir.run_json, {"config": config_to_dict(cfg), "created_at": time.time(),
                                         "planned_workers": workers, "shardinfer": __version__,
                                         "layout": run_dir.layout, "launches": 0})
    return run_dir, plan


def has_committed(run_dir: RunDir) -> bool:
    return bool(Ledger(run_dir).done_set())


def clear_uncommitted(run_dir: RunDir) -> None:
    """Remove the state of a run that committed nothing (the caller checked), so it can be planned
    again: everything but the logs and the cluster jobs' output, which say what went wrong."""
    kept = {run_dir.logs, run_dir.slurm}
    for path in run_dir.path.iterdir():
        if path in kept or run_dir.is_lock(path):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def begin_launch(run_dir: RunDir, plan: Plan, cfg: Config) -> int:
    """Start a launch: redo units whose part is missing or corrupt, release the claims of workers
    that are gone, save this launch's settings, and return the launch number. Call it only when
    no worker of an earlier launch is still running (the launchers check)."""
    ledger = Ledger(run_dir)
    ledger.verify_committed({u.unit: u.rows for u in plan.units})
    released = ledger.release_unfinished_claims()
    if released:
        log.info("units %s were claimed by workers that did not finish them; they will be redone", released)
    state = read_json(run_dir.run_json)
    state["launches"] = state.get("launches", 0) + 1
    state["config"] = config_to_dict(cfg)  # results settings unchanged (checked); launch settings are this launch's
    write_json_atomic(run_dir.run_json, state)
    return state["launches"] - 1


def load_run(run_dir: RunDir) -> tuple[Config, Plan]:
    if not run_dir.run_json.is_file():
        raise RunError(f"{run_dir.path} is not a run directory (no run.json). Start one with `shardinfer run`.")
    return checked_from_dict(read_json(run_dir.run_json)["config"]), load_plan(run_dir)


def load_plan(run_dir: RunDir) -> Plan:
    try:
        data = read_json(run_dir.plan_json)
    except ValueError as exc:  # truncated or garbled: the typed loader says what else can be wrong
        raise RunError(f"{run_dir.plan_json} is not JSON ({exc}): the run's plan is damaged. Restore the file, or "
                       f"start the run anew in another directory (run.directory=NEW_DIR)") from None
    return Plan.from_json(data)


def changed_settings(run_dir: RunDir, cfg: Config) -> list[str]:
    """Dotted keys of the results settings that differ from the run's. The run's config is read back
    through the config tree, so a setting added since the run began counts at its default."""
    saved = config_from_dict(read_json(run_dir.run_json)["config"])
    return _diff_keys(results_settings(saved), results_settings(cfg))


def check_fingerprint(run_dir: RunDir, cfg: Config, plan: Plan) -> None:
    """Refuse to continue a run whose results settings, model, engine or input changed since it began
    (a config error: running again cannot help until the config, the input or run.directory changes)."""
    changed = changed_settings(run_dir, cfg)
    if changed:
        raise ConfigError(
            f"{run_dir.path} holds a run of a different config ({', '.join(changed)} changed). Set "
            f"run.directory to a new directory for a new run, restore those settings, or remove "
            f"{run_dir.path}. (Settings under run.* and slurm.* may change between launches of a run.)"
        )
    saved = {k: v for k, v in read_json(run_dir.fingerprint_json).items() if k != "config"}
    now = {k: v for k, v in fingerprint(cfg, _current_files(plan)).items() if k != "config"}
    changes = differences(saved, now)
    if changes:
        shown = "\n  ".join(changes[:20]) + ("\n  ..." if len(changes) > 20 else "")
        raise ConfigError(
            f"{run_dir.path} was started with another model, engine, prompt, sampling or input; resuming "
            f"would mix two runs. What changed:\n  {shown}\nRestore them, or start a new run explicitly: "
            f"shardinfer run CONFIG run.directory=NEW_DIR"
        )


def _current_files(plan: Plan) -> list[dict[str, Any]]:
    files = []
    for f in plan.files:
        try:
            now = storage.stat(f["path"])
        except (OSError, ConfigError):
            now = {"bytes": None, "mtime": None, "version": None}
        files.append({**f, **now})
    return files


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]
