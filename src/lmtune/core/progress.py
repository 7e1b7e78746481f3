"""Progress of long work (scoring thousands of examples, fetching pages): done, rate and time left.

On a terminal a rich progress bar; otherwise (CI, a scheduler's log file, a pipe) a log line at every ~10%, so
a long run is never silent and a log file is not flooded with bar redraws.
"""

from __future__ import annotations

import logging
import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """`with Progress(total, "scoring", unit="examples") as p: ... p.advance(n)`.

    `terminal=None` asks whether stderr is a terminal; `steps` is how many log lines a full run writes at most on
    the non-terminal path (every 10% by default), each at least `min_interval` seconds after the previous one, so
    work of a few seconds writes only its final line.
    """

    def __init__(
        self,
        total: int,
        description: str,
        unit: str = "examples",
        terminal: bool | None = None,
        steps=10,
        min_interval: float = 5.0,
    ):
        self.total, self.description, self.unit = max(int(total), 0), description, unit
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.steps, self.min_interval = steps, min_interval
        self._last_line = time.perf_counter()  # (again at __enter__) the first line comes min_interval after the start
        self.done = 0
        self._next_report = 1
        self._bar: RichProgress | None = None
        self._started = time.perf_counter()

    def __enter__(self) -> Progress:
        self._started = self._last_line = time.perf_counter()
        if self.terminal and self.total:
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, rate="")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self._started, 1e-9)

    def advance(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{self.rate:.2f} {self.unit}/s")
            return
        # a line each time another 1/steps of the work is done (several at once if a chunk crosses more)
        reached = self.done * self.steps // max(self.total, 1)
        now = time.perf_counter()
        if reached >= self._next_report and (self.done == self.total or now - self._last_line >= self.min_interval):
            self._next_report, self._last_line = reached + 1, now
            left = (self.total - self.done) / self.rate if self.rate > 0 else float("inf")
            log.info(
                "%s: %d/%d %s (%d%%), %.2f %s/s, %s left",
                self.description,
                self.done,
                self.total,
                self.unit,
                100 * self.done // max(self.total, 1),
                self.rate,
                self.unit,
                _duration(left) if left != float("inf") else "?",
            )
