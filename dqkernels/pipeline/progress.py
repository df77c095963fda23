"""Progress of long steps: a bar on a terminal, a plain line every few seconds otherwise.

One :class:`Progress` per step (``features``, ``bin``, ``export``, ...). The layers below the
pipeline never import this module: they take a plain callback ``progress(done, total)``, which a
``Progress`` is. On a terminal the step draws a tqdm bar; anywhere else (a log file, a pipe, a
batch job) it writes one line to stderr at most every ``DQK_PROGRESS_INTERVAL`` seconds
(default 5; 0 writes every update), e.g.::

    bin: 12 345 / 47 000 greedy steps, 26%, 31 s elapsed, ~88 s left

The time left is estimated from the rate after the first update, so a step's warm-up (loading a
model, building a Gram matrix, the first batch's compilation) does not distort it; until a
second update has come there is no estimate. A disabled ``Progress`` (``-q``) does nothing.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import IO, Callable, Optional

from dqkernels.core.errors import InputError

INTERVAL_ENV = "DQK_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 5.0

ProgressCallback = Callable[[int, Optional[int]], None]


def line_interval() -> float:
    """Seconds between two plain progress lines: ``DQK_PROGRESS_INTERVAL``, default 5."""
    value = os.environ.get(INTERVAL_ENV)
    if value is None or value.strip() == "":
        return DEFAULT_INTERVAL
    try:
        seconds = float(value)
    except ValueError:
        raise InputError(f"{INTERVAL_ENV} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise InputError(f"{INTERVAL_ENV} must be a number of seconds >= 0, got {value!r}")
    return seconds


def format_count(value: int) -> str:
    """12345 -> '12 345' (a space between thousands: unambiguous in every locale)."""
    return f"{int(value):,}".replace(",", " ")


def format_seconds(seconds: float) -> str:
    """A duration for a progress line: '31 s', '4 min 05 s', '2 h 03 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Progress of one step, ``desc`` counting ``unit`` up to ``total`` (None: unknown).

    Feed it absolute counts — ``progress(done)`` or ``progress(done, total)``, the callback form
    the lower layers take — or increments with :meth:`update`; :meth:`close` (or leaving the
    ``with`` block) ends the bar, or writes a last line when lines were written.

    enabled: False makes every call a no-op (``-q``). stream: where it writes, default stderr
    (looked up when the step starts). terminal: bar (True) or lines (False); default: whether
    ``stream`` is a terminal. interval: seconds between lines, default :func:`line_interval`.
    """

    def __init__(self, desc: str, total: Optional[int] = None, unit: str = "", *, enabled: bool = True,
                 stream: Optional[IO[str]] = None, terminal: Optional[bool] = None,
                 interval: Optional[float] = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.desc = desc
        self.total = None if total is None else int(total)
        self.unit = unit
        self.enabled = enabled
        self.done = 0
        self._clock = clock
        self._closed = not enabled
        self._bar = None
        self._lines_written = 0
        if not enabled:
            return
        self._stream = stream if stream is not None else sys.stderr
        self.terminal = _is_terminal(self._stream) if terminal is None else terminal
        self.interval = line_interval() if interval is None else float(interval)
        self._started = clock()
        self._last_line = self._started
        self._reference: Optional[tuple[float, int]] = None  # (time, done) of the first update
        if self.terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=f" {unit}" if unit else "it", file=self._stream,
                             dynamic_ncols=True, leave=True, bar_format=_BAR_FORMAT if total else None)
            self._bar.set_postfix_str("estimating", refresh=False)

    # ------------------------------------------------------------------ feeding

    def __call__(self, done: int, total: Optional[int] = None) -> None:
        """Record that ``done`` units (of ``total``, when given) are finished."""
        if self._closed:
            return
        if total is not None and total != self.total:
            self.total = int(total)
            if self._bar is not None:
                self._bar.total = self.total
                self._bar.bar_format = _BAR_FORMAT if self.total else None
        done = int(done)
        advanced = done - self.done
        self.done = done
        now = self._clock()
        if self._reference is None:
            if done > 0:
                self._reference = (now, done)
        if self._bar is not None:
            self._bar.set_postfix_str(self._time_left(now) or "estimating", refresh=False)
            if advanced:
                self._bar.update(advanced)
            else:
                self._bar.refresh()
            return
        if now - self._last_line >= self.interval:
            self._write_line(now)

    def update(self, count: int = 1) -> None:
        """Record ``count`` more finished units."""
        self(self.done + int(count))

    def close(self) -> None:
        """End the step: close the bar, or write a last line when earlier lines were written."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            return
        if self._lines_written:
            elapsed = self._clock() - self._started
            counted = f"{self._count_text()}, " if self.total is not None or self.done else ""
            self._emit(f"{self.desc}: {counted}done in {format_seconds(elapsed)}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        if exc_info[0] is not None and self._bar is None:
            self._closed = True  # a failed step: the error says what happened, no "done" line
            return
        self.close()

    # ------------------------------------------------------------------ text

    def _time_left(self, now: float) -> Optional[str]:
        """'~88 s left', or None before a rate can be measured (one update after the first)."""
        if self.total is None or self._reference is None:
            return None
        ref_time, ref_done = self._reference
        if self.done <= ref_done or now <= ref_time:
            return None
        rate = (self.done - ref_done) / (now - ref_time)
        return f"~{format_seconds(max(0, self.total - self.done) / rate)} left"

    def _count_text(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.total is None:
            return f"{format_count(self.done)}{unit}" if self.done else "running"
        text = f"{format_count(self.done)} / {format_count(self.total)}{unit}"
        if self.total > 0:
            text += f", {100 * self.done // self.total}%"
        return text

    def _write_line(self, now: float) -> None:
        parts = [self._count_text(), f"{format_seconds(now - self._started)} elapsed"]
        left = self._time_left(now) if self.done < (self.total or 0) else None
        if left is not None:
            parts.append(left)
        self._emit(f"{self.desc}: " + ", ".join(parts))
        self._last_line = now

    def _emit(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()
        self._lines_written += 1


_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}{postfix}]"


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Reporter:
    """Makes the :class:`Progress` of each step of a command, all on or all off (``-q``), and
    writes the command's status lines (``log``) to stderr unless quiet."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @property
    def terminal(self) -> bool:
        """True when steps draw bars: enabled, and stderr is a terminal."""
        return self.enabled and _is_terminal(sys.stderr)

    def step(self, desc: str, total: Optional[int] = None, unit: str = "") -> Progress:
        return Progress(desc, total, unit, enabled=self.enabled)

    def log(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)


def as_reporter(progress) -> Reporter:
    """The pipeline functions' ``progress`` argument: a bool (report or not) or a Reporter."""
    if isinstance(progress, Reporter):
        return progress
    return Reporter(bool(progress))
