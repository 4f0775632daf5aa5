"""torchvision's ImageNet weights: downloaded on first use into torch's hub cache, hash-checked,
once per node; a machine that cannot get them fails in one line before any trial.

No test reaches the internet. A local HTTP server plays download.pytorch.org, reached through the
mirror variable (TUNE_RESNET_WEIGHTS_URL) as a firewalled cluster would. torchvision's own file
names carry the sha256 prefix of torchvision's real files, which no generated file can match, so
`finetune.torchvision_url` (the one place the product reads torchvision's URL from) is pointed at
a file of the same layout named after its own hash: torch's own hash check then runs for real.
"""

from __future__ import annotations

import hashlib
import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

from test_search import write_space
from trainables import finetune
from trainables.config import TrainConfig
from trainables.finetune import PretrainedError, build_model, check_model, weights_source
from tuner.cli import main

MIRROR = finetune.WEIGHTS_MIRROR_ENV


@pytest.fixture(scope="module")
def served_weights() -> tuple[str, bytes, dict[str, torch.Tensor]]:
    """(file name with its sha256 prefix, file bytes, state dict): the stem and first stage of a
    ResNet-18 in torchvision's layout, 0.6 MB instead of 45. The loader takes any subset of the
    keys (strict=False), and conv1.weight tells it the stem's shape."""
    torch.manual_seed(5)
    state = {key: value for key, value in torchvision.models.resnet18().state_dict().items()
             if key.startswith(("conv1.", "bn1.", "layer1."))}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    return f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth", data, state


class WeightsServer:
    """download.pytorch.org/models/ on 127.0.0.1: serves `files` by name and counts the requests."""

    def __init__(self, files: dict[str, bytes], delay_s: float = 0.0) -> None:
        self.files, self.hits = files, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append(self.path)
                time.sleep(delay_s)  # long enough for processes that start together to overlap
                body = server.files.get(self.path.rsplit("/", 1)[-1])
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/models/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch home; local addresses never go through a proxy."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return home


@pytest.fixture
def serve(torch_home: Path, served_weights, monkeypatch: pytest.MonkeyPatch):
    """serve(files=None, delay_s=0) -> a running WeightsServer that the mirror variable points at;
    torchvision's URL for resnet18 names the generated file."""
    name, data, _ = served_weights
    monkeypatch.setattr(finetune, "torchvision_url", lambda arch: f"https://download.pytorch.org/models/{name}")
    servers = []

    def start(files: dict[str, bytes] | None = None, delay_s: float = 0.0) -> WeightsServer:
        servers.append(WeightsServer({name: data} if files is None else files, delay_s))
        monkeypatch.setenv(MIRROR, servers[-1].url)
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def offline(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The mirror is a port nothing listens on: every download is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/models/"
    monkeypatch.setenv(MIRROR, url)
    return url


def _resnet18(**changes) -> TrainConfig:
    return TrainConfig(arch="resnet18", depth=None, width=None, input_size=16, pretrained="torchvision", **changes)


# ---------------------------------------------------------------------------------------------
# Where the weights come from and where they go
# ---------------------------------------------------------------------------------------------

def test_the_url_is_torchvisions_and_a_mirror_keeps_the_file_name(torch_home: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIRROR, raising=False)
    url, path = weights_source("resnet18")
    assert url == torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert path == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    monkeypatch.setenv(MIRROR, "http://mirror.internal/torch/models")  # with or without the trailing /
    assert weights_source("resnet50") == ("http://mirror.internal/torch/models/resnet50-0676ba61.pth",
                                          torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth")


# ---------------------------------------------------------------------------------------------
# Download once, then the cache
# ---------------------------------------------------------------------------------------------

def test_weights_download_once_into_the_hub_cache_and_load(serve, served_weights, torch_home: Path) -> None:
    name, data, state = served_weights
    server = serve()
    check_model(_resnet18(stem="imagenet"))  # the pre-trial check downloads
    path = torch_home / "hub" / "checkpoints" / name
    assert path.read_bytes() == data and server.hits == [f"/models/{name}"]
    model = build_model(_resnet18(stem="imagenet"), num_classes=3)  # a trial reads the cached file
    assert server.hits == [f"/models/{name}"]
    ours = model.state_dict()
    for key, value in state.items():
        assert torch.equal(ours[key], value), key
    assert model.fc.out_features == 3


def test_processes_that_start_together_download_once(serve, served_weights) -> None:
    """Trials starting together on one node wait on the file lock for the one download."""
    server = serve(delay_s=0.3)
    errors = []

    def fetch() -> None:
        try:
            finetune.fetch_torchvision_weights("resnet18")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(server.hits) == 1


def test_weights_already_in_the_cache_need_no_network(offline: str, torch_home: Path) -> None:
    _, path = weights_source("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    assert build_model(_resnet18(), num_classes=3).fc.out_features == 3


# ---------------------------------------------------------------------------------------------
# What cannot be had: one line, nothing cached
# ---------------------------------------------------------------------------------------------

def test_a_corrupt_download_is_refused_by_the_hash_check_and_not_cached(serve, served_weights,
                                                                        torch_home: Path) -> None:
    name, data, _ = served_weights
    serve({name: data[:-1] + bytes([data[-1] ^ 1])})  # one bit flipped
    with pytest.raises(PretrainedError) as error:
        check_model(_resnet18())
    message = str(error.value)
    assert "\n" not in message and "corrupt" in message and name.split("-")[1][:8] in message, message
    assert str(torch_home / "hub" / "checkpoints" / name) in message
    left = [p.name for p in (torch_home / "hub" / "checkpoints").iterdir() if p.suffix != ".lock"]
    assert left == []  # neither the file nor its .partial: the next try downloads again
    serve()  # the mirror fixed
    assert finetune.fetch_torchvision_weights("resnet18").read_bytes() == data


def test_a_file_the_mirror_does_not_have_is_one_line(serve, served_weights) -> None:
    name, _, _ = served_weights
    server = serve(files={})
    with pytest.raises(PretrainedError, match="HTTP Error 404") as error:
        check_model(_resnet18())
    assert "\n" not in str(error.value) and f"{server.url}{name}" in str(error.value)


@pytest.mark.parametrize("pretrained", ["torchvision", "torchvision:resnet18"])
def test_offline_is_one_line_naming_the_url_and_the_cache_path(offline: str, torch_home: Path,
                                                               pretrained: str) -> None:
    with pytest.raises(PretrainedError) as error:
        check_model(_resnet18().replace(pretrained=pretrained))
    message = str(error.value)
    assert "\n" not in message and "Connection refused" in message, message
    assert f"{offline}resnet18-f37072fd.pth" in message
    assert f"to {torch_home / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth'}" in message


# ---------------------------------------------------------------------------------------------
# The CLI: data prepare --weights, and a search that cannot get them
# ---------------------------------------------------------------------------------------------

def test_data_prepare_fetches_weights_ahead_of_time(serve, served_weights, torch_home: Path) -> None:
    name, data, _ = served_weights
    server = serve()
    for _ in range(2):  # the second finds them cached
        result = CliRunner().invoke(main, ["data", "prepare", "--weights", "resnet18"])
        assert result.exit_code == 0, result.output
        path = torch_home / "hub" / "checkpoints" / name
        assert f"weights: resnet18 -> {path}" in result.output and "cache:" not in result.output  # no dataset
    assert path.read_bytes() == data and len(server.hits) == 1


def test_data_prepare_refuses_an_arch_without_imagenet_weights(torch_home: Path) -> None:
    result = CliRunner().invoke(main, ["data", "prepare", "--weights", "resnet20"])
    assert result.exit_code == 2 and "resnet18" in result.output and len(result.output.strip().splitlines()) == 1


def test_data_prepare_offline_is_one_line(offline: str) -> None:
    result = CliRunner().invoke(main, ["data", "prepare", "--weights", "resnet18"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("Error: pretrained: cannot download ImageNet weights for resnet18"), result.output


@pytest.mark.parametrize("dry_run", [True, False])
def test_offline_search_from_torchvision_fails_before_any_trial(offline: str, dry_run: bool, tmp_path: Path,
                                                                image_folder: Path) -> None:
    space = write_space(tmp_path, image_folder, model={"pretrained": "torchvision"},
                        fixed={"arch": "resnet18", "depth": None, "width": None})
    result = CliRunner().invoke(main, ["search", "--space", str(space), "--storage", str(tmp_path / "runs"),
                                       *(["--dry-run"] if dry_run else [])])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and f"{offline}resnet18-f37072fd.pth" in lines[0], result.output
    assert not (tmp_path / "runs").exists()
