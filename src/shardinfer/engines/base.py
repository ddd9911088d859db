"""The engine interface shared by all backends.

An engine is fed work as it goes: ``submit(batch, prompts)`` queues prompts (token ids and the row's
options, :class:`~shardinfer.prompts.Prompt`) under a batch key, ``poll()`` returns the rows that
finished since the last call as ``(batch, index, result)``,
where ``result`` is a :class:`Completion` (a :class:`Pooled` for pooling tasks) or the exception
that row failed with. ``wants_more()``
says whether the engine needs more queued work to stay busy, so the worker hands it the next unit
before the current one drains and the accelerator never waits between units. ``cancel(batch)``
drops a batch's rows that have not finished (a draining worker gives its unit back).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from shardinfer.engines.retry import generate_with_retries
from shardinfer.errors import Refused

__all__ = ["BatchQueue", "Completion", "Engine", "Finished", "Pooled", "Refused", "TokenLogprob"]

if TYPE_CHECKING:
    import numpy as np

    from shardinfer.requests.prompts import Prompt


@dataclass
class TokenLogprob:
    """A generated token, its log-probability and the top alternatives (token, logprob)."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Completion:
    """What a row got: its first output, and the others when it asked for n > 1."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens reached)
    logprobs: list[TokenLogprob] | None = None  # when the row asked for them
    more: list[Completion] = field(default_factory=list)  # outputs 2..n

    @property
    def samples(self) -> list[Completion]:
        return [self, *self.more]

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids) + sum(len(s.token_ids) for s in self.more)


@dataclass
class Pooled:
    """What a row of a pooling task got: its embedding, its class probabilities, or ``[score]`` (a list
    of floats, or a one-dimensional NumPy array as engines give them: an embedding column is built from
    the arrays without a Python float per value); a row of several inputs (:attr:`Prompt.parts`) gets
    each input's values as ``items``, in input order."""

    values: Sequence[float] | np.ndarray
    output_tokens: int = 0
    items: list[list[float]] | None = None

    @classmethod
    def of_parts(cls, parts: list[Pooled]) -> Pooled:
        return cls(values=[], items=[floats(p.values) for p in parts])


def floats(values: Sequence[float] | np.ndarray) -> list[float]:
    """Pooled values as a list of Python floats."""
    tolist = getattr(values, "tolist", None)
    return tolist() if tolist is not None else list(values)


Finished = tuple[Any, int, "Completion | Pooled | Exception"]


class Engine(Protocol):
    name: str

    def load(self) -> None: ...

    def generate(self, prompts: list[Prompt]) -> list[Completion] | list[Pooled]: ...

    def submit(self, batch: Any, prompts: list[Prompt]) -> None: ...

    def poll(self) -> list[Finished]: ...

    def wants_more(self) -> bool: ...

    def cancel(self, batch: Any) -> None: ...

    def versions(self) -> dict[str, str]: ...

    def report(self) -> dict[str, Any]: ...


class BatchQueue:
    """``submit``/``poll`` for engines that only have a blocking ``generate``: each ``poll`` runs
    the oldest submitted batch (with retries), and more work is wanted only when none is queued."""

    def __init__(self, attempts: int = 3, backoff_s: float = 2.0):
        self._queue: deque[tuple[Any, list[Prompt]]] = deque()
        self.attempts = attempts
        self.backoff_s = backoff_s

    def submit(self, batch: Any, prompts: list[Prompt]) -> None:
        self._queue.append((batch, prompts))

    def wants_more(self) -> bool:
        return not self._queue

    def cancel(self, batch: Any) -> None:
        self._queue = deque(item for item in self._queue if item[0] != batch)

    def poll(self) -> list[Finished]:
        if not self._queue:
            return []
        batch, prompts = self._queue.popleft()
        done = generate_with_retries(self, prompts, attempts=self.attempts, backoff_s=self.backoff_s)
        return [(batch, i, result) for i, result in enumerate(done)]

    def generate(self, prompts: list[Prompt]) -> list[Completion] | list[Pooled]:
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """The engine's settings in effect and what it did (engines that can tell)."""
        return {}
