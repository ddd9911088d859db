"""Retries of engine calls: split a failing batch to isolate bad rows, back off when all fail."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the engines' base module runs its queue through these retries
    from shardinfer.engines.base import Completion, Pooled

log = logging.getLogger(__name__)


def generate_with_retries(engine: Any, prompts: list[Any], *, attempts: int,
                          backoff_s: float = 2.0) -> list[Completion | Pooled | Exception]:
    """Retry a batch the engine failed entirely, with exponential backoff (each try splits the
    batch on errors, so smaller batches are tried too); the last try's errors are returned."""
    done: list[Completion | Pooled | Exception] = []
    for attempt in range(1, attempts + 1):
        done = generate_isolating(engine, prompts)
        if not all(isinstance(c, Exception) for c in done):
            return done
        log.error("attempt %d/%d: the engine failed every row of the batch: %r", attempt, attempts, done[0])
        if attempt < attempts:
            time.sleep(min(backoff_s ** attempt, 60.0))
    return done


def generate_isolating(engine: Any, prompts: list[Any]) -> list[Completion | Pooled | Exception]:
    """Generate a whole batch; if the engine raises, split it to isolate the rows that fail."""
    if not prompts:
        return []
    try:
        return list(engine.generate(prompts))
    except Exception as exc:  # noqa: BLE001 - any engine error is retried on halves, then recorded
        if len(prompts) == 1:
            log.warning("engine error on one row: %r", exc)
            return [exc]
        log.warning("engine error on a batch of %d rows (%r); splitting it", len(prompts), exc)
        mid = len(prompts) // 2
        return generate_isolating(engine, prompts[:mid]) + generate_isolating(engine, prompts[mid:])
