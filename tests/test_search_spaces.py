from __future__ import annotations

import math
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import optuna
import pytest

from search_spaces import SearchSpec, SpaceError, build_sampler, load_space, parse_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

SAMPLER_TYPES = ["tpe", "random", "cmaes", "qmc", "grid", "nsga2"]

# What a training config would pass in: its field names and the values its enums accept.
PARAM_NAMES = [
    "arch", "lr", "weight_decay", "optimizer", "momentum", "nesterov", "freeze", "frozen_stages",
    "batch_size", "epochs", "warmup_epochs", "schedule", "label_smoothing", "augment",
]  # fmt: skip
ALLOWED_VALUES = {
    "arch": ["resnet20", "resnet18", "resnet34"],
    "freeze": ["none", "linear", "stages", "bn"],
    "optimizer": ["sgd", "adamw"],
    "schedule": ["cosine", "step"],
}

# Conditions two deep (optimizer -> momentum -> nesterov), written children first on purpose.
FULL = """
name: full-space
data: {dataset: cifar100, path: /data/c100, val_fraction: 0.2, train_subset: 5000}
model: {pretrained: torchvision}
objective: {metric: val_loss}
budget: {num_samples: 8, max_epochs: 12, grace_period: 2, reduction_factor: 2, time_limit_s: 3600}
sampler: {type: tpe, seed: 3, n_startup_trials: 4}
trial: {cpus: 4, gpus: 0.5}
refit: {epochs: 20, warm_start: true}
export: {formats: [onnx]}
params:
  nesterov: {choice: [true, false], when: {momentum: 0.9}}
  momentum: {choice: [0.9, 0.95], when: {optimizer: sgd}}
  optimizer: {choice: [sgd, adamw]}
  warmup_epochs: {value: 2, when: {optimizer: adamw}}
  arch: {choice: [resnet20, resnet18]}
  lr: {loguniform: [1.0e-4, 1.0e-1]}
  weight_decay: {uniform: [0.0, 1.0e-3]}
  freeze: {choice: [none, stages]}
  frozen_stages: {int: [1, 3], when: {freeze: stages}}
  batch_size: {int: [64, 256], step: 64}
  epochs: 5
fixed: {schedule: cosine, label_smoothing: 0.1, lr: 0.5}
"""

MINIMAL = "params:\n  lr: {loguniform: [1.0e-4, 1.0e-1]}\n"


def _write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _load(tmp_path: Path, text: str) -> SearchSpec:
    return load_space(_write(tmp_path, text), param_names=PARAM_NAMES, allowed_values=ALLOWED_VALUES)


def _run_study(spec: SearchSpec, n_trials: int, *, seed: int | None = None) -> list[dict]:
    sampler_spec = spec.sampler if seed is None else spec.sampler.model_copy(update={"seed": seed})
    sampler = build_sampler(sampler_spec, params=spec.params, concurrency=1)
    study = optuna.create_study(sampler=sampler)
    configs: list[dict] = []

    def objective(trial: optuna.Trial) -> float:
        config = spec.sample(trial)
        configs.append(config)
        # Deterministic and smooth, so model-based samplers have something to follow.
        return abs(math.log10(config.get("lr", 1e-2)) + 2) + config.get("batch_size", 0) / 1000

    study.optimize(objective, n_trials=n_trials)
    return configs


def _assert_obeys_when(spec: SearchSpec, config: dict) -> None:
    for name, param in spec.params.items():
        active = all(p in config and config[p] in values for p, values in param.when.items())
        assert (name in config) == active, (name, config)
    assert ("momentum" in config) == (config["optimizer"] == "sgd")
    assert ("nesterov" in config) == (config.get("momentum") == 0.9)
    assert ("frozen_stages" in config) == (config["freeze"] == "stages")


# ---------------------------------------------------------------- parsing


def test_full_space_parses(tmp_path: Path) -> None:
    spec = _load(tmp_path, FULL)
    assert spec.name == "full-space"
    assert spec.data.dataset == "cifar100" and spec.data.train_subset == 5000
    assert spec.data.input_size == 32  # default
    assert spec.objective.mode == "min"  # follows val_loss when not given
    assert spec.budget.reduction_factor == 2 and spec.budget.time_limit_s == 3600
    assert spec.trial.gpus == 0.5 and spec.refit.warm_start
    assert spec.export.formats == ("onnx",)
    assert spec.params["epochs"].kind == "value" and spec.params["epochs"].value == 5
    assert spec.params["batch_size"].step == 64
    names = list(spec.params)
    assert names.index("optimizer") < names.index("momentum") < names.index("nesterov")
    assert spec.resolved_config({"lr": 0.01})["lr"] == 0.01  # params win over fixed
    assert spec.resolved_config({})["schedule"] == "cosine"
    lines = spec.describe()
    assert any("nesterov" in line and "when momentum in [0.9]" in line for line in lines)


def test_edge_cases_try_every_edge_of_every_param_where_it_is_active(tmp_path: Path) -> None:
    spec = _load(tmp_path, FULL)
    cases = list(spec.edge_cases())
    tried = {(name, value) for name, value, _ in cases}
    assert tried == {
        ("nesterov", True), ("nesterov", False), ("momentum", 0.9), ("momentum", 0.95), ("optimizer", "sgd"),
        ("optimizer", "adamw"), ("warmup_epochs", 2), ("arch", "resnet20"), ("arch", "resnet18"),
        ("lr", 1.0e-4), ("lr", 1.0e-1), ("weight_decay", 0.0), ("weight_decay", 1.0e-3), ("freeze", "none"),
        ("freeze", "stages"), ("frozen_stages", 1), ("frozen_stages", 3), ("batch_size", 64),
        ("batch_size", 256), ("epochs", 5),
    }  # fmt: skip
    for name, value, params in cases:
        assert params[name] == value
        _assert_obeys_when(spec, params)  # a configuration the sampler could draw
    # nesterov needs momentum 0.9, which needs sgd: the parents of the parents are set too
    nesterov = next(params for name, _, params in cases if name == "nesterov")
    assert nesterov["optimizer"] == "sgd" and nesterov["momentum"] == 0.9
    # the others stay at their first edge
    lr_high = next(params for name, value, params in cases if (name, value) == ("lr", 0.1))
    assert lr_high["batch_size"] == 64 and lr_high["arch"] == "resnet20"


def test_defaults_fill_in(tmp_path: Path) -> None:
    spec = load_space(_write(tmp_path, MINIMAL, "quick.yaml"))
    assert spec.name == "quick"
    assert spec.data.dataset == "cifar10" and spec.data.val_fraction == 0.1 and spec.data.path is None
    assert spec.model.pretrained is None
    assert (spec.objective.metric, spec.objective.mode) == ("val_acc", "max")
    assert (spec.budget.num_samples, spec.budget.max_epochs, spec.budget.grace_period) == (16, 10, 1)
    assert (spec.sampler.type, spec.sampler.seed, spec.sampler.multivariate) == ("tpe", 0, True)
    assert (spec.trial.cpus, spec.trial.gpus) == (1, 0)
    assert spec.refit.epochs is None and spec.export.formats == ("pt2", "onnx", "safetensors")
    assert spec.fixed == {}


@pytest.mark.parametrize("formats", [["pt2"], ["torchscript"], ["pt2", "onnx", "torchscript", "safetensors"]])
def test_export_formats_take_pt2_and_torchscript_on_request(tmp_path: Path, formats: list[str]) -> None:
    text = MINIMAL + f"export: {{formats: [{', '.join(formats)}]}}\n"
    assert load_space(_write(tmp_path, text, "quick.yaml")).export.formats == tuple(formats)


def test_an_unknown_export_format_names_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="export.formats.0: expected one of pt2, onnx, torchscript, safetensors"):
        load_space(_write(tmp_path, MINIMAL + "export: {formats: [tflite]}\n", "quick.yaml"))


def test_parse_space_takes_a_dict() -> None:
    spec = parse_space({"params": {"lr": {"uniform": [0.1, 0.2]}}, "trial": {"gpus": "auto"}})
    assert spec.trial.gpus == "auto"
    with pytest.raises(SpaceError, match=r"^<space>: params: expected at least one parameter"):
        parse_space({"params": {}})


def _space(params: str, extra: str = "") -> str:
    return f"{extra}\nparams:\n" + textwrap.indent(textwrap.dedent(params), "  ")


OPTIMIZER = "optimizer: {choice: [sgd, adamw]}"
MOMENTUM = "momentum: {uniform: [0.8, 0.99], when: {"
ERRORS = [
    ("unknown top-level key", _space("lr: 0.1", "budgett: {num_samples: 4}"),
     "budgett", "unknown key (did you mean 'budget'?)"),
    ("unknown key in a section", _space("lr: 0.1", "budget: {num_sample: 4}"),
     "budget.num_sample", "unknown key (did you mean 'num_samples'?)"),
    ("low > high", _space("lr: {uniform: [0.5, 0.1]}"),
     "params.lr.uniform", "expected low <= high, got [0.5, 0.1]"),
    ("log bound zero", _space("lr: {loguniform: [0, 0.1]}"),
     "params.lr.loguniform", "expected a positive lower bound on a log scale, got 0"),
    ("unknown distribution", _space("lr: {logunifrom: [1.0e-4, 0.1]}"),
     "params.lr", "unknown distribution 'logunifrom' (did you mean 'loguniform'?); expected one of uniform"),
    ("unknown arch", _space("arch: {choice: [resnet18, resnet19]}"),
     "params.arch.choice", "expected one of resnet20, resnet18, resnet34, got 'resnet19' (did you mean"),
    ("unknown freeze strategy", _space("lr: 0.1", "fixed: {freeze: stage}"),
     "fixed.freeze", "got 'stage' (did you mean 'stages'?)"),
    ("when names an undefined param", _space(f"optimizer: {{choice: [sgd]}}\n{MOMENTUM}optimiser: sgd}}}}"),
     "params.momentum.when", "'optimiser' is not a defined parameter (did you mean 'optimizer'?)"),
    ("when value impossible", _space(f"{OPTIMIZER}\n{MOMENTUM}optimizer: sdg}}}}"),
     "params.momentum.when.optimizer", "got 'sdg' (did you mean 'sgd'?)"),
    ("when cycle", _space("lr: {choice: [1, 2], when: {epochs: 1}}\nepochs: {choice: [1, 2], when: {lr: 1}}"),
     "when", "expected conditions without a cycle, got"),
    ("gpus 1.5", _space("lr: 0.1", "trial: {gpus: 1.5}"),
     "trial.gpus", "expected a fraction <= 1 or a whole number, got 1.5"),
    ("hook not module:callable", _space("lr: 0.1", "trial: {hook: my_hooks.EpochLog}"),
     "trial.hook", "expected module:callable (e.g. my_hooks:EpochLog), got 'my_hooks.EpochLog'"),
    ("hook_args without a hook", _space("lr: 0.1", "trial: {hook_args: {path: x}}"),
     "trial.hook_args", "given without trial.hook"),
    ("grace_period > max_epochs", _space("lr: 0.1", "budget: {max_epochs: 3, grace_period: 5}"),
     "budget.grace_period", "expected <= max_epochs (3), got 5"),
    ("grid with a continuous param", _space("lr: {uniform: [0.1, 0.2]}", "sampler: {type: grid}"),
     "params.lr", "expected a choice or int parameter under sampler type grid, got uniform"),
    ("grid with a condition", _space(f"{OPTIMIZER}\n{MOMENTUM}optimizer: sgd}}}}", "sampler: {type: grid}"),
     "params.momentum.when", "expected no condition under sampler type grid"),
    ("unknown sampler", _space("lr: 0.1", "sampler: {type: tpee}"),
     "sampler.type", "expected one of tpe, random, cmaes, qmc, grid, gp, nsga2, got 'tpee' (did you mean 'tpe'?)"),
    ("unknown param name", _space("lrr: {uniform: [0.1, 0.2]}"),
     "params.lrr", "unknown parameter (did you mean 'lr'?)"),
    ("not a number", _space("lr: {uniform: [low, 0.2]}"),
     "params.lr.uniform.0", "expected a valid number, got 'low'"),
    ("fractional int", _space("lr: 0.1", "budget: {num_samples: 2.5}"),
     "budget.num_samples", "expected a valid integer, got 2.5"),
    ("duplicate choice", _space("batch_size: {choice: [128, 128]}"),
     "params.batch_size.choice", "expected distinct values, got 128 twice"),
    ("log and step", _space("batch_size: {int: [16, 256], log: true, step: 16}"),
     "params.batch_size.step", "expected no step with log: true, got 16"),
    ("mode against metric", _space("lr: 0.1", "objective: {metric: val_loss, mode: max}"),
     "objective.mode", "expected 'min' for val_loss, got 'max'"),
    ("section not a mapping", _space("lr: 0.1", "budget: 5"),
     "budget", "expected a valid dictionary"),
    ("condition on a continuous param", _space("lr: {uniform: [0.1, 0.2]}\nmomentum: {choice: [0.9], when: {lr: 0.1}}"),
     "params.momentum.when.lr", "expected a choice, int or value parameter to condition on, got uniform"),
    ("YAML 1.1 float as a string", _space("lr: {choice: [1.0e-3, 1e-4]}"),
     "params.lr.choice.1", "expected a number written like 1.0e-4 (YAML reads 1e-4 as a string), got '1e-4'"),
    ("bare list param", _space("batch_size: [128, 256]"),
     "params.batch_size", "expected a distribution such as {choice: [...]} or a scalar"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "key", "expected"), [case[1:] for case in ERRORS], ids=[c[0] for c in ERRORS])
def test_errors_name_file_and_key(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(SpaceError) as info:
        load_space(path, param_names=PARAM_NAMES, allowed_values=ALLOWED_VALUES)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ") and key in message
    assert expected in message
    assert str(pickle.loads(pickle.dumps(info.value))) == message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("params:\n  lr: 0.1\n", "no such file"),
        ("params:\n  lr: {uniform: [0.1, 0.2]}\n  - momentum\n", "line 3, column 3"),
        ("params:\n  lr: {uniform: [0.1, 0.2]}\n  momentum: [0.9\n", "while parsing a flow sequence at line 3"),
        ("- a\n- b\n", "expected a mapping of sections at the top level, got a list"),
        ("", "got an empty file"),
        ("just a string\n", "got a str"),
    ],
    ids=["missing file", "yaml syntax", "yaml unclosed", "a list", "empty", "a scalar"],
)
def test_file_level_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "missing.yaml" if expected == "no such file" else _write(tmp_path, text)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and expected in message


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("sampler_type", ["random", "tpe"])
def test_conditions_hold_over_many_trials(tmp_path: Path, sampler_type: str) -> None:
    spec = _load(tmp_path, FULL).with_overrides(sampler=sampler_type)
    configs = _run_study(spec, 200)
    for config in configs:
        _assert_obeys_when(spec, config)
        assert ("warmup_epochs" in config) == (config["optimizer"] == "adamw")
    # Both sides of the nested condition were actually exercised.
    assert {"nesterov" in config for config in configs} == {True, False}


def _sampler_space(sampler_type: str) -> str:
    if sampler_type == "grid":
        return _space("optimizer: {choice: [sgd, adamw]}\nbatch_size: {int: [64, 256], step: 64}\nepochs: 3",
                      "sampler: {type: grid, seed: 1}")  # fmt: skip
    params = """
        optimizer: {choice: [sgd, adamw]}
        momentum: {uniform: [0.8, 0.99], when: {optimizer: sgd}}
        lr: {loguniform: [1.0e-4, 0.1]}
        batch_size: {int: [64, 256], step: 64}
    """
    return _space(params, f"sampler: {{type: {sampler_type}, seed: 1, n_startup_trials: 5}}")


@pytest.mark.parametrize("sampler_type", SAMPLER_TYPES)
def test_seeded_sampler_reproduces(tmp_path: Path, sampler_type: str) -> None:
    spec = load_space(_write(tmp_path, _sampler_space(sampler_type)))
    first = _run_study(spec, 15)
    assert first == _run_study(spec, 15)
    if sampler_type in ("tpe", "random"):
        assert first != _run_study(spec, 15, seed=2)


def test_build_sampler_options(tmp_path: Path) -> None:
    spec = _load(tmp_path, FULL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ExperimentalWarning leaks to the user
        samplers = {
            kind: build_sampler(spec.sampler.model_copy(update={"type": kind}), params=spec.params, concurrency=4)
            for kind in ["tpe", "random", "cmaes", "qmc", "gp", "nsga2"]
        }
    assert isinstance(samplers["tpe"], optuna.samplers.TPESampler)
    assert isinstance(samplers["gp"], optuna.samplers.GPSampler)
    assert isinstance(samplers["cmaes"], optuna.samplers.CmaEsSampler)
    assert isinstance(samplers["qmc"], optuna.samplers.QMCSampler)
    assert isinstance(samplers["nsga2"], optuna.samplers.NSGAIISampler)
    assert pickle.loads(pickle.dumps(samplers["nsga2"]))._thread_lock is not None  # Ray pickles the searcher
    grid = load_space(_write(tmp_path, _sampler_space("grid")))
    sampler = build_sampler(grid.sampler, params=grid.params, concurrency=1)
    assert isinstance(sampler, optuna.samplers.GridSampler)
    configs = _run_study(grid, 100)  # GridSampler stops the study when the grid is done
    assert len(configs) == 2 * 4 and {c["batch_size"] for c in configs} == {64, 128, 192, 256}


def test_gp_sampler_is_seeded_and_samples_a_conditional_space(tmp_path: Path) -> None:
    """GPSampler models the params every trial has; momentum (sgd only) comes from its seeded random
    fallback. A few asks and tells past the warm-up, where the Gaussian process is fitted."""
    text = _sampler_space("gp").replace("n_startup_trials: 5", "n_startup_trials: 2")
    spec = load_space(_write(tmp_path, text))
    sampler = build_sampler(spec.sampler, params=spec.params, concurrency=2)
    assert isinstance(sampler, optuna.samplers.GPSampler)
    first = _run_study(spec, 5)
    assert first == _run_study(spec, 5)  # same seed, same configurations, GP steps included
    assert first[:2] != _run_study(spec, 2, seed=2)
    for config in first:
        assert ("momentum" in config) == (config["optimizer"] == "sgd")
        assert 1.0e-4 <= config["lr"] <= 0.1 and config["batch_size"] in (64, 128, 192, 256)
    # As Ray's OptunaSearch drives it: two trials asked at once (the GP counts the running one), then
    # the sampler pickled with the searcher's checkpoint and restored.
    study = optuna.create_study(sampler=sampler)
    space = spec.define_by_run()
    for batch in (1, 1, 2):
        trials = [study.ask() for _ in range(batch)]
        for trial in trials:
            space(trial)
        for trial in trials:
            study.tell(trial, trial.params["lr"])
    study.sampler = pickle.loads(pickle.dumps(sampler))
    trial = study.ask()
    space(trial)
    assert 1.0e-4 <= trial.params["lr"] <= 0.1


def test_define_by_run_in_a_real_study(tmp_path: Path) -> None:
    spec = _load(tmp_path, FULL)
    space = pickle.loads(pickle.dumps(spec.define_by_run()))  # Ray pickles its searcher
    study = optuna.create_study(sampler=build_sampler(spec.sampler, params=spec.params, concurrency=2))
    for _ in range(30):
        trial = study.ask()
        constants = space(trial)
        expected = {"epochs": 5} | ({"warmup_epochs": 2} if trial.params["optimizer"] == "adamw" else {})
        assert constants == expected
        assert not set(constants) & set(trial.params)  # constants are returned, never suggested
        _assert_obeys_when(spec, {**trial.params, **constants})
        study.tell(trial, trial.params["lr"])
    assert len(study.trials) == 30


# ---------------------------------------------------------------- overrides


def test_with_overrides(tmp_path: Path) -> None:
    spec = _load(tmp_path, FULL)
    new = spec.with_overrides(
        num_samples=3, max_epochs=1, seed=7, gpus=2, cpus=2, data_path="/elsewhere", train_subset=100, time_limit_s=None
    )
    assert (new.budget.num_samples, new.budget.max_epochs, new.budget.grace_period) == (3, 1, 1)  # grace clamped
    assert (new.sampler.seed, new.trial.gpus, new.trial.cpus) == (7, 2, 2)
    assert (new.data.path, new.data.train_subset, new.budget.time_limit_s) == ("/elsewhere", 100, 3600)
    assert new.params == spec.params and new.fixed == spec.fixed
    assert spec.budget.num_samples == 8  # the original is untouched


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"gpus": 1.5}, "trial.gpus: expected a fraction <= 1 or a whole number, got 1.5"),
        ({"num_samples": 0}, "budget.num_samples: expected greater than 0, got 0"),
        ({"max_epochs": 4, "grace_period": 6}, "budget.grace_period: expected <= max_epochs (4), got 6"),
        ({"sampler": "grid"}, "params.momentum.when: expected no condition under sampler type grid, got one"),
    ],
)
def test_with_overrides_revalidates(tmp_path: Path, overrides: dict, expected: str) -> None:
    spec = _load(tmp_path, FULL)
    with pytest.raises(SpaceError) as info:
        spec.with_overrides(**overrides)
    assert str(info.value) == f"{tmp_path / 'space.yaml'}: {expected}"


def test_with_overrides_rejects_unknown_keyword(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="unknown override 'epochs'"):
        _load(tmp_path, FULL).with_overrides(epochs=3)


def test_imports_no_torch_ray_or_click() -> None:
    code = "import sys, search_spaces; print(sorted({'torch', 'ray', 'click'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
