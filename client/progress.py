"""A one-line progress bar for terminals (stderr); silent when stderr is not a terminal."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, label: str = "train", width: int = 30, stream=None) -> None:
        self.label, self.width = label, width
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.t0 = time.perf_counter()
        self._drawn = 0.0

    def __call__(self, step: int, total: int, loss: float, accuracy: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (step < total and now - self._drawn < 0.1):  # at most ~10 redraws a second
            return
        self._drawn = now
        filled = int(self.width * step / max(total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        rate = step / max(now - self.t0, 1e-9)
        self.stream.write(
            f"\r{self.label} [{bar}] {step}/{total}  loss {loss:.4f}  acc {accuracy:.3f}  {rate:.1f} steps/s"
        )
        if step >= total:
            self.stream.write("\n")
        self.stream.flush()
