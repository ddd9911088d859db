"""Shared fixtures: the tiny real model, corpus writers, configs and the real CLI in subprocesses;
reference runs made once per session; how pytest-xdist workers share the tests (see the end)."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO / "jobs" / "data" / "python-docs.jsonl.gz"

# Engines in tests: in-process vLLM, one thread per engine, nothing leaves the machine.
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


SETUP_MODEL = REPO / ".cache" / "tiny-qwen3"  # what jobs/setup.sh builds
# vLLM's cache of what it learnt about a model class (keyed by the hash of its source), kept between
# sessions: without it the first engine of every session (of every xdist worker) spends ~10 s of CPU
# inspecting the class in a subprocess.
VLLM_CACHE = REPO / ".cache" / "vllm-tests"


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of this test session that every pytest-xdist worker of it sees."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (across processes: pytest-xdist workers)."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def shared_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Any]) -> Path:
    """``make(directory)`` once per test session, whichever xdist worker asks first; the others wait
    for it and get the same directory."""
    root = shared_root(tmp_path_factory)
    directory, finished = root / f"shared-{name}", root / f"shared-{name}.done"
    with locked(root / f"shared-{name}.lock"):
        if not finished.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            make(directory)
            finished.touch()
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per session; a copy of setup's model where its stamp matches (the build is
    byte-identical), else built here."""
    from shardinfer.models.tiny import STAMP_NAME, build_tiny_model

    def make(directory: Path) -> None:
        if (SETUP_MODEL / STAMP_NAME).is_file():
            shutil.copytree(SETUP_MODEL, directory / "tiny-qwen3")
        build_tiny_model(directory / "tiny-qwen3", corpus_path=DEMO_CORPUS)  # at once when the copy is complete

    return shared_once(tmp_path_factory, "model", make) / "tiny-qwen3"


POOLING_KINDS = ("classifier", "embed", "cross-encoder", "reward")


@pytest.fixture(scope="session")
def pooling_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four tiny pooling models (built once per session, a few seconds each)."""
    from shardinfer.models.tiny import build_tiny_model

    def make(directory: Path) -> None:
        for kind in POOLING_KINDS:
            build_tiny_model(directory / kind, corpus_path=DEMO_CORPUS, kind=kind)

    root = shared_once(tmp_path_factory, "pooling-models", make)
    return {kind: root / kind for kind in POOLING_KINDS}


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def engine_env() -> dict[str, str]:
    VLLM_CACHE.mkdir(parents=True, exist_ok=True)
    return {**os.environ, **CPU_ENV, "VLLM_CACHE_ROOT": str(VLLM_CACHE), "PYTHONUNBUFFERED": "1"}


def demo_docs(n: int, *, offset: int = 0) -> list[dict[str, Any]]:
    """The first n documents of the bundled corpus."""
    with gzip.open(DEMO_CORPUS, "rt") as fh:
        docs = [json.loads(line) for line in fh]
    return docs[offset: offset + n]


def write_jsonl(path: Path, records: list[Any], *, gz: bool = False) -> Path:
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def write_parquet(path: Path, records: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_config(path: Path, *, corpus: Path, model_dir: Path, run_dir: Path, **sections: Any) -> Path:
    """A small CPU config; ``sections`` update the defaults section by section."""
    cfg: dict[str, Any] = {
        "input": {"path": str(corpus), "text_column": "text"},
        "prompt": {"system": "Summarize.", "user": "{text}"},
        "model": {"path": str(model_dir), "engine": "vllm", "dtype": "float32", "max_model_len": 512,
                  "engine_args": {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}},
        "sampling": {"max_tokens": 16, "temperature": 0.0, "seed": 0},
        "run": {"directory": str(run_dir), "workers": 1, "env": CPU_ENV},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:  # a top-level setting such as task
            cfg[name] = values
    if cfg["model"]["engine"] != "vllm" and "engine_args" not in sections.get("model", {}):
        del cfg["model"]["engine_args"]  # the defaults above are vLLM's
    path.write_text(yaml.safe_dump(cfg))
    return path


OPENAI_EXAMPLE = REPO / "jobs" / "data" / "openai-batch-example.jsonl"


def openai_batch_config(tmp: Path, model_dir: Path, name: str, **run: Any) -> Path:
    """The bundled OpenAI batch example (10 good requests, 2 that fail alone) on the tiny model."""
    return write_config(tmp / f"{name}.yaml", corpus=OPENAI_EXAMPLE, model_dir=model_dir, run_dir=tmp / name,
                        input={"path": str(OPENAI_EXAMPLE), "format": "openai-batch"}, prompt={},
                        model={"max_model_len": 2048, "engine_args": {
                            "enforce_eager": True, "kv_cache_memory_bytes": 64 << 20,
                            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}},
                        run={"directory": str(tmp / name), "workers": 1, "unit_tokens": 600, **run})


def openai_output(run_dir: Path) -> list[dict[str, Any]]:
    """The Batch API output lines, less what differs between two runs of the same requests (ids, times)."""
    lines = [json.loads(line) for line in (run_dir / "openai-batch-output.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("id")
        if line["response"]:
            line["response"].pop("request_id")
            line["response"]["body"].pop("id")
            line["response"]["body"].pop("created")
    return lines


def run_cli(args: list[str], env: dict[str, str], *, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardinfer.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_results(run_dir: Path) -> list[dict[str, Any]]:
    return pq.read_table(run_dir / "results").to_pylist()


@pytest.fixture(scope="session")
def openai_batch_local(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
                       engine_env: dict[str, str]) -> list[dict[str, Any]]:
    """The output file of the bundled OpenAI batch example run here on one worker, once per session:
    what its runs under MPI and SLURM must give."""
    def make(directory: Path) -> None:
        proc = run_cli(["run", str(openai_batch_config(directory, tiny_model, "local"))], engine_env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    return openai_output(shared_once(tmp_path_factory, "openai-batch", make) / "local")


@pytest.fixture(scope="session")
def small_job(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
              engine_env: dict[str, str]) -> tuple[Path, list[tuple[Any, ...]]]:
    """A small job (30 documents; 1 CPU per task when submitted) and the (id, status, output) of its rows
    from a run here on one worker, once per session: what its runs under MPI and SLURM must give."""
    def make(directory: Path) -> None:
        docs = demo_docs(30, offset=100)
        corpus = write_jsonl(directory / "docs.jsonl", [{"id": d["id"], "text": d["text"][:1500]} for d in docs])
        config = write_config(directory / "job.yaml", corpus=corpus, model_dir=tiny_model, run_dir=directory / "local",
                              input={"path": str(corpus), "id_column": "id"},
                              run={"directory": str(directory / "local"), "workers": 1, "unit_tokens": 2000,
                                   "env": {"OMP_NUM_THREADS": "1"}},
                              slurm={"cpus_per_task": 1, "time_min": 10, "reduce_time_min": 10, "reduce_cpus": 1})
        proc = run_cli(["run", str(config)], engine_env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    directory = shared_once(tmp_path_factory, "small-job", make)
    return directory / "job.yaml", [(r["id"], r["status"], r["output"]) for r in read_results(directory / "local")]


# Under pytest-xdist (tests/run.sh: -n 2 --dist loadgroup) the tests that share a module-scoped
# fixture (a job run once, several tests asserting on it) or an xdist_group mark go to one worker as
# one group, so the job runs once there; groups start longest first (how long each test took last
# time, in pytest's cache, else a guess from its marks), so that no worker is left alone with a long
# group at the end. The workers find the groups when they collect and write them to a file that the
# controller's scheduler reads (xdist's own loadgroup needs a test id that pytest 9 no longer lets
# a plugin change).
DURATIONS = "shardinfer/durations"
GUESS_S = {"cluster": 100.0, "engine": 30.0, "processes": 10.0}
_took: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _took[report.nodeid] = _took.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    cache = getattr(session.config, "cache", None)
    if cache is None or not _took or hasattr(session.config, "workerinput"):
        return  # the controller keeps what its workers report
    cache.set(DURATIONS, {**cache.get(DURATIONS, {}), **{k: round(v, 2) for k, v in _took.items()}})


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "dist", "no") == "loadgroup" and not hasattr(config, "workerinput"):
        fd, name = tempfile.mkstemp(prefix="shardinfer-test-groups-", suffix=".json")
        os.close(fd)
        config.stash[GROUPS] = Path(name)


def pytest_unconfigure(config: pytest.Config) -> None:
    if GROUPS in config.stash:
        config.stash[GROUPS].unlink(missing_ok=True)


GROUPS = pytest.StashKey[Path]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    if GROUPS in node.config.stash:
        node.workerinput["shardinfer_groups"] = str(node.config.stash[GROUPS])


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if GROUPS not in config.stash:
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        """Work units are the groups the workers wrote, in the order they collected them."""

        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                self.groups = json.loads(config.stash[GROUPS].read_text() or "{}")
            return self.groups.get(nodeid, nodeid)

    config.option.loadscopereorder = False
    return Groups(config, log)


@pytest.hookimpl(wrapper=True)  # before the other implementations: xdist sends what is collected after them
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Iterator[None]:
    workerinput = getattr(config, "workerinput", {})
    if "shardinfer_groups" in workerinput:
        groups = _group_and_order(config, items)
        path = Path(workerinput["shardinfer_groups"])
        part = path.with_name(f"{path.name}.{os.getpid()}")
        part.write_text(json.dumps(groups))
        part.replace(path)  # every worker writes the same
    return (yield)


def _group_and_order(config: pytest.Config, items: list[pytest.Item]) -> dict[str, str]:
    """Order ``items`` group by group, longest first; return the group of each test in one."""
    group = list(range(len(items)))  # union-find: items joined by a module-scoped fixture or a mark
    names: dict[int, str] = {}

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, item in enumerate(items):
        keys = [("xdist_group", str(m.args[0] if m.args else m.kwargs.get("name", "default")))
                for m in item.iter_markers("xdist_group")]
        if isinstance(item, pytest.Function):
            defs = item._fixtureinfo.name2fixturedefs
            keys += [(str(item.path), name) for name in item.fixturenames
                     if name in defs and defs[name][-1].scope in ("module", "package", "class")]
        for key in keys:
            j = root(first.setdefault(key, i))
            names.setdefault(j, f"{Path(key[0]).stem}.{key[1]}")
            group[root(i)] = j
    members: dict[int, list[int]] = {}
    for i in range(len(items)):
        members.setdefault(root(i), []).append(i)
    cache = getattr(config, "cache", None)
    took: dict[str, float] = cache.get(DURATIONS, {}) if cache is not None else {}

    def seconds(item: pytest.Item) -> float:
        guess = max([GUESS_S[m.name] for m in item.iter_markers() if m.name in GUESS_S], default=1.0)
        return took.get(item.nodeid, guess)

    # Longest first, but the tests of a module keep their order (one may rely on what an earlier
    # one left in the process): the next group is the first left of the module whose longest
    # group left is the longest.
    queues: dict[Path, list[list[int]]] = {}
    for indices in members.values():
        queues.setdefault(items[indices[0]].path, []).append(indices)
    cost = {indices[0]: sum(seconds(items[i]) for i in indices) for indices in members.values()}
    ordered: list[list[int]] = []
    while queues:
        path = max(queues, key=lambda m: max(cost[g[0]] for g in queues[m]))  # ties: the earlier module
        ordered.append(queues[path].pop(0))
        if not queues[path]:
            del queues[path]
    groups = {items[i].nodeid: names.get(root(indices[0]), f"group-{indices[0]}") for indices in ordered
              if len(indices) > 1 for i in indices}
    items[:] = [items[i] for indices in ordered for i in indices]
    return groups


@pytest.fixture
def planned(tmp_path: Path) -> Any:
    """A run directory planned (no model needed) over 40 small JSONL rows: (RunDir, Plan)."""
    from shardinfer.config import config_from_dict
    from shardinfer.ledger.runstate import prepare_run

    with open(tmp_path / "c.jsonl", "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"text": f"document {i} " * (5 + i % 7), "id": f"d{i}"}) + "\n")
    cfg = config_from_dict({"input": {"path": str(tmp_path / "c.jsonl"), "id_column": "id"},
                            "model": {"path": str(tmp_path / "m"), "max_model_len": 256},
                            "sampling": {"max_tokens": 8}, "run": {"directory": str(tmp_path / "run"),
                                                                    "unit_tokens": 200}})
    return prepare_run(cfg, 2)
