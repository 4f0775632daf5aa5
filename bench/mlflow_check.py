"""Does the model a search logged to MLflow reproduce the refit's test accuracy?

    mlflow server --backend-store-uri sqlite:///mlflow.db --artifacts-destination ./mlartifacts --port 5000 &
    tune-resnet search --space spaces/quick.yaml --data ../shared/datasets/cifar10-jpg.tar.gz \
        --mlflow http://127.0.0.1:5000 --name quick-mlflow
    python bench/mlflow_check.py runs/quick-mlflow --mlflow http://127.0.0.1:5000

Finds the search's refit run in MLflow (tag run_dir), loads its model with mlflow.pyfunc.load_model
(the ONNX flavour: what `mlflow models serve` would serve), feeds it the whole test split decoded
and centre-cropped as the refit's own evaluation saw it, and compares the accuracy with
best/metrics.json's test_acc. Prints one JSON object; --json writes it too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def refit_run(client, run_dir: str):
    """The refit run under the search run whose run_dir tag is run_dir (newest first)."""
    for experiment in client.search_experiments():
        parents = client.search_runs([experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                                     filter_string=f"tags.run_dir = '{run_dir}' and tags.stage = 'search'")
        if parents:
            refits = client.search_runs([experiment.experiment_id], max_results=1,
                                        filter_string=f"tags.parent = '{parents[0].info.run_id}' and tags.stage = 'refit'")
            if refits:
                return refits[0]
    raise SystemExit(f"no refit run of {run_dir} in MLflow")


def test_split(config: dict):
    """The test split as the refit evaluated it: the data cache's images, centre-cropped, float32 0-255."""
    from trainables.data import load_data

    data = load_data(config["dataset"], config["data_path"], input_size=config["input_size"],
                     storage_size=config.get("storage_size"))
    images, size = data.test_images.numpy(), config["input_size"]
    top = (images.shape[-1] - size) // 2
    crop = images[:, :, top:top + size, top:top + size]
    return np.ascontiguousarray(crop, dtype=np.float32), data.test_labels.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--mlflow", required=True, help="the tracking URI the search logged to")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    import mlflow

    run_dir = str(Path(args.run_dir).resolve())
    client = mlflow.MlflowClient(tracking_uri=args.mlflow)
    mlflow.set_tracking_uri(args.mlflow)
    refit = refit_run(client, run_dir)
    started = time.monotonic()
    model = mlflow.pyfunc.load_model(f"runs:/{refit.info.run_id}/model")
    load_s = time.monotonic() - started
    meta = json.loads((Path(run_dir) / "best" / "config.json").read_text())
    images, labels = test_split(meta["config"])
    predicted = np.concatenate([model.predict(images[i:i + 500])["logits"].argmax(axis=1)
                                for i in range(0, len(images), 500)])
    metrics = json.loads((Path(run_dir) / "best" / "metrics.json").read_text())
    result = {"run_dir": run_dir, "refit_run": refit.info.run_id, "images": int(len(labels)),
              "mlflow_model_test_acc": float((predicted == labels).mean()), "refit_test_acc": metrics["test_acc"],
              "logged_test_acc": refit.data.metrics.get("test_acc"), "model_load_s": round(load_s, 2),
              "classes_in_metadata": model.metadata.metadata["classes"] == meta["classes"]}
    result["difference_points"] = round(100 * (result["mlflow_model_test_acc"] - result["refit_test_acc"]), 3)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
