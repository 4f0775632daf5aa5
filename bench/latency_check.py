"""The exported model's latency measured again, in this process, against the figure the search
recorded for its configuration (issue 21's bar: within 20%).

    python bench/latency_check.py runs/latency-front [--sessions 5]

Reads RUN_DIR/best/metrics.json (search_latency_ms, latency_threads: written by the refit of a
search that measured latency) and times RUN_DIR/best/model.onnx with tuner/latency.py, as the
trial did: ONNX Runtime on the CPU, the trial's thread count, batch 1 and 64, medians of repeated
runs. Each session is a fresh InferenceSession; the figure is the median over sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

from tuner.latency import measure_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sessions", type=int, default=5, help="fresh ONNX Runtime sessions, each timed")
    args = parser.parse_args()
    best = args.run_dir / "best"
    metrics = json.loads((best / "metrics.json").read_text())
    config = json.loads((best / "config.json").read_text())
    threads, size = int(metrics.get("latency_threads") or 1), config["config"]["input_size"]
    runs = [measure_onnx(best / "model.onnx", input_size=size, threads=threads) for _ in range(args.sessions)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; pid {os.getpid()}; "
          f"model {config['model']['arch']} depth {config['model']['depth']} width {config['model']['width']}, "
          f"trial {metrics.get('search_trial_id')}, {threads} thread(s)")
    for name in ("latency_ms", "latency_ms_b64"):
        again = statistics.median(r[name] for r in runs)
        recorded = metrics.get(f"search_{name}")
        spread = f"sessions {min(r[name] for r in runs):.4g}-{max(r[name] for r in runs):.4g}"
        if recorded is None:
            print(f"{name}: {again:.4g} ms here ({spread}); the search recorded none")
            continue
        ratio = again / recorded
        verdict = "within" if abs(ratio - 1) <= 0.20 else "OUTSIDE"
        print(f"{name}: search {recorded:.4g} ms, here {again:.4g} ms ({spread}), ratio {ratio:.3f}: "
              f"{verdict} 20%")


if __name__ == "__main__":
    main()
