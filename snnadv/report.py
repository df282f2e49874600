"""Progress display and result output shared by every stage (rich + JSON).

A :class:`Reporter` owns the console: progress bars for long work, tables for
results.  ``quiet=True`` silences it (tests, library use); under ``torchrun`` only
rank 0 shows anything (the others are quiet).  When the output is not a
terminal (a log file), a long loop prints a plain line instead of a bar every
``progress_every`` seconds (30, or ``$SNNADV_PROGRESS_EVERY``): description,
done/total, elapsed, estimate left.  Result files are written by :mod:`snnadv.outputs`
(atomically).
"""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class Reporter:
    def __init__(self, quiet: bool = False, console: Console | None = None, progress_every: float | None = None):
        self.console = console or Console(quiet=quiet, highlight=False)
        if console is None and not self.console.is_terminal:
            self.console.width = max(self.console.width, 160)  # logs: do not cut wide tables
        self._quiet = quiet
        self.progress_every = progress_every or float(os.environ.get("SNNADV_PROGRESS_EVERY") or 30.0)

    @property
    def quiet(self) -> bool:
        """Quiet as asked, or on every process but rank 0 (asked when it matters: the process
        group may be joined after the reporter is made; a rank working alone in
        :func:`snnadv.parallel.solo` stays quiet too)."""
        from . import parallel

        return self._quiet or parallel.process_rank() != 0

    @quiet.setter
    def quiet(self, value: bool) -> None:
        self._quiet = bool(value)

    def print(self, *args, **kwargs) -> None:
        if self.quiet and not self._quiet:
            return  # another rank's (an asked-for quiet is the console's own)
        self.console.print(*args, **kwargs)

    @contextmanager
    def progress(self, description: str, total: int | None):
        """A progress bar; yields ``advance(n=1, **fields)``."""
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        live = not self.quiet and self.console.is_terminal  # no bars in logs: plain lines instead
        with Progress(*columns, console=self.console, transient=True, disable=not live) as bar:
            task = bar.add_task(description, total=total, info="")
            log = _LogLines(self, description, total) if not live and not self.quiet else None

            def advance(n: int = 1, info: str | None = None) -> None:
                bar.update(task, advance=n, **({"info": info} if info is not None else {}))
                if log is not None:
                    log.update(n, info)

            try:
                yield advance
            finally:
                if log is not None:
                    log.stop()

    def table(self, title: str, columns: list[str], rows: list[list], caption: str | None = None) -> Table:
        t = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
        for c in columns:
            t.add_column(c, justify="right" if c != columns[0] else "left")
        for r in rows:
            t.add_row(*[fmt(v) for v in r])
        self.print(t)
        return t


class _LogLines:
    """Plain progress lines for logs: a timer thread prints one every ``progress_every`` s."""

    def __init__(self, reporter: Reporter, description: str, total: int | None):
        self.reporter, self.description, self.total = reporter, description, total
        self.done, self.info, self.t0 = 0, "", time.perf_counter()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def update(self, n: int, info: str | None) -> None:
        self.done += n
        if info is not None:
            self.info = info

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        text = f"{self.description}: {self.done}/{self.total if self.total is not None else '?'}"
        text += f", {_duration(elapsed)} elapsed"
        if self.total and self.done:
            text += f", ~{_duration(elapsed * (self.total - self.done) / self.done)} left"
        return text + (f" ({self.info})" if self.info else "")

    def _run(self) -> None:
        while not self.stopped.wait(self.reporter.progress_every):
            self.reporter.console.print(self.line(), markup=False, highlight=False)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.2f}" if v == 0 or 0.01 <= abs(v) < 1e6 else f"{v:.3g}"
    return "-" if v is None else str(v)
