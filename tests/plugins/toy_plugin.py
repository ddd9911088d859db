"""A toy engine and a toy launcher, as a newcomer adds them: one module, no file of shardinfer touched.

Load it with ``SHARDINFER_PLUGINS=toy_plugin`` and this folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from shardinfer.config import Config
from shardinfer.engines import BatchQueue, Completion, EngineSpec, register_engine
from shardinfer.launch.base import Launcher, LaunchRecord, RunHandle
from shardinfer.launch.registry import register_launcher
from shardinfer.ledger.rundir import RunDir
from shardinfer.planning.plan import Plan
from shardinfer.reduce.merge import reduce_run


class EchoEngine(BatchQueue):
    """Answers each prompt with its last ``max_tokens`` tokens, reversed (``model.engine_args:
    {reverse: false}``: in order)."""

    name = "echo"

    def __init__(self, cfg: Config, max_model_len: int):
        super().__init__(attempts=cfg.run.max_attempts)
        self.cfg = cfg
        self.reverse = bool(cfg.model.engine_args.get("reverse", True))
        self.tokenizer: Any = None

    def load(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model.tokenizer or self.cfg.model.path)

    def generate(self, prompts: list[Any]) -> list[Completion]:
        out = []
        for prompt in prompts:
            tokens = prompt.token_ids[-self.cfg.sampling.max_tokens:]
            tokens = list(reversed(tokens)) if self.reverse else list(tokens)
            out.append(Completion(tokens, self.tokenizer.decode(tokens), "length"))
        return out

    def versions(self) -> dict[str, str]:
        return {"echo": "1.0"}


register_engine(EngineSpec(name="echo", description="reverses the end of each prompt", create=EchoEngine,
                           modules=("transformers",), extra="hf", replica_gpus=lambda model, node_gpus: 1,
                           argument_names=lambda: {"reverse"}))


class SerialLauncher(Launcher):
    """Runs one worker process to the end, then reduces: everything before `start` returns."""

    name = "serial"
    description = "one worker process, then the reduce"
    on_cluster = False

    def workers(self, cfg: Config) -> int:
        return 1

    def preview(self, cfg: Config, run_dir: RunDir) -> str:
        return f"one worker on {run_dir.path}"

    def start(self, cfg: Config, run_dir: RunDir, plan: Plan, launch: int) -> RunHandle:
        code = subprocess.call([sys.executable, "-m", "shardinfer.worker", str(run_dir.path), "--rank", "0",
                                "--world", "1", "--launch", str(launch)], env={**os.environ, **cfg.run.env})
        return SerialHandle(run_dir, LaunchRecord(launch=launch, launcher=self.name), code)

    def active(self, record: LaunchRecord) -> bool:
        return False


class SerialHandle(RunHandle):
    def __init__(self, run_dir: RunDir, record: LaunchRecord, code: int):
        super().__init__(run_dir, record)
        self.code = code

    def states(self) -> dict[str, str]:
        return {"worker": "COMPLETED" if self.code == 0 else "FAILED"}

    def done(self) -> bool:
        return True

    def result(self, timeout_s: float | None = None) -> dict[str, Any]:
        return reduce_run(self.run_dir)


register_launcher(SerialLauncher())
