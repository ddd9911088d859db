"""Shared fixtures: the tiny real model, corpus writers, configs and the real CLI in subprocesses."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shardinfer.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-qwen3", corpus_path=DEMO_CORPUS)


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def engine_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("vllm-cache")
    return {**os.environ, **CPU_ENV, "VLLM_CACHE_ROOT": str(cache), "PYTHONUNBUFFERED": "1"}


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


def write_config(path: Path, *, corpus: Path, model_dir: Path, run_dir: Path, **sections: dict[str, Any]) -> Path:
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
        cfg.setdefault(name, {}).update(values)
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
