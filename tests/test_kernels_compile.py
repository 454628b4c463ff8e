"""The Triton kernels compile for Hopper (sm_90) when every integer argument is 1.

The interpreter that runs the kernels in CI does not specialize arguments; the GPU compiler
does: an integer argument equal to 1 becomes a compile-time Python ``1`` (so ``x.to(...)`` on
it fails, and a stride of 1 folds away). Such a failure reached the GPU once (the dK/dV
kernel's Q-tile count). This test compiles each kernel ahead of time for sm_90 on any machine,
with every integer argument that Triton may specialize set to 1 and pointers 16-byte aligned,
which is what a call with unit sizes, one tile or one head gets on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gna.kernels.backward import (  # noqa: E402
    gna_backward_delta_kernel,
    gna_backward_dkdv_kernel,
    gna_backward_dq_kernel,
    gna_backward_extra_kernel,
)
from gna.kernels.forward import gna_forward_kernel  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
FP32_POINTERS = {"Lse", "Delta", "dLse", "Stats", "dEK", "dEV"}
INT32_POINTERS = {"Win", "Inv", "Rng", "Counts"}
DATA_POINTERS = {"Q", "K", "V", "EK", "EV", "dO", "Out", "dK", "dV", "dQ", "KD", "VD"}
DESCRIPTORS = {"KD", "VD"}  # host-made tensor descriptors where HOST_DESC is set
FLOATS = {"qk_scale", "scale"}
TILES = dict(T0=1, T1=4, T2=8, K0=2, K1=4, K2=8)


def _signature(kernel, constexprs: dict, data_type="fp16", descriptor=lambda name: None):
    """Signature, constants and attributes to compile ``kernel`` ahead of time: ``constexprs``
    as given, tensor descriptors typed by ``descriptor(name)``, data pointers of
    ``data_type``, and every other integer argument equal to 1 (what the JIT specializes it
    to) unless the kernel marks it ``do_not_specialize``."""
    signature, constants, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        name = p.name
        if name in constexprs:
            signature[name] = "constexpr"
            constants[(i,)] = constexprs[name]
        elif descriptor(name):
            signature[name] = descriptor(name)
        elif name in DATA_POINTERS:
            signature[name] = "*" + data_type
        elif name in FP32_POINTERS:
            signature[name] = "*fp32"
        elif name in INT32_POINTERS:
            signature[name] = "*i32"
        elif name in FLOATS:
            signature[name] = "fp32"
        elif p.do_not_specialize:
            signature[name] = "i32"
        else:  # what the JIT does with an integer argument equal to 1
            signature[name] = "constexpr"
            constants[(i,)] = 1
        if signature[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constexprs]
    assert not missing, f"test gives no value for constexprs {missing}"
    return signature, constants, attrs


def _compile(kernel, constexprs: dict, num_warps=4, num_stages=2):
    """Compile a Triton kernel for sm_90 with its integer arguments specialized to 1."""
    def descriptor(name):
        if name in DESCRIPTORS and constexprs.get("HOST_DESC"):
            block = [constexprs[n] for n in ("K0", "K1", "K2")] + [1, constexprs["HEAD_DIM"]]
            return f"tensordesc<fp16[{','.join(map(str, block))}]>"
        return None

    signature, constants, attrs = _signature(kernel, constexprs, descriptor=descriptor)
    src = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=HOPPER,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _compile_gluon_forward(dtype: str, q_tile, kv_tile, head_dim: int):
    """The Gluon block-sparse forward with the launcher's options, integer arguments equal to
    1 specialized, and its three tensor descriptors typed as the launcher makes them."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from gna import triton_backend as tb
    from gna.kernels.forward_gluon import gna_forward_block_sparse_kernel as kernel

    elem = {"fp16": gl.float16, "bf16": gl.bfloat16}[dtype]
    blocks = {"q_desc": [*q_tile, 1, head_dim], "k_desc": [*kv_tile, 1, head_dim],
              "v_desc": [*kv_tile, 1, head_dim]}

    def descriptor(name):
        if name not in blocks:
            return None
        layout = gl.NVMMASharedLayout.get_default_for(blocks[name], elem)
        return f"tensordesc<{dtype}[{','.join(map(str, blocks[name]))}],{layout!r}>"

    constexprs = dict(STAGES=tb._GLUON_STAGES, CONSUMER_REGS=tb._GLUON_REGS[0],
                      PRODUCER_REGS=tb._GLUON_REGS[1])
    signature, constants, attrs = _signature(kernel, constexprs, dtype, descriptor)
    src = GluonASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=HOPPER, options={"num_warps": tb._GLUON_NUM_WARPS,
                                                       "maxnreg": tb._GLUON_MAXNREG})


CASES = {
    "forward": (gna_forward_kernel, dict(TILES, HEAD_DIM=64, PAD_D=False, HAS_EXTRA=True,
                                         PRECISION="ieee", USE_TMA=False, HOST_DESC=False,
                                         WARP_SPECIALIZE=False, COUNT_TILES=False)),
    "forward-tma": (gna_forward_kernel, dict(TILES, HEAD_DIM=64, PAD_D=False, HAS_EXTRA=True,
                                             PRECISION="ieee", USE_TMA=True, HOST_DESC=False,
                                             WARP_SPECIALIZE=False, COUNT_TILES=False)),
    "forward-tma-host-descriptors": (gna_forward_kernel, dict(
        TILES, HEAD_DIM=64, PAD_D=False, HAS_EXTRA=True, PRECISION="ieee", USE_TMA=True,
        HOST_DESC=True, WARP_SPECIALIZE=False, COUNT_TILES=False)),
    "dkdv": (gna_backward_dkdv_kernel, dict(TILES, HEAD_DIM=64, head_dim=64, PRECISION="ieee",
                                            KV_MAJOR=False, USE_TMA=False)),
    "dkdv-kv-major-tma": (gna_backward_dkdv_kernel, dict(TILES, HEAD_DIM=64, head_dim=64,
                                                         PRECISION="ieee", KV_MAJOR=True,
                                                         USE_TMA=True)),
    "dq": (gna_backward_dq_kernel, dict(TILES, HEAD_DIM=64, head_dim=64, HAS_EXTRA=True,
                                        PRECISION="ieee", USE_TMA=False)),
    "delta": (gna_backward_delta_kernel, dict(T0=1, T1=4, T2=8, HEAD_DIM=64, head_dim=64,
                                              HAS_DLSE=True)),
    "extra": (gna_backward_extra_kernel, dict(BLOCK_M=32, BLOCK_N=32, HEAD_DIM=64, head_dim=64,
                                              PRECISION="ieee")),
}


# The Gluon block-sparse forward, typed as its launcher calls it.
GLUON_CASES = {
    "forward-gluon-block-sparse-1d-fp16-d128": ("fp16", (1, 1, 128), (1, 1, 128), 128),
    "forward-gluon-block-sparse-3d-bf16-d64": ("bf16", (2, 8, 8), (2, 8, 8), 64),
}


@pytest.mark.parametrize("case", list(CASES) + list(GLUON_CASES))
def test_kernel_compiles_for_hopper_with_unit_sizes(case):
    # The kernels compile in a fresh process: under TRITON_INTERPRET=1 (set for the other
    # tests) they are interpreter objects, which the compiler does not take.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{case} does not compile for sm_90:\n{done.stderr[-3000:]}"


if __name__ == "__main__":
    if sys.argv[1] in GLUON_CASES:
        compiled = _compile_gluon_forward(*GLUON_CASES[sys.argv[1]])
        # Within an H100's shared memory per block, as the launcher plans.
        assert compiled.metadata.shared <= 232448, compiled.metadata.shared
    else:
        kernel, constexprs = CASES[sys.argv[1]]
        _compile(kernel, constexprs)
