"""Start-up and rows/s of a model replica on one node against one replica across two nodes.

Run on a SLURM cluster (SLURM_CONF exported) from the repository root, with the tiny model built
(`shardinfer tiny-model .cache/tiny-qwen3`):

    python jobs/bench_replicas.py --docs 64 --out bench-replicas

Both runs use configs/demo.yaml on the first --docs documents of the demo corpus: one worker on one
node (tensor parallel 1), then one replica of tensor parallel 2 over two nodes
(slurm.nodes_per_replica=2, one vLLM process per node). Start-up is from the worker job's start (sacct)
to the first request reaching the engine; rows/s is over generation (first request to last row) and
over the whole job. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

LAYOUTS = {
    "1 node (tp 1)": ["slurm.nodes=1"],
    "2 nodes (tp 2, nodes_per_replica 2)": ["slurm.nodes=2", "slurm.nodes_per_replica=2",
                                            "model.engine_args.tensor_parallel_size=2",
                                            "run.env.VLLM_CPU_OMP_THREADS_BIND=nobind"],
}
COMMON = ["slurm.cpus_per_task=1", "slurm.time_min=20", "slurm.reduce_time_min=10", "slurm.reduce_cpus=1",
          "input.id_column=id", "run.unit_tokens=4000"]


def corpus(docs: int, out: Path) -> Path:
    import gzip

    path = out / "docs.jsonl"
    with gzip.open("jobs/data/python-docs.jsonl.gz", "rt") as src, path.open("w") as dst:
        for _, line in zip(range(docs), src):
            dst.write(line)
    return path


def job_start(job_id: str) -> float:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "Start"], capture_output=True, text=True,
                         check=True).stdout.split()
    return datetime.fromisoformat(out[0]).timestamp()


def measure(name: str, overrides: list[str], docs_path: Path, out: Path) -> dict[str, Any]:
    run_dir = out / name.split(" ")[0].replace("(", "")
    cmd = [sys.executable, "-m", "shardinfer.cli", "submit", "configs/demo.yaml", f"input.path={docs_path}",
           f"run.directory={run_dir}", *COMMON, *overrides, "--wait"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    [metrics] = [json.loads(p.read_text()) for p in (run_dir / "metrics").glob("*.json")]
    report = json.loads((run_dir / "report.json").read_text())
    start = job_start(json.loads((run_dir / "jobs.json").read_text())[-1]["worker_job"])
    generation = metrics["last_generate_end"] - metrics["first_generate_at"]
    return {"layout": name, "start_up_s": metrics["first_generate_at"] - start,
            "model_load_s": metrics["model_load_s"], "rows": metrics["rows"],
            "rows_per_s": metrics["rows"] / generation, "job_rows_per_s": report["throughput"]["rows_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench-replicas"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    docs = corpus(args.docs, args.out.resolve())
    rows = [measure(name, overrides, docs, args.out.resolve()) for name, overrides in LAYOUTS.items()]
    (args.out / "bench.json").write_text(json.dumps(rows, indent=1))
    print("| replica | start-up (job start to first request) | of which engine load | rows | rows/s (generation) "
          "| rows/s (whole job) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['start_up_s']:.1f} s | {r['model_load_s']:.1f} s | {r['rows']} | "
              f"{r['rows_per_s']:.2f} | {r['job_rows_per_s']:.2f} |")


if __name__ == "__main__":
    main()
