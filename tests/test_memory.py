"""The reference never materializes an N x N mask or score matrix.

Peak memory is measured in a fresh subprocess as the growth of its peak resident set size
across the measured call: the kernel's high-water mark ``VmHWM`` is reset to the current RSS
just before the call (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), so allocations made
and freed earlier (imports, warm-up) do not hide growth; where that reset is not possible it
falls back to the growth of ``ru_maxrss``. A positive control allocates one N x N float32 tensor
the same way, showing the measurement sees such an allocation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# 2-D 128 x 128, batch 1, 4 heads, head_dim 64, 7 x 7 window, float32.
N = 128 * 128
HEADS = 4
DENSE_SCORES_BYTES = HEADS * N * N * 4  # 4 GiB: one float32 score matrix per head
BUDGET_BYTES = DENSE_SCORES_BYTES // 8  # 512 MiB

_MEASURE = textwrap.dedent("""
    import json, resource, sys
    import torch
    torch.set_num_threads(2)
    import gna

    def reset_peak():
        # Reset the high-water mark to the current RSS; True if the kernel allowed it.
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def peak_bytes(hwm):
        if hwm:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    what = sys.argv[1]
    gen = torch.Generator().manual_seed(0)
    if what == "reference":
        shape = (1, 128, 128, 4, 64)
        q, k, v = (torch.randn(shape, generator=gen).requires_grad_(True) for _ in range(3))
        grad = torch.randn(shape, generator=gen)
        # Warm up once on a small problem, so one-time allocations are not measured.
        small = torch.randn(1, 16, 16, 4, 64, requires_grad=True)
        gna.na2d(small, small, small, 7, backend="reference").sum().backward()
        hwm = reset_peak()
        before = peak_bytes(hwm)
        out = gna.na2d(q, k, v, 7, backend="reference")
        out.backward(grad)
        after = peak_bytes(hwm)
        finite = bool(torch.isfinite(q.grad).all() and torch.isfinite(out).all())
    else:  # positive control: one dense N x N float32 matrix
        hwm = reset_peak()
        before = peak_bytes(hwm)
        scores = torch.ones(128 * 128, 128 * 128)
        after = peak_bytes(hwm)
        finite = bool(scores[-1, -1] == 1)
    print(json.dumps({"before": before, "after": after, "finite": finite, "hwm_reset": hwm}))
""")


def _measure(what: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _MEASURE, what], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units are Linux's")
def test_measurement_sees_dense_matrix():
    result = _measure("control")
    growth = result["after"] - result["before"]
    assert result["finite"]
    assert growth >= 0.9 * N * N * 4, (
        f"the positive control grew the peak RSS by only {growth / 2**20:.0f} MiB for a "
        f"{N * N * 4 / 2**20:.0f} MiB tensor: the measurement does not work")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units are Linux's")
def test_reference_does_not_materialize_dense_scores():
    result = _measure("reference")
    growth = result["after"] - result["before"]
    assert result["finite"]
    assert growth < BUDGET_BYTES, (
        f"reference forward+backward on 128x128, 4 heads, d=64, 7x7 window grew the peak RSS "
        f"by {growth / 2**20:.0f} MiB; budget {BUDGET_BYTES / 2**20:.0f} MiB = 1/8 of the "
        f"{DENSE_SCORES_BYTES / 2**20:.0f} MiB a dense float32 score matrix for 4 heads needs")
