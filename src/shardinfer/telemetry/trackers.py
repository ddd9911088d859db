"""Optional pushing of each worker's metrics to an experiment tracker: MLflow or Weights & Biases.

Turned on with ``run.report_to: [mlflow]`` (or ``wandb``); the tracker is configured the tracker's
own way (``MLFLOW_TRACKING_URI``, ``WANDB_PROJECT``, ``WANDB_MODE``, credentials in their usual
places, never in the run directory). Each worker is one tracker run named ``rank-R``, grouped under
the shardinfer run's name, and logs at every metrics rewrite: units, rows, tokens and tokens/s over
the last minutes. A tracker that fails while the run runs is logged and dropped: monitoring never
stops inference.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from shardinfer.config import Config
from shardinfer.errors import missing_dependency
from shardinfer.telemetry.live import worker_values
from shardinfer.telemetry.metrics import WorkerMetrics

log = logging.getLogger(__name__)

TRACKERS = {"mlflow": ("mlflow", "monitor"), "wandb": ("wandb", "monitor")}  # name: (module, extra)


class Sink(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check_trackers(cfg: Config) -> None:
    """Trackers turned on must be installed (checked before the run starts)."""
    for name in cfg.run.report_to:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise missing_dependency(module, extra, f"run.report_to lists {name}")


_TRACKED = ("units", "rows", "prompt_tokens", "output_tokens", "tokens_per_s")


class Monitor:
    """The trackers of one worker; ``push`` after every metrics rewrite."""

    def __init__(self, cfg: Config, metrics: WorkerMetrics):
        self.sinks: list[Sink] = []
        self.step = 0
        for name in cfg.run.report_to:
            try:
                self.sinks.append(_OPEN[name](cfg, metrics))
            except Exception as exc:  # noqa: BLE001 - a tracker that cannot start is reported, the run goes on
                log.warning("run.report_to %s: could not start (%r); not reporting there", name, exc)

    def push(self, m: WorkerMetrics) -> None:
        values = {k: v for k, v in worker_values(m, time.time()).items() if k in _TRACKED}
        for sink in list(self.sinks):
            try:
                sink.log(values, self.step)
            except Exception as exc:  # noqa: BLE001 - see the module's docstring
                log.warning("a tracker failed (%r); not reporting there any more", exc)
                self.sinks.remove(sink)
        self.step += 1

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("closing a tracker failed: %r", exc)


class _Mlflow:
    def __init__(self, cfg: Config, m: WorkerMetrics):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(cfg.name)
        self.run = mlflow.start_run(run_name=f"rank-{m.rank}", tags={"shardinfer.launch": str(m.launch),
                                                                      "shardinfer.host": m.host})
        mlflow.log_params({"engine": cfg.model.engine, "model": cfg.model.path, "world": m.world, "rank": m.rank})

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step, run_id=self.run.info.run_id)

    def close(self) -> None:
        self.mlflow.end_run()


class _Wandb:
    def __init__(self, cfg: Config, m: WorkerMetrics):
        import wandb

        self.run: Any = wandb.init(project=cfg.name, group=cfg.name, name=f"rank-{m.rank}", job_type="worker",
                                   config={"engine": cfg.model.engine, "model": cfg.model.path, "world": m.world,
                                           "launch": m.launch}, reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


_OPEN: dict[str, Callable[[Config, WorkerMetrics], Sink]] = {"mlflow": _Mlflow, "wandb": _Wandb}
