"""A small stderr progress bar (no dependencies): redrawn in place on a terminal, one line per step otherwise."""

from __future__ import annotations

import time
from typing import TextIO


class ProgressBar:
    def __init__(self, steps: int, seconds_per_step: float, stream: TextIO, enabled: bool | None = None, width: int = 30) -> None:
        self.steps = steps
        self.seconds = seconds_per_step
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.enabled = True if enabled is None else enabled
        self.width = width
        self.index = 0
        self.label = ""
        self.start = time.monotonic()
        self._drawn = False

    def step(self, index: int, label: str, start_at: float) -> None:
        self.index, self.label, self.start = index, label, start_at
        if self.enabled and not self.tty:
            print(f"[{index + 1}/{self.steps}] {label}: running {self.seconds:g}s", file=self.stream, flush=True)

    def update(self, completed: int) -> None:
        if not (self.enabled and self.tty):
            return
        elapsed = max(0.0, time.monotonic() - self.start)
        done = (self.index + min(1.0, elapsed / self.seconds if self.seconds else 1.0)) / self.steps
        filled = int(done * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"\r[{bar}] {done * 100:5.1f}%  step {self.index + 1}/{self.steps} {self.label:<10} {min(elapsed, self.seconds):5.1f}/{self.seconds:g}s  {completed} answers"
        self.stream.write(line)
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False
