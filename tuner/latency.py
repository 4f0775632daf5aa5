"""What a model costs to run as it ships: its ONNX graph (tuner/export.py's writer, the same bytes
as model.onnx) timed by ONNX Runtime on the CPU, and its size.

    measure_model(model, mean=..., std=..., input_size=32, threads=1)  # {"latency_ms": ..., "latency_ms_b64": ...}

A trial measures once, before it trains (the architecture does not change during a trial, and
the latency not with the weights: denormals, which trained weights can hold, are flushed to zero
here as in training); the export measures model.onnx again for the model card;
bench/latency_check.py measures it in a process of its own. All three time the same way:
`WARMUP_RUNS` untimed runs first, then the median of at least `MIN_RUNS` runs the OS did not
preempt, more while the budget lasts (median_ms).
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from search_spaces import LATENCY_METRICS

from .errors import SearchError

BATCHES = {"latency_ms": 1, "latency_ms_b64": 64}  # metric -> images per run; the figure is ms per run
WARMUP_RUNS = {1: 3, 64: 1}  # by batch: first runs allocate and pick kernels, not timed
MIN_RUNS, MAX_RUNS = 7, 100
BUDGET_S = 1.0            # per batch size: runs after MIN_RUNS (unpreempted) stop once this is spent
CLEAN_SHARE = 0.9         # a run whose thread was on a CPU for less of its wall time was preempted
INSTALL = "pip install 'tune-resnet[export]'"


def check_available(names: Sequence[str]) -> None:
    """A latency metric needs onnxruntime: refuse the search now, not in every trial."""
    import importlib.util

    needed = [n for n in names if n in LATENCY_METRICS]
    if needed and importlib.util.find_spec("onnxruntime") is None:
        raise SearchError(f"objective: {needed[0]} is measured with onnxruntime, which is not installed: {INSTALL}")


def session(model: bytes | str | Path, *, threads: int) -> Any:
    """An ONNX Runtime CPU session of `threads` intra-op threads, one op at a time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # warnings about unused initialisers are not the user's concern
    options.add_session_config_entry("session.set_denormal_as_zero", "1")  # as training flushes them
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def median_ms(run: Any, *, warmup: int, budget_s: float = BUDGET_S) -> float:
    """Median wall time of run() in milliseconds after `warmup` runs, over the runs the OS let run
    (thread CPU time at least CLEAN_SHARE of the wall time: with one intra-op thread ONNX Runtime
    computes on the calling thread) when MIN_RUNS of them were, else over all runs. On a busy
    machine a preempted run times the other processes, not the model: measured beside a test suite
    on 2 cores, a batch of 64 took 10.4-17.1 ms by the plain median, 9.2-11.4 ms by this one."""
    for _ in range(warmup):
        run()
    walls: list[float] = []
    clean: list[float] = []
    started = time.perf_counter()
    while len(walls) < MAX_RUNS and (len(clean) < MIN_RUNS or time.perf_counter() - started < budget_s):
        wall, cpu = time.perf_counter(), time.thread_time()
        run()
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        walls.append(wall * 1e3)
        if cpu >= CLEAN_SHARE * wall:
            clean.append(wall * 1e3)
    return statistics.median(clean if len(clean) >= MIN_RUNS else walls)


def measure_onnx(model: bytes | str | Path, *, input_size: int, threads: int,
                 names: Sequence[str] = LATENCY_METRICS) -> dict[str, float]:
    """{metric: median ms per run} for each latency metric named, on RGB 0-255 noise."""
    import numpy as np

    runner = session(model, threads=threads)
    input_name = runner.get_inputs()[0].name
    rng = np.random.default_rng(0)
    out = {}
    for name in (n for n in names if n in BATCHES):
        images = rng.uniform(0, 255, size=(BATCHES[name], 3, input_size, input_size)).astype(np.float32)
        out[name] = median_ms(lambda: runner.run(None, {input_name: images}), warmup=WARMUP_RUNS[BATCHES[name]])
    return out


def measure_model(model: Any, *, mean: Sequence[float], std: Sequence[float], input_size: int, threads: int,
                  names: Sequence[str] = LATENCY_METRICS) -> dict[str, float]:
    """Latency of a torch model (any device, any memory format; left unchanged) as its ONNX export."""
    import torch

    from .export import onnx_bytes

    cpu = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    return measure_onnx(onnx_bytes(cpu, mean=mean, std=std, input_size=input_size), input_size=input_size,
                        threads=threads, names=names)


def trial_metrics(model: Any, *, names: Sequence[str], mean: Sequence[float], std: Sequence[float],
                  input_size: int, threads: int) -> dict[str, float | int]:
    """The measured metrics a trial reports with every epoch: params and macs when named, and both
    latencies (batch 1 and 64) when either is."""
    from trainables.models import count_macs, count_parameters

    out: dict[str, float | int] = {}
    if "params" in names:
        out["params"] = count_parameters(model)
    if "macs" in names:
        out["macs"] = count_macs(copy.deepcopy(model).cpu().eval(), input_size)  # a copy: eval mode, CPU
    if any(n in BATCHES for n in names):
        out.update(measure_model(model, mean=mean, std=std, input_size=input_size, threads=threads))
    return out
