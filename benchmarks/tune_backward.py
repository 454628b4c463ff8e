"""Backward kernel sweep: GPU time of each dK/dV and dQ kernel configuration, per problem.

Run on a GPU from the repo root::

    python benchmarks/tune_backward.py                      # every problem and configuration
    python benchmarks/tune_backward.py --only 3d-w18x24x24-s16x8x8
    python benchmarks/tune_backward.py --fused-vs-separate   # the block-sparse rows

For each problem (fp16, d=128, the forward benchmark's problems) the forward runs once with
its default configuration; then :func:`gna.triton_backward.launch_backward` runs with one
kernel's configuration varied and the other at its default, under the PyTorch profiler, which
gives each kernel's own GPU time (median of the repeats). Compiling ~60 kernel variants
serially takes minutes, so the script first compiles them in parallel worker processes (one
per problem) into Triton's on-disk cache, then times everything from a single process.
Results are appended to ``benchmarks/results/backward_sweep.jsonl``; the defaults in
``gna/triton_backward.py`` cite them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from bench_forward import PROBLEMS  # noqa: E402

from gna.args import normalize  # noqa: E402
from gna.backends import Options  # noqa: E402
from gna.triton_backend import default_config, launch_forward, shared_limit  # noqa: E402
from gna.triton_backward import KernelConfig, backward_configs, launch_backward  # noqa: E402

# Tile shape of each volume, per number of dimensions.
TILES = {
    1: {16: (16,), 32: (32,), 64: (64,), 128: (128,)},
    2: {16: (2, 8), 32: (4, 8), 64: (8, 8), 128: (8, 16)},
    3: {16: (1, 2, 8), 32: (1, 4, 8), 64: (1, 8, 8), 128: (2, 8, 8)},
}
# name: (Q tile volume, KV tile volume, kv_major, use_tma, num_warps, num_stages[,
# gluon_stages]). "gluon-*": the persistent Gluon kernel of gna.kernels.backward_gluon, on
# these tiles with a ring of gluon_stages slots, where the problem qualifies (perfectly
# block-sparse).
DKDV = {
    "q128-kv64": (128, 64, False, False, 8, 2),
    "q128-kv64-tma": (128, 64, False, True, 8, 2),
    "kvmajor-q64-kv128-tma": (64, 128, True, True, 8, 2),
    "kvmajor-q64-kv128-tma-s3": (64, 128, True, True, 8, 3),
    "kvmajor-q32-kv128-tma-s3": (32, 128, True, True, 8, 3),
    "kvmajor-q32-kv128-tma-s2": (32, 128, True, True, 8, 2),
    "kvmajor-q32-kv128-tma-s4": (32, 128, True, True, 8, 4),
    "kvmajor-q16-kv128-tma-s4": (16, 128, True, True, 8, 4),
    "q64-kv128-tma": (64, 128, False, True, 8, 2),
    "kvmajor-q64-kv64-tma-w4": (64, 64, True, True, 4, 3),
    "kvmajor-q128-kv64-tma": (128, 64, True, True, 8, 2),
    "gluon-kvmajor-q64-kv128-s4": (64, 128, True, True, 8, 3, 4),
    "gluon-kvmajor-q64-kv128-s3": (64, 128, True, True, 8, 3, 3),
}
DQ = {
    "q128-kv64": (128, 64, False, False, 8, 2),
    "q128-kv64-tma": (128, 64, False, True, 8, 2),
    "q128-kv64-tma-s3": (128, 64, False, True, 8, 3),
    "q64-kv64-tma-w4": (64, 64, False, True, 4, 3),
    "q128-kv64-s3": (128, 64, False, False, 8, 3),
    "gluon-q128-kv64-s4": (128, 64, False, False, 8, 3, 4),
    "gluon-q128-kv128-s2": (128, 128, False, False, 8, 3, 2),
}
KERNELS = {"dkdv": ("gna_backward_dkdv_kernel", "gna_backward_dkdv_block_sparse_kernel"),
           "dq": ("gna_backward_dq_kernel", "gna_backward_dq_block_sparse_kernel"),
           "fused": ("gna_backward_fused_block_sparse_kernel", "gna_backward_dq_cast_kernel"),
           "delta": ("gna_backward_delta_kernel",)}


def _config(ndim, spec) -> KernelConfig:
    q_vol, kv_vol, kv_major, tma, warps, stages, *gluon = spec
    return KernelConfig(TILES[ndim][q_vol], TILES[ndim][kv_vol], warps, stages, kv_major, tma,
                        gluon[0] if gluon else 0)


def _setup(problem):
    name, shape, heads, window, stride, _ = problem
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, *shape, heads, 128, device="cuda", dtype=torch.float16,
                                 generator=g) for _ in range(4))
    prob = normalize(None, q, k, v, window, stride)
    config = default_config(prob, Options())
    out, lse = launch_forward(q, k, v, None, None, prob.geometry, prob.scale, config)
    defaults = backward_configs(prob.geometry, config, 2, 128, shared_limit(q.device))
    # The reference for each variant's gradients: the Triton kernels only.
    triton_only = tuple(dataclasses.replace(c, gluon_stages=0) for c in defaults)

    def run(configs, deterministic=True):
        # Deterministic by default: the separate dK/dV and dQ kernels, whose configurations
        # the sweep varies (not the fused kernel, see fused_vs_separate).
        return launch_backward(q, k, v, None, None, out, lse, dout, None, prob.geometry,
                               prob.scale, config, False, configs, deterministic)
    return prob, defaults, run, triton_only


VARIANTS: list[str] | None = None  # --variants: only these names


def _variants(ndim, defaults):
    for name, spec in DKDV.items():
        if VARIANTS is None or name in VARIANTS:
            yield "dkdv", name, (defaults[0], _config(ndim, spec))
    for name, spec in DQ.items():
        if VARIANTS is None or name in VARIANTS:
            yield "dq", name, (_config(ndim, spec), defaults[1])


def _kernel_times(run, configs, repeats=5) -> dict:
    """Median GPU ms of each backward kernel over ``repeats`` calls."""
    run(configs)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    per_call = {key: [] for key in KERNELS}
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(configs)
            torch.cuda.synchronize()
        totals = {key: 0.0 for key in KERNELS}
        for event in prof.events():
            if not str(event.device_type).endswith("CUDA"):
                continue
            for key, kernels in KERNELS.items():
                if any(event.name.startswith(kernel) for kernel in kernels):
                    totals[key] += event.device_time_total / 1e3
        for key in KERNELS:
            per_call[key].append(totals[key])
    return {key: statistics.median(v) for key, v in per_call.items()}


def warm(problems):
    """Compile every variant of ``problems`` (one run each), filling Triton's cache."""
    for problem in problems:
        prob, defaults, run, _ = _setup(problem)
        for kind, name, configs in _variants(prob.geometry.ndim, defaults):
            try:
                run(configs)
                torch.cuda.synchronize()
            except Exception as e:  # reported again (and recorded) by the timing pass
                print(f"warm {problem[0]} {kind} {name}: {e!r}"[:300], flush=True)


def sweep(problems, out_rows, repeats=5):
    for problem in problems:
        prob, defaults, run, triton_only = _setup(problem)
        reference = run(triton_only)
        geo = prob.geometry
        pairs = geo.attended_pairs() * problem[2]
        flops = {"dkdv": 8 * pairs * 128, "dq": 6 * pairs * 128}
        t0 = time.perf_counter()
        host = harness.host_time_us(lambda: run(None))
        for kind, name, configs in _variants(geo.ndim, defaults):
            row = {"problem": problem[0], "kernel": kind, "variant": name,
                   "config": dataclasses.asdict(configs[0] if kind == "dq" else configs[1]),
                   "launch_host_us": host}
            try:
                grads = run(configs)
                row["max_diff_vs_triton"] = max(
                    (a.float() - b.float()).abs().max().item()
                    for a, b in zip(grads[:3], reference[:3]))
                times = _kernel_times(run, configs, repeats)
                row.update({f"{k}_ms": v for k, v in times.items()})
                row["tflops"] = flops[kind] / times[kind] / 1e9
            except Exception as e:
                row["error"] = repr(e)[:300]
            out_rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
        print(f"{problem[0]}: {time.perf_counter() - t0:.0f} s", flush=True)
        del run
        torch.cuda.empty_cache()


def fused_vs_separate(problems, out_rows, repeats=5, passes=3):
    """The fused Gluon dK/dV/dQ kernel (the default) against the separate Gluon kernels
    (``deterministic=True``), default configurations, passes alternating: GPU ms of each
    kernel and their sum (delta and cast included), dK/dV compared bit for bit, dQ's
    difference."""
    for problem in problems:
        prob, defaults, run, _ = _setup(problem)
        row, grads = {"problem": problem[0], "experiment": "fused vs separate"}, {}
        for _ in range(passes):
            for tag, deterministic in (("separate", True), ("fused", False)):
                grads[tag] = run(None, deterministic)
                times = _kernel_times(lambda c, d=deterministic: run(c, d), None, repeats)
                times["total"] = sum(times.values())
                row.setdefault(tag, []).append({k: round(v, 4) for k, v in times.items()})
        a, b = grads["fused"], grads["separate"]
        row["dk_dv_equal"] = torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        row["dq_rel_diff"] = ((a[0].float() - b[0].float()).norm() / b[0].float().norm()).item()
        out_rows.append(row)
        print(json.dumps(row), flush=True)
        del run
        torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="*", help="problem names")
    p.add_argument("--variants", nargs="*", help="configuration names (default: all)")
    p.add_argument("--warm-only", action="store_true", help="compile only (worker mode)")
    p.add_argument("--no-parallel-warm", action="store_true")
    p.add_argument("--repeats", type=int, default=5, help="calls per variant (median)")
    p.add_argument("--fused-vs-separate", action="store_true",
                   help="time the fused Gluon backward against the separate kernels instead")
    args = p.parse_args(argv)
    global VARIANTS
    VARIANTS = args.variants
    problems = [pr for pr in PROBLEMS if pr[0] != "3d-dense" and pr[0] != "1d-w2048-s256"
                and (not args.only or pr[0] in args.only)]
    if args.warm_only:
        warm(problems)
        return
    if args.fused_vs_separate:
        rows = []
        try:
            fused_vs_separate([pr for pr in problems if "-s" in pr[0]], rows, args.repeats)
        finally:
            print("results:", harness.append("backward_sweep", rows))
        return
    if not args.no_parallel_warm:
        t0 = time.perf_counter()
        extra = ["--variants", *args.variants] if args.variants else []
        workers = [subprocess.Popen([sys.executable, __file__, "--warm-only", "--only", pr[0],
                                     *extra], env=os.environ.copy()) for pr in problems]
        for w in workers:
            w.wait()
        print(f"parallel compile: {time.perf_counter() - t0:.0f} s", flush=True)
    print(harness.environment(), flush=True)
    rows = []
    try:
        sweep(problems, rows, args.repeats)
    finally:
        print("results:", harness.append("backward_sweep", rows))


if __name__ == "__main__":
    main()
