"""Progress of one worker: a bar on an interactive terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("shardinfer.progress")  # the name progress lines are known by (scripts look for it)


class Progress:
    def __init__(self, *, rank: int, total_rows: int, interval_s: float):
        self.rank = rank
        self.interval_s = interval_s
        self.rows = self.units = self.tokens_in = self.tokens_out = 0
        self.start = self.last_line = time.monotonic()
        self.bar: Any = None
        log.debug("stderr is a terminal: %s", sys.stderr.isatty())
        if sys.stderr.isatty():
            from tqdm import tqdm

            # Workers claim units dynamically, so a worker's share is unknown: count without a total.
            self.bar = tqdm(desc=f"worker {rank} (of {total_rows} rows in the run)", position=rank, unit="row",
                            dynamic_ncols=True, leave=True)

    def update(self, *, rows: int, tokens_in: int, tokens_out: int) -> None:
        self.units += 1
        self.rows += rows
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        rate = (self.tokens_in + self.tokens_out) / max(time.monotonic() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(rows)
            self.bar.set_postfix(units=self.units, tok_s=f"{rate:,.0f}")
        elif time.monotonic() - self.last_line >= self.interval_s:
            self.last_line = time.monotonic()
            self.log_line(rate)

    def log_line(self, rate: float) -> None:
        log.info("progress: %d units, %d rows, %d prompt + %d output tokens, %.0f tokens/s",
                 self.units, self.rows, self.tokens_in, self.tokens_out, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        rate = (self.tokens_in + self.tokens_out) / max(time.monotonic() - self.start, 1e-9)
        self.log_line(rate)
