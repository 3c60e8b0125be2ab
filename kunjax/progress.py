"""Progress for the waits a user sits through (demo training, compiling, bench phases): a `tqdm` bar on a
terminal, plain lines in a log.

Owns only how progress is shown; never decides what is slow. Every wait longer than a couple of seconds that the
CLI or the Python API makes a user sit through reports here, on stderr, so stdout stays the command's output. On
a terminal it is a `tqdm` bar rewritten in place, its elapsed time ticking every second even while one step takes
long (a compile); elsewhere (CI logs, pipes) a plain line at the start, one every `interval_s` (10 s) while it
runs, whether or not a step finished meanwhile, and one at the end: a log is neither silent nor flooded.
`KUNJAX_PROGRESS=bar | plain | off` overrides the choice.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, TextIO

MODES = ("bar", "plain", "off")


def mode(stream: TextIO) -> str:
    """The display for `stream`: `$KUNJAX_PROGRESS` if set, else a bar on a terminal and plain lines otherwise."""
    forced = os.environ.get("KUNJAX_PROGRESS", "").strip().lower()
    if forced in MODES:
        return forced
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "plain"


def say(message: str, stream: TextIO | None = None) -> None:
    """One status line on stderr (or `stream`), flushed at once; silent under `KUNJAX_PROGRESS=off`."""
    stream = stream or sys.stderr
    if mode(stream) != "off":
        print(message, file=stream, flush=True)


class Progress:
    """`total` units of work, `update(n, **fields)` as they finish, `close(summary)` at the end (or `with`).

    `fields` are shown beside the count (`loss=0.53`); the summary replaces the bar's last state with one line.
    """

    def __init__(self, desc: str, total: int | None, unit: str = "it", *, stream: TextIO | None = None,
                 interval_s: float = 10.0, enabled: bool = True):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stderr
        self.mode = mode(self.stream) if enabled else "off"
        self.interval_s = interval_s
        self.done = 0
        self.fields: dict[str, object] = {}
        self.status = ""
        self.t0 = time.monotonic()
        self._last_line = self.t0
        self._bar = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False, dynamic_ncols=True)
        elif self.mode == "plain":
            print(f"{desc}: started{self._of_total()}", file=self.stream, flush=True)
        if self.mode != "off":  # a step may take longer than a line's interval (a compile): show the time ticking
            threading.Thread(target=self._heartbeat, name="kunjax-progress", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._closed.wait(1.0 if self.mode == "bar" else max(0.1, self.interval_s / 2)):
            with self._lock:
                if self._closed.is_set():
                    return
                if self._bar is not None:
                    self._bar.refresh()  # tqdm redraws its elapsed time
                elif time.monotonic() - self._last_line >= self.interval_s:
                    self._line()

    def _line(self) -> None:
        now = time.monotonic()
        self._last_line = now
        print(f"{self.desc}: {self._count()} {self.unit}{self._fields()}, {now - self.t0:.0f}s", file=self.stream,
              flush=True)

    def _of_total(self) -> str:
        return f" (0/{self.total} {self.unit})" if self.total else ""

    def _count(self) -> str:
        return f"{self.done}/{self.total}" if self.total else str(self.done)

    def _fields(self) -> str:
        return "".join(f", {k} {v}" for k, v in self.fields.items()) + (f", {self.status}" if self.status else "")

    def update(self, n: int = 1, status: str | None = None, **fields: object) -> None:
        """`n` more done; `fields` shown as `name value`, `status` as it is."""
        with self._lock:
            self.done += n
            self.fields.update(fields)
            if status is not None:
                self.status = status
            if self._bar is not None:
                if fields or status is not None:
                    self._bar.set_postfix_str(self._fields().removeprefix(", "), refresh=False)
                self._bar.update(n)
            elif self.mode == "plain" and time.monotonic() - self._last_line >= self.interval_s:
                self._line()

    def set(self, done: int, status: str | None = None, **fields: object) -> None:
        """`update` to an absolute count."""
        self.update(done - self.done, status, **fields)

    def close(self, summary: str | None = None) -> None:
        """End the bar; print `summary` (default: the count and the time taken) as one line."""
        with self._lock:
            self._closed.set()
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            elif self.mode == "off":
                return
            line = summary or f"{self.desc}: {self._count()} {self.unit}{self._fields()} in {self.elapsed():.1f}s"
            print(line, file=self.stream, flush=True)
            self.mode = "off"  # closed: nothing more is shown

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mode != "off":
            self.close()


class CompileProgress:
    """The `on_progress` of `LLMEngine.warmup`: a bar over the replicas and the groups a policy may fuse, compiled
    / total (a minute on a 2-core CPU the first time), closed with a one-line summary when the last is done.
    Usable from any thread (`kunjax serve` warms up on the engine's)."""

    def __init__(self, shapes_per_instance: int):
        self.shapes_per_instance = shapes_per_instance
        self.bar: Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress("kunjax: compiling", total, "instances+groups")
        if done:
            self.bar.update(1)
        if done == total:
            what = "1 instance" if total == 1 else f"{total} instances and groups"
            self.bar.close(f"kunjax: compiled the steps of {what} ({self.shapes_per_instance} shapes each) in "
                           f"{self.bar.elapsed():.1f}s")


def warm_up(engine: Any) -> float:
    """`engine.warmup()` of a `kunjax.LLMEngine`, with `CompileProgress`; returns the seconds it took."""
    return engine.warmup(CompileProgress(len(engine.replica_shape.buckets)))
