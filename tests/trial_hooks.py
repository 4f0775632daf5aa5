"""Trial hooks the tests give a search in its space (trial.hook, trial.hook_args; see tuner/hooks.py).

Trials import this module in Ray's worker processes: a test puts this folder on PYTHONPATH for the
driver and, on a cluster, for the nodes (`with_tests_on_path`), and names a hook `trial_hooks:Name`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def with_tests_on_path(env: dict[str, str]) -> dict[str, str]:
    """env with this folder first on PYTHONPATH, so that `trial_hooks` imports in every process."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))}


class Barrier:
    """Hold each trial at its start until `count` have started (a file each in `folder`), to see
    that many run at once despite slow process starts. Never waits more than timeout_s."""

    def __init__(self, folder: str, count: int, timeout_s: float = 30.0) -> None:
        self.folder, self.count, self.timeout_s = folder, count, timeout_s

    def on_start(self, trainer) -> None:
        Path(self.folder, f"{os.getpid()}-{time.time_ns()}").touch()
        deadline = time.monotonic() + self.timeout_s
        while len(os.listdir(self.folder)) < self.count and time.monotonic() < deadline:
            time.sleep(0.05)


class CrashAt:
    """Kill the trial's process (no exception, no cleanup) once it is at `epoch`, once per marker
    file; every call is also written to `log` when one is given, one JSON line each."""

    def __init__(self, epoch: int, marker: str, log: str | None = None) -> None:
        self.epoch, self.marker, self.log = epoch, marker, log

    def on_start(self, trainer) -> None:
        self._record("start", trainer.epoch)
        self._crash_if_due(trainer.epoch)

    def on_epoch_end(self, trainer, row) -> None:
        self._record("epoch_end", trainer.epoch, row["epoch"])
        self._crash_if_due(trainer.epoch)

    def _record(self, call: str, epoch: int, reported: int | None = None) -> None:
        if self.log:
            with open(self.log, "a") as out:
                out.write(json.dumps({"call": call, "epoch": epoch, "reported": reported, "pid": os.getpid()}) + "\n")

    def _crash_if_due(self, epoch: int) -> None:
        if epoch == self.epoch and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)


class ScoreTable:
    """Replace each epoch's val_acc by scores[str(lr)][str(seed)] (a search trial trains with the
    space's seed, a confirmation run with a fresh one), to give a test configurations whose luck
    it chooses; sleep_s: a pause per epoch of the runs with a seed other than search_seed."""

    def __init__(self, scores: dict[str, dict[str, float]], search_seed: int = 0, sleep_s: float = 0.0) -> None:
        self.scores, self.search_seed, self.sleep_s = scores, search_seed, sleep_s

    def on_epoch_end(self, trainer, row) -> None:
        config = trainer.config
        row["val_acc"] = self.scores[str(config.lr)][str(config.seed)]
        if config.seed != self.search_seed:
            time.sleep(self.sleep_s)


class Pause:
    """A pause of sleep_s after each epoch: trials long enough for a test to act while they run."""

    def __init__(self, sleep_s: float) -> None:
        self.sleep_s = sleep_s

    def on_epoch_end(self, trainer, row) -> None:
        time.sleep(self.sleep_s)


class PauseAndHold:
    """Pause's sleep_s after each epoch; and a trial that starts on a node named in the file
    `hold` (a node id a line) waits at its start until the file is gone (at most timeout_s): a
    test keeps a node busy so that the trials to come go elsewhere."""

    def __init__(self, sleep_s: float, hold: str, timeout_s: float = 180.0) -> None:
        self.sleep_s, self.hold, self.timeout_s = sleep_s, hold, timeout_s

    def on_start(self, trainer) -> None:
        import ray  # a test's hook, in a Ray worker: which node it runs on

        node = ray.get_runtime_context().get_node_id()
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                held = Path(self.hold).read_text().split()
            except FileNotFoundError:
                return
            if node not in held:
                return
            time.sleep(0.05)

    def on_epoch_end(self, trainer, row) -> None:
        time.sleep(self.sleep_s)
