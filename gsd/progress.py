"""Progress reporting for long loops that stays readable in log files.

On a terminal this is a tqdm bar. When the stream is not a terminal (a log file, a pipe, a
captured test), a redrawing bar would write thousands of `\\r` frames, so instead a plain
line is printed at the start, then each time another `step` fraction of the run (default
5%) is done, and at the end: about 22 lines for a whole run, whatever its length.

    bar = progress_bar(total=n, desc="teacher gmm", enabled=show)
    for it in range(n):
        ...
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()

`progress_bar(iterable, ...)` also wraps an iterable like `tqdm(iterable)`.
This module imports nothing from the gsd commands.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Iterable

__all__ = ["progress_bar", "PlainProgress", "NullProgress", "is_terminal"]

DEFAULT_STEP = 0.05  # plain mode: one line per 5% of the run
UNKNOWN_TOTAL_SECONDS = 30.0  # plain mode without a total: one line per this many seconds


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or file-like objects without isatty
        return False


class NullProgress:
    """What a disabled bar is: every call does nothing, iteration passes through."""

    def __init__(self, iterable: Iterable | None = None):
        self.iterable = iterable
        self.n = 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        pass

    def write(self, message: str) -> None:
        print(message, file=sys.stdout, flush=True)  # messages are not progress: always shown

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class PlainProgress(NullProgress):
    """Periodic plain lines: `desc: n/total (p%) rate, elapsed, postfix`. No carriage returns."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 initial: int = 0, file=None, step: float = DEFAULT_STEP):
        super().__init__(iterable)
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.total = total
        self.desc = desc
        self.n = int(initial)
        self.file = file if file is not None else sys.stderr
        self.step = step
        self.postfix = ""
        self.closed = False
        self._start_n = self.n
        self._t0 = time.perf_counter()
        self._last_t = self._t0
        self._printed_n = None
        self._next = self._next_threshold(self.n)
        self._line()

    def _next_threshold(self, n: int) -> int:
        """The smallest count after n that completes another `step` fraction of the run."""
        if not self.total or self.total <= 0:
            return 0
        k = math.floor(n / (self.total * self.step) + 1e-9) + 1
        return min(self.total, math.ceil(k * self.total * self.step - 1e-9))

    def _line(self) -> None:
        elapsed = time.perf_counter() - self._t0
        parts = [f"{self.desc}: " if self.desc else "", f"{self.n}"]
        if self.total:
            parts.append(f"/{self.total} ({100.0 * self.n / self.total:.0f}%)")
        done = self.n - self._start_n
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f", {rate:.3g} it/s" if rate >= 1 else f", {1 / rate:.3g} s/it")
        parts.append(f", {elapsed:.1f} s")
        if self.postfix:
            parts.append(f", {self.postfix}")
        print("".join(parts), file=self.file, flush=True)
        self._printed_n = self.n
        self._last_t = time.perf_counter()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total:
            if self.n >= self._next:
                self._line()
                self._next = self._next_threshold(self.n)
        elif time.perf_counter() - self._last_t >= UNKNOWN_TOTAL_SECONDS:
            self._line()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._printed_n != self.n:  # the end, unless the last line already said it
                self._line()


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 initial: int = 0, enabled: bool = True, file=None, step: float = DEFAULT_STEP,
                 leave: bool = True):
    """A tqdm bar on a terminal, PlainProgress lines otherwise, NullProgress when not enabled.

    file: the stream written to (default sys.stderr); whether it is a terminal decides the mode.
    leave: keep the finished bar on the terminal (tqdm's `leave`); plain lines always stay.
    """
    if not enabled:
        return NullProgress(iterable)
    stream = file if file is not None else sys.stderr
    if is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, file=stream, dynamic_ncols=True,
                    leave=leave)
    return PlainProgress(iterable, total=total, desc=desc, initial=initial, file=stream, step=step)
