"""progress: what a long compile shows on a terminal, and what it logs.

A compile runs passes (capture, annotate, plan, ...) and the search prices candidate layouts; at thousands of
devices or with schedule="auto" that takes tens of seconds. `Progress` draws one tqdm line on stderr, naming the
pass and counting the candidates priced, but only when it is worth it and safe:

- nothing appears before `delay` seconds (2 s): short compiles stay silent;
- nothing appears when the stream is not a terminal (CI logs, pipes, notebooks' captured stderr) or when
  compile(verbose=False);
- the line is erased when the compile ends (tqdm's leave=False): the terminal keeps only what the caller prints.

Independently of the terminal, every pass's duration and the search's counts are logged on the logger
"partitioner" (INFO for passes, DEBUG for searches); a library adds no handler, so they show only where the
application configures logging (`partitioner plan -v` does).

Code deep in the planner reports through `current()`, the progress of the compile running in this context (a
silent one when none is), so the passes need no extra argument: `current().work("layouts", total=n)` then
`current().advance()` per candidate.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

__all__ = ["Progress", "current", "logger"]

logger = logging.getLogger("partitioner")

DELAY_S = 2.0  # compiles shorter than this print nothing
REDRAW_S = 0.1  # the line is redrawn at most this often


class Progress:
    """One compile's progress line (see the module docstring). Use as a context manager, which makes it `current()`
    inside. Calls are cheap when nothing is drawn (a time check), and the line is drawn at most 10 times a second."""

    def __init__(
        self,
        label: str,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        delay: float | None = None,
        clock: Any = time.perf_counter,
    ) -> None:
        stream = sys.stderr if stream is None else stream
        self.label = label
        self.stream = stream
        self.enabled = bool(enabled) and _is_terminal(stream)
        self.delay = DELAY_S if delay is None else delay
        self._clock = clock
        self._start = clock()
        self._bar: Any = None  # the tqdm line, created once `delay` has passed
        self._drawn = -float("inf")  # when the line was last drawn
        self._phase = ""
        self._work = ""
        self._done = 0
        self._total: int | None = None
        self._token: contextvars.Token | None = None
        self.times: dict[str, float] = {}  # seconds per pass, summed over its runs

    # -- the compile's passes -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A pass of the compile: shown while it runs; its duration is added to `times[name]` and logged (INFO)."""
        outer, self._phase = self._phase, name
        self._work, self._done, self._total = "", 0, None
        t0 = self._clock()
        self._show()
        try:
            yield
        finally:
            seconds = self._clock() - t0
            self.times[name] = self.times.get(name, 0.0) + seconds
            logger.info("%s: %s took %.2f s", self.label, name, seconds)
            self._phase = outer
            self._work, self._done, self._total = "", 0, None

    def work(self, what: str, total: int | None = None) -> None:
        """Start counting `total` items of `what` (e.g. the layouts a search prices) within the current pass."""
        self._work, self._done, self._total = what, 0, total
        logger.debug("%s: %s: %s %s", self.label, self._phase, total if total is not None else "some", what)
        self._show()

    def advance(self, n: int = 1) -> None:
        """`n` more items of the current work are done."""
        self._done += n
        self._show()

    # -- drawing --------------------------------------------------------------------------------------------------
    def _show(self) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if now - self._start < self.delay or now - self._drawn < REDRAW_S:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(file=self.stream, leave=False, dynamic_ncols=True, bar_format="{desc}")
        self._drawn = now
        self._bar.set_description_str(f"{self.text()} [{now - self._start:.0f} s]", refresh=True)

    def text(self) -> str:
        """The line without its clock: label, pass, and the count of the current work."""
        text = f"partitioner: {self.label}: {self._phase}" if self._phase else f"partitioner: {self.label}"
        if self._total is not None:
            text += f", {self._done}/{self._total} {self._work}"
        elif self._work:
            text += f", {self._work}" + (f" ({self._done})" if self._done else "")
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None


_SILENT = Progress("", enabled=False)
_CURRENT: contextvars.ContextVar[Progress] = contextvars.ContextVar("partitioner_progress", default=_SILENT)


def current() -> Progress:
    """The progress of the compile running in this context, or a silent one outside any."""
    return _CURRENT.get()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
