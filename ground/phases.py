"""A step counter for a long step: each `mark` logs the wall seconds since the previous one, and `summary` gives
them all (a step's phases, e.g. the Spark engine's jobs, timed without a profiler or the Spark UI)."""
from __future__ import annotations

import logging
import time


class Phases:
    def __init__(self, name: str, log: logging.Logger) -> None:
        self.name, self.log = name, log
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> float:
        now = time.perf_counter()
        took = now - self._last
        self._last = now
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + took, 3)
        self.log.info("%s: %s %.2fs", self.name, phase, took)
        return took

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())


__all__ = ["Phases"]
