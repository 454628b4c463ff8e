"""Shared benchmark harness: timing, environment facts, results file.

Every benchmark script times through :func:`time_ms` (CUDA events via
``triton.testing.do_bench``, median and quantiles) and appends rows with :func:`append`, which
stamps each row with the GPU name, driver, torch and triton versions. Plots are made from the
results file by a separate script.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = None
    return env


def time_ms(fn, warmup_ms: float = 100, rep_ms: float = 500) -> dict:
    """Median and 20/80% quantiles of ``fn()`` in milliseconds, timed with CUDA events."""
    from triton.testing import do_bench

    q20, median, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    return {"ms": median, "ms_q20": q20, "ms_q80": q80}


def graph_time_ms(fn, replays: int = 20) -> float:
    """Median GPU time of ``fn`` captured in a CUDA graph: the device work alone."""
    from gna.profiler import capture_graph

    fn()
    graph, _ = capture_graph(fn)
    return time_ms(graph.replay, warmup_ms=25, rep_ms=200)["ms"]


def host_time_us(fn, calls: int = 20) -> float:
    """Host (CPU) time per call of ``fn`` in microseconds, launches queued asynchronously."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def peak_memory(fn) -> int:
    """Peak CUDA memory allocated (bytes) while running ``fn()`` once, above what was live."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``'s signal) into SystemExit, so a script's ``finally`` still
    appends the rows measured so far."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def append(name: str, rows: list[dict], out_dir: str | None = None) -> Path:
    """Append rows (one JSON object a line) to ``results/<name>.jsonl`` and, if given or if
    ``$OUT`` is set, to a copy there."""
    env = environment()
    paths = [RESULTS / f"{name}.jsonl"]
    extra = out_dir or os.environ.get("OUT")
    if extra:
        paths.append(Path(extra) / f"{name}.jsonl")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for row in rows:
                f.write(json.dumps({**env, **row}) + "\n")
    return paths[0]
