"""Submit a run to SLURM from Python with submitit, wait for it, and print the report.

    python jobs/submitit_example.py                       # the demo config on 2 nodes
    python jobs/submitit_example.py my.yaml slurm.nodes=8 slurm.gpus_per_node=4

The handle's ``result()`` waits for the reduce job (which runs after the workers) and returns the
run's report; results are in the run directory printed first.
"""

from __future__ import annotations

import json
import sys

import shardinfer


def main(argv: list[str]) -> int:
    config = argv[0] if argv else "configs/demo.yaml"
    overrides = argv[1:] if len(argv) > 1 else ["slurm.nodes=2", "slurm.cpus_per_task=1"]
    job = shardinfer.submit(config, launcher="submitit", overrides=overrides)
    print(f"run {job.run_dir.path}: jobs {', '.join(job.job_ids)} (the last one reduces)", file=sys.stderr)
    report = job.result()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
