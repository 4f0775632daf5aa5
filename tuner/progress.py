"""Live progress of a search: one short line when something changes, at most every few seconds."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

from .results import trial_status


class Progress:
    def __init__(self, *, metric: str, mode: str, max_epochs: int, every_s: float = 10.0,
                 echo: Callable[[str], None] = print) -> None:
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.every_s, self.echo = every_s, echo
        self.start = self.last_print = time.monotonic()
        self.running: set[str] = set()
        self.status: dict[str, str] = {}  # finished trials: completed | early_stopped | diverged | errored
        self.counts: Counter[str] = Counter()  # of status's values, kept as trials end: a line costs O(1)
        self.best: tuple[float, str, int] | None = None  # (value, trial_id, epoch)

    def started(self, trial_id: str) -> None:
        self.running.add(trial_id)

    def result(self, trial_id: str, result: dict[str, Any]) -> None:
        value = result.get(self.metric)
        if value is None or result.get("diverged"):
            return
        better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
        if better:
            self.best = (value, trial_id, int(result.get("training_iteration", 0)))

    def finished(self, trial_id: str, last: dict[str, Any]) -> None:
        self._ended(trial_id, trial_status(epochs=int(last.get("training_iteration", 0)), errored=False,
                                           diverged=bool(last.get("diverged")), max_epochs=self.max_epochs))

    def errored(self, trial_id: str) -> None:
        self._ended(trial_id, "errored")

    def _ended(self, trial_id: str, status: str) -> None:
        self.running.discard(trial_id)
        if trial_id in self.status:  # a retried trial ends twice: counted once, by its last status
            self.counts[self.status[trial_id]] -= 1
        self.status[trial_id] = status
        self.counts[status] += 1
        self.print_line()

    def tick(self) -> None:
        if time.monotonic() - self.last_print >= self.every_s:
            self.print_line()

    def print_line(self) -> None:
        self.last_print = time.monotonic()
        elapsed = int(self.last_print - self.start)
        counts = self.counts
        parts = [f"{len(self.running)} running", f"{counts['completed']} completed",
                 f"{counts['early_stopped']} stopped early"]
        parts += [f"{counts[s]} {s}" for s in ("diverged", "errored") if counts[s]]
        best = (f"best {self.metric} {self.best[0]:.4f} (trial {self.best[1]}, epoch {self.best[2]})"
                if self.best else f"best {self.metric} -")
        self.echo(f"[{elapsed // 60:d}:{elapsed % 60:02d}] {', '.join(parts)} | {best}")
