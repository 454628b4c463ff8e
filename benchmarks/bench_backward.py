"""Forward+backward benchmark: gna's Triton kernels vs cuDNN SDPA (dense) and FlexAttention.

Run on a GPU from the repo root::

    python benchmarks/bench_backward.py                # all problems, fp16, with Flex (tiled)
    python benchmarks/bench_backward.py --no-flex --dtypes fp16 bf16

For each problem: backward time (forward+backward minus forward, both medians), forward+backward
time, speedups vs cuDNN, and peak memory of one forward+backward above the inputs; for short
steps also the backward's GPU time alone (both replayed from a CUDA graph), since an eager step
of a small problem can cost the host more than the GPU. Results are appended to
benchmarks/results/backward.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from bench_forward import (  # noqa: E402
    FLEX_TILE, PROBLEMS, _na, cudnn_attention, flex_runner, heads_first)

from gna.args import normalize  # noqa: E402


# Steps shorter than this are also timed replayed from a CUDA graph (``gpu_only_bwd_ms``):
# there the host's time per call (Python, the autograd engine, launches) can exceed the GPU's,
# and the eager times measure the host. The eager times stay the reported speedups.
GPU_ONLY_BELOW_MS = 5.0


def _fwd_bwd(fn, inputs, grad):
    def run():
        for t in inputs:
            t.grad = None
        fn().backward(grad)
    return run


def bench_problem(name, shape, heads, window, stride, natten, dtype, head_dim, flex, rows):
    ndim = len(shape)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, *shape, heads, head_dim, device="cuda", dtype=dtype, generator=g)
               .requires_grad_() for _ in range(3))
    grad = torch.randn(1, *shape, heads, head_dim, device="cuda", dtype=dtype, generator=g)
    problem = normalize(None, q, k, v, window, stride)
    flop_bound = problem.geometry.dense_pairs() / problem.geometry.attended_pairs()
    # 2.5x the forward FLOPs: dV, dP, dK, dQ GEMMs plus the recomputed scores.
    bwd_flops = 10 * problem.geometry.attended_pairs() * heads * head_dim
    qh, kh, vh = (heads_first(t.detach()).requires_grad_() for t in (q, k, v))
    gh = heads_first(grad)

    def cudnn():
        return cudnn_attention(qh, kh, vh)

    def ours():
        return _na(ndim)(q, k, v, window, stride, backend="triton")

    result = {"problem": name, "shape": shape, "heads": heads, "window": window,
              "stride": stride, "dtype": str(dtype).split(".")[-1], "head_dim": head_dim,
              "flop_bound": flop_bound, "natten_published": natten}
    peers = {"cudnn": (cudnn, (qh, kh, vh), gh), "gna": (ours, (q, k, v), grad)}
    if flex and not any(s % t for s, t in zip(shape, FLEX_TILE[ndim])):
        try:
            fn, mask_s = flex_runner(shape, window, stride, qh, kh, vh, tiled=True)
            peers["flex_tiled"] = (fn, (qh, kh, vh), gh)
            result["flex_mask_s"] = mask_s
        except Exception as e:  # reported in the row, not hidden
            result["flex_tiled"] = {"error": repr(e)[:300]}
    for key, (fn, inputs, gr) in peers.items():
        try:
            with torch.no_grad():
                fwd = harness.time_ms(fn)["ms"]
            both = harness.time_ms(_fwd_bwd(fn, inputs, gr))["ms"]
            mem = harness.peak_memory(_fwd_bwd(fn, inputs, gr))
            result[key] = {"fwd_ms": fwd, "fwd_bwd_ms": both, "bwd_ms": both - fwd,
                           "peak_bytes": mem}
        except Exception as e:
            result[key] = {"error": repr(e)[:300]}
            continue
        if both < GPU_ONLY_BELOW_MS:
            try:  # the same step replayed from a CUDA graph: no host time at all
                with torch.no_grad():
                    fwd_graph = harness.graph_time_ms(fn)
                result[key]["gpu_only_bwd_ms"] = (
                    harness.graph_time_ms(_fwd_bwd(fn, inputs, gr)) - fwd_graph)
            except Exception as e:
                result[key]["gpu_only_error"] = repr(e)[:300]
    base = result["cudnn"]
    for key in ("gna", "flex_tiled"):
        entry = result.get(key, {})
        if "bwd_ms" in entry:
            entry["bwd_speedup"] = base["bwd_ms"] / entry["bwd_ms"]
            entry["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / entry["fwd_bwd_ms"]
            entry["bwd_tflops"] = bwd_flops / entry["bwd_ms"] / 1e9
            entry["memory_vs_cudnn"] = entry["peak_bytes"] / base["peak_bytes"]
        if "gpu_only_bwd_ms" in entry and "bwd_ms" in base:
            entry["gpu_only_bwd_speedup"] = (base.get("gpu_only_bwd_ms", base["bwd_ms"])
                                             / entry["gpu_only_bwd_ms"])
    if "bwd_speedup" in result.get("gna", {}) and "bwd_speedup" in result.get("flex_tiled", {}):
        result["gna"]["bwd_vs_flex"] = (result["flex_tiled"]["bwd_ms"] / result["gna"]["bwd_ms"])
        if "gpu_only_bwd_ms" in result["gna"] and "gpu_only_bwd_ms" in result["flex_tiled"]:
            result["gna"]["gpu_only_bwd_vs_flex"] = (result["flex_tiled"]["gpu_only_bwd_ms"]
                                                     / result["gna"]["gpu_only_bwd_ms"])
    rows.append(result)
    _print_row(result)
    del q, k, v, qh, kh, vh, grad, gh
    torch.cuda.empty_cache()


def _fmt(entry):
    if not entry:
        return "-"
    if "error" in entry:
        return "error: " + entry["error"][:80]
    text = f"bwd {entry['bwd_ms']:8.3f}ms fwd+bwd {entry['fwd_bwd_ms']:8.3f}ms"
    if "gpu_only_bwd_ms" in entry:
        text += f" (graph bwd {entry['gpu_only_bwd_ms']:.3f}ms"
        if "gpu_only_bwd_speedup" in entry:
            text += f", {entry['gpu_only_bwd_speedup']:.2f}x"
        text += ")"
    if "bwd_speedup" in entry:
        text += (f" ({entry['bwd_speedup']:.2f}x bwd, {entry['bwd_tflops']:.0f}TF,"
                 f" mem {entry['memory_vs_cudnn']:.2f}x)")
    return text


def _print_row(r):
    print(f"{r['problem']:24s} {r['dtype']:8s} bound {r['flop_bound']:5.1f}x | cudnn "
          f"{_fmt(r.get('cudnn'))} | gna {_fmt(r.get('gna'))} | flex tiled "
          f"{_fmt(r.get('flex_tiled'))} | gna vs flex bwd "
          f"{r.get('gna', {}).get('bwd_vs_flex', '-')}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--only", nargs="*", help="problem names to run")
    p.add_argument("--dtypes", nargs="*", default=["fp16"])
    args = p.parse_args(argv)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    problems = [pr for pr in PROBLEMS if (not args.only or pr[0] in args.only)
                and pr[0] != "3d-dense"]
    print(harness.environment(), flush=True)
    rows = []
    harness.exit_on_sigterm()
    try:
        for dtype in (dtypes[d] for d in args.dtypes):
            for pr in problems:
                bench_problem(*pr, dtype=dtype, head_dim=128, rows=rows,
                              flex=not args.no_flex and dtype == torch.float16)
    finally:
        print("results:", harness.append("backward", rows))


if __name__ == "__main__":
    main()
