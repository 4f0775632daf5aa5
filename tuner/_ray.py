"""Every Ray call of the project lives here: start/join Ray, the trial function, the Tuner, its
callbacks, and reading the trials back as TrialRecords.

Ray's API moves between releases; keeping it in one module keeps the churn in one place. What to
run comes in as a tuner.plan.SearchPlan; the saved state's backup is tuner/ray_state.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
import pyarrow.fs as pafs
import ray
from ray import tune
from ray.tune.logger import JsonLoggerCallback, TBXLoggerCallback
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.config import TrainConfig
from trainables.data import Splits, load_data, make_splits
from trainables.train import EpochMetrics, NonFiniteLossError, Trainer, flush_denormals

from . import journal, latency, status, storage, tracking
from .errors import ClusterError, RunFileError
from .plan import Cluster, SearchPlan
from .ray_state import StateBackup
from .results import TrialRecord, read_record, trial_status
from . import hooks

METRIC_DIVERGED = "diverged"
KEEP_CHECKPOINTS = 2  # per running trial: the latest (to resume) and one before it (PruneCheckpoints)


# ---------------------------------------------------------------------------------------------
# Ray itself
# ---------------------------------------------------------------------------------------------

def start(*, address: str | None, num_cpus: int | None, verbose: bool) -> Cluster:
    """Start Ray embedded (default) or join a running cluster (address, e.g. 'auto')."""
    if ray.is_initialized():  # tests share one Ray per session
        return _describe(embedded=address is None)
    if address and ":" in address and not address.startswith("ray://"):
        _check_reachable(address)  # ray.init retries an absent host:port for minutes
    options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=verbose,
                                   logging_level=logging.INFO if verbose else logging.ERROR)
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=num_cpus, **options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"at {address!r}" if address else "locally"
        hint = "start one with `ray start --head` or `ray up cluster.yaml`" if address else "check --cpus/--gpus"
        raise ClusterError(f"--address: no Ray cluster reachable {where} ({str(error).splitlines()[0]}); {hint}") from None
    return _describe(embedded=address is None)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a host:port that is no Ray head before ray.init, which would retry it for minutes.

    A Ray head's GCS is a gRPC server, and every gRPC server opens an HTTP/2 connection with a
    SETTINGS frame. Anything else at the port (a web server, ssh, the dashboard's port) is told
    apart in one round trip."""
    host, _, port = address.rpartition(":")
    try:
        conn = socket.create_connection((host, int(port)), timeout=timeout_s)
    except (OSError, ValueError) as error:
        raise ClusterError(f"--address: no Ray cluster at {address} ({error}); start one with "
                           "`ray start --head` or `ray up cluster.yaml`, or leave --address out") from None
    head = b""
    with conn:
        try:
            conn.sendall(HTTP2_PREFACE + HTTP2_EMPTY_SETTINGS)
            while len(head) < 9:  # a frame header: length (3 bytes), type, flags, stream id (4)
                chunk = conn.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except OSError:  # reset, or silence until the timeout: no gRPC server either
            pass
    if len(head) < 9 or head[3] != HTTP2_SETTINGS:
        raise ClusterError(f"--address: {address} answers, but not as a Ray cluster (a Ray head's address is "
                           "its GCS port, 6379 unless `ray start --port` set another); check it with "
                           "`ray status --address ADDRESS`, or use --address auto on a cluster node")


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
HTTP2_SETTINGS = 0x04


def _describe(*, embedded: bool) -> Cluster:
    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = tuple((n.get("Resources", {}).get("CPU", 0.0), n.get("Resources", {}).get("GPU", 0.0))
                     for n in nodes)
    return Cluster(cpus=total.get("CPU", 0.0), gpus=total.get("GPU", 0.0), nodes=len(nodes),
                   max_gpus_per_node=max([gpus for _, gpus in per_node] or [0.0]), embedded=embedded,
                   node_resources=per_node)


def nodes_missing(path: str, *, timeout_s: float = 120.0) -> list[str]:
    """The alive nodes that do not see the file at path: one tiny task pinned to each node looks.

    Returns 'ip (node id)' strings; a node whose task cannot run within timeout_s counts as missing.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    look = ray.remote(num_cpus=0)(_sees)  # num_cpus=0: runs even while trials hold every CPU
    refs = [look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path)
            for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    seen = {node_id: found for node_id, found in ray.get(ready)}
    return [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in nodes if not seen.get(n["NodeID"])]


def _sees(path: str) -> tuple[str, bool]:
    """Runs on a chosen node: (the node it really ran on, whether the file is there)."""
    return ray.get_runtime_context().get_node_id(), os.path.exists(path)


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# The trial: a plain function of config, as Ray Tune wants it
# ---------------------------------------------------------------------------------------------

_SPLITS: dict[tuple, Splits] = {}  # per process: a reused actor loads and splits the data once


def _splits_for(config: TrainConfig, cache_dir: str | None) -> Splits:
    key = (config.dataset, config.data_path, config.input_size, config.storage_size, config.val_fraction,
           config.seed, config.train_subset, cache_dir)
    if key not in _SPLITS:
        data = load_data(config.dataset, config.data_path, input_size=config.input_size,
                         storage_size=config.storage_size, cache_dir=Path(cache_dir) if cache_dir else None)
        _SPLITS.clear()
        _SPLITS[key] = make_splits(data, val_fraction=config.val_fraction, seed=config.seed,
                                   train_subset=config.train_subset)
    return _SPLITS[key]


def trial(params: dict[str, Any], *, base: TrainConfig, cache_dir: str | None, threads: int,
          hook: str | None = None, hook_args: dict[str, Any] | None = None, measure: tuple[str, ...] = (),
          track: tracking.Target | None = None) -> None:
    """Train one sampled configuration, reporting once per epoch and checkpointing as often as
    CheckpointPacer allows (every epoch unless saving is slow next to the epochs; the last always).
    hook: the space's trial.hook ('module:callable', called with hook_args), told of the start and
    of each epoch's end before its report (tuner/hooks.py); None: nothing is called.
    measure: the metrics besides training's that the objectives name (params, macs, latency_ms, ...),
    measured once, after the setup, and sent with every report (tuner/latency.py).
    track: the search's MLflow run; the trial logs its own child run from here (tuner/tracking.py).

    Overheads travel with each report: setup_s (entry to the first training step: data from the
    process's cache, model build, restore) and between_epochs_s (checkpoint + report of the epoch
    before); bench/trial_overhead.py reads them."""
    entered = time.time()
    import torch

    flush_denormals()  # before the first parallel op starts the thread pool
    torch.set_num_threads(threads)
    config = base.replace(**params)  # validated as it is built
    trainer = Trainer(config, _splits_for(config, cache_dir))
    checkpoint = tune.get_checkpoint()
    if checkpoint:  # a retried or resumed trial continues from its last epoch
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(load_checkpoint(folder))
    where = {**_placement(entered), **_measured(trainer, measure, threads)}
    trial_hooks = [hooks.make(hook, hook_args)]
    if track is not None:
        trial_hooks.append(tracking.TrialLog(track, tune.get_context().get_trial_id(), params))
    hooks.call_all(trial_hooks, "on_start", trainer)
    try:
        _train_and_report(trainer, where, trial_hooks)
    except NonFiniteLossError as error:
        # Not a crash and not worth a retry: tell the scheduler and the sampler it scored nothing.
        tune.report({"epoch": error.epoch, "val_acc": 0.0, "val_loss": float(1e9), **where, METRIC_DIVERGED: 1})


def _placement(entered: float) -> dict[str, Any]:
    """Where the trial runs and when it started (columns of trials.parquet), sent with each report."""
    where = {"node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
             "gpu_ids": ",".join(map(str, ray.get_gpu_ids())),
             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "pid": os.getpid(),
             "started_at": time.time()}
    return {**where, "setup_s": where["started_at"] - entered}


def _measured(trainer: Trainer, names: tuple[str, ...], threads: int) -> dict[str, Any]:
    if not names:
        return {}
    return latency.trial_metrics(trainer.model, names=names, mean=trainer.splits.mean, std=trainer.splits.std,
                                 input_size=trainer.config.input_size, threads=threads)


def _train_and_report(trainer: Trainer, where: dict[str, Any], trial_hooks: list[Any]) -> None:
    last_epoch_end, pacer = None, CheckpointPacer()
    for metrics in trainer.epochs():
        epoch_end = time.time()
        between = None if last_epoch_end is None else epoch_end - metrics.epoch_time_s - last_epoch_end
        row = {**metrics.to_dict(), **where, "reported_at": epoch_end, "between_epochs_s": between,
               METRIC_DIVERGED: 0}
        hooks.call_all(trial_hooks, "on_epoch_end", trainer, row)  # before the report: Ray may stop the trial in it
        if pacer.due(final=trainer.epoch >= trainer.config.epochs):
            started = pacer.clock()
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(folder, trainer.state_dict())
                tune.report(row, checkpoint=tune.Checkpoint.from_directory(folder))
            pacer.saved(started)
        else:
            tune.report(row)
        last_epoch_end = epoch_end


class CheckpointPacer:
    """When to checkpoint: every epoch while saving costs at most `share` of the time since the last
    save (small models: always), less often when it costs more (measured on an H100: a ResNet-18's
    90 MB checkpoint took 0.13 s after each 1-second epoch), and always after the last epoch. A
    crashed trial then repeats a few seconds of work at most; resuming stays exact."""

    def __init__(self, share: float = 0.05, clock: Callable[[], float] = time.monotonic) -> None:
        self.share, self.clock = share, clock
        self.cost, self.last = 0.0, clock()

    def due(self, *, final: bool) -> bool:
        return final or self.cost <= self.share * (self.clock() - self.last)

    def saved(self, started: float) -> None:
        """Call after a save that began at clock() == started."""
        now = self.clock()
        self.cost, self.last = now - started, now


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------

def confirm_trial(config: dict[str, Any], **kwargs: Any) -> None:
    """A confirmation run (tuner/confirm.py): {'run': ConfirmRun as a dict}, trained as a trial of
    the search with the run's configuration and its fresh seed."""
    run = config["run"]
    trial({**run["params"], "seed": run["seed"]}, **kwargs)


def _trainable(plan: SearchPlan, function: Callable = trial):
    threads = max(1, int(plan.cpus_per_trial))
    fn = tune.with_parameters(function, base=plan.base_config, cache_dir=plan.cache_dir, threads=threads,
                              hook=plan.hook, hook_args=plan.hook_args, measure=plan.measure, track=plan.tracking)
    return tune.with_resources(fn, {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial})


def run_search(plan: SearchPlan, *, listener: Any, resume: bool, log: Any = None) -> tune.ResultGrid:
    """Run (or resume) the search; `listener` hears of trials starting, reporting and ending
    (tuner.progress.Progress); `log` (tuner.tracking.SearchLog) of trials ending."""
    path = plan.run_dir
    backup = BackUpState(path)
    callbacks = [ProgressCallback(listener), StatusIndex(path, plan.metrics or plan.metric), backup,
                 PruneCheckpoints(plan.metric, plan.mode, backup), LiveJournal(path), *_tracked(log, plan)]
    if not plan.verbose:  # the legacy reporter at verbose=0 prints nothing; ours prints progress
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        logging.getLogger("ray.tune").setLevel(logging.ERROR)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Ray times the define-by-run call, the sampler's work included: sampler.type gp fits its
        # Gaussian process there, often for more than Ray's 1 s, while the space itself takes microseconds.
        warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space` argument took")
    if resume:
        settle_concurrency(path)
        return tune.Tuner.restore(path, trainable=_trainable(plan), resume_errored=True).fit()
    return _fit(tune.Tuner(_trainable(plan), tune_config=_tune_config(plan), run_config=_run_config(plan, callbacks)))


def run_confirmation(plan: SearchPlan, runs: list[dict[str, Any]], *, listener: Any, resume: bool,
                     log: Any = None) -> tune.ResultGrid:
    """The confirmation runs (tuner/confirm.py) as an experiment of their own in RUN_DIR/confirm:
    one trial per run, all epochs (no scheduler, no sampler), with the search's resources."""
    path = confirm_dir(plan)
    trainable = _trainable(plan, confirm_trial)
    if resume:
        settle_concurrency(path)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True).fit()
    backup = BackUpState(path)
    callbacks = [ProgressCallback(listener), StatusIndex(path, plan.metrics or plan.metric), backup,
                 PruneCheckpoints(plan.metric, plan.mode, backup, below_best=False), *_tracked(log, plan)]
    config = tune.TuneConfig(max_concurrent_trials=plan.max_concurrent, reuse_actors=True,
                             trial_dirname_creator=_confirm_dirname)
    run_config = _run_config(plan, callbacks)
    run_config.name, run_config.storage_path = storage.CONFIRM_DIR, plan.run_dir
    return _fit(tune.Tuner(trainable, param_space={"run": tune.grid_search(runs)}, tune_config=config,
                           run_config=run_config))


NO_AUTO_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # Ray's documented switch (ray.tune env variables)


def _fit(tuner: tune.Tuner) -> tune.ResultGrid:
    """tuner.fit() for a new experiment, without the loggers Ray would add: _run_config passes
    Ray's JSON logger (result.json, which the tables, status and Ray's ResultGrid read) and
    EpochTensorBoard, and Ray's CSV logger would write each result a second time, to a
    progress.csv nothing reads (a cost per result in the driver's thread, bench/many_trials.py).
    A restored experiment runs with Ray's defaults: its callbacks are the ones it was saved with,
    which, for a search started by an older version, lack the JSON logger."""
    before = os.environ.get(NO_AUTO_LOGGERS)
    os.environ[NO_AUTO_LOGGERS] = "1"  # Ray reads it once, as the fit creates its callbacks
    try:
        return tuner.fit()
    finally:
        if before is None:
            os.environ.pop(NO_AUTO_LOGGERS, None)
        else:
            os.environ[NO_AUTO_LOGGERS] = before


def settle_concurrency(run_dir: str) -> None:
    """Before a restore: the trials Ray's concurrency limiter counts as running (saved in
    search_gen_state) must be trials its saved experiment state has unfinished. A driver killed
    while Ray copied its files into the run folder can leave them from two saves, one naming as
    running a trial the other has ended; Ray would then wait forever for a free slot. Local run
    folders; Ray's own file formats, read and written with Ray's helpers."""
    folder = storage.local_path(run_dir)
    try:
        state = _search_gen_state(folder) if folder else None
        limiter = (state or {}).get("name:ConcurrencyLimiter")
        if not limiter or not limiter.get("live_trials"):
            return
        unfinished = _unfinished_trials(folder)
        stale = {t for t in limiter["live_trials"] if t not in unfinished}
    except (OSError, ValueError, KeyError, EOFError):  # nothing readable to settle: Ray's restore says so
        return
    if stale:
        limiter["live_trials"] -= stale
        limiter["num_unfinished_live_trials"] = len(limiter["live_trials"])
        _save_search_gen_state(folder, state)


def _search_gen_state(folder: str) -> Any:
    """Ray's newest saved search_gen_state (its SearchGenerator's count of trials drawn and its
    wrappers' states, a pickle despite the name), read with Ray's own helper; None when there is none."""
    from ray.tune.utils.util import _load_newest_checkpoint

    return _load_newest_checkpoint(folder, "search_gen_state-*.json")


def _save_search_gen_state(folder: str, state: Any) -> None:
    """Back over the newest one, with Ray's own atomic write."""
    from ray.tune.utils.util import _atomic_save

    name = max(Path(folder).glob("search_gen_state-*.json")).name
    _atomic_save(state, folder, name, f"tmp-{name}")


def _unfinished_trials(folder: str) -> set[str]:
    """Trial ids the newest saved experiment state has neither TERMINATED nor ERROR."""
    trials = [json.loads(entry[0]) for entry in _newest_state(folder)[1]["trial_data"]]
    return {t["trial_id"] for t in trials if t.get("status") not in ("TERMINATED", "ERROR")}


def _newest_state(folder: str) -> tuple[Path, dict[str, Any]]:
    """Ray's newest saved experiment state in folder: its path and its JSON (ValueError: none)."""
    newest = max(Path(folder).glob("experiment_state-*.json"))
    return newest, json.loads(newest.read_text())


def settle_ended(run_dir: str) -> int:
    """Before a restore: the trials the status index saw end (Ray's TERMINATED) after Ray's last
    save of its state, which still has them running. Ray saves every 10 s or more, so a driver
    killed then would run them again from their last checkpoint on --resume. In the saved state
    they become TERMINATED, their last result the saved one with the index's last report over it;
    the saved searcher hears of their end as from Ray (OptunaSearch.on_trial_complete with that
    result). Local run folders; Ray's own file formats. How many were settled."""
    folder = storage.local_path(run_dir)
    index = status.read_index(Path(folder)) if folder else None
    ended = {trial_id: entry["rows"][-1] for trial_id, entry in (index[0] if index else {}).items()
             if entry["status"] == "TERMINATED" and entry["rows"]}
    if not ended:
        return 0
    try:
        path, state = _newest_state(folder)
        entries = state["trial_data"]
    except (OSError, ValueError, KeyError):  # nothing readable: Ray's restore says so
        return 0
    settled: dict[str, dict[str, Any]] = {}
    for entry in entries:
        trial, run = json.loads(entry[0]), json.loads(entry[1])
        trial_id = trial.get("trial_id")
        if trial_id in ended and trial.get("status") in ("RUNNING", "PENDING", "PAUSED"):
            trial["status"] = "TERMINATED"
            run["last_result"] = settled[trial_id] = {**(run.get("last_result") or {}), **ended[trial_id]}
            entry[0], entry[1] = json.dumps(trial, indent=2), json.dumps(run, indent=2)
    if not settled:
        return 0
    _tell_searcher(folder, settled)
    temporary = path.with_name(f".settle-{path.name}")
    temporary.write_text(json.dumps(state))
    os.replace(temporary, path)
    return len(settled)


def _saved_searcher(folder: str) -> tuple[ConstrainedOptunaSearch, Path] | None:
    """The searcher's saved state (searcher-state-*.pkl: OptunaSearch.save pickles its __dict__) as
    the search's own searcher (run_search), and its file; None when there is none, or it is not
    an OptunaSearch (a confirmation's)."""
    import pickle

    paths = sorted(Path(folder).glob("searcher-state-*.pkl"))
    try:
        saved = pickle.loads(paths[-1].read_bytes())
    except (IndexError, OSError, pickle.UnpicklingError, EOFError):
        return None
    if not isinstance(saved, dict) or "_ot_trials" not in saved:
        return None
    searcher = ConstrainedOptunaSearch.__new__(ConstrainedOptunaSearch)
    searcher.__dict__.update({"constraints": (), **saved})
    return searcher, paths[-1]


def _save_searcher(searcher: ConstrainedOptunaSearch, path: Path) -> None:
    """Back into its file, whole or not at all."""
    temporary = path.with_name(f".settle-{path.name}")
    searcher.save(str(temporary))
    os.replace(temporary, path)


def _tell_searcher(folder: str, ended: dict[str, dict[str, Any]]) -> None:
    """The saved searcher told of trials that ended, with their last results, through its own
    on_trial_complete."""
    found = _saved_searcher(folder)
    if found is None:
        return
    searcher, path = found
    for trial_id, result in ended.items():
        if trial_id in searcher._ot_trials and trial_id not in searcher._completed_trials:
            searcher.on_trial_complete(trial_id, result=result)
    _save_searcher(searcher, path)


def keep_unsaved(run_dir: str) -> int:
    """Before a restore: the trials that started and ended after Ray's last save of its state.
    Ray's restored state has never heard of them (it saves every 10 s or more: with short trials,
    a killed driver's last 10 s can be a hundred finished trials), so its searcher would draw as
    many new ones in their place and their work would be lost. They are kept instead: the saved
    searcher is told of each (its params, each epoch's value, its end, as Ray's OptunaSearch would
    have told its study), Ray's count of the trials it drew moves on by as many (so the search still
    ends at num_samples), and the status index marks them kept, for the tables (records) and the
    journal. What is known of them is the status index's: their sampled params and each epoch's
    history row; their checkpoints are in their folders. Local run folders; Ray's own file formats.
    How many were kept."""
    folder = storage.local_path(run_dir)
    index = status.read_index(Path(folder)) if folder else None
    try:
        _, state = _newest_state(folder)
        saved = {json.loads(entry[0]).get("trial_id") for entry in state["trial_data"]}
        generator = _search_gen_state(folder)
    except (OSError, ValueError, KeyError, TypeError, EOFError):  # nothing readable: Ray's restore says so
        return 0
    unsaved = {trial_id: entry for trial_id, entry in (index[0] if index else {}).items()
               if entry["status"] == "TERMINATED" and entry["rows"] and entry["params"] is not None
               and not entry["kept"] and trial_id not in saved}
    if not unsaved or not isinstance(generator, dict) or "counter" not in generator:
        return 0
    _tell_searcher_of_unsaved(folder, unsaved)
    generator["counter"] += len(unsaved)
    _save_search_gen_state(folder, generator)
    storage.append_lines(run_dir, storage.STATUS_INDEX,
                         [line for trial_id in unsaved for line in status.index_lines("kept", trial_id, at=time.time())])
    return len(unsaved)


def _tell_searcher_of_unsaved(folder: str, unsaved: dict[str, dict[str, Any]]) -> None:
    """The saved searcher (searcher-state-*.pkl) told of trials Ray never knew, through its Optuna
    study's public API: each enqueued with its params and asked for, its epochs reported (one
    objective: as OptunaSearch.on_trial_result), its constraints set and its last epoch told (as
    on_trial_complete). A trial without its objectives' values is told as failed."""
    found = _saved_searcher(folder)
    if found is None:
        return
    try:
        distributions = journal.param_distributions(read_record(Path(folder)).space)
    except (OSError, ValueError, KeyError, RunFileError):
        return
    searcher, path = found
    study, metrics = searcher._ot_study, searcher._metric
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    for entry in unsaved.values():
        params = {n: v for n, v in entry["params"].items() if n in distributions and v is not None}
        study.enqueue_trial(params)
        trial = study.ask({n: distributions[n] for n in params})
        last = entry["rows"][-1]
        values = [last.get(name) for name in names]
        if isinstance(metrics, str):
            for row in entry["rows"]:
                if row.get(metrics) is not None and not row.get(METRIC_DIVERGED):
                    trial.report(row[metrics], int(row.get("training_iteration") or 0))
        for constraint in searcher.constraints:
            trial.set_constraint(str(constraint), constraint.violation(last.get(constraint.metric)))
        if None in values:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, values[0] if isinstance(metrics, str) else values)
    _save_searcher(searcher, path)


def kept_trials(run_dir: str | Path | None) -> dict[str, dict[str, Any]]:
    """The trials --resume kept (keep_unsaved): their status index entries, by trial id."""
    index = status.read_index(Path(run_dir)) if run_dir and not storage.is_uri(str(run_dir)) else None
    return {trial_id: entry for trial_id, entry in (index[0] if index else {}).items() if entry["kept"] and entry["rows"]}


def _confirm_dirname(trial) -> str:
    """confirm_<trial id>_of_<search trial>_seed<seed>: short, where Ray's default spells out every param."""
    run = trial.config["run"]
    return f"confirm_{trial.trial_id}_of_{run['confirm_of']}_seed{run['seed']}"


def confirm_dir(plan: SearchPlan) -> str:
    return f"{plan.run_dir}/{storage.CONFIRM_DIR}"


def interrupted(grid: tune.ResultGrid, expected: int | None, run_dir: str | None = None) -> bool:
    """Ray Tune returns normally after a Ctrl-C: trials left unfinished tell it was interrupted,
    or fewer trials than expected (None: a time limit, fewer are fine), counting those --resume
    kept in run_dir (keep_unsaved: Ray does not know them)."""
    trials = grid._experiment_analysis.trials  # statuses are not on the public Result objects
    unfinished = any(t.status not in ("TERMINATED", "ERROR") for t in trials)
    return unfinished or (expected is not None and len(trials) + len(kept_trials(run_dir)) < expected)


def can_resume(run_dir: str) -> bool:
    return tune.Tuner.can_restore(run_dir)


def _tune_config(plan: SearchPlan) -> tune.TuneConfig:
    several = len(plan.metrics) > 1  # Optuna's multi-objective study; ASHA judges plan.metric, the first
    searcher = ConstrainedOptunaSearch(space=plan.define_by_run, metric=list(plan.metrics) if several else plan.metric,
                                       mode=list(plan.modes) if several else plan.mode, sampler=plan.sampler,
                                       constraints=plan.constraints)
    scheduler = ResumableASHA(time_attr=TRAINING_ITERATION, metric=plan.metric, mode=plan.mode,
                              max_t=plan.max_epochs, grace_period=plan.grace_period,
                              reduction_factor=plan.reduction_factor)
    return tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=plan.num_samples,
                           max_concurrent_trials=plan.max_concurrent, time_budget_s=plan.time_limit_s,
                           reuse_actors=True)  # a reused process keeps torch imported and the data loaded


class ResumableASHA(ASHAScheduler):
    """Ray Tune's ASHA, whose rungs survive --resume. Ray saves no scheduler with an experiment
    (ray-project/ray#30838): a restored search runs with the one pickled in tuner.pkl at its start,
    its rungs empty, so the trials after a resume would be judged against few or no others and
    stopped less. This one, at the first trial Ray adds in a process (on a restore, before any
    trial runs), tells itself, through ASHA's own on_trial_add / on_trial_result /
    on_trial_complete, every result of each trial the status index saw end (kept ones included),
    each trial's in the order it reported them (what a rung records of a trial does not depend on
    the others'), so its rungs hold what they held before the driver stopped; the decisions it
    returns for them are moot. A trial that was running (or errored, and is retried) has its
    epochs before the one it restarts at told at its first result. The run folder is the one Ray's
    restored trials name (a folder moved since is followed); a new search's index has no trial
    yet: nothing to tell. Remote (URI) storage: not read."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._told = False
        self._restarting: dict[str, list[dict[str, Any]]] = {}  # trial id -> epochs told at its first result

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._told:
            self._told = True
            self._tell_ended(tune_controller, trial.storage)
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        rows = self._restarting.pop(trial.trial_id, None)
        if rows and self._time_attr in result:
            for row in rows:
                if row.get(self._time_attr, math.inf) < result[self._time_attr]:  # not to be reported again
                    super().on_trial_result(tune_controller, trial, row)
        return super().on_trial_result(tune_controller, trial, result)

    def _tell_ended(self, tune_controller, experiment: Any) -> None:
        """experiment: the trial's Ray StorageContext (None for a trial without one)."""
        folder = None
        if experiment is not None:
            folder = storage.local_path(_as_uri(experiment.storage_filesystem, experiment.experiment_fs_path))
        index = status.read_index(Path(folder)) if folder else None
        for trial_id, entry in (index[0] if index else {}).items():
            if not entry["rows"]:
                continue
            if entry["status"] != "TERMINATED":
                self._restarting[trial_id] = entry["rows"]
                continue
            ended = tune.experiment.Trial(self.__class__.__name__, stub=True, trial_id=trial_id)
            super().on_trial_add(tune_controller, ended)
            for row in entry["rows"]:
                super().on_trial_result(tune_controller, ended, row)
            super().on_trial_complete(tune_controller, ended, entry["rows"][-1])


def _run_config(plan: SearchPlan, callbacks: list[tune.Callback]) -> tune.RunConfig:
    return tune.RunConfig(
        name=plan.name, storage_path=plan.storage, callbacks=[*callbacks, JsonLoggerCallback(), *_tensorboard(plan)],
        verbose=2 if plan.verbose else 0,
        failure_config=tune.FailureConfig(max_failures=plan.max_failures),
        # num_to_keep: not Ray's (it forces a save of the whole state per trial); PruneCheckpoints keeps 2
    )


def _tensorboard(plan: SearchPlan) -> list[tune.Callback]:
    """Ray's TensorBoard logger, given each epoch's metrics only (EpochTensorBoard); none when
    tensorboardX is not installed (Ray then adds none either)."""
    try:
        return [EpochTensorBoard(plan.metrics)]
    except ImportError:
        return []


class EpochTensorBoard(TBXLoggerCallback):
    """Ray Tune's TensorBoard logger (the one Ray adds by default, which this one replaces), told
    only what a trial measured: each epoch's training metrics (trainables.train.EpochMetrics) and
    the objectives' measured columns (params, latency_ms, ...), and at a trial's end the same as
    hparams. Ray's own writes every number of the result, about 18 per epoch here: the trial's
    placement, timestamps and Ray's counters too, a scalar each, in the driver's thread. It was
    the largest of the driver's costs per trial (15.5 ms of about 60, bench/many_trials.py
    --profile) and the bookkeeping half of it is in trials.parquet already."""

    KEEP = frozenset(f.name for f in dataclasses.fields(EpochMetrics)) - {"epoch"}  # the step is the epoch

    def __init__(self, metrics: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.keep = self.KEEP | set(metrics)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        kept = {k: v for k, v in result.items() if k in self.keep}
        kept[TRAINING_ITERATION] = result[TRAINING_ITERATION]  # the step
        super().log_trial_result(iteration, trial, kept)


class ConstrainedOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, telling Optuna each finished trial's constraint values
    (Trial.set_constraint: <= 0 feasible) before its objective values; Optuna's constrained samplers
    (TPE, NSGA-II, GP) then prefer the feasible trials. Ray itself passes no constraint on."""

    def __init__(self, *args: Any, constraints: tuple = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.constraints = tuple(constraints)  # search_spaces.Constraint

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if self.constraints and result and ot_trial is not None and trial_id not in self._completed_trials:
            for constraint in self.constraints:
                ot_trial.set_constraint(str(constraint), constraint.violation(result.get(constraint.metric)))
        super().on_trial_complete(trial_id, result, error)


class ProgressCallback(tune.Callback):
    """Forwards trial events to a plain listener (tuner.progress) with Ray's objects unwrapped."""

    def __init__(self, listener: Any) -> None:
        self.listener = listener

    def on_trial_start(self, iteration, trials, trial, **info):
        self.listener.started(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.listener.result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.listener.finished(trial.trial_id, trial.last_result or {})

    def on_trial_error(self, iteration, trials, trial, **info):
        self.listener.errored(trial.trial_id)

    def on_step_end(self, iteration, trials, **info):
        self.listener.tick()


def _tracked(log: Any, plan: SearchPlan) -> list[tune.Callback]:
    return [EndTrackedTrials(log, plan.max_epochs)] if log is not None and log.active else []


class EndTrackedTrials(tune.Callback):
    """Ends each trial's MLflow run with its outcome (tuner/tracking.py): the trial cannot, as ASHA
    stops it inside a report. A trial retried after an error is ended again by its last try."""

    def __init__(self, log: Any, max_epochs: int) -> None:
        self.log, self.max_epochs = log, max_epochs

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        self.log.trial_ended(trial.trial_id, trial_status(epochs=int(last.get("epoch") or 0), errored=False,
                                                          diverged=bool(last.get(METRIC_DIVERGED)),
                                                          max_epochs=self.max_epochs))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log.trial_ended(trial.trial_id, "errored")


class StatusIndex(tune.Callback):
    """Appends RUN_DIR/status-index.jsonl (tuner/status.py): a line when the search starts, when a
    trial starts, reports an epoch (its history row) and ends, so `tune-resnet status` reads one
    file, current, not every trial's result.json (Ray's copies, every 10 s or more). O(1) per event."""

    def __init__(self, run_dir: str, metrics: str | tuple[str, ...]) -> None:
        # the objectives, each epoch's line has them (named `metric` as in a search started before:
        # a resumed search gets the callback Ray pickled then)
        self.run_dir, self.metric = run_dir, metrics

    def setup(self, **info):
        self._append(status.index_lines("search", "", at=time.time()))

    def on_trial_start(self, iteration, trials, trial, **info):
        logdir = getattr(trial.storage, "trial_dir_name", None) if trial.storage else None
        self._append(status.index_lines("start", trial.trial_id, at=time.time(), logdir=logdir,
                                        params=trial.config or {}))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._append(status.index_lines("epoch", trial.trial_id, at=time.time(),
                                        row=status.index_row(result, self.metric)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._append(status.index_lines("end", trial.trial_id, at=time.time(), ray_status="TERMINATED"))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._append(status.index_lines("end", trial.trial_id, at=time.time(), ray_status="ERROR"))

    def _append(self, lines: list[str]) -> None:
        try:
            storage.append_lines(self.run_dir, storage.STATUS_INDEX, lines)
        except OSError:  # the index serves `status`; it must never stop a search
            pass


class LiveJournal(tune.Callback):
    """Writes RUN_DIR/optuna.journal as trials start, report and end (tuner/journal.py: the study
    optuna-dashboard shows, a mirror of the search; the sampler's own study is not touched). Its
    errors never stop a search: the first is told in one line, and the report rebuilds the journal.
    Its lines are written together at most once a second (at a step's end), and whenever Ray saves
    its experiment state: Ray asks each callback for its state just before it writes its own
    (get_state), so the saved state never names a trial the journal on disk has not seen."""

    def __init__(self, run_dir: str) -> None:
        self.mirror = journal.Mirror(run_dir)

    def on_step_begin(self, iteration, trials, **info):
        if not self.mirror.begun:  # the first step: a resumed search's restored trials are known
            kept = kept_trials(self.mirror.folder)  # and those it kept that Ray never knew
            self.mirror.begin(_as_plain(trials), [(trial_id, entry["params"] or {}, entry["rows"])
                                                  for trial_id, entry in kept.items()])

    def on_trial_start(self, iteration, trials, trial, **info):
        self.mirror.start(trial.trial_id, trial.config or {})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.mirror.report(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.mirror.end(trial.trial_id, trial.last_result or {}, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.mirror.end(trial.trial_id, trial.last_result or {}, errored=True)

    def on_step_end(self, iteration, trials, **info):
        self.mirror.flush(due=True)

    def get_state(self):
        self.mirror.flush()  # Ray is saving its state: the journal first
        return None  # nothing of this callback's to save (a resumed search reopens the journal)

    def on_experiment_end(self, trials, **info):
        self.mirror.settle(_as_plain(trials) + _kept_as_plain(kept_trials(self.mirror.folder)))


def _as_plain(trials) -> list[tuple[str, str, dict[str, Any]]]:
    return [(t.trial_id, t.status, t.last_result or {}) for t in trials]


def _kept_as_plain(kept: dict[str, dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(trial_id, "TERMINATED", entry["rows"][-1]) for trial_id, entry in kept.items()]


class BackUpState(tune.Callback):
    """Ray copies its experiment state into the run folder in place, not by rename: a driver
    killed during the copy leaves the files empty, and `--resume` would restore nothing. Each
    time Ray has saved its state, the state files are copied to RUN_DIR/.state-backup/
    (tuner/ray_state.py) at the end of that step, from the driver's staging folder, where Ray
    writes them whole in this thread before its copy into the run folder. A save is known by
    Ray's call of get_state (it asks each callback for its state as it saves its own), so no step
    looks at the files when Ray has not saved: at 1,000 trials, looking at them each step was the
    backup's whole cost (bench/many_trials.py --profile)."""

    saved = False  # Ray saved its state in this step: copied at its end (a class default: a search
    # started by an older version resumes with the copy of this callback Ray pickled then)

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.backup: StateBackup | None = None

    @property
    def copies(self) -> int:
        """How many times changed state was copied: PruneCheckpoints deletes what it supersedes."""
        return self.backup.copies if self.backup else 0

    def get_state(self):
        self.saved = True
        return None  # nothing of this callback's to save

    def _update(self, trials) -> None:
        if not (self.saved and trials):
            return
        self.saved, trial = False, trials[0]
        if self.backup is None or self.backup.source is None:  # the staging folder appears at Ray's first save
            staging = getattr(trial.storage, "experiment_driver_staging_path", None) if trial.storage else None
            source = staging if staging and os.path.isdir(staging) else None
            if self.backup is None or source:
                copies = self.backup.copies if self.backup else 0
                self.backup = StateBackup(self.run_dir, source=source)
                self.backup.copies = copies
        self.backup.update()

    def on_step_end(self, iteration, trials, **info):
        self._update(trials)

    def on_experiment_end(self, trials, **info):
        self._update(trials)  # Ray's last save, after the last step


class PruneCheckpoints(tune.Callback):
    """Keeps the disk a search uses bounded: a running trial's last KEEP_CHECKPOINTS checkpoints
    (and the one Ray's saved state names), and once trials end, only those of the best so far.
    Ties all keep theirs (the summary picks one of them). Errored trials keep theirs: `--resume`
    may retry them.

    Ray's own CheckpointConfig(num_to_keep) is not used: it forces a save of the whole
    experiment state each time a trial has checkpointed num_to_keep times, to never name a
    deleted checkpoint, so with 2 it saved every trial's JSON once per trial, and a search grew
    quadratic (measured in bench/many_trials.py). Here a running trial's older checkpoints are
    deleted only once a save of Ray's, backed up, names a newer one (`backup.copies` moved on)."""

    def __init__(self, metric: str, mode: str, backup: BackUpState | None = None, *, below_best: bool = True) -> None:
        self.metric, self.sign, self.backup = metric, 1.0 if mode == "max" else -1.0, backup
        self.below_best = below_best  # False: the ended trials keep their last ones (the confirmation runs)
        self.score: dict[str, float] = {}  # trial_id -> best signed value so far
        self.best = -math.inf  # max of score, kept as it grows: not a pass over every trial per result
        self.finished: dict[str, Any] = {}  # trial_id -> trial, checkpoints still on disk
        self.saved: dict[str, list[str]] = {}  # trial_id -> its checkpoints' paths still on disk, oldest first
        self.settled: dict[str, int] = {}  # trial_id -> how many of them a backed-up save of Ray's has seen
        self.copies = 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if value is None or result.get(METRIC_DIVERGED) or not math.isfinite(value):
            return
        self.score[trial.trial_id] = max(self.score.get(trial.trial_id, -math.inf), self.sign * value)
        self.best = max(self.best, self.score[trial.trial_id])
        self._prune_below_best()

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self.saved.setdefault(trial.trial_id, []).append(checkpoint.path)

    def on_step_end(self, iteration, trials, **info):
        copies = self.backup.copies if self.backup else self.copies + 1
        if copies == self.copies:
            return
        self.copies = copies  # Ray saved its state (and it was backed up): it names each trial's newest
        by_id = {t.trial_id: t for t in trials if t.trial_id in self.saved}
        for trial_id, paths in self.saved.items():
            older = min(self.settled.get(trial_id, 0) - 1, len(paths) - KEEP_CHECKPOINTS)
            if older > 0 and trial_id in by_id:
                _delete_paths(by_id[trial_id], paths[:older])
                del paths[:older]
            self.settled[trial_id] = len(paths)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished[trial.trial_id] = trial
        self._prune_below_best()

    def _prune_below_best(self) -> None:
        if not self.below_best:
            return
        for trial_id, trial in list(self.finished.items()):  # the best and its ties: few
            if self.score.get(trial_id, -math.inf) < self.best:
                _delete_checkpoints(trial)
                del self.finished[trial_id]
                self.saved.pop(trial_id, None)
                self.settled.pop(trial_id, None)


def _delete_paths(trial, paths: list[str]) -> None:
    fs = trial.storage.storage_filesystem
    for path in paths:
        try:
            fs.delete_dir(path)
        except OSError:  # pruning saves disk; it must never stop a search
            pass


def _delete_checkpoints(trial) -> None:
    storage = trial.storage
    fs = storage.storage_filesystem
    try:
        entries = fs.get_file_info(pafs.FileSelector(storage.trial_fs_path))
        for entry in entries:
            if entry.type == pafs.FileType.Directory and entry.base_name.startswith("checkpoint_"):
                fs.delete_dir(entry.path)
    except OSError:  # pruning saves disk; it must never stop a search
        pass


# ---------------------------------------------------------------------------------------------
# Reading results back
# ---------------------------------------------------------------------------------------------

def records(grid: tune.ResultGrid, run_dir: str | None = None) -> list[TrialRecord]:
    """A TrialRecord per trial of the grid. The history is Ray's result.json in the run folder,
    completed where it stops short of the trial's last result (see _completed)."""
    out, retries = [], _retries(grid)
    index = status.read_index(Path(run_dir)) if run_dir and not storage.is_uri(run_dir) else None
    indexed = index[0] if index else {}
    for result in grid:
        trial_id = result.metrics.get("trial_id") if result.metrics else None
        trial_id = trial_id or Path(result.path).name
        history = _completed(_read_history(result), result.metrics or {},
                             indexed.get(trial_id, {}).get("rows", []))
        checkpoint = _as_uri(result.filesystem, result.checkpoint.path) if result.checkpoint else None
        if checkpoint and not _exists(result.filesystem, result.checkpoint.path):
            checkpoint = None  # pruned (PruneCheckpoints): finished below the best
        error = str(result.error).strip().splitlines()[-1] if result.error else None
        out.append(TrialRecord(trial_id, dict(result.config or {}), history, error,
                               _as_uri(result.filesystem, result.path), checkpoint, retries.get(trial_id, 0)))
    in_grid = {record.trial_id for record in out}
    for trial_id, entry in indexed.items():  # kept by --resume: Ray never knew them (keep_unsaved)
        if entry["kept"] and trial_id not in in_grid and entry["rows"]:
            out.append(_kept_record(run_dir, trial_id, entry))
    return out


def _kept_record(run_dir: str, trial_id: str, entry: dict[str, Any]) -> TrialRecord:
    """A trial --resume kept, from the status index: its params, its epochs' history rows, its
    folder and its newest checkpoint there (PruneCheckpoints left it if it can be the best)."""
    path = Path(run_dir, entry["logdir"]) if entry["logdir"] else None
    checkpoints = sorted(path.glob("checkpoint_*")) if path else []
    return TrialRecord(trial_id, dict(entry["params"] or {}), [dict(row) for row in entry["rows"]], None,
                       str(path) if path else None, str(checkpoints[-1]) if checkpoints else None, 0)


def _retries(grid: tune.ResultGrid) -> dict[str, int]:
    """trial_id -> how often Ray restarted it after its process or node died (not on the public Results)."""
    try:
        trials = grid._experiment_analysis.trials
    except AttributeError:
        return {}
    return {t.trial_id: int(getattr(t.run_metadata, "num_failures", 0) or 0) for t in trials}


def _exists(filesystem: Any, path: str) -> bool:
    try:
        return filesystem.get_file_info(path).type != pafs.FileType.NotFound
    except OSError:  # cannot tell: keep the path Ray gave
        return True


_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}  # pyarrow type_name -> URI scheme


def _as_uri(filesystem: Any, path: str) -> str:
    """Ray gives remote paths without their scheme ('bucket/run/...'): put it back, so they can be opened."""
    scheme = _SCHEMES.get(getattr(filesystem, "type_name", "local"))
    return f"{scheme}://{path}" if scheme and "://" not in path else path


def _read_history(result: tune.Result) -> list[dict[str, Any]]:
    return storage.read_result_rows(result.path, result.filesystem)


def _completed(history: list[dict[str, Any]], last: dict[str, Any],
               indexed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history with the epochs Ray's result.json lacks. The run folder's result.json is Ray's
    copy of the driver's file, and a trial restarted after its node was lost had its file replaced
    by that copy (Ray's JsonLoggerCallback restores it from storage on each start): seen to end
    with fewer epochs than the trial reported, and, where the copy lagged the trial's checkpoint,
    with a gap (epochs 1, 2, 4 of a trial restarted from its checkpoint at 3). The driver holds the
    trial's last result whole (the last row) and the status index the history row of each epoch
    (tuner/status.py)."""
    def epoch(row: dict[str, Any]) -> int:
        return int(row.get(TRAINING_ITERATION) or 0)

    have = {epoch(row) for row in history}
    upto = epoch(last)
    missing = [row for row in indexed if 0 < epoch(row) < upto and epoch(row) not in have]
    tail = [last] if upto > max(have, default=0) else []
    if not missing and not tail:
        return history
    return sorted([*history, *missing, *tail], key=epoch)  # stable: a repeated epoch keeps its order
