"""A quiet console for long runs: one line per stage, one progress bar while a stage runs,
and everything else in a log file.

An engine run writes a lot besides its results: vLLM's own logging (configured at
import, to the process's stdout), the output of the engine-core process vLLM spawns
(it inherits this process's file descriptors 1 and 2, so no Python-level setting reaches
it), transformers and torch warnings, and nested progress bars. ``StageConsole``
redirects file descriptors 1 and 2 to the log for its whole ``with`` block, which
catches all of that, including the child processes started inside it; the stage lines
and the bar go to a duplicate of the original stderr taken before the redirection.
With ``verbose`` nothing is redirected and the log is not written.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["StageConsole", "Stage"]


class Stage:
    """A running stage: set ``note`` for the text after its time on the stage line."""

    def __init__(self, name: str):
        self.name, self.note = name, ""


class _Feed:
    """What vLLM's ``LLM.generate(use_tqdm=...)`` and the runners' batch loops get from
    ``StageConsole.feed`` for one engine call: the call's requests are added to the stage
    bar's total and each finished one advances it. vLLM reads ``format_dict["elapsed"]``
    (it divides by it), sets ``postfix`` and calls ``update``, ``refresh`` and ``close``."""

    def __init__(self, bar, total: int):
        self._bar, self._t0, self.n, self.postfix = bar, time.perf_counter(), 0, ""
        if bar is not None and total:
            bar.total = (bar.total or 0) + total
            bar.refresh()

    @property
    def format_dict(self) -> dict:
        return {"elapsed": max(time.perf_counter() - self._t0, 1e-6)}

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def refresh(self) -> None:
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        """The stage's bar lives on to the end of the stage."""


class StageConsole:
    """``with StageConsole(log, verbose=False, show=True) as con:`` then
    ``with con.stage("joy: extract") as st: ...`` per stage. ``show=False`` prints
    nothing (no stage lines, no bar); ``verbose`` leaves every output on the console.
    ``timings`` holds each stage's seconds; ``feed`` is the progress factory to give the
    runner (``make_runner(progress=con.feed)``) so that its batches move the stage bar."""

    def __init__(self, log_path: str | os.PathLike, verbose: bool = False, show: bool = True):
        self.log_path = None if verbose else Path(log_path)
        self.show = show
        self.timings: dict[str, float] = {}
        self._bar = None
        self._saved: list[int] = []
        self._log = None

    def __enter__(self) -> "StageConsole":
        from rich.console import Console

        sys.stdout.flush()
        sys.stderr.flush()
        self.file = os.fdopen(os.dup(2), "w", buffering=1)
        self.console = Console(file=self.file, quiet=not self.show, highlight=False)
        if self.log_path is not None:
            self._log = open(self.log_path, "a", encoding="utf-8")
            self._saved = [os.dup(1), os.dup(2)]
            os.dup2(self._log.fileno(), 1)
            os.dup2(self._log.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        if self._log is not None:
            for fd, saved in zip((1, 2), self._saved):
                os.dup2(saved, fd)
                os.close(saved)
            self._log.close()
            self._log, self._saved = None, []
        self.file.close()

    def print(self, text: str) -> None:
        """A line on the console (rich markup)."""
        self.console.print(text)

    @contextmanager
    def stage(self, name: str) -> Iterator[Stage]:
        """Time a stage under one progress bar (on a terminal only), then print its line;
        a stage that fails says so and where the details are."""
        from tqdm.auto import tqdm

        st = Stage(name)
        self._bar = tqdm(total=0, desc=f"  {name}", file=self.file, leave=False, unit="req",
                         dynamic_ncols=True, disable=None if self.show else True,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                    "requests [{elapsed}<{remaining}]")
        t = time.perf_counter()
        try:
            yield st
        except BaseException:
            self._close_bar()
            where = f"; details in {self.log_path}" if self.log_path is not None else ""
            self.print(f"[bold red]✗[/] {name} failed after {time.perf_counter() - t:.1f} s{where}")
            raise
        self._close_bar()
        self.timings[name] = time.perf_counter() - t
        note = f"  [dim]{st.note}[/]" if st.note else ""
        self.print(f"[green]✓[/] {name:<26} {self.timings[name]:6.1f} s{note}")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def feed(self, iterable=None, **kwargs):
        """A tqdm-like factory for the runner: vLLM calls it with an iterable (its
        prompt-rendering loop, passed through: no bar of its own) and with ``total=`` (one
        engine run); the runners' batch loops call it with ``total=``."""
        if iterable is not None:
            return iterable
        return _Feed(self._bar, int(kwargs.get("total") or 0))
