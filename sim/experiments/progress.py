"""Sweep progress: a bar with done, failed and ETA on a terminal, plain lines elsewhere."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """Counts finished tasks and shows how far the sweep is."""

    def __init__(self, total: int, label: str, stream: Optional[TextIO] = None, enabled: bool = True) -> None:
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.done = 0
        self.failed = 0
        self.start = time.monotonic()

    def update(self, what: str, ok: bool) -> None:
        """One task finished: `what` names it."""
        self.done += 1
        self.failed += not ok
        if not self.enabled:
            return
        if self.tty:
            self._bar()
        else:
            status = "ok" if ok else "FAILED"
            print(f"{self.label} {self.done}/{self.total} {status}: {what} [{self._eta()}]", file=self.stream,
                  flush=True)

    def _eta(self) -> str:
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        return f"elapsed {_clock(elapsed)}, ETA {_clock(left)}"

    def _bar(self, width: int = 30) -> None:
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        failed = f", {self.failed} failed" if self.failed else ""
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total}{failed}  {self._eta()}   ")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.done:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d}"
