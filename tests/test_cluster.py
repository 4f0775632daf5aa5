"""Clusters: cluster.yaml against Ray's own validator, resource planning over several nodes, the
storage checks, and real multi-node Ray clusters on this machine that searches run on.

A cluster here is `ray start --block` processes (a head and workers, each declaring 1 CPU and 2
GPUs that do not exist; the lost-node test's head declares none, so trials run on its two workers
only), with their own ports and temp folder so they never meet the session's embedded Ray; the
search runs in a separate driver process, as `tune-resnet search --address` would on a real
cluster. Every node has this machine's IP, so trials are told apart by Ray node id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from test_search import run_tables, search, write_space
from trainables.config import TrainConfig
from trial_hooks import with_tests_on_path
from tuner import _ray, status
from tuner.errors import SearchError
from tuner.plan import Cluster, SearchOptions, load_spec, plan_resources

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
NODE_CPUS, NODE_GPUS = 1, 2  # per node that runs trials
TRIALS_AT_ONCE = 8           # 4 GPUs / 0.5 per trial, and 2 CPUs / 0.25 per trial


# ---------------------------------------------------------------------------------------------
# cluster.yaml
# ---------------------------------------------------------------------------------------------

def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_own_validation():
    """What `ray up` does before it talks to the cloud: fill in the provider's defaults, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(cluster_config())
    validate_config(config)  # raises on any schema or consistency error
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers), "workers have GPUs"
    assert all(0 <= t["min_workers"] < t["max_workers"] <= config["max_workers"] for t in workers), "autoscaling range"


@pytest.mark.parametrize("edit, error", [
    ({"max_workers": 1}, "smaller than the sum of `min_workers`"),
    ({"max_wokers": 4}, "('max_wokers' was unexpected)"),
    ({"idle_timeout_minutes": "ten"}, "'ten' is not of type 'number'"),
    ({"head_node_type": "gpu"}, "must be one of `available_node_types`"),
])
def test_rays_validator_does_refuse_a_broken_config(edit, error):
    """The check above is worth something: the same calls refuse these edits of cluster.yaml."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    with pytest.raises(Exception, match=re.escape(error)):
        validate_config(prepare_config({**cluster_config(), **edit}))


def package_name(requirement: str) -> str:
    """The normalised name a requirement or pin starts with (PEP 503: 'PyYAML' and 'pyyaml' alike)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def locked_versions() -> dict[str, str]:
    """constraints.txt: normalised package name -> the version `make setup` installs."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pins[package_name(line)] = line.split("==")[1]
    return pins


def test_the_tests_run_with_the_locked_versions_and_every_dependency_is_locked():
    pins = locked_versions()
    wanted = metadata.requires("tune-resnet")  # pyproject's dependencies and extras, as installed
    names = {package_name(requirement) for requirement in wanted}
    assert names <= set(pins), f"not in constraints.txt: {sorted(names - set(pins))}; run make lock"
    for name, version in pins.items():
        with contextlib.suppress(metadata.PackageNotFoundError):  # a platform's own packages (CUDA wheels)
            assert metadata.version(name) == version, f"constraints.txt locks {name}=={version}; run make setup"


def test_cluster_yaml_installs_the_versions_the_tests_ran_with():
    commands = cluster_config()["setup_commands"]
    install = next(c for c in commands if "tune-resnet[export]" in c)
    # one resolve: Ray and this project under the lock the tests ran with, from the synced copy
    assert '-c "$HOME/tune-resnet/constraints.txt"' in install and '"ray[default,tune]"' in install
    assert '-e "$HOME/tune-resnet[export]"' in install
    assert not re.search(r"==", " ".join(commands)), "pin versions in constraints.txt, not in cluster.yaml"
    assert f"--python {sys.version_info.major}.{sys.version_info.minor} ~/venv" in " ".join(commands)
    assert {"ray", "torch", "torchvision", "optuna", "pyarrow"} <= set(locked_versions())


def test_cluster_yaml_mounts_the_project_and_holds_no_credentials():
    config = cluster_config()
    mounts = config["file_mounts"]
    assert "~/tune-resnet" in mounts
    for local in mounts.values():  # `ray up` runs from the project root
        assert (ROOT / local).exists(), local
    assert (ROOT / mounts["~/tune-resnet"] / "spaces" / "quick.yaml").exists()  # the spaces travel with it
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]|ssh_private_key:|BEGIN [A-Z ]*PRIVATE KEY",
                         text, flags=re.IGNORECASE)
    assert "ssh_private_key" not in config["auth"] and "KeyName" not in json.dumps(config)


# ---------------------------------------------------------------------------------------------
# Planning resources over several nodes (no Ray: the cluster is described)
# ---------------------------------------------------------------------------------------------

def cluster_of(*nodes: tuple[float, float]) -> Cluster:
    """nodes: (CPUs, GPUs) of each node."""
    return Cluster(cpus=sum(c for c, _ in nodes), gpus=sum(g for _, g in nodes), nodes=len(nodes),
                        max_gpus_per_node=max(g for _, g in nodes), embedded=False, node_resources=nodes)


@pytest.mark.parametrize("nodes, trial, flags, at_once", [
    ([(1, 2), (1, 2)], {"cpus": 0.25, "gpus": 0.5}, {"gpus": 4}, 8),   # fractions: two trials per GPU
    ([(1, 2), (1, 2)], {"cpus": 0.25, "gpus": 0.5}, {"gpus": 3}, 6),   # --gpus caps the total in use
    ([(1, 2), (1, 2)], {"cpus": 0.25, "gpus": 1}, {}, 4),              # whole GPUs
    ([(8, 0), (1, 2), (1, 2)], {"cpus": 1, "gpus": 0.5}, {}, 2),        # the CPUs are on the GPU-less head
    ([(16, 0), (8, 1), (8, 1)], {"cpus": 4, "gpus": 1}, {}, 2),         # cluster.yaml's shape
    ([(1, 1)], {"cpus": 0.1, "gpus": 0.1}, {}, 10),                    # 1 / 0.1 is 10 here, as in Ray
])
def test_trials_at_once_count_what_fits_on_each_node(image_folder, tmp_path, nodes, trial, flags, at_once):
    space = write_space(tmp_path, image_folder, trial=trial, budget={"num_samples": 20})
    options = SearchOptions(space=str(space), **flags)
    resources = plan_resources(load_spec(options), options, cluster_of(*nodes))
    assert resources.max_concurrent == at_once


@pytest.mark.parametrize("nodes, gpus, notice", [
    ([(2, 0)], "auto", "no GPU found: trials run on the CPU"),
    ([(2, 0)], 1, "no GPU found: trials run on the CPU"),
    ([(2, 0)], 0, None),                                                  # asked for the CPU: nothing to say
    ([(4, 1)], "auto", "trial.gpus auto: 0.25 GPU per trial (the space's largest training step: "),
])
def test_where_trials_run_is_said_in_one_line(image_folder, tmp_path, nodes, gpus, notice):
    space = write_space(tmp_path, image_folder, trial={"gpus": gpus})
    options = SearchOptions(space=str(space))
    resources = plan_resources(load_spec(options), options, cluster_of(*nodes))
    assert (resources.notice is None) if notice is None else resources.notice.startswith(notice), resources.notice
    assert resources.gpus_per_trial == (0.25 if nodes[0][1] else 0.0)


@pytest.mark.parametrize("nodes, trial, flags, message", [
    ([(4, 2), (4, 2)], {"gpus": 4}, {}, "trial.gpus: 4 GPUs per trial, but no node has more than 2"),
    ([(4, 2), (4, 2)], {"gpus": 0.5}, {"gpus": 5}, "--gpus: 5 asked, but the cluster has 4 now"),
    ([(1, 2), (1, 2)], {"cpus": 2, "gpus": 1}, {}, "trial.cpus: 2 CPU + 1 GPU per trial, but no node has that much"),
    ([(8, 0), (2, 1)], {"cpus": 4, "gpus": 1}, {}, "(nodes: 8 CPU + 0 GPU, 2 CPU + 1 GPU)"),
])
def test_a_trial_no_node_can_hold_is_refused(image_folder, tmp_path, nodes, trial, flags, message):
    space = write_space(tmp_path, image_folder, trial=trial)
    options = SearchOptions(space=str(space), **flags)
    with pytest.raises(SearchError) as error:
        plan_resources(load_spec(options), options, cluster_of(*nodes))
    assert message in error.value.message


# ---------------------------------------------------------------------------------------------
# Storage and inputs every node must see (Ray's answers faked: one machine sees one disk)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def two_nodes_one_blind(monkeypatch):
    """A 2-node cluster where node 10.0.0.7 sees none of the paths in `hidden`; records what was asked."""
    asked: list[tuple[str, bool]] = []
    hidden: list[str] = []

    def nodes_missing(path: str, **_) -> list[str]:
        asked.append((path, os.path.exists(path)))
        return ["10.0.0.7 (6f3a9c21)"] if any(path.startswith(h) for h in hidden) else []

    monkeypatch.setattr(_ray, "start", lambda **_: cluster_of((4, 1), (4, 1)))
    monkeypatch.setattr(_ray, "nodes_missing", nodes_missing)
    return asked, hidden


def test_storage_a_node_cannot_see_is_refused_in_one_line(two_nodes_one_blind, image_folder, tmp_path):
    asked, hidden = two_nodes_one_blind
    storage = tmp_path / "runs"
    hidden.append(str(storage))
    space = write_space(tmp_path, image_folder)
    code, output = search("--space", str(space), "--storage", str(storage), "--address", "auto")
    assert code == 2, output
    assert output.strip().splitlines()[-1] == (
        f"Error: --storage: {storage} is not visible from node 10.0.0.7 (6f3a9c21); on a "
        "multi-node cluster use a shared folder (NFS) or a URI such as s3://bucket/runs")
    assert output.count("Error") == 1 and "Traceback" not in output
    marker, existed = asked[0]
    assert Path(marker).parent == storage and existed  # the driver wrote a marker for the nodes to look for
    assert not Path(marker).exists() and list(storage.iterdir()) == []  # and took it away


def test_data_a_node_cannot_see_is_refused(two_nodes_one_blind, image_folder, tmp_path):
    asked, hidden = two_nodes_one_blind
    hidden.append(str(image_folder))
    space = write_space(tmp_path, image_folder)
    code, output = search("--space", str(space), "--storage", str(tmp_path / "runs"), "--address", "auto")
    assert code == 2, output
    error = output.strip().splitlines()[-1]
    assert error.startswith(f"Error: data.path: {image_folder} is not visible from node 10.0.0.7")
    assert "file_mounts in cluster.yaml" in error and output.count("Error") == 1


def test_uri_storage_is_not_probed_on_nodes(two_nodes_one_blind, image_folder, tmp_path):
    from tuner.search import check_cluster_paths

    asked, hidden = two_nodes_one_blind
    base = TrainConfig(data_path=None, pretrained="torchvision")
    check_cluster_paths("s3://bucket/runs", base, cluster_of((4, 1), (4, 1)))
    assert asked == []


def test_remote_paths_from_ray_get_their_scheme_back():
    s3 = type("S3FileSystem", (), {"type_name": "s3"})()
    gcs = type("GcsFileSystem", (), {"type_name": "gcs"})()
    local = type("LocalFileSystem", (), {"type_name": "local"})()
    assert _ray._as_uri(s3, "bucket/runs/x/trial_1") == "s3://bucket/runs/x/trial_1"
    assert _ray._as_uri(gcs, "bucket/runs/x") == "gs://bucket/runs/x"
    assert _ray._as_uri(local, "/tmp/runs/x") == "/tmp/runs/x"


def test_best_folder_goes_up_to_a_uri_and_a_warm_start_checkpoint_comes_down(tmp_path):
    from tuner import results, storage
    from tuner.search import _with_local_checkpoint

    best = tmp_path / "local" / "best"
    (best / "exports").mkdir(parents=True)
    (best / "config.json").write_text("{}")
    (best / "exports" / "model.ts").write_bytes(b"ts")
    storage.upload(str(best), f"file://{tmp_path}/store/run/best")
    uploaded = sorted(str(p.relative_to(tmp_path / "store")) for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert uploaded == ["run/best/config.json", "run/best/exports/model.ts"]

    summary = results.SearchSummary(metric="val_acc", mode="max", best_trial_id="a", best_value=0.5, best_val_acc=0.5,
                                    best_epoch=1, best_config={"lr": 0.1}, trials=2, by_status={}, epochs_spent=2,
                                    epochs_without_early_stopping=2)
    found = results.SearchResults(
        trials=[{"trial_id": "a", "checkpoint": f"file://{tmp_path}/store/run/best", "best_val_acc": 0.5},
                {"trial_id": "b", "checkpoint": "s3://not/touched", "best_val_acc": 0.9}],
        history=[], summary=summary)
    local = _with_local_checkpoint(found, str(tmp_path / "warm"))
    assert local.trials[0]["checkpoint"] == str(tmp_path / "warm") and (tmp_path / "warm" / "config.json").is_file()
    assert local.trials[1] == found.trials[1] and found.trials[0]["checkpoint"].startswith("file://")
    # after a confirmation: the refit configuration's best run that kept its checkpoint
    confirmed = results.SearchResults(
        trials=[{"trial_id": "a", "checkpoint": None, "best_val_acc": 0.9},  # pruned by the search
                {"trial_id": "c1", "confirm_of": "a", "checkpoint": "s3://not/touched", "best_val_acc": 0.6},
                {"trial_id": "c2", "confirm_of": "a", "checkpoint": f"file://{tmp_path}/store/run/best",
                 "best_val_acc": 0.7},
                {"trial_id": "c3", "confirm_of": "b", "checkpoint": "s3://not/touched/either", "best_val_acc": 0.8}],
        history=[], summary=dataclasses.replace(summary, best_trial_id="b", best_val_acc=0.9, selected_trial_id="a",
                                                selected_config={"lr": 0.2}, selected_value=0.65, confirmation={"runs": 4}))
    local = _with_local_checkpoint(confirmed, str(tmp_path / "warm2"))
    assert [t["checkpoint"] for t in local.trials] == [None, "s3://not/touched", str(tmp_path / "warm2"),
                                                       "s3://not/touched/either"]


# ---------------------------------------------------------------------------------------------
# A real two-node Ray cluster on this machine
# ---------------------------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


CLUSTER_TOKEN = secrets.token_hex(32)  # Ray's token auth, on: the nodes listen on every interface


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never the session's Ray
    return with_tests_on_path({**env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                               "RAY_AUTH_TOKEN": CLUSTER_TOKEN, **extra})  # trials import trial_hooks


def start_node(temp_dir: Path, log: Path, env: dict, *args: str, cpus: int = NODE_CPUS,
               gpus: int = NODE_GPUS) -> subprocess.Popen:
    """`ray start --block` in its own process group, with every port of its own; the process
    carries its node manager's port (`manager_port`), which Ray's node table names."""
    ports = dict(zip(("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                      "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"),
                     free_ports(6)))
    command = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
               "--num-cpus", str(cpus), "--num-gpus", str(gpus),
               "--object-store-memory", str(100 * 1024**2), "--temp-dir", str(temp_dir),
               *[str(x) for pair in ports.items() for x in pair], *args]
    with log.open("w") as out:
        node = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    node.manager_port = ports["--node-manager-port"]
    return node


def wait_for_start(node: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Until `ray start` says its node runs (it then blocks); its log's end if it exits first."""
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in log.read_text():
        assert node.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no node after {timeout_s:.0f} s: " + log.read_text()[-3000:]
        time.sleep(0.2)


def stop(nodes: list[subprocess.Popen], temp_dir: Path) -> None:
    """SIGKILL to each node's process group (a SIGTERM drains for 30 s: nothing here needs it), then
    to whatever of ours is left, found by its temp dir: only this fixture's processes name it."""
    gone = contextlib.suppress(ProcessLookupError, PermissionError)
    for node in nodes:
        with gone:
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()
    for pid in processes_using(temp_dir):
        with gone:
            os.kill(pid, signal.SIGKILL)


def processes_using(temp_dir: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if str(temp_dir).encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


@contextlib.contextmanager
def ray_nodes(prefix: str, workers: int = 1, head_cpus: int = NODE_CPUS, head_gpus: int = NODE_GPUS):
    """A head and `workers` workers started with `ray start` on this machine; yields its address,
    folder, node processes (head first), environment and facts about it; stops every node and
    removes the folder after."""
    temp_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = child_env()
    port, dashboard_port = free_ports(2)
    nodes = [start_node(temp_dir, temp_dir / "head.log", env, "--head", "--port", str(port),
                        "--include-dashboard", "false", "--dashboard-port", str(dashboard_port),
                        cpus=head_cpus, gpus=head_gpus)]
    try:
        wait_for_start(nodes[0], temp_dir / "head.log", 120)
        for i in range(workers):  # one at a time: two nodes registering at once time out on 2 busy cores
            log = temp_dir / f"worker-{i}.log"
            nodes.append(start_node(temp_dir, log, env, "--address", f"127.0.0.1:{port}"))
            wait_for_start(nodes[-1], log, 120)
        facts = probe(f"127.0.0.1:{port}", temp_dir, len(nodes))
        yield {"address": f"127.0.0.1:{port}", "temp_dir": temp_dir, "nodes": nodes, "env": env, **facts}
    finally:
        stop(nodes, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def local_cluster():
    """Head + worker, 1 CPU and 2 GPUs each; yields its address and facts about it."""
    with ray_nodes("trc-") as cluster:
        (cluster["temp_dir"] / "barrier").mkdir()  # for trial_hooks.Barrier
        yield cluster


PROBE = """
import dataclasses, json, sys, time
import ray
from tuner import _ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
deadline = time.monotonic() + 90
while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[3]) and time.monotonic() < deadline:
    time.sleep(0.2)
print(json.dumps({"node_ids": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
                  "head_id": next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"]),
                  "node_ports": {n["NodeID"]: n["NodeManagerPort"] for n in ray.nodes() if n["Alive"]},
                  "cluster": dataclasses.asdict(_ray._describe(embedded=False)),
                  "missing_there": _ray.nodes_missing(sys.argv[2]),
                  "missing_absent": _ray.nodes_missing(sys.argv[2] + ".absent")}))
"""


def probe(address: str, temp_dir: Path, nodes: int) -> dict:
    """Waits until every node is alive, then asks each node, by a task pinned to it, about a file."""
    there = temp_dir / "there"
    there.write_text("x")
    done = subprocess.run([sys.executable, "-c", PROBE, address, str(there), str(nodes)], env=child_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def driver(*args: str) -> tuple[int, str]:
    """`tune-resnet search` as its own process, joining the cluster like on a real one."""
    done = subprocess.run([sys.executable, "-m", "tuner.cli", "search", *args], env=child_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_both_nodes_answer_for_themselves(local_cluster):
    assert len(local_cluster["node_ids"]) == 2
    cluster = local_cluster["cluster"]
    assert (cluster["nodes"], cluster["cpus"], cluster["gpus"], cluster["max_gpus_per_node"]) == (2, 2, 4, 2)
    assert local_cluster["missing_there"] == []  # each node's pinned task ran there and saw the file
    missing = local_cluster["missing_absent"]  # 'ip (node id)', one per node
    assert sorted(m.split(" (")[1].rstrip(")") for m in missing) == sorted(n[:8] for n in local_cluster["node_ids"])


def peak(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant."""
    return max(sum(start <= t < end for start, end in intervals) for t, _ in intervals)


def assert_only_the_best_keeps_checkpoints(trials: list[dict], summary: dict, run_dir: Path) -> None:
    """Checkpoints land in storage; the search then prunes those of finished trials below the
    best (trials tied at the best all keep theirs, the summary's best among them); trials.parquet
    names only the checkpoints still there."""
    kept = {t["trial_id"] for t in trials if t["checkpoint"] is not None}
    for trial in trials:
        if trial["checkpoint"] is not None:
            checkpoint = Path(trial["checkpoint"])
            assert checkpoint.is_dir() and checkpoint.parent == Path(trial["path"])
            assert checkpoint.parent.parent == run_dir
    tied = {t["trial_id"] for t in trials if t["best_val_acc"] == summary["best_val_acc"]}
    assert kept == tied and summary["best_trial_id"] in kept


def test_search_on_two_nodes_runs_8_trials_at_once_on_half_gpus(local_cluster, image_folder, tmp_path, data_cache):
    barrier = {"folder": str(local_cluster["temp_dir"] / "barrier"), "count": TRIALS_AT_ONCE}
    space = write_space(tmp_path, image_folder, trial={"cpus": 0.25, "gpus": 0.5, "hook": "trial_hooks:Barrier",
                                                       "hook_args": barrier},  # 8 start before any trains
                        budget={"num_samples": 8, "max_epochs": 2, "grace_period": 2})
    storage = tmp_path / "runs"
    code, output = driver("--space", str(space), "--address", local_cluster["address"], "--storage", str(storage),
                          "--name", "nodes", "--gpus", "4", "--gpus-per-trial", "0.5", "--no-refit")
    assert code == 0, output
    assert f"{TRIALS_AT_ONCE} at a time (0.25 CPU, 0.5 GPU each)" in output
    assert f"storage: {storage} is visible from all 2 nodes" in output
    run_dir = storage / "nodes"
    trials, history, summary = run_tables(run_dir)
    assert len(trials) == 8 and summary["by_status"]["completed"] == 8

    # Trials ran on both nodes, each on one GPU id of its node, 0.5 of it.
    assert {t["node_id"] for t in trials} == set(local_cluster["node_ids"])
    for trial in trials:
        assert trial["gpu_ids"] in {"0", "1"} and trial["cuda_visible_devices"] == trial["gpu_ids"]
    intervals = [(t["started_at"], t["ended_at"]) for t in trials]
    arrivals = sorted(int(p.name.split("-")[1]) / 1e9 for p in (local_cluster["temp_dir"] / "barrier").iterdir())
    print(f"trial starts spread over {arrivals[-1] - arrivals[0]:.1f} s; "
          f"trials lasted {min(e - s for s, e in intervals):.1f}-{max(e - s for s, e in intervals):.1f} s")
    assert peak(intervals) == TRIALS_AT_ONCE  # all 8 trained at the same time
    by_gpu: dict[tuple, list] = {}
    for trial in trials:
        by_gpu.setdefault((trial["node_id"], trial["gpu_ids"]), []).append((trial["started_at"], trial["ended_at"]))
    assert len(by_gpu) == 4
    assert all(peak(spans) * 0.5 <= 1.0 for spans in by_gpu.values())  # no GPU ever carried more than 1.0

    # Every result and checkpoint reached the storage.
    for name in ("trials.parquet", "history.parquet", "summary.json", "search.json"):
        assert (run_dir / name).is_file(), name
    folders = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("trial"))
    assert len(folders) == 8
    for folder in folders:  # each epoch's report came with a checkpoint that Ray had put in storage
        rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        assert [row["checkpoint_dir_name"] for row in rows] == ["checkpoint_000000", "checkpoint_000001"]
    assert_only_the_best_keeps_checkpoints(trials, summary, run_dir)

    # The data was decoded once, by the driver; no trial rebuilt the cache.
    caches = list(data_cache.glob("imagefolder-*/meta.json"))
    assert len(caches) == 1 and caches[0].stat().st_mtime < min(start for start, _ in intervals)


def test_search_with_a_uri_storage_uploads_tables_checkpoints_and_model(local_cluster, image_folder, tmp_path):
    space = write_space(tmp_path, image_folder, trial={"cpus": 0.5, "gpus": 0.5},
                        budget={"num_samples": 2, "max_epochs": 1, "grace_period": 1}, refit={"epochs": 1})
    store = tmp_path / "store"
    code, output = driver("--space", str(space), "--address", local_cluster["address"],
                          "--storage", f"file://{store}", "--name", "uri")
    assert code == 0, output
    assert f"storage: file://{store} is visible from all 2 nodes" in output
    run_dir = store / "uri"
    assert f"uploaded best/ to file://{run_dir}/best" in output
    trials, _, summary = run_tables(run_dir)
    assert len(trials) == 2 and (run_dir / "search.json").is_file()
    for trial in trials:
        assert Path(trial["path"]).parent == run_dir and (Path(trial["path"]) / "result.json").is_file()
    assert_only_the_best_keeps_checkpoints(trials, summary, run_dir)
    best = run_dir / "best"
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["search_val_acc"] == pytest.approx(summary["best_val_acc"])
    for name in ("weights.safetensors", "config.json", "labels.txt", "model.pt2"):
        assert (best / name).is_file(), name


# ---------------------------------------------------------------------------------------------
# A node lost mid-search: its trials go on, from their checkpoints, on the node left
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def cluster_to_break():
    """A head with no CPU or GPU (it holds Ray's control plane and the driver, no trial) and two
    workers of their own, 1 CPU each: the test kills one worker."""
    with ray_nodes("trk-", workers=2, head_cpus=0, head_gpus=0) as cluster:
        yield cluster


def index_events(run_dir: Path) -> list[dict]:
    """The search's status index (tuner/status.py), current: written by the driver as trials go."""
    try:
        lines = (run_dir / "status-index.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


def came_back(run_dir: Path, first_nodes: list[str]) -> set[str]:
    """The nodes other than those the cluster began with on which a trial reported an epoch."""
    return {e["row"].get("node_id") for e in index_events(run_dir) if "row" in e} - {None, *first_nodes}


def wait_for(condition, timeout_s: float, driver: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert driver.poll() is None, driver.stdout.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def running_epochs(run_dir: Path, max_epochs: int) -> dict[str, tuple[str, int]]:
    """Before any restart: trials running with an epoch reported and epochs left, from the status
    index (tuner.status.read_index): trial id -> (node id, last epoch)."""
    index = status.read_index(run_dir)
    return {trial_id: (entry["rows"][-1].get("node_id"), entry["rows"][-1]["training_iteration"])
            for trial_id, entry in (index[0] if index else {}).items()
            if entry["status"] == "RUNNING" and entry["rows"] and entry["rows"][-1]["training_iteration"] < max_epochs}


def test_a_node_lost_mid_search_its_trials_finish_on_the_other(cluster_to_break, image_folder, tmp_path):
    """Two worker nodes run trials; SIGKILL to one of them (its raylet and trial processes) while
    trials train on both: Ray retries its trial on the other worker from its last checkpoint; the
    search ends with exactly num_samples trials, none run twice, the restart counted. Then the
    node comes back (a new `ray start`) and trials run on it again: a trial starting on the
    surviving worker from then on waits at its start (trial_hooks.PauseAndHold) until one has
    reported from the node that came back."""
    cluster = cluster_to_break
    workers = [n for n in cluster["node_ids"] if n != cluster["head_id"]]
    assert len(workers) == 2
    hold = tmp_path / "hold"
    space = write_space(tmp_path, image_folder, budget={"num_samples": 6, "max_epochs": 4, "grace_period": 4},
                        trial={"cpus": 1, "gpus": 0, "hook": "trial_hooks:PauseAndHold",
                               "hook_args": {"sleep_s": 1.0, "hold": str(hold)}})
    run_dir = tmp_path / "runs" / "lost"
    command = [sys.executable, "-m", "tuner.cli", "search", "--space", str(space), "--address", cluster["address"],
               "--storage", str(tmp_path / "runs"), "--name", "lost", "--no-refit"]
    driver = subprocess.Popen(command, env=cluster["env"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        on_both = lambda: {node for node, _ in running_epochs(run_dir, 4).values()} >= set(workers)  # noqa: E731
        wait_for(on_both, 240, driver)
        lost, (victim, _) = min(running_epochs(run_dir, 4).items(), key=lambda item: item[1][1])  # most epochs left
        survivor = next(n for n in workers if n != victim)
        node = next(p for p in cluster["nodes"] if p.manager_port == cluster["node_ports"][victim])
        os.killpg(node.pid, signal.SIGKILL)  # `ray start --block` and what it started
        node.wait()
        restarted = lambda: sum(e.get("trial_id") == lost and "started" in e for e in index_events(run_dir)) >= 2  # noqa: E731
        wait_for(restarted, 180, driver)
        (tmp_path / "hold.new").write_text(survivor)
        os.replace(tmp_path / "hold.new", hold)  # whole when the hook reads it
        cluster["nodes"].append(start_node(cluster["temp_dir"], cluster["temp_dir"] / "worker-back.log",
                                           cluster["env"], "--address", cluster["address"]))  # the node comes back
        wait_for(lambda: came_back(run_dir, cluster["node_ids"]), 180, driver)
        hold.unlink()
        output = driver.communicate(timeout=400)[0]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output
    trials, history, summary = run_tables(run_dir)
    assert len(trials) == 6 and len({t["trial_id"] for t in trials}) == 6  # exactly num_samples
    assert summary["by_status"]["completed"] == 6, [(t["trial_id"], t["status"], t["epochs"], t["retries"], t["error"])
                                                    for t in trials]
    by_id = {t["trial_id"]: t for t in trials}
    assert by_id[lost]["retries"] >= 1 and summary["retries"] == sum(t["retries"] for t in trials)
    assert by_id[lost]["node_id"] != victim  # it ended elsewhere
    assert cluster["head_id"] not in {t["node_id"] for t in trials}  # the head has no CPU: trials on workers only
    assert "restarts from a checkpoint" in output
    for trial_id in by_id:  # no epoch trained twice: the retry went on from its checkpoint
        epochs = [h["training_iteration"] for h in history if h["trial_id"] == trial_id]
        assert epochs == [1, 2, 3, 4], (trial_id, epochs)
    assert len(came_back(run_dir, cluster["node_ids"])) == 1  # the node started again: a new node id
    assert any(by_id[t]["node_id"] in came_back(run_dir, cluster["node_ids"]) for t in by_id)


def test_a_restarted_trials_history_gets_the_epochs_rays_copy_lacks():
    """Ray's copy of result.json, restored into a trial restarted on another node, can lag: it then
    lacks the last epochs, or, when the trial restarted from a checkpoint newer than the copy, an
    epoch between (seen on a lost node: 1, 2, 4). The status index's rows fill them; the driver's
    last result is the last row."""
    row = lambda epoch, source: {"training_iteration": epoch, "val_acc": epoch / 10, "from": source}  # noqa: E731
    index = [row(epoch, "index") for epoch in (1, 2, 3, 4)]
    whole = [row(epoch, "ray") for epoch in (1, 2, 3, 4)]
    assert _ray._completed(whole, whole[-1], index) == whole  # nothing lacking: Ray's own rows
    short = _ray._completed(whole[:2], row(4, "driver"), index)
    assert [(r["training_iteration"], r["from"]) for r in short] == [(1, "ray"), (2, "ray"), (3, "index"), (4, "driver")]
    gap = _ray._completed([whole[0], whole[1], whole[3]], whole[3], index)
    assert [(r["training_iteration"], r["from"]) for r in gap] == [(1, "ray"), (2, "ray"), (3, "index"), (4, "ray")]
