"""Host time of one eager training step (forward + backward) on a small 1-D problem, where host
work rather than GPU work bounds the step: the eager autograd.Function path (what
``backend="triton"`` runs) against the ``gna::na_forward`` custom-op path (what torch.compile
traces), on the same machine in the same run.

    python benchmarks/host_overhead.py
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

import gna  # noqa: E402
from gna import triton_backend  # noqa: E402


def main():
    q, k, v = (torch.randn(1, 32768, 1, 128, device="cuda", dtype=torch.float16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def eager():
        gna.na1d(q, k, v, 2048, backend="triton").backward(grad)

    def op():
        out, _ = triton_backend.na_forward(q, k, v, None, None, [2048], [1], [1], [False],
                                           128 ** -0.5, None, None, None, None, False, False)
        out.backward(grad)

    rows = []
    for name, fn in (("eager_function", eager), ("custom_op", op)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        host = harness.host_time_us(fn, calls=50)
        step = harness.time_ms(fn)["ms"]
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        loop = (time.perf_counter() - t0) / 50 * 1e3
        rows.append({"problem": "1d-w2048 fwd+bwd", "path": name, "host_us": host,
                     "do_bench_ms": step, "loop_ms": loop})
        print(rows[-1], flush=True)
    harness.append("host_overhead", rows)


if __name__ == "__main__":
    main()
