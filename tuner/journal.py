"""RUN_DIR/optuna.journal: the search as an Optuna study, written as its trials go, so that
`optuna-dashboard RUN_DIR/optuna.journal` shows a running search.

A mirror, not the sampler's study: Ray's OptunaSearch keeps its own study in memory, which is
what the sampler sees (unchanged; the bench figures were measured with it). The search's driver
writes this one from Ray's trial events (tuner/_ray.py LiveJournal), through Optuna's
JournalStorage on a JournalFileBackend with its default lock (a symlink: it works on local disks
and NFS, and is the lock optuna-dashboard takes when it writes a note into the same file).
No Ray here: the report rebuilds the same study from the tables with the same code (replay).

One Optuna trial per Ray trial, found again by its user attr `ray_trial_id`:

- RUNNING from the trial's start, with its sampled params and the space's distributions;
- an intermediate value per reported epoch, step = the epoch (Ray's training_iteration), of the
  first objective; a diverged epoch's figures are stand-ins and are not reported;
- at its end: COMPLETE with its best epoch's value(s) by the first objective (trials.parquet's
  best_*, what the summary ranks by); PRUNED when it ended before max_epochs (ASHA stopped it, or
  the time limit did; Optuna gives a pruned trial its last intermediate value); FAIL when it
  diverged, errored or has no finite value. User attrs: `best` (the best epoch and its objective
  values, kept as it improves), then `status` (trials.parquet's word) and `epochs`.

Several objectives: Optuna's Trial.report refuses a multi-objective study, so such a study gets no
intermediate values (`best` still follows the trial); a PRUNED trial is allowed there, without
values (there is no last intermediate value to give it).

A trial's start is one journal line (a template trial created RUNNING with its params and
distributions: BaseStorage.create_new_trial), so a driver killed at any point leaves no trial
half made. `--resume` opens the same journal: a trial Ray restores and runs on continues its
journal trial (a retry after a crash does the same); one that had ended stays as it is (Optuna
does not reopen a finished trial, so an errored trial that --resume retries stays FAIL here; its
row in trials.parquet has the final word). A trial still RUNNING in the journal that Ray's
restored state does not know (it started after Ray's last save) is ended FAIL with status
`lost`. A journal none of whose trials Ray knows is an abandoned attempt's (--resume found
nothing to resume and started anew): it is replaced.

Its lines are gathered (Gathered): each append to Optuna's file backend is a lock, a write and an
fsync, about 8 per trial; with Optuna's replay of each, the journal cost the driver 7.5 ms a trial
(bench/many_trials.py --profile, 200 trials; 3.2 ms gathered). The driver, the journal's only
writer, holds them in memory and writes them
together: at most once a second, and each time Ray saves its experiment state (tuner/_ray.py
LiveJournal.get_state, called by Ray just before it writes the state), so that what Ray's saved
state can restore is always in the file; a driver killed loses at most the second of lines since.

Writing the journal never stops a search: the first error is told in one line, the driver writes
no more of it and removes it (it is no longer current); the report then writes it from the tables. A run folder at a URI
(s3://, gs://) gets no live journal (a file lock cannot live on object storage): `tune-resnet
report` on a local copy writes it, as before.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from . import storage
from .errors import Say, warn as stderr
from .results import SearchRecord, read_record, trial_status

JOURNAL_FILE = storage.JOURNAL_FILE
RAY_TRIAL_ID = "ray_trial_id"  # the user attr that ties a journal trial to its Ray trial
GATHER_S = 1.0                 # the live journal's lines are written at most this often (and at Ray's saves)
LIVE = "live"                  # the study's user attr: written by the search as it ran (the report keeps it)
ENDED_AS = {"completed": TrialState.COMPLETE, "early_stopped": TrialState.PRUNED}  # anything else: FAIL


def param_distributions(space: dict[str, Any]) -> dict[str, BaseDistribution]:
    """Distributions of the sampled params of search.json's space (a SearchSpec.model_dump);
    constants (`value`) are not sampled, so they have none."""
    distributions = {}
    for name, param in space.get("params", {}).items():
        param = {key: value for key, value in param.items() if value is not None}
        ints = param.get("int", param.get("int_"))
        if "uniform" in param:
            distributions[name] = optuna.distributions.FloatDistribution(*param["uniform"])
        elif "loguniform" in param:
            distributions[name] = optuna.distributions.FloatDistribution(*param["loguniform"], log=True)
        elif ints is not None:
            distributions[name] = optuna.distributions.IntDistribution(
                *ints, log=bool(param.get("log")), step=param.get("step") or 1)
        elif "choice" in param:
            distributions[name] = optuna.distributions.CategoricalDistribution(param["choice"])
    return distributions


@dataclass(frozen=True)
class StudyShape:
    """What the study is made of: its name (the run's), the objectives (the first is the one ASHA
    judges), the params' distributions, and the epochs a trial runs when nothing stops it."""

    name: str
    metrics: tuple[str, ...]
    modes: tuple[str, ...]
    distributions: dict[str, BaseDistribution]
    max_epochs: int

    @classmethod
    def of(cls, name: str, record: SearchRecord) -> StudyShape:
        """From search.json: several objectives where the space lists them, else its one metric."""
        objectives = record.space.get("objective", {}).get("metrics") or []
        if len(objectives) > 1:
            metrics, modes = tuple(m["metric"] for m in objectives), tuple(m["mode"] for m in objectives)
        else:
            metrics, modes = (record.metric,), (record.mode,)
        return cls(name, metrics, modes, param_distributions(record.space), int(record.max_epochs))

    def better(self, value: float, than: float | None) -> bool:
        return than is None or (value > than if self.modes[0] == "max" else value < than)


# ---------------------------------------------------------------------------------------------
# The study in the journal file (raises what Optuna and the file raise)
# ---------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    number: int                      # the journal trial's number
    trial_id: int                    # the storage's id of it
    finished: bool = False
    steps: set[int] = field(default_factory=set)  # epochs with an intermediate value
    best: dict[str, Any] | None = None            # {"epoch": ..., <metric>: value, ...}


class Gathered(optuna.storages.journal.BaseJournalBackend):
    """Optuna's JournalFileBackend with its appends held in memory and written together by flush():
    one lock, one write and one fsync for all of them, where JournalStorage makes one append per
    operation. Only for a file this process alone writes (the search's driver and its journal):
    a line another process appends meanwhile would be numbered wrongly here. Reads see the
    held lines after the file's, so the storage in this process is always current.
    append_logs flushes by itself once every_s has passed since the last flush."""

    def __init__(self, path: str | Path, every_s: float = GATHER_S, clock: Callable[[], float] | None = None) -> None:
        self.file = optuna.storages.journal.JournalFileBackend(str(path))
        self.every_s, self.clock = every_s, clock or time.monotonic
        self.held: list[dict[str, Any]] = []
        self.in_file: int | None = None  # lines in the file, known once it was read from the start
        self.flushed_at = -math.inf

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        logs: list[dict[str, Any]] = []
        if self.in_file is None or log_number_from < self.in_file:
            logs = list(self.file.read_logs(log_number_from))
            self.in_file = log_number_from + len(logs)
        return logs + self.held[max(0, log_number_from - self.in_file):]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self.held.extend(logs)
        if self.due():
            self.flush()

    def due(self) -> bool:
        """every_s has passed since the last flush."""
        return self.clock() - self.flushed_at >= self.every_s

    def flush(self) -> None:
        """Write the held lines (raises what the file raises; they stay held then)."""
        if self.held:
            if self.in_file is None:
                self.read_logs(0)
            self.file.append_logs(self.held)
            self.in_file += len(self.held)
            self.held = []
        self.flushed_at = self.clock()


class JournalStudy:
    """The study in a journal file, opened (made if absent) for writing; trials by Ray trial id.
    path None: a study in memory (the report's replay, copied into a journal in a line per trial
    rather than one per event: each line written is a lock and an fsync).
    gather: the lines are held and written by flush(), at most once a second (Gathered)."""

    def __init__(self, path: str | Path | None, shape: StudyShape, *, attrs: Mapping[str, Any] = (),
                 gather: bool = False) -> None:
        """attrs: the study's user attrs, set when this call makes the study."""
        self.shape = shape
        self.gathered: Gathered | None = None
        if path is None:
            self.storage: optuna.storages.BaseStorage = optuna.storages.InMemoryStorage()
        else:
            repair(path)
            backend = self.gathered = Gathered(path) if gather else None
            self.storage = optuna.storages.JournalStorage(backend or optuna.storages.journal.JournalFileBackend(str(path)))
        self.study = _create_or_load(self.storage, shape, dict(attrs))
        self.study_id = self.storage.get_study_id_from_name(shape.name)
        self.trials: dict[str, _Entry] = {}
        for trial in self.study.get_trials(deepcopy=False):
            ray_id = trial.user_attrs.get(RAY_TRIAL_ID)
            if ray_id is not None:
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
                self.trials[ray_id] = _Entry(trial.number, trial_id, trial.state.is_finished(),
                                             set(trial.intermediate_values), trial.user_attrs.get("best"))

    def running(self) -> list[str]:
        """The Ray trial ids whose journal trial has not ended."""
        return [ray_id for ray_id, entry in self.trials.items() if not entry.finished]

    def start(self, ray_id: str, params: Mapping[str, Any]) -> None:
        """A RUNNING trial with the sampled params (those of the space); nothing when the Ray trial
        is in the journal already (a retry or a resumed trial continues it; an ended one stays)."""
        if ray_id in self.trials:
            return
        params = {n: v for n, v in params.items() if n in self.shape.distributions and v is not None}
        template = optuna.trial.create_trial(state=TrialState.RUNNING, params=params,
                                             distributions={n: self.shape.distributions[n] for n in params},
                                             user_attrs={RAY_TRIAL_ID: ray_id})
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=template)
        self.trials[ray_id] = _Entry(self.storage.get_trial_number_from_id(trial_id), trial_id)

    def report(self, ray_id: str, row: Mapping[str, Any]) -> None:
        """One reported epoch (Ray's result row): its intermediate value, and `best` when it is."""
        entry = self._open(ray_id)
        step, value = int(row.get("training_iteration") or 0), _number(row.get(self.shape.metrics[0]))
        if entry is None or row.get("diverged") or step < 1 or value is None:
            return
        if len(self.shape.metrics) == 1 and step not in entry.steps:  # a retry's repeated epoch: the first stays
            self.storage.set_trial_intermediate_value(entry.trial_id, step, value)
            entry.steps.add(step)
        if self.shape.better(value, (entry.best or {}).get(self.shape.metrics[0])):
            entry.best = {"epoch": step, **{m: _number(row.get(m)) for m in self.shape.metrics}}
            self.storage.set_trial_user_attr(entry.trial_id, "best", entry.best)

    def end(self, ray_id: str, status: str, epochs: int) -> None:
        """The trial's end, status as trials.parquet says it (results.trial_status, or `lost`)."""
        entry = self._open(ray_id)
        if entry is None:
            return
        values = [(entry.best or {}).get(m) for m in self.shape.metrics]
        state = ENDED_AS.get(status, TrialState.FAIL) if None not in values else TrialState.FAIL
        self.storage.set_trial_user_attr(entry.trial_id, "status", status)
        self.storage.set_trial_user_attr(entry.trial_id, "epochs", epochs)
        self.study.tell(entry.number, values if state == TrialState.COMPLETE else None, state=state)
        entry.finished = True

    def flush(self) -> None:
        """The held lines into the file (gather=True), now."""
        if self.gathered is not None:
            self.gathered.flush()

    def flush_if_due(self) -> None:
        """The held lines into the file, if a second has passed since they were last written."""
        if self.gathered is not None and self.gathered.due():
            self.gathered.flush()

    def _open(self, ray_id: str) -> _Entry | None:
        entry = self.trials.get(ray_id)
        return None if entry is None or entry.finished else entry


def _create_or_load(journal: optuna.storages.BaseStorage, shape: StudyShape, attrs: dict[str, Any]) -> optuna.Study:
    """The study of that name in the journal, made with attrs if absent. Its sampler and pruner
    are never asked for anything (every param is fixed, no trial is judged): the cheapest ones."""
    options = dict(storage=journal, study_name=shape.name, sampler=optuna.samplers.RandomSampler(seed=0),
                   pruner=optuna.pruners.NopPruner())
    try:
        return optuna.load_study(**options)
    except KeyError:  # not there yet
        pass
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created ..." in our output
    try:
        directions = ["maximize" if mode == "max" else "minimize" for mode in shape.modes]
        study = optuna.create_study(directions=directions, **options)
        with warnings.catch_warnings():  # set_metric_names is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(shape.metrics))
    finally:
        optuna.logging.set_verbosity(verbosity)
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    return study


def repair(path: str | Path) -> None:
    """What a writer killed mid-write leaves: its lock (Optuna waits 30 s before it takes one over;
    the search's driver is the journal's writer, so a lock there at its start is a dead one) and a
    last line cut short (the next line written after it would make both unreadable)."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        optuna.storages.journal.JournalFileSymlinkLock(str(path)).release()
    except RuntimeError:  # no lock: the usual case
        pass
    with open(path, "rb+") as journal:
        text = journal.read()
        if text and not text.endswith(b"\n"):
            journal.truncate(text.rfind(b"\n") + 1)


def _number(value: Any) -> float | None:
    """A finite float (for JSON and Optuna), else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and not isinstance(value, bool) else None


def is_live_and_whole(path: str | Path, name: str, ray_ids: Iterable[str]) -> bool:
    """The journal at path holds the study `name` as the search wrote it (user attr LIVE) with a
    trial for each of ray_ids: the report keeps it as it is."""
    if not Path(path).is_file():
        return False
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    try:
        study = optuna.load_study(study_name=name, storage=journal)
    except KeyError:
        return False
    held = {t.user_attrs.get(RAY_TRIAL_ID) for t in study.get_trials(deepcopy=False)}
    return bool(study.user_attrs.get(LIVE)) and set(ray_ids) <= held


# ---------------------------------------------------------------------------------------------
# The search's driver's handle: fed Ray's events as plain values, never raises
# ---------------------------------------------------------------------------------------------

class Mirror:
    """The live journal of a run folder, for the driver (tuner/_ray.py LiveJournal feeds it).
    Opened at the search's first step (begin), not before: Ray pickles this object into its
    tuner.pkl when the Tuner is made, and a resumed search gets that copy back."""

    def __init__(self, run_dir: str, *, warn: Say = stderr) -> None:
        folder = storage.local_path(run_dir)  # None at a URI: the report writes the journal there
        self.folder = Path(folder) if folder else None
        self.warn = warn
        self.shape: StudyShape | None = None
        self.failed = False
        self._study: JournalStudy | None = None
        if self.folder is not None:
            self._safely(self._read_shape)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_study": None}  # the open file stays with this process

    @property
    def path(self) -> Path | None:
        return self.folder / JOURNAL_FILE if self.folder else None

    @property
    def begun(self) -> bool:
        """begin() was called in this process (or there is nothing to begin: a URI, an error)."""
        return self._study is not None or self.failed or self.shape is None

    def begin(self, ray_trials: Iterable[tuple[str, str, Mapping[str, Any]]],
              kept: Iterable[tuple[str, Mapping[str, Any], list[Mapping[str, Any]]]] = ()) -> None:
        """At the search's first step, Ray's trials as (id, Ray status, last result): none in a new
        search, the restored ones in a resumed one. Opens the journal and settles it with them.
        kept: trials --resume kept that Ray never knew (tuner._ray.keep_unsaved), as (id, params,
        epoch rows): what the journal lacks of them (lines lost with a killed driver) is told first,
        and they end as ended trials."""
        self._safely(self._begin, list(ray_trials), list(kept))

    def start(self, ray_id: str, params: Mapping[str, Any]) -> None:
        if self._study is not None:
            self._safely(self._study.start, ray_id, params)

    def report(self, ray_id: str, row: Mapping[str, Any]) -> None:
        if self._study is not None:
            self._safely(self._study.report, ray_id, row)

    def end(self, ray_id: str, last: Mapping[str, Any], *, errored: bool) -> None:
        """A trial ended: Ray's last result of it (an empty one when it reported nothing)."""
        if self._study is not None:
            self._safely(self._end, ray_id, last, errored)

    def settle(self, ray_trials: Iterable[tuple[str, str, Mapping[str, Any]]]) -> None:
        """The journal's running trials that Ray ended without telling (TERMINATED, ERROR) end
        too; those Ray does not know end FAIL as `lost`; Ray's running ones stay RUNNING.
        Then every line is written."""
        if self._study is not None:
            self._safely(self._settle, list(ray_trials))
            self.flush()

    def flush(self, *, due: bool = False) -> None:
        """The lines held into the file: now, or (due=True) when a second has passed since the last."""
        if self._study is not None:
            self._safely(self._study.flush_if_due if due else self._study.flush)

    def _read_shape(self) -> None:
        self.shape = StudyShape.of(self.folder.name, read_record(self.folder))

    def _begin(self, ray_trials: list[tuple[str, str, Mapping[str, Any]]],
               kept: list[tuple[str, Mapping[str, Any], list[Mapping[str, Any]]]] = ()) -> None:
        if self.shape is None or self._study is not None:
            return
        attrs = {LIVE: True, "run_dir": str(self.folder.resolve())}
        study = JournalStudy(self.path, self.shape, attrs=attrs, gather=True)
        if study.trials and not set(study.trials) & {ray_id for ray_id, _, _ in ray_trials}:
            del study  # an abandoned attempt's: replaced
            self.path.unlink()
            study = JournalStudy(self.path, self.shape, attrs=attrs, gather=True)
        self._study = study
        for ray_id, params, rows in kept:
            study.start(ray_id, params)  # nothing when it is there: a trial's start is one line
            for row in rows:
                study.report(ray_id, row)  # nothing for an epoch there, or once it ended
        self._settle([*ray_trials, *((ray_id, "TERMINATED", rows[-1]) for ray_id, _, rows in kept if rows)])
        study.flush()

    def _end(self, ray_id: str, last: Mapping[str, Any], errored: bool) -> None:
        epochs = int(last.get("training_iteration") or 0)
        status = trial_status(epochs=epochs, diverged=bool(last.get("diverged")), errored=errored,
                              max_epochs=self.shape.max_epochs)
        self._study.end(ray_id, status, epochs)

    def _settle(self, ray_trials: list[tuple[str, str, Mapping[str, Any]]]) -> None:
        by_id = {ray_id: (status, last) for ray_id, status, last in ray_trials}
        for ray_id in self._study.running():
            status, last = by_id.get(ray_id, (None, {}))
            if status is None:
                self._study.end(ray_id, "lost", int(last.get("training_iteration") or 0))
            elif status in ("TERMINATED", "ERROR"):
                self._end(ray_id, last, status == "ERROR")

    def _safely(self, call, *args: Any) -> None:
        """The call, unless the journal failed before; the first error is told once, ends the
        writing and removes the journal (the report then writes it whole from the tables)."""
        if self.failed:
            return
        try:
            call(*args)
        except Exception as error:  # the journal serves the dashboard; it must never stop a search
            self.failed, self._study = True, None
            try:  # no longer current: gone, so that the report writes it whole from the tables
                if self.path is not None:
                    self.path.unlink(missing_ok=True)
            except OSError:
                pass
            why = (str(error).strip().splitlines() or [""])[0][:200]
            self.warn(f"{JOURNAL_FILE}: no longer written during this search ({type(error).__name__}: {why}); "
                      "removed: the report writes it from the tables when the search ends")
