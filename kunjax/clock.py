"""Time as a dependency: every decision or stamp that involves time reads a `Clock`.

* `WallClock` — serving: `now()` is `time.monotonic()`, `wall()` is `time.time()`; `sleep` really sleeps.
* `VirtualClock` — simulated time: it starts at 0 and moves only when advanced. The executor advances it by the
  duration of each engine step (`kunjax.executor`), and an event loop (`kunjax bench`'s replay) jumps it to the
  next arrival when the engine is idle, so a run on the virtual clock never waits and its schedule is the one the
  modelled hardware would give.

Never reads the wall clock outside `WallClock`: code that stamps or decides by time takes a clock (arrival,
queue, first-token and finish stamps; restore pacing; layerkv's step-time model; migration timings; event times
and the duration of a fuse or split, which the executor charges on a virtual clock). Durations of host work that
are reported, not decided on and not simulated (compile and load times), may use `time.perf_counter` directly.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds (the origin is arbitrary; only differences mean something)."""

    def wall(self) -> float:
        """Seconds since the Unix epoch at `now()` (for stamps a reader compares across processes)."""

    def sleep(self, seconds: float) -> None:
        """Let `seconds` pass (a virtual clock advances by them instead of waiting)."""

    def sleep_until(self, t: float) -> None:
        """Let time pass until `now() >= t` (a virtual clock is then exactly at `t` if it was before it)."""

    @property
    def virtual(self) -> bool:
        """True when time moves only when advanced (simulation); False for the wall clock."""


class WallClock:
    virtual = False

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def sleep_until(self, t: float) -> None:
        self.sleep(t - self.now())


class VirtualClock:
    """Time that moves only when advanced. Thread-safe; `advance` and `advance_to` never move it backwards."""

    virtual = True

    def __init__(self, start: float = 0.0, epoch: float = 1.7e9):
        self._t = float(start)
        self._epoch = float(epoch)  # what `wall()` reports at t = 0
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._t

    def wall(self) -> float:
        return self._epoch + self._t

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        with self._lock:
            self._t += seconds
            return self._t

    def advance_to(self, t: float) -> float:
        with self._lock:
            self._t = max(self._t, float(t))
            return self._t

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    def sleep_until(self, t: float) -> None:
        self.advance_to(t)


WALL = WallClock()
