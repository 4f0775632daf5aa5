"""End-to-end searches through the real Ray Tune, OptunaSearch and ASHA, on tiny generated data.

One Ray instance serves the whole session (conftest's ray_session: start-up costs seconds); it
declares 4 GPUs that do not exist, so GPU allocation is checked through the ids Ray gives each trial.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from trainables.models import count_macs, create_model
from tuner.cli import main
from tuner.plan import (SearchOptions, auto_gpus, base_config, largest_batch_size, largest_model_macs, load_spec,
                          trials_per_gpu)

from conftest import DECLARED_GPUS


def write_space(folder: Path, images: Path, **sections) -> Path:
    space = {
        "name": "tiny",
        "data": {"dataset": "imagefolder", "path": str(images), "val_fraction": 0.2, "input_size": 16},
        "budget": {"num_samples": 6, "max_epochs": 3, "grace_period": 1, "reduction_factor": 3},
        "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 3},
        "trial": {"cpus": 1, "gpus": 0},
        "params": {"lr": {"loguniform": [1.0e-4, 1.0]}, "batch_size": {"choice": [8, 16]}},
        "fixed": {"arch": "cifar_resnet", "depth": 8, "width": 4, "schedule": "constant",
                  "augment": "none", "eval_batch_size": 64},
        "refit": {"epochs": 2},
    }
    for key, value in sections.items():
        space[key] = {**space.get(key, {}), **value} if isinstance(value, dict) and key != "params" else value
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def search(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["search", *args], catch_exceptions=False)
    return result.exit_code, result.output


def run_tables(run_dir: Path) -> tuple[list[dict], list[dict], dict]:
    trials = pq.read_table(run_dir / "trials.parquet").to_pylist()
    history = pq.read_table(run_dir / "history.parquet").to_pylist()
    return trials, history, json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def finished_search(ray_session, image_folder, tmp_path_factory):
    """A 6-trial search, one trial at a time so ASHA's decisions are reproducible, with a refit."""
    folder = tmp_path_factory.mktemp("search")
    space = write_space(folder, image_folder)
    code, output = search("--space", str(space), "--storage", str(folder / "runs"), "--name", "first",
                          "--max-concurrent", "1")
    assert code == 0, output
    return folder, space, output


def test_search_writes_tables_that_agree_with_the_summary(finished_search):
    folder, _, output = finished_search
    trials, history, summary = run_tables(folder / "runs" / "first")
    assert len(trials) == 6
    statuses = {t["status"] for t in trials}
    assert statuses <= {"completed", "early_stopped"}
    assert summary["by_status"]["early_stopped"] >= 1, "ASHA stopped no trial"
    assert sum(t["epochs"] for t in trials) == len(history) == summary["epochs_spent"]
    assert summary["epochs_without_early_stopping"] == 6 * 3
    best = max(trials, key=lambda t: t["best_val_acc"])
    assert summary["best_trial_id"] == best["trial_id"]
    assert summary["best_val_acc"] == pytest.approx(best["best_val_acc"])
    assert f"best val_acc: {best['best_val_acc']:.4f}" in output
    kept = {t["trial_id"] for t in trials if any(Path(t["path"]).glob("checkpoint_*"))}
    assert kept == {t["trial_id"] for t in trials if t["checkpoint"]}  # the table names only what is kept
    tied = {t["trial_id"] for t in trials if t["best_val_acc"] == best["best_val_acc"]}
    assert kept == tied  # finished trials below the best lose their checkpoints; ties keep them
    assert len(list(Path(best["path"]).glob("checkpoint_*"))) <= 2  # and the best keeps at most two
    for trial in trials:  # the status follows from the epochs run
        rows = [h for h in history if h["trial_id"] == trial["trial_id"]]
        assert [h["training_iteration"] for h in rows] == list(range(1, trial["epochs"] + 1))
        assert (trial["status"] == "completed") == (trial["epochs"] == 3)
        assert trial["best_val_acc"] == pytest.approx(max(h["val_acc"] for h in rows))
        assert {"config/lr", "config/batch_size"} <= set(trial)
        # overheads: setup before the first step, and the gap after each epoch but the last
        assert 0 <= trial["setup_s"] < trial["ended_at"] - trial["started_at"] + 60
        assert rows[0]["between_epochs_s"] is None
        assert all(0 <= h["between_epochs_s"] < 60 for h in rows[1:])
    assert summary["search_started_at"] <= min(t["started_at"] for t in trials)
    # one trial at a time, reuse_actors: every trial ran in the same process (one torch import,
    # one data-cache load), not one process per trial
    assert len({t["pid"] for t in trials}) == 1


def test_search_prints_progress_and_refits(finished_search):
    folder, _, output = finished_search
    assert "completed" in output and "stopped early" in output and "best val_acc" in output
    assert "ASHA's rungs: Spearman of the val_acc" in output and "  epoch 1: 6 judged, " in output  # under the summary
    best = folder / "runs" / "first" / "best"
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and 0.0 <= metrics["test_acc"] <= 1.0
    assert metrics["test"]["images"] == 18  # 3 classes x 6 test images, evaluated once
    assert metrics["train_images"] == 72  # train + validation: the refit holds nothing out
    assert (best / "weights.safetensors").exists() and (best / "config.json").exists()
    assert metrics["wall_time_s"] >= metrics["train_time_s"] > 0


@pytest.mark.slow
def test_the_journal_holds_each_trial_as_it_ended(finished_search):
    """RUN_DIR/optuna.journal, written by the search as trials went (tuner/journal.py) and kept by
    the report: one Optuna trial per Ray trial, its params, its epochs as intermediate values, and
    COMPLETE with its best val_acc, or PRUNED where ASHA stopped it."""
    import optuna

    folder, _, _ = finished_search
    run = folder / "runs" / "first"
    trials, history, _ = run_tables(run)
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run / "optuna.journal")))
    study = optuna.load_study(study_name="first", storage=journal)
    assert study.user_attrs["live"] is True  # the search's own, not rebuilt by the report
    by_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert len(study.trials) == len(trials) and set(by_id) == {t["trial_id"] for t in trials}
    for trial in trials:
        mirrored = by_id[trial["trial_id"]]
        assert mirrored.params == {"lr": trial["config/lr"], "batch_size": trial["config/batch_size"]}
        curve = {h["training_iteration"]: h["val_acc"] for h in history if h["trial_id"] == trial["trial_id"]}
        assert mirrored.intermediate_values == pytest.approx(curve)
        assert (mirrored.user_attrs["status"], mirrored.user_attrs["epochs"]) == (trial["status"], trial["epochs"])
        if trial["status"] == "completed":
            assert mirrored.state == optuna.trial.TrialState.COMPLETE
            assert mirrored.value == pytest.approx(trial["best_val_acc"])
        else:  # stopped by ASHA
            assert mirrored.state == optuna.trial.TrialState.PRUNED
            assert mirrored.value == pytest.approx(curve[max(curve)])  # Optuna's: the last intermediate value
    assert [t.number for t in study.trials] == list(range(len(trials)))


def tensorboard_scalars(trial_folder: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of the TensorBoard event files in a trial's folder (TFRecord framing:
    length, its CRC, an Event protobuf, its CRC; tensorboardX's own protobuf classes)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in trial_folder.glob("events.out.tfevents.*"):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_tensorboard_shows_each_trials_epoch_metrics(finished_search):
    """`tensorboard --logdir RUN_DIR`: each trial's epochs (tuner._ray.EpochTensorBoard, in place of
    Ray's logger), the same values as history.parquet, and not the bookkeeping Ray's logs too."""
    folder, _, _ = finished_search
    run = folder / "runs" / "first"
    trials, history, _ = run_tables(run)
    for trial in trials:
        scalars = tensorboard_scalars(Path(trial["path"]))
        curve = {h["training_iteration"]: h["val_acc"] for h in history if h["trial_id"] == trial["trial_id"]}
        assert scalars["ray/tune/val_acc"] == pytest.approx(curve, abs=1e-6)
        assert set(scalars["ray/tune/train_loss"]) == set(curve)
        assert {tag.split("/")[-1] for tag in scalars} <= {"train_loss", "train_acc", "val_loss", "val_acc", "lr",
                                                           "epoch_time_s", "train_images_per_sec"}, sorted(scalars)


def test_each_result_is_written_once_to_result_json_and_not_to_a_csv_copy(finished_search):
    """Ray's JSON logger is passed and Ray's automatic loggers are off (tuner._ray._fit): each epoch
    is one line of result.json, and no progress.csv repeats it."""
    folder, _, _ = finished_search
    trials, history, _ = run_tables(folder / "runs" / "first")
    for trial in trials:
        path = Path(trial["path"])
        lines = [json.loads(line) for line in (path / "result.json").read_text().splitlines()]
        assert [r["training_iteration"] for r in lines] == list(range(1, trial["epochs"] + 1))
        assert not (path / "progress.csv").exists()
    assert os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS") is None  # set only while the fit ran


def test_same_seed_samples_the_same_configurations(finished_search):
    folder, space, _ = finished_search
    code, output = search("--space", str(space), "--storage", str(folder / "runs"), "--name", "second",
                          "--max-concurrent", "1", "--no-refit")
    assert code == 0, output
    first, _, _ = run_tables(folder / "runs" / "first")
    second, _, _ = run_tables(folder / "runs" / "second")
    configs = [[(t["config/lr"], t["config/batch_size"]) for t in trials] for trials in (first, second)]
    assert configs[0] == configs[1]
    assert len(set(configs[0])) == 6


def test_each_trial_sees_only_its_own_gpu(ray_session, image_folder, tmp_path):
    space = write_space(tmp_path, image_folder, trial={"cpus": 0.5, "gpus": 1},
                        budget={"num_samples": 8, "max_epochs": 2, "grace_period": 2})
    code, output = search("--space", str(space), "--storage", str(tmp_path / "runs"), "--name", "gpus",
                          "--gpus", str(DECLARED_GPUS), "--no-refit")
    assert code == 0, output
    assert f"{DECLARED_GPUS} at a time" in output
    trials, _, _ = run_tables(tmp_path / "runs" / "gpus")
    assert len(trials) == 8
    for trial in trials:
        assert trial["gpu_ids"] in {str(i) for i in range(DECLARED_GPUS)}
        assert trial["cuda_visible_devices"] == trial["gpu_ids"]  # Ray hides the other GPUs
    for a in trials:  # trials that overlap in time never share a GPU
        for b in trials:
            overlap = a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]
            if a is not b and overlap:
                assert a["gpu_ids"] != b["gpu_ids"]


def test_gpus_flag_caps_concurrency(ray_session, image_folder, tmp_path):
    space = write_space(tmp_path, image_folder, trial={"cpus": 0.5, "gpus": 1})
    code, output = search("--space", str(space), "--storage", str(tmp_path), "--gpus", "2", "--dry-run")
    assert code == 0, output
    code, output = search("--space", str(space), "--storage", str(tmp_path), "--gpus", "2",
                          "--num-samples", "2", "--max-epochs", "1", "--no-refit")
    assert code == 0, output
    assert "2 at a time" in output


def test_auto_gpus_shares_a_gpu_among_small_models(ray_session, image_folder, tmp_path):
    space = write_space(tmp_path, image_folder, trial={"cpus": 0.5, "gpus": "auto"},
                        budget={"num_samples": 4, "max_epochs": 1, "grace_period": 1})
    code, output = search("--space", str(space), "--storage", str(tmp_path / "runs"), "--name", "auto",
                          "--no-refit")
    assert code == 0, output
    assert "trial.gpus auto: 0.25 GPU per trial (the space's largest training step: " in output  # a ResNet-8 of width 4: 4 to a GPU
    assert "M MACs, 0.2M per image x batch " in output
    assert "0.25 GPU each" in output
    trials, _, _ = run_tables(tmp_path / "runs" / "auto")
    assert all(t["gpu_ids"] in {str(i) for i in range(DECLARED_GPUS)} for t in trials)


# MACs per step measured on an H100 (bench/README.md): ResNet-20 w16, ResNet-56 w32 and ResNet-18 at
# batch 128: 4 to a GPU; ResNet-18 at batch 256: 2; at batch 512: 1
@pytest.mark.parametrize("step_macs, trials", [(None, 1), (41e6 * 128, 4), (502e6 * 128, 4), (556e6 * 128, 4),
                                               (556e6 * 256, 2), (556e6 * 512, 1), (2e9 * 512, 1)])
def test_trials_per_gpu_follows_the_work_of_a_step(step_macs, trials):
    assert trials_per_gpu(step_macs) == trials


def test_largest_model_macs_builds_no_weights(image_folder, tmp_path):
    """The space's largest model is sized on the meta device: a width-1024 ResNet-56 (3.5B weights,
    14 GB) costs no memory at --dry-run."""
    import resource

    space = write_space(tmp_path, image_folder, params={"depth": {"choice": [8, 56]},
                                                        "width": {"choice": [4, 1024]}})
    spec = load_spec(SearchOptions(space=str(space)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    macs = largest_model_macs(spec)
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert grown_gib < 1.0
    small = count_macs(create_model("cifar_resnet", num_classes=10, depth=56, width=4).eval(), 16)
    assert macs == pytest.approx(small * 256 ** 2, rel=0.03)  # 3x3 convolutions grow with width squared


def test_auto_gpus_counts_the_largest_model_at_the_largest_batch(image_folder, tmp_path):
    params = {"depth": {"choice": [8, 14]}, "batch_size": {"choice": [16, 64, 32]}}
    space = write_space(tmp_path, image_folder, params=params)
    spec = load_spec(SearchOptions(space=str(space)))
    macs = largest_model_macs(spec)
    assert largest_batch_size(spec) == 64
    share, size = auto_gpus(spec)
    assert share == 1.0 / trials_per_gpu(macs * 64)
    assert size.endswith("per image x batch 64")
    for batch_size, expected in (({"int": [8, 48]}, 48), ({"value": 24}, 24)):
        space = write_space(tmp_path, image_folder, params={**params, "batch_size": batch_size})
        assert largest_batch_size(load_spec(SearchOptions(space=str(space)))) == expected
    space = write_space(tmp_path, image_folder, params={"depth": {"choice": [8, 14]}}, fixed={"batch_size": 32})
    assert largest_batch_size(load_spec(SearchOptions(space=str(space)))) == 32
    conditional = {"depth": {"choice": [8, 14]}, "batch_size": {"choice": [16, 24], "when": {"depth": 14}}}
    space = write_space(tmp_path, image_folder, params=conditional, fixed={"batch_size": 32})
    assert largest_batch_size(load_spec(SearchOptions(space=str(space)))) == 32  # depth 8 trains at the fixed 32
    # the shipped spaces: the quick space's ResNet-8..20 share a GPU 4 ways, resnet18.yaml's batch 512 has one
    spaces = Path(__file__).resolve().parents[1] / "spaces"
    assert auto_gpus(load_spec(SearchOptions(space=str(spaces / "quick.yaml"))))[0] == 0.25
    assert auto_gpus(load_spec(SearchOptions(space=str(spaces / "resnet18.yaml"))))[0] == 1.0


def test_largest_model_macs_covers_every_choice(image_folder, tmp_path):
    space = write_space(tmp_path, image_folder, params={
        "arch": {"choice": ["cifar_resnet", "resnet18"]},
        "depth": {"choice": [8, 14], "when": {"arch": "cifar_resnet"}}})
    values = yaml.safe_load(space.read_text())
    del values["fixed"]["depth"], values["fixed"]["width"]  # depth sampled now, for cifar_resnet only
    space.write_text(yaml.safe_dump(values))
    spec = load_spec(SearchOptions(space=str(space)))
    resnet18 = count_macs(create_model("resnet18", num_classes=10, input_size=16).eval(), 16)
    assert largest_model_macs(spec) == resnet18  # the depth choices do not apply to it: skipped
    ranged = write_space(tmp_path, image_folder, params={"width": {"int": [4, 64]}})
    assert largest_model_macs(load_spec(SearchOptions(space=str(ranged)))) is None  # unknown: 1 GPU each


def test_more_gpus_than_the_cluster_has_fails_fast(ray_session, image_folder, tmp_path):
    space = write_space(tmp_path, image_folder, trial={"gpus": 1})
    code, output = search("--space", str(space), "--storage", str(tmp_path), "--gpus", "16")
    assert code == 2
    assert "--gpus: 16 asked, but the cluster has 4" in output
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize(("params", "message"), [
    ({"depth": {"choice": [8, 9]}}, "params: depth = 9 (choice [8, 9]): depth: expected 6n+2"),
    ({"batch_size": {"choice": [0, 8]}}, "params: batch_size = 0 (choice [0, 8]): batch_size: expected a positive"),
    ({"lr": {"uniform": [-0.5, 1.0]}}, "params: lr = -0.5 (uniform [-0.5, 1]): lr: expected a positive number"),
    # only sampled under a condition: the check sets its parent so that it is
    ({"depth": {"choice": [8, 14]}, "dropout": {"uniform": [0.0, 1.0], "when": {"depth": 14}}},
     "params: dropout = 1.0 (uniform [0, 1] when depth in [14]): dropout: expected 0 <= dropout < 1"),
    # a bad value of another parameter is named as that one, not as the one being tried
    ({"depth": {"choice": [8, 14]}, "batch_size": {"int": [0, 16]}}, "params: batch_size = 0 (int [0, 16])"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_param_value_no_trial_can_train_is_one_line_before_any_trial(image_folder, tmp_path, params, message,
                                                                       dry_run):
    space = write_space(tmp_path, image_folder, params={"lr": {"loguniform": [1.0e-3, 1.0]}, **params})
    code, output = search("--space", str(space), "--storage", str(tmp_path / "runs"),
                          *(["--dry-run"] if dry_run else []))
    assert code == 2, output
    assert message in output
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output
    assert not (tmp_path / "runs").exists()  # nothing started


def test_dry_run_prints_the_space_and_starts_nothing(image_folder, tmp_path):
    space = write_space(tmp_path, image_folder)
    code, output = search("--space", str(space), "--storage", str(tmp_path / "runs"), "--dry-run",
                          "--num-samples", "11")
    assert code == 0, output
    assert "lr" in output and "loguniform" in output and "trials: 11" in output
    assert "up to 3 epochs each (ASHA decides after epoch 1, keeping the best 1/3)" in output
    assert not (tmp_path / "runs").exists()
    space = write_space(tmp_path, image_folder, trial={"gpus": "auto"})
    code, output = search("--space", str(space), "--dry-run")
    assert code == 0, output
    assert "auto (where there are GPUs: 0.25; largest training step " in output
    assert "M MACs, 0.2M per image x batch " in output


@pytest.mark.parametrize(("max_t", "grace", "factor"), [
    (4, 1, 3), (4, 2, 3), (8, 2, 4), (30, 3, 3), (9, 1, 3), (10, 1, 2.5), (100, 1, 2), (4, 4, 3), (1, 1, 3),
])
def test_dry_run_rungs_are_ray_tunes(max_t, grace, factor):
    from ray.tune.schedulers.async_hyperband import _Bracket

    from tuner.rungs import asha_rungs

    bracket = _Bracket(min_t=grace, max_t=max_t, reduction_factor=factor, s=0)
    theirs = sorted(math.ceil(m) for m, _ in bracket._rungs if m < max_t)
    assert asha_rungs(max_t, grace, factor) == theirs


def test_a_search_with_the_gp_sampler_runs_end_to_end(ray_session, image_folder, tmp_path):
    """sampler.type gp through the CLI, real Ray and ASHA: every trial reports, the GP draws
    after its start-up trials, and the summary names a best trial."""
    space = write_space(tmp_path, image_folder, sampler={"type": "gp", "seed": 0, "n_startup_trials": 2},
                        budget={"num_samples": 4, "max_epochs": 2, "grace_period": 1, "reduction_factor": 2})
    code, output = search("--space", str(space), "--storage", str(tmp_path / "runs"), "--name", "gp",
                          "--no-refit", "--max-concurrent", "1")
    assert code == 0, output
    trials, history, summary = run_tables(tmp_path / "runs" / "gp")
    assert len(trials) == 4 and all(t["epochs"] >= 1 for t in trials) and summary["best_trial_id"]
    assert len({(t["config/lr"], t["config/batch_size"]) for t in trials}) == 4  # four distinct draws


def test_gp_sampler_suggests_through_ray_optuna_search(tmp_path):
    """sampler.type gp as tuner/_ray.py hands it to Ray Tune (OptunaSearch, define-by-run, a
    conditional param), two trials out at once, the searcher saved and restored; Ray is not started."""
    from ray.tune.search.optuna import OptunaSearch

    from search_spaces import build_sampler, parse_space

    spec = parse_space({"name": "gp", "sampler": {"type": "gp", "seed": 3, "n_startup_trials": 2},
                        "params": {"optimizer": {"choice": ["sgd", "adamw"]}, "lr": {"loguniform": [1.0e-4, 0.1]},
                                   "momentum": {"uniform": [0.8, 0.99], "when": {"optimizer": "sgd"}}, "epochs": 3}})

    def searcher():
        return OptunaSearch(space=spec.define_by_run(), metric="val_acc", mode="max",
                            sampler=build_sampler(spec.sampler, params=spec.params, concurrency=2))

    first = searcher()
    for step in range(3):
        configs = {f"t{step}{k}": first.suggest(f"t{step}{k}") for k in range(2)}
        for trial_id, config in configs.items():
            assert config["epochs"] == 3 and ("momentum" in config) == (config["optimizer"] == "sgd")
            first.on_trial_complete(trial_id, {"val_acc": config["lr"] * 10, **config})
    first.save(str(tmp_path / "searcher.pkl"))
    again = searcher()
    again.restore(str(tmp_path / "searcher.pkl"))
    assert 1.0e-4 <= again.suggest("t9")["lr"] <= 0.1


@pytest.mark.parametrize("edit, message", [
    ({"budget": {"max_epochs": 2, "grace_period": 5}}, "grace_period"),
    ({"params": {"lr": {"loguniform": [0, 1.0]}}}, "positive lower bound"),
    ({"params": {"arch": {"choice": ["resnet21"]}}}, "resnet20"),
    ({"params": {"weight_decy": {"uniform": [0.1, 0.2]}}}, "did you mean 'weight_decay'"),
    ({"fixed": {"schedule": "linear"}}, "schedule"),
    ({"data": {"path": "/no/such/folder"}}, "does not exist"),
])
def test_bad_input_is_one_line_and_exit_code_2(image_folder, tmp_path, edit, message):
    space = write_space(tmp_path, image_folder, **edit)
    code, output = search("--space", str(space), "--storage", str(tmp_path / "runs"))
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], output
    assert not (tmp_path / "runs").exists()


def test_missing_space_file_is_one_line(tmp_path):
    code, output = search("--space", str(tmp_path / "nope.yaml"))
    assert code == 2 and len(output.strip().splitlines()) == 1 and "nope.yaml" in output


# --- the benchmarks read the search's own tables: keep them working -------------------------

def _bench(name: str):
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_trial_overhead_bench_reads_the_search_tables(finished_search):
    folder, _, _ = finished_search
    found = _bench("trial_overhead").overheads(folder / "runs" / "first")
    assert found["trials"] == 6 and found["concurrent"] == 1 and found["processes"] == 1
    assert found["fresh_process"]["trials"] == 1 and found["reused_process"]["trials"] == 5
    # the first trial waits for its process (start, imports); the others find it ready
    assert found["reused_process"]["start_gap_s"] < found["fresh_process"]["start_gap_s"]
    assert found["between_epochs_s"] is not None and found["between_epochs_s"] >= 0


def test_asha_bench_medians_count_a_miss_as_never():
    runs = [{"asha_tpe": {"epochs_to_target": {"0.5": a}}, "random_no_stopping": {"epochs_to_target": {"0.5": r}}}
            for a, r in ((10, 30), (None, 20), (12, None))]
    row = _bench("asha_vs_random").summarise(runs, [0.5])[0]
    assert row["asha_tpe_median"] == 12 and row["random_no_stopping_median"] == 30
    assert row["ratio"] == pytest.approx(0.4)


def test_asha_bench_summarises_one_variant_run_on_its_own():
    """bench/gpu.sh runs ASHA + TPE and random search as separate calls: a summary of one has no ratio."""
    runs = [{"seed": s, "asha_tpe": {"epochs_to_target": {"0.5": a}}} for s, a in ((0, 10), (1, 14), (2, None))]
    row = _bench("asha_vs_random").summarise(runs, [0.5])[0]
    assert row["asha_tpe"] == [10, 14, None] and row["asha_tpe_median"] == 14
    assert "random_no_stopping" not in row and row["ratio"] is None


def test_asha_replay_makes_ray_tunes_decisions():
    """The replay's stopping rule is Ray Tune's: same curves, same order, same epochs trained."""
    import random
    from types import SimpleNamespace

    from ray.tune.schedulers.async_hyperband import _Bracket

    replay = _bench("asha_replay")
    rng = random.Random(0)
    curves = {f"t{i}": sorted(rng.random() for _ in range(9)) for i in range(30)}
    secs = {t: [1.0] * 9 for t in curves}
    order = sorted(curves)
    ours = replay.replay(order, curves, secs, rungs=[1, 3, 9], rf=3, workers=1)
    bracket, theirs = _Bracket(min_t=1, max_t=9, reduction_factor=3, s=0), []
    for trial in order:
        for epoch, value in enumerate(curves[trial], start=1):
            theirs.append(value)
            if bracket.on_result(SimpleNamespace(trial_id=trial), epoch, value) == "STOP":
                break
    assert [v for v, _ in ours] == theirs
    assert len(ours) < 0.5 * 30 * 9  # it did stop trials
    assert len(replay.replay(order, curves, secs, rungs=[], rf=3, workers=2)) == 30 * 9
    # fidelity: a curve order kept to the end is 1, reversed is -1
    assert replay.rung_fidelity({"a": [0.1, 0.3], "b": [0.2, 0.4], "c": [0.3, 0.5]}) == pytest.approx([1.0, 1.0])
    assert replay.rung_fidelity({"a": [0.3, 0.3], "b": [0.2, 0.4], "c": [0.1, 0.5]})[0] == pytest.approx(-1.0)


def test_asha_replay_pairs_two_runs_by_configuration(finished_search):
    folder, _, _ = finished_search
    run_dir = folder / "runs" / "first"
    replay = _bench("asha_replay")
    curves, _ = replay.load_curves(run_dir)  # the trials that ran every epoch
    trials = pq.read_table(run_dir / "trials.parquet").to_pylist()
    assert 0 < len(curves) == sum(t["epochs"] == 3 for t in trials)
    (mine, _), (theirs, _) = replay.paired(run_dir, run_dir)
    assert len(mine) == len(curves) and mine == theirs
    assert all(key.startswith('{"config/batch_size"') for key in mine)
    both, _ = replay.pooled([run_dir, run_dir])  # two runs as one set of trials
    assert sorted(both) == sorted(f"{i}/{t}" for i in (0, 1) for t in curves)
    assert all(both[f"{i}/{t}"] == curves[t] for i in (0, 1) for t in curves)


def test_sampler_quality_reads_every_trial_in_start_order(finished_search):
    folder, _, _ = finished_search
    run_dir = folder / "runs" / "first"
    quality = _bench("sampler_quality")
    found = quality.trials_in_order(run_dir)
    trials = pq.read_table(run_dir / "trials.parquet").to_pylist()
    assert len(found) == len(trials) == 6  # stopped trials too: all reach the first rung
    assert [t["started_at"] for t in found] == sorted(t["started_at"] for t in trials)
    history = pq.read_table(run_dir / "history.parquet").to_pylist()
    first = {h["trial_id"]: h["val_acc"] for h in history if h["training_iteration"] == 1}
    assert all(t["rung_val_acc"] == first[t["trial_id"]] for t in found)
    params = {k.removeprefix("config/") for k in trials[0] if k.startswith("config/")}
    assert params and set(quality.settled_on(found)) == params


def test_sampler_quality_scores_blocks_against_the_random_draws():
    quality = _bench("sampler_quality")

    def trial(value, final=None, depth=8):
        return {"rung_val_acc": value, "curve": {1: value, **({3: final} if final is not None else {})},
                "config/depth": depth, "config/lr": 0.1}

    random_trials = [trial(v / 100, final=0.5) for v in range(1, 101)]  # p75 0.7525, p90 0.901
    run = [trial(0.1), trial(0.2), trial(0.8, final=0.6), trial(0.95, final=0.7, depth=14), trial(0.5, depth=14)]
    result = quality.compare(random_trials, run, [2, 5], max_epochs=3)
    first, second = result["blocks"]
    assert first == {"trials": "1-2", "mean": pytest.approx(0.15), "above_random_p75": 0.0, "above_random_p90": 0.0,
                     "past_rung": 0.0, "epochs_per_trial": 1.0, "finished": 0, "final_mean": None}
    assert second["trials"] == "3-5" and second["mean"] == pytest.approx(0.75)
    assert second["above_random_p75"] == pytest.approx(2 / 3) and second["above_random_p90"] == pytest.approx(1 / 3)
    assert second["finished"] == 2 and second["final_mean"] == pytest.approx(0.65)
    assert second["past_rung"] == pytest.approx(2 / 3) and second["epochs_per_trial"] == pytest.approx(7 / 3)
    assert result["random"]["final_mean"] == pytest.approx(0.5)
    assert result["last_block_settled_on"]["depth"] == {"commonest": 14, "share": pytest.approx(2 / 3)}
    assert result["last_block_settled_on"]["lr"] == {"median": 0.1}


def test_noise_floor_retrains_what_the_search_trained(finished_search):
    """Same configuration, seed and split as a trial: the bench's run ends where the trial ended."""
    folder, _, _ = finished_search
    noise = _bench("noise_floor")
    trials = pq.read_table(folder / "runs" / "first" / "trials.parquet").to_pylist()
    found = noise.finished_trials([folder / "runs" / "first"])
    assert len(found) == sum(t["status"] == "completed" for t in trials) > 0  # stopped trials have no final
    picked = noise.pick(found, 2, 1.0)
    assert picked[0]["rank"] == 1 and picked[0]["final"] == max(t["final"] for t in found)
    best = picked[0]
    seed = best["base"]["seed"]
    run = noise.train_once((best, seed, seed))
    assert len(run["val_acc"]) == 3 and run["val_acc"][-1] == pytest.approx(best["final"], abs=1e-6)


def test_noise_floor_separates_configuration_from_seed():
    noise = _bench("noise_floor")
    picked = [{"rank": r, "trial": t, "params": {}, "final": f} for r, t, f in ((1, "a", 0.7), (2, "b", 0.5))]
    runs = [{"trial": t, "val_acc": [v], "seconds": 1.0, "val_images": 100}
            for t, values in (("a", (0.60, 0.64)), ("b", (0.50, 0.54))) for v in values]
    result = noise.analyse(picked, runs, [0.6])
    assert result["within_sd"] == pytest.approx(math.sqrt(0.0008))  # each pair: sd of (x, x + 0.04)
    # variance of the means (0.62, 0.52) is 0.005; 0.0008 / 2 of it is the seed's
    assert result["between_sd"] == pytest.approx(math.sqrt(0.005 - 0.0004))
    assert result["repeatability"] == pytest.approx(0.0046 / (0.0046 + 0.0008))
    assert [row["reached"]["0.6"] for row in result["configs"]] == [1.0, 0.0]
    assert result["best_search_final"] == 0.7 and result["best_repeat_mean"] == pytest.approx(0.62)


def test_noise_floor_retrains_a_configuration_given_on_the_command_line():
    noise = _bench("noise_floor")
    base = {"arch": "cifar_resnet", "depth": 8, "lr": 0.1}
    given = noise.given_config("depth=20,lr=0.16,batch_size=64,weight_decay=2.6e-5", base, 1)
    assert given["params"] == {"depth": 20, "lr": 0.16, "batch_size": 64, "weight_decay": 2.6e-5}
    assert given["trial"] == "config1" and given["base"] == base and math.isnan(given["final"])
    for bad in ("width=0", "depth", "dept=20", "lr=fast"):
        with pytest.raises(ValueError, match=re.escape(f"--config {bad!r}: expected KEY=VALUE")):
            noise.given_config(bad, base, 1)


def test_oracle_bound_replays_the_best_configurations_runs_against_random_search(tmp_path):
    oracle = _bench("oracle_bound")
    runs = [{"trial": "good", "seed": s, "val_acc": [0.5, 0.7], "seconds": 2.0} for s in range(4)]
    runs += [{"trial": "weak", "seed": s, "val_acc": [0.5, 0.6], "seconds": 2.0} for s in range(4)]
    (tmp_path / "noise.json").write_text(json.dumps({"configs": [{"trial": "good", "params": {"lr": 0.1}},
                                                                 {"trial": "weak", "params": {"lr": 1.0}}],
                                                     "all_runs": runs}))
    oracles = oracle.repeat_curves(tmp_path / "noise.json")
    assert oracles["good"]["curves"]["good/3"] == [0.5, 0.7] and oracles["good"]["secs"]["good/3"] == [1.0, 1.0]
    # random search: one of three trials gets there, in its second epoch: 2, 4 or 6 epochs, one at a time
    curves = {"a": [0.1, 0.2], "b": [0.1, 0.2], "c": [0.1, 0.8]}
    secs = {k: [1.0, 1.0] for k in curves}
    result = oracle.bound((curves, secs), oracles, targets=[0.7], rungs=[1], rf=3, workers=1, orders=999)
    assert result["random"]["0.7"]["median"] == 4 and result["random"]["0.7"]["reached"] == 1.0
    row = result["targets"]["0.7"]
    assert row["oracle"] == "good" and row["oracle_median"] == 2 and row["oracle_asha_median"] == 2
    assert row["a_third"] == pytest.approx(4 / 3) and row["oracle_over_random"] == pytest.approx(0.5)
    assert math.isinf(result["oracles"]["weak"]["no_stopping"]["0.7"]["median"])
    # two at a time, the other trial's first epoch lands before the winner's second
    two = oracle.median_epochs(oracles["good"]["curves"], oracles["good"]["secs"], targets=[0.7], rungs=[],
                               rf=3, workers=2, orders=10)
    assert two["0.7"]["median"] == 3


ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SPACES = sorted([*(ROOT / "spaces").glob("*.yaml"), *(ROOT / "bench" / "spaces").glob("*.yaml")])


def test_the_shipped_spaces_are_all_found():
    names = {str(p.relative_to(ROOT)) for p in SHIPPED_SPACES}
    assert {"spaces/quick.yaml", "spaces/scratch.yaml", "spaces/finetune.yaml", "spaces/finetune_run.yaml", "spaces/resnet18.yaml",
            "bench/spaces/quick8.yaml", "bench/spaces/quick_wide.yaml", "bench/spaces/quick_16.yaml",
            "bench/spaces/quick_full.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED_SPACES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_space_samples_configs_a_trial_accepts(path):
    """Every space in the repo loads as `tune-resnet search` loads it, and what its sampler draws
    is a training config the trainable accepts and (from scratch) a model that builds."""
    import optuna

    spec = load_spec(SearchOptions(space=str(path)))
    base = base_config(spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen: dict[str, set] = {}
    for _ in range(12):
        trial = study.ask()
        params = spec.sample(trial)
        config = base.replace(**params)  # a TrainConfig is validated as it is built
        if config.pretrained is None:
            model = create_model(config.arch, num_classes=10, depth=config.depth, width=config.width,
                                 stem=config.stem, input_size=config.input_size)
            assert sum(p.numel() for p in model.parameters()) > 0
        for key, value in params.items():
            seen.setdefault(key, set()).add(value)
        study.tell(trial, 0.5)
    # the sampled parameters do vary (a space that pins everything would search nothing)
    assert any(len(values) > 1 for values in seen.values()), seen


def test_resume_settles_a_concurrency_limiter_saved_beside_a_later_state(finished_search, tmp_path):
    """Ray's state files written by two saves (a driver killed while Ray copied them): the
    limiter's running trials name one the experiment state has ended. Before a restore they are
    settled, or Ray would wait forever for a free slot; an unfinished trial stays counted."""
    import ray.cloudpickle as cloudpickle

    from tuner._ray import settle_concurrency

    folder, _, _ = finished_search
    run, first = tmp_path / "run", folder / "runs" / "first"
    run.mkdir()
    for path in [*first.glob("*_state-*.json"), *first.glob("searcher-state-*")]:
        (run / path.name).write_bytes(path.read_bytes())
    [gen] = run.glob("search_gen_state-*.json")
    state = cloudpickle.loads(gen.read_bytes())
    [experiment] = run.glob("experiment_state-*.json")
    saved = json.loads(experiment.read_text())
    ended = json.loads(saved["trial_data"][0][0])["trial_id"]
    running = json.loads(saved["trial_data"][1][0])
    running["status"] = "RUNNING"  # as if it had been running at the save
    saved["trial_data"][1][0] = json.dumps(running)
    experiment.write_text(json.dumps(saved))
    state["name:ConcurrencyLimiter"].update(live_trials={ended, running["trial_id"]}, num_unfinished_live_trials=2)
    gen.write_bytes(cloudpickle.dumps(state))

    settle_concurrency(str(run))
    limiter = cloudpickle.loads(gen.read_bytes())["name:ConcurrencyLimiter"]
    assert limiter["live_trials"] == {running["trial_id"]} and limiter["num_unfinished_live_trials"] == 1
