"""Visible GPUs and how local workers split them into model replicas."""

from __future__ import annotations

import shutil
import subprocess

from shardinfer.launch.env import visible_gpu_ids


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    visible = visible_gpu_ids()
    if visible is not None:
        return visible
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def gpu_groups(gpus: list[str], workers: int) -> list[list[str]]:
    """Split the GPUs evenly among workers (one replica each); [] per worker on a CPU machine."""
    if not gpus:
        return [[] for _ in range(workers)]
    per = len(gpus) // workers
    if per < 1:
        raise ValueError(f"{workers} workers need at least {workers} GPUs, found {len(gpus)}: {gpus}")
    return [gpus[i * per:(i + 1) * per] for i in range(workers)]


def device_name(gpus: list[str]) -> str:
    """What a worker runs on: its GPUs' names (``2x NVIDIA H100 80GB HBM3``), else ``cpu``."""
    if not gpus or shutil.which("nvidia-smi") is None:
        return "cpu" if not gpus else f"{len(gpus)} GPU(s)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", ",".join(gpus)],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return f"{len(gpus)} GPU(s)"
    names = [line.strip() for line in out.splitlines() if line.strip()]
    if not names:
        return f"{len(gpus)} GPU(s)"
    if len(set(names)) == 1:
        return names[0] if len(names) == 1 else f"{len(names)}x {names[0]}"
    return ", ".join(names)
