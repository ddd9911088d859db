"""Tokens per second over time: per-worker time bins, merged for a run, split into phases.

A worker adds every finished row (prompt and output tokens at the time it finished). Bins start 0.25 s
wide and double whenever there would be more than ``max_bins``, so a week-long run keeps a
few thousand numbers per worker. Phases of a run: start-up (start to the first request handed to
the engine), steady state, and tail (the end stretch running below half the steady rate).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

TAIL_FRACTION = 0.5


@dataclass
class Timeline:
    start: float
    bin_s: float = 0.25
    max_bins: int = 2048
    prompt: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)

    def add(self, t: float, prompt_tokens: int, output_tokens: int) -> None:
        index = max(int((t - self.start) / self.bin_s), 0)
        while index >= self.max_bins:
            self._coarsen()
            index = max(int((t - self.start) / self.bin_s), 0)
        if index >= len(self.prompt):
            grow = index + 1 - len(self.prompt)
            self.prompt += [0] * grow
            self.output += [0] * grow
        self.prompt[index] += prompt_tokens
        self.output[index] += output_tokens

    def coarsen_to(self, bin_s: float) -> Timeline:
        """The same tokens in bins at least ``bin_s`` wide (widths double, so they line up)."""
        while self.bin_s < bin_s:
            self._coarsen()
        return self

    def _coarsen(self) -> None:
        self.bin_s *= 2
        self.prompt = [sum(self.prompt[i:i + 2]) for i in range(0, len(self.prompt), 2)]
        self.output = [sum(self.output[i:i + 2]) for i in range(0, len(self.output), 2)]

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "bin_s": self.bin_s, "prompt": self.prompt, "output": self.output}


def merge(timelines: list[dict[str, Any]], start: float | None = None) -> Timeline:
    """One timeline for several workers (bins as wide as the widest), from ``start`` (default: the
    earliest worker start)."""
    if not timelines:
        return Timeline(start=start or 0.0)
    merged = Timeline(start=min(t["start"] for t in timelines) if start is None else start,
                      bin_s=max(t["bin_s"] for t in timelines), max_bins=1 << 30)
    for t in timelines:
        for i, (p, o) in enumerate(zip(t["prompt"], t["output"])):
            if p or o:  # a bin's tokens land at its middle
                merged.add(t["start"] + (i + 0.5) * t["bin_s"], p, o)
    return merged


def rates(timeline: Timeline) -> list[tuple[float, float, float]]:
    """(seconds since start at the bin's middle, input tok/s, output tok/s) per bin."""
    b = timeline.bin_s
    return [((i + 0.5) * b, p / b, o / b) for i, (p, o) in enumerate(zip(timeline.prompt, timeline.output))]


def phases(timeline: Timeline, first_request_at: float | None, end: float) -> dict[str, float]:
    """Start-up, steady-state and tail seconds, and the steady-state rate (total tok/s).

    Rates are smoothed over 5% of the generation span. The tail starts after the last moment the
    smoothed rate is still at least half its median; the steady rate is the tokens finished before
    the tail over the steady-state time.
    """
    first = first_request_at if first_request_at is not None else timeline.start
    startup = max(first - timeline.start, 0.0)
    first_bin = int(startup / timeline.bin_s)
    active = [p + o for p, o in zip(timeline.prompt[first_bin:], timeline.output[first_bin:])]
    if not any(active):
        return {"startup_s": round(startup, 3), "steady_s": 0.0, "tail_s": 0.0, "steady_tokens_per_s": 0.0}
    smoothed = smooth(active, max(len(active) // 20, 1))
    typical = statistics.median(smoothed)
    last = max((i for i, v in enumerate(smoothed) if v >= TAIL_FRACTION * typical), default=len(active) - 1)
    tail_start = timeline.start + (first_bin + last + 1) * timeline.bin_s
    tail = min(max(end - tail_start, 0.0), max(end - first, 0.0))
    steady = max(end - first - tail, 0.0)
    steady_tokens = sum(active[: last + 1])
    return {"startup_s": round(startup, 3), "steady_s": round(steady, 3), "tail_s": round(tail, 3),
            "steady_tokens_per_s": round(steady_tokens / steady, 1) if steady else 0.0}


def smooth(values: list[int] | list[float], half_width: int) -> list[float]:
    """Centered moving average."""
    out = []
    for i in range(len(values)):
        window = values[max(i - half_width, 0): i + half_width + 1]
        out.append(sum(window) / len(window))
    return out
