"""The search driver at scale: 100, 300 and 1,000 near-free trials, `tune-resnet search` against
the same search written by hand with Ray Tune + OptunaSearch + ASHA (issue 22).

Each trial is nearly free (a ResNet-8 of width 4 on 64 images of 16 px, ASHA over 2 epochs), so
what the wall time measures is the driver: Ray Tune's loop, Optuna's sampler, the service's
callbacks and files. Both modes run on one shared Ray instance, alternated, with the same space
(TPE over 4 parameters, multivariate with the constant liar, same seed), 2 trials at a time. The
hand-written script uses no `tuner` code: a function trainable that trains with the same
Trainer and reports each epoch with a checkpoint, OptunaSearch + ASHAScheduler, and
`reuse_actors=True` (as the service: without it every trial would pay a fresh process, and the
script would measure Python start-up rather than Ray and Optuna).

For each search: wall time, split into before Ray's fit, the fit (trials, Ray's final save and
its ResultGrid), the report and the rest after the fit (tables, summary, rung diagnosis), and
the time of each block of 100 trials (by when they ended), the
driver process's CPU time per trial, the start gap (from a free slot to the next trial's first
step), the time of each Optuna sample against the trials it had seen (Ray's OptunaSearch.suggest,
timed in the driver), the bytes the driver wrote and those left in the run folder per trial, and
for the service `tune-resnet status` and `tune-resnet report` on the run, in a fresh process.

    python bench/many_trials.py --trials 100 300 1000 --json /tmp/many.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import ray
import torch
import yaml
from PIL import Image
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from trainables.config import TrainConfig
from trainables.data import load_data, make_splits
from trainables.train import Trainer

CONCURRENT = 2
SPACE = {
    "name": "many",
    "data": {"dataset": "imagefolder", "val_fraction": 0.2, "input_size": 16},
    "budget": {"max_epochs": 2, "grace_period": 1, "reduction_factor": 2},
    "sampler": {"type": "tpe", "seed": 0},
    "trial": {"cpus": 1, "gpus": 0},
    "params": {"lr": {"loguniform": [1.0e-3, 1.0]}, "weight_decay": {"loguniform": [1.0e-6, 1.0e-2]},
               "batch_size": {"choice": [16, 32]}, "label_smoothing": {"uniform": [0.0, 0.2]}},
    "fixed": {"arch": "cifar_resnet", "depth": 8, "width": 4, "schedule": "constant", "augment": "none",
              "eval_batch_size": 64},
}


# ---------------------------------------------------------------------------------------------
# Inputs: 80 coloured images in 4 classes (64 to train, 16 to validate), the space
# ---------------------------------------------------------------------------------------------

def write_images(root: Path, per_class: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 4)):
        for channel, name in enumerate(("red", "green", "blue", "grey")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = rng.integers(0, 90, (16, 16, 3), dtype=np.uint8)
                image[..., channel % 3] += np.uint8(120 if channel < 3 else 60)
                Image.fromarray(image).save(folder / f"{name}_{i:03d}.png")
    return root


def write_space(work: Path, images: Path) -> Path:
    spec = {**SPACE, "data": {**SPACE["data"], "path": str(images)}}
    path = work / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ---------------------------------------------------------------------------------------------
# Timing Optuna's sampling, in both modes: Ray's OptunaSearch.suggest, in the driver
# ---------------------------------------------------------------------------------------------

SAMPLES: list[tuple[int, float]] = []  # (trials the study had, seconds of suggest)


def time_suggest() -> None:
    original = OptunaSearch.suggest

    def suggest(self, trial_id):
        seen = len(self._ot_study._storage.get_all_trials(self._ot_study._study_id, deepcopy=False))
        start = time.perf_counter()
        out = original(self, trial_id)
        SAMPLES.append((seen, time.perf_counter() - start))
        return out

    OptunaSearch.suggest = suggest


# ---------------------------------------------------------------------------------------------
# The hand-written script: Ray Tune + OptunaSearch + ASHA, no tuner code
# ---------------------------------------------------------------------------------------------

def hand_trainable(params, *, base):
    started = time.time()
    torch.set_num_threads(1)
    config = TrainConfig.from_dict({**base, **params})
    data = load_data(config.dataset, config.data_path, input_size=config.input_size)
    trainer = Trainer(config, make_splits(data, val_fraction=config.val_fraction, seed=config.seed))
    for metrics in trainer.epochs():
        with tempfile.TemporaryDirectory() as folder:
            torch.save(trainer.state_dict(), os.path.join(folder, "checkpoint.pt"))
            tune.report({**metrics.to_dict(), "started_at": started, "reported_at": time.time(), "pid": os.getpid()},
                        checkpoint=tune.Checkpoint.from_directory(folder))


def hand_space(trial: optuna.Trial) -> None:
    trial.suggest_float("lr", 1.0e-3, 1.0, log=True)
    trial.suggest_float("weight_decay", 1.0e-6, 1.0e-2, log=True)
    trial.suggest_categorical("batch_size", [16, 32])
    trial.suggest_float("label_smoothing", 0.0, 0.2)


PHASES: dict[str, float] = {}  # the search's phases, in seconds: when Ray's fit began and ended, the report


def timed_phases() -> None:
    """Times the service's phases from outside (the search's own code is not touched): Ray's fit
    (from the Tuner's start to its return: the trials, Ray's final save and its ResultGrid) and the
    report; what is left of the wall is the service's start (plan, Ray joined, space saved) and
    its tables, summary and rung diagnosis."""
    from tuner import _ray, search

    fit, report = _ray.run_search, search.write_report_safely

    def run_search(*args, **kwargs):
        PHASES["fit_began"] = time.time()
        try:
            return fit(*args, **kwargs)
        finally:
            PHASES["fit_ended"] = time.time()

    def write_report_safely(*args, **kwargs):
        began = time.time()
        try:
            return report(*args, **kwargs)
        finally:
            PHASES["report_s"] = time.time() - began

    _ray.run_search, search.write_report_safely = run_search, write_report_safely


def run_hand(base: dict, storage: Path, name: str, trials: int) -> None:
    sampler = optuna.samplers.TPESampler(seed=0, multivariate=True, constant_liar=True)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(hand_trainable, base=base), {"cpu": 1}),
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(space=hand_space, metric="val_acc", mode="max", sampler=sampler),
            scheduler=ASHAScheduler(metric="val_acc", mode="max", max_t=2, grace_period=1, reduction_factor=2),
            num_samples=trials, max_concurrent_trials=CONCURRENT, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0))
    PHASES["fit_began"] = time.time()
    tuner.fit()
    PHASES["fit_ended"] = time.time()


def run_service(space: Path, storage: Path, name: str, trials: int, mlflow: str | None = None) -> None:
    from tuner.search import SearchOptions, run

    run(SearchOptions(space=str(space), storage=str(storage), name=name, num_samples=trials,
                      max_concurrent=CONCURRENT, refit=False, mlflow=mlflow), say=lambda line: None)


# ---------------------------------------------------------------------------------------------
# What a search left: per-trial times from each trial's result.json (the same in both modes)
# ---------------------------------------------------------------------------------------------

def trial_times(run_dir: Path) -> list[dict]:
    """{started_at, ended_at, pid} per trial that reported, from Ray's result.json files."""
    out = []
    for path in run_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out.append({"started_at": rows[0]["started_at"], "ended_at": rows[-1]["reported_at"],
                        "pid": rows[-1].get("pid")})
    return sorted(out, key=lambda t: t["started_at"])


def block_times(trials: list[dict], began: float, block: int = 100) -> list[float]:
    """Seconds each block of `block` trials took, by when they ended (the first from the start)."""
    ends = sorted(t["ended_at"] for t in trials)
    marks = [began] + [ends[i - 1] for i in range(block, len(ends) + 1, block)]
    return [round(b - a, 2) for a, b in zip(marks, marks[1:])]


def start_gaps(trials: list[dict], began: float) -> list[float]:
    """From the moment a slot was free (the start, or the end of the trial that held it) to the
    next trial's first step, in start order."""
    slots, gaps = [began] * CONCURRENT, []
    for trial in trials:
        free = heapq.heappop(slots)
        heapq.heappush(slots, trial["ended_at"])
        gaps.append(max(0.0, trial["started_at"] - free))
    return gaps


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def written_bytes() -> int:
    """Bytes this process has written (to storage, not the page cache only), from /proc."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------------------------
# One search, measured
# ---------------------------------------------------------------------------------------------

def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(mode: str, trials: int, work: Path, space: Path, base: dict, mlflow: str | None = None) -> dict:
    name = f"{mode}-{trials}"
    SAMPLES.clear()
    PHASES.clear()
    cpu, wrote, began = cpu_seconds(), written_bytes(), time.time()
    if mode in ("service", "mlflow"):
        run_service(space, work, name, trials, mlflow if mode == "mlflow" else None)
    else:
        run_hand(base, work, name, trials)
    wall = time.time() - began
    times = trial_times(work / name)
    blocks = block_times(times, began)
    out = {"mode": mode, "trials": trials, "reported": len(times), "wall_s": round(wall, 1),
           "trials_done_s": round(max((t["ended_at"] for t in times), default=began) - began, 1),
           "block_s": blocks, "ratio_last_vs_second_block": round(blocks[-1] / blocks[1], 2) if len(blocks) > 2 else None,
           "driver_cpu_ms_per_trial": round(1000 * (cpu_seconds() - cpu) / trials, 1),
           **gap_figures(start_gaps(times, began)), **sample_figures(trials),
           "driver_kb_written_per_trial": round((written_bytes() - wrote) / trials / 1024, 1),
           "folder_kb_per_trial": round(folder_bytes(work / name) / trials / 1024, 1),
           **phase_figures(began, wall)}
    if mode == "service":
        out.update(cli_seconds(work / name))
    return out


def phase_figures(began: float, wall: float) -> dict:
    """Before Ray's fit, the fit, after it (the report apart): seconds."""
    if "fit_ended" not in PHASES:
        return {}
    fit_s = PHASES["fit_ended"] - PHASES["fit_began"]
    before_s = PHASES["fit_began"] - began
    report_s = PHASES.get("report_s", 0.0)
    return {"before_fit_s": round(before_s, 2), "fit_s": round(fit_s, 1), "report_in_search_s": round(report_s, 2),
            "after_fit_s": round(wall - before_s - fit_s - report_s, 2)}


def gap_figures(gaps: list[float]) -> dict:
    tail = gaps[-100:] or [0.0]
    return {"start_gap_median_s": round(statistics.median(gaps or [0.0]), 3),
            "start_gap_last100_median_s": round(statistics.median(tail), 3)}


def sample_figures(trials: int) -> dict:
    """Median seconds of a sample by how many trials the study had seen, per tenth of the search."""
    step = max(1, trials // 10)
    by_tenth = {}
    for low in range(0, trials, step):
        inside = [s for seen, s in SAMPLES if low <= seen < low + step]
        if inside:
            by_tenth[low] = round(1000 * statistics.median(inside), 2)
    return {"sample_ms_by_trials_seen": by_tenth, "samples": len(SAMPLES)}


def cli_seconds(run_dir: Path) -> dict:
    """`tune-resnet status` and `tune-resnet report`, each in a fresh process as a person runs them."""
    out = {}
    for command in ("status", "report"):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "tuner.cli", command, str(run_dir)], capture_output=True, text=True)
        out[f"{command}_s"] = round(time.perf_counter() - start, 2)
        if done.returncode:
            out[f"{command}_error"] = (done.stdout + done.stderr)[-500:]
    return out


# ---------------------------------------------------------------------------------------------
# Resume at scale: the CLI killed (SIGKILL of its process group) at about half its trials, resumed
# ---------------------------------------------------------------------------------------------

def index_events(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "status-index.jsonl").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def cli_search(space: Path, work: Path, name: str, trials: int, *extra: str) -> subprocess.Popen:
    """`tune-resnet search` in its own process group (its embedded Ray with it), output to a log."""
    command = [sys.executable, "-m", "tuner.cli", "search", "--space", str(space), "--storage", str(work),
               "--name", name, "--num-samples", str(trials), "--max-concurrent", str(CONCURRENT), "--cpus",
               str(CONCURRENT), "--no-refit", *extra]
    log = open(work / f"{name}{'-resumed' if extra else ''}.log", "w")
    return subprocess.Popen(command, start_new_session=True, stdout=log, stderr=subprocess.STDOUT, text=True)


def kill_and_resume(space: Path, work: Path, trials: int) -> dict:
    """A search killed once half its trials ended, then resumed: trials in the end, trials run
    twice (started again after they ended), trials that had ended but are lost (they started after
    Ray's last save of its state, so it never knew them: a new trial is drawn in each one's place),
    and the resume's start-up (launch to its first trial)."""
    import signal

    name, run_dir = f"resume-{trials}", work / f"resume-{trials}"
    driver = cli_search(space, work, name, trials)
    while driver.poll() is None and sum("ended" in e for e in index_events(run_dir)) < trials // 2:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    ended_before = {e["trial_id"] for e in index_events(run_dir) if "ended" in e}
    seen, launched = len(index_events(run_dir)), time.time()
    resumed = cli_search(space, work, name, trials, "--resume")
    first_start = None
    while resumed.poll() is None:
        if first_start is None and any("started" in e for e in index_events(run_dir)[seen:]):
            first_start = time.time() - launched
        time.sleep(0.2)
    output = (work / f"{name}-resumed.log").read_text()
    rows = [json.loads(line) for line in subprocess.run(
        [sys.executable, "-c", f"import pyarrow.parquet as pq, json; [print(json.dumps(r)) for r in "
         f"pq.read_table('{run_dir}/trials.parquet', columns=['trial_id', 'epochs']).to_pylist()]"],
        capture_output=True, text=True).stdout.splitlines()]
    again = {e["trial_id"] for e in index_events(run_dir)[seen:] if "started" in e} & ended_before
    lost = ended_before - {r["trial_id"] for r in rows}  # ended after Ray's last save and before it: not in its state
    return {"mode": "kill+resume", "trials": trials, "ended_before_kill": len(ended_before),
            "trials_in_table": len(rows), "distinct_trial_ids": len({r["trial_id"] for r in rows}),
            "ended_trials_run_again": len(again), "ended_trials_lost": len(lost),
            "resume_startup_s": round(first_start or -1, 1),
            "resume_wall_s": round(time.time() - launched, 1), "resume_exit": resumed.returncode,
            "restored_backup": "restored the copy" in output}


def profiled(prefix: str | None, name: str, function, *args):
    """function(*args), under cProfile (the driver's CPU time, not wall time) when prefix is given."""
    if not prefix:
        return function(*args)
    import cProfile

    profile = cProfile.Profile(time.process_time)
    try:
        return profile.runcall(function, *args)
    finally:
        profile.dump_stats(f"{prefix}-{name}.prof")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--modes", nargs="+", default=["service", "hand"], choices=["service", "hand", "mlflow"],
                        help="mlflow: the service logging every trial to --mlflow URI (issue 23)")
    parser.add_argument("--mlflow", help="an MLflow tracking URI for the mlflow mode (a real server)")
    parser.add_argument("--work", help="folder for the runs (default: a fresh temporary folder)")
    parser.add_argument("--kill-resume", type=int, metavar="N", help="instead: a search of N trials (the CLI) killed at half and resumed")
    parser.add_argument("--json")
    parser.add_argument("--profile", help="write a cProfile of the driver (CPU time) of each search to PROFILE-MODE-N.prof")
    args = parser.parse_args()
    if "mlflow" in args.modes and not args.mlflow:
        parser.error("--modes mlflow needs --mlflow URI (a running MLflow server)")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-many-")).resolve()
    images = write_images(work / "images")
    space = write_space(work, images)
    base = {**SPACE["fixed"], "dataset": "imagefolder", "data_path": str(images), "input_size": 16,
            "val_fraction": 0.2, "seed": 0, "epochs": 2}
    load_data("imagefolder", str(images), input_size=16)  # both start with the cache built
    if args.kill_resume:  # the CLI's own Ray, alone on the machine
        results = [kill_and_resume(space, work, args.kill_resume)]
        print(json.dumps(results[0]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"work": str(work), "results": results}, indent=2))
        return
    ray.init(num_cpus=CONCURRENT, include_dashboard=False, log_to_driver=False)
    time_suggest()
    timed_phases()
    results = []
    for trials in args.trials:
        for mode in args.modes:
            results.append(profiled(args.profile, f"{mode}-{trials}", measure, mode, trials, work, space, base,
                                    args.mlflow))
            print(json.dumps(results[-1]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"work": str(work), "results": results}, indent=2))


if __name__ == "__main__":
    main()
