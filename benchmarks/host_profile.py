"""Where the host time of a call goes: cProfile of many calls of the 1-D stride-2048 problem
(the row host time bounds), forward alone (no grad) and an eager forward + backward step.

    python benchmarks/host_profile.py [--calls 300] [--out DIR] [--sort tottime cumulative]
    python benchmarks/host_profile.py --floor     # what PyTorch itself costs per step here

Prints, per path, the host time per call (launches queued asynchronously, as in
``harness.host_time_us``) and the functions with the most own time; with ``--out`` also
writes the full profiles as text.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

import gna  # noqa: E402


def floor(calls: int) -> None:
    """Host time of what any eager training step pays, on the same tensors: an autograd
    Function whose forward and backward only allocate (2 + 3 tensors, as gna's do), five
    ``torch.empty`` and one empty kernel launch. Printed and appended to the results file."""
    q, k, v = (torch.randn(1, 32768, 1, 128, device="cuda", dtype=torch.float16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    class Allocate(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            ctx.save_for_backward(q, k, v)
            return torch.empty_like(q), torch.empty(q.shape[:-1], device=q.device)

        @staticmethod
        def backward(ctx, grad_out, grad_lse):
            q, k, v = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def step():
        for t in (q, k, v):
            t.grad = None
        Allocate.apply(q, k, v)[0].backward(grad)

    def empties():
        for _ in range(5):
            torch.empty(q.shape, dtype=q.dtype, device=q.device)

    rows = []
    for name, fn in (("allocating autograd step", step), ("5 x torch.empty", empties),
                     ("empty kernel launch", lambda: torch.cuda._sleep(1))):
        host = harness.host_time_us(fn, calls=calls)
        print(f"{name}: {host:.1f} us", flush=True)
        rows.append({"problem": "floor", "path": name, "host_us": host, "calls": calls})
    harness.append("host_overhead", rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--out", default=None)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--stride", type=int, default=2048)
    p.add_argument("--sort", nargs="*", default=["tottime"],
                   help="pstats orders to print (e.g. tottime cumulative)")
    p.add_argument("--lines", type=int, default=25, help="functions printed per order")
    p.add_argument("--floor", action="store_true",
                   help="only what PyTorch itself costs on this machine (see floor())")
    args = p.parse_args(argv)
    if args.floor:
        floor(args.calls)
        return
    q, k, v = (torch.randn(1, 32768, 1, 128, device="cuda", dtype=torch.float16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    w, s = args.window, args.stride

    def forward():
        with torch.no_grad():
            gna.na1d(q, k, v, w, s, backend="triton")

    def step():
        for t in (q, k, v):
            t.grad = None
        gna.na1d(q, k, v, w, s, backend="triton").backward(grad)

    rows = []
    for name, fn in (("forward", forward), ("fwd+bwd", step)):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        host = harness.host_time_us(fn, calls=args.calls)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        for order in args.sort:
            pstats.Stats(prof, stream=text).sort_stats(order).print_stats(args.lines)
        print(f"== {name}: host {host:.1f} us per call", flush=True)
        print(text.getvalue(), flush=True)
        if args.out:
            Path(args.out, f"host_profile_{name.replace('+', '_')}.txt").write_text(
                text.getvalue())
        rows.append({"problem": f"1d-w{w}-s{s}", "path": name, "host_us": host,
                     "calls": args.calls})
    harness.append("host_overhead", rows)


if __name__ == "__main__":
    main()
