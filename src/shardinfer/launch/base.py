"""The launcher interface: where a run's workers run, behind one small set of methods.

A :class:`Launcher` says how many workers a run gets (the plan is cut for them), checks what would
fail at launch before anything is planned, shows what it would start (``--dry-run``), starts the
workers of one launch and returns a :class:`RunHandle`, and tells whether an earlier launch of it is
still running. Planning, checking committed parts, releasing stale claims and numbering the launch
are not a launcher's business: :mod:`shardinfer.launch.start` does them once for all launchers.
"""

from __future__ import annotations

import abc
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from shardinfer.config import Config
from shardinfer.launch.env import FROM_ARGUMENTS, RankSource
from shardinfer.ledger.rundir import RunDir
from shardinfer.planning.plan import Plan


@dataclass
class LaunchRecord:
    """One launch of a run, as kept in ``jobs.json``."""

    launch: int
    launcher: str
    job_ids: list[str] = field(default_factory=list)  # scheduler jobs: the worker job(s), then the reduce job
    submitted_at: float = field(default_factory=time.time)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)  # the launching process

    @property
    def worker_job(self) -> str | None:
        return self.job_ids[0] if self.job_ids else None

    @property
    def reduce_job(self) -> str | None:
        return self.job_ids[-1] if self.job_ids else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "worker_job": self.worker_job, "reduce_job": self.reduce_job}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LaunchRecord:
        jobs = data.get("job_ids") or list(dict.fromkeys(j for j in (data.get("worker_job"), data.get("reduce_job")) if j))
        return cls(launch=int(data["launch"]), launcher=str(data["launcher"]), job_ids=[str(j) for j in jobs],
                   submitted_at=float(data.get("submitted_at", 0.0)), host=str(data.get("host", "")),
                   pid=int(data.get("pid", 0)))


class RunHandle(abc.ABC):
    """A launched run. The same methods for every launcher; ``result()`` is the run's report."""

    def __init__(self, run_dir: RunDir, record: LaunchRecord):
        self.run_dir = run_dir
        self.record = record

    @property
    def launcher(self) -> str:
        return self.record.launcher

    @property
    def launch(self) -> int:
        return self.record.launch

    @property
    def job_ids(self) -> list[str]:
        return list(self.record.job_ids)

    @abc.abstractmethod
    def states(self) -> dict[str, str]:
        """State of each part of the launch (SLURM job states, or the local workers')."""

    @abc.abstractmethod
    def done(self) -> bool:
        """True once nothing of this launch runs any more."""

    @abc.abstractmethod
    def result(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait for the launch to end and return the run's report; RunError if it did not finish."""

    def wait(self, timeout_s: float | None = None, poll_s: float = 2.0) -> dict[str, str]:
        """Block until the launch has ended; returns the final states."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.done():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.launcher} launch {self.launch} still running after {timeout_s} s: "
                                   f"{self.states()}")
            time.sleep(poll_s)
        return self.states()


class Launcher(abc.ABC):
    name: str
    description: str
    on_cluster: bool  # submits to a scheduler (`shardinfer submit`) rather than running here (`run`)
    aliases: tuple[str, ...] = ()  # other names it answers to in its own command
    former_names: tuple[str, ...] = ()  # names of earlier versions: still answered to, with a deprecation line
    # How each of its workers finds its rank, world size, local rank, node and GPUs. A worker is
    # started with ``--launcher NAME`` (or SHARDINFER_LAUNCHER=NAME) and asks this launcher's source.
    ranks: RankSource = FROM_ARGUMENTS

    @abc.abstractmethod
    def workers(self, cfg: Config) -> int:
        """How many workers a launch of ``cfg`` starts: the plan of a new run is cut for them."""

    def check(self, cfg: Config) -> None:  # noqa: B027 - optional: most launchers check something
        """What would fail at launch, checked before anything is planned (raise ConfigError/RunError)."""

    @abc.abstractmethod
    def preview(self, cfg: Config, run_dir: RunDir) -> str:
        """What a launch would start or submit (``--dry-run``); starts nothing."""

    @abc.abstractmethod
    def start(self, cfg: Config, run_dir: RunDir, plan: Plan, launch: int) -> RunHandle:
        """Start the workers of a launch already begun (planned, checked, numbered)."""

    @abc.abstractmethod
    def active(self, record: LaunchRecord) -> bool:
        """Whether an earlier launch of this launcher may still have workers running."""

    def states(self, record: LaunchRecord) -> dict[str, str]:
        """States of an earlier launch (``shardinfer status``); {} when there is nothing to ask."""
        return {}
