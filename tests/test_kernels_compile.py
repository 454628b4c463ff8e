"""The Triton kernels compile for Hopper (sm_90) when every integer argument is 1.

The interpreter that runs the kernels in CI does not specialize arguments; the GPU compiler
does: an integer argument equal to 1 becomes a compile-time Python ``1`` (so ``x.to(...)`` on
it fails, and a stride of 1 folds away). Such a failure reached the GPU once (the dK/dV
kernel's Q-tile count). This test compiles each kernel ahead of time for sm_90 on any machine,
with every integer argument that Triton may specialize set to 1 and pointers 16-byte aligned,
which is what a call with unit sizes, one tile or one head gets on the GPU.
"""

from __future__ import annotations

import functools
import math
import os
import re
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
FP32_POINTERS = {"Lse", "Delta", "dLse", "Stats", "dEK", "dEV", "DqAcc"}
INT32_POINTERS = {"Win", "Inv", "Rng", "Counts", "QR", "Sched"}
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


def _compile_gluon(kind: str, dtype: str, q_tile, kv_tile, head_dim: int, partial: bool = True):
    """A Gluon kernel (``kind``: the block-sparse ``forward``, ``dq``, ``dkdv`` or ``fused``)
    with its launcher's options, integer arguments equal to 1 specialized, and its tensor
    descriptors typed as the launcher makes them; the dQ kernel with or without its
    partial-tile code (``partial``)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from gna import triton_backend as tb
    from gna import triton_backward as tbw
    from gna.kernels import backward_gluon, forward_gluon

    elem = {"fp16": gl.float16, "bf16": gl.bfloat16}[dtype]
    q_block, kv_block = [*q_tile, 1, head_dim], [*kv_tile, 1, head_dim]
    blocks = {"q_desc": q_block, "do_desc": q_block, "k_desc": kv_block, "v_desc": kv_block}

    def descriptor(name):
        if name == "st_desc":  # the dK/dV kernel's row statistics, fp32 rows of one Q tile
            layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
            return f"tensordesc<fp32[{math.prod(q_tile)}],{layout!r}>"
        if name == "dqa_desc":  # the fused kernel's fp32 dQ accumulator, half of d per box
            block = [*q_tile, 1, head_dim // 2]
            layout = gl.NVMMASharedLayout.get_default_for(block, gl.float32)
            return f"tensordesc<fp32[{','.join(map(str, block))}],{layout!r}>"
        if name not in blocks:
            return None
        layout = gl.NVMMASharedLayout.get_default_for(blocks[name], elem)
        return f"tensordesc<{dtype}[{','.join(map(str, blocks[name]))}],{layout!r}>"

    if kind == "forward":
        kernel, stages = forward_gluon.gna_forward_block_sparse_kernel, tb._GLUON_STAGES
        regs, maxnreg = tb._GLUON_REGS, tb._GLUON_MAXNREG
    else:
        kernel = {"dq": backward_gluon.gna_backward_dq_block_sparse_kernel,
                  "dkdv": backward_gluon.gna_backward_dkdv_block_sparse_kernel,
                  "fused": backward_gluon.gna_backward_fused_block_sparse_kernel}[kind]
        stages = tbw._gluon_stages(kind, math.prod(kv_tile))
        regs, maxnreg = tbw._GLUON_REGS[kind], tbw._GLUON_MAXNREG
    constexprs = dict(STAGES=stages, CONSUMER_REGS=regs[0], PRODUCER_REGS=regs[1])
    if kind == "dq":
        constexprs["PARTIAL"] = partial
    signature, constants, attrs = _signature(kernel, constexprs, dtype, descriptor)
    src = GluonASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=HOPPER, options={"num_warps": tb._GLUON_NUM_WARPS,
                                                       "maxnreg": maxnreg})


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
                                              HAS_DLSE=True, ZERO_DQ=True)),
    "extra": (gna_backward_extra_kernel, dict(BLOCK_M=32, BLOCK_N=32, HEAD_DIM=64, head_dim=64,
                                              PRECISION="ieee")),
}


# The Gluon block-sparse kernels, typed as their launchers call them.
GLUON_CASES = {
    "forward-gluon-block-sparse-1d-fp16-d128": ("forward", "fp16", (1, 1, 128), (1, 1, 128), 128),
    "forward-gluon-block-sparse-3d-bf16-d64": ("forward", "bf16", (2, 8, 8), (2, 8, 8), 64),
    "dq-gluon-block-sparse-1d-fp16-d128": ("dq", "fp16", (1, 1, 128), (1, 1, 128), 128),
    "dq-gluon-block-sparse-1d-fp16-d128-kv64": ("dq", "fp16", (1, 1, 128), (1, 1, 64), 128),
    "dq-gluon-block-sparse-2d-fp16-d128-kv64": ("dq", "fp16", (1, 8, 16), (1, 8, 8), 128),
    "dq-gluon-block-sparse-3d-bf16-d64": ("dq", "bf16", (2, 8, 8), (2, 8, 8), 64),
    "dq-gluon-block-sparse-3d-fp16-d128-kv64-mask-free": ("dq", "fp16", (2, 8, 8), (1, 8, 8), 128,
                                                          False),
    "dkdv-gluon-block-sparse-2d-fp16-d128": ("dkdv", "fp16", (1, 8, 8), (1, 8, 16), 128),
    "dkdv-gluon-block-sparse-3d-bf16-d64": ("dkdv", "bf16", (1, 8, 8), (2, 8, 8), 64),
    "fused-gluon-block-sparse-2d-fp16-d128": ("fused", "fp16", (1, 8, 8), (1, 8, 16), 128),
    "fused-gluon-block-sparse-3d-bf16-d64": ("fused", "bf16", (1, 8, 8), (2, 8, 8), 64),
}


@pytest.mark.parametrize("case", list(CASES) + list(GLUON_CASES))
def test_kernel_compiles_for_hopper_with_unit_sizes(case):
    # The kernels compile in a fresh process: under TRITON_INTERPRET=1 (set for the other
    # tests) they are interpreter objects, which the compiler does not take.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{case} does not compile for sm_90:\n{done.stderr[-3000:]}"


@functools.lru_cache(maxsize=None)
def _sass(case: str) -> list[tuple[int, str]]:
    """The sm_90 SASS of a Gluon case, ``(address, "OPCODE operands")`` per instruction, the
    predicate dropped (compiled in a fresh process, disassembled with the cuobjdump Triton
    ships)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, "--sass", case], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [(int(a, 16), op) for a, op in (line.split(" ", 1) for line in done.stdout.splitlines())]


def _sass_opcodes(case: str) -> list[str]:
    return [op for _, op in _sass(case)]


def _loops(case: str) -> list[list[str]]:
    """The instructions of every backward branch's span (a loop body, or a wait's retry)."""
    code = _sass(case)
    index = {a: i for i, (a, _) in enumerate(code)}
    loops = []
    for i, (a, op) in enumerate(code):
        m = re.match(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", op)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in index:
            loops.append([o for _, o in code[index[int(m.group(1), 16)]:i + 1]])
    return loops


def _count(ops, prefix):
    return sum(op.startswith(prefix) for op in ops)


@pytest.mark.parametrize("case", [c for c in GLUON_CASES if c != "dq-gluon-block-sparse-1d-fp16-d128"])
def test_gluon_kernels_keep_wgmma_asynchronous(case):
    # ptxas serializes wgmma (a wait after every instruction), saying so only under -v, when
    # non-wgmma code may read an in-flight accumulator (C7514: it did for dK/dV variants whose
    # next scores stayed in flight across steps) or registers run short (C7512: the dQ kernel
    # on 128-key tiles at d=128, the case left out here, three 64 x 128 fp32 accumulators in
    # flight; the planner gives the dQ kernel 64-key tiles). The kernels issue 4-8 wgmma per
    # wait.
    ops = _sass_opcodes(case)
    hgmma, waits = _count(ops, "HGMMA"), _count(ops, "WARPGROUP.DEPBAR")
    assert hgmma >= 3 * waits, f"{case}: {hgmma} HGMMA, {waits} waits"


@pytest.mark.parametrize("case", list(GLUON_CASES))
def test_gluon_kernels_feed_register_operands_unswapped(case):
    # A P (or dS) tile goes from the softmax's registers into the next GEMM as packed. In a
    # variant of the forward whose P tile was carried from one loop into another (session 8,
    # partially masked tiles), ptxas swapped the two halves of all 32 P registers before every
    # P V GEMM (PRMT ... 0x5432, 128 in the kernel) and the block-sparse rows ran 7-17% slower.
    swaps = [op for op in _sass_opcodes(case) if op.startswith("PRMT") and "0x5432" in op]
    assert not swaps, f"{case}: {len(swaps)} register half-swaps, e.g. {swaps[0]}"


@pytest.mark.parametrize("case", [c for c in GLUON_CASES if not c.startswith("forward")])
def test_gluon_backward_producers_copy_mask_free_steps_without_divisions(case):
    # The producer warp issues every step's copies. Where it also computed the step's partial
    # tile (partial_tile: integer divisions, I2F/MUFU.RCP sequences) on mask-free steps, its
    # step grew from 72-97 to 200-225 instructions and the dQ kernel became producer-bound
    # (session 10: dQ -6 to -8% once the mask-free steps had a loop of their own).
    producer = [body for body in _loops(case)
                if any(op.startswith("UTMALDG") for op in body)
                and not any(op.startswith("HGMMA") for op in body)]
    assert producer, f"{case}: no producer loop found"
    clean = [body for body in producer
             if not any(op.startswith(("MUFU.RCP", "I2F")) for op in body)]
    assert clean, f"{case}: every producer loop divides ({[len(b) for b in producer]} instr.)"
    assert min(map(len, clean)) <= 120, [len(b) for b in clean]


def test_gluon_dq_runs_exp2_while_dp_gemm_runs():
    # The dQ kernel waits for the scores (wait 1), computes P = exp2(...), then waits for dP
    # (wait 0). ptxas scheduled the second wait above nearly all the exp2 (5 of 32) until a
    # re-wait on a completed mbarrier pinned the order (session 7: -10 to -13% dQ time).
    # On 64-key tiles each thread of a consumer computes 64 x 64 / 128 = 32 exp2 per step.
    ops = _sass_opcodes("dq-gluon-block-sparse-2d-fp16-d128-kv64")
    best, inside = 0, None
    for op in ops:
        if op.startswith("WARPGROUP.DEPBAR.LE gsb0, 0x1"):
            inside = 0
        elif op.startswith("WARPGROUP.DEPBAR") and inside is not None:
            best, inside = max(best, inside), None
        elif op.startswith("MUFU.EX2") and inside is not None:
            inside += 1
    assert best >= 32, f"at most {best} exp2 between a score wait and the dP wait"


if __name__ == "__main__":
    if sys.argv[1] == "--sass":
        import tempfile
        from pathlib import Path

        compiled = _compile_gluon(*GLUON_CASES[sys.argv[2]])
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
        for line in sass.splitlines():
            m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
            if m:
                op = m.group(2)
                print(m.group(1), op.lstrip("@!P0123456789UT ") if op.startswith("@") else op)
    elif sys.argv[1] in GLUON_CASES:
        compiled = _compile_gluon(*GLUON_CASES[sys.argv[1]])
        # Within an H100's shared memory per block, as the launcher plans.
        assert compiled.metadata.shared <= 232448, compiled.metadata.shared
    else:
        kernel, constexprs = CASES[sys.argv[1]]
        _compile(kernel, constexprs)
