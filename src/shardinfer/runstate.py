"""Creating a run directory (config + plan) and loading it back in workers and the reducer."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from shardinfer import __version__
from shardinfer.config import Config, config_from_dict, config_to_dict
from shardinfer.errors import RunError
from shardinfer.fingerprint import differences, fingerprint
from shardinfer.plan import Plan, make_plan
from shardinfer.rundir import RunDir, read_json, write_json_atomic

log = logging.getLogger(__name__)

# Settings that may change between launches of the same run without changing its results.
_VOLATILE = {("run", "directory"), ("run", "workers"), ("run", "env"), ("run", "log_interval_s"), ("run", "lease_timeout_s"),
             ("run", "max_attempts")}


def run_dir_for(cfg: Config) -> RunDir:
    """run.directory; by default runs/<name>, or runs/<name>-<config hash> when that holds another config."""
    if cfg.run.directory:
        return RunDir(cfg.run.directory)
    first = RunDir(Path("runs") / cfg.name)
    if not first.run_json.is_file() or not _changed_keys(first, cfg):
        return first
    other = RunDir(Path("runs") / f"{cfg.name}-{config_hash(cfg)}")
    log.info("%s holds a run of another config; this config runs in %s", first.path, other.path)
    return other


def config_hash(cfg: Config) -> str:
    stable = {k: v for k, v in config_to_dict(cfg).items()}
    stable["run"] = {k: v for k, v in stable["run"].items() if ("run", k) not in _VOLATILE}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:8]


def prepare_run(cfg: Config, workers: int) -> tuple[RunDir, Plan]:
    """Plan a new run, or reopen the run of the same config in the run directory."""
    run_dir = run_dir_for(cfg)
    if run_dir.run_json.is_file():
        _check_same_config(run_dir, cfg)
        plan = load_plan(run_dir)
        check_fingerprint(run_dir, cfg, plan)
        log.info("continuing the run in %s", run_dir.path)
        return run_dir, plan
    log.info("planning %s", run_dir.path)
    plan = make_plan(cfg, workers)
    run_dir.make()
    write_json_atomic(run_dir.plan_json, plan.to_json())
    write_json_atomic(run_dir.fingerprint_json, fingerprint(cfg, plan.files))
    write_json_atomic(run_dir.run_json, {"config": config_to_dict(cfg), "created_at": time.time(),
                                         "planned_workers": workers, "shardinfer": __version__,
                                         "launches": 0})
    return run_dir, plan


def next_launch(run_dir: RunDir) -> int:
    """Count a new launch of the run and return its number."""
    state = read_json(run_dir.run_json)
    state["launches"] = state.get("launches", 0) + 1
    write_json_atomic(run_dir.run_json, state)
    return state["launches"] - 1


def load_run(run_dir: RunDir) -> tuple[Config, Plan]:
    if not run_dir.run_json.is_file():
        raise RunError(f"{run_dir.path} is not a run directory (no run.json). Start one with `shardinfer run`.")
    return config_from_dict(read_json(run_dir.run_json)["config"]), load_plan(run_dir)


def check_fingerprint(run_dir: RunDir, cfg: Config, plan: Plan) -> None:
    """Refuse to continue a run whose model, engine, prompt, sampling or input changed since it began."""
    saved = read_json(run_dir.fingerprint_json)
    now_files = []
    for f in plan.files:
        path = Path(f["path"])
        stat = path.stat() if path.is_file() else None
        now_files.append({**f, "bytes": stat.st_size if stat else None, "mtime": stat.st_mtime if stat else None})
    changed = differences(saved, fingerprint(cfg, now_files))
    if changed:
        shown = "\n  ".join(changed[:20]) + ("\n  ..." if len(changed) > 20 else "")
        raise RunError(
            f"{run_dir.path} was started with another model, engine, prompt, sampling or input; resuming "
            f"would mix two runs. What changed:\n  {shown}\nRestore them, or start a new run explicitly: "
            f"shardinfer run CONFIG run.directory=NEW_DIR"
        )


def load_plan(run_dir: RunDir) -> Plan:
    return Plan.from_json(read_json(run_dir.plan_json))


def _changed_keys(run_dir: RunDir, cfg: Config) -> list[str]:
    saved = read_json(run_dir.run_json)["config"]
    return [key for key in _diff(saved, config_to_dict(cfg)) if tuple(key.split(".")[:2]) not in _VOLATILE]


def _check_same_config(run_dir: RunDir, cfg: Config) -> None:
    changed = _changed_keys(run_dir, cfg)
    if changed:
        raise RunError(
            f"{run_dir.path} holds a run of a different config ({', '.join(changed)} changed). "
            f"Set run.directory to a new directory for a new run, or remove {run_dir.path}."
        )


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [k for key in keys for k in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]
