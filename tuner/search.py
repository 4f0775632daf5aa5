"""A search from start to end, one way: space -> plan -> data cache -> Ray Tune (Optuna + ASHA)
-> tables -> refit -> report. `run()` returns the typed SearchSummary; what it has to say goes to
the `say` it is given (the CLI passes click.echo), so nothing here prints or knows the CLI.

Planning is in tuner/plan.py (pure), Ray in tuner/_ray.py, the run folder's files in
tuner/storage.py and tuner/results.py, the report in tuner/report/.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import uuid
from pathlib import Path

from search_spaces import SearchSpec
from trainables.config import TrainConfig
from trainables.data import check_source, check_splits, load_data

from . import _ray, confirm, pareto, ray_state, results, rungs, storage, tracking
from .errors import Interrupted, Say, SearchError, SearchFailed, check_writable, warn
from .plan import (Cluster, SearchOptions, SearchPlan, base_config, check_params, describe, load_spec, make_plan,
                   plan_resources, run_name)
from .progress import Progress
from .refit import refit_best, warm_start_checkpoint
from .report import write_report_safely
from .screen import format_rungs, format_selection, format_summary

def run(options: SearchOptions, say: Say = print, warn: Say = warn) -> results.SearchSummary | None:
    """The search, its tables, the refit of the best configuration and the report. None after a
    dry run. Raises SearchFailed when no trial gave a result, Interrupted after a Ctrl-C. `say`
    hears what a user is told, `warn` what went wrong without stopping the search."""
    spec = load_spec(options)
    base = base_config(spec)
    check_params(spec, base)
    check_source(base.dataset, base.data_path)
    tracking.check_installed(spec.tracking.mlflow)
    _check_run_folder(spec, options)
    if options.dry_run:
        for line in describe(spec, options):
            say(line)
        return None
    _load_data(base, say)
    plan = _plan(spec, options, base, say)
    resume = _resume_possible(plan.run_dir, say) if options.resume else False
    log = tracking.SearchLog(spec.tracking.mlflow, warn, verbose=plan.verbose)
    log.start(experiment=spec.tracking.experiment or spec.name, run_dir=plan.run_dir, name=plan.name,
              params=_tracked_params(spec, plan), resume=resume)
    try:
        found = _search_and_refit(spec, dataclasses.replace(plan, tracking=log.target), base, options, resume,
                                  log, say, warn)
    except (Interrupted, KeyboardInterrupt):
        log.finish("KILLED")
        raise
    except BaseException:
        log.finish("FAILED")
        raise
    log.finish("FINISHED" if found.summary.found else "FAILED", found.summary, plan.run_dir)
    if not found.summary.found:
        raise SearchFailed(no_result(found.trials, plan.run_dir))
    return found.summary


def _search_and_refit(spec: SearchSpec, plan: SearchPlan, base: TrainConfig, options: SearchOptions, resume: bool,
                      log: tracking.SearchLog, say: Say, warn: Say) -> results.SearchResults:
    found = _search(spec, plan, resume, say, log)
    if spec.selection.top_k > 1 and found.summary.found:
        found = _confirm(spec, plan, found, options.resume, say, log)
    if options.refit and found.summary.found:
        _refit_into_storage(plan.run_dir, found, spec, base, say, warn, log)
    write_report_safely(plan.run_dir, say, warn)  # report.html + optuna.journal; a failure warns in one line
    return found


def _tracked_params(spec: SearchSpec, plan: SearchPlan) -> dict[str, object]:
    """The parent run's params: the space's settings (each trial's run has its sampled params)."""
    return {"space": spec.name, "metric": plan.metric, "mode": plan.mode, "num_samples": plan.num_samples,
            "max_epochs": plan.max_epochs, "grace_period": plan.grace_period,
            "reduction_factor": plan.reduction_factor, "sampler": spec.sampler.type, "seed": plan.base_config.seed,
            "dataset": plan.base_config.dataset, "data_path": plan.base_config.data_path,
            "max_concurrent": plan.max_concurrent, "cpus_per_trial": plan.cpus_per_trial,
            "gpus_per_trial": plan.gpus_per_trial, "run_dir": plan.run_dir}


def _check_run_folder(spec: SearchSpec, options: SearchOptions) -> None:
    """A local --storage must be writable, and a folder that holds a search is not overwritten."""
    name = run_name(spec, options)
    if storage.is_uri(options.storage):
        return
    root = storage.storage_root(options.storage)
    check_writable(root, "--storage")
    if not options.resume and (Path(root) / name / storage.SEARCH_FILE).exists():  # a search ran there: keep it
        raise SearchError(f"--name {name}: {Path(root) / name} already holds a search; pass --resume to continue "
                          "it, another --name for a new one, or remove the folder")


def _load_data(base: TrainConfig, say: Say) -> None:
    """The data cache, built here (decoded once, by the driver) before any trial starts."""
    data = load_data(base.dataset, base.data_path, input_size=base.input_size, storage_size=base.storage_size,
                     progress=True)
    check_splits(data, val_fraction=base.val_fraction)  # a split every trial can use
    say(f"data: {len(data.train_labels)} train / {len(data.test_labels)} test images, "
        f"{len(data.classes)} classes, {data.image_size}px (cache {data.cache_path})")


def _plan(spec: SearchSpec, options: SearchOptions, base: TrainConfig, say: Say) -> SearchPlan:
    # Ray detects the GPUs itself (declaring --gpus would invent GPUs a CPU machine lacks);
    # --gpus caps how many of them the search uses.
    cluster = _ray.start(address=options.address, num_cpus=options.cpus, verbose=options.verbose)
    resources = plan_resources(spec, options, cluster)
    if resources.notice:
        say(resources.notice)
    check_cluster_paths(storage.storage_root(options.storage), base, cluster, say)
    return make_plan(spec, options, base, resources)


def _search(spec: SearchSpec, plan: SearchPlan, resume: bool, say: Say,
            log: tracking.SearchLog | None = None) -> results.SearchResults:
    """Ray Tune runs the trials; their results are collected and written once, as tables."""
    say(f"{'resuming' if resume else 'searching'}: {plan.num_samples} trials, {plan.max_concurrent} at a time "
        f"({plan.cpus_per_trial:g} CPU, {plan.gpus_per_trial:g} GPU each) -> {plan.run_dir}")
    _save_space(spec, plan)  # first: `tune-resnet status` reads the budget from it
    progress = Progress(metric=plan.metric, mode=plan.mode, max_epochs=plan.max_epochs, echo=say)
    started_at = time.time()
    grid = _ray.run_search(plan, listener=progress, resume=resume, log=log)
    found = results.collect(_ray.records(grid, plan.run_dir), metric=plan.metric, mode=plan.mode,
                            max_epochs=plan.max_epochs, num_samples=plan.num_samples, started_at=started_at,
                            measured=plan.measure)
    found = pareto.select(found, spec)  # several objectives, constraints, selection.pick: the front and the pick
    results.write(found, plan.run_dir)
    if _ray.interrupted(grid, None if plan.time_limit_s else plan.num_samples, plan.run_dir):
        raise Interrupted(f"interrupted with {found.summary.trials} of {plan.num_samples} trials started; "
                          f"state saved in {plan.run_dir}; continue with the same command plus --resume")
    diagnostics = rungs.diagnose_space(spec.model_dump(mode="json"), found.trials, found.history,
                                       metric=plan.metric, mode=plan.mode)
    for line in format_summary(found.summary) + format_rungs(diagnostics):  # and how well ASHA's rungs ranked
        say(line)
    return found


def no_result(trials: list[dict], run_dir: str) -> str:
    errors = [t["error"] for t in trials if t.get("error")]
    first = f"; the first error: {errors[0]}" if errors else ""
    return " ".join(f"no trial gave a result: {len(errors)} of {len(trials)} errored{first}; each trial's "
                    f"error.txt is in its folder under {run_dir}".split())


def _confirm(spec: SearchSpec, plan: SearchPlan, found: results.SearchResults, resume: bool,
             say: Say, log: tracking.SearchLog | None = None) -> results.SearchResults:
    """The top configurations trained again with fresh seeds; the best mean goes to the refit
    (tuner/confirm.py). Its runs join the tables; summary.json names the pick."""
    chosen = confirm.candidates(found.trials, metric=plan.metric, mode=plan.mode, top_k=spec.selection.top_k)
    runs = confirm.plan_runs(chosen, repeats=spec.selection.repeats, seed=plan.base_config.seed)
    folder = _ray.confirm_dir(plan)
    resume = resume and storage.exists(folder) and _resume_possible(folder, say)
    say(f"{'resuming the confirmation' if resume else 'confirming'}: the top {len(chosen)} configurations, "
        f"{spec.selection.repeats} more runs each with fresh seeds ({len(runs)} trials of {plan.max_epochs} "
        f"epochs, no early stopping) -> {folder}")
    progress = Progress(metric=plan.metric, mode=plan.mode, max_epochs=plan.max_epochs, echo=say)
    grid = _ray.run_confirmation(plan, [r.to_dict() for r in runs], listener=progress, resume=resume, log=log)
    confirmed = confirm.combine(found, _ray.records(grid, folder), runs, chosen, max_epochs=plan.max_epochs,
                                seed=plan.base_config.seed)
    results.write(confirmed, plan.run_dir)
    if _ray.interrupted(grid, len(runs)):
        raise Interrupted(f"interrupted during the confirmation, {confirmed.summary.confirmation['runs_scored']} "
                          f"of {len(runs)} runs done; state saved in {plan.run_dir}; continue with the same "
                          "command plus --resume")
    for line in format_selection(confirmed.summary):
        say(line)
    return confirmed


def _resume_possible(run_dir: str, say: Say) -> bool:
    repaired = ray_state.repair_state(run_dir)  # a driver killed while Ray saved its state
    if repaired:
        say(repaired)
    if _ray.can_resume(run_dir):
        settled = _ray.settle_ended(run_dir)
        if settled:
            say(f"--resume: {settled} trial(s) ended after Ray last saved its state; kept as ended, not run again")
        kept = _ray.keep_unsaved(run_dir)
        if kept:
            say(f"--resume: {kept} trial(s) started and ended after Ray last saved its state; kept (from the "
                "status index), told to the sampler, and counted in the trials to run")
        return True
    say(f"--resume: nothing to resume at {run_dir}; starting anew")
    return False


def _save_space(spec: SearchSpec, plan: SearchPlan) -> None:
    """search.json: what refit/export/status need later, without the original YAML at hand."""
    record = results.SearchRecord(spec.model_dump(mode="json"), plan.base_config, plan.metric, plan.mode,
                                  plan.max_epochs)
    storage.write_json(plan.run_dir, storage.SEARCH_FILE, record.to_dict())


# ---------------------------------------------------------------------------------------------
# On a cluster: every node must see the storage and the inputs
# ---------------------------------------------------------------------------------------------

SHARED_HINT = "on a multi-node cluster use a shared folder (NFS) or a URI such as s3://bucket/runs"


def check_cluster_paths(root: str, base: TrainConfig, cluster: Cluster, say: Say = print) -> None:
    """Trials write to --storage and read data.path/model.pretrained on their own node: on a
    multi-node cluster each of those must be there on every node, or trials fail one by one later."""
    if cluster.nodes < 2:
        return
    folder = storage.local_path(root)
    if folder is not None:  # a URI other than file:// is the same place from everywhere
        missing = _missing_from_nodes(Path(folder))
        if missing:
            raise SearchError(f"--storage: {root} is not visible from node {missing[0]}; {SHARED_HINT}")
        say(f"storage: {root} is visible from all {cluster.nodes} nodes")
    for key, path in (("data.path", base.data_path), ("model.pretrained", base.pretrained)):
        if path and Path(path).is_absolute():  # not 'torchvision', not a download
            missing = _ray.nodes_missing(path)
            if missing:
                raise SearchError(f"{key}: {path} is not visible from node {missing[0]}; put it at the same "
                                  f"path on every node (file_mounts in cluster.yaml) or in a shared folder")


def _missing_from_nodes(folder: Path) -> list[str]:
    """Nodes that do not see a marker file written here, in the storage folder, by the driver."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".visible-{uuid.uuid4().hex}"
    marker.write_text("written by the tune-resnet driver to check that every node sees this folder\n")
    try:
        return _ray.nodes_missing(str(marker))
    finally:
        marker.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Refit: trained and exported in a local folder, then copied to a URI storage
# ---------------------------------------------------------------------------------------------

def _refit_into_storage(run_dir: str, found: results.SearchResults, spec: SearchSpec, base: TrainConfig,
                        say: Say, warn: Say, log: tracking.SearchLog | None = None) -> None:
    log = log or tracking.SearchLog(None, warn)
    if not storage.is_uri(run_dir):
        metrics = refit_best(run_dir, found, spec, base, say, warn)
        log.refit(Path(run_dir) / storage.BEST_DIR, metrics, register=spec.tracking.registered_model, say=say)
        return
    with tempfile.TemporaryDirectory(prefix="tune-resnet-refit-") as local:
        if spec.refit.warm_start:
            found = _with_local_checkpoint(found, f"{local}/warm-start")
        metrics = refit_best(local, found, spec, base, say, warn)
        log.refit(Path(local) / storage.BEST_DIR, metrics, register=spec.tracking.registered_model, say=say)
        storage.upload(f"{local}/{storage.BEST_DIR}", f"{run_dir}/{storage.BEST_DIR}")
    say(f"uploaded {storage.BEST_DIR}/ to {run_dir}/{storage.BEST_DIR}")


def _with_local_checkpoint(found: results.SearchResults, local: str) -> results.SearchResults:
    """The warm start's checkpoint (the refit configuration's, refit.warm_start_checkpoint) copied
    next to the refit, from a URI."""
    chosen = warm_start_checkpoint(found.trials, found.summary)
    trials = [dict(t) for t in found.trials]
    for trial in trials:
        if chosen and trial["checkpoint"] == chosen and storage.is_uri(chosen):
            trial["checkpoint"] = storage.download(chosen, local)
    return dataclasses.replace(found, trials=trials)
