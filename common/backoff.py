"""Capped exponential backoff with jitter: the one retry schedule of every caller that retries the server."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays initial, 2*initial, ... capped at `maximum`, each scaled by a random factor in [0.5, 1.5).

    `next()` returns the next delay; `reset()` starts over after a success. A server's own hint
    (a retry-after value it sent) wins over the schedule when it is longer.
    """

    initial: float = 0.1
    maximum: float = 3.0
    rng: random.Random = field(default_factory=random.Random, repr=False)
    _delay: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {self.initial} and {self.maximum}")
        self._delay = self.initial

    def next(self, hint: float | None = None) -> float:
        """The time to wait before the next attempt."""
        delay = self._delay * (0.5 + self.rng.random())
        self._delay = min(self._delay * 2, self.maximum)
        return max(delay, hint or 0.0)

    def reset(self) -> None:
        self._delay = self.initial
